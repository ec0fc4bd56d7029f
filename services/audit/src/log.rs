//! The per-tenant append-only log: hash chain, Merkle tree, checkpoints.

use estate_audit_bundle::{chain_next, sign_checkpoint};
use estate_core::{Error, Result, now_ms};
use estate_crypto::SigningKeyPair;
use estate_merkle::{Hash, Tree, leaf_hash};
use estate_proto::audit::{Checkpoint, SignedCheckpoint};
use estate_proto::common::AuditEvent;
use estate_store::outbox::{AuditSink, PreparedEvent};
use estate_store::{Backend, Db, InlineError, db_error};
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
    /// Each tenant's tree. The map's lock is only ever held in memory
    /// (never across an await), so an append can always reach its tree.
    trees: Arc<std::sync::Mutex<HashMap<String, Arc<Mutex<Tree>>>>>,
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
    /// Per tenant, the index windows of the entries this process last
    /// appended inline and the indexer has not yet taken, so that the
    /// indexer need not read them back nor gather their postings
    /// ([`Self::index_entries`]).
    unindexed: Arc<std::sync::Mutex<HashMap<String, WindowBuilder>>>,
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

/// What a committed inline append left, from its groups and the heads
/// after it (in the same order, [`AuditLog::chained`]).
fn runs<'a>(groups: &'a [(&'a str, Vec<&'a PreparedEvent>)], heads: &[(String, Head)]) -> Vec<Run<'a>> {
    groups
        .iter()
        .zip(heads)
        .map(|((tenant, list), (_, (last, _)))| (*tenant, last + 1 - list.len() as i64, list.as_slice()))
        .collect()
}

/// The checkpoint of a tenant's first `size` entries, with their tree's
/// root and the last one's chain hash, stamped now.
fn checkpoint_at(tenant: &str, size: i64, root: &Hash, chain: &Hash) -> Checkpoint {
    Checkpoint {
        tenant_id: tenant.to_owned(),
        tree_size: size,
        root_hash: hex::encode(root),
        chain_hash: hex::encode(chain),
        timestamp_unix: now_ms() / 1000,
    }
}

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
    /// transaction on the inline writing connection (`Db::write_inline`),
    /// on this thread: a prepared single-row INSERT per entry, no hand-off
    /// to sqlx's connection thread and no multi-row statement to build. If
    /// another writer moved a head on, the insert at the expected index
    /// meets the primary key, the transaction is rolled back and the append
    /// is made again the usual way, reading the heads; so it is when the
    /// inline connection meets another connection's write lock.
    fn append_committed<'a>(
        &'a self,
        db: &'a Db,
        events: &'a [PreparedEvent],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            let mut groups = by_tenant(events, |e| e.event.tenant_id.as_str());
            groups.sort_by(|a, b| a.0.cmp(b.0));
            if db.backend() == Backend::Sqlite
                && let Some((tenants, heads)) = self.chained(&groups)
            {
                let now = now_ms();
                let inserted = db.write_inline(|tx| insert_inline(tx, &tenants, now)).await?;
                match inserted {
                    Ok(()) => {
                        let runs = runs(&groups, &heads);
                        self.extend_trees(&runs);
                        self.keep_unindexed(&runs);
                        self.publish(heads);
                        self.committed(events);
                        return Ok(());
                    }
                    Err(InlineError::Constraint) => self.forget(groups.iter().map(|g| g.0)),
                    Err(InlineError::Busy) => {}
                    Err(InlineError::Failed(e)) => {
                        tracing::error!(error = %e, "audit append failed");
                        return Err(Error::Internal("the audit log could not be written".into()));
                    }
                }
            }
            let mut tx = db.begin().await?;
            let mut heads = Vec::with_capacity(groups.len());
            for (tenant, list) in &groups {
                let (_, head) = append_in(&mut tx, tenant, list, Arrival::Direct, false).await?;
                heads.extend(head.map(|h| (tenant.to_string(), h)));
            }
            tx.commit().await.map_err(db_error)?;
            if heads.len() == groups.len() {
                self.extend_trees(&runs(&groups, &heads));
            }
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
                if let Err(e) = log.checkpoint_appended(&tenant).await {
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

/// Each tenant's entries, chained, for [`insert_inline`].
type Chained<'a> = Vec<(&'a str, Vec<Row<'a>>)>;

/// The INSERT of one entry, for [`insert_inline`]; its columns and their
/// order are [`insert_sql`]'s.
const INSERT_ONE: &str = "INSERT INTO audit_entries (tenant_id, idx, event_id, event, leaf_hash, chain_hash, \
     estate_id, person_pseudonym, action, occurred_at, appended_at, relayed) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 0)";

/// Inserts directly appended entries in `tx` (SQLite's inline writing
/// connection), one prepared statement, kept by the connection, for all.
fn insert_inline(tx: &rusqlite::Transaction<'_>, tenants: &Chained<'_>, now: i64) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(INSERT_ONE)?;
    for (tenant, rows) in tenants {
        for row in rows {
            let event = &row.prepared.event;
            insert.execute(rusqlite::params![
                tenant,
                row.idx,
                event.event_id,
                row.prepared.bytes,
                row.prepared.leaf.as_slice(),
                row.chain.as_slice(),
                event.estate_id,
                event.person_pseudonym,
                event.action,
                row.occurred,
                now,
            ])?;
        }
    }
    Ok(())
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

/// The derived indexes of the log that [`AuditLog::index_entries`] fills
/// (`audit_index_postings`, migration 5006).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IndexOf {
    /// Entries by person pseudonym.
    Person,
    /// Entries by estate id.
    Estate,
}

