//! Read-only facts about persons and estates that other services of the mesh
//! need (consent: is this person a minor, who is their guardian, do they live
//! at this estate). Identity owns these tables; other services read them only
//! through this module, on the database they share with identity.

use crate::model::{ACTIVE, EstateRow, PersonRow};
use estate_core::Result;
use estate_store::{Db, db_error};
use sqlx::Any;

/// What other services may know about a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonFacts {
    /// Person id.
    pub id: String,
    /// Pseudonymous id (R17).
    pub pseudonym: String,
    /// Whether the birth date is recorded.
    pub birth_date_known: bool,
    /// Under 14 today (R7).
    pub is_minor: bool,
    /// The linked guardian, if any.
    pub guardian_person_id: Option<String>,
    /// Whether the record is active.
    pub active: bool,
}

/// The person `person_id` of `tenant_id`, if it exists.
pub async fn person(db: &Db, tenant_id: &str, person_id: &str) -> Result<Option<PersonFacts>> {
    let row = sqlx::query_as::<Any, PersonRow>(
        "SELECT tenant_id, id, display_name, phone_hash, phone_last4, birth_date, guardian_person_id, pseudonym, \
         status, created_at, updated_at FROM persons WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant_id)
    .bind(person_id)
    .fetch_optional(db.pool())
    .await
    .map_err(db_error)?;
    Ok(row.map(|p| PersonFacts {
        is_minor: p.is_minor(),
        birth_date_known: !p.birth_date.is_empty(),
        active: p.status == ACTIVE,
        id: p.id,
        pseudonym: p.pseudonym,
        guardian_person_id: p.guardian_person_id,
    }))
}

/// Whether the person has an active residency at the estate.
pub async fn resides_at(db: &Db, tenant_id: &str, person_id: &str, estate_id: &str) -> Result<bool> {
    let (n,): (i64,) = sqlx::query_as::<Any, (i64,)>(
        "SELECT COUNT(*) FROM residencies WHERE tenant_id = $1 AND person_id = $2 AND estate_id = $3 AND status = 'active'",
    )
    .bind(tenant_id)
    .bind(person_id)
    .bind(estate_id)
    .fetch_one(db.pool())
    .await
    .map_err(db_error)?;
    Ok(n > 0)
}

/// Whether the estate exists and is active in the tenant.
pub async fn estate_is_active(db: &Db, tenant_id: &str, estate_id: &str) -> Result<Option<bool>> {
    let row = sqlx::query_as::<Any, EstateRow>(
        "SELECT tenant_id, id, name, address, jurisdiction_code, status, created_at, updated_at FROM estates \
         WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant_id)
    .bind(estate_id)
    .fetch_optional(db.pool())
    .await
    .map_err(db_error)?;
    Ok(row.map(|e| e.status == ACTIVE))
}

/// Ids of the active persons whose linked guardian is `guardian_id`.
pub async fn wards_of(db: &Db, tenant_id: &str, guardian_id: &str) -> Result<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as::<Any, (String,)>(
        "SELECT id FROM persons WHERE tenant_id = $1 AND guardian_person_id = $2 AND status = 'active' ORDER BY id",
    )
    .bind(tenant_id)
    .bind(guardian_id)
    .fetch_all(db.pool())
    .await
    .map_err(db_error)?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// An active gate and the credential kinds its hardware reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateFacts {
    /// Gate id.
    pub id: String,
    /// Gate name, for messages to operators.
    pub name: String,
    /// Stored kind names: "card", "pin", "qr", "visitor", "face".
    pub kinds: Vec<String>,
}

/// The active gates of an estate.
pub async fn gates_of_estate(db: &Db, tenant_id: &str, estate_id: &str) -> Result<Vec<GateFacts>> {
    let rows: Vec<(String, String, String)> = sqlx::query_as::<Any, (String, String, String)>(
        "SELECT id, name, supported_kinds FROM gates WHERE tenant_id = $1 AND estate_id = $2 AND status = 'active' ORDER BY id",
    )
    .bind(tenant_id)
    .bind(estate_id)
    .fetch_all(db.pool())
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(id, name, kinds)| GateFacts { id, name, kinds: kinds.split(',').map(str::to_owned).collect() })
        .collect())
}

