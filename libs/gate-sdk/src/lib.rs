//! The gate SDK: what a gate controller runs (R15).
//!
//! - Online, every presentation goes to `GateService/Decide`.
//! - When the mesh cannot be reached (connection refused, timeout), the gate
//!   decides from its offline bundle: signature and expiry verified, cards and
//!   visitor passes matched by keyed hash, changes heard on the WatchChanges
//!   stream applied on top, PIN and QR refused (they need the mesh), and an
//!   expired bundle refuses everything.
//! - Offline decisions are journaled on disk with sequence numbers before the
//!   gate acts, and uploaded on reconnect; the server counts each (gate,
//!   sequence) once, so a retried upload never double-counts.

pub mod bundle;
pub mod journal;

pub use bundle::{BundleError, LocalView, Presented, TrustedKeys};

use estate_proto::gate::gate_service_client::GateServiceClient;
use estate_proto::gate::*;
use journal::{Journal, write_atomically};
use prost::Message;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

const BUNDLE_FILE: &str = "bundle.pb";
const KEYS_FILE: &str = "bundle-keys.pb";

/// Errors of the SDK.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The mesh answered with an error the gate cannot decide around
    /// (bad input, wrong token, ...).
    #[error("the mesh refused the call: {0}")]
    Refused(#[from] tonic::Status),
    /// The mesh could not be reached for a call that has no offline path.
    #[error("the mesh is unreachable: {0}")]
    Unreachable(String),
    /// A bundle was refused.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The state directory could not be read or written.
    #[error("gate state: {0}")]
    Io(#[from] std::io::Error),
    /// The endpoint or token is malformed.
    #[error("configuration: {0}")]
    Config(String),
}

/// Adds the gate's token to every call, as [`estate_proto::TOKEN_HEADER`]
/// (not `authorization`), so that HTTP/2 header compression sends it once
/// per connection instead of with every decision.
#[derive(Debug, Clone)]
pub struct Auth(AsciiMetadataValue);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(estate_proto::TOKEN_HEADER, self.0.clone());
        Ok(req)
    }
}

/// The gate-service client the SDK uses.
pub type Client = GateServiceClient<InterceptedService<Channel, Auth>>;

/// Where a decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// By the mesh.
    Online,
    /// By the gate, from its bundle.
    Offline,
}

/// A decision as the gate sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Online or offline.
    pub mode: Mode,
    /// Admit or deny.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
    /// For the display.
    pub message: String,
    /// The credential, when known.
    pub credential_id: String,
    /// The holder's pseudonym, when known.
    pub person_pseudonym: String,
    /// Online: the mesh's decision id.
    pub decision_id: String,
    /// Offline: the journal sequence.
    pub sequence: i64,
}

/// A clock in milliseconds since the epoch (tests simulate days with it).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// How a controller behaves.
#[derive(Clone)]
pub struct Options {
    /// How long to wait for the mesh before deciding offline.
    pub timeout: Duration,
    /// Keys trusted for bundles; `None`: the ones saved in the state
    /// directory, else fetched from the mesh on first use and saved.
    pub trusted_keys: Option<TrustedKeys>,
    /// The clock.
    pub clock: Clock,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

fn system_clock() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Default for Options {
    fn default() -> Self {
        Self { timeout: Duration::from_millis(1500), trusted_keys: None, clock: Arc::new(system_clock) }
    }
}

struct State {
    view: Option<LocalView>,
    journal: Journal,
    keys: TrustedKeys,
}

/// Local facts for `gate-sim status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalStatus {
    /// Version of the bundle held, if any.
    pub bundle_version: Option<i64>,
    /// Its expiry (ms).
    pub bundle_expires_at_ms: Option<i64>,
    /// Entries in it.
    pub bundle_entries: usize,
    /// Offline decisions waiting for upload.
    pub pending_uploads: usize,
    /// Highest uploaded sequence.
    pub uploaded_through: i64,
}

/// A gate controller: one per physical gate.
pub struct GateController {
    client: Client,
    dir: PathBuf,
    options: Options,
    state: Mutex<State>,
}

impl std::fmt::Debug for GateController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateController").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Whether a failed call means "the mesh is not there" (decide offline)
/// rather than "the mesh said no".
pub fn is_unreachable(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown)
}

fn lock_error() -> SdkError {
    SdkError::Io(std::io::Error::other("gate state lock poisoned"))
}