impl IndexOf {
    /// The `kind` column's value.
    fn kind(self) -> &'static str {
        match self {
            IndexOf::Person => "person",
            IndexOf::Estate => "estate",
        }
    }
}

/// One key's entries within one indexed window: a row of
/// `audit_index_postings`. A posting list per key and window, not a row per
/// entry: the indexer's write of a window is then a row per person and
/// estate met in it (about a hundred for a second of the gate benchmark's
/// 16,000 decisions) where it was two B-tree rows per entry, written in 64
/// transactions of 512 rows that each held the write turn every all-in-one
/// decision waits for for 2–3 ms (BENCHMARKS.md, sessions 21–26).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Posting {
    which: IndexOf,
    key: String,
    /// Entry indexes, ascending.
    entries: Vec<i64>,
}

/// A run of the log's entries, from the mark `start` to `last`, and their
/// postings: written in one transaction that also moves the mark from
/// `start` to `last + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    start: i64,
    last: i64,
    /// Entries in the run (read from the log: `last - start + 1` unless the
    /// log has a gap).
    entries: usize,
    /// Sorted by index, then key.
    postings: Vec<Posting>,
}

/// `entries` (index, person, estate; ascending, from the mark `next` on)
/// cut into windows of at most `max_postings` postings each, so that a
/// window's transaction stays short whatever the number of people in it.
pub(crate) fn windows(next: i64, entries: Vec<(i64, String, String)>, max_postings: usize) -> Vec<Window> {
    let mut built = WindowBuilder::new(next, max_postings, usize::MAX);
    for (idx, person, estate) in &entries {
        built.push(*idx, person, estate);
    }
    built.take()
}

/// Windows built one entry at a time (ascending indexes, from a mark on):
/// a window ends before an entry that would take it past `max_postings`
/// postings or `max_entries` entries. The indexer builds them from a read
/// of the log ([`windows`]); the log builds them as it commits entries
/// inline ([`AuditLog::keep_unindexed`]), a few at each commit, so that a
/// sweep of the indexer finds them built instead of gathering 16,384
/// entries' postings in one piece (3–8 ms of a core each second in the
/// gate benchmark, and its decisions waited: BENCHMARKS.md, session 29).
#[derive(Debug)]
pub(crate) struct WindowBuilder {
    max_postings: usize,
    max_entries: usize,
    /// Closed windows, not yet taken.
    done: Vec<Window>,
    /// The window being filled, and where each of its keys' postings is.
    open: Window,
    at: [HashMap<String, usize>; 2],
}

impl WindowBuilder {
    pub(crate) fn new(start: i64, max_postings: usize, max_entries: usize) -> Self {
        Self {
            max_postings: max_postings.max(2),
            max_entries: max_entries.max(1),
            done: Vec::new(),
            open: Window { start, last: start, entries: 0, postings: Vec::new() },
            at: Default::default(),
        }
    }

    /// The index after the last entry pushed (the open window's start
    /// before any).
    fn next(&self) -> i64 {
        if self.open.entries > 0 { self.open.last + 1 } else { self.open.start }
    }

    /// Entries pushed since the windows were last taken.
    fn pending(&self) -> usize {
        self.done.iter().map(|w| w.entries).sum::<usize>() + self.open.entries
    }

