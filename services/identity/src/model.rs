//! Rows as stored and their protobuf form.

use estate_core::{BirthDate, ms_to_timestamp_parts};
use estate_proto::common::{CredentialKind, RecordStatus};
use estate_proto::identity::{
    Estate, Gate, GateDirection, Person, Residency, ResidencyRole, ResidencyStatus, Tenant, Unit,
};
use prost_types::Timestamp;

pub(crate) const ACTIVE: &str = "active";
pub(crate) const DEACTIVATED: &str = "deactivated";
pub(crate) const ENDED: &str = "ended";

pub(crate) fn ts(ms: i64) -> Option<Timestamp> {
    let (seconds, nanos) = ms_to_timestamp_parts(ms);
    Some(Timestamp { seconds, nanos })
}

pub(crate) fn ms_of(t: &Timestamp) -> i64 {
    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos.clamp(0, 999_999_999) / 1_000_000))
}

fn record_status(s: &str) -> i32 {
    match s {
        ACTIVE => RecordStatus::Active as i32,
        _ => RecordStatus::Deactivated as i32,
    }
}

/// Stored names of credential kinds.
pub(crate) fn kind_name(kind: CredentialKind) -> Option<&'static str> {
    match kind {
        CredentialKind::Card => Some("card"),
        CredentialKind::Pin => Some("pin"),
        CredentialKind::Qr => Some("qr"),
        CredentialKind::Visitor => Some("visitor"),
        CredentialKind::Face => Some("face"),
        CredentialKind::Unspecified => None,
    }
}

fn kind_from_name(name: &str) -> Option<CredentialKind> {
    match name {
        "card" => Some(CredentialKind::Card),
        "pin" => Some(CredentialKind::Pin),
        "qr" => Some(CredentialKind::Qr),
        "visitor" => Some(CredentialKind::Visitor),
        "face" => Some(CredentialKind::Face),
        _ => None,
    }
}

pub(crate) fn direction_name(d: GateDirection) -> Option<&'static str> {
    match d {
        GateDirection::In => Some("in"),
        GateDirection::Out => Some("out"),
        GateDirection::Both => Some("both"),
        GateDirection::Unspecified => None,
    }
}

fn direction_from_name(name: &str) -> GateDirection {
    match name {
        "in" => GateDirection::In,
        "out" => GateDirection::Out,
        "both" => GateDirection::Both,
        _ => GateDirection::Unspecified,
    }
}

pub(crate) fn role_name(r: ResidencyRole) -> Option<&'static str> {
    match r {
        ResidencyRole::Owner => Some("owner"),
        ResidencyRole::Occupant => Some("occupant"),
        ResidencyRole::Renter => Some("renter"),
        ResidencyRole::Staff => Some("staff"),
        ResidencyRole::Unspecified => None,
    }
}

fn role_from_name(name: &str) -> ResidencyRole {
    match name {
        "owner" => ResidencyRole::Owner,
        "occupant" => ResidencyRole::Occupant,
        "renter" => ResidencyRole::Renter,
        "staff" => ResidencyRole::Staff,
        _ => ResidencyRole::Unspecified,
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct TenantRow {
    pub id: String,
    pub name: String,
    pub jurisdiction_code: String,
    pub status: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<TenantRow> for Tenant {
    fn from(r: TenantRow) -> Self {
        Tenant {
            id: r.id,
            name: r.name,
            jurisdiction_code: r.jurisdiction_code,
            status: record_status(&r.status),
            created_at: ts(r.created_at),
            updated_at: ts(r.updated_at),
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct EstateRow {
    pub tenant_id: String,
    pub id: String,
    pub name: String,
    pub address: String,
    pub jurisdiction_code: String,
    pub status: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<EstateRow> for Estate {
    fn from(r: EstateRow) -> Self {
        Estate {
            id: r.id,
            tenant_id: r.tenant_id,
            name: r.name,
            address: r.address,
            jurisdiction_code: r.jurisdiction_code,
            status: record_status(&r.status),
            created_at: ts(r.created_at),
            updated_at: ts(r.updated_at),
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct GateRow {
    pub tenant_id: String,
    pub id: String,
    pub estate_id: String,
    pub name: String,
    pub direction: String,
    pub supported_kinds: String,
    pub status: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<GateRow> for Gate {
    fn from(r: GateRow) -> Self {
        Gate {
            id: r.id,
            tenant_id: r.tenant_id,
            estate_id: r.estate_id,
            name: r.name,
            direction: direction_from_name(&r.direction) as i32,
            supported_kinds: r.supported_kinds.split(',').filter_map(kind_from_name).map(|k| k as i32).collect(),
            status: record_status(&r.status),
            created_at: ts(r.created_at),
            updated_at: ts(r.updated_at),
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct UnitRow {
    pub tenant_id: String,
    pub id: String,
    pub estate_id: String,
    pub building: String,
    pub entrance: String,
    pub room: String,
    pub status: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<UnitRow> for Unit {
    fn from(r: UnitRow) -> Self {
        Unit {
            id: r.id,
            tenant_id: r.tenant_id,
            estate_id: r.estate_id,
            building: r.building,
            unit: r.entrance,
            room: r.room,
            status: record_status(&r.status),
            created_at: ts(r.created_at),
            updated_at: ts(r.updated_at),
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct PersonRow {
    pub tenant_id: String,
    pub id: String,
    pub display_name: String,
    pub phone_hash: String,
    pub phone_last4: String,
    pub birth_date: String,
    pub guardian_person_id: Option<String>,
    pub pseudonym: String,
    pub status: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl PersonRow {
    /// Under 14 today (R7). Unknown birth dates count as adult here; the
    /// consent service asks for a birth date before face enrolment.
    pub(crate) fn is_minor(&self) -> bool {
        if self.birth_date.is_empty() {
            return false;
        }
        BirthDate::parse("birth_date", &self.birth_date).is_ok_and(BirthDate::is_minor_today)
    }
}

impl From<PersonRow> for Person {
    fn from(r: PersonRow) -> Self {
        let is_minor = r.is_minor();
        Person {
            id: r.id,
            tenant_id: r.tenant_id,
            display_name: r.display_name,
            phone_last4: r.phone_last4,
            birth_date: r.birth_date,
            is_minor,
            guardian_person_id: r.guardian_person_id.unwrap_or_default(),
            pseudonym: r.pseudonym,
            status: record_status(&r.status),
            created_at: ts(r.created_at),
            updated_at: ts(r.updated_at),
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ResidencyRow {
    pub tenant_id: String,
    pub id: String,
    pub person_id: String,
    pub unit_id: String,
    pub estate_id: String,
    pub role: String,
    pub valid_from: i64,
    pub valid_until: Option<i64>,
    pub status: String,
    pub end_reason: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<ResidencyRow> for Residency {
    fn from(r: ResidencyRow) -> Self {
        Residency {
            id: r.id,
            tenant_id: r.tenant_id,
            person_id: r.person_id,
            unit_id: r.unit_id,
            estate_id: r.estate_id,
            role: role_from_name(&r.role) as i32,
            valid_from: ts(r.valid_from),
            valid_until: r.valid_until.and_then(ts),
            status: if r.status == ENDED { ResidencyStatus::Ended as i32 } else { ResidencyStatus::Active as i32 },
            end_reason: r.end_reason,
            created_at: ts(r.created_at),
            updated_at: ts(r.updated_at),
        }
    }
}
