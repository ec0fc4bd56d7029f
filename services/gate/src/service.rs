//! The `estate.gate.v1.GateService` implementation.
//!
//! - Decide: gate-level checks first (gate active, kind accepted by the
//!   estate and read by the gate, time window), then the credential, then
//!   anti-passback. Cards are decided from the hot-path cache; PIN, QR and
//!   visitor passes consume something (an attempt, a time step, an entry) and
//!   go to the credentials tables in one transaction with their audit event.
//! - R1: face is never needed; without a face matcher a probe is denied with
//!   a hint to use another credential.
//! - R14: the tenant and estate come from the principal; a gate acts only
//!   for itself, an operator only at estates in their scope.
//! - R15: offline bundles, acknowledgements, idempotent uploads.
//! - R17: decisions name persons by pseudonym only.

use crate::cache::CredentialCache;
use crate::presence::{self, Passage, Presence};
use crate::views::ViewCache;
use crate::writer::{DecisionWriter, Pending, touch};
use estate_auth::{Caller, Principal};
use estate_bus::EventBus;
use estate_core::{Error, Result, new_id, now_ms, parse_id};
use estate_credentials::CredentialBook;
use estate_credentials::directory::{self as creds, CredentialFacts};
use estate_crypto::{KeyedHasher, SigningKeyPair};
use estate_facematch::FaceMatcher;
use estate_identity::directory::{self as ident, GateInfo};
use estate_proto::common::CredentialKind;
use estate_proto::credentials::{CredentialChanged, VerifyOutcome, verify_credential_request};
use estate_proto::facematch::{FaceSample, IdentifyRequest};
use estate_proto::gate::gate_service_server::GateService;
use estate_proto::gate::*;
use estate_store::outbox::{self, Change};
use estate_store::{Db, db_error};
use futures_util::Stream;
use prost::Message;
use sqlx::Any;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status};

const SOURCE: &str = "gate";
/// Bus topic telling every replica that a gate's rules changed.
pub const RULES_CHANGED_TOPIC: &str = "gate.rules.changed";
const DEFAULT_BUNDLE_TTL_SECS: i64 = 24 * 3600;
const MIN_BUNDLE_TTL_SECS: i64 = 60;
const DEFAULT_UTC_OFFSET_MINUTES: i32 = 8 * 60;
const MAX_UPLOAD: usize = 1000;
const MAX_TEMPLATE_DIM: usize = 4096;
const MAX_IMAGE_BYTES: usize = 2 * 1024 * 1024;

/// Settings of the gate service.
#[derive(Debug, Clone)]
pub struct GateOptions {
    /// Longest bundle lifetime an operator may set.
    pub max_bundle_ttl_secs: i64,
    /// How long gate facts and rules are cached per replica.
    pub facts_ttl: Duration,
    /// Changes buffered per watched estate.
    pub watch_buffer: usize,
    /// Change streams one gate may hold open.
    pub max_streams_per_gate: usize,
    /// Change streams the process holds open in all.
    pub max_streams: usize,
}

/// Open change streams, per gate and in all: one gate — or a stolen gate
/// token — cannot hold the process's memory by opening streams, and the
/// process as a whole stays within what it was sized for.
#[derive(Debug, Default)]
struct StreamSlots {
    per_gate: Mutex<HashMap<TenantKey, usize>>,
    total: std::sync::atomic::AtomicUsize,
}

/// One open stream's place; given back when the stream is dropped (the gate
/// went away, or the server stops).
#[derive(Debug)]
struct StreamSlot {
    slots: Arc<StreamSlots>,
    key: TenantKey,
}

impl StreamSlots {
    fn take(self: &Arc<Self>, key: TenantKey, per_gate: usize, total: usize) -> Result<StreamSlot> {
        use std::sync::atomic::Ordering;
        let mut map = match self.per_gate.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let held = map.get(&key).copied().unwrap_or(0);
        if held >= per_gate {
            return Err(Error::ResourceExhausted(format!(
                "this gate already holds {held} change streams (the most allowed); close one before opening another"
            )));
        }
        if self.total.load(Ordering::Relaxed) >= total {
            return Err(Error::ResourceExhausted(
                "this gate-service replica holds as many change streams as it allows (gate.max_streams); retry on another replica or later".into(),
            ));
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        map.insert(key.clone(), held + 1);
        Ok(StreamSlot { slots: self.clone(), key })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut map = match self.slots.per_gate.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
        self.slots.total.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Operator-set rules of one gate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rules {
    anti_passback: bool,
    windows: Vec<(CredentialKind, i32, i32)>,
    bundle_ttl_secs: i64,
    utc_offset_minutes: i32,
    is_default: bool,
    updated_at: i64,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            anti_passback: false,
            windows: Vec::new(),
            bundle_ttl_secs: DEFAULT_BUNDLE_TTL_SECS,
            utc_offset_minutes: DEFAULT_UTC_OFFSET_MINUTES,
            is_default: true,
            updated_at: 0,
        }
    }
}

/// What a decision needs to know about the gate, cached per replica.
#[derive(Debug)]
struct GateView {
    tenant: String,
    info: GateInfo,
    rules: Rules,
    accepted: Vec<CredentialKind>,
}

/// The stored name of a kind, "unknown" for none.
fn kind_label(kind: CredentialKind) -> &'static str {
    estate_credentials::kind_name(kind).unwrap_or("unknown")
}

fn encode_windows(windows: &[(CredentialKind, i32, i32)]) -> String {
    windows.iter().map(|(k, s, e)| format!("{}:{s}-{e}", kind_label(*k))).collect::<Vec<_>>().join(",")
}

fn decode_windows(text: &str) -> Vec<(CredentialKind, i32, i32)> {
    text.split(',')
        .filter_map(|w| {
            let (k, range) = w.split_once(':')?;
            let (s, e) = range.split_once('-')?;
            Some((estate_credentials::kind_from_name(k)?, s.parse().ok()?, e.parse().ok()?))
        })
        .collect()
}

/// Whether `minute` of the day falls in the window [start, end).
fn in_window(minute: i32, start: i32, end: i32) -> bool {
    match start.cmp(&end) {
        std::cmp::Ordering::Equal => true,
        std::cmp::Ordering::Less => minute >= start && minute < end,
        std::cmp::Ordering::Greater => minute >= start || minute < end,
    }
}

fn local_minute(now_ms: i64, offset_minutes: i32) -> i32 {
    let minutes = now_ms.div_euclid(60_000) + i64::from(offset_minutes);
    i32::try_from(minutes.rem_euclid(1440)).unwrap_or(0)
}

