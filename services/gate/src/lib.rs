//! The gate service: admit / deny decisions for the gates of an estate, the
//! revocation stream gates follow, and signed offline bundles (R15).
//!
//! Enforces R1 and R2 at the gate (face is never required), R14 (a gate acts
//! only for itself, at its own estate), R15 and R17.

pub mod cache;
pub mod presence;
mod service;
mod views;
pub mod writer;

pub use service::{GateDesk, GateOptions, RULES_CHANGED_TOPIC, evaluate};

use cache::CredentialCache;
use estate_facematch::FaceMatcher;
use estate_proto::gate::gate_service_server::GateServiceServer;
use estate_runtime::{Runtime, ServiceApp, StartError};
use estate_store::Db;
use estate_store::outbox::AuditSink;
use presence::Presence;
use std::sync::Arc;
use std::time::Duration;
use writer::DecisionWriter;

/// Name of the service for health checks.
pub const SERVICE_NAME: &str = "estate.gate.v1.GateService";

/// Applies the gate migrations (portable SQL, both engines).
pub async fn migrate(db: &Db) -> Result<(), estate_store::StoreError> {
    db.migrate("gate", sqlx::migrate!("./migrations")).await
}

/// The gate service and the background tasks it needs (the decision writer
/// and the bus follower), built from a runtime: hot-path cache and
/// anti-passback presence in Redis when configured, in memory otherwise.
/// Decisions are appended to `audit_log` when given (the all-in-one process,
/// whose audit log is in the runtime's database), else to the outbox. A
/// presence kept in memory is first restored from the database.
pub async fn service(
    runtime: &Runtime,
    face: Option<Arc<dyn FaceMatcher>>,
    audit_log: Option<Arc<dyn AuditSink>>,
) -> Result<(GateDesk, GateTasks), StartError> {
    let s = &runtime.settings.gate;
    let cache =
        CredentialCache::new(runtime.redis.clone(), Duration::from_secs(s.cache_ttl_secs.max(1)), s.cache_capacity);
    let presence = Presence::new(runtime.redis.clone());
    let restored =
        presence.restore(&runtime.db).await.map_err(|e| StartError::Restore(format!("anti-passback presence: {e}")))?;
    if restored > 0 {
        tracing::info!(passages = restored, "anti-passback presence restored");
    }
    let (writer, writer_task) = DecisionWriter::start(runtime.db.clone(), s.decision_batch, audit_log);
    let desk = GateDesk::new(
        runtime.db.clone(),
        runtime.keys.hasher.clone(),
        runtime.keys.bundle_signing.clone(),
        estate_credentials::service(runtime),
        cache,
        presence,
        writer,
        runtime.bus.clone(),
        GateOptions {
            max_bundle_ttl_secs: s.max_bundle_ttl_secs.max(60),
            facts_ttl: Duration::from_secs(s.facts_ttl_secs),
            watch_buffer: s.watch_buffer,
            max_streams_per_gate: s.max_streams_per_gate.max(1),
            max_streams: s.max_streams.max(1),
        },
    )
    .with_face(face);
    let follower = desk.start_follower();
    Ok((desk, GateTasks { writer: writer_task, follower }))
}

/// The gate service's background tasks: the decision writer and the bus
/// follower.
#[derive(Debug)]
pub struct GateTasks {
    writer: tokio::task::JoinHandle<()>,
    follower: tokio::task::JoinHandle<()>,
}

/// How long a stopping gate service waits for its decision writer.
const WRITER_GRACE: Duration = Duration::from_secs(5);

impl GateTasks {
    /// Stops them once the server has stopped serving: ends the follower,
    /// drops `desk` (with it the last handle to the decision writer), and
    /// waits up to five seconds for the writer to commit what is queued and
    /// write the gates' last-seen times it holds; then it is cut off.
    pub async fn stop(self, desk: GateDesk) {
        self.follower.abort();
        let _ = self.follower.await;
        drop(desk);
        let mut writer = self.writer;
        if tokio::time::timeout(WRITER_GRACE, &mut writer).await.is_err() {
            tracing::warn!("the decision writer did not finish in time; stopped");
            writer.abort();
        }
    }
}

/// A migrated gate database for a unit test (SQLite in `dir`, or PostgreSQL
/// when the tests are pointed at it) and its handle, to drop at the end.
#[cfg(test)]
pub(crate) async fn test_db(dir: &std::path::Path) -> anyhow::Result<(estate_test_support::TestDatabase, Db)> {
    let test_db = estate_test_support::TestDatabase::create(dir).await?;
    let db = Db::connect(&estate_store::DbOptions {
        url: test_db.url().to_owned(),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
        statement_timeout_ms: 0,
    })
    .await?;
    migrate(&db).await?;
    Ok((test_db, db))
}

/// The tonic server wrapper with the configured message size limit.
pub fn server(runtime: &Runtime, desk: GateDesk) -> GateServiceServer<GateDesk> {
    let max = runtime.settings.limits.max_message_bytes;
    GateServiceServer::new(desk).max_decoding_message_size(max).max_encoding_message_size(max)
}

/// The gate service as its own process (several replicas when distributed,
/// sharing PostgreSQL and Redis): migrates when configured, binds the
/// listener, and ends open change streams when asked to stop.
pub async fn application(runtime: Runtime) -> Result<ServiceApp, StartError> {
    if runtime.settings.database.migrate_on_start {
        estate_credentials::migrate(&runtime.db).await?;
        migrate(&runtime.db).await?;
    }
    let face = estate_runtime::remote_face_matcher(&runtime, "gate")?;
    let (desk, tasks) = service(&runtime, face, None).await?;
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(server(&runtime, desk.clone()));
    let closing = desk.clone();
    Ok(ServiceApp::build(runtime, routes, &[SERVICE_NAME])
        .await?
        .on_shutdown(move || closing.close_streams())
        .after_serving(tasks.stop(desk)))
}
