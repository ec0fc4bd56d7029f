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

/// A fresh database (SQLite, or PostgreSQL when the tests are pointed at
/// it) with the outbox table, and a pool of `connections`.
async fn with_outbox(dir: &std::path::Path, connections: u32) -> anyhow::Result<(TestDatabase, Db)> {
    let test_db = TestDatabase::create(dir).await?;
    let db = Db::connect(&DbOptions {
        url: test_db.url().to_owned(),
        max_connections: connections,
        acquire_timeout: Duration::from_secs(10),
        statement_timeout_ms: 0,
    })
    .await?;
    db.migrate_outbox().await?;
    Ok((test_db, db))
}

/// [`with_outbox`] and the audit tables.
async fn migrated(dir: &std::path::Path, connections: u32) -> anyhow::Result<(TestDatabase, Db)> {
    let (test_db, db) = with_outbox(dir, connections).await?;
    estate_audit::migrate(&db).await?;
    Ok((test_db, db))
}

/// [`with_outbox`] and the audit schema as it was before migration 5004
/// (the portable migrations only: entries in hex, rowid index tables).
async fn before_5004(dir: &std::path::Path) -> anyhow::Result<(TestDatabase, Db)> {
    let (test_db, db) = with_outbox(dir, 2).await?;
    db.migrate("audit", sqlx::migrate!("./migrations")).await?;
    Ok((test_db, db))
}

/// Writes entry `idx` of tenant-a the way the log did before 5004: its
/// event (`bytes`), leaf hash and chain hash as hex text.
async fn insert_hex_entry(
    db: &Db,
    idx: usize,
    (bytes, e): &(Vec<u8>, AuditEvent),
    chain: [u8; 32],
    estate: &str,
    person: &str,
) -> anyhow::Result<()> {
    sqlx::query::<sqlx::Any>(
        "INSERT INTO audit_entries (tenant_id, idx, event_id, event_hex, leaf_hash, chain_hash, estate_id, \
         person_pseudonym, action, occurred_at, appended_at, relayed) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, 0, 1)",
    )
    .bind("tenant-a")
    .bind(idx as i64)
    .bind(e.event_id.clone())
    .bind(hex::encode(bytes))
    .bind(hex::encode(estate_merkle::leaf_hash(bytes)))
    .bind(hex::encode(chain))
    .bind(estate.to_owned())
    .bind(person.to_owned())
    .bind(e.action.clone())
    .execute(db.pool())
    .await?;
    Ok(())
}

#[tokio::test]
async fn duplicates_near_and_far_are_skipped() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (test_db, db) = migrated(dir.path(), 2).await?;
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

fn event_of(tenant: &str, id: String) -> AuditEvent {
    AuditEvent { event_id: id, tenant_id: tenant.into(), action: "gate.decide".into(), ..Default::default() }
}

