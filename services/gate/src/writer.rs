//! Group commit of decision audit events (R11, R17).
//!
//! Every decision is audited before its answer leaves the service, but one
//! transaction per decision would make the database's commit rate the gate's
//! ceiling. Decisions queue here; one task writes whatever is queued (up to a
//! batch) in a single transaction and answers every waiting decision once the
//! batch is durable. A failed batch fails each of its decisions with
//! UNAVAILABLE: no answer without an audit. Anti-passback passages kept in
//! memory are recorded in the same transaction. Gates' last-seen times follow,
//! at most once a second per gate, after the answers, written by a task of
//! their own.
//!
//! Where the audit log shares the database (the all-in-one process), the
//! batch is appended to the hash-chained log itself
//! ([`AuditSink::append_committed`]); otherwise (a gate replica with its own
//! database) it goes to the outbox, for the relay to ship to the audit
//! service.

use crate::presence::{self, Passage};
use estate_core::{Error, Result};
use estate_proto::common::AuditEvent;
use estate_store::outbox::{AuditSink, PreparedEvent};
use estate_store::{Db, db_error, outbox};
use sqlx::Any;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// One decision to make durable.
#[derive(Debug)]
pub struct Pending {
    /// Its audit event.
    pub event: AuditEvent,
    /// (gate id, estate id) whose last-seen time to update.
    pub gate: Option<(String, String)>,
    /// W3C traceparent of the decision's call.
    pub trace_parent: Option<String>,
    /// The anti-passback passage it made, when presence is kept in memory
    /// (recorded in the same transaction as the event).
    pub passage: Option<Passage>,
}

/// A queued decision: its event prepared for the audit log when the writer
/// appends there, and whom to answer.
type Job = (Pending, Option<PreparedEvent>, oneshot::Sender<Result<()>>);

/// Scheduler yields the writer makes to gather more decisions into a batch.
const GATHER_YIELDS: usize = 8;

/// Handle to the writer task; cheap to clone.
#[derive(Debug, Clone)]
pub struct DecisionWriter {
    queue: mpsc::Sender<Job>,
    log: Option<Arc<dyn AuditSink>>,
}

impl DecisionWriter {
    /// Starts the writer task on `db`, writing at most `batch` events per
    /// transaction, to `log` when given (it must share `db`), else to the
    /// outbox.
    pub fn start(db: Db, batch: usize, log: Option<Arc<dyn AuditSink>>) -> (Self, tokio::task::JoinHandle<()>) {
        let batch = batch.clamp(1, 10_000);
        let (queue, rx) = mpsc::channel(batch * 8);
        let task = tokio::spawn(run(db, log.clone(), rx, batch));
        (Self { queue, log }, task)
    }

    /// Queues `pending` and waits until it is committed.
    pub async fn write(&self, mut pending: Pending) -> Result<()> {
        // Encoding and hashing happen here, on the decision's own task, so
        // that the single writer's transaction only chains and inserts.
        let prepared = self.log.as_ref().map(|log| log.prepare(std::mem::take(&mut pending.event)));
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((pending, prepared, tx))
            .await
            .map_err(|_| Error::Unavailable("the gate service is shutting down".into()))?;
        rx.await.map_err(|_| Error::Unavailable("the decision log stopped; retry".into()))?
    }
}