/// The units where the person has an active residency at the estate.
pub async fn units_at_estate(db: &Db, tenant_id: &str, person_id: &str, estate_id: &str) -> Result<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as::<Any, (String,)>(
        "SELECT unit_id FROM residencies WHERE tenant_id = $1 AND person_id = $2 AND estate_id = $3 AND status = 'active' ORDER BY id",
    )
    .bind(tenant_id)
    .bind(person_id)
    .bind(estate_id)
    .fetch_all(db.pool())
    .await
    .map_err(db_error)?;
    Ok(rows.into_iter().map(|(u,)| u).collect())
}

/// The estate of a unit, if the unit exists in the tenant.
pub async fn estate_of_unit(db: &Db, tenant_id: &str, unit_id: &str) -> Result<Option<String>> {
    let row: Option<(String,)> =
        sqlx::query_as::<Any, (String,)>("SELECT estate_id FROM units WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id)
            .bind(unit_id)
            .fetch_optional(db.pool())
            .await
            .map_err(db_error)?;
    Ok(row.map(|(e,)| e))
}

/// The jurisdiction code of a tenant, if it exists.
pub async fn tenant_jurisdiction(db: &Db, tenant_id: &str) -> Result<Option<String>> {
    let row: Option<(String,)> =
        sqlx::query_as::<Any, (String,)>("SELECT jurisdiction_code FROM tenants WHERE id = $1")
            .bind(tenant_id)
            .fetch_optional(db.pool())
            .await
            .map_err(db_error)?;
    Ok(row.map(|(j,)| j))
}

/// What the gate service needs to know about one gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateInfo {
    /// Gate id.
    pub id: String,
    /// The estate it belongs to.
    pub estate_id: String,
    /// Gate name.
    pub name: String,
    /// "in", "out" or "both".
    pub direction: String,
    /// Stored kind names the hardware reads.
    pub kinds: Vec<String>,
    /// Whether the gate is active (and its estate too).
    pub active: bool,
}

/// The gate `gate_id` of `tenant_id`, if it exists. A gate of a deactivated
/// estate counts as inactive.
pub async fn gate(db: &Db, tenant_id: &str, gate_id: &str) -> Result<Option<GateInfo>> {
    let row: Option<(String, String, String, String, String, String)> =
        sqlx::query_as::<Any, (String, String, String, String, String, String)>(
            "SELECT g.id, g.estate_id, g.name, g.direction, g.supported_kinds, \
             CASE WHEN g.status = 'active' AND e.status = 'active' THEN 'active' ELSE 'inactive' END \
             FROM gates g JOIN estates e ON e.tenant_id = g.tenant_id AND e.id = g.estate_id \
             WHERE g.tenant_id = $1 AND g.id = $2",
        )
        .bind(tenant_id)
        .bind(gate_id)
        .fetch_optional(db.pool())
        .await
        .map_err(db_error)?;
    Ok(row.map(|(id, estate_id, name, direction, kinds, status)| GateInfo {
        id,
        estate_id,
        name,
        direction,
        kinds: kinds.split(',').filter(|k| !k.is_empty()).map(str::to_owned).collect(),
        active: status == ACTIVE,
    }))
}

/// Every gate of an estate, active or not, as (id, name).
pub async fn all_gates_of_estate(db: &Db, tenant_id: &str, estate_id: &str) -> Result<Vec<(String, String)>> {
    sqlx::query_as::<Any, (String, String)>(
        "SELECT id, name FROM gates WHERE tenant_id = $1 AND estate_id = $2 ORDER BY id",
    )
    .bind(tenant_id)
    .bind(estate_id)
    .fetch_all(db.pool())
    .await
    .map_err(db_error)
}