fn message_of(reason: Reason) -> &'static str {
    match reason {
        Reason::Ok => "welcome",
        Reason::Unknown => "not recognised here; ask the property office",
        Reason::Revoked => "this credential has been revoked; ask the property office",
        Reason::Suspended => "this credential is suspended; ask the property office",
        Reason::Expired => "this credential has expired",
        Reason::NotYetValid => "this credential is not valid yet",
        Reason::OutsideWindow => "this kind of credential is not accepted at this gate at this time",
        Reason::Locked => "too many wrong PINs for this unit; wait and try again, or use another credential",
        Reason::AntiPassback => "already inside (or outside): pass the other way first",
        Reason::NotThisEstate => "this credential is not valid at this estate",
        Reason::KindNotAccepted => "this kind of credential is not accepted at this gate",
        Reason::Replayed => "this QR code was already used; show a fresh one",
        Reason::Exhausted => "this visitor pass has no entries left",
        Reason::FaceNoMatch => "face not recognised; use a card, PIN, QR code or visitor pass",
        Reason::FaceNotConsented => "face entry needs your consent; use a card, PIN, QR code or visitor pass",
        Reason::FaceUnavailable => {
            "face matching is unavailable; use a card, PIN, QR code or visitor pass (face is never required)"
        }
        Reason::GateInactive => "this gate is deactivated",
        Reason::OfflineNoBundle => "the gate is offline and holds no valid bundle; ask the property office",
        Reason::OfflineUnsupported => "the gate is offline: use a card or visitor pass",
        Reason::Unspecified => "",
    }
}

fn reason_of(outcome: VerifyOutcome) -> Reason {
    match outcome {
        VerifyOutcome::Valid => Reason::Ok,
        VerifyOutcome::Unknown | VerifyOutcome::Unspecified => Reason::Unknown,
        VerifyOutcome::Revoked => Reason::Revoked,
        VerifyOutcome::Suspended => Reason::Suspended,
        VerifyOutcome::Expired => Reason::Expired,
        VerifyOutcome::NotYetValid => Reason::NotYetValid,
        VerifyOutcome::NotThisEstate => Reason::NotThisEstate,
        VerifyOutcome::Locked => Reason::Locked,
        VerifyOutcome::Replayed => Reason::Replayed,
        VerifyOutcome::Exhausted => Reason::Exhausted,
        VerifyOutcome::KindNotAccepted => Reason::KindNotAccepted,
    }
}

/// The verdict on a card or visitor pass from its facts (the hot path and
/// the gate SDK's offline path follow the same order of checks).
pub fn evaluate(facts: Option<&CredentialFacts>, estate: &str, now: i64) -> Reason {
    let Some(f) = facts else { return Reason::Unknown };
    match f.status.as_str() {
        "active" => {}
        "suspended" => return Reason::Suspended,
        _ => return Reason::Revoked,
    }
    if now < f.valid_from {
        return Reason::NotYetValid;
    }
    if f.valid_until.is_some_and(|u| now >= u) {
        return Reason::Expired;
    }
    if !f.estate_ids.iter().any(|e| e == estate) {
        return Reason::NotThisEstate;
    }
    Reason::Ok
}

/// A decision before it is recorded.
#[derive(Debug, Default)]
struct Outcome {
    reason: i32,
    kind: CredentialKind,
    credential_id: String,
    pseudonym: String,
}

impl Outcome {
    fn new(kind: CredentialKind, reason: Reason) -> Self {
        Self { reason: reason as i32, kind, ..Default::default() }
    }
    fn reason(&self) -> Reason {
        Reason::try_from(self.reason).unwrap_or(Reason::Unspecified)
    }
}

/// (tenant id, gate or estate id).
type TenantKey = (String, String);

type ChangeStream = Pin<Box<dyn Stream<Item = std::result::Result<GateChange, Status>> + Send>>;

/// The gate service.
#[derive(Clone)]
pub struct GateDesk {
    db: Db,
    hasher: KeyedHasher,
    bundle_key: SigningKeyPair,
    credentials: CredentialBook,
    cache: CredentialCache,
    presence: Presence,
    writer: DecisionWriter,
    bus: EventBus,
    views: Arc<ViewCache<TenantKey, GateView>>,
    watchers: Arc<Mutex<HashMap<TenantKey, broadcast::Sender<GateChange>>>>,
    stop: Arc<watch::Sender<bool>>,
    options: GateOptions,
    face: Option<Arc<dyn FaceMatcher>>,
    streams: Arc<StreamSlots>,
}

impl std::fmt::Debug for GateDesk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateDesk").field("cache", &self.cache).field("options", &self.options).finish_non_exhaustive()
    }
}

