//! The consent service: notices (告知), separate consent (单独同意) to face
//! verification at one estate's gates, withdrawal that requests deletion of
//! face data, guardian consent for minors, impact assessments and the filing
//! count, and signed attestations facematch verifies offline.
//!
//! Enforces R3, R4, R5, R7, R9 (attestations), R16, R14 and R17.

pub mod deletion;
pub mod directory;
pub mod face_journal;
mod model;
mod service;

pub use deletion::{
    FaceDataEraser, FacematchEraser, fulfil_pending, spawn_sweep, sweep_residency_ends, sweep_retention,
};
pub use service::{CONSENT_WITHDRAWN_TOPIC, ConsentBook, ConsentOptions};

use estate_facematch::FaceMatcher;
use estate_proto::consent::consent_service_server::ConsentServiceServer;
use estate_runtime::{Runtime, ServiceApp, StartError};
use estate_store::Db;
use std::sync::Arc;
use std::time::Duration;

/// Name of the service for health checks.
pub const SERVICE_NAME: &str = "estate.consent.v1.ConsentService";

/// Applies the consent migrations (portable SQL, both engines).
pub async fn migrate(db: &Db) -> Result<(), estate_store::StoreError> {
    db.migrate("consent", sqlx::migrate!("./migrations")).await
}

/// The consent service built from a runtime.
pub fn service(runtime: &Runtime) -> ConsentBook {
    let s = &runtime.settings;
    ConsentBook::new(
        runtime.db.clone(),
        runtime.keys.hasher.clone(),
        runtime.keys.consent_signing.clone(),
        ConsentOptions {
            attestation_ttl_secs: i64::try_from(s.consent.attestation_ttl_secs).unwrap_or(300).clamp(1, 3600),
            filing_warning_at: s.consent.filing_warning_at,
            filing_threshold: s.consent.filing_threshold,
            max_page_size: s.limits.max_page_size,
        },
    )
    .with_bus(runtime.bus.clone())
}

/// The tonic server wrapper with the configured message size limit; `face`
/// (the tenant's facematch) feeds the filing count.
pub fn server(runtime: &Runtime, face: Option<Arc<dyn FaceMatcher>>) -> ConsentServiceServer<ConsentBook> {
    let max = runtime.settings.limits.max_message_bytes;
    ConsentServiceServer::new(service(runtime).with_face(face))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
}

/// Starts the deletion sweep of this process (R5): residency ends become
/// requests, facematch (when there is one) fulfils them and returns
/// certificates, and the retention sweep catches templates whose consent
/// has ended. Without facematch, requests wait.
pub fn start_sweep(runtime: &Runtime, face: Option<Arc<dyn FaceMatcher>>) -> tokio::task::JoinHandle<()> {
    spawn_sweep(
        runtime.db.clone(),
        runtime.bus.clone(),
        Duration::from_secs(runtime.settings.consent.sweep_interval_secs.max(1)),
        face,
    )
}

/// The consent service as its own process (distributed mode), sharing the
/// database with identity, whose person and residency facts it reads; runs the
/// deletion sweep beside the server.
pub async fn application(runtime: Runtime) -> Result<ServiceApp, StartError> {
    if runtime.settings.database.migrate_on_start {
        migrate(&runtime.db).await?;
    }
    let face = estate_runtime::remote_face_matcher(&runtime, "consent")?;
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(server(&runtime, face.clone()));
    let sweep = start_sweep(&runtime, face);
    Ok(ServiceApp::build(runtime, routes, &[SERVICE_NAME]).await?.with_background(sweep))
}
