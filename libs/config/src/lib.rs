//! Settings of every mesh process, layered with the `config` crate:
//! defaults in code < an optional TOML file < `ESTATE__…` environment variables
//! (for example `ESTATE__DATABASE__URL`, `ESTATE__LISTEN`). Command-line flags,
//! where a binary has them, are applied last by the binary.
//!
//! Secrets (database passwords inside URLs) are never printed: [`Settings`]
//! implements `Debug` by hand and redacts them.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Errors while reading settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file or an environment variable holds a value of the wrong form.
    #[error("settings: {0}")]
    Invalid(String),
}

/// Everything a mesh process needs to start.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Directory for SQLite files and generated keys (embedded default).
    pub data_dir: PathBuf,
    /// Address of the gRPC listener; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Database connection.
    pub database: DatabaseSettings,
    /// Redis, for the distributed mode. Unset: in-process cache and pub/sub.
    pub redis: RedisSettings,
    /// Where keys live and whether to create them.
    pub keys: KeySettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
    /// Token issuance.
    pub auth: AuthSettings,
    /// Request limits.
    pub limits: LimitSettings,
    /// Consent service.
    pub consent: ConsentSettings,
    /// Credentials service.
    pub credentials: CredentialSettings,
    /// Audit service.
    pub audit: AuditSettings,
    /// Gate service.
    pub gate: GateSettings,
    /// Facematch (R8, R9).
    pub facematch: FacematchSettings,
    /// TLS for the gRPC listener and for calls to other services.
    pub tls: TlsSettings,
    /// RED metrics endpoint.
    pub metrics: MetricsSettings,
}

/// Prometheus endpoint of RED metrics per RPC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address serving `GET /metrics` (plain HTTP); unset: no endpoint.
    pub listen: Option<SocketAddr>,
}

/// TLS / mTLS (PEM files). Without `cert_file` the listener is plaintext
/// (loopback, the embedded default, tests); with `client_ca_file` it is
/// mutual TLS: callers must present a certificate signed by that CA (unless
/// `client_auth_optional`, for gates that may or may not have one). Outbound
/// calls to `https://` endpoints (audit relay, remote facematch) trust
/// `ca_file` and present `client_cert_file` / `client_key_file`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Server certificate chain.
    pub cert_file: Option<PathBuf>,
    /// Server private key.
    pub key_file: Option<PathBuf>,
    /// CA whose certificates callers must present (mTLS).
    pub client_ca_file: Option<PathBuf>,
    /// Accept callers without a certificate (the token still decides).
    pub client_auth_optional: bool,
    /// CA trusted for outbound calls.
    pub ca_file: Option<PathBuf>,
    /// Certificate this process presents on outbound calls.
    pub client_cert_file: Option<PathBuf>,
    /// Its private key.
    pub client_key_file: Option<PathBuf>,
    /// Server name expected in the certificates of outbound calls, when it is
    /// not the endpoint's host (e.g. calling 127.0.0.1 of a "facematch" cert).
    pub server_name: Option<String>,
}

/// Facematch settings. In the embedded default facematch runs in-process,
/// one engine per tenant under `data_dir/facematch/<tenant>`; distributed,
/// `estate-facematch` runs one process per tenant (`tenant_id`) and the gate
/// and consent services reach it through `endpoints`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FacematchSettings {
    /// Whether the all-in-one process runs facematch in-process.
    pub embedded: bool,
    /// The one tenant an `estate-facematch` process serves.
    pub tenant_id: Option<String>,
    /// Facematch's own directory (its SQLite file, key vault and keys).
    /// Default: `data_dir/facematch`.
    pub dir: Option<PathBuf>,
    /// Tenant key that wraps the per-person data keys (a mounted secret in
    /// production). Default: `<dir>/<tenant>/tenant.key`, generated on first
    /// start when `keys.generate_missing`.
    pub tenant_key_file: Option<PathBuf>,
    /// Template dimension of this deployment (fixed per tenant).
    pub dimension: usize,
    /// Default cosine threshold for a match; estates may set their own.
    pub threshold: f32,
    /// ONNX face-embedding model for image enrolment and probes; unset:
    /// templates only.
    pub model_path: Option<PathBuf>,
    /// Input side of the model, in pixels.
    pub model_input_side: usize,
    /// Most templates one person may have at one estate.
    pub max_templates_per_person: u32,
    /// Consent attestation verifying keys (lines of `key_id hex-public-key`),
    /// for a separate facematch process; in-process it uses the consent key.
    pub consent_keys_file: Option<PathBuf>,
    /// Token verifying keys (lines of `key_id hex-public-key`), for a separate
    /// facematch process.
    pub token_keys_file: Option<PathBuf>,
    /// Facematch endpoints by tenant id, for the gate and consent services
    /// in distributed mode (`tenant = "http://facematch-tenant:50060"`).
    pub endpoints: std::collections::BTreeMap<String, String>,
    /// Service token the gate and consent services present to facematch.
    pub token_file: Option<PathBuf>,
    /// Deadline of a call to facematch, in milliseconds.
    pub call_timeout_ms: u64,
}

