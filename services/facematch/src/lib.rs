//! Facematch: per-tenant face templates and matching (R5, R6, R8, R9, R16).
//!
//! - One instance per tenant (`estate-facematch`), refusing every other
//!   tenant; in the embedded default, one engine per tenant in-process, each
//!   with its own directory.
//! - No egress (R9): this crate has no client of any service, no telemetry
//!   exporter and no network database; its store is its own SQLite file.
//!   Consent reaches it as an attestation verified offline.
//! - Templates sealed with AES-256-GCM under per-person data keys kept in a
//!   key vault apart from the database; deletion destroys the key
//!   (crypto-shredding) and yields a signed certificate.
//! - 1:N within one estate's gallery: an int8 SIMD scan, the shortlist
//!   re-scored in float32.

pub mod certificate;
pub mod engine;
pub mod gallery;
pub mod journal;
pub mod model;
pub mod prep;
pub mod registry;
mod service;
pub mod simd;
pub mod vault;

pub use engine::{EngineOptions, FaceEngine};
pub use registry::{FaceMatcher, FaceRegistry, RegistryOptions, TenantKey};
pub use service::FacematchDesk;

use estate_attestation::KeySet;
use estate_config::Settings;
use estate_proto::facematch::facematch_service_server::FacematchServiceServer;
use std::path::Path;
use std::sync::Arc;

/// Name of the service for health checks.
pub const SERVICE_NAME: &str = "estate.facematch.v1.FacematchService";

/// Errors while starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is missing or wrong; says which.
    #[error("{0}")]
    Settings(String),
    /// The model did not load.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The server failed.
    #[error("server: {0}")]
    Serve(String),
}

/// Reads a key list file (`estate_crypto::key_list`).
pub fn read_key_file(path: &Path) -> Result<Vec<(String, [u8; 32])>, StartError> {
    let text = std::fs::read_to_string(path).map_err(|e| StartError::Settings(format!("{}: {e}", path.display())))?;
    parse_key_list(&text).map_err(|e| StartError::Settings(format!("{}: {e}", path.display())))
}

pub use estate_crypto::key_list::parse as parse_key_list;

/// Formats published keys as a key list file.
pub fn format_key_list(keys: &estate_proto::consent::VerifyingKeys) -> String {
    keys.keys.iter().map(|k| estate_crypto::key_list::line(&k.key_id, &k.public_key) + "\n").collect()
}

/// The engine settings of `settings`.
pub fn engine_options(settings: &Settings) -> EngineOptions {
    let f = &settings.facematch;
    EngineOptions {
        dimension: f.dimension,
        threshold: f.threshold,
        max_templates_per_person: f.max_templates_per_person.max(1),
    }
}

/// Loads the configured face model, if any.
pub fn load_model(settings: &Settings) -> Result<Option<Arc<model::Embedder>>, StartError> {
    let f = &settings.facematch;
    match &f.model_path {
        Some(path) => Ok(Some(Arc::new(model::Embedder::load(path, f.model_input_side, f.dimension)?))),
        None => Ok(None),
    }
}

/// A registry from `settings`: the engines live under `facematch.dir`
/// (default `data_dir/facematch`); `only_tenant` makes it a dedicated
/// single-tenant instance; consent attestations are checked with
/// `consent_keys`.
pub fn registry(
    settings: &Settings,
    only_tenant: Option<String>,
    consent_keys: KeySet,
) -> Result<FaceRegistry, StartError> {
    let f = &settings.facematch;
    let tenant_key = match &f.tenant_key_file {
        Some(p) => TenantKey::File(p.clone()),
        None => TenantKey::PerTenantDir,
    };
    Ok(FaceRegistry::new(
        RegistryOptions {
            base: f.dir.clone().unwrap_or_else(|| settings.data_dir.join("facematch")),
            only_tenant,
            tenant_key,
            generate_keys: settings.keys.generate_missing,
            engine: engine_options(settings),
        },
        consent_keys,
        load_model(settings)?,
    ))
}

/// The registry of a dedicated single-tenant process.
pub fn dedicated_registry(settings: &Settings) -> Result<FaceRegistry, StartError> {
    let f = &settings.facematch;
    let tenant = f.tenant_id.clone().ok_or_else(|| {
        StartError::Settings("facematch.tenant_id is required: one instance serves one tenant".into())
    })?;
    let consent_file = f.consent_keys_file.as_ref().ok_or_else(|| {
        StartError::Settings("facematch.consent_keys_file is required to verify consent attestations offline".into())
    })?;
    registry(settings, Some(tenant), KeySet::new(read_key_file(consent_file)?))
}

/// The tonic server wrapper with the configured message size limit.
pub fn server(settings: &Settings, registry: Arc<FaceRegistry>) -> FacematchServiceServer<FacematchDesk> {
    let max = settings.limits.max_message_bytes;
    FacematchServiceServer::new(FacematchDesk::new(registry))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
}

/// Runs a dedicated facematch process until `shutdown`: binds, opens the
/// tenant's engine (so that a bad key or database fails at start), serves
/// health and the service behind token authentication. `on_bound` receives
/// the bound address (port 0 picks one).
pub async fn serve(
    settings: Settings,
    on_bound: impl FnOnce(std::net::SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let f = &settings.facematch;
    let token_file = f.token_keys_file.as_ref().ok_or_else(|| {
        StartError::Settings("facematch.token_keys_file is required to verify callers' tokens offline".into())
    })?;
    let token_keys = estate_auth::VerifyingKeys::new(settings.auth.issuer.clone(), read_key_file(token_file)?);
    let registry = Arc::new(dedicated_registry(&settings)?);
    let tenant = registry.only_tenant().unwrap_or_default().to_owned();
    registry.engine(&tenant).await.map_err(|e| StartError::Settings(e.to_string()))?;

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving).await;
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let addr = settings.listen;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
    on_bound(bound);
    tracing::info!(%bound, "facematch serving one tenant");
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = estate_auth::tls::server_config(&settings.tls).map_err(StartError::Settings)? {
        builder = builder.tls_config(tls).map_err(|e| StartError::Settings(format!("tls: {e}")))?;
    }
    let result = builder
        .layer(estate_auth::AuthLayer::new(token_keys))
        .add_service(health)
        .add_service(server(&settings, registry.clone()))
        .serve_with_incoming_shutdown(
            // Accepted sockets need TCP_NODELAY set here (see estate_runtime's `run_until`).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| StartError::Serve(e.to_string()));
    registry.close().await;
    result
}
