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

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_relay_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let test_db = TestDatabase::create(dir.path()).await?;
    let mut env = service_env(&test_db, &dir.path().join("keys"), &dir.path().join("unused"));
    // Small batches, no pause: the kill lands mid-stream.
    env.push(("ESTATE__AUDIT__RELAY_BATCH", "50".into()));
    env.push(("ESTATE__AUDIT__RELAY_INTERVAL_MS", "10".into()));
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

    let rows: Vec<(String, i64, String, String, String)> =
        sqlx::query_as::<Any, (String, i64, String, String, String)>(
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
        let leaf: [u8; 32] = hex::decode(leaf)?.try_into().map_err(|_| anyhow::anyhow!("leaf"))?;
        let expected = estate_audit_bundle::chain_next(&prev, &leaf);
        assert_eq!(hex::encode(expected), chain, "the chain of {tenant} breaks at {idx}");
        next.insert(tenant, (idx + 1, expected));
    }
    db.close().await;
    test_db.drop().await
}
