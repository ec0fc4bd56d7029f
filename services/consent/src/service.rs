//! The `estate.consent.v1.ConsentService` implementation.
//!
//! - R3 separate consent: one purpose, one estate, the person's own
//!   affirmative act against the current notice version and the hash of the
//!   text shown; bundled, pre-ticked or operator-made consent is refused.
//! - R4 no coercion: this service changes no access right other than face.
//! - R5 withdrawal in one call, requesting deletion in the same transaction.
//! - R7 minors: only a linked guardian grants for a person under 14.
//! - R9 attestations signed for facematch's offline check.
//! - R16 impact assessment before face is enabled; filing count.
//! - R14 tenant from the token; R17 pseudonyms in audit events.

use crate::deletion::{self, request_deletion};
use crate::model::*;
use base64::Engine;
use estate_attestation::{FORMAT, KeySet};
use estate_auth::{Caller, Principal};
use estate_core::{BirthDate, Error, Result, new_id, now_ms, parse_id, required_text};
use estate_crypto::{KeyedHasher, SigningKeyPair, sha256_hex};
use estate_identity::directory::{self, PersonFacts};
use estate_proto::consent::consent_service_server::ConsentService;
use estate_proto::consent::*;
use estate_store::filter::{Filter, fetch_page};
use estate_store::outbox::{self, Change};
use estate_store::page::Page;
use estate_store::{Db, db_error, is_unique_violation};
use sqlx::{Any, AnyConnection};
use tonic::{Request, Response, Status};

const SOURCE: &str = "consent";
const NOTICE_MAX_CHARS: usize = 20_000;
const MAX_ATTESTATION_TTL_SECS: i64 = 3600;

/// Settings of the consent service.
#[derive(Debug, Clone)]
pub struct ConsentOptions {
    /// Default attestation lifetime in seconds.
    pub attestation_ttl_secs: i64,
    /// Filing warning from this many persons (R16).
    pub filing_warning_at: i64,
    /// Filing due at this many persons (R16).
    pub filing_threshold: i64,
    /// Largest page of a list call.
    pub max_page_size: u32,
}

/// The consent service.
#[derive(Debug, Clone)]
pub struct ConsentBook {
    db: Db,
    hasher: KeyedHasher,
    signing: SigningKeyPair,
    options: ConsentOptions,
    bus: Option<estate_bus::EventBus>,
    face: Option<std::sync::Arc<dyn estate_facematch::FaceMatcher>>,
}

/// Announced after a withdrawal commits, so that the deletion sweep hands the
/// request to facematch at once rather than at its next interval.
pub const CONSENT_WITHDRAWN_TOPIC: &str = "consent.face.withdrawn";

fn sha256_field(field: &'static str, value: &str) -> Result<String> {
    let v = value.trim().to_ascii_lowercase();
    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(field, "must be a SHA-256 digest written as 64 hex characters"));
    }
    Ok(v)
}

/// A notice text is a legal document: it is stored and hashed exactly as
/// given (line breaks included), never trimmed.
fn notice_text(field: &'static str, value: &str, required: bool) -> Result<String> {
    if value.trim().is_empty() {
        return if required { Err(Error::invalid(field, "is required")) } else { Ok(String::new()) };
    }
    if value.chars().count() > NOTICE_MAX_CHARS {
        return Err(Error::invalid(field, format!("must be at most {NOTICE_MAX_CHARS} characters")));
    }
    if value.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
        return Err(Error::invalid(field, "must not contain control characters other than line breaks and tabs"));
    }
    Ok(value.to_owned())
}

fn not_yours() -> Error {
    Error::denied("a resident acts only for themselves and for minors whose linked guardian they are")
}

impl ConsentBook {
    /// A service over `db` (shared with identity), signing attestations with `signing`.
    /// Counts persons with templates through `face` for the filing status.
    pub fn with_face(mut self, face: Option<std::sync::Arc<dyn estate_facematch::FaceMatcher>>) -> Self {
        self.face = face;
        self
    }

    /// Wakes the deletion sweep (after a committed deletion request), so that
    /// facematch deletes at once rather than at the sweep's next interval.
    async fn announce_deletion_request(&self) {
        if let Some(bus) = &self.bus
            && let Err(e) = bus.publish(CONSENT_WITHDRAWN_TOPIC, Vec::new()).await
        {
            tracing::debug!(error = %e, "deletion request not announced; the sweep's interval bounds the delay");
        }
    }

    /// Announces withdrawals on `bus` (wakes the deletion sweep).
    pub fn with_bus(mut self, bus: estate_bus::EventBus) -> Self {
        self.bus = Some(bus);
        self
    }

    pub fn new(db: Db, hasher: KeyedHasher, signing: SigningKeyPair, options: ConsentOptions) -> Self {
        Self { db, hasher, signing, options, bus: None, face: None }
    }

    async fn record(&self, conn: &mut AnyConnection, caller: &Caller, change: Change<'_>) -> Result<()> {
        outbox::record(conn, &change.into_event(caller.actor(&self.hasher), &caller.request_id, SOURCE)).await
    }

