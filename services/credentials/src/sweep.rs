//! Move-out: when a person's last residency at an estate ends, their
//! credentials stop opening that estate's gates. Face consent ended: when a
//! person withdraws face consent at an estate (or it ends with their
//! residency), their face references there are revoked (R4, R5: the other
//! credentials keep working).
//!
//! Identity writes a `residency.end` outbox event (with `last_at_estate`) in
//! the transaction that ends the residency; this sweep reads those events
//! durably after a cursor (as consent's deletion sweep does) and, per event,
//! revokes the person's credentials that were valid only at that estate and
//! unlinks that estate from credentials valid at others. Each change is
//! audited in the same transaction and announced on the bus, so gates refresh
//! their cache and hear it on their change stream.

use crate::model::{REVOKED, kind_from_name};
use crate::service::CREDENTIAL_CHANGED_TOPIC;
use estate_bus::EventBus;
use estate_core::{Result, now_ms};
use estate_proto::common::{Actor, ActorKind, CredentialKind};
use estate_proto::credentials::{CredentialChanged, CredentialStatus};
use estate_store::outbox::{self, Change};
use estate_store::{Db, db_error};
use prost::Message;
use sqlx::Any;
use std::time::Duration;

const CURSOR: &str = "residency-end";
const BATCH: i64 = 200;
const SOURCE: &str = "credentials";

fn sweep_actor() -> Actor {
    Actor { kind: ActorKind::Service as i32, id: "credentials-residency-sweep".into() }
}

type Row = (String, String, String, i64, Option<String>);

/// The last outbox sequence the sweep named `name` has applied.
async fn cursor(db: &Db, name: &str) -> Result<i64> {
    let row: Option<(i64,)> =
        sqlx::query_as::<Any, (i64,)>("SELECT last_seq FROM credentials_sweep_cursor WHERE name = $1")
            .bind(name)
            .fetch_optional(db.pool())
            .await
            .map_err(db_error)?;
    Ok(row.map_or(0, |(s,)| s))
}

