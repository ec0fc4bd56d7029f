//! The `estate.credentials.v1.CredentialService` implementation.
//!
//! - R1: an estate policy always accepts a non-face kind that every gate of
//!   the estate can read; face-only policies are refused.
//! - R2: `RequestAlternative` always issues a working non-face credential at
//!   once; the operator only chooses which kinds are offered.
//! - R4: nothing here depends on face consent except face references.
//! - Secrets never in clear: cards and visitor codes as keyed hashes, PINs as
//!   argon2id, QR seeds sealed (AES-256-GCM); none is logged or returned
//!   except once, at issue, to the holder.
//! - R14 tenant from the token; R17 pseudonyms in audit events.

use crate::limiter::PinLimiter;
use crate::model::*;
use crate::totp;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use estate_attestation::{Expected, KeySet};
use estate_auth::{Caller, Principal};
use estate_bus::EventBus;
use estate_core::{Error, Result, bounded_text, new_id, now_ms, parse_id};
use estate_crypto::{KeyedHasher, SecretBox};
use estate_identity::directory;
use estate_proto::common::CredentialKind;
use estate_proto::consent::Purpose;
use estate_proto::credentials::credential_service_server::CredentialService;
use estate_proto::credentials::*;
use estate_store::filter::{Filter, fetch_page};
use estate_store::outbox::{self, Change};
use estate_store::page::Page;
use estate_store::{Db, db_error, is_unique_violation};
use prost::Message;
use sqlx::{Any, AnyConnection};
use std::sync::Arc;

const SOURCE: &str = "credentials";
/// Bus topic of [`CredentialChanged`] events.
pub const CREDENTIAL_CHANGED_TOPIC: &str = "credentials.changed";
const MAX_VISITOR_ENTRIES: i32 = 100;
const MAX_VISITOR_WINDOW_MS: i64 = 7 * 24 * 3600 * 1000;
const QR_PREFIX: &str = "EM1";

/// Settings of the credentials service.
#[derive(Debug, Clone)]
pub struct CredentialOptions {
    /// QR step in seconds.
    pub qr_step_secs: u64,
    /// QR steps tolerated either side.
    pub qr_window_steps: u64,
    /// Largest page of a list call.
    pub max_page_size: u32,
}

/// The credentials service.
#[derive(Debug, Clone)]
pub struct CredentialBook {
    db: Db,
    hasher: KeyedHasher,
    secret_box: SecretBox,
    bus: EventBus,
    limiter: Arc<PinLimiter>,
    consent_keys: KeySet,
    options: CredentialOptions,
}

/// A secret to hand to the holder once, and the state to store.
struct NewSecret {
    lookup_hash: Option<String>,
    pin_hash: Option<String>,
    unit_id: Option<String>,
    sealed_secret: Option<String>,
    max_entries: Option<i64>,
    face_enrolment_ref: Option<String>,
    consent_id: Option<String>,
    /// ("card" | "visitor", normalised value): hashed per estate for offline
    /// bundles, held only in memory while the row is written.
    offline: Option<(&'static str, String)>,
    shown_once: String,
}

impl NewSecret {
    fn empty() -> Self {
        Self {
            lookup_hash: None,
            pin_hash: None,
            unit_id: None,
            sealed_secret: None,
            max_entries: None,
            face_enrolment_ref: None,
            consent_id: None,
            offline: None,
            shown_once: String::new(),
        }
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| Error::Internal(format!("random source: {e}")))?;
    Ok(b)
}

/// Canonical form of a card: optional facility code, UID in upper-case hex or
/// decimal digits, separators dropped.
fn normalise_card(card: &CardSecret, field: &'static str) -> Result<String> {
    estate_crypto::normalise_card(&card.uid, &card.facility_code).ok_or_else(|| {
        Error::invalid(
            field,
            "card uid must be 4 to 32 hex or decimal digits, facility_code at most 16 letters or digits",
        )
    })
}

fn check_pin(pin: &str, field: &'static str) -> Result<()> {
    if pin.len() < 6 || pin.len() > 12 || !pin.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid(field, "a PIN is 6 to 12 digits"));
    }
    if pin.bytes().all(|b| b == pin.as_bytes()[0]) {
        return Err(Error::invalid(field, "a PIN must not be one digit repeated"));
    }
    Ok(())
}

fn hash_pin(pin: &str) -> Result<String> {
    let salt_bytes: [u8; 16] = random_bytes()?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| Error::Internal(format!("pin salt: {e}")))?;
    argon2::Argon2::default()
        .hash_password(pin.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Internal(format!("pin hash: {e}")))
}

fn pin_matches(hash: &str, pin: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| argon2::Argon2::default().verify_password(pin.as_bytes(), &h).is_ok())
}