async fn run(db: Db, log: Option<Arc<dyn AuditSink>>, mut rx: mpsc::Receiver<Job>, batch: usize) {
    let mut jobs: Vec<Job> = Vec::with_capacity(batch);
    let mut written = Written::new();
    let (seen, seen_rx) = mpsc::channel::<LastSeen>(64);
    let toucher = tokio::spawn(touch_loop(db.clone(), seen_rx));
    while rx.recv_many(&mut jobs, batch).await > 0 {
        // Let the decisions already under way join this batch: a few yields
        // cost microseconds and save a transaction per handful of decisions.
        for _ in 0..GATHER_YIELDS {
            if jobs.len() >= batch {
                break;
            }
            tokio::task::yield_now().await;
            while jobs.len() < batch {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
        // The gates due a last-seen update, read before the log takes the events.
        let due =
            due(jobs.iter().map(|(p, prepared, _)| (p, prepared.as_ref().map_or(&p.event, |e| &e.event))), &written);
        let result = match &log {
            Some(log) => commit_to_log(&db, log.as_ref(), &mut jobs).await,
            None => commit(&db, &jobs).await,
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, decisions = jobs.len(), "decision batch not committed");
        }
        for (_, _, reply) in jobs.drain(..) {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(_) => Err(Error::Unavailable("the decision could not be recorded; retry".into())),
            };
            let _ = reply.send(r);
        }
        if result.is_ok() && !due.is_empty() {
            // Recorded by a task of its own: waiting here for a second
            // write turn (behind the audit relay, the indexer or a
            // checkpoint) held up the next batch of decisions, after nearly
            // every batch when many gates decide. Remembered as written now;
            // if this update is lost, the gate is due again a second later.
            remember(&mut written, &due);
            let _ = seen.try_send(due);
        }
    }
    // Every decision handle is gone (the service is stopping): the last
    // last-seen times are written before the writer's task ends, so that
    // a shutdown that awaits it does not cut them off.
    drop(seen);
    let _ = toucher.await;
}

async fn commit(db: &Db, jobs: &[Job]) -> Result<()> {
    let mut tx = db.begin().await?;
    let events: Vec<(&AuditEvent, Option<String>)> =
        jobs.iter().map(|(p, _, _)| (&p.event, p.trace_parent.clone())).collect();
    outbox::record_many(&mut tx, &events).await?;
    presence::record(&mut tx, &passages(jobs)).await?;
    tx.commit().await.map_err(db_error)
}

/// The batch's anti-passback passages to record.
fn passages(jobs: &[Job]) -> Vec<&Passage> {
    jobs.iter().filter_map(|(p, _, _)| p.passage.as_ref()).collect()
}

/// The batch straight into the audit log, with one `audit.append` span per
/// traced decision (in its call's trace) lasting until the entry is durable,
/// as the relay's spans do for outbox events.
async fn commit_to_log(db: &Db, log: &dyn AuditSink, jobs: &mut [Job]) -> Result<()> {
    let events: Vec<PreparedEvent> = jobs.iter_mut().filter_map(|(_, prepared, _)| prepared.take()).collect();
    let spans: Vec<tracing::Span> = jobs
        .iter()
        .zip(&events)
        .filter_map(|((p, _, _), e)| {
            let parent = p.trace_parent.as_deref()?;
            let span = tracing::info_span!("audit.append", otel.name = "audit.append", event_id = %e.event.event_id);
            estate_telemetry::set_parent(&span, parent);
            Some(span)
        })
        .collect();
    let passages = passages(jobs);
    if passages.is_empty() {
        log.append_committed(db, &events).await?;
    } else {
        let mut tx = db.begin().await?;
        log.append_in(&mut tx, &events).await?;
        presence::record(&mut tx, &passages).await?;
        tx.commit().await.map_err(db_error)?;
        log.committed(&events);
    }
    drop(spans);
    Ok(())
}

/// Records the last-seen times of gates that are due (once a second per
/// gate), as the writer sends them after answering their decisions, each
/// lot (with any queued behind it) in a transaction of its own; a failure
/// is only logged.
async fn touch_loop(db: Db, mut rx: mpsc::Receiver<LastSeen>) {
    while let Some(mut seen) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            for (gate, (tenant, estate, at)) in more {
                let entry = seen.entry(gate).or_insert((tenant, estate, at));
                entry.2 = entry.2.max(at);
            }
        }
        let touched = async {
            let mut tx = db.begin().await?;
            touch_all(&mut tx, &seen).await?;
            tx.commit().await.map_err(db_error)
        };
        if let Err(e) = touched.await {
            tracing::warn!(error = %e, "gates' last-seen times not recorded");
        }
    }
}