/// Moves the cursor `name` to `last`, in the transaction that applied the events.
async fn advance(tx: &mut sqlx::AnyConnection, name: &str, last: i64) -> Result<()> {
    sqlx::query::<Any>(
        "INSERT INTO credentials_sweep_cursor (name, last_seq) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET last_seq = excluded.last_seq",
    )
    .bind(name)
    .bind(last)
    .execute(tx)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Applies `residency.end` events after the cursor; returns the credentials
/// changed.
pub async fn sweep_residency_ends(db: &Db, bus: &EventBus) -> Result<usize> {
    let mut changed = 0;
    loop {
        let after = cursor(db, CURSOR).await?;
        let events = outbox::with_action_after(db.pool(), "residency.end", after, BATCH).await?;
        let Some(last) = events.last().map(|e| e.seq) else { return Ok(changed) };
        let mut announce = Vec::new();
        let mut tx = db.begin().await?;
        for row in &events {
            let ev = &row.event;
            if ev.attributes.get("last_at_estate").map(String::as_str) != Some("true") || ev.estate_id.is_empty() {
                continue;
            }
            let held: Vec<Row> = sqlx::query_as::<Any, Row>(
                "SELECT c.id, c.kind, c.status, c.version, c.lookup_hash FROM credentials c \
                 JOIN credential_estates ce ON ce.tenant_id = c.tenant_id AND ce.credential_id = c.id \
                 WHERE c.tenant_id = $1 AND c.person_pseudonym = $2 AND ce.estate_id = $3 AND c.status <> $4 \
                 ORDER BY c.id",
            )
            .bind(&ev.tenant_id)
            .bind(&ev.person_pseudonym)
            .bind(&ev.estate_id)
            .bind(REVOKED)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
            for (id, kind, _status, version, lookup_hash) in held {
                let (others,): (i64,) = sqlx::query_as::<Any, (i64,)>(
                    "SELECT COUNT(*) FROM credential_estates WHERE tenant_id = $1 AND credential_id = $2 AND estate_id <> $3",
                )
                .bind(&ev.tenant_id)
                .bind(&id)
                .bind(&ev.estate_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_error)?;
                let now = now_ms();
                let version = version + 1;
                let (action, change) = if others == 0 {
                    sqlx::query::<Any>(
                        "UPDATE credentials SET status = $1, version = $2, updated_at = $3 WHERE tenant_id = $4 AND id = $5",
                    )
                    .bind(REVOKED)
                    .bind(version)
                    .bind(now)
                    .bind(&ev.tenant_id)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                    ("credential.revoke", "revoke")
                } else {
                    sqlx::query::<Any>(
                        "DELETE FROM credential_estates WHERE tenant_id = $1 AND credential_id = $2 AND estate_id = $3",
                    )
                    .bind(&ev.tenant_id)
                    .bind(&id)
                    .bind(&ev.estate_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                    sqlx::query::<Any>(
                        "UPDATE credentials SET version = $1, updated_at = $2 WHERE tenant_id = $3 AND id = $4",
                    )
                    .bind(version)
                    .bind(now)
                    .bind(&ev.tenant_id)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                    ("credential.unlink_estate", "unlink")
                };
                let audit = Change::new(&ev.tenant_id, action, "credential", &id)
                    .estate(&ev.estate_id)
                    .person(&ev.person_pseudonym, ev.concerns_minor)
                    .attr("kind", kind.clone())
                    .attr("reason", "residency ended")
                    .attr("cause_event_id", ev.event_id.clone());
                outbox::record(&mut tx, &audit.into_event(sweep_actor(), &ev.request_id, SOURCE)).await?;
                // Gates of the estate left behind hear of it as a revocation:
                // the credential no longer opens them, whatever it does elsewhere.
                announce.push(CredentialChanged {
                    tenant_id: ev.tenant_id.clone(),
                    credential_id: id.clone(),
                    estate_ids: vec![ev.estate_id.clone()],
                    kind: kind_from_name(&kind).unwrap_or(CredentialKind::Unspecified) as i32,
                    status: CredentialStatus::Revoked as i32,
                    version,
                    change: change.to_owned(),
                    lookup_hash: lookup_hash.unwrap_or_default(),
                });
                changed += 1;
            }
        }
        advance(&mut tx, CURSOR, last).await?;
        tx.commit().await.map_err(db_error)?;
        for ev in announce {
            if let Err(e) = bus.publish(CREDENTIAL_CHANGED_TOPIC, ev.encode_to_vec()).await {
                tracing::warn!(error = %e, "move-out revocation not announced; gate caches expire by TTL");
            }
        }
    }
}

/// Consent events that end face processing for a person at an estate.
const FACE_CONSENT_ENDS: [&str; 2] = ["consent.withdraw", "face_deletion.request"];

/// Revokes face references of persons whose face consent ended (consent
/// withdrawn, or ended with their residency); returns the credentials revoked.
pub async fn sweep_face_consent_ends(db: &Db, bus: &EventBus) -> Result<usize> {
    let mut changed = 0;
    for action in FACE_CONSENT_ENDS {
        loop {
            let after = cursor(db, action).await?;
            let events = outbox::with_action_after(db.pool(), action, after, BATCH).await?;
            let Some(last) = events.last().map(|e| e.seq) else { break };
            let mut announce = Vec::new();
            let mut tx = db.begin().await?;
            for row in &events {
                let ev = &row.event;
                if ev.estate_id.is_empty() || ev.person_pseudonym.is_empty() {
                    continue;
                }
                let faces: Vec<(String, i64)> = sqlx::query_as::<Any, (String, i64)>(
                    "SELECT c.id, c.version FROM credentials c \
                     JOIN credential_estates ce ON ce.tenant_id = c.tenant_id AND ce.credential_id = c.id \
                     WHERE c.tenant_id = $1 AND c.person_pseudonym = $2 AND ce.estate_id = $3 AND c.kind = 'face' \
                     AND c.status <> $4 ORDER BY c.id",
                )
                .bind(&ev.tenant_id)
                .bind(&ev.person_pseudonym)
                .bind(&ev.estate_id)
                .bind(REVOKED)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
                for (id, version) in faces {
                    let version = version + 1;
                    sqlx::query::<Any>(
                        "UPDATE credentials SET status = $1, version = $2, updated_at = $3 WHERE tenant_id = $4 AND id = $5",
                    )
                    .bind(REVOKED)
                    .bind(version)
                    .bind(now_ms())
                    .bind(&ev.tenant_id)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                    let audit = Change::new(&ev.tenant_id, "credential.revoke", "credential", &id)
                        .estate(&ev.estate_id)
                        .person(&ev.person_pseudonym, ev.concerns_minor)
                        .attr("kind", "face")
                        .attr("reason", "face consent ended")
                        .attr("cause_event_id", ev.event_id.clone());
                    outbox::record(&mut tx, &audit.into_event(sweep_actor(), &ev.request_id, SOURCE)).await?;
                    announce.push(CredentialChanged {
                        tenant_id: ev.tenant_id.clone(),
                        credential_id: id,
                        estate_ids: vec![ev.estate_id.clone()],
                        kind: CredentialKind::Face as i32,
                        status: CredentialStatus::Revoked as i32,
                        version,
                        change: "revoke".into(),
                        lookup_hash: String::new(),
                    });
                    changed += 1;
                }
            }
            advance(&mut tx, action, last).await?;
            tx.commit().await.map_err(db_error)?;
            for ev in announce {
                if let Err(e) = bus.publish(CREDENTIAL_CHANGED_TOPIC, ev.encode_to_vec()).await {
                    tracing::warn!(error = %e, "face reference revocation not announced");
                }
            }
        }
    }
    Ok(changed)
}

/// Runs the sweep every `interval`, and at once when identity announces a
/// residency end. Stops when the database pool is closed.
pub fn spawn_sweep(db: Db, bus: EventBus, interval: Duration) -> tokio::task::JoinHandle<()> {
    let mut events = bus.subscribe();
    tokio::spawn(async move {
        loop {
            if db.pool().is_closed() {
                return;
            }
            if let Err(e) = sweep_residency_ends(&db, &bus).await {
                tracing::warn!(error = %e, "move-out sweep failed; will retry");
            }
            if let Err(e) = sweep_face_consent_ends(&db, &bus).await {
                tracing::warn!(error = %e, "face consent sweep failed; will retry");
            }
            estate_bus::wake_on(&mut events, estate_identity::RESIDENCY_ENDED_TOPIC, interval).await;
        }
    })
}
