//! Deletion of face data (R5): requests, the sweep that turns ended
//! residencies into requests, and the hand-off to whoever holds face data.
//!
//! A request is created in the same transaction as its cause (a withdrawal),
//! or by the sweep from the durable `residency.end` outbox events identity
//! writes. Each cause has a `source_id` that is unique per tenant, so running
//! the sweep any number of times, on any number of replicas, yields exactly one
//! request per cause. The facematch service fulfils requests through
//! [`FaceDataEraser`] and returns a deletion certificate id (R6).

use crate::model::{ACTIVE, DELETION_COLS, DeletionRow, ENDED, reason_name};
use base64::Engine;
use estate_bus::EventBus;
use estate_core::{Result, new_id, now_ms};
use estate_facematch::FaceMatcher;
use estate_proto::common::{Actor, ActorKind};
use estate_proto::consent::{DeletionReason, DeletionRequest};
use estate_proto::facematch::{CertificateBody, DeleteRequest, DeletionCertificate, DeletionReason as FmReason};
use estate_store::outbox::{self, Change};
use estate_store::{Db, db_error};
use futures_util::future::BoxFuture;
use prost::Message;
use sqlx::{Any, AnyConnection};
use std::sync::Arc;
use std::time::Duration;

const SOURCE: &str = "consent";
const CURSOR: &str = "residency_end";
const BATCH: i64 = 500;
/// How often the retention sweep runs.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Whoever holds face data and can delete it (facematch). Implementations
/// must be idempotent per request id: erasing what is already gone succeeds
/// and returns the same certificate.
pub trait FaceDataEraser: Send + Sync {
    /// Deletes every face datum of the request's person at its estate and
    /// returns the signed deletion certificate (R6).
    fn erase<'a>(&'a self, request: &'a DeletionRequest) -> BoxFuture<'a, Result<DeletionCertificate>>;
}

/// The eraser that is the tenant's facematch (in-process or remote).
#[derive(Debug, Clone)]
pub struct FacematchEraser(pub Arc<dyn FaceMatcher>);

fn facematch_reason(r: DeletionReason) -> FmReason {
    match r {
        DeletionReason::ConsentWithdrawn => FmReason::Withdrawal,
        DeletionReason::ResidencyEnded => FmReason::MoveOut,
        DeletionReason::PersonRequest => FmReason::Request,
        DeletionReason::RetentionExpired => FmReason::Retention,
        DeletionReason::Unspecified => FmReason::Request,
    }
}

impl FaceDataEraser for FacematchEraser {
    fn erase<'a>(&'a self, request: &'a DeletionRequest) -> BoxFuture<'a, Result<DeletionCertificate>> {
        Box::pin(async move {
            let reason = DeletionReason::try_from(request.reason).unwrap_or(DeletionReason::Unspecified);
            self.0
                .delete(
                    &request.tenant_id,
                    DeleteRequest {
                        person_pseudonym: request.person_pseudonym.clone(),
                        estate_id: request.estate_id.clone(),
                        reason: facematch_reason(reason) as i32,
                        request_id: request.id.clone(),
                    },
                )
                .await
        })
    }
}

/// Records a deletion request unless one exists for `source_id`; returns its
/// id when this call created it.
pub(crate) async fn request_deletion(
    conn: &mut AnyConnection,
    tenant_id: &str,
    estate_id: &str,
    pseudonym: &str,
    reason: DeletionReason,
    source_id: &str,
) -> Result<Option<String>> {
    let id = new_id();
    let done = sqlx::query::<Any>(
        "INSERT INTO face_deletion_requests (tenant_id, id, estate_id, person_pseudonym, reason, source_id, requested_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, source_id) DO NOTHING",
    )
    .bind(tenant_id)
    .bind(&id)
    .bind(estate_id)
    .bind(pseudonym)
    .bind(reason_name(reason))
    .bind(source_id)
    .bind(now_ms())
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok((done.rows_affected() == 1).then_some(id))
}

