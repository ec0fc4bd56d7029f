//! The identity service: tenants (property groups), estates, gates, units,
//! persons and residencies, and the tokens that name principals (R14).
//!
//! It enforces R1 at the gate level (a gate must read a non-face credential),
//! derives minors from birth dates (R7), keeps phone numbers only as keyed
//! hashes, names persons in audit events by pseudonym (R17) and announces the
//! end of a residency so face data can be deleted (R5).

mod audit;
pub mod directory;
mod model;
mod service;

pub use audit::PLATFORM_TENANT;
pub use service::{Identity, IdentityOptions, RESIDENCY_ENDED_TOPIC};

use estate_proto::identity::identity_service_server::IdentityServiceServer;
use estate_runtime::{Runtime, ServiceApp, StartError};
use estate_store::Db;

/// Applies the identity migrations (portable SQL, both engines).
pub async fn migrate(db: &Db) -> Result<(), estate_store::StoreError> {
    db.migrate("identity", sqlx::migrate!("./migrations")).await
}

/// The identity service built from a runtime.
pub fn service(runtime: &Runtime) -> Identity {
    Identity::new(
        runtime.db.clone(),
        runtime.keys.hasher.clone(),
        runtime.tokens.clone(),
        runtime.bus.clone(),
        IdentityOptions {
            max_page_size: runtime.settings.limits.max_page_size,
            default_token_ttl_secs: runtime.settings.auth.default_token_ttl_secs,
        },
    )
}

/// The tonic server wrapper for the identity service with the configured
/// message size limit.
pub fn server(runtime: &Runtime) -> IdentityServiceServer<Identity> {
    let max = runtime.settings.limits.max_message_bytes;
    IdentityServiceServer::new(service(runtime)).max_decoding_message_size(max).max_encoding_message_size(max)
}

/// Name of the service for health checks.
pub const SERVICE_NAME: &str = "estate.identity.v1.IdentityService";

/// The identity service as its own process (distributed mode): migrates when
/// configured and binds the listener.
pub async fn application(runtime: Runtime) -> Result<ServiceApp, StartError> {
    if runtime.settings.database.migrate_on_start {
        migrate(&runtime.db).await?;
    }
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(server(&runtime));
    ServiceApp::build(runtime, routes, &[SERVICE_NAME]).await
}
