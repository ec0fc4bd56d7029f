//! Facematch's journal into the mesh's audit log (R11). Facematch records an
//! event for every enrolment, deletion, threshold change and search by staff
//! in its own database, but reaches no other service (R9); consent — the
//! service that already talks to it about deletions — reads the journal of
//! each tenant and copies the events into its outbox, from where the relay
//! ships them like any other. Event ids make the copy idempotent (a retry, or
//! two consent replicas at once, records each event once); a cursor per
//! tenant remembers how far the copy got.
//!
//! What facematch cannot know, consent adds: whether the person is a minor
//! (R7). What a compromised or misconfigured facematch could forge, consent
//! refuses: events of another tenant, or anything but `face.*` actions.

use crate::deletion::concerns_minor;
use estate_core::Result;
use estate_facematch::FaceMatcher;
use estate_store::{Db, db_error, outbox};
use sqlx::Any;

/// Entries per read.
const PAGE: u32 = 500;

fn cursor_name(tenant_id: &str) -> String {
    format!("facematch_journal:{tenant_id}")
}

/// Copies new journal entries of every tenant with consents; returns how many
/// events were recorded. A tenant whose facematch does not answer is skipped
/// (and retried next time).
pub async fn import(db: &Db, matcher: &dyn FaceMatcher) -> Result<usize> {
    // Enrolment needs a consent attestation, so a tenant without consents
    // has no journal worth asking for.
    let tenants: Vec<(String,)> =
        sqlx::query_as::<Any, (String,)>("SELECT DISTINCT tenant_id FROM consents ORDER BY tenant_id")
            .fetch_all(db.pool())
            .await
            .map_err(db_error)?;
    let mut recorded = 0;
    for (tenant,) in tenants {
        match import_tenant(db, matcher, &tenant).await {
            Ok(n) => recorded += n,
            Err(e) => tracing::warn!(error = %e, "facematch journal: not read for a tenant; will retry"),
        }
    }
    Ok(recorded)
}

async fn import_tenant(db: &Db, matcher: &dyn FaceMatcher, tenant: &str) -> Result<usize> {
    let name = cursor_name(tenant);
    let mut recorded = 0;
    loop {
        let cursor: Option<(i64,)> =
            sqlx::query_as::<Any, (i64,)>("SELECT last_seq FROM consent_sweep_cursor WHERE name = $1")
                .bind(&name)
                .fetch_optional(db.pool())
                .await
                .map_err(db_error)?;
        let after = cursor.map_or(0, |(s,)| s);
        let entries = matcher.journal(tenant, after, PAGE).await?;
        let Some(last) = entries.iter().map(|e| e.seq).max() else { return Ok(recorded) };
        let mut tx = db.begin().await?;
        for entry in &entries {
            let Some(mut event) = entry.event.clone() else { continue };
            if event.tenant_id != tenant || !event.action.starts_with("face.") || event.event_id.is_empty() {
                tracing::warn!(seq = entry.seq, "facematch journal: an entry of another tenant or kind was refused");
                continue;
            }
            if !event.person_pseudonym.is_empty() {
                event.concerns_minor = concerns_minor(&mut tx, tenant, &event.person_pseudonym).await?;
            }
            if outbox::record_once(&mut tx, &event).await? {
                recorded += 1;
            }
        }
        // Never backwards: another replica may have copied further meanwhile.
        sqlx::query::<Any>(
            "INSERT INTO consent_sweep_cursor (name, last_seq) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET last_seq = CASE WHEN excluded.last_seq > consent_sweep_cursor.last_seq \
             THEN excluded.last_seq ELSE consent_sweep_cursor.last_seq END",
        )
        .bind(&name)
        .bind(last)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        if entries.len() < PAGE as usize {
            return Ok(recorded);
        }
    }
}
