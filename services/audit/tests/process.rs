//! The audit service as its own process, relaying the shared outbox: killed
//! with SIGKILL in the middle of its work and restarted, it loses nothing and
//! appends nothing twice; every tenant's log stays contiguous and chained.

use estate_proto::common::AuditEvent;
use estate_store::outbox;
use estate_store::sqlx::{self, Any};
use estate_store::{Db, DbOptions};
use estate_test_support::{ServiceProcess, TestDatabase, service_env};
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

const EVENTS: usize = 6000;

async fn delivered(db: &Db) -> anyhow::Result<i64> {
    let (n,): (i64,) =
        sqlx::query_as::<Any, (i64,)>("SELECT COUNT(*) FROM outbox_events WHERE delivered_at IS NOT NULL")
            .fetch_one(db.pool())
            .await?;
    Ok(n)
}

/// An entry as stored: tenant, index, event id, leaf hash, chain hash.
type StoredEntry = (String, i64, String, Vec<u8>, Vec<u8>);

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_relay_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let test_db = TestDatabase::create(dir.path()).await?;
    let mut env = service_env(&test_db, &dir.path().join("keys"), &dir.path().join("unused"));
    // Small batches, no pause: the kill lands mid-stream.
    env.push(("ESTATE__AUDIT__RELAY_BATCH", "20".into()));
    env.push(("ESTATE__AUDIT__RELAY_INTERVAL_MS", "20".into()));
    let bin = env!("CARGO_BIN_EXE_estate-audit");
    assert!(Command::new(bin).arg("--migrate-only").envs(env.clone()).status()?.success());

    let db = Db::connect(&DbOptions {
        url: test_db.url().to_owned(),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(10),
        statement_timeout_ms: 0,
    })
    .await?;
    let tenants = ["tenant-a", "tenant-b", "tenant-c"];
    let mut conn = db.begin().await?;
    for i in 0..EVENTS {
        let event = AuditEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            tenant_id: tenants[i % 3].into(),
            action: "credential.verify".into(),
            source: "test".into(),
            attributes: [("n".to_owned(), i.to_string())].into_iter().collect(),
            ..Default::default()
        };
        outbox::record(&mut conn, &event).await?;
    }
    conn.commit().await?;

    let first = ServiceProcess::start(bin, &env)?;
    for _ in 0..600 {
        if delivered(&db).await? > 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill()?;
    let at_kill = delivered(&db).await?;
    assert!(at_kill > 0 && at_kill < EVENTS as i64, "the kill should land mid-stream (delivered {at_kill})");

    let second = ServiceProcess::start(bin, &env)?;
    for _ in 0..600 {
        if delivered(&db).await? == EVENTS as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(delivered(&db).await?, EVENTS as i64);
    assert!(second.stop_gracefully().await?.success());

    let rows: Vec<StoredEntry> = sqlx::query_as::<Any, StoredEntry>(
        "SELECT tenant_id, idx, event_id, leaf_hash, chain_hash FROM audit_entries ORDER BY tenant_id, idx",
    )
    .fetch_all(db.pool())
    .await?;
    assert_eq!(rows.len(), EVENTS, "every event appended exactly once");
    let mut ids = std::collections::HashSet::new();
    let mut next: HashMap<String, (i64, [u8; 32])> = HashMap::new();
    for (tenant, idx, event_id, leaf, chain) in rows {
        assert!(ids.insert(event_id), "an event was appended twice");
        let (want, prev) = next.get(&tenant).copied().unwrap_or((0, [0; 32]));
        assert_eq!(idx, want, "the log of {tenant} has a gap or a repeat");
        let leaf: [u8; 32] = leaf.as_slice().try_into().map_err(|_| anyhow::anyhow!("leaf"))?;
        let expected = estate_audit_bundle::chain_next(&prev, &leaf);
        assert_eq!(expected.as_slice(), chain.as_slice(), "the chain of {tenant} breaks at {idx}");
        next.insert(tenant, (idx + 1, expected));
    }
    db.close().await;
    test_db.drop().await
}

/// A service on a database of its own ships its outbox to the audit
/// service's `Append`, with a service token; other principals may not append.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_on_its_own_database_ships_to_append() -> anyhow::Result<()> {
    use estate_auth::{Principal, TokenAuthority};
    use estate_proto::audit::AppendRequest;
    use estate_proto::audit::audit_service_client::AuditServiceClient;
    use estate_proto::identity::CreateTenantRequest;
    use estate_proto::identity::identity_service_client::IdentityServiceClient;
    use estate_test_support::Bearer;

    let dir = tempfile::tempdir()?;
    let (audit_dir, identity_dir) = (dir.path().join("audit"), dir.path().join("identity"));
    std::fs::create_dir_all(&audit_dir)?;
    std::fs::create_dir_all(&identity_dir)?;
    let audit_db = TestDatabase::create(&audit_dir).await?;
    let identity_db = TestDatabase::create(&identity_dir).await?;
    let keys = dir.path().join("keys");
    let audit_env = service_env(&audit_db, &keys, &audit_dir);
    let audit_bin = env!("CARGO_BIN_EXE_estate-audit");
    assert!(Command::new(audit_bin).arg("--migrate-only").envs(audit_env.clone()).status()?.success());
    let audit = ServiceProcess::start(audit_bin, &audit_env)?;

    let signing = estate_crypto::SigningKeyPair::load_or_generate(&keys.join("token-signing.ed25519"), false)?;
    let tokens = TokenAuthority::new("estate-mesh", &signing)?;
    let service_token = tokens.issue(Principal::Service { name: "identity".into() }, "identity-relay", 3600)?.token;
    let admin_token = tokens.issue(Principal::PlatformAdmin, "admin", 3600)?.token;
    let token_file = dir.path().join("relay.token");
    std::fs::write(&token_file, &service_token)?;

    // The identity service, in this test process, on its own database,
    // configured to ship its outbox to the audit process.
    let mut settings = estate_config::Settings::load_with_env(None, Vec::new())?;
    settings.data_dir = identity_dir.clone();
    settings.listen = "127.0.0.1:0".parse()?;
    settings.database.url = Some(identity_db.url().to_owned());
    settings.keys.dir = Some(keys.clone());
    settings.keys.generate_missing = false;
    settings.telemetry.log_filter = "warn".into();
    settings.audit.relay_to = Some(format!("http://{}", audit.addr));
    settings.audit.relay_token_file = Some(token_file.clone());
    settings.audit.relay_interval_ms = 50;
    let runtime = estate_runtime::Runtime::open(settings).await?;
    runtime.db.migrate_outbox().await?;
    let identity = estate_identity::application(runtime).await?;
    let port = identity.port();
    let identity_task = tokio::spawn(identity.run_until_stopped());
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?.connect().await?;
    let mut client = IdentityServiceClient::with_interceptor(channel, Bearer::new(&admin_token)?);
    let tenant = client
        .create_tenant(CreateTenantRequest { name: "Remote".into(), jurisdiction_code: "120101".into() })
        .await?
        .into_inner();

    let audit_pool = Db::connect(&DbOptions {
        url: audit_db.url().to_owned(),
        max_connections: 1,
        acquire_timeout: Duration::from_secs(10),
        statement_timeout_ms: 0,
    })
    .await?;
    let mut found = 0;
    for _ in 0..100 {
        let (n,): (i64,) = sqlx::query_as::<Any, (i64,)>("SELECT COUNT(*) FROM audit_entries WHERE tenant_id = $1")
            .bind(&tenant.id)
            .fetch_one(audit_pool.pool())
            .await?;
        found = n;
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(found, 1, "the tenant.create event reached the audit log once");

    // Only a service principal appends.
    let mut as_admin = AuditServiceClient::with_interceptor(audit.channel().await?, Bearer::new(&admin_token)?);
    let refused = as_admin.append(AppendRequest { events: vec![] }).await.err().map(|s| s.code());
    assert_eq!(refused, Some(tonic::Code::PermissionDenied));

    identity_task.abort();
    assert!(audit.stop_gracefully().await?.success());
    audit_pool.close().await;
    audit_db.drop().await?;
    identity_db.drop().await
}