/// Appends inside callers' transactions (the all-in-one gate's decisions)
/// and the relay's appends, concurrently and for the same tenants, leave
/// each tenant's log contiguous and chained: SQLite's write turn or
/// PostgreSQL's per-tenant advisory lock serialises them.
#[tokio::test]
async fn appends_in_callers_transactions_interleave_with_the_relay() -> anyhow::Result<()> {
    use estate_store::outbox::AuditSink;
    let dir = tempfile::tempdir()?;
    let (test_db, db) = migrated(dir.path(), 6).await?;
    let log = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 50, 60);
    let tenants = ["tenant-c", "tenant-a", "tenant-b"];
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let (log, db) = (log.clone(), db.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..10 {
                // Every batch holds events of all three tenants, in an order
                // that differs between workers.
                let events: Vec<AuditEvent> =
                    (0..12).map(|i| event_of(tenants[(i + worker) % 3], format!("w{worker}-r{round}-{i}"))).collect();
                if worker % 2 == 0 {
                    let prepared: Vec<_> = events.into_iter().map(|e| log.prepare(e)).collect();
                    let mut tx = db.begin().await?;
                    log.append_in(&mut tx, &prepared).await?;
                    tx.commit().await?;
                    log.committed(&prepared);
                } else {
                    let raw: Vec<(Vec<u8>, AuditEvent)> = events.into_iter().map(|e| (e.encode_to_vec(), e)).collect();
                    log.append(&raw).await?;
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let mut listed = log.tenants_with_entries().await?;
    listed.sort();
    assert_eq!(listed, ["tenant-a", "tenant-b", "tenant-c"]);
    for tenant in tenants {
        // 4 workers × 10 rounds × 4 events of each tenant, numbered 0..160
        // without a gap (the tree refuses gaps) and chained.
        let tree = log.tree(tenant).await?;
        assert_eq!(tree.lock().await.size(), 160, "{tenant}");
        let cp = log.checkpoint_now(tenant).await?.and_then(|c| c.decoded).map(|d| d.tree_size);
        assert_eq!(cp, Some(160));
    }
    db.close().await;
    test_db.drop().await
}

/// The stored chain of `tenant`, recomputed from its leaf hashes in order:
/// the number of entries, each numbered in turn and chained to the one
/// before.
async fn chained_entries(db: &Db, tenant: &str) -> anyhow::Result<usize> {
    let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = sqlx::query_as::<sqlx::Any, (i64, Vec<u8>, Vec<u8>)>(
        "SELECT idx, leaf_hash, chain_hash FROM audit_entries WHERE tenant_id = $1 ORDER BY idx",
    )
    .bind(tenant)
    .fetch_all(db.pool())
    .await?;
    let mut chain = [0u8; 32];
    for (i, (idx, leaf, stored)) in rows.iter().enumerate() {
        assert_eq!(*idx, i as i64, "entry {i} is numbered {idx}");
        let leaf: [u8; 32] = leaf.as_slice().try_into().map_err(|_| anyhow::anyhow!("leaf hash size"))?;
        chain = estate_audit_bundle::chain_next(&chain, &leaf);
        assert_eq!(chain.as_slice(), stored.as_slice(), "entry {idx} is not chained to the one before");
    }
    Ok(rows.len())
}

/// `append_committed` remembers each tenant's head and, on SQLite, appends
/// without reading it. When another writer (here another log over the same
/// database, as a second process would be) has moved the head on, the
/// append finds out, appends after the real head and the chain stays whole.
#[tokio::test]
async fn a_head_moved_by_another_writer_is_found_and_the_chain_stays_whole() -> anyhow::Result<()> {
    use estate_store::outbox::AuditSink;
    let dir = tempfile::tempdir()?;
    let (test_db, db) = migrated(dir.path(), 2).await?;
    let log = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 1000, 60);
    let other = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 1000, 60);
    let prepared = |from: usize, to: usize| -> Vec<_> {
        (from..to).map(|i| log.prepare(event_of("tenant-a", format!("e{i}")))).collect()
    };
    // The first append reads the head; the second uses the one remembered.
    log.append_committed(&db, &prepared(0, 10)).await?;
    log.append_committed(&db, &prepared(10, 20)).await?;
    // Another writer appends: the remembered head is now behind.
    let raw: Vec<(Vec<u8>, AuditEvent)> =
        (20..25).map(|i| event_of("tenant-a", format!("e{i}"))).map(|e| (e.encode_to_vec(), e)).collect();
    other.append(&raw).await?;
    log.append_committed(&db, &prepared(25, 40)).await?;
    log.append_committed(&db, &prepared(40, 45)).await?;
    assert_eq!(chained_entries(&db, "tenant-a").await?, 45);
    let tree = log.tree("tenant-a").await?;
    assert_eq!(tree.lock().await.size(), 45);
    db.close().await;
    test_db.drop().await
}

/// On SQLite, an append that meets another connection's write lock (a
/// write outside this process's turns, as another process's would be) is
/// not waited for on the runtime's thread: it is made the usual way, which
/// waits for the lock, and the chain stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_that_meets_another_connections_lock_is_made_the_usual_way() -> anyhow::Result<()> {
    use estate_store::outbox::AuditSink;
    let dir = tempfile::tempdir()?;
    let (test_db, db) = migrated(dir.path(), 2).await?;
    let Some(file) = test_db.url().strip_prefix("sqlite://").map(|p| p.split('?').next().unwrap_or(p).to_owned())
    else {
        db.close().await;
        return test_db.drop().await;
    };
    let log = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 1000, 60);
    let prepared = |from: usize, to: usize| -> Vec<_> {
        (from..to).map(|i| log.prepare(event_of("tenant-a", format!("e{i}")))).collect()
    };
    // The head is known from here on: the next append goes inline.
    log.append_committed(&db, &prepared(0, 10)).await?;
    let (locked, is_locked) = tokio::sync::oneshot::channel();
    let holder = std::thread::spawn(move || -> anyhow::Result<()> {
        let conn = rusqlite::Connection::open(&file)?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let _ = locked.send(());
        std::thread::sleep(Duration::from_millis(300));
        conn.execute_batch("COMMIT")?;
        Ok(())
    });
    is_locked.await?;
    log.append_committed(&db, &prepared(10, 20)).await?;
    holder.join().map_err(|_| anyhow::anyhow!("the lock holder panicked"))??;
    assert_eq!(chained_entries(&db, "tenant-a").await?, 20);
    log.append_committed(&db, &prepared(20, 25)).await?;
    assert_eq!(chained_entries(&db, "tenant-a").await?, 25);
    db.close().await;
    test_db.drop().await
}

