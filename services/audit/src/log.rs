//! The per-tenant append-only log: hash chain, Merkle tree, checkpoints.

use estate_audit_bundle::{chain_next, sign_checkpoint};
use estate_core::{Error, Result, now_ms};
use estate_crypto::SigningKeyPair;
use estate_merkle::{Hash, Tree, leaf_hash};
use estate_proto::audit::{Checkpoint, SignedCheckpoint};
use estate_proto::common::AuditEvent;
use estate_store::outbox::{AuditSink, PreparedEvent};
use estate_store::{Backend, Db, db_error};
use prost::Message;
use sqlx::{Any, AnyConnection};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Mutex;

/// An event with the exact bytes that were written to the outbox.
pub type RawEvent = (Vec<u8>, AuditEvent);

/// How many entries an append added and skipped as already present.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    /// New entries.
    pub appended: usize,
    /// Events whose id was already in the log (idempotent retries).
    pub duplicates: usize,
}

/// The audit log of every tenant, with a Merkle tree per tenant kept in
/// memory (two hashes per entry) and rebuilt from the stored leaf hashes.
#[derive(Debug, Clone)]
pub struct AuditLog {
    db: Db,
    key: SigningKeyPair,
    trees: Arc<Mutex<HashMap<String, Arc<Mutex<Tree>>>>>,
    checkpoint_every: u64,
    checkpoint_interval_ms: i64,
    /// Entries appended through [`AuditSink`] per tenant since a checkpoint
    /// was last considered for it.
    since_checkpoint: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    /// Each tenant's head (last index, chain hash) as this process last
    /// committed it, so that a SQLite append can skip reading it (see
    /// [`AuditSink::append_committed`]). Only ever set after a commit; a head
    /// that another writer moved on is found out by the primary key.
    heads: Arc<std::sync::Mutex<HashMap<String, Head>>>,
    /// Per tenant, the (person, estate) of the entries this process last
    /// appended by script and the indexer has not yet gone past, so that
    /// the indexer need not read them back ([`Self::index_entries`]).
    unindexed: Arc<std::sync::Mutex<HashMap<String, Unindexed>>>,
}

/// Entries `start..start + keys.len()` of a tenant: their person and estate.
#[derive(Debug, Default)]
struct Unindexed {
    start: i64,
    keys: std::collections::VecDeque<(String, String)>,
}

/// The most entries kept per tenant for the indexer; past this (an indexer
/// that fell behind) it reads the entries from the database, as it does
/// after a restart.
const UNINDEXED_MAX: usize = 32_768;

/// A log's last entry: its index and chain hash.
type Head = (i64, Hash);

/// A run of a tenant's entries that one append left: the tenant, the
/// first entry's index, the entries in order.
type Run<'a> = (&'a str, i64, &'a [&'a PreparedEvent]);

/// What a committed script append left, from its groups and the heads
/// after it (in the same order, [`AuditLog::script`]).
fn runs<'a>(groups: &'a [(&'a str, Vec<&'a PreparedEvent>)], heads: &[(String, Head)]) -> Vec<Run<'a>> {
    groups
        .iter()
        .zip(heads)
        .map(|((tenant, list), (_, (last, _)))| (*tenant, last + 1 - list.len() as i64, list.as_slice()))
        .collect()
}

/// A statement with its parameters bound.
type Statement = sqlx::query::Query<'static, Any, sqlx::any::AnyArguments>;

fn hash_of(stored: &[u8]) -> Result<Hash> {
    <[u8; 32]>::try_from(stored).map_err(|_| Error::Internal("a stored audit hash is malformed".into()))
}

/// `items` grouped by tenant, in order of first appearance, each group in
/// its original order.
fn by_tenant<'a, T>(items: &'a [T], tenant: impl Fn(&'a T) -> &'a str) -> Vec<(&'a str, Vec<&'a T>)> {
    let mut groups: Vec<(&str, Vec<&T>)> = Vec::new();
    for item in items {
        let t = tenant(item);
        match groups.iter_mut().find(|(g, _)| *g == t) {
            Some((_, list)) => list.push(item),
            None => groups.push((t, vec![item])),
        }
    }
    groups
}

/// `bytes` (the event's exact encoding) ready for the log.
fn prepare(bytes: Vec<u8>, event: AuditEvent) -> PreparedEvent {
    let leaf = leaf_hash(&bytes);
    PreparedEvent { event, bytes, leaf }
}

impl AuditSink for AuditLog {
    fn prepare(&self, event: AuditEvent) -> PreparedEvent {
        prepare(event.encode_to_vec(), event)
    }