/// Whether a person's consents were given for a minor, so that their
/// deletion events stay flagged in audit too (R7).
pub(crate) async fn concerns_minor(conn: &mut AnyConnection, tenant_id: &str, pseudonym: &str) -> Result<bool> {
    let (n,): (i64,) = sqlx::query_as::<Any, (i64,)>(
        "SELECT COUNT(*) FROM consents WHERE tenant_id = $1 AND person_pseudonym = $2 AND concerns_minor <> 0",
    )
    .bind(tenant_id)
    .bind(pseudonym)
    .fetch_one(conn)
    .await
    .map_err(db_error)?;
    Ok(n > 0)
}

fn sweep_actor() -> Actor {
    Actor { kind: ActorKind::Service as i32, id: "consent-deletion-sweep".into() }
}

/// Reads `residency.end` events after the cursor; for each that ended the
/// person's last residency at an estate where they hold an active face
/// consent, ends that consent and requests deletion of their face data there.
/// Returns the requests created.
pub async fn sweep_residency_ends(db: &Db) -> Result<usize> {
    let mut created = 0;
    loop {
        let cursor: Option<(i64,)> =
            sqlx::query_as::<Any, (i64,)>("SELECT last_seq FROM consent_sweep_cursor WHERE name = $1")
                .bind(CURSOR)
                .fetch_optional(db.pool())
                .await
                .map_err(db_error)?;
        let after = cursor.map_or(0, |(s,)| s);
        let events = outbox::with_action_after(db.pool(), "residency.end", after, BATCH).await?;
        let Some(last) = events.last().map(|e| e.seq) else { return Ok(created) };
        let mut tx = db.begin().await?;
        for row in &events {
            let ev = &row.event;
            if ev.attributes.get("last_at_estate").map(String::as_str) != Some("true") {
                continue;
            }
            // Only a person with an active face consent there can have face
            // data there; earlier withdrawals already requested deletion.
            let (active,): (i64,) = sqlx::query_as::<Any, (i64,)>(
                "SELECT COUNT(*) FROM consents WHERE tenant_id = $1 AND person_pseudonym = $2 AND estate_id = $3 AND status = $4",
            )
            .bind(&ev.tenant_id)
            .bind(&ev.person_pseudonym)
            .bind(&ev.estate_id)
            .bind(ACTIVE)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
            if active == 0 {
                continue;
            }
            let Some(request_id) = request_deletion(
                &mut tx,
                &ev.tenant_id,
                &ev.estate_id,
                &ev.person_pseudonym,
                DeletionReason::ResidencyEnded,
                &ev.event_id,
            )
            .await?
            else {
                continue;
            };
            let ended = sqlx::query::<Any>(
                "UPDATE consents SET status = $1, withdrawn_at = $2, deletion_request_id = $3 \
                 WHERE tenant_id = $4 AND person_pseudonym = $5 AND estate_id = $6 AND status = $7",
            )
            .bind(ENDED)
            .bind(now_ms())
            .bind(&request_id)
            .bind(&ev.tenant_id)
            .bind(&ev.person_pseudonym)
            .bind(&ev.estate_id)
            .bind(ACTIVE)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            let change = Change::new(&ev.tenant_id, "face_deletion.request", "face_deletion_request", &request_id)
                .estate(&ev.estate_id)
                .person(&ev.person_pseudonym, ev.concerns_minor)
                .attr("reason", reason_name(DeletionReason::ResidencyEnded))
                .attr("cause_event_id", ev.event_id.clone())
                .attr("consents_ended", ended.to_string());
            outbox::record(&mut tx, &change.into_event(sweep_actor(), &ev.request_id, SOURCE)).await?;
            created += 1;
        }
        sqlx::query::<Any>(
            "INSERT INTO consent_sweep_cursor (name, last_seq) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET last_seq = excluded.last_seq",
        )
        .bind(CURSOR)
        .bind(last)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
    }
}

