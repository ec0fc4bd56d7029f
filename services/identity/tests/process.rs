//! The identity service as its own process, configured only through
//! `ESTATE__…` variables: PostgreSQL + Redis when ESTATE_TEST_DATABASE_URL /
//! ESTATE_TEST_REDIS_URL are set (a fresh database), SQLite otherwise. It
//! serves, answers health checks, and stops cleanly on SIGTERM.

use estate_proto::identity::CreateTenantRequest;
use estate_proto::identity::identity_service_client::IdentityServiceClient;
use estate_test_support::Bearer;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test(flavor = "multi_thread")]
async fn runs_alone_from_environment_and_stops_on_sigterm() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = estate_test_support::TestDatabase::create(dir.path()).await?;
    let keys = dir.path().join("keys");
    let token_file = dir.path().join("admin.token");
    let mut env: Vec<(&str, String)> = vec![
        ("ESTATE__DATABASE__URL", db.url().to_owned()),
        ("ESTATE__KEYS__DIR", keys.display().to_string()),
        ("ESTATE__LISTEN", "127.0.0.1:0".into()),
        ("ESTATE__TELEMETRY__LOG_FILTER", "warn".into()),
        ("ESTATE__DATA_DIR", dir.path().join("unused").display().to_string()),
    ];
    if let Ok(redis) = std::env::var(estate_test_support::REDIS_ENV) {
        env.push(("ESTATE__REDIS__URL", redis));
    }
    let bin = env!("CARGO_BIN_EXE_estate-identity");

    let status = Command::new(bin).arg("--migrate-only").envs(env.clone()).status()?;
    assert!(status.success());
    let status = Command::new(bin).arg("--write-admin-token").arg(&token_file).envs(env.clone()).status()?;
    assert!(status.success());
    let token = std::fs::read_to_string(&token_file)?.trim().to_owned();

    // Keys are mounted now: refuse to invent new ones.
    env.push(("ESTATE__KEYS__GENERATE_MISSING", "false".into()));
    env.push(("ESTATE__DATABASE__MIGRATE_ON_START", "false".into()));
    let mut child = Command::new(bin).envs(env).stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line.trim().rsplit(' ').next().unwrap_or_default().to_owned();
    anyhow::ensure!(addr.starts_with("127.0.0.1:"), "unexpected banner {line:?}");

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
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

    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status()?.success());
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = child.try_wait()? {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = exited.ok_or_else(|| anyhow::anyhow!("estate-identity did not stop on SIGTERM"))?;
    assert!(status.success(), "exit status {status}");
    db.drop().await
}