/// Gate service settings (R15 hot path, offline bundles).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateSettings {
    /// Seconds a cached credential is trusted without a change event before
    /// it is re-read (a bound on staleness if an event is lost).
    pub cache_ttl_secs: u64,
    /// Most credentials held in the in-process cache.
    pub cache_capacity: usize,
    /// Seconds gate facts, rules and estate policy are cached per replica.
    pub facts_ttl_secs: u64,
    /// Most decisions committed in one transaction (group commit), to the
    /// audit log in the all-in-one process, else to the outbox. Kept well
    /// below the decisions in flight under load, so that one batch commits
    /// while the next is decided (BENCHMARKS.md, gate, session 18).
    pub decision_batch: usize,
    /// Longest bundle lifetime an operator may set, in seconds.
    pub max_bundle_ttl_secs: i64,
    /// Changes buffered per WatchChanges stream before the slowest gate is
    /// told to re-fetch its bundle.
    pub watch_buffer: usize,
    /// Change streams one gate may hold open at once (a controller needs
    /// one; a reconnect may briefly need two).
    pub max_streams_per_gate: usize,
    /// Change streams this process holds open in all (≈ 24 KiB each).
    pub max_streams: usize,
}

/// Audit service settings (R11).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// Sign a checkpoint after this many new entries of a tenant.
    pub checkpoint_every: u64,
    /// ...or once this many seconds passed since the last one, if the log grew.
    pub checkpoint_interval_secs: u64,
    /// Outbox rows the relay ships per batch.
    pub relay_batch: i64,
    /// How often the relay looks for new outbox rows, in milliseconds.
    pub relay_interval_ms: u64,
    /// How long delivered outbox rows are kept (the audit log holds their
    /// events), in seconds; 0: forever.
    pub outbox_retention_secs: u64,
    /// A service process whose outbox is not in the audit service's database
    /// ships it to this audit endpoint's `Append` (e.g. "http://audit:50051").
    pub relay_to: Option<String>,
    /// File holding the service token used for `Append`.
    pub relay_token_file: Option<PathBuf>,
}

/// Credentials service settings (R15 hot path, PIN lockout, QR codes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSettings {
    /// Wrong PINs at one unit within the window that lock PIN entry there.
    pub pin_max_failures: u32,
    /// The window in which failures count, in seconds.
    pub pin_failure_window_secs: u64,
    /// How long PIN entry stays locked, in seconds.
    pub pin_lockout_secs: u64,
    /// QR code time step (RFC 6238), in seconds.
    pub qr_step_secs: u64,
    /// Steps of clock difference tolerated either side.
    pub qr_window_steps: u64,
    /// How often the move-out sweep reads ended residencies (it also wakes
    /// on the bus).
    pub sweep_interval_secs: u64,
}

/// Consent service settings (R5, R9, R16).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentSettings {
    /// Lifetime of an attestation when the request names none.
    pub attestation_ttl_secs: u64,
    /// How often the deletion sweep looks for ended residencies.
    pub sweep_interval_secs: u64,
    /// Persons with face consent from which the filing warning shows (R16).
    pub filing_warning_at: i64,
    /// Persons with face consent at which the filing is due (R16).
    pub filing_threshold: i64,
}

/// Database connection settings.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://path` or `postgres://…`. Unset: `sqlite://<data_dir>/mesh.db`.
    pub url: Option<String>,
    /// Pool size.
    pub max_connections: u32,
    /// Seconds to wait for a pooled connection before UNAVAILABLE.
    pub acquire_timeout_secs: u64,
    /// PostgreSQL `statement_timeout` in milliseconds (0: none).
    pub statement_timeout_ms: u64,
    /// Run migrations on start (the embedded default does).
    pub migrate_on_start: bool,
}

/// Redis settings.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port/db`. Unset: in-process.
    pub url: Option<String>,
}

/// Key files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    /// Directory of key files. Unset: `<data_dir>/keys`.
    pub dir: Option<PathBuf>,
    /// Create missing keys (embedded default); false when keys are mounted.
    pub generate_missing: bool,
}

/// Telemetry settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `tracing` env-filter directive, e.g. "info,sqlx=warn".
    pub log_filter: String,
    /// "text" or "json".
    pub log_format: String,
    /// OTLP/gRPC collector endpoint, e.g. "http://127.0.0.1:4317". Unset: no export.
    pub otlp_endpoint: Option<String>,
}

/// Token settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// `iss` claim of tokens this mesh issues and accepts.
    pub issuer: String,
    /// Lifetime of a token when the request names none.
    pub default_token_ttl_secs: u64,
    /// Lifetime of the bootstrap admin token written on first start.
    pub admin_token_ttl_secs: u64,
}