impl GateController {
    /// A controller for the mesh at `endpoint` with the gate's `token`,
    /// keeping its bundle and journal in `dir`. Connects lazily: it starts
    /// (and decides offline) even when the mesh is down.
    pub fn open(endpoint: &str, token: &str, dir: &Path, options: Options) -> Result<Self, SdkError> {
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| SdkError::Config(format!("endpoint {endpoint}: {e}")))?
            .connect_timeout(options.timeout)
            .connect_lazy();
        let auth = MetadataValue::try_from(token.trim())
            .map_err(|_| SdkError::Config("the token is not valid metadata".into()))?;
        let client = GateServiceClient::with_interceptor(channel, Auth(auth));
        std::fs::create_dir_all(dir)?;
        let journal = Journal::open(dir)?;
        let keys = match &options.trusted_keys {
            Some(k) => k.clone(),
            None => match std::fs::read(dir.join(KEYS_FILE)) {
                Ok(bytes) => TrustedKeys::from_proto(
                    &BundleKeys::decode(bytes.as_slice()).map_err(|e| SdkError::Io(std::io::Error::other(e)))?,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => TrustedKeys::default(),
                Err(e) => return Err(e.into()),
            },
        };
        let now = (options.clock)();
        let view = match std::fs::read(dir.join(BUNDLE_FILE)) {
            Ok(bytes) => OfflineBundle::decode(bytes.as_slice())
                .ok()
                .and_then(|b| bundle::verify_signed(&b, &keys, None).ok())
                .map(LocalView::new),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        if view.as_ref().is_some_and(|v| now >= v.contents.expires_at_ms) {
            tracing::warn!("the stored offline bundle has expired; fetch a new one");
        }
        Ok(Self { client, dir: dir.to_path_buf(), options, state: Mutex::new(State { view, journal, keys }) })
    }

    fn now(&self) -> i64 {
        (self.options.clock)()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.set_timeout(self.options.timeout);
        r
    }

    /// Trusts the keys the mesh publishes now and saves them (trust on first
    /// use; pass `Options::trusted_keys` to pin keys instead).
    pub async fn trust_mesh_keys(&self) -> Result<(), SdkError> {
        let keys = self.client.clone().get_bundle_keys(self.request(GetBundleKeysRequest {})).await?.into_inner();
        write_atomically(&self.dir.join(KEYS_FILE), &keys.encode_to_vec())?;
        self.state.lock().map_err(|_| lock_error())?.keys = TrustedKeys::from_proto(&keys);
        Ok(())
    }

    /// Fetches, verifies, stores and acknowledges a fresh bundle; returns its
    /// version. A bundle that does not verify is refused and not stored.
    pub async fn refresh_bundle(&self) -> Result<i64, SdkError> {
        if self.state.lock().map_err(|_| lock_error())?.keys.is_empty() {
            self.trust_mesh_keys().await?;
        }
        let bundle =
            self.client.clone().get_offline_bundle(self.request(GetOfflineBundleRequest {})).await?.into_inner();
        let version = self.install_bundle(&bundle)?;
        self.client.clone().ack_bundle(self.request(AckBundleRequest { version })).await?;
        Ok(version)
    }

    /// Verifies and stores `bundle` (signature, key, expiry); returns its
    /// version. Changes heard since an older bundle are kept when newer than
    /// the new bundle's entries.
    pub fn install_bundle(&self, bundle: &OfflineBundle) -> Result<i64, SdkError> {
        let now = self.now();
        let mut state = self.state.lock().map_err(|_| lock_error())?;
        let contents = bundle::verify(bundle, &state.keys, None, now)?;
        let version = contents.version;
        write_atomically(&self.dir.join(BUNDLE_FILE), &bundle.encode_to_vec())?;
        let mut view = LocalView::new(contents);
        if let Some(old) = state.view.take() {
            view.changes = old.changes;
        }
        state.view = Some(view);
        Ok(version)
    }

    /// Applies a change heard on the WatchChanges stream to the local view.
    pub fn apply_change(&self, change: &GateChange) {
        if let Ok(mut state) = self.state.lock()
            && let Some(view) = state.view.as_mut()
        {
            view.apply(change);
        }
    }

    /// Follows WatchChanges for as long as the task lives, reconnecting with
    /// backoff; every change is applied to the local view.
    pub fn spawn_watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match this.client.clone().watch_changes(WatchChangesRequest {}).await {
                    Ok(resp) => {
                        delay = Duration::from_millis(200);
                        let mut stream = resp.into_inner();
                        while let Ok(Some(change)) = stream.message().await {
                            this.apply_change(&change);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "change stream unavailable"),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        })
    }

    /// Decides on `presented`: online when the mesh answers, else offline
    /// from the bundle (journaled for upload).
    pub async fn decide(&self, presented: &Presented) -> Result<Outcome, SdkError> {
        use decide_request::Presented as P;
        use estate_proto::credentials::{PresentedCard, PresentedPin, PresentedQr, PresentedVisitor};
        let wire = match presented.clone() {
            Presented::Card { uid, facility_code } => P::Card(PresentedCard { uid, facility_code }),
            Presented::Pin { unit_id, pin } => P::Pin(PresentedPin { unit_id, pin }),
            Presented::Qr(payload) => P::Qr(PresentedQr { payload }),
            Presented::Visitor(code) => P::Visitor(PresentedVisitor { code }),
            Presented::FaceTemplate(template) => P::Face(FaceProbe { template, image: Vec::new() }),
        };
        let req = self.request(DecideRequest { presented: Some(wire), gate_id: String::new() });
        match self.client.clone().decide(req).await {
            Ok(resp) => {
                let d = resp.into_inner();
                if self.pending_uploads() > 0
                    && let Err(e) = self.upload().await
                {
                    tracing::warn!(error = %e, "offline decisions not uploaded yet; will retry");
                }
                Ok(Outcome {
                    mode: Mode::Online,
                    verdict: Verdict::try_from(d.verdict).unwrap_or(Verdict::Deny),
                    reason: Reason::try_from(d.reason).unwrap_or(Reason::Unspecified),
                    message: d.message,
                    credential_id: d.credential_id,
                    person_pseudonym: d.person_pseudonym,
                    decision_id: d.decision_id,
                    sequence: 0,
                })
            }
            Err(status) if is_unreachable(&status) => self.decide_offline(presented),
            Err(status) => Err(SdkError::Refused(status)),
        }
    }