    fn append_in<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        events: &'a [PreparedEvent],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            // Tenants in a fixed order, so that two transactions appending
            // for the same tenants take their PostgreSQL locks in one order.
            let mut by_tenant = by_tenant(events, |e| e.event.tenant_id.as_str());
            by_tenant.sort_by(|a, b| a.0.cmp(b.0));
            for (tenant, list) in by_tenant {
                append_in(&mut *conn, tenant, &list, Arrival::Direct, false).await?;
            }
            Ok(())
        })
    }

    /// On SQLite, with every tenant's head known, the whole append is one
    /// script (`Db::write_script`): BEGIN, one INSERT per tenant, COMMIT,
    /// a single call to the database's thread instead of four. If another
    /// writer moved a head on, the insert at the expected index meets the
    /// primary key, the script is rolled back and the append is made again
    /// the usual way, reading the heads.
    fn append_committed<'a>(
        &'a self,
        db: &'a Db,
        events: &'a [PreparedEvent],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            let mut groups = by_tenant(events, |e| e.event.tenant_id.as_str());
            groups.sort_by(|a, b| a.0.cmp(b.0));
            if db.backend() == Backend::Sqlite
                && let Some((script, heads)) = self.script(&groups)
            {
                match db.write_script(script).await? {
                    Ok(()) => {
                        let runs = runs(&groups, &heads);
                        self.extend_trees(&runs);
                        self.keep_unindexed(&runs);
                        self.publish(heads);
                        self.committed(events);
                        return Ok(());
                    }
                    Err(e) if estate_store::is_unique_violation(&e) => self.forget(groups.iter().map(|g| g.0)),
                    Err(e) => return Err(db_error(e)),
                }
            }
            let mut tx = db.begin().await?;
            let mut heads = Vec::with_capacity(groups.len());
            for (tenant, list) in &groups {
                let (_, head) = append_in(&mut tx, tenant, list, Arrival::Direct, false).await?;
                heads.extend(head.map(|h| (tenant.to_string(), h)));
            }
            tx.commit().await.map_err(db_error)?;
            self.publish(heads);
            self.committed(events);
            Ok(())
        })
    }

    /// Signs a checkpoint in the background for each tenant that gained
    /// `checkpoint_every` entries this way (the relay's sweep signs the
    /// time-based ones).
    fn committed(&self, events: &[PreparedEvent]) {
        let due: Vec<String> = {
            let mut counts = self.since_checkpoint.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for e in events {
                *counts.entry(e.event.tenant_id.clone()).or_default() += 1;
            }
            let due: Vec<String> =
                counts.iter().filter(|(_, n)| **n >= self.checkpoint_every).map(|(t, _)| t.clone()).collect();
            for t in &due {
                counts.remove(t);
            }
            due
        };
        for tenant in due {
            let log = self.clone();
            tokio::spawn(async move {
                if let Err(e) = log.checkpoint_if_due(&tenant).await {
                    tracing::warn!(error = %e, "checkpoint failed; the relay's sweep will retry");
                }
            });
        }
    }
}

/// Appends one tenant's `events` on `conn`, a write transaction the caller
/// commits: reads the tenant's head, hashes and chains each event, inserts
/// the entries. On PostgreSQL it first takes the tenant's append lock
/// (a transaction-scoped advisory lock), so appends by other transactions
/// and processes (relays, audit replicas, the all-in-one gate's decisions)
/// queue instead of reading the same head; on SQLite every write transaction
/// already holds the database's single write lock. `exhaustive` looks each
/// relayed event up first (a retry after a unique-index failure).
async fn append_in(
    conn: &mut AnyConnection,
    tenant: &str,
    events: &[&PreparedEvent],
    arrival: Arrival,
    exhaustive: bool,
) -> Result<(Appended, Option<Head>)> {
    if !conn.backend_name().eq_ignore_ascii_case("sqlite") {
        sqlx::query::<Any>("SELECT pg_advisory_xact_lock($1)")
            .bind(append_lock_key(tenant))
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
    }
    let head: Option<(i64, Vec<u8>)> = sqlx::query_as::<Any, (i64, Vec<u8>)>(
        "SELECT idx, chain_hash FROM audit_entries WHERE tenant_id = $1 ORDER BY idx DESC LIMIT 1",
    )
    .bind(tenant)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    let (mut next, mut chain) = match head {
        Some((idx, c)) => (idx + 1, hash_of(&c)?),
        None => (0, [0u8; 32]),
    };
    let mut out = Appended::default();
    let now = now_ms();
    // Which of these events the log already holds. Normally none: the
    // relay marks what it shipped. Only a retry after a crash between an
    // append and its mark resends events the log has; the unique index of
    // relayed events' ids (tenant, event id) then fails this attempt, and
    // the second attempt looks each event up. Direct appends are never
    // resent and their ids are not indexed (migration 5002). (Reading the log's tail — a thousand event ids
    // and more — on every append to catch that case cost 15–20% of the
    // all-in-one gate's decision throughput: BENCHMARKS.md.)
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut present: std::collections::HashSet<String> = std::collections::HashSet::new();
    if exhaustive && arrival == Arrival::Relayed {
        for e in events {
            let hit: Option<(String,)> = sqlx::query_as::<Any, (String,)>(
                "SELECT event_id FROM audit_entries WHERE tenant_id = $1 AND event_id = $2 AND relayed = 1",
            )
            .bind(tenant)
            .bind(&e.event.event_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_error)?;
            if let Some((id,)) = hit {
                present.insert(id);
            }
        }
    }
    let mut rows: Vec<Row> = Vec::with_capacity(events.len());
    for prepared in events {
        let event = &prepared.event;
        if present.contains(&event.event_id) || !seen.insert(event.event_id.as_str()) {
            out.duplicates += 1;
            continue;
        }
        chain = chain_next(&chain, &prepared.leaf);
        rows.push(Row { idx: next, prepared, chain, occurred: estate_store::outbox::occurred_ms(event) });
        next += 1;
        out.appended += 1;
    }
    for chunk in rows.chunks(INSERT_ROWS) {
        let sql = insert_sql(&estate_store::value_rows(conn, chunk.len(), INSERT_COLUMNS));
        let q = bind_rows(sqlx::query::<Any>(sqlx::AssertSqlSafe(sql)), tenant, chunk, arrival, now);
        q.execute(&mut *conn).await.map_err(|e| {
            if estate_store::is_unique_violation(&e) {
                Error::AlreadyExists("an event of the batch is already in the log".into())
            } else {
                db_error(e)
            }
        })?;
    }
    let head = (next > 0).then_some((next - 1, chain));
    Ok((out, head))
}