/// Hands pending requests to `eraser` and records the certificates. A request
/// is marked fulfilled once, so repeated runs erase nothing twice.
pub async fn fulfil_pending(db: &Db, eraser: &dyn FaceDataEraser) -> Result<usize> {
    let rows = sqlx::query_as::<Any, DeletionRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {DELETION_COLS} FROM face_deletion_requests WHERE fulfilled_at IS NULL ORDER BY requested_at LIMIT 500"
    )))
    .fetch_all(db.pool())
    .await
    .map_err(db_error)?;
    let mut done = 0;
    for row in rows {
        let request: DeletionRequest = row.into();
        let certificate = eraser.erase(&request).await?;
        let body = certificate
            .decoded
            .clone()
            .or_else(|| CertificateBody::decode(certificate.body.as_slice()).ok())
            .ok_or_else(|| estate_core::Error::Internal("facematch returned an undecodable certificate".into()))?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(certificate.encode_to_vec());
        let mut tx = db.begin().await?;
        let updated = sqlx::query::<Any>(
            "UPDATE face_deletion_requests SET fulfilled_at = $1, certificate_id = $2, certificate = $3 \
             WHERE tenant_id = $4 AND id = $5 AND fulfilled_at IS NULL",
        )
        .bind(now_ms())
        .bind(&body.certificate_id)
        .bind(&encoded)
        .bind(&request.tenant_id)
        .bind(&request.id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?
        .rows_affected();
        if updated == 1 {
            let minor = concerns_minor(&mut tx, &request.tenant_id, &request.person_pseudonym).await?;
            // The tombstone (R17): counts and key ids, never face data.
            let change = Change::new(&request.tenant_id, "face_deletion.fulfil", "face_deletion_request", &request.id)
                .estate(&request.estate_id)
                .person(&request.person_pseudonym, minor)
                .attr("certificate_id", body.certificate_id.clone())
                .attr("templates_deleted", body.templates_deleted.to_string())
                .attr("keys_destroyed", body.key_ids_destroyed.join(","))
                .attr("certificate_sha256", estate_crypto::sha256_hex(&certificate.body));
            outbox::record(&mut tx, &change.into_event(sweep_actor(), "", SOURCE)).await?;
            done += 1;
        }
        tx.commit().await.map_err(db_error)?;
    }
    Ok(done)
}

/// The retention sweep (R5): every person facematch holds templates for at
/// an estate whose enrolment consent is no longer active there (withdrawn,
/// ended, or unknown to consent) gets a deletion request, which is then
/// fulfilled like any other. Catches whatever an earlier hand-off missed.
pub async fn sweep_retention(db: &Db, matcher: &dyn FaceMatcher) -> Result<usize> {
    let scopes: Vec<(String, String)> = sqlx::query_as::<Any, (String, String)>(
        "SELECT DISTINCT tenant_id, estate_id FROM consents ORDER BY tenant_id, estate_id",
    )
    .fetch_all(db.pool())
    .await
    .map_err(db_error)?;
    let mut created = 0;
    for (tenant, estate) in scopes {
        let enrolled = match matcher.list_enrolled(&tenant, &estate).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "retention sweep: facematch unavailable for a tenant; will retry");
                continue;
            }
        };
        // One query per estate for the active consents, not one per person.
        let active: std::collections::HashSet<(String, String)> = sqlx::query_as::<Any, (String, String)>(
            "SELECT id, person_pseudonym FROM consents WHERE tenant_id = $1 AND estate_id = $2 AND status = $3",
        )
        .bind(&tenant)
        .bind(&estate)
        .bind(ACTIVE)
        .fetch_all(db.pool())
        .await
        .map_err(db_error)?
        .into_iter()
        .collect();
        for person in enrolled {
            if active.contains(&(person.consent_id.clone(), person.person_pseudonym.clone())) {
                continue;
            }
            let enrolled_at = person.enrolled_at.map_or(0, |t| t.seconds);
            let source = format!("retention:{estate}:{}:{}:{enrolled_at}", person.person_pseudonym, person.consent_id);
            let mut tx = db.begin().await?;
            let Some(request_id) = request_deletion(
                &mut tx,
                &tenant,
                &estate,
                &person.person_pseudonym,
                DeletionReason::RetentionExpired,
                &source,
            )
            .await?
            else {
                continue;
            };
            let minor = concerns_minor(&mut tx, &tenant, &person.person_pseudonym).await?;
            let change = Change::new(&tenant, "face_deletion.request", "face_deletion_request", &request_id)
                .estate(&estate)
                .person(&person.person_pseudonym, minor)
                .attr("reason", reason_name(DeletionReason::RetentionExpired));
            outbox::record(&mut tx, &change.into_event(sweep_actor(), "", SOURCE)).await?;
            tx.commit().await.map_err(db_error)?;
            created += 1;
        }
    }
    Ok(created)
}

