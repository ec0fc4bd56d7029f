//! Read-only credential facts for the gate service, which shares the
//! credentials service's database: the hot-path cache is filled from here on
//! a miss, offline bundles are built from here, and stale bundles are found
//! from here. Credentials owns these tables; nobody else writes them.

use crate::model::{ACTIVE, CREDENTIAL_COLS, CredentialRow, kind_from_name};
use estate_core::Result;
use estate_proto::common::CredentialKind;
use estate_store::{Db, db_error};
use sqlx::{Any, AnyConnection};

/// What a gate needs to decide on a card or visitor code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialFacts {
    /// Credential id.
    pub id: String,
    /// Pseudonymous id of the holder (R17).
    pub person_pseudonym: String,
    /// Kind.
    pub kind: CredentialKind,
    /// "active", "suspended" or "revoked".
    pub status: String,
    /// Valid from (ms).
    pub valid_from: i64,
    /// Valid until (ms), if bounded.
    pub valid_until: Option<i64>,
    /// Increases with every change.
    pub version: i64,
    /// Estates where it is valid.
    pub estate_ids: Vec<String>,
}

async fn estates(conn: &mut AnyConnection, tenant_id: &str, id: &str) -> Result<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as::<Any, (String,)>(
        "SELECT estate_id FROM credential_estates WHERE tenant_id = $1 AND credential_id = $2 ORDER BY estate_id",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok(rows.into_iter().map(|(e,)| e).collect())
}

async fn facts_of(conn: &mut AnyConnection, row: CredentialRow) -> Result<CredentialFacts> {
    let estate_ids = estates(conn, &row.tenant_id, &row.id).await?;
    Ok(CredentialFacts {
        kind: kind_from_name(&row.kind).unwrap_or(CredentialKind::Unspecified),
        id: row.id,
        person_pseudonym: row.person_pseudonym,
        status: row.status,
        valid_from: row.valid_from,
        valid_until: row.valid_until,
        version: row.version,
        estate_ids,
    })
}

/// The credential a tenant-wide lookup hash (card or visitor code) names:
/// the live one if any, else the most recently changed revoked one.
pub async fn by_lookup_hash(db: &Db, tenant_id: &str, hash: &str) -> Result<Option<CredentialFacts>> {
    let mut conn = db.pool().acquire().await.map_err(db_error)?;
    let row = sqlx::query_as::<Any, CredentialRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {CREDENTIAL_COLS} FROM credentials WHERE tenant_id = $1 AND lookup_hash = $2 \
         ORDER BY CASE WHEN status = 'revoked' THEN 1 ELSE 0 END, updated_at DESC LIMIT 1"
    )))
    .bind(tenant_id)
    .bind(hash)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    match row {
        Some(r) => Ok(Some(facts_of(&mut conn, r).await?)),
        None => Ok(None),
    }
}

/// The face reference of a person valid at an estate: the live one if any,
/// else the most recently changed one (so that a revoked or suspended face
/// reference gives its precise reason).
pub async fn face_of(
    db: &Db,
    tenant_id: &str,
    person_pseudonym: &str,
    estate_id: &str,
) -> Result<Option<CredentialFacts>> {
    let mut conn = db.pool().acquire().await.map_err(db_error)?;
    let row = sqlx::query_as::<Any, CredentialRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {CREDENTIAL_COLS} FROM credentials c WHERE c.tenant_id = $1 AND c.person_pseudonym = $2 AND c.kind = 'face' \
         AND EXISTS (SELECT 1 FROM credential_estates x WHERE x.tenant_id = c.tenant_id AND x.credential_id = c.id AND x.estate_id = $3) \
         ORDER BY CASE WHEN c.status = 'active' THEN 0 WHEN c.status = 'suspended' THEN 1 ELSE 2 END, c.updated_at DESC LIMIT 1"
    )))
    .bind(tenant_id)
    .bind(person_pseudonym)
    .bind(estate_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    match row {
        Some(r) => Ok(Some(facts_of(&mut conn, r).await?)),
        None => Ok(None),
    }
}

