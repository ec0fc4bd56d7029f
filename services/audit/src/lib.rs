//! The audit service: the per-tenant, append-only, hash-chained log in an
//! RFC 6962 Merkle tree, with signed checkpoints (R11); regulator exports
//! verifiable offline with `meshctl audit verify` (R12); the resident's access
//! report (R13). Entries carry pseudonyms and hashes only (R17).
//!
//! The relay reads the outbox that every service writes in its transactions
//! (on the shared database) and appends idempotently by event id.

mod log;
mod relay;
mod service;

pub use log::{Appended, AuditLog, IndexOf};
pub use relay::{relay_once, spawn_relay};
pub use service::AuditDesk;

use estate_proto::audit::audit_service_server::AuditServiceServer;
use estate_runtime::{Runtime, ServiceApp, StartError};
use estate_store::Db;
use std::time::Duration;

/// Name of the service for health checks.
pub const SERVICE_NAME: &str = "estate.audit.v1.AuditService";

/// Applies the audit migrations: the portable ones (`migrations`, both
/// engines), then the engine's own (`migrations-sqlite` or
/// `migrations-postgres`, where the two engines' DDL differs), all recorded
/// in the one table of the audit migrations.
pub async fn migrate(db: &Db) -> Result<(), estate_store::StoreError> {
    db.migrate("audit", sqlx::migrate!("./migrations")).await?;
    let own = match db.backend() {
        estate_store::Backend::Sqlite => sqlx::migrate!("./migrations-sqlite"),
        estate_store::Backend::Postgres => sqlx::migrate!("./migrations-postgres"),
    };
    db.migrate("audit", own).await
}

/// The log of this process.
pub fn log(runtime: &Runtime) -> AuditLog {
    let s = &runtime.settings.audit;
    AuditLog::new(
        runtime.db.clone(),
        runtime.keys.audit_signing.clone(),
        s.checkpoint_every,
        s.checkpoint_interval_secs,
    )
}

/// The tonic server wrapper with the configured message size limit.
pub fn server(runtime: &Runtime, log: AuditLog) -> AuditServiceServer<AuditDesk> {
    let max = runtime.settings.limits.max_message_bytes;
    let desk =
        AuditDesk::new(runtime.db.clone(), log, runtime.keys.hasher.clone(), runtime.settings.limits.max_page_size);
    AuditServiceServer::new(desk).max_decoding_message_size(max).max_encoding_message_size(max)
}

/// Starts the relay for this process.
pub fn start_relay(runtime: &Runtime, log: AuditLog) -> tokio::task::JoinHandle<()> {
    let s = &runtime.settings.audit;
    spawn_relay(
        runtime.db.clone(),
        log,
        s.relay_batch.max(1),
        Duration::from_millis(s.relay_interval_ms.max(10)),
        Duration::from_secs(s.outbox_retention_secs),
    )
}

/// The audit service as its own process, relaying the outbox of the database
/// it shares with the other services.
pub async fn application(runtime: Runtime) -> Result<ServiceApp, StartError> {
    if runtime.settings.database.migrate_on_start {
        migrate(&runtime.db).await?;
    }
    let log = log(&runtime);
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(server(&runtime, log.clone()));
    let relay = start_relay(&runtime, log);
    Ok(ServiceApp::build(runtime, routes, &[SERVICE_NAME]).await?.with_background(relay))
}