/// The gates of a batch whose stored last-seen time is due: gate ->
/// (tenant, estate, its latest decision in the batch, ms).
type LastSeen = HashMap<String, (String, String, i64)>;

/// How often a gate's stored last-seen time is brought up to date while it
/// keeps deciding: operators read it to the second, and rewriting it with
/// every batch cost a statement (a round trip to the database) per batch.
const LAST_SEEN_EVERY_MS: i64 = 1_000;

/// The last-seen time last committed per gate (gate ids are unique across
/// tenants).
type Written = HashMap<String, i64>;

/// The gates of a batch whose stored time is [`LAST_SEEN_EVERY_MS`] or more
/// behind their latest decision (or that this writer never wrote). A gate
/// that is not due costs two lookups and no copy: this runs for every batch.
fn due<'a>(decisions: impl Iterator<Item = (&'a Pending, &'a AuditEvent)>, written: &Written) -> LastSeen {
    let mut seen = LastSeen::new();
    for (p, event) in decisions {
        let Some((gate, estate)) = &p.gate else { continue };
        let at = outbox::occurred_ms(event);
        if let Some(entry) = seen.get_mut(gate.as_str()) {
            entry.2 = entry.2.max(at);
        } else if written.get(gate.as_str()).is_none_or(|w| at - *w >= LAST_SEEN_EVERY_MS) {
            seen.insert(gate.clone(), (event.tenant_id.clone(), estate.clone(), at));
        }
    }
    seen
}

/// Records what a committed batch wrote. The map is pruned of gates silent
/// for a minute, so it holds the gates deciding now.
fn remember(written: &mut Written, seen: &LastSeen) {
    let newest = seen.values().map(|(_, _, at)| *at).max();
    for (gate, (_, _, at)) in seen {
        written.insert(gate.clone(), *at);
    }
    if let Some(now) = newest
        && written.len() > 1024
    {
        written.retain(|_, at| now - *at < 60_000);
    }
}

/// Gates per statement of [`touch_all`] (four parameters each).
const TOUCH_ROWS: usize = 256;

/// Updates each gate's last-seen time, many gates per statement: with a
/// statement per gate, an estate of 1,000 gates deciding at once cost
/// 1,000 statements a second, each a hand-off to the database's thread
/// inside the write turn every decision batch waits for (gate-bench
/// `--deciding-gates 1000`: BENCHMARKS.md, session 24).
async fn touch_all(conn: &mut sqlx::AnyConnection, seen: &LastSeen) -> Result<()> {
    let rows: Vec<(&String, &(String, String, i64))> = seen.iter().collect();
    for chunk in rows.chunks(TOUCH_ROWS) {
        let values: Vec<String> =
            (0..chunk.len()).map(|r| format!("({}, 0, 0)", estate_store::params(conn, r * 4 + 1, 4))).collect();
        let mut q = sqlx::query::<Any>(sqlx::AssertSqlSafe(touch_sql(&values.join(", "))));
        for (gate, (tenant, estate, at)) in chunk {
            q = q.bind(tenant.as_str()).bind(gate.as_str()).bind(estate.as_str()).bind(*at);
        }
        q.execute(&mut *conn).await.map_err(db_error)?;
    }
    Ok(())
}

/// The upsert of gates' last-seen times from these `VALUES` groups (tenant,
/// gate, estate, time; a new gate's bundle versions 0). A time never goes
/// back: a decision's touch (timed when it was made) can commit after a
/// later one's, from the batched touches or another replica.
fn touch_sql(values: &str) -> String {
    format!(
        "INSERT INTO gate_status (tenant_id, gate_id, estate_id, last_seen_at, bundle_version_issued, \
         bundle_version_acked) VALUES {values} \
         ON CONFLICT (tenant_id, gate_id) DO UPDATE SET last_seen_at = CASE \
         WHEN excluded.last_seen_at > gate_status.last_seen_at THEN excluded.last_seen_at \
         ELSE gate_status.last_seen_at END"
    )
}

