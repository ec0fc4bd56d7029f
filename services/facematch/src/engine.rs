//! One tenant's face engine: enrolment, matching, deletion with
//! crypto-shredding and certificates, over its own SQLite file and key vault.
//! Callers (the gRPC service, or the gate and consent services in-process)
//! have already established that the caller acts for this tenant.

use crate::certificate;
use crate::gallery::{Entry, Gallery, normalised};
use crate::journal;
use crate::model::{Embedder, MAX_IMAGE_BYTES};
use crate::vault::{self, Vault, VaultError};
use estate_attestation::{AttestationError, Expected, KeySet};
use estate_core::{Error, Result, new_id, now_ms, parse_id};
use estate_crypto::SigningKeyPair;
use estate_proto::common::Actor;
use estate_proto::consent::Purpose;
use estate_proto::facematch::{
    CertificateBody, DeleteRequest, DeletionCertificate, DeletionReason, EnrolRequest, EnrolResponse, EnrolledPerson,
    FaceSample, IdentifyRequest, MatchResult, PersonCount, Threshold, VerifyRequest,
};
use estate_store::outbox::Change;
use estate_store::{Db, DbOptions, db_error};
use prost::Message;
use sqlx::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Galleries larger than this are scanned on the blocking pool.
const BLOCKING_SCAN_ROWS: usize = 4096;
const MAX_DIM: usize = 4096;

/// Settings of one engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Template dimension.
    pub dimension: usize,
    /// Default match threshold (cosine).
    pub threshold: f32,
    /// Most templates per person per estate.
    pub max_templates_per_person: u32,
}

/// One tenant's face data and matching.
pub struct FaceEngine {
    tenant_id: String,
    db: Db,
    vault: Vault,
    signer: SigningKeyPair,
    consent_keys: KeySet,
    embedder: Option<Arc<Embedder>>,
    options: EngineOptions,
    galleries: RwLock<HashMap<String, Arc<RwLock<Gallery>>>>,
    thresholds: RwLock<HashMap<String, f32>>,
    /// Serialises enrolment and deletion of this tenant (rare writes).
    writes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for FaceEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaceEngine").field("tenant_id", &self.tenant_id).finish_non_exhaustive()
    }
}

fn vault_error(e: VaultError) -> Error {
    match e {
        VaultError::Missing(_) | VaultError::Decrypt => Error::Internal(e.to_string()),
        other => Error::Unavailable(format!("facematch storage: {other}")),
    }
}

fn lock_error<T>(_: T) -> Error {
    Error::Internal("a facematch lock was poisoned".into())
}

/// Checks a pseudonymous person id: what the mesh issues (`psn_` + hex) or
/// any short token of letters, digits, `_` and `-`.
pub fn check_pseudonym(field: &'static str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > 128 || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(Error::invalid(field, "must be a pseudonymous person id (letters, digits, _ and -)"));
    }
    Ok(value.to_owned())
}

fn attestation_error(e: AttestationError) -> Error {
    match e {
        AttestationError::Malformed | AttestationError::UnsupportedFormat(_) => {
            Error::invalid("attestation", format!("{e}; ask the consent service for a new one"))
        }
        AttestationError::Expired | AttestationError::NotYetValid => {
            Error::precondition(format!("{e}; ask the consent service for a fresh attestation"))
        }
        AttestationError::UnknownKey | AttestationError::BadSignature => {
            Error::denied(format!("{e}; only attestations signed by this tenant's consent service are accepted"))
        }
        AttestationError::WrongTenant | AttestationError::WrongEstate | AttestationError::WrongPurpose => {
            Error::denied(format!("{e}; an attestation is valid only for the tenant, estate and purpose it names"))
        }
    }
}

fn template_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn template_from_bytes(b: &[u8]) -> Option<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return None;
    }
    Some(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn reason_name(r: DeletionReason) -> &'static str {
    match r {
        DeletionReason::Withdrawal => "withdrawal",
        DeletionReason::MoveOut => "move_out",
        DeletionReason::Request => "request",
        DeletionReason::Retention => "retention",
        DeletionReason::Unspecified => "unspecified",
    }
}