/// Request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Largest page a list call returns.
    pub max_page_size: u32,
    /// Longest any call may run before it is abandoned with
    /// DEADLINE_EXCEEDED (callers' shorter `grpc-timeout` deadlines apply
    /// too); 0: no ceiling. Streams are bounded until their first response.
    pub request_timeout_ms: u64,
    /// How long the answer to a call made with an `idempotency-key` is kept
    /// for its retries, in seconds; 0: keys are ignored.
    pub idempotency_ttl_secs: u64,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("database_url", &self.database.url.as_deref().map(redact_url))
            .field("redis_url", &self.redis.url.as_deref().map(redact_url))
            .field("keys_dir", &self.keys_dir())
            .field("otlp_endpoint", &self.telemetry.otlp_endpoint)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings").field("url", &self.url.as_deref().map(redact_url)).finish()
    }
}

/// Hides the password of a URL such as `postgres://user:secret@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

const DEFAULTS: &str = r#"
data_dir = "./data"
listen = "127.0.0.1:50051"

[database]
max_connections = 10
acquire_timeout_secs = 5
statement_timeout_ms = 5000
migrate_on_start = true

[redis]

[keys]
generate_missing = true

[telemetry]
log_filter = "info,sqlx=warn,h2=warn,tower=warn"
log_format = "text"

[auth]
issuer = "estate-mesh"
default_token_ttl_secs = 86400
admin_token_ttl_secs = 31536000

[limits]
max_message_bytes = 4194304
max_page_size = 500
request_timeout_ms = 30000
idempotency_ttl_secs = 86400

[credentials]
pin_max_failures = 5
pin_failure_window_secs = 900
pin_lockout_secs = 900
qr_step_secs = 30
qr_window_steps = 1
sweep_interval_secs = 5

[audit]
checkpoint_every = 1000
checkpoint_interval_secs = 60
relay_batch = 100
relay_interval_ms = 200
outbox_retention_secs = 604800

[gate]
cache_ttl_secs = 60
cache_capacity = 200000
facts_ttl_secs = 5
decision_batch = 32
max_bundle_ttl_secs = 604800
watch_buffer = 1024
max_streams_per_gate = 4
max_streams = 20000

[facematch]
embedded = true
dimension = 512
threshold = 0.45
model_input_side = 112
max_templates_per_person = 5
call_timeout_ms = 2000

[facematch.endpoints]

[tls]
client_auth_optional = false

[metrics]

[consent]
attestation_ttl_secs = 300
sweep_interval_secs = 5
filing_warning_at = 80000
filing_threshold = 100000
"#;

impl Settings {
    /// Loads defaults, then `file` if given, then `ESTATE__…` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml).required(true));
        }
        let env_map: std::collections::HashMap<String, String> =
            env.into_iter().filter(|(k, _)| k.starts_with("ESTATE__")).collect();
        builder = builder.add_source(
            config::Environment::with_prefix("ESTATE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let cfg = builder.build().map_err(|e| SettingsError::Invalid(e.to_string()))?;
        cfg.try_deserialize().map_err(|e| SettingsError::Invalid(e.to_string()))
    }

    /// The directory of key files.
    pub fn keys_dir(&self) -> PathBuf {
        self.keys.dir.clone().unwrap_or_else(|| self.data_dir.join("keys"))
    }

    /// The database URL, defaulting to a SQLite file in the data directory.
    pub fn database_url(&self) -> String {
        self.database.url.clone().unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("mesh.db").display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_then_file_then_env() -> Result<(), Box<dyn std::error::Error>> {
        let s = Settings::load_with_env(None, env(&[]))?;
        assert_eq!(s.listen.port(), 50051);
        assert!(s.database_url().starts_with("sqlite://"));

        let dir = tempfile::tempdir()?;
        let file = dir.path().join("mesh.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:6000\"\n[database]\nmax_connections = 3\n")?;
        let s = Settings::load_with_env(Some(&file), env(&[]))?;
        assert_eq!(s.listen.port(), 6000);
        assert_eq!(s.database.max_connections, 3);

        let s = Settings::load_with_env(
            Some(&file),
            env(&[("ESTATE__LISTEN", "127.0.0.1:7000"), ("ESTATE__DATABASE__URL", "postgres://u:pw@h/db")]),
        )?;
        assert_eq!(s.listen.port(), 7000);
        assert_eq!(s.database_url(), "postgres://u:pw@h/db");
        assert!(!format!("{s:?}").contains("pw"));
        Ok(())
    }

    #[test]
    fn bad_values_are_reported() {
        let r = Settings::load_with_env(None, env(&[("ESTATE__LISTEN", "not an address")]));
        assert!(r.is_err());
    }
}
