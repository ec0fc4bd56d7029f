//! Two gate-service processes on one database. With Redis
//! (ESTATE_TEST_REDIS_URL) a revocation made anywhere reaches a gate watching
//! one replica and is enforced by the other at once: the hot-path cache and
//! the change fan-out are shared. Without Redis each replica caches alone and
//! hears no other process, so the bound is the cache TTL, which the test
//! also shows (the embedded default never runs two replicas).

use estate_proto::credentials::*;
use estate_proto::gate::gate_service_client::GateServiceClient;
use estate_proto::gate::*;
use estate_test_support::fixtures::{gate, world};
use estate_test_support::{Bearer, REDIS_ENV, ServiceProcess, TestMesh};
use std::time::Duration;

fn card(uid: &str) -> DecideRequest {
    DecideRequest {
        presented: Some(decide_request::Presented::Card(PresentedCard {
            uid: uid.into(),
            facility_code: String::new(),
        })),
        gate_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_reaches_every_replica() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Replicas", "120101").await?;
    let mut op = mesh.credentials(&w.operator_token)?;
    let issued = op
        .issue_credential(IssueCredentialRequest {
            person_id: w.person.id.clone(),
            estate_ids: vec![w.estate.id.clone()],
            secret: Some(issue_credential_request::Secret::Card(CardSecret {
                uid: "5EED0001".into(),
                facility_code: String::new(),
            })),
            ..Default::default()
        })
        .await?
        .into_inner();
    let id = issued.credential.map(|c| c.id).unwrap_or_default();

    let keys = mesh.data_dir.path().join("keys");
    let shared = std::env::var(REDIS_ENV).ok();
    let mut env: Vec<(&str, String)> = vec![
        ("ESTATE__DATABASE__URL", mesh.db_url().to_owned()),
        ("ESTATE__KEYS__DIR", keys.display().to_string()),
        ("ESTATE__KEYS__GENERATE_MISSING", "false".into()),
        ("ESTATE__DATABASE__MIGRATE_ON_START", "false".into()),
        ("ESTATE__LISTEN", "127.0.0.1:0".into()),
        ("ESTATE__TELEMETRY__LOG_FILTER", "warn".into()),
        ("ESTATE__GATE__CACHE_TTL_SECS", "1".into()),
    ];
    if let Some(redis) = &shared {
        env.push(("ESTATE__REDIS__URL", redis.clone()));
    }
    let bin = env!("CARGO_BIN_EXE_estate-gate");
    let a = ServiceProcess::start(bin, &env)?;
    let b = ServiceProcess::start(bin, &env)?;
    let token = gate(&mesh, &w)?;
    let mut at_a = GateServiceClient::with_interceptor(a.channel().await?, Bearer::new(&token)?);
    let mut at_b = GateServiceClient::with_interceptor(b.channel().await?, Bearer::new(&token)?);
    let reason = |d: Decision| Reason::try_from(d.reason).unwrap_or(Reason::Unspecified);

    // B admits (and caches the card); the gate watches through A.
    assert_eq!(reason(at_b.decide(card("5EED0001")).await?.into_inner()), Reason::Ok);
    let mut stream = at_a.watch_changes(WatchChangesRequest {}).await?.into_inner();
    assert_eq!(stream.message().await?.map(|c| c.change), Some("subscribed".to_owned()));

    op.revoke_credential(ChangeCredentialRequest { id: id.clone(), reason: "stolen".into() }).await?;
    if shared.is_some() {
        let change = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??;
        assert_eq!(change.map(|c| (c.change, c.credential_id)), Some(("revoke".to_owned(), id.clone())));
        // Heard through A, enforced by B: the shared cache was refreshed first.
        assert_eq!(reason(at_b.decide(card("5EED0001")).await?.into_inner()), Reason::Revoked);
    } else {
        // No shared bus: the replicas learn from the database once their
        // cached entry expires (cache_ttl_secs = 1 here, 60 by default).
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(reason(at_b.decide(card("5EED0001")).await?.into_inner()), Reason::Revoked);
    }
    assert_eq!(reason(at_a.decide(card("5EED0001")).await?.into_inner()), Reason::Revoked);

    // Both stop cleanly on SIGTERM although a gate still holds a stream open.
    assert!(a.stop_gracefully().await?.success());
    assert!(b.stop_gracefully().await?.success());
    mesh.stop().await
}
