//! Two credentials-service processes on one database: with Redis configured
//! (ESTATE_TEST_REDIS_URL), wrong PINs counted by either process lock PIN
//! entry for both. Without Redis each process counts alone, which the test
//! also checks, so the embedded default is covered too. And one process
//! killed with SIGKILL mid-write leaves no change without its audit event.

use estate_proto::credentials::credential_service_client::CredentialServiceClient;
use estate_proto::credentials::*;
use estate_test_support::fixtures::{gate, world};
use estate_test_support::{Bearer, REDIS_ENV, ServiceProcess, TestMesh};

fn pin_attempt(unit: &str, pin: &str) -> VerifyCredentialRequest {
    VerifyCredentialRequest {
        estate_id: String::new(),
        presented: Some(verify_credential_request::Presented::Pin(PresentedPin {
            unit_id: unit.into(),
            pin: pin.into(),
        })),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pin_lockout_is_shared_by_processes_sharing_redis() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Shared", "120101").await?;
    let mut op = mesh.credentials(&w.operator_token)?;
    op.issue_credential(IssueCredentialRequest {
        person_id: w.person.id.clone(),
        estate_ids: vec![w.estate.id.clone()],
        secret: Some(issue_credential_request::Secret::Pin(PinSecret {
            pin: "739146".into(),
            unit_id: w.unit.id.clone(),
        })),
        ..Default::default()
    })
    .await?;

    let keys = mesh.data_dir.path().join("keys");
    let mut env: Vec<(&str, String)> = vec![
        ("ESTATE__DATABASE__URL", mesh.db_url().to_owned()),
        ("ESTATE__KEYS__DIR", keys.display().to_string()),
        ("ESTATE__KEYS__GENERATE_MISSING", "false".into()),
        ("ESTATE__DATABASE__MIGRATE_ON_START", "false".into()),
        ("ESTATE__LISTEN", "127.0.0.1:0".into()),
        ("ESTATE__TELEMETRY__LOG_FILTER", "warn".into()),
    ];
    let shared = std::env::var(REDIS_ENV).ok();
    if let Some(redis) = &shared {
        env.push(("ESTATE__REDIS__URL", redis.clone()));
    }
    let bin = env!("CARGO_BIN_EXE_estate-credentials");
    let a = ServiceProcess::start(bin, &env)?;
    let b = ServiceProcess::start(bin, &env)?;
    let token = gate(&mesh, &w)?;
    let mut at_a = CredentialServiceClient::with_interceptor(a.channel().await?, Bearer::new(&token)?);
    let mut at_b = CredentialServiceClient::with_interceptor(b.channel().await?, Bearer::new(&token)?);
    let outcome = |v: Verification| VerifyOutcome::try_from(v.outcome).unwrap_or(VerifyOutcome::Unspecified);

    assert_eq!(
        outcome(at_a.verify_credential(pin_attempt(&w.unit.id, "739146")).await?.into_inner()),
        VerifyOutcome::Valid
    );
    for _ in 0..3 {
        assert_eq!(
            outcome(at_a.verify_credential(pin_attempt(&w.unit.id, "000001")).await?.into_inner()),
            VerifyOutcome::Unknown
        );
    }
    assert_eq!(
        outcome(at_b.verify_credential(pin_attempt(&w.unit.id, "000001")).await?.into_inner()),
        VerifyOutcome::Unknown
    );
    let fifth = outcome(at_b.verify_credential(pin_attempt(&w.unit.id, "000001")).await?.into_inner());
    if shared.is_some() {
        // Five failures across both processes: locked everywhere.
        assert_eq!(fifth, VerifyOutcome::Locked);
        assert_eq!(
            outcome(at_a.verify_credential(pin_attempt(&w.unit.id, "739146")).await?.into_inner()),
            VerifyOutcome::Locked
        );
        assert_eq!(
            outcome(at_b.verify_credential(pin_attempt(&w.unit.id, "739146")).await?.into_inner()),
            VerifyOutcome::Locked
        );
    } else {
        // In-process counters: B has seen two failures, A three.
        assert_eq!(fifth, VerifyOutcome::Unknown);
        assert_eq!(
            outcome(at_a.verify_credential(pin_attempt(&w.unit.id, "000002")).await?.into_inner()),
            VerifyOutcome::Unknown
        );
        assert_eq!(
            outcome(at_a.verify_credential(pin_attempt(&w.unit.id, "000003")).await?.into_inner()),
            VerifyOutcome::Locked
        );
        assert_eq!(
            outcome(at_a.verify_credential(pin_attempt(&w.unit.id, "739146")).await?.into_inner()),
            VerifyOutcome::Locked
        );
    }
    assert!(a.stop_gracefully().await?.success());
    assert!(b.stop_gracefully().await?.success());
    mesh.stop().await
}

/// A credentials process killed with SIGKILL while eight callers issue cards
/// as fast as they can: every acknowledged card is in the database, every
/// card in the database has exactly one `credential.issue` audit event and
/// no event names a card that is not there (the change and its event commit
/// together or not at all), and a new process on the same database serves.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_killed_mid_write_leaves_no_change_without_its_audit_event() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Killed", "120101").await?;
    let keys = mesh.data_dir.path().join("keys");
    let env: Vec<(&str, String)> = vec![
        ("ESTATE__DATABASE__URL", mesh.db_url().to_owned()),
        ("ESTATE__KEYS__DIR", keys.display().to_string()),
        ("ESTATE__KEYS__GENERATE_MISSING", "false".into()),
        ("ESTATE__DATABASE__MIGRATE_ON_START", "false".into()),
        ("ESTATE__LISTEN", "127.0.0.1:0".into()),
        ("ESTATE__TELEMETRY__LOG_FILTER", "error".into()),
    ];
    let bin = env!("CARGO_BIN_EXE_estate-credentials");
    let victim = ServiceProcess::start(bin, &env)?;
    let channel = victim.channel().await?;
    let mut writers = Vec::new();
    for t in 0..8u32 {
        let mut c = CredentialServiceClient::with_interceptor(channel.clone(), Bearer::new(&w.operator_token)?);
        let (person, estate) = (w.person.id.clone(), w.estate.id.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            for i in 0..100_000u32 {
                let req = IssueCredentialRequest {
                    person_id: person.clone(),
                    estate_ids: vec![estate.clone()],
                    secret: Some(issue_credential_request::Secret::Card(CardSecret {
                        uid: format!("{:08X}", 0xA000_0000u32 + t * 0x0100_0000 + i),
                        facility_code: String::new(),
                    })),
                    ..Default::default()
                };
                match c.issue_credential(req).await {
                    Ok(r) => acked.push(r.into_inner().credential.map(|c| c.id).unwrap_or_default()),
                    Err(_) => {
                        failed += 1;
                        if failed > 3 {
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                }
            }
            acked
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    victim.kill()?;
    let mut acked = Vec::new();
    for wr in writers {
        acked.extend(wr.await?);
    }
    assert!(!acked.is_empty(), "nothing was acknowledged before the kill");

    let stored: std::collections::HashSet<String> =
        sqlx::query_as::<sqlx::Any, (String,)>("SELECT id FROM credentials WHERE tenant_id = $1 AND kind = 'card'")
            .bind(&w.tenant.id)
            .fetch_all(mesh.db().pool())
            .await?
            .into_iter()
            .map(|(id,)| id)
            .collect();
    let events = estate_store::outbox::for_tenant(mesh.db().pool(), &w.tenant.id).await?;
    let mut issued: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for e in events.iter().filter(|e| e.event.action == "credential.issue") {
        *issued.entry(e.event.object_id.clone()).or_default() += 1;
    }
    let lost = acked.iter().filter(|id| !stored.contains(*id)).count();
    assert_eq!(lost, 0, "{lost} acknowledged cards are not in the database");
    let unaudited = stored.iter().filter(|id| issued.get(*id) != Some(&1)).count();
    assert_eq!(unaudited, 0, "{unaudited} cards do not have exactly one issue event");
    let orphans = issued.keys().filter(|id| !stored.contains(*id)).count();
    assert_eq!(orphans, 0, "{orphans} issue events name no stored card");
    eprintln!(
        "SIGKILL mid-write: {} cards acknowledged, {} stored ({} committed but unanswered), each with one event",
        acked.len(),
        stored.len(),
        stored.len() - acked.len()
    );

    // A new process on the same database takes over.
    let again = ServiceProcess::start(bin, &env)?;
    let mut c = CredentialServiceClient::with_interceptor(again.channel().await?, Bearer::new(&w.operator_token)?);
    c.issue_credential(IssueCredentialRequest {
        person_id: w.person.id.clone(),
        estate_ids: vec![w.estate.id.clone()],
        secret: Some(issue_credential_request::Secret::Card(CardSecret {
            uid: "0B0B0B0B".into(),
            facility_code: String::new(),
        })),
        ..Default::default()
    })
    .await?;
    assert!(again.stop_gracefully().await?.success());
    mesh.stop().await
}
