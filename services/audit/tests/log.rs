//! The append path against a real database: duplicates are skipped whether
//! they sit at the tail of the log (a retried batch) or far behind it.

use estate_audit::AuditLog;
use estate_proto::common::AuditEvent;
use estate_store::{Db, DbOptions};
use estate_test_support::TestDatabase;
use prost::Message;
use std::time::Duration;

fn event(i: usize) -> (Vec<u8>, AuditEvent) {
    let e = AuditEvent {
        event_id: format!("evt-{i:06}"),
        tenant_id: "tenant-a".into(),
        action: "credential.verify".into(),
        ..Default::default()
    };
    (e.encode_to_vec(), e)
}

#[tokio::test]
async fn duplicates_near_and_far_are_skipped() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let test_db = TestDatabase::create(dir.path()).await?;
    let db = Db::connect(&DbOptions {
        url: test_db.url().to_owned(),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(10),
        statement_timeout_ms: 0,
    })
    .await?;
    db.migrate_outbox().await?;
    estate_audit::migrate(&db).await?;
    let log = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 1000, 60);
    let events: Vec<_> = (0..3000).map(event).collect();
    for chunk in events.chunks(500) {
        log.append(chunk).await?;
    }
    // A retried batch: all duplicates at the tail.
    let retry = log.append(&events[2500..]).await?;
    assert_eq!((retry.appended, retry.duplicates), (0, 500));
    // An event from far back, with a new one.
    let mixed = vec![events[3].clone(), event(3000)];
    let got = log.append(&mixed).await?;
    assert_eq!((got.appended, got.duplicates), (1, 1));
    let tree = log.tree("tenant-a").await?;
    assert_eq!(tree.lock().await.size(), 3001);
    let cp = log.checkpoint_now("tenant-a").await?.and_then(|c| c.decoded).map(|d| d.tree_size);
    assert_eq!(cp, Some(3001));
    db.close().await;
    test_db.drop().await
}