/// The leaves a committed append leaves are pushed onto the tree in memory
/// only where that tree ends just before them: with another writer's entries
/// in between, the tree catches up from the database instead, and either
/// way it has the root of a tree rebuilt from the stored entries.
#[tokio::test]
async fn trees_extended_in_memory_match_the_stored_entries() -> anyhow::Result<()> {
    use estate_store::outbox::AuditSink;
    let dir = tempfile::tempdir()?;
    let (test_db, db) = migrated(dir.path(), 2).await?;
    let log = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 1000, 60);
    let other = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 1000, 60);
    let prepared = |from: usize, to: usize| -> Vec<_> {
        (from..to).map(|i| log.prepare(event_of("tenant-a", format!("e{i}")))).collect()
    };
    let root = |log: &AuditLog| {
        let log = log.clone();
        async move {
            let tree = log.tree("tenant-a").await?;
            let tree = tree.lock().await;
            anyhow::Ok((tree.size(), tree.root()))
        }
    };
    log.append_committed(&db, &prepared(0, 10)).await?;
    assert_eq!(root(&log).await?.0, 10);
    log.append_committed(&db, &prepared(10, 20)).await?;
    log.append_committed(&db, &prepared(20, 30)).await?;
    let raw: Vec<(Vec<u8>, AuditEvent)> =
        (30..35).map(|i| event_of("tenant-a", format!("e{i}"))).map(|e| (e.encode_to_vec(), e)).collect();
    other.append(&raw).await?;
    log.append_committed(&db, &prepared(35, 50)).await?;
    log.append_committed(&db, &prepared(50, 52)).await?;
    let rebuilt = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 1000, 60);
    let expected = root(&rebuilt).await?;
    assert_eq!(expected.0, 52);
    assert_eq!(root(&log).await?, expected);
    log.append_committed(&db, &prepared(52, 60)).await?;
    assert_eq!(root(&log).await?, root(&rebuilt).await?);
    db.close().await;
    test_db.drop().await
}

/// Event ids are checked for duplicates where a duplicate can arrive: a
/// relayed event sent again (even after direct appends moved the head on)
/// is skipped, and its id stays unique in the log; a direct append
/// (`append_committed`, fresh events) is written without the id index
/// (migration 5002), and is not mistaken for a relayed one.
#[tokio::test]
async fn only_relayed_event_ids_are_checked_for_duplicates() -> anyhow::Result<()> {
    use estate_store::outbox::AuditSink;
    let dir = tempfile::tempdir()?;
    let (test_db, db) = migrated(dir.path(), 2).await?;
    let log = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 1000, 60);
    let relayed: Vec<(Vec<u8>, AuditEvent)> =
        (0..5).map(|i| event_of("tenant-a", format!("r{i}"))).map(|e| (e.encode_to_vec(), e)).collect();
    assert_eq!(log.append(&relayed).await?.appended, 5);
    let direct: Vec<_> = (0..7).map(|i| log.prepare(event_of("tenant-a", format!("d{i}")))).collect();
    log.append_committed(&db, &direct).await?;
    // The relay resends after a crash, with one new event.
    let mut resent = relayed.clone();
    resent.push({
        let e = event_of("tenant-a", "r5".into());
        (e.encode_to_vec(), e)
    });
    let got = log.append(&resent).await?;
    assert_eq!((got.appended, got.duplicates), (1, 5));
    let by_way: Vec<(i64, i64)> = sqlx::query_as::<sqlx::Any, (i64, i64)>(
        "SELECT relayed, COUNT(*) FROM audit_entries WHERE tenant_id = $1 GROUP BY relayed ORDER BY relayed",
    )
    .bind("tenant-a")
    .fetch_all(db.pool())
    .await?;
    assert_eq!(by_way, [(0, 7), (1, 6)]);
    // A relayed id is unique in the log even when inserted by hand.
    let forged = sqlx::query::<sqlx::Any>(
        "INSERT INTO audit_entries (tenant_id, idx, event_id, event, leaf_hash, chain_hash, estate_id, \
         person_pseudonym, action, occurred_at, appended_at, relayed) \
         VALUES ('tenant-a', 999, 'r0', '', '', '', '', '', 'x', 0, 0, 1)",
    )
    .execute(db.pool())
    .await;
    assert!(forged.is_err(), "a second relayed entry with id r0 was accepted");
    assert_eq!(chained_entries(&db, "tenant-a").await?, 13);
    db.close().await;
    test_db.drop().await
}

