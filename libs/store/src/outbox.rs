//! The audit outbox (R11, R17). Every state change calls [`record`] inside the
//! transaction that makes the change, so the change and its audit event
//! commit together or not at all. The audit service's relay reads pending rows
//! in `seq` order and marks them delivered once the audit log acknowledged them.

use crate::db_error;
use estate_core::Result;
use estate_proto::common::{Actor, AuditEvent};
use prost::Message;
use sqlx::{Any, AnyConnection, Row};
use std::collections::BTreeMap;

/// Writes `event` to the outbox on `conn` (which should be a transaction).
pub async fn record(conn: &mut AnyConnection, event: &AuditEvent) -> Result<()> {
    insert(conn, INSERT, event, estate_telemetry::current_traceparent()).await.map(|_| ())
}

/// Writes `event` unless the outbox already holds its event id; returns
/// whether it did. For events made elsewhere and copied in (facematch's
/// journal), where a copy may be retried or made by two replicas at once.
pub async fn record_once(conn: &mut AnyConnection, event: &AuditEvent) -> Result<bool> {
    insert(conn, INSERT_ONCE, event, None).await.map(|n| n == 1)
}

/// The time of `event` in ms, or now.
pub fn occurred_ms(event: &AuditEvent) -> i64 {
    event
        .occurred_at
        .as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
        .unwrap_or_else(estate_core::now_ms)
}

macro_rules! insert_sql {
    () => {
        "INSERT INTO outbox_events (event_id, tenant_id, source, action, object_type, object_id, \
         estate_id, person_pseudonym, occurred_at, payload, trace_parent) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    };
}
const INSERT: &str = insert_sql!();
const INSERT_ONCE: &str = concat!(insert_sql!(), " ON CONFLICT (event_id) DO NOTHING");

/// One row with `sql` (one of the two statements above). Returns rows written.
async fn insert(
    conn: &mut AnyConnection,
    sql: &'static str,
    event: &AuditEvent,
    trace_parent: Option<String>,
) -> Result<u64> {
    let done = sqlx::query::<Any>(sql)
        .bind(event.event_id.as_str())
        .bind(event.tenant_id.as_str())
        .bind(event.source.as_str())
        .bind(event.action.as_str())
        .bind(event.object_type.as_str())
        .bind(event.object_id.as_str())
        .bind(event.estate_id.as_str())
        .bind(event.person_pseudonym.as_str())
        .bind(occurred_ms(event))
        .bind(event.encode_to_vec())
        .bind(trace_parent)
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(done.rows_affected())
}

/// Writes `events` to the outbox on `conn` with multi-row INSERTs (50 rows
/// per statement): what a group commit of many small changes uses, since one
/// statement per row costs a round trip (or a worker hand-off on SQLite) each.
/// Each event comes with the `traceparent` of the call that made it.
pub async fn record_many(conn: &mut AnyConnection, events: &[(&AuditEvent, Option<String>)]) -> Result<()> {
    const COLUMNS: usize = 11;
    for chunk in events.chunks(50) {
        let sql = format!(
            "INSERT INTO outbox_events (event_id, tenant_id, source, action, object_type, object_id, \
             estate_id, person_pseudonym, occurred_at, payload, trace_parent) VALUES {}",
            crate::value_rows(conn, chunk.len(), COLUMNS)
        );
        let mut q = sqlx::query::<Any>(sqlx::AssertSqlSafe(sql));
        for (event, trace_parent) in chunk {
            let occurred_at = occurred_ms(event);
            q = q
                .bind(event.event_id.clone())
                .bind(event.tenant_id.clone())
                .bind(event.source.clone())
                .bind(event.action.clone())
                .bind(event.object_type.clone())
                .bind(event.object_id.clone())
                .bind(event.estate_id.clone())
                .bind(event.person_pseudonym.clone())
                .bind(occurred_at)
                .bind(event.encode_to_vec())
                .bind(trace_parent.clone());
        }
        q.execute(&mut *conn).await.map_err(db_error)?;
    }
    Ok(())
}

/// A stored outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Order of writing.
    pub seq: i64,
    /// The decoded event.
    pub event: AuditEvent,
    /// The event's bytes exactly as written: the audit log hashes these, not a
    /// re-encoding (map fields encode in no fixed order).
    pub payload: Vec<u8>,
    /// W3C traceparent of the call that wrote it, when traced.
    pub trace_parent: Option<String>,
}