    /// Adds entry `idx` (past every entry pushed before), of `person` and
    /// `estate` (either may be empty: no posting for it).
    pub(crate) fn push(&mut self, idx: i64, person: &str, estate: &str) {
        let keys = [(IndexOf::Person, person), (IndexOf::Estate, estate)];
        let new = keys.iter().filter(|(w, k)| !k.is_empty() && !self.at[*w as usize].contains_key(*k)).count();
        if self.open.entries > 0
            && (self.open.postings.len() + new > self.max_postings || self.open.entries >= self.max_entries)
        {
            self.close(self.open.last + 1);
        }
        for (which, key) in keys {
            if key.is_empty() {
                continue;
            }
            match self.at[which as usize].get(key) {
                Some(&i) => self.open.postings[i].entries.push(idx),
                None => {
                    self.at[which as usize].insert(key.to_owned(), self.open.postings.len());
                    self.open.postings.push(Posting { which, key: key.to_owned(), entries: vec![idx] });
                }
            }
        }
        self.open.last = idx;
        self.open.entries += 1;
    }

    /// Closes the open window (when it has entries) and opens one at `start`.
    fn close(&mut self, start: i64) {
        let open = Window { start, last: start, entries: 0, postings: Vec::new() };
        let mut window = std::mem::replace(&mut self.open, open);
        for at in &mut self.at {
            at.clear();
        }
        if window.entries > 0 {
            window.postings.sort_unstable_by(|a, b| (a.which, &a.key).cmp(&(b.which, &b.key)));
            self.done.push(window);
        }
    }

    /// The windows built so far, the open one closed; later entries go on
    /// from after them.
    pub(crate) fn take(&mut self) -> Vec<Window> {
        self.close(self.next());
        std::mem::take(&mut self.done)
    }
}

impl Window {
    /// This window without its entries before `next` (none left: `None`).
    /// For windows of entries without gaps (those the log built as it
    /// committed): another indexer may have written part of them.
    fn trimmed_to(mut self, next: i64) -> Option<Window> {
        if self.last < next {
            return None;
        }
        if self.start < next {
            for p in &mut self.postings {
                p.entries.retain(|&i| i >= next);
            }
            self.postings.retain(|p| !p.entries.is_empty());
            self.entries = usize::try_from(self.last - next + 1).unwrap_or(0);
            self.start = next;
        }
        Some(self)
    }
}

/// A posting's entries after the first, as the varint-encoded gaps between
/// them (one byte each for a key met at least every 128 entries).
fn encode_entries(entries: &[i64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len());
    for pair in entries.windows(2) {
        prost::encoding::encode_varint(u64::try_from(pair[1] - pair[0]).unwrap_or(0), &mut out);
    }
    out
}

/// The entries of a posting from `first` to `last` whose gaps are
/// `encoded` ([`encode_entries`]); an error if they do not add up.
fn decode_entries(first: i64, last: i64, encoded: &[u8]) -> Result<Vec<i64>> {
    let corrupt = || Error::Internal("an audit index posting is corrupt".into());
    let mut out = vec![first];
    let mut buf = encoded;
    let mut cur = first;
    while !buf.is_empty() {
        let gap = prost::encoding::decode_varint(&mut buf).map_err(|_| corrupt())?;
        cur = i64::try_from(gap).ok().filter(|g| *g > 0).and_then(|g| cur.checked_add(g)).ok_or_else(corrupt)?;
        out.push(cur);
    }
    if cur != last {
        return Err(corrupt());
    }
    Ok(out)
}

/// Columns of a posting's INSERT ([`postings_insert_sql`]).
const POSTING_COLUMNS: usize = 6;

/// The INSERT of postings from these `VALUES` groups.
fn postings_insert_sql(values: &str) -> String {
    format!(
        "INSERT INTO audit_index_postings (tenant_id, kind, index_key, last_idx, first_idx, entries) VALUES {values}"
    )
}

/// Binds `postings` of `tenant` in [`postings_insert_sql`]'s order.
fn bind_postings<'q>(
    mut q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>,
    tenant: &str,
    postings: &[Posting],
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments> {
    for p in postings {
        let (first, last) = (p.entries.first().copied().unwrap_or(0), p.entries.last().copied().unwrap_or(0));
        q = q
            .bind(tenant.to_owned())
            .bind(p.which.kind())
            .bind(p.key.clone())
            .bind(last)
            .bind(first)
            .bind(encode_entries(&p.entries));
    }
    q
}

/// Moves a tenant's index mark from `start` to `next`, or fails (a NOT NULL
/// violation, see [`is_mark_moved`]) when the mark is no longer at `start`:
/// another indexer wrote that window first. A tenant without a mark has
/// its first.
fn index_mark_sql(tenant: &str, next: &str, start: &str) -> String {
    format!(
        "INSERT INTO audit_person_indexed (tenant_id, next_idx) VALUES ({tenant}, {next}) \
         ON CONFLICT (tenant_id) DO UPDATE SET next_idx = CASE \
         WHEN audit_person_indexed.next_idx = {start} THEN excluded.next_idx END"
    )
}

/// Whether `err` may be [`index_mark_sql`]'s refusal (the mark had moved);
/// the mark is read to be sure.
fn is_mark_moved(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::NotNullViolation)
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