    /// The tenant of a caller allowed to read an estate's consent setup:
    /// an operator of the estate, a gate of the estate, or a resident of the tenant.
    fn reader_tenant(caller: &Caller, estate_id: &str) -> Result<String> {
        match &caller.principal {
            Principal::Gate { tenant_id, estate_id: own, .. } => {
                if own == estate_id {
                    Ok(tenant_id.clone())
                } else {
                    Err(Error::denied("a gate can only read its own estate"))
                }
            }
            Principal::Resident { tenant_id, .. } => Ok(tenant_id.clone()),
            _ => Ok(caller.operator_for_estate(estate_id)?.to_owned()),
        }
    }

    async fn require_estate(&self, tenant_id: &str, estate_id: &str) -> Result<()> {
        match directory::estate_is_active(&self.db, tenant_id, estate_id).await? {
            Some(true) => Ok(()),
            Some(false) => Err(Error::precondition("the estate is deactivated")),
            None => Err(Error::NotFound("estate")),
        }
    }

    async fn face_enabled(&self, conn: &mut AnyConnection, tenant_id: &str, estate_id: &str) -> Result<bool> {
        let row: Option<(i64,)> = sqlx::query_as::<Any, (i64,)>(
            "SELECT enabled FROM face_verification WHERE tenant_id = $1 AND estate_id = $2",
        )
        .bind(tenant_id)
        .bind(estate_id)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?;
        Ok(row.is_some_and(|(e,)| e != 0))
    }

    /// The current notice version of an estate: the newest already in effect.
    async fn current_notice(
        &self,
        conn: &mut AnyConnection,
        tenant_id: &str,
        estate_id: &str,
    ) -> Result<Option<(String, i64, i64)>> {
        sqlx::query_as::<Any, (String, i64, i64)>(
            "SELECT id, version, effective_from FROM consent_notices WHERE tenant_id = $1 AND estate_id = $2 \
             AND effective_from <= $3 ORDER BY version DESC LIMIT 1",
        )
        .bind(tenant_id)
        .bind(estate_id)
        .bind(now_ms())
        .fetch_optional(conn)
        .await
        .map_err(db_error)
    }

