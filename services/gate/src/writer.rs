//! Group commit of decision audit events (R11, R17).
//!
//! Every decision is audited before its answer leaves the service, but one
//! transaction per decision would make the database's commit rate the gate's
//! ceiling. Decisions queue here; one task writes whatever is queued (up to a
//! batch) in a single transaction, with each gate's last-seen time, and
//! answers every waiting decision once the batch is durable. A failed batch
//! fails each of its decisions with UNAVAILABLE: no answer without an audit.

use estate_core::{Error, Result};
use estate_proto::common::AuditEvent;
use estate_store::{Db, db_error, outbox};
use sqlx::Any;
use std::collections::HashMap;
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
}

type Job = (Pending, oneshot::Sender<Result<()>>);

/// Scheduler yields the writer makes to gather more decisions into a batch.
const GATHER_YIELDS: usize = 8;

/// Handle to the writer task; cheap to clone.
#[derive(Debug, Clone)]
pub struct DecisionWriter {
    queue: mpsc::Sender<Job>,
}

impl DecisionWriter {
    /// Starts the writer task on `db`, writing at most `batch` events per
    /// transaction.
    pub fn start(db: Db, batch: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let batch = batch.clamp(1, 10_000);
        let (queue, rx) = mpsc::channel(batch * 8);
        let task = tokio::spawn(run(db, rx, batch));
        (Self { queue }, task)
    }

    /// Queues `pending` and waits until it is committed.
    pub async fn write(&self, pending: Pending) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((pending, tx))
            .await
            .map_err(|_| Error::Unavailable("the gate service is shutting down".into()))?;
        rx.await.map_err(|_| Error::Unavailable("the decision log stopped; retry".into()))?
    }
}

async fn run(db: Db, mut rx: mpsc::Receiver<Job>, batch: usize) {
    let mut jobs: Vec<Job> = Vec::with_capacity(batch);
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
        let result = commit(&db, &jobs).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, decisions = jobs.len(), "decision batch not committed");
        }
        for (_, reply) in jobs.drain(..) {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(_) => Err(Error::Unavailable("the decision could not be recorded; retry".into())),
            };
            let _ = reply.send(r);
        }
    }
}

async fn commit(db: &Db, jobs: &[Job]) -> Result<()> {
    let mut tx = db.begin().await?;
    let mut seen: HashMap<(&str, &str), (&str, i64)> = HashMap::new();
    let events: Vec<(&AuditEvent, Option<String>)> =
        jobs.iter().map(|(p, _)| (&p.event, p.trace_parent.clone())).collect();
    outbox::record_many(&mut tx, &events).await?;
    for (p, _) in jobs {
        if let Some((gate, estate)) = &p.gate {
            let at = p.event.occurred_at.as_ref().map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000));
            seen.insert((p.event.tenant_id.as_str(), gate.as_str()), (estate.as_str(), at.unwrap_or(0)));
        }
    }
    for ((tenant, gate), (estate, at)) in seen {
        touch(&mut tx, tenant, gate, estate, at).await?;
    }
    tx.commit().await.map_err(db_error)
}

/// Records that a gate was heard from at `at` (ms).
pub async fn touch(conn: &mut sqlx::AnyConnection, tenant: &str, gate: &str, estate: &str, at: i64) -> Result<()> {
    sqlx::query::<Any>(
        "INSERT INTO gate_status (tenant_id, gate_id, estate_id, last_seen_at, bundle_version_issued, bundle_version_acked) \
         VALUES ($1, $2, $3, $4, 0, 0) \
         ON CONFLICT (tenant_id, gate_id) DO UPDATE SET last_seen_at = excluded.last_seen_at",
    )
    .bind(tenant)
    .bind(gate)
    .bind(estate)
    .bind(at)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}