impl FaceEngine {
    /// Opens the engine of `tenant_id` in `dir` (SQLite file `faces.db`, key
    /// vault `vault/`, certificate key `certificate.ed25519`), loads every
    /// template into memory and destroys data keys a crash left orphaned.
    pub async fn open(
        tenant_id: &str,
        dir: &Path,
        tenant_key: [u8; 32],
        consent_keys: KeySet,
        embedder: Option<Arc<Embedder>>,
        options: EngineOptions,
        generate_keys: bool,
    ) -> Result<Self> {
        if options.dimension == 0 || options.dimension > MAX_DIM {
            return Err(Error::precondition(format!("facematch.dimension must be 1..={MAX_DIM}")));
        }
        if let Some(e) = &embedder
            && e.dim() != options.dimension
        {
            return Err(Error::precondition("the face model's output does not match facematch.dimension"));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::Unavailable(format!("{}: {e}", dir.display())))?;
        let db = Db::connect(&DbOptions {
            url: format!("sqlite://{}", dir.join("faces.db").display()),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout_ms: 0,
        })
        .await
        .map_err(|e| Error::Unavailable(format!("facematch database: {e}")))?;
        db.migrate("facematch", sqlx::migrate!("./migrations"))
            .await
            .map_err(|e| Error::Unavailable(format!("facematch migrations: {e}")))?;
        let bound: Option<(String,)> =
            sqlx::query_as::<Any, (String,)>("SELECT value FROM fm_meta WHERE name = 'tenant_id'")
                .fetch_optional(db.pool())
                .await
                .map_err(db_error)?;
        match bound {
            Some((t,)) if t != tenant_id => {
                return Err(Error::precondition(format!(
                    "{} belongs to another tenant; each tenant has its own facematch data",
                    dir.display()
                )));
            }
            Some(_) => {}
            None => {
                sqlx::query::<Any>("INSERT INTO fm_meta (name, value) VALUES ('tenant_id', $1)")
                    .bind(tenant_id)
                    .execute(db.pool())
                    .await
                    .map_err(db_error)?;
            }
        }
        let signer = SigningKeyPair::load_or_generate(&dir.join("certificate.ed25519"), generate_keys)
            .map_err(|e| Error::Unavailable(format!("facematch certificate key: {e}")))?;
        let vault = Vault::open(&dir.join("vault"), tenant_id, tenant_key).map_err(vault_error)?;
        let engine = Self {
            tenant_id: tenant_id.to_owned(),
            db,
            vault,
            signer,
            consent_keys,
            embedder,
            options,
            galleries: RwLock::new(HashMap::new()),
            thresholds: RwLock::new(HashMap::new()),
            writes: tokio::sync::Mutex::new(()),
        };
        engine.destroy_orphan_keys().await?;
        engine.load().await?;
        Ok(engine)
    }

    /// The tenant this engine serves.
    pub fn tenant_id(&self) -> &str {
        &self.tenant_id
    }

    /// The database (tests read it to show what is stored).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The published certificate verifying key.
    pub fn certificate_key(&self) -> estate_proto::consent::VerifyingKey {
        KeySet::published_key(&self.signer)
    }

    async fn destroy_orphan_keys(&self) -> Result<()> {
        let live: Vec<(String,)> = sqlx::query_as::<Any, (String,)>("SELECT key_id FROM fm_persons")
            .fetch_all(self.db.pool())
            .await
            .map_err(db_error)?;
        let live: std::collections::HashSet<String> = live.into_iter().map(|(k,)| k).collect();
        for id in self.vault.key_ids().map_err(vault_error)? {
            if !live.contains(&id) {
                self.vault.destroy(&id).map_err(vault_error)?;
            }
        }
        Ok(())
    }