/// One line of an offline bundle: a live card or visitor pass of the estate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineEntry {
    /// Credential id.
    pub id: String,
    /// Card or visitor.
    pub kind: CredentialKind,
    /// Hash under the estate's offline key.
    pub offline_hash: String,
    /// Pseudonymous id of the holder.
    pub person_pseudonym: String,
    /// Valid from (ms).
    pub valid_from: i64,
    /// Valid until (ms), if bounded.
    pub valid_until: Option<i64>,
    /// Visitor entries left.
    pub entries_left: i64,
    /// Version.
    pub version: i64,
}

/// The estate's active cards and visitor passes that can still become or be
/// valid (not expired at `now_ms`), with their offline hashes.
pub async fn offline_entries(db: &Db, tenant_id: &str, estate_id: &str, now_ms: i64) -> Result<Vec<OfflineEntry>> {
    type Row = (String, String, String, String, i64, Option<i64>, Option<i64>, i64, i64);
    let rows: Vec<Row> = sqlx::query_as::<Any, Row>(
        "SELECT c.id, c.kind, ce.offline_hash, c.person_pseudonym, c.valid_from, c.valid_until, c.max_entries, \
         c.entries_used, c.version \
         FROM credential_estates ce JOIN credentials c ON c.tenant_id = ce.tenant_id AND c.id = ce.credential_id \
         WHERE ce.tenant_id = $1 AND ce.estate_id = $2 AND ce.offline_hash IS NOT NULL AND c.status = $3 \
         AND (c.valid_until IS NULL OR c.valid_until > $4) ORDER BY c.id",
    )
    .bind(tenant_id)
    .bind(estate_id)
    .bind(ACTIVE)
    .bind(now_ms)
    .fetch_all(db.pool())
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, kind, hash, pseudonym, from, until, max, used, version)| {
            let kind = kind_from_name(&kind)?;
            let entries_left = match kind {
                CredentialKind::Visitor => (max.unwrap_or(0) - used).max(0),
                _ => 0,
            };
            if kind == CredentialKind::Visitor && entries_left == 0 {
                return None;
            }
            Some(OfflineEntry {
                id,
                kind,
                offline_hash: hash,
                person_pseudonym: pseudonym,
                valid_from: from,
                valid_until: until,
                entries_left,
                version,
            })
        })
        .collect())
}

/// Which of `ids` are no longer active (revoked or suspended).
pub async fn not_active_among(db: &Db, tenant_id: &str, ids: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(500) {
        let mut sql = String::from("SELECT id FROM credentials WHERE tenant_id = $1 AND status <> $2 AND id IN (");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", i + 3));
        }
        sql.push_str(") ORDER BY id");
        let mut q = sqlx::query_as::<Any, (String,)>(sqlx::AssertSqlSafe(sql)).bind(tenant_id).bind(ACTIVE);
        for id in chunk {
            q = q.bind(id.as_str());
        }
        out.extend(q.fetch_all(db.pool()).await.map_err(db_error)?.into_iter().map(|(id,)| id));
    }
    Ok(out)
}

/// The holder's pseudonym and kind of credential `id`, if it exists.
pub async fn holder_of(db: &Db, tenant_id: &str, id: &str) -> Result<Option<(String, CredentialKind)>> {
    let row: Option<(String, String)> = sqlx::query_as::<Any, (String, String)>(
        "SELECT person_pseudonym, kind FROM credentials WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(db.pool())
    .await
    .map_err(db_error)?;
    Ok(row.map(|(p, k)| (p, kind_from_name(&k).unwrap_or(CredentialKind::Unspecified))))
}

/// Kinds the estate's gates accept (its policy, or the defaults).
pub async fn accepted_kinds(db: &Db, tenant_id: &str, estate_id: &str) -> Result<Vec<CredentialKind>> {
    let row: Option<(String,)> = sqlx::query_as::<Any, (String,)>(
        "SELECT accepted_kinds FROM estate_policies WHERE tenant_id = $1 AND estate_id = $2",
    )
    .bind(tenant_id)
    .bind(estate_id)
    .fetch_optional(db.pool())
    .await
    .map_err(db_error)?;
    Ok(match row {
        Some((names,)) => names.split(',').filter_map(kind_from_name).collect(),
        None => crate::service::DEFAULT_ACCEPTED.to_vec(),
    })
}