impl GateDesk {
    /// A gate service over `db`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: Db,
        hasher: KeyedHasher,
        bundle_key: SigningKeyPair,
        credentials: CredentialBook,
        cache: CredentialCache,
        presence: Presence,
        writer: DecisionWriter,
        bus: EventBus,
        options: GateOptions,
    ) -> Self {
        let (stop, _) = watch::channel(false);
        Self {
            db,
            hasher,
            bundle_key,
            credentials,
            cache,
            presence,
            writer,
            bus,
            views: Arc::new(ViewCache::new(options.facts_ttl)),
            watchers: Arc::default(),
            stop: Arc::new(stop),
            options,
            face: None,
            streams: Arc::default(),
        }
    }

    /// Decides face probes with `face` (the tenant's facematch, in-process or
    /// remote). Without it a probe is denied FACE_UNAVAILABLE (R1: face is
    /// never required).
    pub fn with_face(mut self, face: Option<Arc<dyn FaceMatcher>>) -> Self {
        self.face = face;
        self
    }

    /// Ends every open WatchChanges stream (called when the server stops, so
    /// that graceful shutdown does not wait for gates to hang up).
    pub fn close_streams(&self) {
        self.stop.send_replace(true);
    }

    // ---- gate facts ----

    async fn view(&self, tenant: &str, gate_id: &str) -> Result<Arc<GateView>> {
        let k = (tenant.to_owned(), gate_id.to_owned());
        self.views
            .get(&k, || {
                // The load may run in a task of its own (a refresh).
                let (db, (tenant, gate_id)) = (self.db.clone(), k.clone());
                async move {
                    let info = ident::gate(&db, &tenant, &gate_id).await?.ok_or(Error::NotFound("gate"))?;
                    let rules = Self::rules(&db, &tenant, &gate_id).await?;
                    let accepted = creds::accepted_kinds(&db, &tenant, &info.estate_id).await?;
                    Ok(GateView { tenant, info, rules, accepted })
                }
            })
            .await
    }

    fn forget_view(&self, tenant: &str, gate_id: &str) {
        self.views.forget(&(tenant.to_owned(), gate_id.to_owned()));
    }

    async fn rules(db: &Db, tenant: &str, gate_id: &str) -> Result<Rules> {
        let row: Option<(i64, String, i64, i64, i64)> = sqlx::query_as::<Any, (i64, String, i64, i64, i64)>(
            "SELECT anti_passback, windows, bundle_ttl_secs, utc_offset_minutes, updated_at FROM gate_rules \
             WHERE tenant_id = $1 AND gate_id = $2",
        )
        .bind(tenant)
        .bind(gate_id)
        .fetch_optional(db.pool())
        .await
        .map_err(db_error)?;
        Ok(match row {
            None => Rules::default(),
            Some((apb, windows, ttl, offset, at)) => Rules {
                anti_passback: apb != 0,
                windows: decode_windows(&windows),
                bundle_ttl_secs: ttl,
                utc_offset_minutes: i32::try_from(offset).unwrap_or(DEFAULT_UTC_OFFSET_MINUTES),
                is_default: false,
                updated_at: at,
            },
        })
    }

    /// The gate a call acts at: a gate's own (it may not name another), or
    /// the one an operator names at an estate in their scope.
    async fn gate_of_call(&self, caller: &Caller, named: &str) -> Result<Arc<GateView>> {
        match &caller.principal {
            Principal::Gate { tenant_id, estate_id, gate_id } => {
                if !named.is_empty() && named != gate_id {
                    return Err(Error::denied("a gate acts only for itself; leave gate_id empty"));
                }
                let view = self.view(tenant_id, gate_id).await?;
                if view.info.estate_id != *estate_id {
                    return Err(Error::denied("this gate token is for another estate; ask for a new token"));
                }
                Ok(view)
            }
            _ => {
                let gate_id = parse_id("gate_id", named)?;
                let tenant = caller.operator_tenant()?.to_owned();
                let view = self.view(&tenant, &gate_id).await?;
                caller.operator_for_estate(&view.info.estate_id).map_err(|_| Error::NotFound("gate"))?;
                Ok(view)
            }
        }
    }

    fn gate_only<'a>(caller: &'a Caller, what: &str) -> Result<(&'a str, &'a str, &'a str)> {
        match &caller.principal {
            Principal::Gate { tenant_id, estate_id, gate_id } => Ok((tenant_id, estate_id, gate_id)),
            _ => Err(Error::denied(format!("only a gate device {what}"))),
        }
    }

    async fn active_gate(&self, caller: &Caller, what: &str) -> Result<Arc<GateView>> {
        let (tenant, estate, gate) = Self::gate_only(caller, what)?;
        let view = self.view(tenant, gate).await?;
        if view.info.estate_id != estate {
            return Err(Error::denied("this gate token is for another estate; ask for a new token"));
        }
        if !view.info.active {
            return Err(Error::precondition("the gate (or its estate) is deactivated"));
        }
        Ok(view)
    }

    // ---- decisions ----

    /// Gate-level refusals that depend only on the kind presented.
    fn gate_refuses(view: &GateView, kind: CredentialKind, now: i64) -> Option<Reason> {
        if !view.info.active {
            return Some(Reason::GateInactive);
        }
        if kind != CredentialKind::Face
            && (!view.accepted.contains(&kind) || !view.info.kinds.iter().any(|k| k == kind_label(kind)))
        {
            return Some(Reason::KindNotAccepted);
        }
        let minute = local_minute(now, view.rules.utc_offset_minutes);
        if view.rules.windows.iter().any(|(k, s, e)| *k == kind && !in_window(minute, *s, *e)) {
            return Some(Reason::OutsideWindow);
        }
        None
    }

    /// The card's facts from the hot-path cache, else from the database. A
    /// cache that cannot be reached (Redis down) costs speed, not decisions:
    /// the database is the source of truth.
    async fn card_facts(&self, tenant: &str, hash: &str) -> Result<Option<CredentialFacts>> {
        use tracing::Instrument;
        // A span where the lookup is a round trip to Redis; in this
        // process it is a map lookup that costs less than a span would.
        let looked_up = if self.cache.is_remote() {
            self.cache.get(tenant, hash).instrument(tracing::info_span!("gate.cache.get")).await
        } else {
            self.cache.get(tenant, hash).await
        };
        match looked_up {
            Ok(Some(hit)) => return Ok(hit),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "gate cache unavailable; deciding from the database"),
        }
        let facts =
            creds::by_lookup_hash(&self.db, tenant, hash).instrument(tracing::info_span!("credentials.lookup")).await?;
        if let Err(e) = self.cache.fill(tenant, hash, facts.as_ref()).await {
            tracing::debug!(error = %e, "gate cache not filled");
        }
        Ok(facts)
    }

    /// A face probe: 1:N in the estate's gallery (the probe goes to
    /// facematch and is never stored here, R8), then the matched person's
    /// consent and face reference are checked like any credential.
    async fn face_outcome(&self, view: &GateView, probe: FaceProbe, outcome: &mut Outcome, now: i64) -> Result<()> {
        use tracing::Instrument;
        let Some(face) = &self.face else {
            outcome.reason = Reason::FaceUnavailable as i32;
            return Ok(());
        };
        let request = IdentifyRequest {
            estate_id: view.info.estate_id.clone(),
            probe: Some(FaceSample { template: probe.template, image: probe.image }),
        };
        let matched = face.identify(&view.tenant, request).instrument(tracing::info_span!("facematch.identify")).await;
        let matched = match matched {
            Ok(m) => m,
            Err(e) if e.code() == tonic::Code::InvalidArgument => return Err(e),
            Err(e) => {
                tracing::warn!(code = ?e.code(), error = %e, "facematch unavailable; face probe denied");
                outcome.reason = Reason::FaceUnavailable as i32;
                return Ok(());
            }
        };
        if !matched.matched {
            outcome.reason = Reason::FaceNoMatch as i32;
            return Ok(());
        }
        outcome.pseudonym = matched.person_pseudonym.clone();
        let consented =
            estate_consent::directory::is_active_at(&self.db, &view.tenant, &matched.consent_id, &view.info.estate_id)
                .await?;
        if !consented {
            outcome.reason = Reason::FaceNotConsented as i32;
            return Ok(());
        }
        let facts = creds::face_of(&self.db, &view.tenant, &matched.person_pseudonym, &view.info.estate_id).await?;
        outcome.reason = evaluate(facts.as_ref(), &view.info.estate_id, now) as i32;
        if let Some(f) = facts {
            outcome.credential_id = f.id;
        }
        Ok(())
    }

    /// Anti-passback, last: only an otherwise admitted passage is recorded.
    /// Returns the passage to record with the decision when the presence is
    /// kept in memory (and so in the database too).
    async fn passback(&self, view: &GateView, outcome: &mut Outcome, now: i64) -> Option<Passage> {
        if outcome.reason() != Reason::Ok || !view.rules.anti_passback || outcome.pseudonym.is_empty() {
            return None;
        }
        let direction = match view.info.direction.as_str() {
            "in" => "in",
            "out" => "out",
            _ => return None,
        };
        match self.presence.pass(&view.tenant, &view.info.estate_id, &outcome.pseudonym, direction, now).await {
            Ok(true) => self.presence.kept_in_memory().then(|| Passage {
                tenant: view.tenant.clone(),
                estate: view.info.estate_id.clone(),
                person: outcome.pseudonym.clone(),
                direction,
                at: now,
            }),
            Ok(false) => {
                outcome.reason = Reason::AntiPassback as i32;
                None
            }
            // Anti-passback is a convenience rule: without its store the gate
            // lets residents through rather than locking everyone out.
            Err(e) => {
                tracing::warn!(error = %e, "anti-passback store unavailable; not enforced for this passage");
                None
            }
        }
    }

    fn event(
        &self,
        caller: &Caller,
        view: &GateView,
        decision_id: &str,
        o: &Outcome,
    ) -> estate_proto::common::AuditEvent {
        let reason = o.reason();
        let verdict = if reason == Reason::Ok { Verdict::Admit } else { Verdict::Deny };
        Change::new(&view.tenant, "gate.decide", "gate", &view.info.id)
            .estate(&view.info.estate_id)
            .person(&o.pseudonym, false)
            .attr("decision_id", decision_id)
            .attr("verdict", verdict.as_str_name())
            .attr("reason", reason.as_str_name())
            .attr("kind", kind_label(o.kind))
            .attr("credential_id", o.credential_id.clone())
            .into_event(caller.actor(&self.hasher), &caller.request_id, SOURCE)
    }

    fn decision(view: &GateView, decision_id: String, o: Outcome, at: i64) -> Decision {
        let reason = o.reason();
        let (seconds, nanos) = estate_core::ms_to_timestamp_parts(at);
        Decision {
            decision_id,
            verdict: if reason == Reason::Ok { Verdict::Admit } else { Verdict::Deny } as i32,
            reason: reason as i32,
            message: message_of(reason).to_owned(),
            credential_id: o.credential_id,
            person_pseudonym: o.pseudonym,
            kind: o.kind as i32,
            gate_id: view.info.id.clone(),
            decided_at: Some(prost_types::Timestamp { seconds, nanos }),
        }
    }

    async fn decide(&self, caller: &Caller, r: DecideRequest) -> Result<Decision> {
        use decide_request::Presented;
        let view = self.gate_of_call(caller, &r.gate_id).await?;
        let presented = r.presented.ok_or_else(|| {
            Error::invalid("presented", "present a card, PIN and unit, QR code, visitor code or face probe")
        })?;
        let now = now_ms();
        let kind = match &presented {
            Presented::Card(_) => CredentialKind::Card,
            Presented::Pin(_) => CredentialKind::Pin,
            Presented::Qr(_) => CredentialKind::Qr,
            Presented::Visitor(_) => CredentialKind::Visitor,
            Presented::Face(_) => CredentialKind::Face,
        };
        // Malformed input is refused before anything is consumed or recorded.
        let card_hash = match &presented {
            Presented::Card(c) => {
                let norm = estate_crypto::normalise_card(&c.uid, &c.facility_code).ok_or_else(|| {
                    Error::invalid("card", "uid must be 4 to 32 hex digits, facility_code at most 16 letters or digits")
                })?;
                Some(self.hasher.card_hash(&view.tenant, &norm))
            }
            Presented::Pin(p) => {
                parse_id("pin.unit_id", &p.unit_id)?;
                if p.pin.is_empty() || p.pin.len() > 12 || !p.pin.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Error::invalid("pin.pin", "a PIN is 6 to 12 digits"));
                }
                None
            }
            Presented::Qr(q) => {
                if q.payload.is_empty() || q.payload.len() > 256 {
                    return Err(Error::invalid("qr.payload", "must be the text the QR code encodes"));
                }
                None
            }
            Presented::Visitor(v) => {
                estate_crypto::normalise_visitor_code(&v.code)
                    .ok_or_else(|| Error::invalid("visitor.code", "must be the code printed on the pass"))?;
                None
            }
            Presented::Face(f) => {
                check_probe(f)?;
                None
            }
        };
        let decision_id = new_id();
        let mut outcome = Outcome::new(kind, Reason::Ok);
        let mut passage = None;
        if let Some(reason) = Self::gate_refuses(&view, kind, now) {
            outcome.reason = reason as i32;
        } else {
            match presented {
                Presented::Card(_) => {
                    let hash = card_hash.unwrap_or_default();
                    let facts = self.card_facts(&view.tenant, &hash).await?;
                    outcome.reason = evaluate(facts.as_ref(), &view.info.estate_id, now) as i32;
                    if let Some(f) = facts {
                        outcome.credential_id = f.id;
                        outcome.pseudonym = f.person_pseudonym;
                    }
                    passage = self.passback(&view, &mut outcome, now).await;
                }
                Presented::Face(probe) => {
                    self.face_outcome(&view, probe, &mut outcome, now).await?;
                    passage = self.passback(&view, &mut outcome, now).await;
                }
                Presented::Pin(p) => {
                    return self
                        .decide_in_db(caller, &view, decision_id, verify_credential_request::Presented::Pin(p))
                        .await;
                }
                Presented::Qr(q) => {
                    return self
                        .decide_in_db(caller, &view, decision_id, verify_credential_request::Presented::Qr(q))
                        .await;
                }
                Presented::Visitor(v) => {
                    return self
                        .decide_in_db(caller, &view, decision_id, verify_credential_request::Presented::Visitor(v))
                        .await;
                }
            }
        }
        let event = self.event(caller, &view, &decision_id, &outcome);
        let gate = Some((view.info.id.clone(), view.info.estate_id.clone()));
        let trace_parent = estate_telemetry::current_traceparent();
        self.writer.write(Pending { event, gate, trace_parent, passage }).await?;
        Ok(Self::decision(&view, decision_id, outcome, now))
    }

    /// PIN, QR and visitor passes: the check consumes something (an attempt,
    /// a time step, an entry), so it runs in one transaction with the audit
    /// event. An anti-passback refusal undoes the consumption.
    async fn decide_in_db(
        &self,
        caller: &Caller,
        view: &GateView,
        decision_id: String,
        presented: verify_credential_request::Presented,
    ) -> Result<Decision> {
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        let (verification, pseudonym) =
            self.credentials.verify_in(&mut tx, &view.tenant, &view.info.estate_id, &presented).await?;
        let mut outcome = Outcome {
            reason: reason_of(VerifyOutcome::try_from(verification.outcome).unwrap_or(VerifyOutcome::Unknown)) as i32,
            kind: CredentialKind::try_from(verification.kind).unwrap_or(CredentialKind::Unspecified),
            credential_id: verification.credential_id,
            pseudonym,
        };
        if outcome.kind == CredentialKind::Unspecified {
            outcome.kind = match presented {
                verify_credential_request::Presented::Card(_) => CredentialKind::Card,
                verify_credential_request::Presented::Pin(_) => CredentialKind::Pin,
                verify_credential_request::Presented::Qr(_) => CredentialKind::Qr,
                verify_credential_request::Presented::Visitor(_) => CredentialKind::Visitor,
            };
        }
        let passage = self.passback(view, &mut outcome, now).await;
        let event = self.event(caller, view, &decision_id, &outcome);
        if outcome.reason() == Reason::AntiPassback {
            tx.rollback().await.map_err(db_error)?;
            let gate = Some((view.info.id.clone(), view.info.estate_id.clone()));
            let trace_parent = estate_telemetry::current_traceparent();
            self.writer.write(Pending { event, gate, trace_parent, passage: None }).await?;
        } else {
            outbox::record(&mut tx, &event).await?;
            touch(&mut tx, &view.tenant, &view.info.id, &view.info.estate_id, now).await?;
            if let Some(p) = &passage {
                presence::record(&mut tx, &[p]).await?;
            }
            tx.commit().await.map_err(db_error)?;
        }
        Ok(Self::decision(view, decision_id, outcome, now))
    }

    // ---- revocation stream ----

    fn subscribe(&self, tenant: &str, estate: &str) -> broadcast::Receiver<GateChange> {
        let mut watchers = match self.watchers.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        watchers
            .entry((tenant.to_owned(), estate.to_owned()))
            .or_insert_with(|| broadcast::channel(self.options.watch_buffer.max(16)).0)
            .subscribe()
    }

    /// Sends a credential change to every gate watching one of its estates.
    fn fan_out(&self, ev: &CredentialChanged) {
        let sent_at_ms = now_ms();
        let mut watchers = match self.watchers.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        for estate in &ev.estate_ids {
            let k = (ev.tenant_id.clone(), estate.clone());
            let Some(tx) = watchers.get(&k) else { continue };
            let change = GateChange {
                change: ev.change.clone(),
                credential_id: ev.credential_id.clone(),
                kind: ev.kind,
                status: ev.status,
                version: ev.version,
                estate_id: estate.clone(),
                sent_at_ms,
            };
            if tx.send(change).is_err() {
                watchers.remove(&k);
            }
        }
    }

    async fn watch_changes_stream(&self, caller: &Caller) -> Result<ChangeStream> {
        let view = self.active_gate(caller, "watches its estate's changes").await?;
        let slot = self.streams.take(
            (view.tenant.clone(), view.info.id.clone()),
            self.options.max_streams_per_gate,
            self.options.max_streams,
        )?;
        let rx = self.subscribe(&view.tenant, &view.info.estate_id);
        let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
        touch(&mut conn, &view.tenant, &view.info.id, &view.info.estate_id, now_ms()).await?;
        let first = GateChange {
            change: "subscribed".into(),
            estate_id: view.info.estate_id.clone(),
            sent_at_ms: now_ms(),
            ..Default::default()
        };
        let stop = self.stop.subscribe();
        type State = (broadcast::Receiver<GateChange>, watch::Receiver<bool>, Option<GateChange>, bool);
        let stream = futures_util::stream::unfold::<State, _, _, _>(
            (rx, stop, Some(first), false),
            |(mut rx, mut stop, first, done)| async move {
                if done || *stop.borrow() {
                    return None;
                }
                if let Some(f) = first {
                    return Some((Ok(f), (rx, stop, None, false)));
                }
                tokio::select! {
                    _ = stop.changed() => None,
                    r = rx.recv() => match r {
                        Ok(c) => Some((Ok(c), (rx, stop, None, false))),
                        Err(broadcast::error::RecvError::Lagged(n)) => Some((
                            Err(Status::aborted(format!(
                                "the gate fell {n} changes behind; reconnect and fetch a fresh offline bundle"
                            ))),
                            (rx, stop, None, true),
                        )),
                        Err(broadcast::error::RecvError::Closed) => None,
                    },
                }
            },
        );
        // The stream owns its slot: dropping it (the gate disconnected, or
        // the stream ended) gives the slot back.
        let stream = futures_util::StreamExt::map(stream, move |item| {
            let _held = &slot;
            item
        });
        Ok(Box::pin(stream))
    }

    // ---- offline bundles ----

    async fn get_offline_bundle(&self, caller: &Caller, _r: GetOfflineBundleRequest) -> Result<OfflineBundle> {
        let view = self.active_gate(caller, "fetches its offline bundle").await?;
        let (tenant, gate, estate) = (view.tenant.as_str(), view.info.id.as_str(), view.info.estate_id.as_str());
        let now = now_ms();
        let entries = creds::offline_entries(&self.db, tenant, estate, now).await?;
        let accepted = creds::accepted_kinds(&self.db, tenant, estate).await?;
        let ttl = view.rules.bundle_ttl_secs.clamp(MIN_BUNDLE_TTL_SECS, self.options.max_bundle_ttl_secs);
        let expires_at = now.saturating_add(ttl.saturating_mul(1000));
        let mut tx = self.db.begin().await?;
        touch(&mut tx, tenant, gate, estate, now).await?;
        sqlx::query::<Any>(
            "UPDATE gate_status SET bundle_version_issued = bundle_version_issued + 1 WHERE tenant_id = $1 AND gate_id = $2",
        )
        .bind(tenant)
        .bind(gate)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let (version, acked): (i64, i64) = sqlx::query_as::<Any, (i64, i64)>(
            "SELECT bundle_version_issued, bundle_version_acked FROM gate_status WHERE tenant_id = $1 AND gate_id = $2",
        )
        .bind(tenant)
        .bind(gate)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        let ids = entries.iter().map(|e| e.id.as_str()).collect::<Vec<_>>().join(",");
        sqlx::query::<Any>(
            "INSERT INTO gate_bundles (tenant_id, gate_id, version, estate_id, issued_at, expires_at, credential_ids) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(tenant)
        .bind(gate)
        .bind(version)
        .bind(estate)
        .bind(now)
        .bind(expires_at)
        .bind(ids)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query::<Any>(
            "DELETE FROM gate_bundles WHERE tenant_id = $1 AND gate_id = $2 AND version <= $3 AND version <> $4",
        )
        .bind(tenant)
        .bind(gate)
        .bind(version - 3)
        .bind(acked)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let audit = Change::new(tenant, "gate.bundle.issue", "gate", gate)
            .estate(estate)
            .attr("version", version.to_string())
            .attr("entries", entries.len().to_string())
            .attr("expires_at_ms", expires_at.to_string());
        outbox::record(&mut tx, &audit.into_event(caller.actor(&self.hasher), &caller.request_id, SOURCE)).await?;
        tx.commit().await.map_err(db_error)?;

        let contents = BundleContents {
            format: 1,
            tenant_id: tenant.to_owned(),
            estate_id: estate.to_owned(),
            gate_id: gate.to_owned(),
            version,
            issued_at_ms: now,
            expires_at_ms: expires_at,
            hash_key: self.hasher.offline_key(tenant, estate).to_vec(),
            entries: entries
                .into_iter()
                .map(|e| BundleEntry {
                    credential_id: e.id,
                    kind: e.kind as i32,
                    hash: e.offline_hash,
                    person_pseudonym: e.person_pseudonym,
                    valid_from_ms: e.valid_from,
                    valid_until_ms: e.valid_until.unwrap_or(0),
                    entries_left: i32::try_from(e.entries_left).unwrap_or(i32::MAX),
                    credential_version: e.version,
                })
                .collect(),
            accepted_kinds: accepted.into_iter().map(|k| k as i32).collect(),
        }
        .encode_to_vec();
        let signature = self.bundle_key.sign(&contents).to_vec();
        Ok(OfflineBundle { contents, signature, key_id: self.bundle_key.key_id().to_owned() })
    }

    async fn ack_bundle(&self, caller: &Caller, r: AckBundleRequest) -> Result<AckBundleResponse> {
        let view = self.active_gate(caller, "acknowledges its offline bundle").await?;
        let (tenant, gate, estate) = (view.tenant.as_str(), view.info.id.as_str(), view.info.estate_id.as_str());
        if r.version <= 0 {
            return Err(Error::invalid("version", "must be the version of a bundle this gate received"));
        }
        let mut tx = self.db.begin().await?;
        let (n,): (i64,) = sqlx::query_as::<Any, (i64,)>(
            "SELECT COUNT(*) FROM gate_bundles WHERE tenant_id = $1 AND gate_id = $2 AND version = $3",
        )
        .bind(tenant)
        .bind(gate)
        .bind(r.version)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        if n == 0 {
            return Err(Error::NotFound("bundle version"));
        }
        touch(&mut tx, tenant, gate, estate, now_ms()).await?;
        sqlx::query::<Any>("UPDATE gate_status SET bundle_version_acked = $1 WHERE tenant_id = $2 AND gate_id = $3")
            .bind(r.version)
            .bind(tenant)
            .bind(gate)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let audit =
            Change::new(tenant, "gate.bundle.ack", "gate", gate).estate(estate).attr("version", r.version.to_string());
        outbox::record(&mut tx, &audit.into_event(caller.actor(&self.hasher), &caller.request_id, SOURCE)).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(AckBundleResponse { version: r.version })
    }

    async fn upload_offline_decisions(
        &self,
        caller: &Caller,
        r: UploadOfflineDecisionsRequest,
    ) -> Result<UploadOfflineDecisionsResponse> {
        let (tenant, estate, gate) = Self::gate_only(caller, "uploads its offline decisions")?;
        let view = self.view(tenant, gate).await?;
        if view.info.estate_id != estate {
            return Err(Error::denied("this gate token is for another estate; ask for a new token"));
        }
        if r.decisions.is_empty() || r.decisions.len() > MAX_UPLOAD {
            return Err(Error::invalid("decisions", "send 1 to 1000 decisions per call"));
        }
        let now = now_ms();
        let mut checked = Vec::with_capacity(r.decisions.len());
        for d in &r.decisions {
            if d.sequence <= 0 {
                return Err(Error::invalid("decisions.sequence", "must be positive"));
            }
            let at = d
                .decided_at
                .as_ref()
                .map(|t| {
                    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos.clamp(0, 999_999_999) / 1_000_000))
                })
                .ok_or_else(|| Error::invalid("decisions.decided_at", "is required"))?;
            if at > now + 5 * 60_000 {
                return Err(Error::invalid("decisions.decided_at", "lies in the future; check the gate's clock"));
            }
            let verdict = Verdict::try_from(d.verdict).unwrap_or(Verdict::Unspecified);
            if verdict == Verdict::Unspecified {
                return Err(Error::invalid("decisions.verdict", "must be ADMIT or DENY"));
            }
            let reason = Reason::try_from(d.reason).unwrap_or(Reason::Unspecified);
            let credential = if d.credential_id.is_empty() {
                String::new()
            } else {
                parse_id("decisions.credential_id", &d.credential_id)?
            };
            checked.push((d, at, verdict, reason, credential));
        }
        let mut holders = HashMap::new();
        for (_, _, _, _, credential) in &checked {
            if !credential.is_empty() && !holders.contains_key(credential) {
                let pseudonym =
                    creds::holder_of(&self.db, tenant, credential).await?.map(|(p, _)| p).unwrap_or_default();
                holders.insert(credential.clone(), pseudonym);
            }
        }
        let (mut accepted, mut duplicates) = (0, 0);
        let mut tx = self.db.begin().await?;
        for (d, at, verdict, reason, credential) in checked {
            let decision_id = new_id();
            let inserted = sqlx::query::<Any>(
                "INSERT INTO gate_offline_decisions (tenant_id, gate_id, sequence, decision_id, decided_at, received_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, gate_id, sequence) DO NOTHING",
            )
            .bind(tenant)
            .bind(gate)
            .bind(d.sequence)
            .bind(&decision_id)
            .bind(at)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            if inserted == 0 {
                duplicates += 1;
                continue;
            }
            accepted += 1;
            let kind = CredentialKind::try_from(d.kind).unwrap_or(CredentialKind::Unspecified);
            // An entry a visitor pass gave offline is used up here too, once
            // (this row is new), so other gates and later bundles count it.
            if kind == CredentialKind::Visitor && verdict == Verdict::Admit && !credential.is_empty() {
                sqlx::query::<Any>(
                    "UPDATE credentials SET entries_used = entries_used + 1 \
                     WHERE tenant_id = $1 AND id = $2 AND kind = 'visitor' AND entries_used < max_entries",
                )
                .bind(tenant)
                .bind(&credential)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            }
            let pseudonym = holders.get(&credential).cloned().unwrap_or_default();
            let audit = Change::new(tenant, "gate.decide.offline", "gate", gate)
                .estate(estate)
                .person(&pseudonym, false)
                .attr("decision_id", decision_id.clone())
                .attr("sequence", d.sequence.to_string())
                .attr("decided_at_ms", at.to_string())
                .attr("verdict", verdict.as_str_name())
                .attr("reason", reason.as_str_name())
                .attr("kind", kind_label(kind))
                .attr("credential_id", credential.clone())
                .attr("bundle_version", d.bundle_version.to_string());
            outbox::record(&mut tx, &audit.into_event(caller.actor(&self.hasher), &caller.request_id, SOURCE)).await?;
        }
        touch(&mut tx, tenant, gate, estate, now).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(UploadOfflineDecisionsResponse { accepted, duplicates })
    }

    /// The keys that sign bundles (also served without authentication).
    pub fn bundle_keys(&self) -> BundleKeys {
        BundleKeys {
            keys: vec![BundleKey {
                key_id: self.bundle_key.key_id().to_owned(),
                public_key: self.bundle_key.public_key_bytes().to_vec(),
            }],
        }
    }

    // ---- operators ----

    async fn operator_gate(&self, caller: &Caller, gate_id: &str) -> Result<(String, GateInfo)> {
        let gate_id = parse_id("gate_id", gate_id)?;
        let tenant = caller.operator_tenant()?.to_owned();
        let info = ident::gate(&self.db, &tenant, &gate_id).await?.ok_or(Error::NotFound("gate"))?;
        caller.operator_for_estate(&info.estate_id).map_err(|_| Error::NotFound("gate"))?;
        Ok((tenant, info))
    }

    fn rules_proto(info: &GateInfo, rules: &Rules) -> GateRules {
        GateRules {
            gate_id: info.id.clone(),
            estate_id: info.estate_id.clone(),
            anti_passback: rules.anti_passback,
            windows: rules
                .windows
                .iter()
                .map(|(k, s, e)| TimeWindow { kind: *k as i32, start_minute: *s, end_minute: *e })
                .collect(),
            bundle_ttl_secs: rules.bundle_ttl_secs,
            utc_offset_minutes: rules.utc_offset_minutes,
            is_default: rules.is_default,
            updated_at: (!rules.is_default).then(|| {
                let (seconds, nanos) = estate_core::ms_to_timestamp_parts(rules.updated_at);
                prost_types::Timestamp { seconds, nanos }
            }),
        }
    }

    async fn set_gate_rules(&self, caller: &Caller, r: SetGateRulesRequest) -> Result<GateRules> {
        let (tenant, info) = self.operator_gate(caller, &r.gate_id).await?;
        let mut windows = Vec::new();
        for w in &r.windows {
            let kind = CredentialKind::try_from(w.kind).unwrap_or(CredentialKind::Unspecified);
            if kind == CredentialKind::Unspecified {
                return Err(Error::invalid("windows.kind", "name a credential kind"));
            }
            if windows.iter().any(|(k, _, _)| *k == kind) {
                return Err(Error::invalid("windows", "give at most one window per kind"));
            }
            if !(0..1440).contains(&w.start_minute) || !(0..1440).contains(&w.end_minute) {
                return Err(Error::invalid("windows", "minutes of the day run from 0 to 1439"));
            }
            windows.push((kind, w.start_minute, w.end_minute));
        }
        let ttl = if r.bundle_ttl_secs == 0 { DEFAULT_BUNDLE_TTL_SECS } else { r.bundle_ttl_secs };
        if !(MIN_BUNDLE_TTL_SECS..=self.options.max_bundle_ttl_secs).contains(&ttl) {
            return Err(Error::invalid(
                "bundle_ttl_secs",
                format!("must be between {MIN_BUNDLE_TTL_SECS} and {} seconds", self.options.max_bundle_ttl_secs),
            ));
        }
        let offset = r.utc_offset_minutes.unwrap_or(DEFAULT_UTC_OFFSET_MINUTES);
        if !(-720..=840).contains(&offset) {
            return Err(Error::invalid("utc_offset_minutes", "must be between -720 and 840"));
        }
        let now = now_ms();
        let rules = Rules {
            anti_passback: r.anti_passback,
            windows,
            bundle_ttl_secs: ttl,
            utc_offset_minutes: offset,
            is_default: false,
            updated_at: now,
        };
        let mut tx = self.db.begin().await?;
        sqlx::query::<Any>(
            "INSERT INTO gate_rules (tenant_id, gate_id, estate_id, anti_passback, windows, bundle_ttl_secs, \
             utc_offset_minutes, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (tenant_id, gate_id) DO UPDATE SET anti_passback = excluded.anti_passback, \
             windows = excluded.windows, bundle_ttl_secs = excluded.bundle_ttl_secs, \
             utc_offset_minutes = excluded.utc_offset_minutes, updated_at = excluded.updated_at",
        )
        .bind(&tenant)
        .bind(&info.id)
        .bind(&info.estate_id)
        .bind(i64::from(rules.anti_passback))
        .bind(encode_windows(&rules.windows))
        .bind(rules.bundle_ttl_secs)
        .bind(i64::from(rules.utc_offset_minutes))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let audit = Change::new(&tenant, "gate.rules.set", "gate", &info.id)
            .estate(&info.estate_id)
            .attr("anti_passback", rules.anti_passback.to_string())
            .attr("windows", encode_windows(&rules.windows))
            .attr("bundle_ttl_secs", rules.bundle_ttl_secs.to_string())
            .attr("utc_offset_minutes", rules.utc_offset_minutes.to_string());
        outbox::record(&mut tx, &audit.into_event(caller.actor(&self.hasher), &caller.request_id, SOURCE)).await?;
        tx.commit().await.map_err(db_error)?;
        self.forget_view(&tenant, &info.id);
        let note = format!("{tenant}\n{}", info.id).into_bytes();
        if let Err(e) = self.bus.publish(RULES_CHANGED_TOPIC, note).await {
            tracing::warn!(error = %e, "gate rules change not announced; other replicas pick it up within facts_ttl_secs");
        }
        Ok(Self::rules_proto(&info, &rules))
    }

    async fn get_gate_rules(&self, caller: &Caller, r: GetGateRulesRequest) -> Result<GateRules> {
        let (tenant, info) = self.operator_gate(caller, &r.gate_id).await?;
        let rules = Self::rules(&self.db, &tenant, &info.id).await?;
        Ok(Self::rules_proto(&info, &rules))
    }

    async fn list_gate_status(&self, caller: &Caller, r: ListGateStatusRequest) -> Result<ListGateStatusResponse> {
        let estate = parse_id("estate_id", &r.estate_id)?;
        let tenant = caller.operator_for_estate(&estate)?.to_owned();
        if ident::estate_is_active(&self.db, &tenant, &estate).await?.is_none() {
            return Err(Error::NotFound("estate"));
        }
        let mut gates = Vec::new();
        for (gate_id, name) in ident::all_gates_of_estate(&self.db, &tenant, &estate).await? {
            type Row = (Option<i64>, i64, i64, Option<i64>, Option<String>);
            let row: Option<Row> = sqlx::query_as::<Any, Row>(
                "SELECT s.last_seen_at, s.bundle_version_issued, s.bundle_version_acked, b.expires_at, b.credential_ids \
                 FROM gate_status s LEFT JOIN gate_bundles b ON b.tenant_id = s.tenant_id AND b.gate_id = s.gate_id \
                 AND b.version = s.bundle_version_acked WHERE s.tenant_id = $1 AND s.gate_id = $2",
            )
            .bind(&tenant)
            .bind(&gate_id)
            .fetch_optional(self.db.pool())
            .await
            .map_err(db_error)?;
            let (seen, issued, acked, expires, ids) = row.unwrap_or((None, 0, 0, None, None));
            let held: Vec<String> =
                ids.unwrap_or_default().split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect();
            let stale = if acked > 0 { creds::not_active_among(&self.db, &tenant, &held).await? } else { Vec::new() };
            if r.only_stale && stale.is_empty() {
                continue;
            }
            let ts = |ms: i64| {
                let (seconds, nanos) = estate_core::ms_to_timestamp_parts(ms);
                prost_types::Timestamp { seconds, nanos }
            };
            gates.push(GateStatus {
                gate_id,
                name,
                last_seen_at: seen.map(ts),
                bundle_version_issued: issued,
                bundle_version_acked: acked,
                acked_bundle_expires_at: expires.filter(|_| acked > 0).map(ts),
                stale_credential_ids: stale,
            });
        }
        Ok(ListGateStatusResponse { gates })
    }

    // ---- background ----

    /// Follows credential changes and rule changes on the bus for the life of
    /// the process: refreshes the hot-path cache from the database, then fans
    /// the change out to watching gates.
    pub fn start_follower(&self) -> tokio::task::JoinHandle<()> {
        let desk = self.clone();
        let mut rx = self.bus.subscribe();
        tokio::spawn(async move {
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "gate follower fell behind the bus; cache entries expire by TTL");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                match ev.topic.as_str() {
                    estate_credentials::CREDENTIAL_CHANGED_TOPIC => {
                        let Ok(change) = CredentialChanged::decode(ev.payload.as_slice()) else { continue };
                        // The cache first, then the gates: a gate that hears of
                        // a revocation is never admitted by a stale entry after.
                        if !change.lookup_hash.is_empty() {
                            let (t, h) = (change.tenant_id.as_str(), change.lookup_hash.as_str());
                            let refreshed = async {
                                // A change names a credential that exists; finding
                                // none means the event came from a mesh on another
                                // database sharing this Redis, and is not ours.
                                match creds::by_lookup_hash(&desk.db, t, h).await? {
                                    Some(facts) => desk.cache.refresh(t, h, Some(&facts)).await,
                                    None => Ok(()),
                                }
                            };
                            if let Err(e) = refreshed.await {
                                tracing::warn!(error = %e, "gate cache not refreshed after a change; it expires by TTL");
                            }
                        }
                        desk.fan_out(&change);
                    }
                    RULES_CHANGED_TOPIC => {
                        let text = String::from_utf8_lossy(&ev.payload);
                        if let Some((tenant, gate)) = text.split_once('\n') {
                            desk.forget_view(tenant, gate);
                        }
                    }
                    _ => {}
                }
            }
        })
    }
}