/// The INSERT of entries with these `VALUES` groups.
fn insert_sql(values: &str) -> String {
    format!(
        "INSERT INTO audit_entries (tenant_id, idx, event_id, event, leaf_hash, chain_hash, estate_id, \
         person_pseudonym, action, occurred_at, appended_at, relayed) VALUES {values}"
    )
}

/// Binds `rows` of `tenant` in the order of [`insert_sql`]'s columns.
fn bind_rows<'q>(
    mut q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>,
    tenant: &str,
    rows: &[Row<'_>],
    arrival: Arrival,
    now: i64,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments> {
    let relayed = i64::from(arrival == Arrival::Relayed);
    for row in rows {
        q = q
            .bind(tenant.to_owned())
            .bind(row.idx)
            .bind(row.prepared.event.event_id.clone())
            .bind(row.prepared.bytes.clone())
            .bind(row.prepared.leaf.to_vec())
            .bind(row.chain.to_vec())
            .bind(row.prepared.event.estate_id.clone())
            .bind(row.prepared.event.person_pseudonym.clone())
            .bind(row.prepared.event.action.clone())
            .bind(row.occurred)
            .bind(now)
            .bind(relayed);
    }
    q
}

/// How the indexer spaces its write transactions ([`AuditLog::index_entries`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pace {
    /// Back to back, yielding between them.
    Flat,
    /// Spread over this long: the `i`-th of `n` transactions does not
    /// start before `i / n` of it has passed since the first (none waits
    /// after the last).
    Spread(std::time::Duration),
}

/// The derived indexes of the log that [`AuditLog::index_entries`] fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum IndexOf {
    /// Entries by person pseudonym (`audit_person_entries`, migration 5001).
    Person,
    /// Entries by estate (`audit_estate_entries`, migration 5003).
    Estate,
}

/// A row of a derived index: which index, its key (a pseudonym or an estate
/// id) and the entry's index.
pub(crate) type IndexRow = (IndexOf, String, i64);

/// The index rows of `entries` (index, person, estate), sorted by index,
/// then key, then entry.
fn index_rows(entries: Vec<(i64, String, String)>) -> Vec<IndexRow> {
    let mut rows: Vec<IndexRow> = Vec::with_capacity(entries.len() * 2);
    for (idx, person, estate) in entries {
        if !person.is_empty() {
            rows.push((IndexOf::Person, person, idx));
        }
        if !estate.is_empty() {
            rows.push((IndexOf::Estate, estate, idx));
        }
    }
    rows.sort_unstable();
    rows
}

/// The INSERT of `which` index's rows from these `VALUES` groups (tenant,
/// key, index); rows already there (another indexer's) are skipped.
fn index_insert_sql(which: IndexOf, values: &str) -> String {
    let (table, key) = match which {
        IndexOf::Person => ("audit_person_entries", "person_pseudonym"),
        IndexOf::Estate => ("audit_estate_entries", "estate_id"),
    };
    format!(
        "INSERT INTO {table} (tenant_id, {key}, idx) VALUES {values} \
         ON CONFLICT (tenant_id, {key}, idx) DO NOTHING"
    )
}

/// Binds index `rows` of `tenant` in [`index_insert_sql`]'s order.
fn bind_index<'q, 'r>(
    mut q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>,
    tenant: &str,
    rows: impl IntoIterator<Item = &'r IndexRow>,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments> {
    for (_, key, idx) in rows {
        q = q.bind(tenant.to_owned()).bind(key.clone()).bind(*idx);
    }
    q
}

