//! Credential rows and their protobuf form.

use estate_core::ms_to_timestamp_parts;
use estate_proto::common::CredentialKind;
use estate_proto::credentials::{Credential, CredentialStatus};
use prost_types::Timestamp;

pub(crate) const ACTIVE: &str = "active";
pub(crate) const SUSPENDED: &str = "suspended";
pub(crate) const REVOKED: &str = "revoked";

pub(crate) fn ts(ms: i64) -> Option<Timestamp> {
    let (seconds, nanos) = ms_to_timestamp_parts(ms);
    Some(Timestamp { seconds, nanos })
}

pub(crate) fn ms_of(t: &Timestamp) -> i64 {
    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos.clamp(0, 999_999_999) / 1_000_000))
}

/// The stored name of a credential kind ("card", "pin", …).
pub fn kind_name(kind: CredentialKind) -> Option<&'static str> {
    match kind {
        CredentialKind::Card => Some("card"),
        CredentialKind::Pin => Some("pin"),
        CredentialKind::Qr => Some("qr"),
        CredentialKind::Visitor => Some("visitor"),
        CredentialKind::Face => Some("face"),
        CredentialKind::Unspecified => None,
    }
}

/// The kind a stored name names.
pub fn kind_from_name(name: &str) -> Option<CredentialKind> {
    match name {
        "card" => Some(CredentialKind::Card),
        "pin" => Some(CredentialKind::Pin),
        "qr" => Some(CredentialKind::Qr),
        "visitor" => Some(CredentialKind::Visitor),
        "face" => Some(CredentialKind::Face),
        _ => None,
    }
}

pub(crate) fn status_of(name: &str) -> CredentialStatus {
    match name {
        ACTIVE => CredentialStatus::Active,
        SUSPENDED => CredentialStatus::Suspended,
        _ => CredentialStatus::Revoked,
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct CredentialRow {
    pub tenant_id: String,
    pub id: String,
    pub person_id: String,
    pub person_pseudonym: String,
    pub kind: String,
    pub status: String,
    pub valid_from: i64,
    pub valid_until: Option<i64>,
    pub label: String,
    pub lookup_hash: Option<String>,
    pub pin_hash: Option<String>,
    pub unit_id: Option<String>,
    pub sealed_secret: Option<String>,
    pub qr_last_step: Option<i64>,
    pub max_entries: Option<i64>,
    pub entries_used: i64,
    pub host_person_id: Option<String>,
    pub face_enrolment_ref: Option<String>,
    pub consent_id: Option<String>,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

pub(crate) const CREDENTIAL_COLS: &str = "tenant_id, id, person_id, person_pseudonym, kind, status, valid_from, \
     valid_until, label, lookup_hash, pin_hash, unit_id, sealed_secret, qr_last_step, max_entries, entries_used, \
     host_person_id, face_enrolment_ref, consent_id, version, created_at, updated_at";

impl CredentialRow {
    pub(crate) fn kind(&self) -> CredentialKind {
        kind_from_name(&self.kind).unwrap_or(CredentialKind::Unspecified)
    }

    pub(crate) fn to_proto(&self, estate_ids: Vec<String>) -> Credential {
        Credential {
            id: self.id.clone(),
            tenant_id: self.tenant_id.clone(),
            person_id: self.person_id.clone(),
            person_pseudonym: self.person_pseudonym.clone(),
            kind: self.kind() as i32,
            estate_ids,
            status: status_of(&self.status) as i32,
            valid_from: ts(self.valid_from),
            valid_until: self.valid_until.and_then(ts),
            label: self.label.clone(),
            unit_id: self.unit_id.clone().unwrap_or_default(),
            max_entries: i32::try_from(self.max_entries.unwrap_or(0)).unwrap_or(i32::MAX),
            entries_used: i32::try_from(self.entries_used).unwrap_or(i32::MAX),
            host_person_id: self.host_person_id.clone().unwrap_or_default(),
            face_enrolment_ref: self.face_enrolment_ref.clone().unwrap_or_default(),
            consent_id: self.consent_id.clone().unwrap_or_default(),
            version: self.version,
            created_at: ts(self.created_at),
            updated_at: ts(self.updated_at),
        }
    }
}