    async fn notice_texts(&self, tenant_id: &str, notice_id: &str) -> Result<Vec<(String, String, String)>> {
        sqlx::query_as::<Any, (String, String, String)>(
            "SELECT language, body, text_sha256 FROM consent_notice_texts WHERE tenant_id = $1 AND notice_id = $2 ORDER BY language",
        )
        .bind(tenant_id)
        .bind(notice_id)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_error)
    }

    // ---- notices ----

    async fn publish_notice(&self, caller: &Caller, r: PublishNoticeRequest) -> Result<Notice> {
        let estate_id = parse_id("estate_id", &r.estate_id)?;
        let tenant = caller.operator_for_estate(&estate_id)?.to_owned();
        let zh = notice_text("text_zh_cn", &r.text_zh_cn, true)?;
        let en = notice_text("text_en", &r.text_en, false)?;
        let now = now_ms();
        let effective_from = match &r.effective_from {
            Some(t) => {
                let ms = t.seconds.saturating_mul(1000);
                if ms < now - 60_000 {
                    return Err(Error::invalid(
                        "effective_from",
                        "must not be in the past; a published notice is immutable",
                    ));
                }
                ms
            }
            None => now,
        };
        self.require_estate(&tenant, &estate_id).await?;
        let mut tx = self.db.begin().await?;
        let (latest,): (i64,) = sqlx::query_as::<Any, (i64,)>(
            "SELECT COALESCE(MAX(version), 0) FROM consent_notices WHERE tenant_id = $1 AND estate_id = $2",
        )
        .bind(&tenant)
        .bind(&estate_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        let version = latest + 1;
        let id = new_id();
        sqlx::query::<Any>(
            "INSERT INTO consent_notices (tenant_id, id, estate_id, version, effective_from, published_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&tenant)
        .bind(&id)
        .bind(&estate_id)
        .bind(version)
        .bind(effective_from)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::Unavailable("another notice version was published at the same moment; retry".into())
            } else {
                db_error(e)
            }
        })?;
        let mut texts = vec![("zh-CN", zh)];
        if !en.is_empty() {
            texts.push(("en", en));
        }
        let mut out = Vec::new();
        for (language, body) in texts {
            let digest = sha256_hex(body.as_bytes());
            sqlx::query::<Any>(
                "INSERT INTO consent_notice_texts (tenant_id, notice_id, language, body, text_sha256) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&tenant)
            .bind(&id)
            .bind(language)
            .bind(&body)
            .bind(&digest)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            out.push(NoticeText {
                notice_id: id.clone(),
                estate_id: estate_id.clone(),
                version,
                language: language.into(),
                text: body,
                text_sha256: digest,
                effective_from: ts(effective_from),
            });
        }
        let hashes = out.iter().map(|t| format!("{}:{}", t.language, t.text_sha256)).collect::<Vec<_>>().join(",");
        let change = Change::new(&tenant, "notice.publish", "notice", &id)
            .estate(&estate_id)
            .attr("version", version.to_string())
            .attr("text_sha256", hashes);
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(Notice { id, estate_id, version, texts: out, effective_from: ts(effective_from), published_at: ts(now) })
    }

    async fn get_current_notice(&self, caller: &Caller, r: GetCurrentNoticeRequest) -> Result<NoticeText> {
        let estate_id = parse_id("estate_id", &r.estate_id)?;
        let tenant = Self::reader_tenant(caller, &estate_id)?;
        let language = match r.language.as_str() {
            "" | "zh-CN" => "zh-CN",
            "en" => "en",
            _ => return Err(Error::invalid("language", "must be zh-CN or en")),
        };
        let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
        let (id, version, effective_from) =
            self.current_notice(&mut conn, &tenant, &estate_id).await?.ok_or(Error::NotFound("notice"))?;
        let texts = self.notice_texts(&tenant, &id).await?;
        let pick = texts.iter().find(|t| t.0 == language).or_else(|| texts.iter().find(|t| t.0 == "zh-CN"));
        let (lang, body, digest) = pick.cloned().ok_or(Error::NotFound("notice"))?;
        Ok(NoticeText {
            notice_id: id,
            estate_id,
            version,
            language: lang,
            text: body,
            text_sha256: digest,
            effective_from: ts(effective_from),
        })
    }

    async fn list_notices(&self, caller: &Caller, r: ListNoticesRequest) -> Result<ListNoticesResponse> {
        let estate_id = parse_id("estate_id", &r.estate_id)?;
        let tenant = caller.operator_for_estate(&estate_id)?.to_owned();
        let rows = sqlx::query_as::<Any, (String, i64, i64, i64)>(
            "SELECT id, version, effective_from, published_at FROM consent_notices WHERE tenant_id = $1 AND estate_id = $2 ORDER BY version",
        )
        .bind(&tenant)
        .bind(&estate_id)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_error)?;
        let mut notices = Vec::with_capacity(rows.len());
        for (id, version, effective_from, published_at) in rows {
            let texts = self
                .notice_texts(&tenant, &id)
                .await?
                .into_iter()
                .map(|(language, text, text_sha256)| NoticeText {
                    notice_id: id.clone(),
                    estate_id: estate_id.clone(),
                    version,
                    language,
                    text,
                    text_sha256,
                    effective_from: ts(effective_from),
                })
                .collect();
            notices.push(Notice {
                id,
                estate_id: estate_id.clone(),
                version,
                texts,
                effective_from: ts(effective_from),
                published_at: ts(published_at),
            });
        }
        Ok(ListNoticesResponse { notices })
    }

    // ---- consent ----

    /// Who the consent is for, and whether the caller acts as their guardian.
    /// Only residents act; the answer never depends on another tenant's data.
    async fn subject_of(&self, caller: &Caller, person_id: &str) -> Result<(String, PersonFacts, bool)> {
        let Principal::Resident { tenant_id, person_id: me } = &caller.principal else {
            return Err(Error::denied(
                "consent must be the person's own act (or their guardian's); an operator or device cannot grant or withdraw it",
            ));
        };
        let target = if person_id.is_empty() { me.clone() } else { parse_id("person_id", person_id)? };
        let facts = directory::person(&self.db, tenant_id, &target).await?;
        if target == *me {
            let facts = facts.ok_or(Error::NotFound("person"))?;
            return Ok((tenant_id.clone(), facts, false));
        }
        match facts {
            Some(f) if f.guardian_person_id.as_deref() == Some(me.as_str()) => Ok((tenant_id.clone(), f, true)),
            _ => Err(not_yours()),
        }
    }

    async fn grant_consent(&self, caller: &Caller, r: GrantConsentRequest) -> Result<Consent> {
        let estate_id = parse_id("estate_id", &r.estate_id)?;
        // The request's own shape first: separate, explicit, unbundled (R3, SPC Art. 4).
        if r.purposes.len() != 1 {
            return Err(Error::invalid(
                "purposes",
                "must name exactly one purpose, PURPOSE_FACE_VERIFICATION_AT_GATES: face consent is separate consent (PIPL Art. 29) and cannot be combined with other purposes",
            ));
        }
        if r.purposes[0] != Purpose::FaceVerificationAtGates as i32 {
            return Err(Error::invalid(
                "purposes",
                "the only purpose this consent can cover is PURPOSE_FACE_VERIFICATION_AT_GATES",
            ));
        }
        if !r.bundled_agreement_ids.is_empty() {
            return Err(Error::invalid(
                "bundled_agreement_ids",
                "must be empty: face consent may not be attached to another agreement (SPC Art. 4)",
            ));
        }
        if !r.affirmative_act {
            return Err(Error::invalid(
                "affirmative_act",
                "must be true: consent needs the person's own affirmative act, not a pre-ticked or implied choice",
            ));
        }
        let method = ConsentMethod::try_from(r.method).ok().and_then(method_name).ok_or_else(|| {
            Error::invalid("method", "must be CONSENT_METHOD_APP_TAP or CONSENT_METHOD_SIGNED_PAPER_FORM")
        })?;
        let scan = if r.method == ConsentMethod::SignedPaperForm as i32 {
            sha256_field("paper_form_scan_sha256", &r.paper_form_scan_sha256)?
        } else if r.paper_form_scan_sha256.is_empty() {
            String::new()
        } else {
            return Err(Error::invalid("paper_form_scan_sha256", "is only for CONSENT_METHOD_SIGNED_PAPER_FORM"));
        };
        let shown_hash = sha256_field("notice_text_sha256", &r.notice_text_sha256)?;
        if r.notice_version <= 0 {
            return Err(Error::invalid("notice_version", "must name the notice version the person was shown"));
        }

        let (tenant, person, by_guardian) = self.subject_of(caller, &r.person_id).await?;
        if !person.active {
            return Err(Error::precondition("the person's record is deactivated"));
        }
        if !person.birth_date_known {
            return Err(Error::precondition(
                "the person's birth date is not recorded; it is needed to tell whether a guardian must consent (R7)",
            ));
        }
        if person.is_minor && !by_guardian {
            return Err(Error::precondition(
                "a person under 14 cannot consent to face processing themselves; their linked guardian must grant it (PIPL Art. 31, R7)",
            ));
        }
        if !person.is_minor && by_guardian {
            return Err(Error::precondition("the person is not a minor and must consent themselves"));
        }
        self.require_estate(&tenant, &estate_id).await?;
        if !directory::resides_at(&self.db, &tenant, &person.id, &estate_id).await? {
            return Err(Error::precondition("the person has no active residency at this estate"));
        }

        let mut tx = self.db.begin().await?;
        if !self.face_enabled(&mut tx, &tenant, &estate_id).await? {
            return Err(Error::precondition("face verification is not enabled at this estate"));
        }
        let (notice_id, current_version, _) = self
            .current_notice(&mut tx, &tenant, &estate_id)
            .await?
            .ok_or_else(|| Error::precondition("the estate has published no notice; consent needs one"))?;
        if r.notice_version != current_version {
            return Err(Error::precondition(format!(
                "notice version {} is not the current one; show version {current_version} and ask again",
                r.notice_version
            )));
        }
        let (matches,): (i64,) = sqlx::query_as::<Any, (i64,)>(
            "SELECT COUNT(*) FROM consent_notice_texts WHERE tenant_id = $1 AND notice_id = $2 AND text_sha256 = $3",
        )
        .bind(&tenant)
        .bind(&notice_id)
        .bind(&shown_hash)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        if matches == 0 {
            return Err(Error::precondition(format!(
                "notice_text_sha256 does not match any text of notice version {current_version}; show the current text and ask again"
            )));
        }
        let guardian = if by_guardian {
            match &caller.principal {
                Principal::Resident { person_id, .. } => Some(person_id.clone()),
                _ => None,
            }
        } else {
            None
        };
        let row = ConsentRow {
            tenant_id: tenant.clone(),
            id: new_id(),
            estate_id: estate_id.clone(),
            person_id: person.id.clone(),
            person_pseudonym: person.pseudonym.clone(),
            purpose: FACE_PURPOSE.into(),
            notice_id,
            notice_version: current_version,
            notice_text_sha256: shown_hash,
            method: method.into(),
            paper_form_scan_sha256: scan,
            granted_by_guardian: i64::from(by_guardian),
            guardian_person_id: guardian,
            concerns_minor: i64::from(person.is_minor),
            status: ACTIVE.into(),
            granted_at: now_ms(),
            withdrawn_at: None,
            deletion_request_id: None,
        };
        sqlx::query::<Any>(sqlx::AssertSqlSafe(format!(
            "INSERT INTO consents ({CONSENT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
        )))
        .bind(&row.tenant_id)
        .bind(&row.id)
        .bind(&row.estate_id)
        .bind(&row.person_id)
        .bind(&row.person_pseudonym)
        .bind(&row.purpose)
        .bind(&row.notice_id)
        .bind(row.notice_version)
        .bind(&row.notice_text_sha256)
        .bind(&row.method)
        .bind(&row.paper_form_scan_sha256)
        .bind(row.granted_by_guardian)
        .bind(row.guardian_person_id.clone())
        .bind(row.concerns_minor)
        .bind(&row.status)
        .bind(row.granted_at)
        .bind(row.withdrawn_at)
        .bind(row.deletion_request_id.clone())
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::AlreadyExists("the person already has an active face consent at this estate".into())
            } else {
                db_error(e)
            }
        })?;
        let change = Change::new(&tenant, "consent.grant", "consent", &row.id)
            .estate(&estate_id)
            .person(&row.person_pseudonym, person.is_minor)
            .attr("purpose", FACE_PURPOSE)
            .attr("notice_version", current_version.to_string())
            .attr("notice_text_sha256", row.notice_text_sha256.clone())
            .attr("method", method)
            .attr("granted_by", if by_guardian { "guardian" } else { "self" });
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        if let Ok(status) = self.filing_status(&tenant).await
            && status.level != FilingLevel::Ok as i32
        {
            tracing::warn!(tenant_id = %tenant, persons = status.persons_with_face_consent, "{}", status.message);
        }
        Ok(row.into())
    }

    async fn consent_row(&self, conn: &mut AnyConnection, tenant_id: &str, id: &str) -> Result<ConsentRow> {
        sqlx::query_as::<Any, ConsentRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {CONSENT_COLS} FROM consents WHERE tenant_id = $1 AND id = $2"
        )))
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?
        .ok_or(Error::NotFound("consent"))
    }

    /// Loads a consent the caller may see: its own or its ward's for a
    /// resident, one of an estate in scope for an operator.
    async fn visible_consent(&self, conn: &mut AnyConnection, caller: &Caller, id: &str) -> Result<ConsentRow> {
        match &caller.principal {
            Principal::Resident { tenant_id, person_id } => {
                let row = self.consent_row(conn, tenant_id, id).await.map_err(|_| not_yours())?;
                if row.person_id == *person_id {
                    return Ok(row);
                }
                let facts = directory::person(&self.db, tenant_id, &row.person_id).await?;
                if facts.and_then(|f| f.guardian_person_id).as_deref() == Some(person_id.as_str()) {
                    Ok(row)
                } else {
                    Err(not_yours())
                }
            }
            Principal::Gate { tenant_id, estate_id, .. } => {
                let row = self.consent_row(conn, tenant_id, id).await?;
                if row.estate_id == *estate_id { Ok(row) } else { Err(Error::NotFound("consent")) }
            }
            _ => {
                let tenant = caller.operator_tenant()?;
                let row = self.consent_row(conn, tenant, id).await?;
                caller.operator_for_estate(&row.estate_id)?;
                Ok(row)
            }
        }
    }

    async fn withdraw_consent(&self, caller: &Caller, r: WithdrawConsentRequest) -> Result<Consent> {
        let id = parse_id("consent_id", &r.consent_id)?;
        if !matches!(caller.principal, Principal::Resident { .. }) {
            return Err(Error::denied("only the person (or their guardian) withdraws their consent"));
        }
        let mut tx = self.db.begin().await?;
        let mut row = self.visible_consent(&mut tx, caller, &id).await?;
        if row.status != ACTIVE {
            return Ok(row.into());
        }
        let request_id = request_deletion(
            &mut tx,
            &row.tenant_id,
            &row.estate_id,
            &row.person_pseudonym,
            DeletionReason::ConsentWithdrawn,
            &row.id,
        )
        .await?
        .ok_or_else(|| Error::Internal("a deletion request for this consent exists already".into()))?;
        let now = now_ms();
        sqlx::query::<Any>(
            "UPDATE consents SET status = $1, withdrawn_at = $2, deletion_request_id = $3 WHERE tenant_id = $4 AND id = $5 AND status = $6",
        )
        .bind(WITHDRAWN)
        .bind(now)
        .bind(&request_id)
        .bind(&row.tenant_id)
        .bind(&row.id)
        .bind(ACTIVE)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        row.status = WITHDRAWN.into();
        row.withdrawn_at = Some(now);
        row.deletion_request_id = Some(request_id.clone());
        let change = Change::new(&row.tenant_id, "consent.withdraw", "consent", &row.id)
            .estate(&row.estate_id)
            .person(&row.person_pseudonym, row.concerns_minor != 0)
            .attr("deletion_request_id", request_id);
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        self.announce_deletion_request().await;
        Ok(row.into())
    }

    async fn get_consent(&self, caller: &Caller, r: GetConsentRequest) -> Result<Consent> {
        let id = parse_id("id", &r.id)?;
        let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
        Ok(self.visible_consent(&mut conn, caller, &id).await?.into())
    }

    async fn list_consents(&self, caller: &Caller, r: ListConsentsRequest) -> Result<ListConsentsResponse> {
        let page = Page::parse(r.page_size, &r.page_token, self.options.max_page_size)?;
        let mut f = Filter::default();
        match &caller.principal {
            Principal::Resident { tenant_id, person_id } => {
                let mut allowed = directory::wards_of(&self.db, tenant_id, person_id).await?;
                allowed.push(person_id.clone());
                f.eq("tenant_id", tenant_id);
                if r.person_id.is_empty() {
                    f.one_of("person_id", &allowed);
                } else if allowed.contains(&r.person_id) {
                    f.eq("person_id", &r.person_id);
                } else {
                    return Err(not_yours());
                }
                if !r.estate_id.is_empty() {
                    f.eq("estate_id", &parse_id("estate_id", &r.estate_id)?);
                }
            }
            _ => {
                let tenant = caller.operator_tenant()?;
                f.eq("tenant_id", tenant);
                if !r.estate_id.is_empty() {
                    let estate_id = parse_id("estate_id", &r.estate_id)?;
                    caller.operator_for_estate(&estate_id)?;
                    f.eq("estate_id", &estate_id);
                } else if let Some(limit) = caller.operator_estate_limit() {
                    f.one_of("estate_id", limit);
                }
                if !r.person_id.is_empty() {
                    f.eq("person_id", &parse_id("person_id", &r.person_id)?);
                }
            }
        }
        if !r.include_inactive {
            f.raw("status = 'active'");
        }
        let (sql, binds) = f.page_sql(CONSENT_COLS, "consents", &page);
        let rows: Vec<ConsentRow> = fetch_page(self.db.pool(), sql, binds).await.map_err(db_error)?;
        let (rows, next) = page.finish(rows, |r| &r.id);
        Ok(ListConsentsResponse { consents: rows.into_iter().map(Into::into).collect(), next_page_token: next })
    }

    // ---- attestations ----

    async fn issue_attestation(&self, caller: &Caller, r: IssueAttestationRequest) -> Result<SignedAttestation> {
        let id = parse_id("consent_id", &r.consent_id)?;
        let ttl = match r.ttl_seconds {
            0 => self.options.attestation_ttl_secs,
            n if (1..=MAX_ATTESTATION_TTL_SECS).contains(&n) => n,
            _ => return Err(Error::invalid("ttl_seconds", "must be between 1 and 3600 seconds")),
        };
        let mut tx = self.db.begin().await?;
        let row = self.visible_consent(&mut tx, caller, &id).await?;
        if row.status != ACTIVE {
            return Err(Error::precondition("the consent is not active; no attestation can be issued"));
        }
        if !self.face_enabled(&mut tx, &row.tenant_id, &row.estate_id).await? {
            return Err(Error::precondition("face verification is not enabled at this estate"));
        }
        let now = now_ms() / 1000;
        let claims = AttestationClaims {
            format: FORMAT,
            tenant_id: row.tenant_id.clone(),
            estate_id: row.estate_id.clone(),
            person_pseudonym: row.person_pseudonym.clone(),
            purpose: Purpose::FaceVerificationAtGates as i32,
            notice_text_sha256: row.notice_text_sha256.clone(),
            consent_id: row.id.clone(),
            issued_at_unix: now,
            expires_at_unix: now + ttl,
            concerns_minor: row.concerns_minor != 0,
        };
        let signed = estate_attestation::sign(&self.signing, &claims);
        let change = Change::new(&row.tenant_id, "consent.attest", "consent", &row.id)
            .estate(&row.estate_id)
            .person(&row.person_pseudonym, row.concerns_minor != 0)
            .attr("key_id", signed.key_id.clone())
            .attr("expires_at_unix", claims.expires_at_unix.to_string());
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(signed)
    }

    fn verifying_keys(&self) -> VerifyingKeys {
        VerifyingKeys { keys: vec![KeySet::published_key(&self.signing)] }
    }

    // ---- assessments, face enablement, filing ----

    async fn record_impact_assessment(
        &self,
        caller: &Caller,
        r: RecordImpactAssessmentRequest,
    ) -> Result<ImpactAssessment> {
        let estate_id = parse_id("estate_id", &r.estate_id)?;
        let tenant = caller.operator_for_estate(&estate_id)?.to_owned();
        let author = required_text("author", &r.author, 200)?;
        let assessed_on = BirthDate::parse("assessed_on", &r.assessed_on)?.to_iso();
        let document_sha256 = sha256_field("document_sha256", &r.document_sha256)?;
        self.require_estate(&tenant, &estate_id).await?;
        let row = AssessmentRow {
            id: new_id(),
            estate_id: estate_id.clone(),
            author,
            assessed_on,
            document_sha256,
            recorded_at: now_ms(),
        };
        let mut tx = self.db.begin().await?;
        sqlx::query::<Any>(
            "INSERT INTO impact_assessments (tenant_id, id, estate_id, author, assessed_on, document_sha256, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&tenant)
        .bind(&row.id)
        .bind(&row.estate_id)
        .bind(&row.author)
        .bind(&row.assessed_on)
        .bind(&row.document_sha256)
        .bind(row.recorded_at)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let change = Change::new(&tenant, "impact_assessment.record", "impact_assessment", &row.id)
            .estate(&estate_id)
            .attr("assessed_on", row.assessed_on.clone())
            .attr("document_sha256", row.document_sha256.clone());
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    async fn face_status(&self, tenant: &str, estate_id: &str) -> Result<FaceVerificationStatus> {
        let row: Option<(i64, Option<String>, i64)> = sqlx::query_as::<Any, (i64, Option<String>, i64)>(
            "SELECT enabled, assessment_id, updated_at FROM face_verification WHERE tenant_id = $1 AND estate_id = $2",
        )
        .bind(tenant)
        .bind(estate_id)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_error)?;
        Ok(match row {
            Some((enabled, assessment, updated)) => FaceVerificationStatus {
                estate_id: estate_id.to_owned(),
                enabled: enabled != 0,
                assessment_id: assessment.unwrap_or_default(),
                updated_at: ts(updated),
            },
            None => FaceVerificationStatus { estate_id: estate_id.to_owned(), ..Default::default() },
        })
    }

    async fn set_face_verification(
        &self,
        caller: &Caller,
        r: SetFaceVerificationRequest,
    ) -> Result<FaceVerificationStatus> {
        let estate_id = parse_id("estate_id", &r.estate_id)?;
        let tenant = caller.operator_for_estate(&estate_id)?.to_owned();
        self.require_estate(&tenant, &estate_id).await?;
        let mut tx = self.db.begin().await?;
        let assessment: Option<(String,)> = sqlx::query_as::<Any, (String,)>(
            "SELECT id FROM impact_assessments WHERE tenant_id = $1 AND estate_id = $2 ORDER BY recorded_at DESC, id DESC LIMIT 1",
        )
        .bind(&tenant)
        .bind(&estate_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let assessment_id = match (r.enabled, assessment) {
            (true, None) => {
                return Err(Error::precondition(
                    "record an impact assessment for this estate before enabling face verification (R16)",
                ));
            }
            (true, Some((id,))) => Some(id),
            (false, _) => None,
        };
        let now = now_ms();
        sqlx::query::<Any>(
            "INSERT INTO face_verification (tenant_id, estate_id, enabled, assessment_id, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant_id, estate_id) DO UPDATE SET enabled = excluded.enabled, \
             assessment_id = excluded.assessment_id, updated_at = excluded.updated_at",
        )
        .bind(&tenant)
        .bind(&estate_id)
        .bind(i64::from(r.enabled))
        .bind(assessment_id.clone())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let action = if r.enabled { "face_verification.enable" } else { "face_verification.disable" };
        let change = Change::new(&tenant, action, "estate", &estate_id)
            .estate(&estate_id)
            .attr("assessment_id", assessment_id.clone().unwrap_or_default());
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(FaceVerificationStatus {
            estate_id,
            enabled: r.enabled,
            assessment_id: assessment_id.unwrap_or_default(),
            updated_at: ts(now),
        })
    }

    async fn get_face_verification(
        &self,
        caller: &Caller,
        r: GetFaceVerificationRequest,
    ) -> Result<FaceVerificationStatus> {
        let estate_id = parse_id("estate_id", &r.estate_id)?;
        let tenant = Self::reader_tenant(caller, &estate_id)?;
        self.require_estate(&tenant, &estate_id).await?;
        self.face_status(&tenant, &estate_id).await
    }

    async fn filing_status(&self, tenant: &str) -> Result<FilingStatus> {
        let (n,): (i64,) = sqlx::query_as::<Any, (i64,)>(
            "SELECT COUNT(DISTINCT person_pseudonym) FROM consents WHERE tenant_id = $1 AND status = 'active' AND purpose = $2",
        )
        .bind(tenant)
        .bind(FACE_PURPOSE)
        .fetch_one(self.db.pool())
        .await
        .map_err(db_error)?;
        let templates = match &self.face {
            Some(face) => match face.count(tenant).await {
                Ok(c) => i64::try_from(c.persons).unwrap_or(i64::MAX),
                Err(e) => {
                    tracing::warn!(error = %e, "facematch did not count; the filing status uses consents only");
                    -1
                }
            },
            None => -1,
        };
        let held = if templates >= 0 { format!("; facematch holds face data of {templates}") } else { String::new() };
        let consented = n;
        let n = n.max(templates);
        let (warn, threshold) = (self.options.filing_warning_at, self.options.filing_threshold);
        let (level, message) = if n >= threshold {
            (
                FilingLevel::FilingRequired,
                format!(
                    "{n} persons have face consent: at {threshold} the filing with the provincial regulator is due"
                ),
            )
        } else if n >= warn {
            (
                FilingLevel::Warning,
                format!("{n} persons have face consent: prepare the regulator filing due at {threshold}"),
            )
        } else {
            (FilingLevel::Ok, format!("{n} persons have face consent; the filing is due at {threshold}"))
        };
        Ok(FilingStatus {
            persons_with_face_consent: consented,
            warning_at: warn,
            filing_threshold: threshold,
            level: level as i32,
            message: format!("{message}{held}"),
            persons_with_templates: templates,
        })
    }

    async fn get_filing_status(&self, caller: &Caller, _r: GetFilingStatusRequest) -> Result<FilingStatus> {
        let tenant = caller.operator_tenant()?.to_owned();
        self.filing_status(&tenant).await
    }

    async fn list_deletion_requests(
        &self,
        caller: &Caller,
        r: ListDeletionRequestsRequest,
    ) -> Result<ListDeletionRequestsResponse> {
        let tenant = caller.operator_tenant()?.to_owned();
        let estate_id = if r.estate_id.is_empty() {
            if caller.operator_estate_limit().is_some() {
                return Err(Error::invalid("estate_id", "is required for an estate-limited operator"));
            }
            String::new()
        } else {
            let e = parse_id("estate_id", &r.estate_id)?;
            caller.operator_for_estate(&e)?;
            e
        };
        let rows = deletion::list(&self.db, &tenant, &estate_id, r.pending_only).await?;
        Ok(ListDeletionRequestsResponse { requests: rows.into_iter().map(Into::into).collect() })
    }

    async fn request_face_deletion(&self, caller: &Caller, r: RequestFaceDeletionRequest) -> Result<DeletionRequest> {
        let Principal::Resident { tenant_id, person_id: me } = &caller.principal else {
            return Err(Error::denied("only the person (or their guardian) asks for their face data to be deleted"));
        };
        let estate_id = parse_id("estate_id", &r.estate_id)?;
        let target = if r.person_id.is_empty() { me.clone() } else { parse_id("person_id", &r.person_id)? };
        let facts = directory::person(&self.db, tenant_id, &target).await?.ok_or_else(not_yours)?;
        if target != *me && facts.guardian_person_id.as_deref() != Some(me.as_str()) {
            return Err(not_yours());
        }
        let mut tx = self.db.begin().await?;
        let request_id = request_deletion(
            &mut tx,
            tenant_id,
            &estate_id,
            &facts.pseudonym,
            DeletionReason::PersonRequest,
            &format!("request:{}", new_id()),
        )
        .await?
        .ok_or_else(|| Error::Internal("a fresh deletion request collided".into()))?;
        let ended = sqlx::query::<Any>(
            "UPDATE consents SET status = $1, withdrawn_at = $2, deletion_request_id = $3 \
             WHERE tenant_id = $4 AND person_pseudonym = $5 AND estate_id = $6 AND status = $7",
        )
        .bind(WITHDRAWN)
        .bind(now_ms())
        .bind(&request_id)
        .bind(tenant_id)
        .bind(&facts.pseudonym)
        .bind(&estate_id)
        .bind(ACTIVE)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?
        .rows_affected();
        let change = Change::new(tenant_id, "face_deletion.request", "face_deletion_request", &request_id)
            .estate(&estate_id)
            .person(&facts.pseudonym, facts.is_minor)
            .attr("reason", reason_name(DeletionReason::PersonRequest))
            .attr("consents_ended", ended.to_string());
        self.record(&mut tx, caller, change).await?;
        let row = sqlx::query_as::<Any, DeletionRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {DELETION_COLS} FROM face_deletion_requests WHERE tenant_id = $1 AND id = $2"
        )))
        .bind(tenant_id)
        .bind(&request_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        self.announce_deletion_request().await;
        Ok(row.into())
    }

    async fn get_deletion_certificate(
        &self,
        caller: &Caller,
        r: GetDeletionCertificateRequest,
    ) -> Result<StoredCertificate> {
        let id = parse_id("deletion_request_id", &r.deletion_request_id)?;
        let tenant = match &caller.principal {
            Principal::Resident { tenant_id, .. } => tenant_id.clone(),
            _ => caller.operator_tenant()?.to_owned(),
        };
        let row: Option<(String, String, Option<String>, Option<String>)> =
            sqlx::query_as::<Any, (String, String, Option<String>, Option<String>)>(
                "SELECT estate_id, person_pseudonym, certificate_id, certificate FROM face_deletion_requests \
                 WHERE tenant_id = $1 AND id = $2",
            )
            .bind(&tenant)
            .bind(&id)
            .fetch_optional(self.db.pool())
            .await
            .map_err(db_error)?;
        let (estate_id, pseudonym, certificate_id, certificate) = row.ok_or(Error::NotFound("deletion request"))?;
        match &caller.principal {
            Principal::Resident { tenant_id, person_id } => {
                if self.hasher.pseudonym(tenant_id, person_id) != pseudonym {
                    // A guardian sees their ward's, through the ward's consent.
                    let consent: Option<(String,)> = sqlx::query_as::<Any, (String,)>(
                        "SELECT id FROM consents WHERE tenant_id = $1 AND deletion_request_id = $2",
                    )
                    .bind(&tenant)
                    .bind(&id)
                    .fetch_optional(self.db.pool())
                    .await
                    .map_err(db_error)?;
                    let (consent_id,) = consent.ok_or(Error::NotFound("deletion request"))?;
                    let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
                    self.visible_consent(&mut conn, caller, &consent_id)
                        .await
                        .map_err(|_| Error::NotFound("deletion request"))?;
                }
            }
            _ => {
                caller.operator_for_estate(&estate_id)?;
            }
        }
        let (Some(certificate_id), Some(encoded)) = (certificate_id, certificate) else {
            return Err(Error::precondition(
                "the deletion is still pending; the certificate exists once facematch has deleted the data (within seconds when it is reachable)",
            ));
        };
        let certificate = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| Error::Internal("a stored certificate is not base64".into()))?;
        Ok(StoredCertificate { deletion_request_id: id, certificate_id, certificate })
    }
}

