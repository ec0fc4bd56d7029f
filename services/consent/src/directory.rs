//! Read-only consent facts for services that share consent's database (the
//! gate's face path asks whether the consent a face was enrolled under is
//! still active). Consent owns these tables; nobody else reads them directly.

use crate::model::ACTIVE;
use estate_core::Result;
use estate_store::{Db, db_error};
use sqlx::Any;

/// Whether consent `consent_id` of the tenant is active and given for
/// `estate_id` (R3, R4: a withdrawn or ended consent, or one for another
/// estate, does not let a face through).
pub async fn is_active_at(db: &Db, tenant_id: &str, consent_id: &str, estate_id: &str) -> Result<bool> {
    let row: Option<(String, String)> = sqlx::query_as::<Any, (String, String)>(
        "SELECT status, estate_id FROM consents WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant_id)
    .bind(consent_id)
    .fetch_optional(db.pool())
    .await
    .map_err(db_error)?;
    Ok(row.is_some_and(|(status, estate)| status == ACTIVE && estate == estate_id))
}