/// Entries the indexer reads at a time. Each key met in them gets one
/// posting (per [`Window`]), so a longer read writes fewer, longer postings;
/// it costs memory, and leaves more entries for a query by person to read
/// unindexed.
const INDEX_WINDOW: i64 = 16_384;

/// Entries per window of those the log keeps for the indexer as it
/// commits them ([`WindowBuilder`]): as many as a read of the log.
const KEPT_WINDOW_ENTRIES: usize = INDEX_WINDOW as usize;

/// Postings per write transaction of the indexer (6 parameters each, one
/// statement): a read naming more people than this is written as several
/// windows. The gate's decisions wait while it holds the write turn.
const INDEX_POSTINGS_PER_TX: usize = 512;

/// Stores a signed checkpoint (a second one of the same size is skipped).
const CHECKPOINT_INSERT: &str = "INSERT INTO audit_checkpoints (tenant_id, tree_size, root_hash, chain_hash, \
     timestamp_unix, key_id, checkpoint_hex, signature_hex) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     ON CONFLICT (tenant_id, tree_size) DO NOTHING";

/// Postings a query reads at a time ([`AuditLog::indexed`]).
const POSTINGS_PER_READ: i64 = 256;

impl AuditLog {
    /// A log over `db`, signing checkpoints with `key`.
    pub fn new(db: Db, key: SigningKeyPair, checkpoint_every: u64, checkpoint_interval_secs: u64) -> Self {
        Self {
            db,
            key,
            trees: Arc::new(std::sync::Mutex::new(HashMap::new())),
            checkpoint_every: checkpoint_every.max(1),
            checkpoint_interval_ms: i64::try_from(checkpoint_interval_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            since_checkpoint: Arc::new(std::sync::Mutex::new(HashMap::new())),
            heads: Arc::new(std::sync::Mutex::new(HashMap::new())),
            unindexed: Arc::new(std::sync::Mutex::new(HashMap::new())),
        }
    }

    /// The entries of [`AuditSink::append_committed`] chained on from the
    /// heads this process last committed, and the heads they leave, if
    /// every tenant's head is known.
    fn chained<'a>(&self, groups: &[(&'a str, Vec<&'a PreparedEvent>)]) -> Option<(Chained<'a>, Vec<(String, Head)>)> {
        let known: Vec<Head> = {
            let heads = self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            groups.iter().map(|(tenant, _)| heads.get(*tenant).copied()).collect::<Option<Vec<_>>>()?
        };
        let mut tenants: Chained<'a> = Vec::with_capacity(groups.len());
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
        Some((tenants, after))
    }