fn kinds_of(values: &[i32], field: &'static str) -> Result<Vec<CredentialKind>> {
    let mut out = Vec::new();
    for v in values {
        let k = CredentialKind::try_from(*v)
            .ok()
            .filter(|k| *k != CredentialKind::Unspecified)
            .ok_or_else(|| Error::invalid(field, format!("{v} is not a credential kind")))?;
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

fn names(kinds: &[CredentialKind]) -> String {
    kinds.iter().filter_map(|k| kind_name(*k)).collect::<Vec<_>>().join(",")
}

fn parse_names(s: &str) -> Vec<CredentialKind> {
    s.split(',').filter_map(kind_from_name).collect()
}

pub(crate) const DEFAULT_ACCEPTED: [CredentialKind; 4] =
    [CredentialKind::Card, CredentialKind::Pin, CredentialKind::Qr, CredentialKind::Visitor];
const DEFAULT_ALTERNATIVES: [CredentialKind; 3] = [CredentialKind::Qr, CredentialKind::Pin, CredentialKind::Card];

impl CredentialBook {
    /// A service over `db`; `consent_keys` verify face-reference attestations.
    pub fn new(
        db: Db,
        hasher: KeyedHasher,
        secret_box: SecretBox,
        bus: EventBus,
        limiter: Arc<PinLimiter>,
        consent_keys: KeySet,
        options: CredentialOptions,
    ) -> Self {
        Self { db, hasher, secret_box, bus, limiter, consent_keys, options }
    }

    async fn record(&self, conn: &mut AnyConnection, caller: &Caller, change: Change<'_>) -> Result<()> {
        outbox::record(conn, &change.into_event(caller.actor(&self.hasher), &caller.request_id, SOURCE)).await
    }

    async fn publish(&self, row: &CredentialRow, estate_ids: &[String], change: &str) {
        let ev = CredentialChanged {
            tenant_id: row.tenant_id.clone(),
            credential_id: row.id.clone(),
            estate_ids: estate_ids.to_vec(),
            kind: row.kind() as i32,
            status: status_of(&row.status) as i32,
            version: row.version,
            change: change.to_owned(),
            lookup_hash: row.lookup_hash.clone().unwrap_or_default(),
        };
        if let Err(e) = self.bus.publish(CREDENTIAL_CHANGED_TOPIC, ev.encode_to_vec()).await {
            tracing::warn!(error = %e, credential_id = %row.id, "credential change not announced on the bus");
        }
    }

    async fn estates_of(&self, conn: &mut AnyConnection, tenant: &str, id: &str) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as::<Any, (String,)>(
            "SELECT estate_id FROM credential_estates WHERE tenant_id = $1 AND credential_id = $2 ORDER BY estate_id",
        )
        .bind(tenant)
        .bind(id)
        .fetch_all(conn)
        .await
        .map_err(db_error)?;
        Ok(rows.into_iter().map(|(e,)| e).collect())
    }

    async fn row(&self, conn: &mut AnyConnection, tenant: &str, id: &str) -> Result<CredentialRow> {
        sqlx::query_as::<Any, CredentialRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {CREDENTIAL_COLS} FROM credentials WHERE tenant_id = $1 AND id = $2"
        )))
        .bind(tenant)
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?
        .ok_or(Error::NotFound("credential"))
    }

    /// The estate's policy: (accepted, alternatives, is_default, updated_at).
    async fn policy(
        &self,
        conn: &mut AnyConnection,
        tenant: &str,
        estate: &str,
    ) -> Result<(Vec<CredentialKind>, Vec<CredentialKind>, bool, i64)> {
        let row: Option<(String, String, i64)> = sqlx::query_as::<Any, (String, String, i64)>(
            "SELECT accepted_kinds, alternative_kinds, updated_at FROM estate_policies WHERE tenant_id = $1 AND estate_id = $2",
        )
        .bind(tenant)
        .bind(estate)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?;
        Ok(match row {
            Some((a, alt, at)) => (parse_names(&a), parse_names(&alt), false, at),
            None => (DEFAULT_ACCEPTED.to_vec(), DEFAULT_ALTERNATIVES.to_vec(), true, 0),
        })
    }

    async fn require_estate(&self, tenant: &str, estate: &str) -> Result<()> {
        match directory::estate_is_active(&self.db, tenant, estate).await? {
            Some(true) => Ok(()),
            Some(false) => Err(Error::precondition("the estate is deactivated")),
            None => Err(Error::NotFound("estate")),
        }
    }

    /// Builds what is stored for a new secret of `kind`.
    #[allow(clippy::too_many_arguments)]
    async fn new_secret(
        &self,
        tenant: &str,
        id: &str,
        person: &directory::PersonFacts,
        estates: &[String],
        r: &issue_credential_request::Secret,
    ) -> Result<(CredentialKind, NewSecret)> {
        use issue_credential_request::Secret;
        let mut s = NewSecret::empty();
        let kind = match r {
            Secret::Card(card) => {
                let norm = normalise_card(card, "card")?;
                s.lookup_hash = Some(self.hasher.card_hash(tenant, &norm));
                s.offline = Some(("card", norm));
                CredentialKind::Card
            }
            Secret::Pin(pin) => {
                check_pin(&pin.pin, "pin.pin")?;
                let unit = parse_id("pin.unit_id", &pin.unit_id)?;
                let estate = directory::estate_of_unit(&self.db, tenant, &unit)
                    .await?
                    .ok_or_else(|| Error::invalid("pin.unit_id", "names no unit of this tenant"))?;
                if !estates.contains(&estate) {
                    return Err(Error::invalid("pin.unit_id", "must be a unit of one of the credential's estates"));
                }
                if !directory::units_at_estate(&self.db, tenant, &person.id, &estate).await?.contains(&unit) {
                    return Err(Error::precondition("the person has no active residency in that unit"));
                }
                s.pin_hash = Some(hash_pin(&pin.pin)?);
                s.unit_id = Some(unit);
                CredentialKind::Pin
            }
            Secret::Qr(_) => {
                let seed: [u8; 20] = random_bytes()?;
                let sealed = self.secret_box.seal(tenant, id, &seed).map_err(|e| Error::Internal(e.to_string()))?;
                s.sealed_secret = Some(hex::encode(sealed));
                s.shown_once = data_encoding::BASE32_NOPAD.encode(&seed);
                CredentialKind::Qr
            }
            Secret::Visitor(v) => {
                if !(1..=MAX_VISITOR_ENTRIES).contains(&v.max_entries) {
                    return Err(Error::invalid("visitor.max_entries", "must be between 1 and 100"));
                }
                let code = data_encoding::BASE32_NOPAD.encode(&random_bytes::<10>()?);
                s.lookup_hash = Some(self.hasher.visitor_code_hash(tenant, &code));
                s.offline = Some(("visitor", code.clone()));
                s.max_entries = Some(i64::from(v.max_entries));
                s.shown_once = code;
                CredentialKind::Visitor
            }
            Secret::Face(f) => {
                let enrolment = bounded_text("face.enrolment_ref", &f.enrolment_ref, 128)?;
                if enrolment.is_empty() {
                    return Err(Error::invalid("face.enrolment_ref", "is required"));
                }
                let [estate] = estates else {
                    return Err(Error::invalid(
                        "estate_ids",
                        "a face reference belongs to exactly one estate (consent is per estate)",
                    ));
                };
                let att =
                    f.attestation.as_ref().ok_or_else(|| Error::invalid("face.attestation", "is required (R3, R9)"))?;
                let expected =
                    Expected { tenant_id: tenant, estate_id: estate, purpose: Purpose::FaceVerificationAtGates };
                let claims = estate_attestation::verify(att, &self.consent_keys, &expected, now_ms() / 1000)
                    .map_err(|e| Error::precondition(format!("the consent attestation is refused: {e}")))?;
                if claims.person_pseudonym != person.pseudonym {
                    return Err(Error::precondition("the consent attestation is for another person"));
                }
                s.face_enrolment_ref = Some(enrolment);
                s.consent_id = Some(claims.consent_id);
                CredentialKind::Face
            }
        };
        Ok((kind, s))
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert(
        &self,
        tx: &mut AnyConnection,
        tenant: &str,
        id: &str,
        person: &directory::PersonFacts,
        kind: CredentialKind,
        estates: &[String],
        valid_from: i64,
        valid_until: Option<i64>,
        label: &str,
        secret: &NewSecret,
        host: Option<String>,
    ) -> Result<CredentialRow> {
        let now = now_ms();
        let row = CredentialRow {
            tenant_id: tenant.to_owned(),
            id: id.to_owned(),
            person_id: person.id.clone(),
            person_pseudonym: person.pseudonym.clone(),
            kind: kind_name(kind).unwrap_or("unknown").to_owned(),
            status: ACTIVE.into(),
            valid_from,
            valid_until,
            label: label.to_owned(),
            lookup_hash: secret.lookup_hash.clone(),
            pin_hash: secret.pin_hash.clone(),
            unit_id: secret.unit_id.clone(),
            sealed_secret: secret.sealed_secret.clone(),
            qr_last_step: None,
            max_entries: secret.max_entries,
            entries_used: 0,
            host_person_id: host,
            face_enrolment_ref: secret.face_enrolment_ref.clone(),
            consent_id: secret.consent_id.clone(),
            version: 1,
            created_at: now,
            updated_at: now,
        };
        sqlx::query::<Any>(sqlx::AssertSqlSafe(format!(
            "INSERT INTO credentials ({CREDENTIAL_COLS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)"
        )))
        .bind(&row.tenant_id)
        .bind(&row.id)
        .bind(&row.person_id)
        .bind(&row.person_pseudonym)
        .bind(&row.kind)
        .bind(&row.status)
        .bind(row.valid_from)
        .bind(row.valid_until)
        .bind(&row.label)
        .bind(row.lookup_hash.clone())
        .bind(row.pin_hash.clone())
        .bind(row.unit_id.clone())
        .bind(row.sealed_secret.clone())
        .bind(row.qr_last_step)
        .bind(row.max_entries)
        .bind(row.entries_used)
        .bind(row.host_person_id.clone())
        .bind(row.face_enrolment_ref.clone())
        .bind(row.consent_id.clone())
        .bind(row.version)
        .bind(row.created_at)
        .bind(row.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::AlreadyExists("this card is already assigned to a credential of the tenant".into())
            } else {
                db_error(e)
            }
        })?;
        for e in estates {
            sqlx::query::<Any>(
                "INSERT INTO credential_estates (tenant_id, credential_id, estate_id, offline_hash) VALUES ($1, $2, $3, $4)",
            )
            .bind(tenant)
            .bind(id)
            .bind(e)
            .bind(self.offline_hash(tenant, e, secret))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        Ok(row)
    }

    /// The hash of a card or visitor code under `estate`'s offline key.
    fn offline_hash(&self, tenant: &str, estate: &str, secret: &NewSecret) -> Option<String> {
        secret
            .offline
            .as_ref()
            .map(|(kind, value)| estate_crypto::offline_hash(&self.hasher.offline_key(tenant, estate), kind, value))
    }

    // ---- issue ----

    async fn issue_credential(&self, caller: &Caller, r: IssueCredentialRequest) -> Result<IssuedCredential> {
        use issue_credential_request::Secret;
        let secret =
            r.secret.as_ref().ok_or_else(|| Error::invalid("secret", "choose one of card, pin, qr, visitor, face"))?;
        if r.estate_ids.is_empty() {
            return Err(Error::invalid("estate_ids", "name at least one estate"));
        }
        let mut estates = Vec::new();
        for e in &r.estate_ids {
            let e = parse_id("estate_ids", e)?;
            if !estates.contains(&e) {
                estates.push(e);
            }
        }
        let is_visitor = matches!(secret, Secret::Visitor(_));
        let tenant = match &caller.principal {
            Principal::Resident { tenant_id, person_id } => {
                if !matches!(secret, Secret::Visitor(_) | Secret::Face(_)) {
                    return Err(Error::denied(
                        "a resident issues only visitor passes (and ask for an alternative with RequestAlternative)",
                    ));
                }
                if !r.person_id.is_empty() && r.person_id != *person_id {
                    return Err(Error::denied("a resident issues credentials only for themselves"));
                }
                tenant_id.clone()
            }
            _ => {
                let mut tenant = String::new();
                for e in &estates {
                    tenant = caller.operator_for_estate(e)?.to_owned();
                }
                tenant
            }
        };
        let person_id = match &caller.principal {
            Principal::Resident { person_id, .. } => person_id.clone(),
            _ => parse_id("person_id", &r.person_id)?,
        };
        let label = bounded_text("label", &r.label, 100)?;
        let now = now_ms();
        let valid_from = r.valid_from.as_ref().map(ms_of).unwrap_or(now);
        let valid_until = r.valid_until.as_ref().map(ms_of);
        if let Some(u) = valid_until
            && u <= valid_from
        {
            return Err(Error::invalid("valid_until", "must be after valid_from"));
        }
        if is_visitor {
            match valid_until {
                None => return Err(Error::invalid("valid_until", "a visitor pass needs an end time")),
                Some(u) if u - valid_from > MAX_VISITOR_WINDOW_MS => {
                    return Err(Error::invalid("valid_until", "a visitor pass lasts at most 7 days"));
                }
                Some(_) => {}
            }
        }
        for e in &estates {
            self.require_estate(&tenant, e).await?;
        }
        let person = directory::person(&self.db, &tenant, &person_id).await?.ok_or(Error::NotFound("person"))?;
        if !person.active {
            return Err(Error::precondition("the person's record is deactivated"));
        }
        for e in &estates {
            if !directory::resides_at(&self.db, &tenant, &person.id, e).await? {
                return Err(Error::precondition(if is_visitor {
                    "the host has no active residency at that estate"
                } else {
                    "the person has no active residency at that estate"
                }));
            }
        }
        let id = new_id();
        let (kind, new) = self.new_secret(&tenant, &id, &person, &estates, secret).await?;
        let host = is_visitor.then(|| person.id.clone());
        let mut tx = self.db.begin().await?;
        let row = self
            .insert(&mut tx, &tenant, &id, &person, kind, &estates, valid_from, valid_until, &label, &new, host)
            .await?;
        let change = Change::new(&tenant, "credential.issue", "credential", &id)
            .person(&person.pseudonym, person.is_minor)
            .attr("kind", row.kind.clone())
            .attr("estate_ids", estates.join(","));
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        self.publish(&row, &estates, "issue").await;
        Ok(IssuedCredential { credential: Some(row.to_proto(estates)), secret: new.shown_once })
    }

    /// A credential the caller may see: any of an operator's estates, or a
    /// resident's own (including visitor passes they host).
    async fn visible(
        &self,
        conn: &mut AnyConnection,
        caller: &Caller,
        id: &str,
    ) -> Result<(CredentialRow, Vec<String>)> {
        match &caller.principal {
            Principal::Resident { tenant_id, person_id } => {
                let row = self.row(conn, tenant_id, id).await?;
                if row.person_id != *person_id {
                    return Err(Error::NotFound("credential"));
                }
                let estates = self.estates_of(conn, tenant_id, id).await?;
                Ok((row, estates))
            }
            _ => {
                let tenant = caller.operator_tenant()?.to_owned();
                let row = self.row(conn, &tenant, id).await?;
                let estates = self.estates_of(conn, &tenant, id).await?;
                if let Some(limit) = caller.operator_estate_limit()
                    && !estates.iter().any(|e| limit.contains(e))
                {
                    return Err(Error::denied("this operator token is not valid for the credential's estates"));
                }
                Ok((row, estates))
            }
        }
    }

    async fn get_credential(&self, caller: &Caller, r: GetCredentialRequest) -> Result<Credential> {
        let id = parse_id("id", &r.id)?;
        let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
        let (row, estates) = self.visible(&mut conn, caller, &id).await?;
        Ok(row.to_proto(estates))
    }

    async fn list_credentials(&self, caller: &Caller, r: ListCredentialsRequest) -> Result<ListCredentialsResponse> {
        let page = Page::parse(r.page_size, &r.page_token, self.options.max_page_size)?;
        const IN_ESTATES: &str = "SELECT credential_id FROM credential_estates WHERE estate_id";
        let mut f = Filter::default();
        let tenant = match &caller.principal {
            Principal::Resident { tenant_id, person_id } => {
                if !r.person_id.is_empty() && r.person_id != *person_id {
                    return Err(Error::denied("a resident lists only their own credentials"));
                }
                f.eq("tenant_id", tenant_id).eq("person_id", person_id);
                tenant_id.clone()
            }
            _ => {
                let tenant = caller.operator_tenant()?.to_owned();
                f.eq("tenant_id", &tenant);
                if !r.person_id.is_empty() {
                    f.eq("person_id", &parse_id("person_id", &r.person_id)?);
                }
                if r.estate_id.is_empty()
                    && let Some(limit) = caller.operator_estate_limit()
                {
                    f.in_select("id", IN_ESTATES, limit);
                }
                tenant
            }
        };
        if !r.estate_id.is_empty() {
            let e = parse_id("estate_id", &r.estate_id)?;
            if !matches!(caller.principal, Principal::Resident { .. }) {
                caller.operator_for_estate(&e)?;
            }
            f.in_select("id", IN_ESTATES, &[e]);
        }
        if !r.include_revoked {
            f.raw("status <> 'revoked'");
        }
        let (sql, binds) = f.page_sql(CREDENTIAL_COLS, "credentials", &page);
        let rows: Vec<CredentialRow> = fetch_page(self.db.pool(), sql, binds).await.map_err(db_error)?;
        let (rows, next) = page.finish(rows, |r| &r.id);
        let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let estates = self.estates_of(&mut conn, &tenant, &row.id).await?;
            out.push(row.to_proto(estates));
        }
        Ok(ListCredentialsResponse { credentials: out, next_page_token: next })
    }

    async fn change_status(&self, caller: &Caller, r: ChangeCredentialRequest, to: &'static str) -> Result<Credential> {
        let id = parse_id("id", &r.id)?;
        let reason = bounded_text("reason", &r.reason, 200)?;
        if let Principal::Resident { .. } = caller.principal
            && to == ACTIVE
        {
            return Err(Error::denied("only an operator reinstates a credential"));
        }
        let mut tx = self.db.begin().await?;
        let (mut row, estates) = self.visible(&mut tx, caller, &id).await?;
        let allowed = match to {
            SUSPENDED => row.status == ACTIVE,
            ACTIVE => row.status == SUSPENDED,
            _ => row.status != REVOKED,
        };
        if !allowed {
            return Err(Error::precondition(format!("a {} credential cannot become {to}", row.status)));
        }
        row.status = to.into();
        row.version += 1;
        row.updated_at = now_ms();
        sqlx::query::<Any>(
            "UPDATE credentials SET status = $1, version = $2, updated_at = $3 WHERE tenant_id = $4 AND id = $5",
        )
        .bind(&row.status)
        .bind(row.version)
        .bind(row.updated_at)
        .bind(&row.tenant_id)
        .bind(&row.id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let (action, change) = match to {
            SUSPENDED => ("credential.suspend", "suspend"),
            ACTIVE => ("credential.reinstate", "reinstate"),
            _ => ("credential.revoke", "revoke"),
        };
        let audit = Change::new(&row.tenant_id, action, "credential", &row.id)
            .person(&row.person_pseudonym, false)
            .attr("kind", row.kind.clone())
            .attr("reason", reason);
        self.record(&mut tx, caller, audit).await?;
        tx.commit().await.map_err(db_error)?;
        self.publish(&row, &estates, change).await;
        Ok(row.to_proto(estates))
    }

    async fn rotate_credential(&self, caller: &Caller, r: RotateCredentialRequest) -> Result<IssuedCredential> {
        let id = parse_id("id", &r.id)?;
        let mut tx = self.db.begin().await?;
        let (mut row, estates) = self.visible(&mut tx, caller, &id).await?;
        if row.status == REVOKED {
            return Err(Error::precondition("a revoked credential cannot be rotated; issue a new one"));
        }
        if matches!(caller.principal, Principal::Resident { .. }) && row.kind() != CredentialKind::Qr {
            return Err(Error::denied("a resident rotates only their QR pass"));
        }
        let secret = match row.kind() {
            CredentialKind::Card => issue_credential_request::Secret::Card(
                r.card
                    .clone()
                    .ok_or_else(|| Error::invalid("card", "give the new card to rotate a card credential"))?,
            ),
            CredentialKind::Pin => {
                let mut pin = r.pin.clone().ok_or_else(|| Error::invalid("pin", "give the new PIN to rotate a PIN"))?;
                if pin.unit_id.is_empty() {
                    pin.unit_id = row.unit_id.clone().unwrap_or_default();
                }
                issue_credential_request::Secret::Pin(pin)
            }
            CredentialKind::Qr => issue_credential_request::Secret::Qr(QrSecret {}),
            CredentialKind::Visitor => issue_credential_request::Secret::Visitor(VisitorPass {
                max_entries: i32::try_from(row.max_entries.unwrap_or(1)).unwrap_or(1),
            }),
            _ => return Err(Error::precondition("a face reference is renewed by enrolling again, not rotated")),
        };
        let person =
            directory::person(&self.db, &row.tenant_id, &row.person_id).await?.ok_or(Error::NotFound("person"))?;
        let (_, new) = self.new_secret(&row.tenant_id, &row.id, &person, &estates, &secret).await?;
        row.lookup_hash = new.lookup_hash.clone().or(row.lookup_hash);
        row.pin_hash = new.pin_hash.clone().or(row.pin_hash);
        row.unit_id = new.unit_id.clone().or(row.unit_id);
        row.sealed_secret = new.sealed_secret.clone().or(row.sealed_secret);
        row.qr_last_step = None;
        row.version += 1;
        row.updated_at = now_ms();
        sqlx::query::<Any>(
            "UPDATE credentials SET lookup_hash = $1, pin_hash = $2, unit_id = $3, sealed_secret = $4, qr_last_step = NULL, \
             version = $5, updated_at = $6 WHERE tenant_id = $7 AND id = $8",
        )
        .bind(row.lookup_hash.clone())
        .bind(row.pin_hash.clone())
        .bind(row.unit_id.clone())
        .bind(row.sealed_secret.clone())
        .bind(row.version)
        .bind(row.updated_at)
        .bind(&row.tenant_id)
        .bind(&row.id)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::AlreadyExists("this card is already assigned to a credential of the tenant".into())
            } else {
                db_error(e)
            }
        })?;
        if new.offline.is_some() {
            for e in &estates {
                sqlx::query::<Any>(
                    "UPDATE credential_estates SET offline_hash = $1 WHERE tenant_id = $2 AND credential_id = $3 AND estate_id = $4",
                )
                .bind(self.offline_hash(&row.tenant_id, e, &new))
                .bind(&row.tenant_id)
                .bind(&row.id)
                .bind(e)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            }
        }
        let audit = Change::new(&row.tenant_id, "credential.rotate", "credential", &row.id)
            .person(&row.person_pseudonym, false)
            .attr("kind", row.kind.clone());
        self.record(&mut tx, caller, audit).await?;
        tx.commit().await.map_err(db_error)?;
        self.publish(&row, &estates, "rotate").await;
        Ok(IssuedCredential { credential: Some(row.to_proto(estates)), secret: new.shown_once })
    }

    // ---- policy ----

    async fn set_estate_policy(&self, caller: &Caller, r: SetEstatePolicyRequest) -> Result<EstatePolicy> {
        let estate = parse_id("estate_id", &r.estate_id)?;
        let tenant = caller.operator_for_estate(&estate)?.to_owned();
        let accepted = kinds_of(&r.accepted_kinds, "accepted_kinds")?;
        if accepted.is_empty() {
            return Err(Error::invalid("accepted_kinds", "name the credential kinds the estate's gates accept"));
        }
        let non_face: Vec<CredentialKind> = accepted.iter().copied().filter(|k| *k != CredentialKind::Face).collect();
        if non_face.is_empty() {
            return Err(Error::precondition(
                "face recognition may never be the only way in: accept at least one of card, PIN, QR or visitor pass (R1; SPC 2021 Art. 10)",
            ));
        }
        if !accepted.iter().any(|k| matches!(k, CredentialKind::Qr | CredentialKind::Pin)) {
            return Err(Error::precondition(
                "accept QR or PIN: a resident who asks for an alternative to face must get one at once, without waiting for a card (R2)",
            ));
        }
        let alternatives = if r.alternative_kinds.is_empty() {
            DEFAULT_ALTERNATIVES.iter().copied().filter(|k| accepted.contains(k)).collect()
        } else {
            let alts = kinds_of(&r.alternative_kinds, "alternative_kinds")?;
            for k in &alts {
                if !matches!(k, CredentialKind::Qr | CredentialKind::Pin | CredentialKind::Card) {
                    return Err(Error::invalid("alternative_kinds", "may contain only QR, PIN and card"));
                }
                if !accepted.contains(k) {
                    return Err(Error::invalid("alternative_kinds", "may contain only kinds the estate accepts"));
                }
            }
            alts
        };
        self.require_estate(&tenant, &estate).await?;
        for gate in directory::gates_of_estate(&self.db, &tenant, &estate).await? {
            let reads_one = non_face.iter().filter_map(|k| kind_name(*k)).any(|k| gate.kinds.iter().any(|g| g == k));
            if !reads_one {
                return Err(Error::precondition(format!(
                    "gate \"{}\" reads none of the accepted non-face kinds, so face would be the only way in there (R1)",
                    gate.name
                )));
            }
        }
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        sqlx::query::<Any>(
            "INSERT INTO estate_policies (tenant_id, estate_id, accepted_kinds, alternative_kinds, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant_id, estate_id) DO UPDATE SET accepted_kinds = excluded.accepted_kinds, \
             alternative_kinds = excluded.alternative_kinds, updated_at = excluded.updated_at",
        )
        .bind(&tenant)
        .bind(&estate)
        .bind(names(&accepted))
        .bind(names(&alternatives))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let audit = Change::new(&tenant, "policy.set", "estate", &estate)
            .estate(&estate)
            .attr("accepted_kinds", names(&accepted))
            .attr("alternative_kinds", names(&alternatives));
        self.record(&mut tx, caller, audit).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(EstatePolicy {
            estate_id: estate,
            accepted_kinds: accepted.iter().map(|k| *k as i32).collect(),
            alternative_kinds: alternatives.iter().map(|k| *k as i32).collect(),
            is_default: false,
            updated_at: ts(now),
        })
    }

    async fn get_estate_policy(&self, caller: &Caller, r: GetEstatePolicyRequest) -> Result<EstatePolicy> {
        let estate = parse_id("estate_id", &r.estate_id)?;
        let tenant = match &caller.principal {
            Principal::Gate { tenant_id, estate_id, .. } if *estate_id == estate => tenant_id.clone(),
            Principal::Gate { .. } => return Err(Error::denied("a gate can only read its own estate")),
            Principal::Resident { tenant_id, .. } => tenant_id.clone(),
            _ => caller.operator_for_estate(&estate)?.to_owned(),
        };
        self.require_estate(&tenant, &estate).await?;
        let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
        let (accepted, alternatives, is_default, at) = self.policy(&mut conn, &tenant, &estate).await?;
        Ok(EstatePolicy {
            estate_id: estate,
            accepted_kinds: accepted.iter().map(|k| *k as i32).collect(),
            alternative_kinds: alternatives.iter().map(|k| *k as i32).collect(),
            is_default,
            updated_at: if is_default { None } else { ts(at) },
        })
    }

    // ---- alternative (R2) ----

    async fn request_alternative(&self, caller: &Caller, r: RequestAlternativeRequest) -> Result<AlternativeGranted> {
        let Principal::Resident { tenant_id, person_id } = &caller.principal else {
            return Err(Error::denied("a resident asks for an alternative for themselves"));
        };
        let (tenant, person_id) = (tenant_id.clone(), person_id.clone());
        let estate = parse_id("estate_id", &r.estate_id)?;
        let preferred = match CredentialKind::try_from(r.preferred_kind) {
            Ok(CredentialKind::Unspecified) => CredentialKind::Qr,
            Ok(k @ (CredentialKind::Qr | CredentialKind::Pin | CredentialKind::Card)) => k,
            _ => return Err(Error::invalid("preferred_kind", "must be QR, PIN or card (or unset for a QR pass)")),
        };
        if !r.pin.is_empty() {
            check_pin(&r.pin, "pin")?;
        }
        self.require_estate(&tenant, &estate).await?;
        let person = directory::person(&self.db, &tenant, &person_id).await?.ok_or(Error::NotFound("person"))?;
        if !person.active || !directory::resides_at(&self.db, &tenant, &person_id, &estate).await? {
            return Err(Error::precondition("the person has no active residency at this estate"));
        }
        let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
        let (accepted, offered, _, _) = self.policy(&mut conn, &tenant, &estate).await?;
        drop(conn);
        // What can be handed over at once, in the resident's order of
        // preference, then the operator's; never nothing (R2).
        let immediate: Vec<CredentialKind> =
            [CredentialKind::Qr, CredentialKind::Pin].into_iter().filter(|k| accepted.contains(k)).collect();
        let kind = if immediate.contains(&preferred) && offered.contains(&preferred) {
            preferred
        } else if let Some(k) = offered.iter().copied().find(|k| immediate.contains(k)) {
            k
        } else if let Some(k) = immediate.first().copied() {
            k
        } else {
            CredentialKind::Qr
        };
        let mut note = String::new();
        if kind != preferred {
            note = format!(
                "asked for {}; issued {} at once{}",
                kind_name(preferred).unwrap_or("?"),
                kind_name(kind).unwrap_or("?"),
                if preferred == CredentialKind::Card { " while the card is prepared" } else { "" }
            );
        }
        let secret = match kind {
            CredentialKind::Pin => {
                let unit = if r.unit_id.is_empty() {
                    directory::units_at_estate(&self.db, &tenant, &person_id, &estate)
                        .await?
                        .into_iter()
                        .next()
                        .ok_or_else(|| Error::precondition("the person has no active residency at this estate"))?
                } else {
                    parse_id("unit_id", &r.unit_id)?
                };
                let pin = if r.pin.is_empty() {
                    let n = u64::from_be_bytes(random_bytes::<8>()?) % 1_000_000;
                    format!("{n:06}")
                } else {
                    r.pin.clone()
                };
                issue_credential_request::Secret::Pin(PinSecret { pin, unit_id: unit })
            }
            _ => issue_credential_request::Secret::Qr(QrSecret {}),
        };
        let id = new_id();
        let estates = vec![estate.clone()];
        let (kind, mut new) = self.new_secret(&tenant, &id, &person, &estates, &secret).await?;
        if let issue_credential_request::Secret::Pin(p) = &secret {
            new.shown_once = p.pin.clone();
        }
        let mut tx = self.db.begin().await?;
        let row = self
            .insert(&mut tx, &tenant, &id, &person, kind, &estates, now_ms(), None, "alternative", &new, None)
            .await?;
        let card_request_id = if preferred == CredentialKind::Card {
            let cid = new_id();
            sqlx::query::<Any>(
                "INSERT INTO card_requests (tenant_id, id, person_id, estate_id, requested_at, status) VALUES ($1, $2, $3, $4, $5, 'open')",
            )
            .bind(&tenant)
            .bind(&cid)
            .bind(&person_id)
            .bind(&estate)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            cid
        } else {
            String::new()
        };
        let audit = Change::new(&tenant, "credential.alternative", "credential", &id)
            .estate(&estate)
            .person(&person.pseudonym, person.is_minor)
            .attr("requested_kind", kind_name(preferred).unwrap_or("?"))
            .attr("issued_kind", row.kind.clone())
            .attr("card_request_id", card_request_id.clone());
        self.record(&mut tx, caller, audit).await?;
        tx.commit().await.map_err(db_error)?;
        self.publish(&row, &estates, "issue").await;
        Ok(AlternativeGranted {
            issued: Some(IssuedCredential { credential: Some(row.to_proto(estates)), secret: new.shown_once }),
            card_request_id,
            note,
        })
    }

    // ---- verification (the gate hot path) ----

    async fn verify_credential(&self, caller: &Caller, r: VerifyCredentialRequest) -> Result<Verification> {
        let (tenant, estate) = match &caller.principal {
            Principal::Gate { tenant_id, estate_id, .. } => {
                if !r.estate_id.is_empty() && r.estate_id != *estate_id {
                    return Err(Error::denied("a gate verifies credentials only at its own estate"));
                }
                (tenant_id.clone(), estate_id.clone())
            }
            _ => {
                let e = parse_id("estate_id", &r.estate_id)?;
                let tenant = caller.operator_for_estate(&e)?.to_owned();
                self.require_estate(&tenant, &e).await?;
                (tenant, e)
            }
        };
        let presented =
            r.presented.ok_or_else(|| Error::invalid("presented", "present a card, PIN, QR code or visitor code"))?;
        let mut tx = self.db.begin().await?;
        let (verification, pseudonym) = self.verify_in(&mut tx, &tenant, &estate, &presented).await?;
        let outcome = VerifyOutcome::try_from(verification.outcome).unwrap_or(VerifyOutcome::Unspecified);
        let kind = CredentialKind::try_from(verification.kind).ok().and_then(kind_name).unwrap_or("unknown");
        let object = verification.credential_id.clone();
        let audit = Change::new(&tenant, "credential.verify", "credential", &object)
            .estate(&estate)
            .person(&pseudonym, false)
            .attr("outcome", outcome.as_str_name())
            .attr("kind", kind);
        self.record(&mut tx, caller, audit).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(verification)
    }

    /// Checks `presented` at `estate`; consumes what a pass allows once (a QR
    /// step, a visitor entry). The keyed hashes it looks up by are what the
    /// gate service caches. Returns the verification and the holder's pseudonym.
    pub async fn verify_in(
        &self,
        tx: &mut AnyConnection,
        tenant: &str,
        estate: &str,
        presented: &verify_credential_request::Presented,
    ) -> Result<(Verification, String)> {
        use verify_credential_request::Presented;
        let deny = |o: VerifyOutcome| (Verification { outcome: o as i32, ..Default::default() }, String::new());
        let row = match presented {
            Presented::Card(c) => {
                let norm =
                    normalise_card(&CardSecret { uid: c.uid.clone(), facility_code: c.facility_code.clone() }, "card")?;
                self.by_lookup(tx, tenant, &self.hasher.card_hash(tenant, &norm), "card").await?
            }
            Presented::Visitor(v) => {
                let code = v.code.trim().to_ascii_uppercase();
                if code.is_empty() || code.len() > 64 {
                    return Err(Error::invalid("visitor.code", "must be the code printed on the pass"));
                }
                self.by_lookup(tx, tenant, &self.hasher.visitor_code_hash(tenant, &code), "visitor").await?
            }
            Presented::Pin(p) => {
                let unit = parse_id("pin.unit_id", &p.unit_id)?;
                let key = format!("{tenant}:{estate}:{unit}");
                let Some(attempt) = self.limiter.begin_attempt(&key).await? else {
                    return Ok(deny(VerifyOutcome::Locked));
                };
                let candidates = sqlx::query_as::<Any, CredentialRow>(sqlx::AssertSqlSafe(format!(
                    "SELECT {CREDENTIAL_COLS} FROM credentials WHERE tenant_id = $1 AND unit_id = $2 AND kind = 'pin' AND status <> 'revoked'"
                )))
                .bind(tenant)
                .bind(&unit)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
                let found =
                    candidates.into_iter().find(|c| c.pin_hash.as_deref().is_some_and(|h| pin_matches(h, &p.pin)));
                match found {
                    Some(row) => {
                        self.limiter.record_success(&key).await?;
                        Some(row)
                    }
                    None => {
                        let locked = self.limiter.record_failure(&key, attempt).await?;
                        return Ok(deny(if locked { VerifyOutcome::Locked } else { VerifyOutcome::Unknown }));
                    }
                }
            }
            Presented::Qr(q) => {
                let mut parts = q.payload.trim().split('.');
                let (Some(QR_PREFIX), Some(id), Some(code), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Ok(deny(VerifyOutcome::Unknown));
                };
                let Ok(id) = parse_id("qr.payload", id) else { return Ok(deny(VerifyOutcome::Unknown)) };
                match self.row(tx, tenant, &id).await {
                    Ok(row) if row.kind() == CredentialKind::Qr => Some(row),
                    Ok(_) | Err(Error::NotFound(_)) => None,
                    Err(e) => return Err(e),
                }
                .map(|row| (row, code.to_owned()))
                .map(|(row, code)| {
                    let seed = row
                        .sealed_secret
                        .as_deref()
                        .and_then(|h| hex::decode(h).ok())
                        .and_then(|sealed| self.secret_box.open(tenant, &row.id, &sealed));
                    (row, code, seed)
                })
                .and_then(|(row, code, seed)| {
                    let unix = u64::try_from(now_ms() / 1000).unwrap_or(0);
                    let step = seed.as_deref().and_then(|s| {
                        totp::matching_step(s, &code, unix, self.options.qr_step_secs, self.options.qr_window_steps)
                    });
                    step.map(|s| (row, s))
                })
                .map(|(mut row, step)| {
                    row.qr_last_step = Some(i64::try_from(step).unwrap_or(i64::MAX));
                    row
                })
            }
        };
        let Some(row) = row else { return Ok(deny(VerifyOutcome::Unknown)) };
        let base = Verification {
            outcome: VerifyOutcome::Valid as i32,
            credential_id: row.id.clone(),
            person_pseudonym: row.person_pseudonym.clone(),
            kind: row.kind() as i32,
            credential_version: row.version,
        };
        let with =
            |o: VerifyOutcome| (Verification { outcome: o as i32, ..base.clone() }, row.person_pseudonym.clone());
        match row.status.as_str() {
            REVOKED => return Ok(with(VerifyOutcome::Revoked)),
            SUSPENDED => return Ok(with(VerifyOutcome::Suspended)),
            _ => {}
        }
        let now = now_ms();
        if now < row.valid_from {
            return Ok(with(VerifyOutcome::NotYetValid));
        }
        if row.valid_until.is_some_and(|u| now >= u) {
            return Ok(with(VerifyOutcome::Expired));
        }
        let (n,): (i64,) = sqlx::query_as::<Any, (i64,)>(
            "SELECT COUNT(*) FROM credential_estates WHERE tenant_id = $1 AND credential_id = $2 AND estate_id = $3",
        )
        .bind(tenant)
        .bind(&row.id)
        .bind(estate)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        if n == 0 {
            return Ok(with(VerifyOutcome::NotThisEstate));
        }
        let (accepted, _, _, _) = self.policy(tx, tenant, estate).await?;
        if !accepted.contains(&row.kind()) {
            return Ok(with(VerifyOutcome::KindNotAccepted));
        }
        match row.kind() {
            CredentialKind::Qr => {
                let step = row.qr_last_step.unwrap_or(0);
                let taken = sqlx::query::<Any>(
                    "UPDATE credentials SET qr_last_step = $1 WHERE tenant_id = $2 AND id = $3 AND (qr_last_step IS NULL OR qr_last_step < $1)",
                )
                .bind(step)
                .bind(tenant)
                .bind(&row.id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?
                .rows_affected();
                if taken == 0 {
                    return Ok(with(VerifyOutcome::Replayed));
                }
            }
            CredentialKind::Visitor => {
                let taken = sqlx::query::<Any>(
                    "UPDATE credentials SET entries_used = entries_used + 1 WHERE tenant_id = $1 AND id = $2 AND entries_used < max_entries",
                )
                .bind(tenant)
                .bind(&row.id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?
                .rows_affected();
                if taken == 0 {
                    return Ok(with(VerifyOutcome::Exhausted));
                }
            }
            _ => {}
        }
        Ok(with(VerifyOutcome::Valid))
    }

    async fn by_lookup(
        &self,
        tx: &mut AnyConnection,
        tenant: &str,
        hash: &str,
        kind: &str,
    ) -> Result<Option<CredentialRow>> {
        sqlx::query_as::<Any, CredentialRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {CREDENTIAL_COLS} FROM credentials WHERE tenant_id = $1 AND lookup_hash = $2 AND kind = $3 \
             ORDER BY CASE WHEN status = 'revoked' THEN 1 ELSE 0 END, updated_at DESC LIMIT 1"
        )))
        .bind(tenant)
        .bind(hash)
        .bind(kind)
        .fetch_optional(tx)
        .await
        .map_err(db_error)
    }

    async fn suspend_credential(&self, caller: &Caller, r: ChangeCredentialRequest) -> Result<Credential> {
        self.change_status(caller, r, SUSPENDED).await
    }

    async fn reinstate_credential(&self, caller: &Caller, r: ChangeCredentialRequest) -> Result<Credential> {
        self.change_status(caller, r, ACTIVE).await
    }

    async fn revoke_credential(&self, caller: &Caller, r: ChangeCredentialRequest) -> Result<Credential> {
        self.change_status(caller, r, REVOKED).await
    }
}

#[tonic::async_trait]
impl CredentialService for CredentialBook {
    estate_auth::unary_rpcs! {
        "credentials", CredentialBook;
        issue_credential(IssueCredentialRequest) -> IssuedCredential;
        get_credential(GetCredentialRequest) -> Credential;
        list_credentials(ListCredentialsRequest) -> ListCredentialsResponse;
        suspend_credential(ChangeCredentialRequest) -> Credential;
        reinstate_credential(ChangeCredentialRequest) -> Credential;
        revoke_credential(ChangeCredentialRequest) -> Credential;
        rotate_credential(RotateCredentialRequest) -> IssuedCredential;
        set_estate_policy(SetEstatePolicyRequest) -> EstatePolicy;
        get_estate_policy(GetEstatePolicyRequest) -> EstatePolicy;
        request_alternative(RequestAlternativeRequest) -> AlternativeGranted;
        verify_credential(VerifyCredentialRequest) -> Verification;
    }
}