fn decode_row(r: &sqlx::any::AnyRow) -> Result<OutboxRow> {
    let payload: Vec<u8> = r.try_get("payload").map_err(db_error)?;
    let event = AuditEvent::decode(payload.as_slice())
        .map_err(|e| estate_core::Error::Internal(format!("outbox payload: {e}")))?;
    let trace_parent: Option<String> = r.try_get("trace_parent").ok().flatten();
    Ok(OutboxRow { seq: r.try_get("seq").map_err(db_error)?, event, payload, trace_parent })
}

/// Events with `action`, written after `after_seq`, oldest first: how other
/// services of the mesh consume domain events durably (e.g. consent reads
/// `residency.end` to request face data deletion, R5).
pub async fn with_action_after(
    pool: &sqlx::AnyPool,
    action: &str,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<OutboxRow>> {
    let rows = sqlx::query::<Any>(
        "SELECT seq, payload FROM outbox_events WHERE action = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(action)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    rows.iter().map(decode_row).collect()
}

/// Reads up to `limit` undelivered events after `after_seq`, oldest first.
pub async fn pending(pool: &sqlx::AnyPool, after_seq: i64, limit: i64) -> Result<Vec<OutboxRow>> {
    let rows = sqlx::query::<Any>(
        "SELECT seq, payload, trace_parent FROM outbox_events WHERE delivered_at IS NULL AND seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    rows.iter().map(decode_row).collect()
}

/// Marks events delivered (after the audit service acknowledged them).
pub async fn mark_delivered(db: &crate::Db, seqs: &[i64]) -> Result<()> {
    let now = estate_core::now_ms();
    let mut tx = db.begin().await?;
    // 50 ids per statement: one statement per row was a round trip each.
    for chunk in seqs.chunks(50) {
        let sql = format!(
            "UPDATE outbox_events SET delivered_at = {} WHERE seq IN ({})",
            crate::params(&tx, 1, 1),
            crate::params(&tx, 2, chunk.len())
        );
        let mut q = sqlx::query::<Any>(sqlx::AssertSqlSafe(sql)).bind(now);
        for seq in chunk {
            q = q.bind(*seq);
        }
        q.execute(&mut *tx).await.map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)
}

/// Deletes rows delivered before `before_ms` (the audit log holds their
/// events), at most 1,000 per statement so no transaction grows large;
/// returns how many went. Undelivered rows are never touched.
pub async fn prune_delivered(db: &crate::Db, before_ms: i64) -> Result<u64> {
    let mut removed = 0;
    loop {
        // A write transaction of its own, so that on SQLite it takes its turn
        // on the writing connection like every other write.
        let mut tx = db.begin().await?;
        let done = sqlx::query::<Any>(
            "DELETE FROM outbox_events WHERE seq IN (SELECT seq FROM outbox_events \
             WHERE delivered_at IS NOT NULL AND delivered_at < $1 ORDER BY delivered_at LIMIT 1000)",
        )
        .bind(before_ms)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?
        .rows_affected();
        tx.commit().await.map_err(db_error)?;
        removed += done;
        if done < 1000 {
            return Ok(removed);
        }
    }
}

/// Keeps delivered outbox rows for `retention` (zero: forever) and deletes
/// older ones at most once a minute (or once per retention, if shorter); the relays call [`Pruner::tick`] on
/// every round. Without it the outbox would keep a second copy of the whole
/// audit log.
#[derive(Debug)]
pub struct Pruner {
    retention: std::time::Duration,
    last: Option<std::time::Instant>,
}

impl Pruner {
    /// A pruner keeping delivered rows for `retention`.
    pub fn new(retention: std::time::Duration) -> Self {
        Self { retention, last: None }
    }

    /// Prunes if a minute (or the retention, if shorter) passed since the
    /// last time.
    pub async fn tick(&mut self, db: &crate::Db) {
        let every = self.retention.min(std::time::Duration::from_secs(60));
        if self.retention.is_zero() || self.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let before = estate_core::now_ms() - i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        match prune_delivered(db, before).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "delivered outbox rows pruned"),
            Err(e) => tracing::warn!(error = %e, "pruning the outbox failed; will retry"),
        }
    }
}

/// Events of a tenant in write order, for tests and the operator's own view
/// until the audit service exists.
pub async fn for_tenant(pool: &sqlx::AnyPool, tenant_id: &str) -> Result<Vec<OutboxRow>> {
    let rows = sqlx::query::<Any>("SELECT seq, payload FROM outbox_events WHERE tenant_id = $1 ORDER BY seq")
        .bind(tenant_id)
        .fetch_all(pool)
        .await
        .map_err(db_error)?;
    rows.iter().map(decode_row).collect()
}

/// One state change, described for the audit log; turned into an
/// [`AuditEvent`] with [`Change::into_event`].
#[derive(Debug)]
pub struct Change<'a> {
    tenant_id: &'a str,
    action: &'static str,
    object_type: &'static str,
    object_id: &'a str,
    estate_id: &'a str,
    person_pseudonym: &'a str,
    concerns_minor: bool,
    attributes: Vec<(&'static str, String)>,
}

impl<'a> Change<'a> {
    /// A change of `object_type` `object_id` in `tenant_id`, named `action`
    /// ("estate.create").
    pub fn new(tenant_id: &'a str, action: &'static str, object_type: &'static str, object_id: &'a str) -> Self {
        Self {
            tenant_id,
            action,
            object_type,
            object_id,
            estate_id: "",
            person_pseudonym: "",
            concerns_minor: false,
            attributes: Vec::new(),
        }
    }

    /// The estate the change concerns.
    pub fn estate(mut self, estate_id: &'a str) -> Self {
        self.estate_id = estate_id;
        self
    }

    /// The person it concerns, by pseudonym (R17), and whether a minor (R7).
    pub fn person(mut self, pseudonym: &'a str, minor: bool) -> Self {
        self.person_pseudonym = pseudonym;
        self.concerns_minor = minor;
        self
    }

    /// A non-personal detail.
    pub fn attr(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.attributes.push((key, value.into()));
        self
    }

    /// The event, by `actor`, for the call `request_id`, from service `source`.
    pub fn into_event(self, actor: Actor, request_id: &str, source: &str) -> AuditEvent {
        let (seconds, nanos) = estate_core::ms_to_timestamp_parts(estate_core::now_ms());
        AuditEvent {
            event_id: estate_core::new_id(),
            tenant_id: self.tenant_id.to_owned(),
            estate_id: self.estate_id.to_owned(),
            actor: Some(actor),
            action: self.action.to_owned(),
            object_type: self.object_type.to_owned(),
            object_id: self.object_id.to_owned(),
            person_pseudonym: self.person_pseudonym.to_owned(),
            occurred_at: Some(prost_types::Timestamp { seconds, nanos }),
            request_id: request_id.to_owned(),
            attributes: self.attributes.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<BTreeMap<_, _>>(),
            concerns_minor: self.concerns_minor,
            source: source.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Db, DbOptions};

    fn event(id: &str) -> AuditEvent {
        AuditEvent { event_id: id.into(), tenant_id: "t".into(), action: "x.y".into(), ..Default::default() }
    }

    #[tokio::test]
    async fn only_rows_delivered_before_the_cutoff_are_pruned() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let db = Db::connect(&DbOptions {
            url: format!("sqlite://{}", dir.path().join("o.db").display()),
            max_connections: 2,
            acquire_timeout: std::time::Duration::from_secs(5),
            statement_timeout_ms: 0,
        })
        .await?;
        db.migrate_outbox().await?;
        let mut tx = db.begin().await?;
        for id in ["old", "recent", "pending"] {
            record(&mut tx, &event(id)).await?;
        }
        tx.commit().await?;
        let rows = pending(db.pool(), 0, 10).await?;
        mark_delivered(&db, &[rows[0].seq, rows[1].seq]).await?;
        sqlx::query::<Any>("UPDATE outbox_events SET delivered_at = 1000 WHERE event_id = 'old'")
            .execute(db.pool())
            .await?;
        // "pending" is older than any cutoff but undelivered: it stays.
        sqlx::query::<Any>("UPDATE outbox_events SET occurred_at = 0 WHERE event_id = 'pending'")
            .execute(db.pool())
            .await?;
        assert_eq!(prune_delivered(&db, 2000).await?, 1);
        let left: Vec<String> = for_tenant(db.pool(), "t").await?.into_iter().map(|r| r.event.event_id).collect();
        assert_eq!(left, ["recent", "pending"]);
        assert_eq!(prune_delivered(&db, estate_core::now_ms() + 1).await?, 1);
        let left: Vec<String> = for_tenant(db.pool(), "t").await?.into_iter().map(|r| r.event.event_id).collect();
        assert_eq!(left, ["pending"]);
        Ok(())
    }

    #[test]
    fn an_events_bytes_do_not_depend_on_the_order_of_its_attributes() {
        // The log keeps events' bytes as appended; with the attributes in key
        // order, the same event always has the same bytes.
        let actor = || Actor { kind: 1, id: "gate-1".into() };
        let change = || Change::new("t", "gate.decide", "gate", "gate-1").person("p-1", false);
        let mut a = change().attr("verdict", "ADMIT").attr("reason", "OK").attr("kind", "card").into_event(
            actor(),
            "req",
            "gate",
        );
        let mut b = change().attr("kind", "card").attr("reason", "OK").attr("verdict", "ADMIT").into_event(
            actor(),
            "req",
            "gate",
        );
        // Ids and times are fresh per event.
        b.event_id.clone_from(&a.event_id);
        b.occurred_at = a.occurred_at;
        a.attributes.insert("decision_id".into(), "d-1".into());
        b.attributes.insert("decision_id".into(), "d-1".into());
        assert_eq!(a.encode_to_vec(), b.encode_to_vec());
        let keys: Vec<&str> = a.attributes.keys().map(String::as_str).collect();
        assert_eq!(keys, ["decision_id", "kind", "reason", "verdict"]);
    }
}

/// The audit log itself, reachable inside a write transaction: in the
/// all-in-one process the log shares the database with every service, so a
/// high-volume writer (the gate's decisions) can append its events to the
/// hash-chained log in the transaction that records them, instead of to the
/// outbox for the relay to copy, mark and later prune — the same guarantee
/// (no answer without a durable audit entry) for about a third of the writes.
///
/// Events given to a sink are appended exactly once by construction: each
/// is new (a fresh id) and never also sent through an outbox. The log does
/// not check their ids for duplicates (it does for relayed events, which a
/// relay may resend after a crash).
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Encodes and hashes `event` for [`AuditSink::append_in`]: the work that
    /// does not depend on the log's head, done by the caller's task (in
    /// parallel with others) rather than inside the single write transaction.
    fn prepare(&self, event: AuditEvent) -> PreparedEvent;

    /// Appends `events` on `conn` (a write transaction the caller commits).
    fn append_in<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        events: &'a [PreparedEvent],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;

    /// Called after the transaction of an [`AuditSink::append_in`] committed.
    fn committed(&self, events: &[PreparedEvent]);

    /// Appends `events` in a write transaction of its own on `db` (the
    /// database the log is in) and commits it; then as [`AuditSink::committed`].
    fn append_committed<'a>(
        &'a self,
        db: &'a crate::Db,
        events: &'a [PreparedEvent],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;
}

/// An event ready to append: its exact bytes (as the log stores them) and
/// their Merkle leaf hash. Made by [`AuditSink::prepare`].
#[derive(Debug, Clone, Default)]
pub struct PreparedEvent {
    /// The event.
    pub event: AuditEvent,
    /// Its encoding.
    pub bytes: Vec<u8>,
    /// The leaf hash of its encoding.
    pub leaf: [u8; 32],
}
