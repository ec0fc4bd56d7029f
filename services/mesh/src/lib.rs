//! `estate-mesh`: every implemented service in one process, on one port, with
//! SQLite files and keys under a data directory and an in-process bus: the
//! embedded default that runs with no set-up.
//!
//! It composes the same service libraries that also run as separate
//! processes; nothing here re-implements a service.

use estate_auth::Principal;
use estate_config::Settings;
use estate_facematch::{FaceMatcher, FaceRegistry};
use estate_runtime::{GrpcApp, Runtime, StartError};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File in the data directory holding the bootstrap platform-admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Errors of the all-in-one process.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A piece failed to start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Migrations failed.
    #[error(transparent)]
    Store(#[from] estate_store::StoreError),
    /// The data directory could not be created.
    #[error("cannot create the data directory {0}")]
    DataDir(String),
    /// Facematch could not be set up.
    #[error("facematch: {0}")]
    Face(String),
    /// The admin token could not be written.
    #[error("cannot write the admin token: {0}")]
    AdminToken(String),
}

/// Applies every service's migrations.
pub async fn migrate_all(runtime: &Runtime) -> Result<(), estate_store::StoreError> {
    runtime.db.migrate_outbox().await?;
    estate_identity::migrate(&runtime.db).await?;
    estate_consent::migrate(&runtime.db).await?;
    estate_credentials::migrate(&runtime.db).await?;
    estate_audit::migrate(&runtime.db).await?;
    estate_gate::migrate(&runtime.db).await?;
    Ok(())
}

/// The all-in-one mesh, bound and ready to serve.
#[derive(Debug)]
pub struct Application {
    app: GrpcApp,
    runtime: Runtime,
    admin_token_path: PathBuf,
    audit_log: estate_audit::AuditLog,
    gate: estate_gate::GateDesk,
    gate_tasks: estate_gate::GateTasks,
    face: Option<Arc<dyn FaceMatcher>>,
    face_registry: Option<Arc<FaceRegistry>>,
}

/// Facematch for the embedded default: one engine per tenant under
/// `facematch.dir` (default `data_dir/facematch`), each with its own SQLite
/// file, key vault and tenant key, verifying consent attestations with this
/// process's consent key. A remote facematch (`facematch.endpoints`) wins
/// when configured; `facematch.embedded = false` runs without face.
pub fn embedded_face_registry(runtime: &Runtime) -> Result<Option<Arc<FaceRegistry>>, MeshError> {
    let s = &runtime.settings;
    if !s.facematch.embedded || !s.facematch.endpoints.is_empty() {
        return Ok(None);
    }
    let consent_key = &runtime.keys.consent_signing;
    let consent_keys =
        estate_attestation::KeySet::new([(consent_key.key_id().to_owned(), consent_key.public_key_bytes())]);
    let registry = estate_facematch::registry(s, None, consent_keys).map_err(|e| MeshError::Face(e.to_string()))?;
    Ok(Some(Arc::new(registry)))
}