    /// Decides from the bundle alone and journals the decision.
    pub fn decide_offline(&self, presented: &Presented) -> Result<Outcome, SdkError> {
        let now = self.now();
        let mut state = self.state.lock().map_err(|_| lock_error())?;
        let (reason, entry, bundle_version) = match state.view.as_mut() {
            Some(view) => {
                let (reason, entry) = view.decide(presented, now);
                (reason, entry, view.contents.version)
            }
            None => (Reason::OfflineNoBundle, None, 0),
        };
        let verdict = if reason == Reason::Ok { Verdict::Admit } else { Verdict::Deny };
        let kind = match presented {
            Presented::Card { .. } => estate_proto::common::CredentialKind::Card,
            Presented::Pin { .. } => estate_proto::common::CredentialKind::Pin,
            Presented::Qr(_) => estate_proto::common::CredentialKind::Qr,
            Presented::Visitor(_) => estate_proto::common::CredentialKind::Visitor,
            Presented::FaceTemplate(_) => estate_proto::common::CredentialKind::Face,
        };
        let sequence = state.journal.next_sequence();
        let credential_id = entry.as_ref().map(|e| e.credential_id.clone()).unwrap_or_default();
        state.journal.append(OfflineDecision {
            sequence,
            decided_at: Some(prost_types::Timestamp {
                seconds: now.div_euclid(1000),
                nanos: i32::try_from(now.rem_euclid(1000) * 1_000_000).unwrap_or(0),
            }),
            verdict: verdict as i32,
            reason: reason as i32,
            credential_id: credential_id.clone(),
            kind: kind as i32,
            bundle_version,
        })?;
        Ok(Outcome {
            mode: Mode::Offline,
            verdict,
            reason,
            message: offline_message(reason).to_owned(),
            credential_id,
            person_pseudonym: entry.map(|e| e.person_pseudonym).unwrap_or_default(),
            decision_id: String::new(),
            sequence,
        })
    }

    /// Offline decisions waiting for upload.
    pub fn pending_uploads(&self) -> usize {
        self.state.lock().map(|s| s.journal.pending().len()).unwrap_or(0)
    }

    /// Uploads buffered offline decisions (1,000 per call); returns
    /// (accepted, duplicates). Safe to retry: the mesh counts each sequence
    /// once.
    pub async fn upload(&self) -> Result<(i32, i32), SdkError> {
        let pending = self.state.lock().map_err(|_| lock_error())?.journal.pending();
        let (mut accepted, mut duplicates) = (0, 0);
        for chunk in pending.chunks(1000) {
            let last = chunk.iter().map(|d| d.sequence).max().unwrap_or(0);
            let resp = self
                .client
                .clone()
                .upload_offline_decisions(self.request(UploadOfflineDecisionsRequest { decisions: chunk.to_vec() }))
                .await?
                .into_inner();
            accepted += resp.accepted;
            duplicates += resp.duplicates;
            self.state.lock().map_err(|_| lock_error())?.journal.mark_uploaded(last)?;
        }
        Ok((accepted, duplicates))
    }

    /// What the gate holds locally.
    pub fn status(&self) -> Result<LocalStatus, SdkError> {
        let state = self.state.lock().map_err(|_| lock_error())?;
        Ok(LocalStatus {
            bundle_version: state.view.as_ref().map(|v| v.contents.version),
            bundle_expires_at_ms: state.view.as_ref().map(|v| v.contents.expires_at_ms),
            bundle_entries: state.view.as_ref().map(|v| v.contents.entries.len()).unwrap_or(0),
            pending_uploads: state.journal.pending().len(),
            uploaded_through: state.journal.uploaded(),
        })
    }
}

/// The display message of an offline decision.
pub fn offline_message(reason: Reason) -> &'static str {
    match reason {
        Reason::Ok => "welcome (offline)",
        Reason::Unknown => "not recognised here; ask the property office",
        Reason::Revoked => "this credential has been revoked",
        Reason::Suspended => "this credential is suspended",
        Reason::Expired => "this credential has expired",
        Reason::NotYetValid => "this credential is not valid yet",
        Reason::Exhausted => "this visitor pass has no entries left",
        Reason::KindNotAccepted => "this kind of credential is not accepted here",
        Reason::FaceUnavailable => "face matching is unavailable offline; use a card or visitor pass",
        Reason::OfflineNoBundle => "the gate is offline and holds no valid bundle; ask the property office",
        Reason::OfflineUnsupported => "the gate is offline: use a card or visitor pass",
        _ => "denied",
    }
}