/// Records that a gate was heard from at `at` (ms).
pub async fn touch(conn: &mut sqlx::AnyConnection, tenant: &str, gate: &str, estate: &str, at: i64) -> Result<()> {
    sqlx::query::<Any>(sqlx::AssertSqlSafe(touch_sql("($1, $2, $3, $4, 0, 0)")))
        .bind(tenant)
        .bind(gate)
        .bind(estate)
        .bind(at)
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On SQLite, or on PostgreSQL when the tests are pointed at it: the
    /// last-seen times of more gates than one statement takes are recorded,
    /// brought up to date later, never moved back, and the bundle versions
    /// of a gate already known are left alone.
    #[tokio::test]
    async fn last_seen_times_of_many_gates_are_recorded_and_updated() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (test_db, db) = crate::test_db(dir.path()).await?;
        let gates = TOUCH_ROWS * 2 + 3;
        let seen = |at: i64| -> LastSeen {
            (0..gates).map(|g| (format!("g{g:04}"), ("t".to_owned(), "e".to_owned(), at + g as i64))).collect()
        };
        let stored = |db: Db| async move {
            let rows: Vec<(String, i64, i64)> = sqlx::query_as::<Any, (String, i64, i64)>(
                "SELECT gate_id, last_seen_at, bundle_version_acked FROM gate_status ORDER BY gate_id",
            )
            .fetch_all(db.pool())
            .await?;
            anyhow::Ok(rows)
        };
        let (tx, rx) = mpsc::channel(4);
        let toucher = tokio::spawn(touch_loop(db.clone(), rx));
        tx.send(seen(1_000)).await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stored(db.clone()).await?.len() < gates && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let rows = stored(db.clone()).await?;
        assert_eq!(rows.len(), gates);
        assert!(rows.iter().enumerate().all(|(g, r)| r.1 == 1_000 + g as i64), "{:?}", &rows[..3]);

        sqlx::query::<Any>("UPDATE gate_status SET bundle_version_acked = 7 WHERE gate_id = 'g0001'")
            .execute(db.pool())
            .await?;
        tx.send(seen(5_000)).await?;
        drop(tx);
        toucher.await?;
        let rows = stored(db.clone()).await?;
        assert_eq!(rows.len(), gates);
        assert!(rows.iter().enumerate().all(|(g, r)| r.1 == 5_000 + g as i64), "{:?}", &rows[..3]);
        assert_eq!(rows[1], ("g0001".to_owned(), 5_001, 7));

        // A touch older than the time recorded (committed late) leaves it;
        // a newer one moves it on.
        for (at, want) in [(4_000, 5_002), (9_000, 9_000)] {
            let mut tx = db.begin().await?;
            touch(&mut tx, "t", "g0002", "e", at).await?;
            tx.commit().await?;
            let rows = stored(db.clone()).await?;
            assert_eq!(rows[2], ("g0002".to_owned(), want, 0), "after a touch at {at}");
        }
        db.close().await;
        test_db.drop().await
    }

    /// When the service stops (every handle to the writer dropped), the
    /// writer's task ends only after the last-seen times it handed on are
    /// written: a shutdown that awaits the task does not cut them off.
    #[tokio::test]
    async fn the_writer_ends_after_the_last_seen_times_are_written() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (test_db, db) = crate::test_db(dir.path()).await?;
        db.migrate_outbox().await?;
        let (writer, task) = DecisionWriter::start(db.clone(), 16, None);
        let event = AuditEvent {
            event_id: "evt-1".into(),
            tenant_id: "t".into(),
            estate_id: "e".into(),
            action: "gate.decide".into(),
            ..Default::default()
        };
        writer
            .write(Pending { event, gate: Some(("g1".into(), "e".into())), trace_parent: None, passage: None })
            .await?;
        drop(writer);
        task.await?;
        let gates: Vec<(String,)> =
            sqlx::query_as::<Any, (String,)>("SELECT gate_id FROM gate_status").fetch_all(db.pool()).await?;
        assert_eq!(gates, [("g1".to_owned(),)]);
        db.close().await;
        test_db.drop().await
    }
}