impl Application {
    /// Opens storage and keys under the data directory (creating them on
    /// first start), migrates, writes the admin token if there is none, and
    /// binds the listener.
    pub async fn build(settings: Settings) -> Result<Self, MeshError> {
        prepare_data_dir(&settings.data_dir)?;
        let runtime = Runtime::open(settings).await?;
        if runtime.settings.database.migrate_on_start {
            migrate_all(&runtime).await?;
        }
        let admin_token_path = runtime.settings.data_dir.join(ADMIN_TOKEN_FILE);
        ensure_admin_token(&runtime, &admin_token_path)?;

        let mut routes = tonic::service::RoutesBuilder::default();
        routes.add_service(estate_identity::server(&runtime));
        let face_registry = embedded_face_registry(&runtime)?;
        let face: Option<Arc<dyn FaceMatcher>> = match &face_registry {
            Some(r) => Some(r.clone()),
            None => estate_runtime::remote_face_matcher(&runtime, "gate")?,
        };
        routes.add_service(estate_consent::server(&runtime, face.clone()));
        routes.add_service(estate_credentials::server(&runtime));
        let audit_log = estate_audit::log(&runtime);
        routes.add_service(estate_audit::server(&runtime, audit_log.clone()));
        let (gate, gate_tasks) =
            estate_gate::service(&runtime, face.clone(), Some(Arc::new(audit_log.clone()))).await?;
        routes.add_service(estate_gate::server(&runtime, gate.clone()));
        let mut names = vec![
            estate_identity::SERVICE_NAME,
            estate_consent::SERVICE_NAME,
            estate_credentials::SERVICE_NAME,
            estate_audit::SERVICE_NAME,
            estate_gate::SERVICE_NAME,
        ];
        if let Some(registry) = &face_registry {
            routes.add_service(estate_facematch::server(&runtime.settings, registry.clone()));
            names.push(estate_facematch::SERVICE_NAME);
        }
        let app = GrpcApp::build(&runtime, routes, &names).await?;
        Ok(Self { app, runtime, admin_token_path, audit_log, gate, gate_tasks, face, face_registry })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.app.port()
    }

    /// The bound port of the metrics endpoint, when `metrics.listen` is set.
    pub fn metrics_port(&self) -> Option<u16> {
        self.app.metrics_port()
    }

    /// Where the platform-admin token is.
    pub fn admin_token_path(&self) -> &Path {
        &self.admin_token_path
    }

    /// The shared runtime (database, keys, bus), for tests and tools.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The in-process facematch engines (embedded default), for tests.
    pub fn face_registry(&self) -> Option<&Arc<FaceRegistry>> {
        self.face_registry.as_ref()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), MeshError> {
        let sweep = estate_consent::start_sweep(&self.runtime, self.face.clone());
        let move_out = estate_credentials::start_sweep(&self.runtime);
        let relay = estate_audit::start_relay(&self.runtime, self.audit_log.clone());
        let gate = self.gate.clone();
        let served = self
            .app
            .run_until(async move {
                shutdown.await;
                gate.close_streams();
            })
            .await;
        sweep.abort();
        move_out.abort();
        relay.abort();
        self.gate_tasks.stop(self.gate).await;
        if let Some(registry) = &self.face_registry {
            registry.close().await;
        }
        self.runtime.db.close().await;
        Ok(served?)
    }

    /// Serves until SIGTERM / Ctrl-C.
    pub async fn run_until_stopped(self) -> Result<(), MeshError> {
        self.run_until(estate_runtime::shutdown_signal()).await
    }
}

/// Creates the data directory readable by its owner only: it holds personal
/// data (the SQLite database) and keys.
fn prepare_data_dir(dir: &Path) -> Result<(), MeshError> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| MeshError::DataDir(format!("{}: {e}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| MeshError::DataDir(format!("{}: {e}", dir.display())))?;
    }
    Ok(())
}

/// Writes a platform-admin token to `path` (mode 0600) unless a valid one is
/// already there.
fn ensure_admin_token(runtime: &Runtime, path: &Path) -> Result<(), MeshError> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let still_valid = runtime
            .tokens
            .verifying_keys()
            .verify(existing.trim(), String::new())
            .is_ok_and(|c| c.principal == Principal::PlatformAdmin);
        if still_valid {
            return Ok(());
        }
        tracing::warn!(path = %path.display(), "admin token expired or signed by another key; writing a new one");
    }
    let issued = runtime
        .tokens
        .issue(Principal::PlatformAdmin, "bootstrap-admin", runtime.settings.auth.admin_token_ttl_secs)
        .map_err(|e| MeshError::AdminToken(e.to_string()))?;
    estate_crypto::write_secret_file(path, format!("{}\n", issued.token).as_bytes())
        .map_err(|e| MeshError::AdminToken(e.to_string()))?;
    Ok(())
}