/// Moves a tenant's index mark forward (never back) to `next`.
fn index_mark_sql(tenant: &str, next: &str) -> String {
    format!(
        "INSERT INTO audit_person_indexed (tenant_id, next_idx) VALUES ({tenant}, {next}) \
         ON CONFLICT (tenant_id) DO UPDATE SET next_idx = CASE \
         WHEN excluded.next_idx > audit_person_indexed.next_idx THEN excluded.next_idx \
         ELSE audit_person_indexed.next_idx END"
    )
}

/// How events reach the log, which decides whether their ids are indexed
/// against duplicates (migration 5002).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// Through a relay (an outbox, the Append call), which may send an
    /// event again after a crash: the id is indexed unique and a resent
    /// event is skipped.
    Relayed,
    /// In the transaction that made the event (the all-in-one gate's
    /// decisions): exactly once, with a fresh id, by construction.
    Direct,
}

/// One entry about to be inserted.
struct Row<'a> {
    idx: i64,
    prepared: &'a PreparedEvent,
    chain: Hash,
    occurred: i64,
}

/// The PostgreSQL advisory lock key of a tenant's log: the first eight bytes
/// of SHA-256("estate.audit.append" ‖ tenant).
fn append_lock_key(tenant: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::new().chain_update(b"estate.audit.append\0").chain_update(tenant.as_bytes()).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// Columns of an entry's INSERT ([`insert_sql`]).
const INSERT_COLUMNS: usize = 12;

/// Rows per multi-row INSERT (12 parameters each: 3,072, well under both
/// engines' limits; on SQLite they are anonymous `?`, see
/// `estate_store::params`). The gate's batches (up to 256 decisions) are one
/// statement, so one round trip to the database.
const INSERT_ROWS: usize = 256;

/// Entries the indexer reads at a time (a window). It sorts them by
/// person (and by estate) before inserting, so that a person's entries of the window land
/// together: with 1,000 people and a window of 16,384 entries a B-tree page
/// takes about sixteen rows per write, where indexing each entry as it was
/// appended (or in log order, a few hundred at a time: session 9) wrote
/// nearly one page per entry. A larger window writes fewer pages per entry,
/// costs memory, and leaves more entries for a query by person to read
/// unindexed.
const INDEX_WINDOW: i64 = 16_384;

/// Sorted rows per write transaction of the indexer (3 parameters
/// each, one statement). The gate's decisions wait while it holds the write
/// turn, so a window is written in many short transactions.
const INDEX_ROWS_PER_TX: usize = 512;

impl AuditLog {
    /// A log over `db`, signing checkpoints with `key`.
    pub fn new(db: Db, key: SigningKeyPair, checkpoint_every: u64, checkpoint_interval_secs: u64) -> Self {
        Self {
            db,
            key,
            trees: Arc::new(Mutex::new(HashMap::new())),
            checkpoint_every: checkpoint_every.max(1),
            checkpoint_interval_ms: i64::try_from(checkpoint_interval_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            since_checkpoint: Arc::new(std::sync::Mutex::new(HashMap::new())),
            heads: Arc::new(std::sync::Mutex::new(HashMap::new())),
            unindexed: Arc::new(std::sync::Mutex::new(HashMap::new())),
        }
    }

    /// The append script of [`AuditSink::append_committed`] and the heads it
    /// leaves, if every tenant's head is known.
    fn script(&self, groups: &[(&str, Vec<&PreparedEvent>)]) -> Option<(Statement, Vec<(String, Head)>)> {
        let known: Vec<Head> = {
            let heads = self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            groups.iter().map(|(tenant, _)| heads.get(*tenant).copied()).collect::<Option<Vec<_>>>()?
        };
        let now = now_ms();
        let mut tenants: Vec<(&str, Vec<Row>)> = Vec::with_capacity(groups.len());
        let mut after = Vec::with_capacity(groups.len());
        for ((tenant, list), (last, mut chain)) in groups.iter().zip(known) {
            let mut rows = Vec::with_capacity(list.len());
            for (idx, prepared) in (last + 1..).zip(list) {
                chain = chain_next(&chain, &prepared.leaf);
                rows.push(Row { idx, prepared, chain, occurred: estate_store::outbox::occurred_ms(&prepared.event) });
            }
            after.push((tenant.to_string(), (last + list.len() as i64, chain)));
            tenants.push((tenant, rows));
        }
        let mut sql = String::from("BEGIN IMMEDIATE;\n");
        for (_, rows) in &tenants {
            for chunk in rows.chunks(INSERT_ROWS) {
                let row = format!("({})", ["?"; INSERT_COLUMNS].join(", "));
                sql.push_str(&insert_sql(&vec![row; chunk.len()].join(", ")));
                sql.push_str(";\n");
            }
        }
        sql.push_str("COMMIT");
        let mut q = sqlx::query::<Any>(sqlx::AssertSqlSafe(sql));
        for (tenant, rows) in &tenants {
            q = bind_rows(q, tenant, rows, Arrival::Direct, now);
        }
        Some((q, after))
    }

    /// Pushes the leaves a committed append left onto the tenants' trees in
    /// memory, where a tree ends just before them, so that the next
    /// checkpoint need not read them back from the database. A tree that is
    /// busy or elsewhere (another writer's entries not yet read) is left to
    /// catch up from the stored entries ([`Self::tree`]), as before.
    fn extend_trees(&self, runs: &[Run<'_>]) {
        let Ok(trees) = self.trees.try_lock() else { return };
        for &(tenant, first, list) in runs {
            let Some(handle) = trees.get(tenant) else { continue };
            let Ok(mut tree) = handle.try_lock() else { continue };
            if i64::try_from(tree.size()).is_ok_and(|size| size == first) {
                for prepared in list {
                    tree.push(prepared.leaf);
                }
            }
        }
    }

    /// Keeps the person and estate of the entries a committed append left
    /// for the indexer, after those already kept when they follow on;
    /// otherwise (another writer's entries in between) they start afresh.
    fn keep_unindexed(&self, runs: &[Run<'_>]) {
        let mut kept = self.unindexed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for &(tenant, first, list) in runs {
            let entry = kept.entry(tenant.to_owned()).or_default();
            if entry.start + entry.keys.len() as i64 != first || entry.keys.len() + list.len() > UNINDEXED_MAX {
                *entry = Unindexed { start: first, keys: Default::default() };
            }
            entry.keys.extend(list.iter().map(|p| (p.event.person_pseudonym.clone(), p.event.estate_id.clone())));
        }
    }

    /// Up to `window` entries of `tenant` from `next` on, taken from those
    /// kept by [`Self::keep_unindexed`] when they start there (entries
    /// before `next` are already indexed and are dropped). Taken, not
    /// copied: if their window is not written, the next sweep finds the
    /// kept entries no longer start at its mark and reads the window from
    /// the database.
    fn take_unindexed(&self, tenant: &str, next: i64, window: i64) -> Option<Vec<(i64, String, String)>> {
        let mut kept = self.unindexed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = kept.get_mut(tenant)?;
        while entry.start < next && entry.keys.pop_front().is_some() {
            entry.start += 1;
        }
        if entry.start != next || entry.keys.is_empty() {
            return None;
        }
        let n = entry.keys.len().min(usize::try_from(window).unwrap_or(usize::MAX));
        let taken = (next..).zip(entry.keys.drain(..n)).map(|(i, (p, e))| (i, p, e)).collect();
        entry.start += i64::try_from(n).unwrap_or(i64::MAX);
        Some(taken)
    }

    /// Records heads a commit left.
    fn publish(&self, committed: impl IntoIterator<Item = (String, Head)>) {
        let mut heads = self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        heads.extend(committed);
    }

    /// Whether the tenant's log reaches more than `window` entries beyond
    /// entry `last`: the indexer is then more than a window behind and
    /// catches up without waits. A window is full at the gate's paced
    /// rates too (a second of 17,000 decisions/s outgrows 16,384 entries),
    /// and written without waits that was a 100–190 ms burst holding the
    /// writing connection: 97% of the paced decisions' p99 tail
    /// (BENCHMARKS.md, session 21). When this process does not know the
    /// head (another writer moved it), a full window is taken as behind.
    pub(crate) fn behind_beyond(&self, tenant: &str, last: i64, window: i64) -> bool {
        let heads = self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        heads.get(tenant).is_none_or(|(head, _)| head - last > window)
    }

    /// Forgets the heads of `tenants` (another writer moved them on).
    fn forget<'a>(&self, tenants: impl IntoIterator<Item = &'a str>) {
        let mut heads = self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for t in tenants {
            heads.remove(t);
        }
    }

    /// The signing key (its public half verifies checkpoints and exports).
    pub fn key(&self) -> &SigningKeyPair {
        &self.key
    }

    /// Appends events (with their exact bytes), idempotently by event id.
    /// Each tenant's events are appended in one transaction, in order.
    pub async fn append(&self, events: &[RawEvent]) -> Result<Appended> {
        let mut total = Appended::default();
        for (tenant, list) in by_tenant(events, |e| e.1.tenant_id.as_str()) {
            let got = self.append_tenant(tenant, &list).await?;
            total.appended += got.appended;
            total.duplicates += got.duplicates;
            self.checkpoint_if_due(tenant).await?;
        }
        Ok(total)
    }

    async fn append_tenant(&self, tenant: &str, events: &[&RawEvent]) -> Result<Appended> {
        match self.append_tenant_with(tenant, events, false).await {
            Err(Error::AlreadyExists(_)) => self.append_tenant_with(tenant, events, true).await,
            other => other,
        }
    }

    async fn append_tenant_with(&self, tenant: &str, events: &[&RawEvent], exhaustive: bool) -> Result<Appended> {
        let prepared: Vec<PreparedEvent> =
            events.iter().map(|(bytes, event)| prepare(bytes.clone(), event.clone())).collect();
        let list: Vec<&PreparedEvent> = prepared.iter().collect();
        let mut tx = self.db.begin().await?;
        let (out, head) = append_in(&mut tx, tenant, &list, Arrival::Relayed, exhaustive).await?;
        tx.commit().await.map_err(db_error)?;
        self.publish(head.map(|h| (tenant.to_owned(), h)));
        Ok(out)
    }

    /// The tenant's tree, brought up to date with the stored entries.
    pub async fn tree(&self, tenant: &str) -> Result<Arc<Mutex<Tree>>> {
        let handle = {
            let mut trees = self.trees.lock().await;
            trees.entry(tenant.to_owned()).or_insert_with(|| Arc::new(Mutex::new(Tree::new()))).clone()
        };
        {
            let mut tree = handle.lock().await;
            loop {
                let from = i64::try_from(tree.size()).unwrap_or(i64::MAX);
                let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as::<Any, (i64, Vec<u8>)>(
                    "SELECT idx, leaf_hash FROM audit_entries WHERE tenant_id = $1 AND idx >= $2 ORDER BY idx LIMIT 10000",
                )
                .bind(tenant)
                .bind(from)
                .fetch_all(self.db.pool())
                .await
                .map_err(db_error)?;
                if rows.is_empty() {
                    break;
                }
                for (idx, leaf) in rows {
                    if idx != i64::try_from(tree.size()).unwrap_or(-1) {
                        return Err(Error::Internal(format!("audit log of tenant has a gap at {idx}")));
                    }
                    tree.push(hash_of(&leaf)?);
                }
            }
        }
        Ok(handle)
    }

    /// The latest stored checkpoint of a tenant.
    pub async fn latest_checkpoint(&self, tenant: &str) -> Result<Option<SignedCheckpoint>> {
        let row: Option<(String, String, String)> = sqlx::query_as::<Any, (String, String, String)>(
            "SELECT checkpoint_hex, key_id, signature_hex FROM audit_checkpoints WHERE tenant_id = $1 ORDER BY tree_size DESC LIMIT 1",
        )
        .bind(tenant)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_error)?;
        row.map(|(c, key_id, s)| {
            let checkpoint = hex::decode(c).map_err(|_| Error::Internal("stored checkpoint malformed".into()))?;
            let decoded = Checkpoint::decode(checkpoint.as_slice())
                .map_err(|_| Error::Internal("stored checkpoint malformed".into()))?;
            let signature = hex::decode(s).map_err(|_| Error::Internal("stored checkpoint malformed".into()))?;
            Ok(SignedCheckpoint { checkpoint, key_id, signature, decoded: Some(decoded) })
        })
        .transpose()
    }

    /// A checkpoint covering every entry now in the log, signing one if the
    /// latest does not. `None` while the tenant's log is empty.
    pub async fn checkpoint_now(&self, tenant: &str) -> Result<Option<SignedCheckpoint>> {
        let latest = self.latest_checkpoint(tenant).await?;
        let handle = self.tree(tenant).await?;
        let tree = handle.lock().await;
        let size = tree.size();
        if size == 0 {
            return Ok(None);
        }
        if let Some(cp) = &latest
            && cp.decoded.as_ref().is_some_and(|d| d.tree_size == i64::try_from(size).unwrap_or(-1))
        {
            return Ok(latest);
        }
        let (chain,): (Vec<u8>,) =
            sqlx::query_as::<Any, (Vec<u8>,)>("SELECT chain_hash FROM audit_entries WHERE tenant_id = $1 AND idx = $2")
                .bind(tenant)
                .bind(i64::try_from(size - 1).unwrap_or(i64::MAX))
                .fetch_one(self.db.pool())
                .await
                .map_err(db_error)?;
        let checkpoint = Checkpoint {
            tenant_id: tenant.to_owned(),
            tree_size: i64::try_from(size).unwrap_or(i64::MAX),
            root_hash: hex::encode(tree.root()),
            chain_hash: hex::encode(hash_of(&chain)?),
            timestamp_unix: now_ms() / 1000,
        };
        drop(tree);
        let signed = sign_checkpoint(&self.key, &checkpoint);
        // In a write transaction, so that on SQLite it takes its turn with
        // the process's other writers instead of meeting a busy database and
        // holding up the next writer in SQLite's busy handler.
        let mut tx = self.db.begin().await?;
        sqlx::query::<Any>(
            "INSERT INTO audit_checkpoints (tenant_id, tree_size, root_hash, chain_hash, timestamp_unix, key_id, checkpoint_hex, signature_hex) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (tenant_id, tree_size) DO NOTHING",
        )
        .bind(tenant)
        .bind(checkpoint.tree_size)
        .bind(&checkpoint.root_hash)
        .bind(&checkpoint.chain_hash)
        .bind(checkpoint.timestamp_unix)
        .bind(&signed.key_id)
        .bind(hex::encode(&signed.checkpoint))
        .bind(hex::encode(&signed.signature))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(Some(signed))
    }

    /// Signs a checkpoint when `checkpoint_every` entries or the interval
    /// have passed since the last one.
    pub async fn checkpoint_if_due(&self, tenant: &str) -> Result<()> {
        let latest = self.latest_checkpoint(tenant).await?;
        let head: Option<(i64,)> = sqlx::query_as::<Any, (i64,)>(
            "SELECT idx FROM audit_entries WHERE tenant_id = $1 ORDER BY idx DESC LIMIT 1",
        )
        .bind(tenant)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_error)?;
        let size = head.map_or(0, |(i,)| i + 1);
        let (last_size, last_time) =
            latest.and_then(|c| c.decoded).map_or((0, 0), |d| (d.tree_size, d.timestamp_unix * 1000));
        let grown = size - last_size;
        let due = grown > 0
            && (u64::try_from(grown).unwrap_or(0) >= self.checkpoint_every
                || now_ms() - last_time >= self.checkpoint_interval_ms);
        if due {
            self.checkpoint_now(tenant).await?;
        }
        Ok(())
    }

    /// Brings the tenant's derived indexes (`audit_person_entries`,
    /// `audit_estate_entries`) up to the log's head and returns how many
    /// entries it went past. A window of [`INDEX_WINDOW`] entries is
    /// read (outside the write turn), its rows sorted by index, then key,
    /// and written [`INDEX_ROWS_PER_TX`] rows per write transaction; the
    /// last of them moves the tenant's mark past the window. A window cut
    /// short (a crash, an error) leaves the mark where it was and is
    /// written again next time; queries read the indexes only below the
    /// mark. Safe to run in several processes at once: rows already there
    /// are skipped and the mark only moves forward.
    ///
    /// This is the background indexer's pace: the write transactions of
    /// each window are spread evenly `over` the time given (the indexer
    /// runs every second and gives each sweep half of it), so that the
    /// writing connection is taken in short turns evenly apart. A window
    /// with more than another window behind it is written back to back, so
    /// that an indexer that fell behind (a restart, a stall) catches up.
    /// Written back to back, a second of the all-in-one gate's decisions
    /// (16,000 entries, 64 transactions) held it for 200–440 ms in one
    /// burst, and every decision arriving meanwhile queued behind it
    /// (BENCHMARKS.md, session 19). Resting after each transaction as long
    /// as it took, as sessions 19 and 20 did, still left bursts of 100–190
    /// ms at 17,000 decisions/s, where a second's entries fill a window
    /// (BENCHMARKS.md, session 21).
    pub async fn index_entries(&self, tenant: &str, over: std::time::Duration) -> Result<usize> {
        self.index_entries_by(tenant, INDEX_WINDOW, INDEX_ROWS_PER_TX, Pace::Spread(over)).await
    }

    /// [`Self::index_entries`] without waits between transactions: the
    /// indexes up to the head as fast as the database goes (a catch-up
    /// whose cost is to be measured, as gate-bench does).
    pub async fn index_entries_now(&self, tenant: &str) -> Result<usize> {
        self.index_entries_by(tenant, INDEX_WINDOW, INDEX_ROWS_PER_TX, Pace::Flat).await
    }

    /// [`Self::index_entries`] with windows of `window` entries and `per_tx`
    /// rows per transaction, at `pace`.
    pub(crate) async fn index_entries_by(&self, tenant: &str, window: i64, per_tx: usize, pace: Pace) -> Result<usize> {
        let per_tx = per_tx.max(1);
        let mut total = 0;
        loop {
            let next = self.indexed_below(tenant).await?;
            let entries: Vec<(i64, String, String)> = match self.take_unindexed(tenant, next, window) {
                Some(kept) => kept,
                None => sqlx::query_as::<Any, (i64, String, String)>(
                    "SELECT idx, person_pseudonym, estate_id FROM audit_entries WHERE tenant_id = $1 AND idx >= $2 \
                 ORDER BY idx LIMIT $3",
                )
                .bind(tenant)
                .bind(next)
                .bind(window)
                .fetch_all(self.db.pool())
                .await
                .map_err(db_error)?,
            };
            let Some(&(last, _, _)) = entries.last() else { break };
            let went = entries.len();
            // A full window may have more behind it: when the log reaches
            // more than another window beyond it, the indexer catches up
            // without waits, so that spreading never lets it fall more than
            // two windows behind.
            let full = went >= usize::try_from(window).unwrap_or(usize::MAX);
            let pace = if full && self.behind_beyond(tenant, last, window) { Pace::Flat } else { pace };
            // A window's rows take milliseconds to sort (3–8 ms for 16,384
            // entries here): on a thread of their own, not on one of the
            // runtime's, where every task queued behind them would wait
            // (the gate's decisions among them).
            let rows = tokio::task::spawn_blocking(move || index_rows(entries))
                .await
                .map_err(|e| Error::Internal(format!("the index rows were not sorted: {e}")))?;
            // A window that names nobody and no estate still moves the mark:
            // one empty chunk.
            let mut chunks: Vec<&[IndexRow]> = rows.chunks(per_tx).collect();
            if chunks.is_empty() {
                chunks.push(&[]);
            }
            let first = tokio::time::Instant::now();
            let n = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
            for (i, chunk) in chunks.iter().enumerate() {
                let mark = (i + 1 == chunks.len()).then_some(last + 1);
                self.write_index(tenant, chunk, mark).await?;
                // Between transactions only: a wait after the last would
                // only hold up the next window and the next tenant.
                let more = i + 1 < chunks.len();
                match pace {
                    // Let the writers waiting for their turn go first.
                    Pace::Flat => tokio::task::yield_now().await,
                    Pace::Spread(over) if more => {
                        let done = u32::try_from(i + 1).unwrap_or(u32::MAX);
                        tokio::time::sleep_until(first + over / n * done).await;
                    }
                    Pace::Spread(_) => {}
                }
            }
            total += went;
            if !full {
                break;
            }
        }
        Ok(total)
    }

    /// Inserts index `rows` of `tenant` and, when given, moves its mark to
    /// `mark` (a mark already past it stays), in one write transaction; on
    /// SQLite in one call to the writing connection's thread, so the write
    /// turn is held for the inserts, not for round trips.
    pub(crate) async fn write_index(&self, tenant: &str, rows: &[IndexRow], mark: Option<i64>) -> Result<()> {
        let parts: Vec<(IndexOf, Vec<&IndexRow>)> = [IndexOf::Person, IndexOf::Estate]
            .into_iter()
            .map(|which| (which, rows.iter().filter(|r| r.0 == which).collect::<Vec<_>>()))
            .filter(|(_, part)| !part.is_empty())
            .collect();
        if self.db.backend() == Backend::Sqlite {
            let mut sql = String::from("BEGIN IMMEDIATE;\n");
            for (which, part) in &parts {
                sql.push_str(&index_insert_sql(*which, &vec!["(?, ?, ?)"; part.len()].join(", ")));
                sql.push_str(";\n");
            }
            if mark.is_some() {
                sql.push_str(&index_mark_sql("?", "?"));
                sql.push_str(";\n");
            }
            sql.push_str("COMMIT");
            let mut q = sqlx::query::<Any>(sqlx::AssertSqlSafe(sql));
            for (_, part) in &parts {
                q = bind_index(q, tenant, part.iter().copied());
            }
            if let Some(mark) = mark {
                q = q.bind(tenant.to_owned()).bind(mark);
            }
            return self.db.write_script(q).await?.map_err(db_error);
        }
        let mut tx = self.db.begin().await?;
        for (which, part) in &parts {
            let sql = index_insert_sql(*which, &estate_store::value_rows(&tx, part.len(), 3));
            bind_index(sqlx::query::<Any>(sqlx::AssertSqlSafe(sql)), tenant, part.iter().copied())
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        if let Some(mark) = mark {
            sqlx::query::<Any>(sqlx::AssertSqlSafe(index_mark_sql("$1", "$2")))
                .bind(tenant)
                .bind(mark)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)
    }

    /// Every entry of the tenant below this index is in the person and
    /// estate indexes.
    pub async fn indexed_below(&self, tenant: &str) -> Result<i64> {
        let next: Option<(i64,)> =
            sqlx::query_as::<Any, (i64,)>("SELECT next_idx FROM audit_person_indexed WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_optional(self.db.pool())
                .await
                .map_err(db_error)?;
        Ok(next.map_or(0, |(n,)| n))
    }

    /// Whether the tenant's log holds entries its person and estate indexes
    /// do not list yet (two primary-key lookups: the mark, then an entry at
    /// or past it).
    pub async fn has_unindexed(&self, tenant: &str) -> Result<bool> {
        let next = self.indexed_below(tenant).await?;
        let hit: Option<(i64,)> =
            sqlx::query_as::<Any, (i64,)>("SELECT idx FROM audit_entries WHERE tenant_id = $1 AND idx >= $2 LIMIT 1")
                .bind(tenant)
                .bind(next)
                .fetch_optional(self.db.pool())
                .await
                .map_err(db_error)?;
        Ok(hit.is_some())
    }

    /// Tenants with entries in the log. A skip scan of the primary key (one
    /// index lookup per tenant): `SELECT DISTINCT` read every entry, every
    /// five seconds, in a log that only grows.
    pub async fn tenants_with_entries(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as::<Any, (String,)>(
            "WITH RECURSIVE t(id) AS (SELECT MIN(tenant_id) FROM audit_entries \
             UNION ALL SELECT (SELECT MIN(tenant_id) FROM audit_entries WHERE tenant_id > t.id) FROM t WHERE t.id IS NOT NULL) \
             SELECT id FROM t WHERE id IS NOT NULL",
        )
        .fetch_all(self.db.pool())
            .await
            .map_err(db_error)?;
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }
}