/// Runs the sweep every `interval`, and at once when identity announces a
/// residency end on the bus; with facematch, also the retention sweep, the
/// hand-off of deletion requests and the copy of facematch's journal into
/// the audit outbox. Stops when the database pool is closed.
pub fn spawn_sweep(
    db: Db,
    bus: EventBus,
    interval: Duration,
    face: Option<Arc<dyn FaceMatcher>>,
) -> tokio::task::JoinHandle<()> {
    let eraser = face.clone().map(FacematchEraser);
    // The retention sweep asks facematch about every enrolled person; it is a
    // safety net, so it runs once a minute, not on every wake-up.
    let mut last_retention: Option<std::time::Instant> = None;
    let mut events = bus.subscribe();
    tokio::spawn(async move {
        loop {
            if db.pool().is_closed() {
                return;
            }
            if let Err(e) = sweep_residency_ends(&db).await {
                tracing::warn!(error = %e, "deletion sweep failed; will retry");
            }
            if let Some(face) = &face
                && last_retention.is_none_or(|t| t.elapsed() >= RETENTION_EVERY)
            {
                last_retention = Some(std::time::Instant::now());
                if let Err(e) = sweep_retention(&db, face.as_ref()).await {
                    tracing::warn!(error = %e, "retention sweep failed; will retry");
                }
            }
            if let Some(eraser) = &eraser
                && let Err(e) = fulfil_pending(&db, eraser).await
            {
                tracing::warn!(error = %e, "deletion hand-off failed; will retry");
            }
            if let Some(face) = &face
                && let Err(e) = crate::face_journal::import(&db, face.as_ref()).await
            {
                tracing::warn!(error = %e, "facematch journal copy failed; will retry");
            }
            estate_bus::wake_on_any(
                &mut events,
                &[estate_identity::RESIDENCY_ENDED_TOPIC, crate::service::CONSENT_WITHDRAWN_TOPIC],
                interval,
            )
            .await;
        }
    })
}

/// Requests of a tenant, optionally of one estate or only pending ones.
pub(crate) async fn list(db: &Db, tenant_id: &str, estate_id: &str, pending_only: bool) -> Result<Vec<DeletionRow>> {
    let mut sql = format!("SELECT {DELETION_COLS} FROM face_deletion_requests WHERE tenant_id = $1");
    if !estate_id.is_empty() {
        sql.push_str(" AND estate_id = $2");
    }
    if pending_only {
        sql.push_str(" AND fulfilled_at IS NULL");
    }
    sql.push_str(" ORDER BY requested_at, id LIMIT 1000");
    let mut q = sqlx::query_as::<Any, DeletionRow>(sqlx::AssertSqlSafe(sql)).bind(tenant_id);
    if !estate_id.is_empty() {
        q = q.bind(estate_id);
    }
    q.fetch_all(db.pool()).await.map_err(db_error)
}
