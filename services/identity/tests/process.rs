//! The identity service as its own process, configured only through
//! `ESTATE__…` variables: PostgreSQL + Redis when ESTATE_TEST_DATABASE_URL /
//! ESTATE_TEST_REDIS_URL are set (a fresh database), SQLite otherwise. It
//! serves, answers health checks, and stops cleanly on SIGTERM.

use estate_proto::identity::CreateTenantRequest;
use estate_proto::identity::identity_service_client::IdentityServiceClient;
use estate_test_support::{Bearer, ServiceProcess, TestDatabase, service_env};
use std::process::Command;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test(flavor = "multi_thread")]
async fn runs_alone_from_environment_and_stops_on_sigterm() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = TestDatabase::create(dir.path()).await?;
    let token_file = dir.path().join("admin.token");
    let mut env = service_env(&db, &dir.path().join("keys"), &dir.path().join("unused"));
    let bin = env!("CARGO_BIN_EXE_estate-identity");

    let status = Command::new(bin).arg("--migrate-only").envs(env.clone()).status()?;
    assert!(status.success());
    let status = Command::new(bin).arg("--write-admin-token").arg(&token_file).envs(env.clone()).status()?;
    assert!(status.success());
    let token = std::fs::read_to_string(&token_file)?.trim().to_owned();

    // Keys are mounted now: refuse to invent new ones.
    env.push(("ESTATE__KEYS__GENERATE_MISSING", "false".into()));
    env.push(("ESTATE__DATABASE__MIGRATE_ON_START", "false".into()));
    let process = ServiceProcess::start(bin, &env)?;
    let channel = process.channel().await?;
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest { service: "estate.identity.v1.IdentityService".into() })
        .await?
        .into_inner();
    assert_eq!(health.status, 1);
    let mut client = IdentityServiceClient::with_interceptor(channel, Bearer::new(&token)?);
    let tenant = client
        .create_tenant(CreateTenantRequest { name: "Standalone".into(), jurisdiction_code: "120101".into() })
        .await?
        .into_inner();
    assert!(!tenant.id.is_empty());

    let status = process.stop_gracefully().await?;
    assert!(status.success(), "exit status {status}");
    db.drop().await
}
