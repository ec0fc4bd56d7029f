//! The engine's journal (R11): an audit event for every enrolment, deletion,
//! threshold change and search by staff, written in the transaction that
//! made the change. Facematch reaches no other service (R9), so it does not
//! ship these events itself: the consent service reads them with
//! `ReadJournal` and records them in the mesh's audit outbox, deduplicated by
//! event id. Events carry pseudonyms and ids only (R17).

use estate_auth::{Caller, Principal};
use estate_core::{Error, Result, now_ms};
use estate_proto::common::{Actor, ActorKind, AuditEvent};
use estate_proto::facematch::JournalEntry;
use estate_store::{Db, db_error};
use prost::Message;
use sqlx::{Any, AnyConnection};

/// The `source` of the events facematch records.
pub const SOURCE: &str = "facematch";

/// Most entries one read returns.
pub const MAX_READ: u32 = 1000;

/// The actor of a call. A resident is named by the pseudonym their
/// attestation carries (`resident_pseudonym`): facematch never learns person
/// ids, and the engine has checked that the attestation names that person.
pub fn actor_of(caller: &Caller, resident_pseudonym: &str) -> Actor {
    let (kind, id) = match &caller.principal {
        Principal::PlatformAdmin => (ActorKind::PlatformAdmin, caller.subject.clone()),
        Principal::Operator { .. } => (ActorKind::Operator, caller.subject.clone()),
        Principal::Gate { gate_id, .. } => (ActorKind::Gate, gate_id.clone()),
        Principal::Resident { .. } => (ActorKind::Resident, resident_pseudonym.to_owned()),
        Principal::Regulator { .. } => (ActorKind::Regulator, caller.subject.clone()),
        Principal::Service { name } => (ActorKind::Service, name.clone()),
    };
    Actor { kind: kind as i32, id }
}

/// The actor of calls made in-process by another service of the mesh.
pub fn service_actor(name: &str) -> Actor {
    Actor { kind: ActorKind::Service as i32, id: name.to_owned() }
}

/// Writes `event` on `conn` (a transaction of the change it describes).
pub async fn record(conn: &mut AnyConnection, event: &AuditEvent) -> Result<()> {
    sqlx::query::<Any>("INSERT INTO fm_journal (event_id, payload, recorded_at) VALUES ($1, $2, $3)")
        .bind(event.event_id.as_str())
        .bind(event.encode_to_vec())
        .bind(now_ms())
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// Entries after `after_seq`, oldest first, at most `limit` (0: 500).
pub async fn read(db: &Db, after_seq: i64, limit: u32) -> Result<Vec<JournalEntry>> {
    if after_seq < 0 {
        return Err(Error::invalid("after_seq", "must be 0 or a sequence number returned earlier"));
    }
    if limit > MAX_READ {
        return Err(Error::invalid("limit", format!("at most {MAX_READ} entries per read")));
    }
    let limit = if limit == 0 { 500 } else { limit };
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as::<Any, (i64, Vec<u8>)>(
        "SELECT seq, payload FROM fm_journal WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after_seq)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(db_error)?;
    rows.into_iter()
        .map(|(seq, payload)| {
            let event = AuditEvent::decode(payload.as_slice())
                .map_err(|e| Error::Internal(format!("facematch journal entry {seq}: {e}")))?;
            Ok(JournalEntry { seq, event: Some(event) })
        })
        .collect()
}