/// A log written before migration 5004 kept each entry's event and hashes
/// as hex text. Migrating turns them into the same bytes: the stored events
/// decode, the chain runs on unbroken into entries appended afterwards,
/// relayed ids are still unique, and the tree and checkpoint cover both.
#[tokio::test]
async fn entries_stored_as_hex_are_carried_over_as_bytes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (test_db, db) = before_5004(dir.path()).await?;
    let old: Vec<(Vec<u8>, AuditEvent)> = (0..5).map(event).collect();
    let mut chain = [0u8; 32];
    let mut leaves = Vec::new();
    for (i, entry) in old.iter().enumerate() {
        let leaf = estate_merkle::leaf_hash(&entry.0);
        chain = estate_audit_bundle::chain_next(&chain, &leaf);
        leaves.push(leaf);
        insert_hex_entry(&db, i, entry, chain, "", "").await?;
    }

    estate_audit::migrate(&db).await?;
    let stored: Vec<(Vec<u8>,)> =
        sqlx::query_as::<sqlx::Any, (Vec<u8>,)>("SELECT event FROM audit_entries WHERE tenant_id = $1 ORDER BY idx")
            .bind("tenant-a")
            .fetch_all(db.pool())
            .await?;
    let stored: Vec<Vec<u8>> = stored.into_iter().map(|(b,)| b).collect();
    let want: Vec<Vec<u8>> = old.iter().map(|(b, _)| b.clone()).collect();
    assert_eq!(stored, want, "the events' bytes changed in the migration");

    let log = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 1000, 60);
    let more: Vec<(Vec<u8>, AuditEvent)> = (5..8).map(event).collect();
    let got = log.append(&[old[2].clone(), more[0].clone(), more[1].clone(), more[2].clone()]).await?;
    assert_eq!((got.appended, got.duplicates), (3, 1), "a relayed id from before the migration was appended again");
    assert_eq!(chained_entries(&db, "tenant-a").await?, 8);
    let mut tree = estate_merkle::Tree::new();
    for leaf in leaves.into_iter().chain(more.iter().map(|(b, _)| estate_merkle::leaf_hash(b))) {
        tree.push(leaf);
    }
    let cp = log.checkpoint_now("tenant-a").await?.and_then(|c| c.decoded).map(|d| (d.tree_size, d.root_hash));
    assert_eq!(cp, Some((8, hex::encode(tree.root()))));
    db.close().await;
    test_db.drop().await
}

/// Migrations 5005 (SQLite: the index tables without rowids) and 5006 (the
/// indexes as posting lists): the rows indexed before are dropped with
/// their tables, the mark goes back to the start, and the indexer rebuilds
/// the postings from the log, listing every entry exactly once.
#[tokio::test]
async fn the_indexes_are_rebuilt_from_the_log_as_posting_lists() -> anyhow::Result<()> {
    use estate_audit::IndexOf;
    let dir = tempfile::tempdir()?;
    let (test_db, db) = before_5004(dir.path()).await?;
    let persons = ["person-b", "person-a", "person-b", "", "person-a"];
    for (i, person) in persons.iter().enumerate() {
        insert_hex_entry(&db, i, &event(i), [0u8; 32], "estate-1", person).await?;
    }
    // Entries 0 to 2 were indexed before the migrations.
    for (i, person) in persons.iter().enumerate().take(3) {
        for (sql, key) in [
            ("INSERT INTO audit_person_entries (tenant_id, person_pseudonym, idx) VALUES ($1, $2, $3)", *person),
            ("INSERT INTO audit_estate_entries (tenant_id, estate_id, idx) VALUES ($1, $2, $3)", "estate-1"),
        ] {
            sqlx::query::<sqlx::Any>(sql).bind("tenant-a").bind(key).bind(i as i64).execute(db.pool()).await?;
        }
    }
    sqlx::query::<sqlx::Any>("INSERT INTO audit_person_indexed (tenant_id, next_idx) VALUES ('tenant-a', 3)")
        .execute(db.pool())
        .await?;

    estate_audit::migrate(&db).await?;
    let log = AuditLog::new(db.clone(), estate_crypto::SigningKeyPair::generate()?, 1000, 60);
    assert_eq!(log.indexed_below("tenant-a").await?, 0, "the mark was not reset");
    assert_eq!(log.index_entries_now("tenant-a").await?, 5, "the indexer did not rebuild from the start");
    assert_eq!(log.indexed_below("tenant-a").await?, 5);
    for (which, key, want) in [
        (IndexOf::Person, "person-a", vec![1, 4]),
        (IndexOf::Person, "person-b", vec![0, 2]),
        (IndexOf::Estate, "estate-1", vec![0, 1, 2, 3, 4]),
    ] {
        let (got, more) = log.indexed("tenant-a", which, key, -1, 5).await?;
        assert_eq!((got, more), (want, None), "{key}");
    }
    for table in ["audit_person_entries", "audit_estate_entries"] {
        let gone =
            sqlx::query::<sqlx::Any>(sqlx::AssertSqlSafe(format!("SELECT 1 FROM {table}"))).fetch_all(db.pool()).await;
        assert!(gone.is_err(), "{table} is still there");
    }
    db.close().await;
    test_db.drop().await
}
