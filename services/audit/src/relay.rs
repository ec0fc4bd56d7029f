//! The relay: ships outbox rows to the audit log, then marks them delivered.
//! The log deduplicates by event id, so a crash between the append and the
//! mark only causes a harmless retry: nothing lost, nothing counted twice.

use crate::log::AuditLog;
use estate_core::Result;
use estate_store::{Db, outbox};
use std::time::Duration;

/// Ships one batch; returns how many rows it took.
pub async fn relay_once(db: &Db, log: &AuditLog, batch: i64) -> Result<usize> {
    let rows = outbox::pending(db.pool(), 0, batch).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let events: Vec<(Vec<u8>, estate_proto::common::AuditEvent)> =
        rows.iter().map(|r| (r.payload.clone(), r.event.clone())).collect();
    // One span per relayed event, in the trace of the call that made the
    // change, lasting until the event is in the log.
    let spans: Vec<tracing::Span> = rows
        .iter()
        .filter_map(|r| {
            let parent = r.trace_parent.as_deref()?;
            let span = tracing::info_span!("audit.append", otel.name = "audit.append", event_id = %r.event.event_id);
            estate_telemetry::set_parent(&span, parent);
            Some(span)
        })
        .collect();
    log.append(&events).await?;
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    outbox::mark_delivered(db, &seqs).await?;
    drop(spans);
    Ok(rows.len())
}

/// How often the person and estate indexes are brought up to the log's head.
const INDEX_EVERY: Duration = Duration::from_secs(1);

/// How long a sweep of the indexer may take: its write transactions are
/// spread over this time, shared between the tenants with entries to
/// index (those with none take no share: with many tenants, an even split
/// among all of them left the busy ones a few milliseconds, a burst again),
/// so that they hold
/// the writing connection in short turns evenly apart rather than in one
/// burst that every decision queues behind (BENCHMARKS.md, session 21).
const INDEX_SPREAD: Duration = Duration::from_millis(500);

/// Brings every tenant's person and estate indexes up to date; failures are
/// only logged (queries read the entries not yet indexed themselves).
async fn index_entries(log: &AuditLog) {
    match log.tenants_with_entries().await {
        Ok(tenants) => {
            let mut due = Vec::with_capacity(tenants.len());
            for t in tenants {
                match log.has_unindexed(&t).await {
                    Ok(true) => due.push(t),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "entry index mark not read; will retry"),
                }
            }
            let each = INDEX_SPREAD / u32::try_from(due.len()).unwrap_or(u32::MAX).max(1);
            for t in due {
                if let Err(e) = log.index_entries(&t, each).await {
                    tracing::warn!(error = %e, "entry indexes not brought up to date; will retry");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "entry index sweep failed; will retry"),
    }
}

/// Brings the person and estate indexes up to date every [`INDEX_EVERY`]
/// until the pool closes. It runs beside the relay loop, not in it: a sweep
/// spread over [`INDEX_SPREAD`] would hold up the shipping of outbox events.
async fn run_indexer(db: Db, log: AuditLog) {
    let mut tick = tokio::time::interval(INDEX_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if db.pool().is_closed() {
            return;
        }
        index_entries(&log).await;
    }
}

/// Runs the relay until the pool closes: ships batches as fast as they come,
/// signs time-based checkpoints when a tenant's log grew, and deletes
/// delivered outbox rows older than `retention` (zero: keeps them); beside
/// it, in the same task, brings the person and estate indexes up to date
/// every second.
pub fn spawn_relay(
    db: Db,
    log: AuditLog,
    batch: i64,
    interval: Duration,
    retention: Duration,
) -> tokio::task::JoinHandle<()> {
    let indexer = run_indexer(db.clone(), log.clone());
    let relay = async move {
        let mut last_sweep = tokio::time::Instant::now();
        let mut pruner = outbox::Pruner::new(retention);
        loop {
            if db.pool().is_closed() {
                return;
            }
            match relay_once(&db, &log, batch).await {
                Ok(n) if n as i64 >= batch => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "audit relay failed; will retry"),
            }
            if last_sweep.elapsed() >= Duration::from_secs(5) {
                last_sweep = tokio::time::Instant::now();
                match log.tenants_with_entries().await {
                    Ok(tenants) => {
                        for t in tenants {
                            if let Err(e) = log.checkpoint_if_due(&t).await {
                                tracing::warn!(error = %e, "checkpoint failed; will retry");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "checkpoint sweep failed; will retry"),
                }
            }
            pruner.tick(&db).await;
            tokio::time::sleep(interval).await;
        }
    };
    tokio::spawn(async move {
        tokio::join!(relay, indexer);
    })
}