    async fn load(&self) -> Result<()> {
        let rows: Vec<(String, String, String, String, Vec<u8>)> = sqlx::query_as::<Any, (String, String, String, String, Vec<u8>)>(
            "SELECT t.id, t.estate_id, t.person_pseudonym, t.key_id, t.sealed FROM fm_templates t ORDER BY t.created_at, t.id",
        )
        .fetch_all(self.db.pool())
        .await
        .map_err(db_error)?;
        let consents: Vec<(String, String, String)> = sqlx::query_as::<Any, (String, String, String)>(
            "SELECT estate_id, person_pseudonym, consent_id FROM fm_persons",
        )
        .fetch_all(self.db.pool())
        .await
        .map_err(db_error)?;
        let consents: HashMap<(String, String), String> = consents.into_iter().map(|(e, p, c)| ((e, p), c)).collect();
        let mut keys: HashMap<String, [u8; 32]> = HashMap::new();
        let mut galleries: HashMap<String, Gallery> = HashMap::new();
        for (id, estate, person, key_id, sealed) in rows {
            let key = match keys.get(&key_id) {
                Some(k) => *k,
                None => {
                    let k = self.vault.get(&key_id).map_err(vault_error)?;
                    keys.insert(key_id.clone(), k);
                    k
                }
            };
            let plain = vault::open(&key, self.template_aad(&id).as_bytes(), &sealed).map_err(vault_error)?;
            let v = template_from_bytes(&plain)
                .filter(|v| v.len() == self.options.dimension)
                .ok_or_else(|| Error::Internal(format!("template {id} does not have the configured dimension")))?;
            let consent_id = consents.get(&(estate.clone(), person.clone())).cloned().unwrap_or_default();
            galleries
                .entry(estate)
                .or_insert_with(|| Gallery::new(self.options.dimension))
                .push(Entry { template_id: id, person, consent_id }, &v);
        }
        let thresholds: Vec<(String, f64)> =
            sqlx::query_as::<Any, (String, f64)>("SELECT estate_id, threshold FROM fm_thresholds")
                .fetch_all(self.db.pool())
                .await
                .map_err(db_error)?;
        *self.thresholds.write().map_err(lock_error)? = thresholds.into_iter().map(|(e, t)| (e, t as f32)).collect();
        *self.galleries.write().map_err(lock_error)? =
            galleries.into_iter().map(|(e, g)| (e, Arc::new(RwLock::new(g)))).collect();
        Ok(())
    }

    fn template_aad(&self, template_id: &str) -> String {
        format!("estate.facematch.template.v1\0{}\0{template_id}", self.tenant_id)
    }

    fn gallery(&self, estate_id: &str) -> Result<Option<Arc<RwLock<Gallery>>>> {
        Ok(self.galleries.read().map_err(lock_error)?.get(estate_id).cloned())
    }

    fn threshold(&self, estate_id: &str) -> Result<f32> {
        Ok(self.thresholds.read().map_err(lock_error)?.get(estate_id).copied().unwrap_or(self.options.threshold))
    }