#[tonic::async_trait]
impl ConsentService for ConsentBook {
    estate_auth::unary_rpcs! {
        "consent", ConsentBook;
        publish_notice(PublishNoticeRequest) -> Notice;
        get_current_notice(GetCurrentNoticeRequest) -> NoticeText;
        list_notices(ListNoticesRequest) -> ListNoticesResponse;
        grant_consent(GrantConsentRequest) -> Consent;
        withdraw_consent(WithdrawConsentRequest) -> Consent;
        get_consent(GetConsentRequest) -> Consent;
        list_consents(ListConsentsRequest) -> ListConsentsResponse;
        issue_attestation(IssueAttestationRequest) -> SignedAttestation;
        record_impact_assessment(RecordImpactAssessmentRequest) -> ImpactAssessment;
        set_face_verification(SetFaceVerificationRequest) -> FaceVerificationStatus;
        get_face_verification(GetFaceVerificationRequest) -> FaceVerificationStatus;
        get_filing_status(GetFilingStatusRequest) -> FilingStatus;
        list_deletion_requests(ListDeletionRequestsRequest) -> ListDeletionRequestsResponse;
        get_deletion_certificate(GetDeletionCertificateRequest) -> StoredCertificate;
        request_face_deletion(RequestFaceDeletionRequest) -> DeletionRequest;
    }

    async fn get_verifying_keys(
        &self,
        _request: Request<GetVerifyingKeysRequest>,
    ) -> std::result::Result<Response<VerifyingKeys>, Status> {
        Ok(Response::new(self.verifying_keys()))
    }
}
