//! The consent service as its own process beside identity, on the database
//! they share, configured only through `ESTATE__…` variables.

use estate_proto::consent::GetVerifyingKeysRequest;
use estate_proto::consent::consent_service_client::ConsentServiceClient;
use estate_test_support::{ServiceProcess, TestDatabase, service_env};
use std::process::Command;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test(flavor = "multi_thread")]
async fn runs_alone_publishes_its_keys_and_stops_on_sigterm() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = TestDatabase::create(dir.path()).await?;
    let env = service_env(&db, &dir.path().join("keys"), &dir.path().join("unused"));
    let bin = env!("CARGO_BIN_EXE_estate-consent");
    assert!(Command::new(bin).arg("--migrate-only").envs(env.clone()).status()?.success());

    let process = ServiceProcess::start(bin, &env)?;
    let channel = process.channel().await?;
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest { service: "estate.consent.v1.ConsentService".into() })
        .await?
        .into_inner();
    assert_eq!(health.status, 1);
    // The verifying keys are public: no token needed.
    let keys = ConsentServiceClient::new(channel).get_verifying_keys(GetVerifyingKeysRequest {}).await?.into_inner();
    assert_eq!(keys.keys.len(), 1);
    assert_eq!(keys.keys[0].public_key.len(), 32);
    assert!(std::fs::metadata(dir.path().join("keys/consent-attestation.ed25519"))?.is_file());

    let status = process.stop_gracefully().await?;
    assert!(status.success(), "exit status {status}");
    db.drop().await
}