    /// A unit template from a sample: the given vector, or the model's
    /// embedding of the given image (decoded in memory, never stored).
    pub async fn template_of(&self, field: &'static str, sample: Option<FaceSample>) -> Result<Vec<f32>> {
        let sample = sample.ok_or_else(|| Error::invalid(field, "send a template or an aligned face image"))?;
        let raw = match (sample.template.is_empty(), sample.image.is_empty()) {
            (true, true) => return Err(Error::invalid(field, "send a template or an aligned face image")),
            (false, false) => return Err(Error::invalid(field, "send a template or an image, not both")),
            (false, true) => {
                if sample.template.len() != self.options.dimension {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "a template of this tenant has {} numbers, not {}",
                            self.options.dimension,
                            sample.template.len()
                        ),
                    ));
                }
                sample.template
            }
            (true, false) => {
                if sample.image.len() > MAX_IMAGE_BYTES {
                    return Err(Error::invalid(field, format!("the image must be at most {MAX_IMAGE_BYTES} bytes")));
                }
                let embedder = self.embedder.clone().ok_or_else(|| {
                    Error::precondition(
                        "this facematch instance has no face model configured (facematch.model_path); send a template extracted on the terminal",
                    )
                })?;
                let image = sample.image;
                tokio::task::spawn_blocking(move || embedder.embed(&image))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))?
                    .map_err(|e| match e {
                        crate::model::ModelError::Image(m) => Error::invalid(field, m),
                        other => Error::Unavailable(other.to_string()),
                    })?
            }
        };
        normalised(&raw).ok_or_else(|| Error::invalid(field, "the template must be finite numbers, not all zero"))
    }

    /// Enrols a template (R7 via the attestation, R8, R9), journalled as
    /// `face.enrol` by `actor` (R11).
    pub async fn enrol(&self, req: EnrolRequest, now_unix: i64, actor: Actor) -> Result<EnrolResponse> {
        let estate_id = parse_id("estate_id", &req.estate_id)?;
        let person = check_pseudonym("person_pseudonym", &req.person_pseudonym)?;
        let att = req.attestation.as_ref().ok_or_else(|| {
            Error::invalid("attestation", "a consent attestation is required; issue one with the consent service")
        })?;
        let claims = estate_attestation::verify(
            att,
            &self.consent_keys,
            &Expected { tenant_id: &self.tenant_id, estate_id: &estate_id, purpose: Purpose::FaceVerificationAtGates },
            now_unix,
        )
        .map_err(attestation_error)?;
        if claims.person_pseudonym != person {
            return Err(Error::denied(
                "the attestation is for another person; an attestation is valid only for the person it names",
            ));
        }
        let request_id = if req.request_id.is_empty() { new_id() } else { req.request_id.clone() };
        if request_id.len() > 128 {
            return Err(Error::invalid("request_id", "must be at most 128 characters"));
        }
        let unit = self.template_of("face", req.face).await?;

        let _guard = self.writes.lock().await;
        if let Some(done) = self.enrolment_of(&request_id).await? {
            return Ok(done);
        }
        let existing: Option<(String,)> = sqlx::query_as::<Any, (String,)>(
            "SELECT key_id FROM fm_persons WHERE estate_id = $1 AND person_pseudonym = $2",
        )
        .bind(&estate_id)
        .bind(&person)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_error)?;
        let count = self.template_count(&estate_id, &person).await?;
        if count >= i64::from(self.options.max_templates_per_person) {
            return Err(Error::precondition(format!(
                "this person already has {count} templates at this estate (the most allowed); delete them before enrolling again"
            )));
        }
        let (key_id, key, created) = match existing {
            Some((key_id,)) => {
                let key = self.vault.get(&key_id).map_err(vault_error)?;
                (key_id, key, false)
            }
            None => {
                let (key_id, key) = self.vault.create().map_err(vault_error)?;
                (key_id, key, true)
            }
        };
        let template_id = new_id();
        let sealed = vault::seal(&key, self.template_aad(&template_id).as_bytes(), &template_bytes(&unit))
            .map_err(vault_error)?;
        // A minor's attestation may be used by the child or by the guardian
        // who obtained it: facematch cannot tell which resident called, so
        // it names neither (consent's `attestation.issue` event names who
        // obtained the attestation `consent_id` refers to).
        let mut actor = actor;
        if claims.concerns_minor && actor.kind == estate_proto::common::ActorKind::Resident as i32 {
            actor.id.clear();
        }
        let event = Change::new(&self.tenant_id, "face.enrol", "face_template", &template_id)
            .estate(&estate_id)
            .person(&person, claims.concerns_minor)
            .attr("consent_id", claims.consent_id.clone())
            .attr("key_id", key_id.clone())
            .into_event(actor, &request_id, journal::SOURCE);
        let stored = self
            .store_enrolment(
                &estate_id,
                &person,
                &key_id,
                &claims.consent_id,
                &template_id,
                &sealed,
                &request_id,
                &event,
            )
            .await;
        if let Err(e) = stored {
            if created {
                let _ = self.vault.destroy(&key_id);
            }
            return Err(e);
        }
        let gallery = {
            let mut map = self.galleries.write().map_err(lock_error)?;
            map.entry(estate_id.clone())
                .or_insert_with(|| Arc::new(RwLock::new(Gallery::new(self.options.dimension))))
                .clone()
        };
        gallery.write().map_err(lock_error)?.push(
            Entry { template_id: template_id.clone(), person: person.clone(), consent_id: claims.consent_id.clone() },
            &unit,
        );
        tracing::info!(estate_id = %estate_id, "template enrolled");
        Ok(EnrolResponse { template_id, key_id, templates: u32::try_from(count + 1).unwrap_or(u32::MAX) })
    }

    #[allow(clippy::too_many_arguments)]
    async fn store_enrolment(
        &self,
        estate_id: &str,
        person: &str,
        key_id: &str,
        consent_id: &str,
        template_id: &str,
        sealed: &[u8],
        request_id: &str,
        event: &estate_proto::common::AuditEvent,
    ) -> Result<()> {
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        sqlx::query::<Any>(
            "INSERT INTO fm_persons (estate_id, person_pseudonym, key_id, consent_id, enrolled_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (estate_id, person_pseudonym) DO UPDATE SET consent_id = excluded.consent_id",
        )
        .bind(estate_id)
        .bind(person)
        .bind(key_id)
        .bind(consent_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query::<Any>(
            "INSERT INTO fm_templates (id, estate_id, person_pseudonym, key_id, sealed, request_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(template_id)
        .bind(estate_id)
        .bind(person)
        .bind(key_id)
        .bind(sealed)
        .bind(request_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        journal::record(&mut tx, event).await?;
        tx.commit().await.map_err(db_error)
    }

    async fn template_count(&self, estate_id: &str, person: &str) -> Result<i64> {
        let (count,): (i64,) = sqlx::query_as::<Any, (i64,)>(
            "SELECT COUNT(*) FROM fm_templates WHERE estate_id = $1 AND person_pseudonym = $2",
        )
        .bind(estate_id)
        .bind(person)
        .fetch_one(self.db.pool())
        .await
        .map_err(db_error)?;
        Ok(count)
    }

    async fn enrolment_of(&self, request_id: &str) -> Result<Option<EnrolResponse>> {
        let row: Option<(String, String, String, String)> = sqlx::query_as::<Any, (String, String, String, String)>(
            "SELECT id, key_id, estate_id, person_pseudonym FROM fm_templates WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_error)?;
        let Some((template_id, key_id, estate, person)) = row else { return Ok(None) };
        let count = self.template_count(&estate, &person).await?;
        Ok(Some(EnrolResponse { template_id, key_id, templates: u32::try_from(count).unwrap_or(u32::MAX) }))
    }

    async fn scan(&self, estate_id: &str, unit: Vec<f32>, person: Option<String>) -> Result<MatchResult> {
        let threshold = self.threshold(estate_id)?;
        let no_match = MatchResult { matched: false, threshold, ..Default::default() };
        let Some(gallery) = self.gallery(estate_id)? else { return Ok(no_match) };
        let big = gallery.read().map_err(lock_error)?.len() > BLOCKING_SCAN_ROWS;
        let run = move || -> Result<Option<(Entry, f32)>> {
            let g = gallery.read().map_err(lock_error)?;
            let hit = match &person {
                Some(p) => g.best_of(&unit, p),
                None => g.best(&unit),
            };
            Ok(hit.and_then(|h| g.entry(h.row).map(|e| (e.clone(), h.score))))
        };
        let best = if big {
            tokio::task::spawn_blocking(run).await.map_err(|e| Error::Internal(e.to_string()))??
        } else {
            run()?
        };
        Ok(match best {
            Some((entry, score)) if score >= threshold => MatchResult {
                matched: true,
                person_pseudonym: entry.person,
                score,
                threshold,
                consent_id: entry.consent_id,
            },
            Some((_, score)) => MatchResult { score, ..no_match },
            None => no_match,
        })
    }

    /// 1:N within one estate's gallery (R8: never across estates).
    /// `searcher`: who to journal the search as (`face.search`, R11); `None`
    /// for the gate service, which audits the decision the search is part of.
    pub async fn identify(&self, req: IdentifyRequest, searcher: Option<Actor>) -> Result<MatchResult> {
        let estate_id = parse_id("estate_id", &req.estate_id)?;
        let unit = self.template_of("probe", req.probe).await?;
        let result = self.scan(&estate_id, unit, None).await?;
        self.journal_search(&estate_id, "identify", &result, searcher).await?;
        Ok(result)
    }

    /// 1:1 against a claimed person at one estate.
    /// `searcher` as for [`Self::identify`].
    pub async fn verify(&self, req: VerifyRequest, searcher: Option<Actor>) -> Result<MatchResult> {
        let estate_id = parse_id("estate_id", &req.estate_id)?;
        let person = check_pseudonym("person_pseudonym", &req.person_pseudonym)?;
        let unit = self.template_of("probe", req.probe).await?;
        let result = self.scan(&estate_id, unit, Some(person.clone())).await?;
        let named = MatchResult { person_pseudonym: person, ..result.clone() };
        self.journal_search(&estate_id, "verify", &named, searcher).await?;
        Ok(result)
    }

    /// Journals a search of an estate's gallery: which estate, which person
    /// it concerned (the match, or the claimed person), whether it matched.
    async fn journal_search(
        &self,
        estate_id: &str,
        mode: &str,
        result: &MatchResult,
        searcher: Option<Actor>,
    ) -> Result<()> {
        let Some(actor) = searcher else { return Ok(()) };
        let event = Change::new(&self.tenant_id, "face.search", "face_gallery", estate_id)
            .estate(estate_id)
            .person(&result.person_pseudonym, false)
            .attr("mode", mode)
            .attr("matched", result.matched.to_string())
            .into_event(actor, "", journal::SOURCE);
        let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
        journal::record(&mut conn, &event).await
    }

    /// Deletes a person's face data at one estate or all, destroys their data
    /// keys and returns a signed certificate. The same request id returns
    /// the same certificate.
    /// Journalled as `face.delete`, one event per estate, by `actor` (R11).
    pub async fn delete(&self, req: DeleteRequest, actor: Actor) -> Result<DeletionCertificate> {
        let person = check_pseudonym("person_pseudonym", &req.person_pseudonym)?;
        let estate_id = if req.estate_id.is_empty() { None } else { Some(parse_id("estate_id", &req.estate_id)?) };
        let reason = DeletionReason::try_from(req.reason).unwrap_or(DeletionReason::Unspecified);
        if reason == DeletionReason::Unspecified {
            return Err(Error::invalid("reason", "say why: withdrawal, move-out, request or retention"));
        }
        if req.request_id.is_empty() || req.request_id.len() > 128 {
            return Err(Error::invalid("request_id", "is required (at most 128 characters); retries reuse it"));
        }
        let _guard = self.writes.lock().await;
        if let Some(cert) = self.certificate_by("request_id", &req.request_id).await? {
            return Ok(cert);
        }
        let scope_sql = if estate_id.is_some() { " AND estate_id = $2" } else { "" };
        let mut q = sqlx::query_as::<Any, (String, String)>(sqlx::AssertSqlSafe(format!(
            "SELECT estate_id, key_id FROM fm_persons WHERE person_pseudonym = $1{scope_sql} ORDER BY estate_id"
        )))
        .bind(&person);
        if let Some(e) = &estate_id {
            q = q.bind(e);
        }
        let held = q.fetch_all(self.db.pool()).await.map_err(db_error)?;
        let mut estates: Vec<String> = held.iter().map(|(e, _)| e.clone()).collect();
        if estates.is_empty()
            && let Some(e) = &estate_id
        {
            estates.push(e.clone());
        }
        let key_ids: Vec<String> = held.iter().map(|(_, k)| k.clone()).collect();
        let certificate_id = new_id();
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        let mut templates = 0u64;
        let mut per_estate: HashMap<&str, u64> = HashMap::new();
        for (estate, _) in &held {
            let n = sqlx::query::<Any>("DELETE FROM fm_templates WHERE estate_id = $1 AND person_pseudonym = $2")
                .bind(estate)
                .bind(&person)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?
                .rows_affected();
            templates += n;
            per_estate.insert(estate.as_str(), n);
            sqlx::query::<Any>("DELETE FROM fm_persons WHERE estate_id = $1 AND person_pseudonym = $2")
                .bind(estate)
                .bind(&person)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        let body = CertificateBody {
            format: certificate::FORMAT,
            certificate_id: certificate_id.clone(),
            tenant_id: self.tenant_id.clone(),
            estate_ids: estates.clone(),
            person_pseudonym: person.clone(),
            templates_deleted: u32::try_from(templates).unwrap_or(u32::MAX),
            key_ids_destroyed: key_ids.clone(),
            deleted_at_unix: now / 1000,
            reason: reason as i32,
            request_id: req.request_id.clone(),
        };
        let cert = certificate::sign(&self.signer, &body);
        sqlx::query::<Any>(
            "INSERT INTO fm_certificates (id, request_id, person_pseudonym, body, key_id, signature, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&certificate_id)
        .bind(&req.request_id)
        .bind(&person)
        .bind(&cert.body)
        .bind(&cert.key_id)
        .bind(&cert.signature)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        for estate in &estates {
            let event = Change::new(&self.tenant_id, "face.delete", "deletion_certificate", &certificate_id)
                .estate(estate)
                .person(&person, false)
                .attr("reason", reason_name(reason))
                .attr("templates", per_estate.get(estate.as_str()).copied().unwrap_or(0).to_string())
                .attr("keys_destroyed", held.iter().filter(|(e, _)| e == estate).count().to_string())
                .into_event(actor.clone(), &req.request_id, journal::SOURCE);
            journal::record(&mut tx, &event).await?;
        }
        // Out of the galleries before the rows go, so that no match happens
        // after the certificate exists; reloaded if the commit fails.
        for estate in &estates {
            if let Some(g) = self.gallery(estate)? {
                g.write().map_err(lock_error)?.remove_person(&person);
            }
        }
        if let Err(e) = tx.commit().await {
            self.load().await?;
            return Err(db_error(e));
        }
        // Crypto-shredding: a crash before this point leaves keys no row
        // names; `open` destroys those.
        for key_id in &key_ids {
            self.vault.destroy(key_id).map_err(vault_error)?;
        }
        tracing::info!(reason = reason_name(reason), templates, "face data deleted");
        Ok(cert)
    }

    async fn certificate_by(&self, column: &str, value: &str) -> Result<Option<DeletionCertificate>> {
        let row: Option<(Vec<u8>, String, Vec<u8>)> = sqlx::query_as::<Any, (Vec<u8>, String, Vec<u8>)>(
            sqlx::AssertSqlSafe(format!("SELECT body, key_id, signature FROM fm_certificates WHERE {column} = $1")),
        )
        .bind(value)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_error)?;
        Ok(row.map(|(body, key_id, signature)| {
            let decoded = CertificateBody::decode(body.as_slice()).ok();
            DeletionCertificate { body, key_id, signature, decoded }
        }))
    }

    /// A certificate by id.
    pub async fn certificate(&self, certificate_id: &str) -> Result<DeletionCertificate> {
        let id = parse_id("certificate_id", certificate_id)?;
        self.certificate_by("id", &id).await?.ok_or(Error::NotFound("deletion certificate"))
    }

    /// Enrolled persons of an estate.
    pub async fn list_enrolled(&self, estate_id: &str) -> Result<Vec<EnrolledPerson>> {
        let estate_id = parse_id("estate_id", estate_id)?;
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as::<Any, (String, String, i64, i64)>(
            "SELECT p.person_pseudonym, p.consent_id, p.enrolled_at, \
             (SELECT COUNT(*) FROM fm_templates t WHERE t.estate_id = p.estate_id AND t.person_pseudonym = p.person_pseudonym) \
             FROM fm_persons p WHERE p.estate_id = $1 ORDER BY p.person_pseudonym",
        )
        .bind(&estate_id)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .map(|(person_pseudonym, consent_id, at, n)| EnrolledPerson {
                person_pseudonym,
                consent_id,
                templates: u32::try_from(n).unwrap_or(u32::MAX),
                enrolled_at: Some(prost_types::Timestamp {
                    seconds: at / 1000,
                    nanos: ((at % 1000) * 1_000_000) as i32,
                }),
            })
            .collect())
    }

    /// Estates that have a gallery.
    pub async fn estates(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> =
            sqlx::query_as::<Any, (String,)>("SELECT DISTINCT estate_id FROM fm_persons ORDER BY estate_id")
                .fetch_all(self.db.pool())
                .await
                .map_err(db_error)?;
        Ok(rows.into_iter().map(|(e,)| e).collect())
    }

    /// Persons with templates (R16).
    pub async fn count(&self) -> Result<PersonCount> {
        let (persons,): (i64,) =
            sqlx::query_as::<Any, (i64,)>("SELECT COUNT(DISTINCT person_pseudonym) FROM fm_persons")
                .fetch_one(self.db.pool())
                .await
                .map_err(db_error)?;
        let (templates,): (i64,) = sqlx::query_as::<Any, (i64,)>("SELECT COUNT(*) FROM fm_templates")
            .fetch_one(self.db.pool())
            .await
            .map_err(db_error)?;
        Ok(PersonCount {
            tenant_id: self.tenant_id.clone(),
            persons: u64::try_from(persons).unwrap_or(0),
            templates: u64::try_from(templates).unwrap_or(0),
        })
    }

    /// Sets an estate's threshold (cosine, in (0, 1)), journalled as
    /// `face.threshold` by `actor`.
    pub async fn set_threshold(&self, estate_id: &str, threshold: f32, actor: Actor) -> Result<Threshold> {
        let estate_id = parse_id("estate_id", estate_id)?;
        if !(threshold > 0.0 && threshold < 1.0) {
            return Err(Error::invalid("threshold", "must be a cosine similarity between 0 and 1, exclusive"));
        }
        let mut tx = self.db.begin().await?;
        sqlx::query::<Any>(
            "INSERT INTO fm_thresholds (estate_id, threshold) VALUES ($1, $2) \
             ON CONFLICT (estate_id) DO UPDATE SET threshold = excluded.threshold",
        )
        .bind(&estate_id)
        .bind(f64::from(threshold))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let event = Change::new(&self.tenant_id, "face.threshold", "face_gallery", &estate_id)
            .estate(&estate_id)
            .attr("threshold", format!("{threshold:.3}"))
            .into_event(actor, "", journal::SOURCE);
        journal::record(&mut tx, &event).await?;
        tx.commit().await.map_err(db_error)?;
        self.thresholds.write().map_err(lock_error)?.insert(estate_id.clone(), threshold);
        Ok(Threshold { estate_id, threshold })
    }

    /// Journal entries after `after_seq` (see [`journal`]).
    pub async fn journal(&self, after_seq: i64, limit: u32) -> Result<Vec<estate_proto::facematch::JournalEntry>> {
        journal::read(&self.db, after_seq, limit).await
    }

    /// Closes the database.
    pub async fn close(&self) {
        self.db.close().await;
    }
}

/// Where an engine of `tenant_id` keeps its files under a base directory.
pub fn tenant_dir(base: &Path, tenant_id: &str) -> PathBuf {
    base.join(tenant_id)
}
