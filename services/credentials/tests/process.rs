//! Two credentials-service processes on one database: with Redis configured
//! (ESTATE_TEST_REDIS_URL), wrong PINs counted by either process lock PIN
//! entry for both. Without Redis each process counts alone, which the test
//! also checks, so the embedded default is covered too.

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