fn check_probe(p: &FaceProbe) -> Result<()> {
    match (p.template.is_empty(), p.image.is_empty()) {
        (true, true) => Err(Error::invalid("face", "send a template or an image")),
        (false, false) => Err(Error::invalid("face", "send a template or an image, not both")),
        (false, true) => {
            if p.template.len() > MAX_TEMPLATE_DIM || p.template.iter().any(|v| !v.is_finite()) {
                return Err(Error::invalid("face.template", "must be at most 4096 finite numbers"));
            }
            if p.template.iter().all(|v| *v == 0.0) {
                return Err(Error::invalid("face.template", "must not be all zero"));
            }
            Ok(())
        }
        (true, false) => {
            if p.image.len() > MAX_IMAGE_BYTES {
                return Err(Error::invalid("face.image", "must be at most 2 MiB"));
            }
            Ok(())
        }
    }
}

#[tonic::async_trait]
impl GateService for GateDesk {
    estate_auth::unary_rpcs! {
        "gate", GateDesk;
        decide(DecideRequest) -> Decision;
        get_offline_bundle(GetOfflineBundleRequest) -> OfflineBundle;
        ack_bundle(AckBundleRequest) -> AckBundleResponse;
        upload_offline_decisions(UploadOfflineDecisionsRequest) -> UploadOfflineDecisionsResponse;
        set_gate_rules(SetGateRulesRequest) -> GateRules;
        get_gate_rules(GetGateRulesRequest) -> GateRules;
        list_gate_status(ListGateStatusRequest) -> ListGateStatusResponse;
    }

