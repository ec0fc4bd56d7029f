//! The audit outbox (R11, R17). Every state change calls [`record`] inside the
//! transaction that makes the change, so the change and its audit event
//! commit together or not at all. The audit service's relay reads pending rows
//! in `seq` order and marks them delivered once the audit log acknowledged them.

use crate::db_error;
use estate_core::Result;
use estate_proto::common::AuditEvent;
use prost::Message;
use sqlx::{Any, AnyConnection, Row};

/// Writes `event` to the outbox on `conn` (which should be a transaction).
pub async fn record(conn: &mut AnyConnection, event: &AuditEvent) -> Result<()> {
    let occurred_at = event
        .occurred_at
        .as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
        .unwrap_or_else(estate_core::now_ms);
    sqlx::query::<Any>(
        "INSERT INTO outbox_events (event_id, tenant_id, source, action, object_type, object_id, \
         estate_id, person_pseudonym, occurred_at, payload) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(event.event_id.as_str())
    .bind(event.tenant_id.as_str())
    .bind(event.source.as_str())
    .bind(event.action.as_str())
    .bind(event.object_type.as_str())
    .bind(event.object_id.as_str())
    .bind(event.estate_id.as_str())
    .bind(event.person_pseudonym.as_str())
    .bind(occurred_at)
    .bind(event.encode_to_vec())
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// A stored outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Order of writing.
    pub seq: i64,
    /// The decoded event.
    pub event: AuditEvent,
}

/// Reads up to `limit` undelivered events after `after_seq`, oldest first.
pub async fn pending(pool: &sqlx::AnyPool, after_seq: i64, limit: i64) -> Result<Vec<OutboxRow>> {
    let rows = sqlx::query::<Any>(
        "SELECT seq, payload FROM outbox_events WHERE delivered_at IS NULL AND seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    rows.into_iter()
        .map(|r| {
            let payload: Vec<u8> = r.try_get("payload").map_err(db_error)?;
            let event = AuditEvent::decode(payload.as_slice())
                .map_err(|e| estate_core::Error::Internal(format!("outbox payload: {e}")))?;
            Ok(OutboxRow { seq: r.try_get("seq").map_err(db_error)?, event })
        })
        .collect()
}

/// Marks events delivered (after the audit service acknowledged them).
pub async fn mark_delivered(pool: &sqlx::AnyPool, seqs: &[i64]) -> Result<()> {
    let now = estate_core::now_ms();
    let mut tx = pool.begin().await.map_err(db_error)?;
    for seq in seqs {
        sqlx::query::<Any>("UPDATE outbox_events SET delivered_at = $1 WHERE seq = $2")
            .bind(now)
            .bind(*seq)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)
}

/// Events of a tenant in write order, for tests and the operator's own view
/// until the audit service exists.
pub async fn for_tenant(pool: &sqlx::AnyPool, tenant_id: &str) -> Result<Vec<OutboxRow>> {
    let rows = sqlx::query::<Any>("SELECT seq, payload FROM outbox_events WHERE tenant_id = $1 ORDER BY seq")
        .bind(tenant_id)
        .fetch_all(pool)
        .await
        .map_err(db_error)?;
    rows.into_iter()
        .map(|r| {
            let payload: Vec<u8> = r.try_get("payload").map_err(db_error)?;
            let event = AuditEvent::decode(payload.as_slice())
                .map_err(|e| estate_core::Error::Internal(format!("outbox payload: {e}")))?;
            Ok(OutboxRow { seq: r.try_get("seq").map_err(db_error)?, event })
        })
        .collect()
}