    /// Pushes the leaves a committed append left onto the tenants' trees in
    /// memory, where a tree ends just before them, so that the next
    /// checkpoint need not read them back from the database. A tree that is
    /// busy or elsewhere (another writer's entries not yet read) is left to
    /// catch up from the stored entries ([`Self::tree`]), as before.
    fn extend_trees(&self, runs: &[Run<'_>]) {
        let trees = self.trees.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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

    /// Adds the entries a committed append left to the index windows kept
    /// for the indexer, after those already kept when they follow on;
    /// otherwise (another writer's entries in between) they start afresh.
    fn keep_unindexed(&self, runs: &[Run<'_>]) {
        let mut kept = self.unindexed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for &(tenant, first, list) in runs {
            let fresh = || WindowBuilder::new(first, INDEX_POSTINGS_PER_TX, KEPT_WINDOW_ENTRIES);
            let built = match kept.get_mut(tenant) {
                Some(built) => built,
                None => kept.entry(tenant.to_owned()).or_insert_with(fresh),
            };
            if built.next() != first || built.pending() + list.len() > UNINDEXED_MAX {
                *built = fresh();
            }
            for (idx, p) in (first..).zip(list.iter()) {
                built.push(idx, &p.event.person_pseudonym, &p.event.estate_id);
            }
        }
    }

    /// The windows kept for `tenant` by [`Self::keep_unindexed`] from its
    /// mark `next` on, when they reach back to it (entries before `next`
    /// are already indexed and are dropped). Taken, not copied: if they are
    /// not written, the next sweep finds the kept windows no longer start
    /// at its mark and reads the entries from the database.
    fn take_unindexed(&self, tenant: &str, next: i64) -> Option<Vec<Window>> {
        let mut kept = self.unindexed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let built = kept.get_mut(tenant)?;
        let start = built.done.first().map_or(built.open.start, |w| w.start);
        if start > next || built.next() <= next {
            return None;
        }
        let taken: Vec<Window> = built.take().into_iter().filter_map(|w| w.trimmed_to(next)).collect();
        (!taken.is_empty()).then_some(taken)
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
            let mut trees = self.trees.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
        let checkpoint =
            checkpoint_at(tenant, i64::try_from(size).unwrap_or(i64::MAX), &tree.root(), &hash_of(&chain)?);
        drop(tree);
        self.store_checkpoint(tenant, &checkpoint).await.map(Some)
    }

    /// Signs `checkpoint` and stores it.
    async fn store_checkpoint(&self, tenant: &str, checkpoint: &Checkpoint) -> Result<SignedCheckpoint> {
        let signed = sign_checkpoint(&self.key, checkpoint);
        // In a write transaction, so that on SQLite it takes its turn with
        // the process's other writers instead of meeting a busy database and
        // holding up the next writer in SQLite's busy handler; there, as one
        // script (one call to the writing connection's thread), so the turn
        // is not held across three round trips: at the all-in-one gate's
        // rates a checkpoint is due twenty times a second, and each round
        // trip waits for this task to be scheduled again while every
        // decision batch waits for the turn (BENCHMARKS.md, session 26).
        let bind = |q: sqlx::query::Query<'static, Any, sqlx::any::AnyArguments>| {
            q.bind(tenant.to_owned())
                .bind(checkpoint.tree_size)
                .bind(checkpoint.root_hash.clone())
                .bind(checkpoint.chain_hash.clone())
                .bind(checkpoint.timestamp_unix)
                .bind(signed.key_id.clone())
                .bind(hex::encode(&signed.checkpoint))
                .bind(hex::encode(&signed.signature))
        };
        if self.db.backend() == Backend::Sqlite {
            let script = format!("BEGIN IMMEDIATE;\n{CHECKPOINT_INSERT};\nCOMMIT");
            self.db.write_script(bind(sqlx::query::<Any>(sqlx::AssertSqlSafe(script)))).await?.map_err(db_error)?;
        } else {
            let mut tx = self.db.begin().await?;
            bind(sqlx::query::<Any>(CHECKPOINT_INSERT)).execute(&mut *tx).await.map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
        }
        Ok(signed)
    }

    /// A checkpoint of the tenant's log as far as this process's tree in
    /// memory and its last committed head agree, signed and stored without
    /// reading the database; `false` (nothing done) when they do not agree
    /// (another writer's entries, a tree not yet built or left behind). Both
    /// describe committed entries only, so where the tree holds exactly the
    /// entries up to the head, its root and the head's chain hash are those
    /// of the stored log's first entries, even if another writer has since
    /// appended more. The tree's lock is held only to take its root: an
    /// append that finds it busy skips extending it and the tree then has
    /// to be caught up from the database ([`Self::tree`]). At the all-in-one
    /// gate's rates this is twenty checkpoints a second; read from the
    /// database, each made five reads and held the tree's lock across one
    /// (BENCHMARKS.md, session 27).
    pub(crate) async fn checkpoint_from_memory(&self, tenant: &str) -> Result<bool> {
        let handle = {
            let trees = self.trees.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            trees.get(tenant).cloned()
        };
        let Some(handle) = handle else { return Ok(false) };
        let (size, root, chain) = {
            let tree = handle.lock().await;
            let heads = self.heads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match heads.get(tenant) {
                Some(&(last, chain)) if i64::try_from(tree.size()).is_ok_and(|size| size == last + 1) => {
                    (last + 1, tree.root(), chain)
                }
                _ => return Ok(false),
            }
        };
        self.store_checkpoint(tenant, &checkpoint_at(tenant, size, &root, &chain)).await?;
        Ok(true)
    }

    /// A checkpoint for the entries this process appended: from memory
    /// ([`Self::checkpoint_from_memory`]) where it can, otherwise as
    /// [`Self::checkpoint_if_due`] does.
    async fn checkpoint_appended(&self, tenant: &str) -> Result<()> {
        if self.checkpoint_from_memory(tenant).await? {
            return Ok(());
        }
        self.checkpoint_if_due(tenant).await
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

    /// Brings the tenant's person and estate indexes
    /// (`audit_index_postings`) up to the log's head and returns how many
    /// entries it went past. Up to [`INDEX_WINDOW`] entries are read at a
    /// time (outside the write turn), gathered into one posting per person
    /// and estate ([`windows`]: several windows when they name more than
    /// [`INDEX_POSTINGS_PER_TX`]), and each window is written in one
    /// transaction that also moves the tenant's mark past it, so the mark
    /// and the postings below it always agree: queries read the indexes
    /// only below the mark. Safe to run in several processes at once: a
    /// window is written only if the mark is still where its read began
    /// ([`index_mark_sql`]); otherwise the other indexer's is kept and this
    /// one goes on from the new mark.
    ///
    /// This is the background indexer's pace: the write transactions of a
    /// read are spread evenly `over` the time given (the indexer runs every
    /// second and gives each sweep half of it), so that the writing
    /// connection is taken in short turns evenly apart. A full read with
    /// more than another behind it is written back to back, so that an
    /// indexer that fell behind (a restart, a stall) catches up. Written
    /// back to back, a second of the all-in-one gate's decisions indexed
    /// a row per entry held the turn for 200–440 ms in one burst
    /// (BENCHMARKS.md, session 19).
    pub async fn index_entries(&self, tenant: &str, over: std::time::Duration) -> Result<usize> {
        self.index_entries_by(tenant, INDEX_WINDOW, INDEX_POSTINGS_PER_TX, Pace::Spread(over)).await
    }

    /// [`Self::index_entries`] without waits between transactions: the
    /// indexes up to the head as fast as the database goes (a catch-up
    /// whose cost is to be measured, as gate-bench does).
    pub async fn index_entries_now(&self, tenant: &str) -> Result<usize> {
        self.index_entries_by(tenant, INDEX_WINDOW, INDEX_POSTINGS_PER_TX, Pace::Flat).await
    }

    /// [`Self::index_entries`] reading `read` entries at a time, with at
    /// most `per_tx` postings per transaction, at `pace`. Windows the log
    /// kept as it committed are taken as it cut them
    /// ([`INDEX_POSTINGS_PER_TX`], [`KEPT_WINDOW_ENTRIES`]).
    pub(crate) async fn index_entries_by(&self, tenant: &str, read: i64, per_tx: usize, pace: Pace) -> Result<usize> {
        let mut total = 0;
        loop {
            let next = self.indexed_below(tenant).await?;
            // The windows, whether more may follow them now (a full read),
            // and whether to write them without waits.
            let (windows, more, behind) = match self.take_unindexed(tenant, next) {
                Some(kept) => {
                    // All the log kept: more than a read's worth is written
                    // without waits, as a full read far behind would be.
                    let entries: usize = kept.iter().map(|w| w.entries).sum();
                    (kept, false, entries > usize::try_from(read).unwrap_or(usize::MAX))
                }
                None => {
                    let entries = sqlx::query_as::<Any, (i64, String, String)>(
                        "SELECT idx, person_pseudonym, estate_id FROM audit_entries WHERE tenant_id = $1 AND idx >= $2 \
                         ORDER BY idx LIMIT $3",
                    )
                    .bind(tenant)
                    .bind(next)
                    .bind(read)
                    .fetch_all(self.db.pool())
                    .await
                    .map_err(db_error)?;
                    let Some(&(last, _, _)) = entries.last() else { break };
                    // A full read may have more behind it: when the log
                    // reaches more than another read beyond it, the indexer
                    // catches up without waits, so that spreading never
                    // lets it fall more than two reads behind.
                    let full = entries.len() >= usize::try_from(read).unwrap_or(usize::MAX);
                    let behind = full && self.behind_beyond(tenant, last, read);
                    // Gathering 16,384 entries' postings takes milliseconds:
                    // on a thread of its own, not on one of the runtime's,
                    // where every task queued behind it would wait (the
                    // gate's decisions among them).
                    let windows = tokio::task::spawn_blocking(move || windows(next, entries, per_tx))
                        .await
                        .map_err(|e| Error::Internal(format!("the index postings were not gathered: {e}")))?;
                    (windows, full, behind)
                }
            };
            let pace = if behind { Pace::Flat } else { pace };
            let first = tokio::time::Instant::now();
            let n = u32::try_from(windows.len()).unwrap_or(u32::MAX);
            let mut moved = false;
            for (i, window) in windows.iter().enumerate() {
                if !self.write_window(tenant, window).await? {
                    // Another indexer wrote it: go on from its mark.
                    moved = true;
                    break;
                }
                total += window.entries;
                // Between transactions only: a wait after the last would
                // only hold up the next read and the next tenant.
                let another = i + 1 < windows.len();
                match pace {
                    // Let the writers waiting for their turn go first.
                    Pace::Flat => tokio::task::yield_now().await,
                    Pace::Spread(over) if another => {
                        let done = u32::try_from(i + 1).unwrap_or(u32::MAX);
                        tokio::time::sleep_until(first + over / n * done).await;
                    }
                    Pace::Spread(_) => {}
                }
            }
            if !more && !moved {
                break;
            }
        }
        Ok(total)
    }

    /// Writes `window`'s postings of `tenant` and moves its mark from the
    /// window's start past its last entry, in one write transaction (on
    /// SQLite in one call to the writing connection's thread, so the turn
    /// is held for the inserts, not for round trips). False, with nothing
    /// written, when the mark was no longer at the window's start.
    pub(crate) async fn write_window(&self, tenant: &str, window: &Window) -> Result<bool> {
        let (start, next) = (window.start, window.last + 1);
        let ran = if self.db.backend() == Backend::Sqlite {
            let mut sql = String::from("BEGIN IMMEDIATE;\n");
            sql.push_str(&index_mark_sql("?", "?", "?"));
            sql.push_str(";\n");
            if !window.postings.is_empty() {
                let values = vec![format!("({})", ["?"; POSTING_COLUMNS].join(", ")); window.postings.len()];
                sql.push_str(&postings_insert_sql(&values.join(", ")));
                sql.push_str(";\n");
            }
            sql.push_str("COMMIT");
            let q = sqlx::query::<Any>(sqlx::AssertSqlSafe(sql)).bind(tenant.to_owned()).bind(next).bind(start);
            self.db.write_script(bind_postings(q, tenant, &window.postings)).await?
        } else {
            let mut tx = self.db.begin().await?;
            let mut ran = sqlx::query::<Any>(sqlx::AssertSqlSafe(index_mark_sql("$1", "$2", "$3")))
                .bind(tenant)
                .bind(next)
                .bind(start)
                .execute(&mut *tx)
                .await
                .map(|_| ());
            if ran.is_ok() && !window.postings.is_empty() {
                let values = estate_store::value_rows(&tx, window.postings.len(), POSTING_COLUMNS);
                let q = sqlx::query::<Any>(sqlx::AssertSqlSafe(postings_insert_sql(&values)));
                ran = bind_postings(q, tenant, &window.postings).execute(&mut *tx).await.map(|_| ());
            }
            match ran {
                Ok(()) => tx.commit().await,
                Err(e) => {
                    // Dropping the transaction rolls it back.
                    drop(tx);
                    Err(e)
                }
            }
        };
        match ran {
            Ok(()) => Ok(true),
            // The mark's refusal, unless the mark is still at the start
            // (then the NOT NULL violation was something else's).
            Err(e) if is_mark_moved(&e) && self.indexed_below(tenant).await? != start => Ok(false),
            Err(e) => Err(db_error(e)),
        }
    }

    /// The entries listed under `key` in index `which` of `tenant`, after
    /// `after` and below `below` (the mark, read before), in log order,
    /// from at most [`POSTINGS_PER_READ`] postings; and, when there may be
    /// more, the `after` to ask for the rest with.
    pub async fn indexed(
        &self,
        tenant: &str,
        which: IndexOf,
        key: &str,
        after: i64,
        below: i64,
    ) -> Result<(Vec<i64>, Option<i64>)> {
        let rows: Vec<(i64, i64, Vec<u8>)> = sqlx::query_as::<Any, (i64, i64, Vec<u8>)>(
            "SELECT first_idx, last_idx, entries FROM audit_index_postings \
             WHERE tenant_id = $1 AND kind = $2 AND index_key = $3 AND last_idx > $4 AND first_idx < $5 \
             ORDER BY last_idx LIMIT $6",
        )
        .bind(tenant)
        .bind(which.kind())
        .bind(key)
        .bind(after)
        .bind(below)
        .bind(POSTINGS_PER_READ)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_error)?;
        let more = (rows.len() as i64 >= POSTINGS_PER_READ).then(|| rows.last().map_or(after, |r| r.1));
        let mut out = Vec::new();
        for (first, last, encoded) in rows {
            out.extend(decode_entries(first, last, &encoded)?.into_iter().filter(|i| *i > after && *i < below));
        }
        Ok((out, more))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries `from..to`: person `p{i % 3}` (none every fifth), all at one
    /// estate.
    fn entries(from: i64, to: i64) -> Vec<(i64, String, String)> {
        (from..to)
            .map(|i| (i, if i % 5 == 4 { String::new() } else { format!("p{}", i % 3) }, "estate-1".to_owned()))
            .collect()
    }

    /// Windows cover the entries from the mark on without a gap or an
    /// overlap, hold at most the postings asked for, list each entry under
    /// its person and estate, and are sorted by index and key.
    #[test]
    fn windows_cover_the_entries_and_keep_to_the_postings_asked() {
        let all = windows(100, entries(100, 160), 1000);
        assert_eq!(all.len(), 1);
        let w = &all[0];
        assert_eq!((w.start, w.last, w.entries), (100, 159, 60));
        let keys: Vec<(IndexOf, &str, usize)> =
            w.postings.iter().map(|p| (p.which, p.key.as_str(), p.entries.len())).collect();
        assert_eq!(
            keys,
            vec![
                (IndexOf::Person, "p0", 16),
                (IndexOf::Person, "p1", 16),
                (IndexOf::Person, "p2", 16),
                (IndexOf::Estate, "estate-1", 60)
            ]
        );
        assert!(w.postings.iter().all(|p| p.entries.windows(2).all(|x| x[0] < x[1])));

        // At most three postings: the estate and two people, so a window
        // ends before the third person.
        let small = windows(100, entries(100, 160), 3);
        assert!(small.len() > 1);
        let mut next = 100;
        let mut listed = Vec::new();
        for w in &small {
            assert_eq!(w.start, next, "windows follow on");
            assert!(w.postings.len() <= 3);
            assert_eq!(w.entries as i64, w.last - w.start + 1);
            next = w.last + 1;
            listed.extend(w.postings.iter().filter(|p| p.which == IndexOf::Estate).flat_map(|p| p.entries.clone()));
        }
        assert_eq!(next, 160);
        assert_eq!(listed, (100..160).collect::<Vec<_>>());

        // Entries naming nobody still make a window (the mark moves on).
        let nobody = windows(7, vec![(7, String::new(), String::new())], 8);
        assert_eq!(nobody, vec![Window { start: 7, last: 7, entries: 1, postings: vec![] }]);
        assert!(windows(7, Vec::new(), 8).is_empty());
    }

    /// Windows built as entries are committed, a few at a time and taken
    /// between, hold what windows of one read of the same entries hold:
    /// they follow on from the mark without a gap, list every entry under
    /// its person and estate once, and keep to the postings and entries
    /// asked. A kept window another indexer wrote part of keeps only the
    /// rest.
    #[test]
    fn windows_built_as_entries_come_hold_what_one_read_holds() -> Result<()> {
        let all = entries(100, 400);
        let listed = |ws: &[Window]| {
            let mut out: Vec<(IndexOf, String, i64)> = ws
                .iter()
                .flat_map(|w| w.postings.iter().flat_map(|p| p.entries.iter().map(|&i| (p.which, p.key.clone(), i))))
                .collect();
            out.sort();
            out
        };
        let read = windows(100, all.clone(), 3);
        let mut built = WindowBuilder::new(100, 3, 50);
        let mut taken = Vec::new();
        for (n, chunk) in all.chunks(32).enumerate() {
            for (idx, person, estate) in chunk {
                built.push(*idx, person, estate);
            }
            if n % 3 == 2 {
                taken.extend(built.take());
            }
        }
        taken.extend(built.take());
        assert!(built.take().is_empty(), "nothing pushed since");
        assert_eq!(listed(&taken), listed(&read));
        let mut next = 100;
        for w in &taken {
            assert_eq!(w.start, next, "windows follow on");
            assert!(w.postings.len() <= 3 && w.entries <= 50 && w.entries > 0);
            assert_eq!(w.entries as i64, w.last - w.start + 1);
            next = w.last + 1;
        }
        assert_eq!(next, 400);

        // Another indexer wrote up to entry 109 of a kept window.
        let mut one = WindowBuilder::new(100, 1000, 1000);
        for (idx, person, estate) in &entries(100, 130) {
            one.push(*idx, person, estate);
        }
        let kept = one.take().remove(0);
        assert_eq!(kept.clone().trimmed_to(100), Some(kept.clone()), "nothing before the mark");
        assert!(kept.clone().trimmed_to(130).is_none(), "all of it written");
        let rest = kept.trimmed_to(110).ok_or_else(|| Error::Internal("entries 110..130 are left".into()))?;
        assert_eq!((rest.start, rest.last, rest.entries), (110, 129, 20));
        assert_eq!(listed(std::slice::from_ref(&rest)), listed(&windows(110, entries(110, 130), 1000)));
        Ok(())
    }

    /// A posting's entries come back as they went in, whatever the gaps;
    /// a posting whose bytes do not add up to its last entry is refused.
    #[test]
    fn postings_decode_to_what_was_encoded_and_refuse_corruption() -> Result<()> {
        for list in [vec![5], vec![0, 1, 2, 3], vec![3, 130, 131, 1 << 40, (1 << 40) + 300]] {
            let encoded = encode_entries(&list);
            assert_eq!(decode_entries(list[0], *list.last().unwrap_or(&0), &encoded)?, list);
        }
        assert!(encode_entries(&[9]).is_empty(), "a single entry is its first");
        let encoded = encode_entries(&[3, 4, 10]);
        assert!(decode_entries(3, 11, &encoded).is_err(), "a wrong last entry");
        assert!(decode_entries(3, 10, &encoded[..1]).is_err(), "bytes cut short");
        assert!(decode_entries(3, 10, &[0x80]).is_err(), "a varint cut short");
        assert!(decode_entries(3, 3, &[0]).is_err(), "a gap of zero lists an entry twice");
        Ok(())
    }
}