    type WatchChangesStream = ChangeStream;

    async fn watch_changes(
        &self,
        request: Request<WatchChangesRequest>,
    ) -> std::result::Result<Response<Self::WatchChangesStream>, Status> {
        let caller = estate_auth::caller(&request)?;
        Ok(Response::new(self.watch_changes_stream(&caller).await?))
    }

    async fn get_bundle_keys(
        &self,
        _request: Request<GetBundleKeysRequest>,
    ) -> std::result::Result<Response<BundleKeys>, Status> {
        Ok(Response::new(self.bundle_keys()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_wrap_past_midnight() {
        assert!(in_window(600, 480, 1200));
        assert!(!in_window(1300, 480, 1200));
        assert!(in_window(1400, 1320, 360));
        assert!(in_window(100, 1320, 360));
        assert!(!in_window(720, 1320, 360));
        assert!(in_window(5, 0, 0));
    }

    #[test]
    fn local_minute_applies_the_offset() {
        // 00:00 UTC is 08:00 in China.
        assert_eq!(local_minute(0, 480), 480);
        assert_eq!(local_minute(23 * 3_600_000, 480), 420);
        assert_eq!(local_minute(0, -60), 1380);
    }

    #[test]
    fn windows_round_trip_through_storage() {
        let w = vec![(CredentialKind::Visitor, 480, 1200), (CredentialKind::Card, 1320, 360)];
        assert_eq!(decode_windows(&encode_windows(&w)), w);
        assert!(decode_windows("").is_empty());
    }
}
