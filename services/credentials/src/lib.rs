//! The credentials service: cards, PINs, QR / mobile passes, visitor passes
//! and face references bound to persons and estates; the estate policy that
//! never lets face be the only way in (R1); the alternative any resident gets
//! at once (R2); and the verification the gate service calls on its hot path.
//!
//! Enforces R1, R2, R4, R14, R17; secrets are never stored or logged in clear.

pub mod directory;
mod limiter;
mod model;
mod service;
pub mod sweep;
pub mod totp;

pub use limiter::PinLimiter;
pub use model::{kind_from_name, kind_name};
pub use service::{CREDENTIAL_CHANGED_TOPIC, CredentialBook, CredentialOptions};

use estate_attestation::KeySet;
use estate_proto::credentials::credential_service_server::CredentialServiceServer;
use estate_runtime::{Runtime, ServiceApp, StartError};
use estate_store::Db;
use std::sync::Arc;
use std::time::Duration;

/// Name of the service for health checks.
pub const SERVICE_NAME: &str = "estate.credentials.v1.CredentialService";

/// Applies the credentials migrations (portable SQL, both engines).
pub async fn migrate(db: &Db) -> Result<(), estate_store::StoreError> {
    db.migrate("credentials", sqlx::migrate!("./migrations")).await
}

/// The credentials service built from a runtime: PIN counters in Redis when
/// configured, attestations checked against the consent key.
pub fn service(runtime: &Runtime) -> CredentialBook {
    let s = &runtime.settings.credentials;
    if runtime.redis.is_none() && runtime.db.backend() == estate_store::Backend::Postgres {
        // Several processes on one database: each would count PIN failures
        // on its own, and a guesser spreading attempts over N replicas would
        // get N times the limit.
        tracing::warn!(
            "redis.url is not set: PIN attempt counters are kept per process; with more than one gate or \
             credentials replica, set redis.url so the limit holds across them"
        );
    }
    let limiter = PinLimiter::new(
        s.pin_max_failures,
        Duration::from_secs(s.pin_failure_window_secs),
        Duration::from_secs(s.pin_lockout_secs),
        runtime.redis.clone(),
    );
    let consent_keys = KeySet::new([(
        runtime.keys.consent_signing.key_id().to_owned(),
        runtime.keys.consent_signing.public_key_bytes(),
    )]);
    CredentialBook::new(
        runtime.db.clone(),
        runtime.keys.hasher.clone(),
        runtime.keys.secret_box.clone(),
        runtime.bus.clone(),
        Arc::new(limiter),
        consent_keys,
        CredentialOptions {
            qr_step_secs: s.qr_step_secs.max(1),
            qr_window_steps: s.qr_window_steps,
            max_page_size: runtime.settings.limits.max_page_size,
        },
    )
}

/// Starts the move-out sweep (credentials stop at an estate when the
/// holder's last residency there ends).
pub fn start_sweep(runtime: &Runtime) -> tokio::task::JoinHandle<()> {
    sweep::spawn_sweep(
        runtime.db.clone(),
        runtime.bus.clone(),
        Duration::from_secs(runtime.settings.credentials.sweep_interval_secs.max(1)),
    )
}

/// The tonic server wrapper with the configured message size limit.
pub fn server(runtime: &Runtime) -> CredentialServiceServer<CredentialBook> {
    let max = runtime.settings.limits.max_message_bytes;
    CredentialServiceServer::new(service(runtime)).max_decoding_message_size(max).max_encoding_message_size(max)
}

/// The credentials service as its own process (distributed mode), on the
/// database it shares with identity: migrates when configured and binds the
/// listener.
pub async fn application(runtime: Runtime) -> Result<ServiceApp, StartError> {
    if runtime.settings.database.migrate_on_start {
        migrate(&runtime.db).await?;
    }
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(server(&runtime));
    let sweep = start_sweep(&runtime);
    Ok(ServiceApp::build(runtime, routes, &[SERVICE_NAME]).await?.with_background(sweep))
}
