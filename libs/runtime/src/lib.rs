//! What every mesh process starts with, so that the all-in-one `estate-mesh`
//! and the one-service binaries compose the same pieces instead of copying them:
//!
//! - [`Runtime`]: settings, keys (loaded or generated), the database pool with
//!   the outbox migrated, and the event bus (Redis when configured).
//! - [`GrpcApp`]: a pre-bound listener (port 0 works) and a tonic server with
//!   the authentication layer (R14), tonic-health, tonic-reflection, a maximum
//!   message size, and graceful shutdown on SIGTERM / Ctrl-C.

mod deadline;
mod face;
pub mod idempotency;
pub mod metrics;
pub mod relay;
mod rpc_trace;

pub use deadline::{Deadline, DeadlineLayer, parse_grpc_timeout};
pub use face::{RemoteFaceMatcher, remote_face_matcher};
pub use idempotency::{IDEMPOTENCY_HEADER, IdempotencyLayer, REPLAY_HEADER};
pub use rpc_trace::{RpcTrace, RpcTraceLayer};

use estate_auth::{AuthLayer, TokenAuthority};
use estate_bus::EventBus;
use estate_config::Settings;
use estate_crypto::{KeyedHasher, SecretBox, SigningKeyPair};
use estate_store::{Db, DbOptions};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::RoutesBuilder;
use tonic::transport::server::Router;
use tower::layer::util::{Identity, Stack};

/// File name of the token signing key in the keys directory.
pub const TOKEN_KEY_FILE: &str = "token-signing.ed25519";
/// File name of the consent attestation signing key in the keys directory.
pub const CONSENT_KEY_FILE: &str = "consent-attestation.ed25519";
/// File name of the audit checkpoint signing key in the keys directory.
pub const AUDIT_KEY_FILE: &str = "audit-checkpoint.ed25519";
/// File name of the offline bundle signing key in the keys directory.
pub const BUNDLE_KEY_FILE: &str = "gate-bundle.ed25519";
/// File name of the master key sealing credential secrets (QR seeds).
pub const SECRET_BOX_FILE: &str = "credential-secrets.key";
/// File name of the keyed-hash secret in the keys directory.
pub const HASH_SECRET_FILE: &str = "keyed-hash.secret";

/// Errors while starting a process.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Keys could not be loaded or created.
    #[error(transparent)]
    Keys(#[from] estate_crypto::CryptoError),
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] estate_store::StoreError),
    /// Redis could not be reached.
    #[error(transparent)]
    Bus(#[from] estate_bus::BusError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The token authority could not be built.
    #[error("token authority: {0}")]
    Tokens(String),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// TLS files are missing or invalid.
    #[error("tls: {0}")]
    Tls(String),
    /// Reflection could not be built from the descriptor sets.
    #[error("reflection: {0}")]
    Reflection(String),
    /// State kept in the database could not be read back.
    #[error("cannot restore {0}")]
    Restore(String),
}

/// The mesh's own keys.
#[derive(Debug, Clone)]
pub struct MeshKeys {
    /// Signs access tokens.
    pub token_signing: SigningKeyPair,
    /// Keys phone hashes and pseudonyms.
    pub hasher: KeyedHasher,
    /// Signs consent attestations (R9).
    pub consent_signing: SigningKeyPair,
    /// Seals credential secrets the mesh must read back.
    pub secret_box: SecretBox,
    /// Signs audit checkpoints and export summaries (R11, R12).
    pub audit_signing: SigningKeyPair,
    /// Signs gates' offline bundles (R15).
    pub bundle_signing: SigningKeyPair,
}

impl MeshKeys {
    /// Loads keys from the configured directory, creating missing ones when
    /// `keys.generate_missing` is set.
    pub fn load(settings: &Settings) -> Result<Self, StartError> {
        let dir = settings.keys_dir();
        let generate = settings.keys.generate_missing;
        Ok(Self {
            token_signing: SigningKeyPair::load_or_generate(&dir.join(TOKEN_KEY_FILE), generate)?,
            hasher: KeyedHasher::load_or_generate(&dir.join(HASH_SECRET_FILE), generate)?,
            consent_signing: SigningKeyPair::load_or_generate(&dir.join(CONSENT_KEY_FILE), generate)?,
            secret_box: SecretBox::load_or_generate(&dir.join(SECRET_BOX_FILE), generate)?,
            audit_signing: SigningKeyPair::load_or_generate(&dir.join(AUDIT_KEY_FILE), generate)?,
            bundle_signing: SigningKeyPair::load_or_generate(&dir.join(BUNDLE_KEY_FILE), generate)?,
        })
    }
}

/// Shared state of a process: settings, keys, database and bus.
#[derive(Clone)]
pub struct Runtime {
    /// Effective settings.
    pub settings: Settings,
    /// The mesh keys.
    pub keys: MeshKeys,
    /// Issues and verifies tokens.
    pub tokens: TokenAuthority,
    /// The database pool.
    pub db: Db,
    /// The event bus.
    pub bus: EventBus,
    /// Redis, when configured: shared counters and caches across replicas.
    pub redis: Option<redis::aio::ConnectionManager>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("settings", &self.settings)
            .field("db", &self.db)
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Starts the outbox relay to a remote audit service when
    /// `audit.relay_to` is set (services that do not share the audit
    /// service's database). `None` when not configured.
    pub fn start_remote_relay(&self) -> Result<Option<tokio::task::JoinHandle<()>>, StartError> {
        let a = &self.settings.audit;
        let Some(endpoint) = &a.relay_to else { return Ok(None) };
        let path = a
            .relay_token_file
            .as_ref()
            .ok_or_else(|| StartError::Tokens("audit.relay_to is set but audit.relay_token_file is not".into()))?;
        let token = std::fs::read_to_string(path)
            .map_err(|e| StartError::Tokens(format!("cannot read {}: {e}", path.display())))?;
        let tls = estate_auth::tls::client_config(&self.settings.tls, endpoint).map_err(StartError::Tls)?;
        let handle = relay::spawn_remote_relay(
            self.db.clone(),
            endpoint,
            tls,
            &token,
            a.relay_batch.max(1),
            Duration::from_millis(a.relay_interval_ms.max(10)),
            Duration::from_secs(a.outbox_retention_secs),
        )
        .map_err(StartError::Tokens)?;
        Ok(Some(handle))
    }

    /// Opens everything `settings` names. Runs the outbox migrations when
    /// `database.migrate_on_start` is set.
    pub async fn open(settings: Settings) -> Result<Self, StartError> {
        let keys = MeshKeys::load(&settings)?;
        let tokens = TokenAuthority::new(settings.auth.issuer.clone(), &keys.token_signing)
            .map_err(|e| StartError::Tokens(e.to_string()))?;
        let db = Db::connect(&DbOptions {
            url: settings.database_url(),
            max_connections: settings.database.max_connections,
            acquire_timeout: Duration::from_secs(settings.database.acquire_timeout_secs),
            statement_timeout_ms: settings.database.statement_timeout_ms,
        })
        .await?;
        if settings.database.migrate_on_start {
            db.migrate_outbox().await?;
        }
        let (bus, redis) = match &settings.redis.url {
            Some(url) => {
                let client = redis::Client::open(url.as_str()).map_err(estate_bus::BusError::from)?;
                let conn = estate_bus::redis_connection(&client).await?;
                (EventBus::redis(url).await?, Some(conn))
            }
            None => (EventBus::local(), None),
        };
        Ok(Self { settings, keys, tokens, db, bus, redis })
    }
}

/// The server's layers, outermost first: trace, deadline, authentication,
/// idempotency keys.
type Layers = Stack<IdempotencyLayer, Stack<AuthLayer, Stack<DeadlineLayer, Stack<RpcTraceLayer, Identity>>>>;

/// Idempotency keys kept in Redis when configured, else in the process; a
/// call's pending mark outlives the request ceiling by a minute.
fn idempotency_layer(runtime: &Runtime) -> IdempotencyLayer {
    let store = match &runtime.redis {
        Some(conn) => idempotency::Store::Redis(conn.clone()),
        None => idempotency::Store::Local(Default::default()),
    };
    let ceiling = match runtime.settings.limits.request_timeout_ms {
        0 => Duration::from_secs(300),
        ms => Duration::from_millis(ms),
    };
    IdempotencyLayer::new(
        store,
        runtime.keys.secret_box.clone(),
        Duration::from_secs(runtime.settings.limits.idempotency_ttl_secs),
        ceiling + Duration::from_secs(60),
        runtime.settings.limits.max_message_bytes,
    )
}

/// A gRPC server bound to its port, ready to run.
#[derive(Debug)]
pub struct GrpcApp {
    listener: TcpListener,
    port: u16,
    metrics: Option<(u16, tokio::task::JoinHandle<()>)>,
    router: Router<Layers>,
}

impl GrpcApp {
    /// Binds `runtime.settings.listen` and mounts `services` behind the
    /// authentication layer, plus health (reporting each of `service_names`
    /// as serving) and reflection over every descriptor set of the mesh.
    pub async fn build(runtime: &Runtime, services: RoutesBuilder, service_names: &[&str]) -> Result<Self, StartError> {
        let addr = runtime.settings.listen;
        let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
        let port = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?.port();
        let metrics = match runtime.settings.metrics.listen {
            Some(maddr) => {
                let l = TcpListener::bind(maddr).await.map_err(|source| StartError::Bind { addr: maddr, source })?;
                let mport = l.local_addr().map_err(|source| StartError::Bind { addr: maddr, source })?.port();
                Some((mport, metrics::serve(l)))
            }
            None => None,
        };

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        for name in service_names {
            health_reporter.set_service_status(*name, tonic_health::ServingStatus::Serving).await;
        }
        health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(estate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Reflection(e.to_string()))?;

        let mut routes = services;
        routes.add_service(health_service);
        routes.add_service(reflection);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = estate_auth::tls::server_config(&runtime.settings.tls).map_err(StartError::Tls)? {
            builder = builder.tls_config(tls).map_err(|e| StartError::Tls(e.to_string()))?;
        }
        let router = builder
            .layer(RpcTraceLayer)
            .layer(DeadlineLayer::new(match runtime.settings.limits.request_timeout_ms {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            }))
            .layer(AuthLayer::new(runtime.tokens.verifying_keys().clone()))
            .layer(idempotency_layer(runtime))
            .add_routes(routes.routes());
        Ok(Self { listener, port, metrics, router })
    }

    /// The bound port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The bound port of the metrics endpoint, when configured.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics.as_ref().map(|(p, _)| *p)
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        // `Server::tcp_nodelay` applies only to listeners tonic binds itself;
        // accepted sockets here get it from the incoming stream. Without it,
        // Nagle's algorithm holds back small HTTP/2 frames until the peer's
        // delayed ACK (40 ms), which showed as a 40 ms p99 even for no-op calls.
        let incoming = tonic::transport::server::TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let served = self.router.serve_with_incoming_shutdown(incoming, shutdown).await;
        if let Some((_, task)) = self.metrics {
            task.abort();
        }
        served?;
        Ok(())
    }

    /// Serves until SIGTERM or Ctrl-C.
    pub async fn run_until_stopped(self) -> Result<(), StartError> {
        self.run_until(shutdown_signal()).await
    }
}

/// One service as its own process: its gRPC server, the background tasks it
/// needs (a sweep, a relay), and, when `audit.relay_to` is set, the relay
/// shipping its outbox to the audit service. Every service binary runs one.
pub struct ServiceApp {
    app: GrpcApp,
    runtime: Runtime,
    background: Vec<tokio::task::JoinHandle<()>>,
    on_shutdown: Vec<ShutdownHook>,
    after_serving: Vec<AfterServing>,
}

/// Work that finishes a service's background tasks once the server has
/// stopped serving (see [`ServiceApp::after_serving`]).
pub type AfterServing = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl std::fmt::Debug for ServiceApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceApp")
            .field("app", &self.app)
            .field("background", &self.background.len())
            .field("on_shutdown", &self.on_shutdown.len())
            .field("after_serving", &self.after_serving.len())
            .finish_non_exhaustive()
    }
}

/// Runs when a stop is requested, before the server drains (ends streams that
/// would otherwise keep graceful shutdown waiting).
pub type ShutdownHook = Box<dyn FnOnce() + Send>;

impl ServiceApp {
    /// Binds the listener and mounts `services` (see [`GrpcApp::build`]).
    pub async fn build(runtime: Runtime, services: RoutesBuilder, service_names: &[&str]) -> Result<Self, StartError> {
        let app = GrpcApp::build(&runtime, services, service_names).await?;
        Ok(Self { app, runtime, background: Vec::new(), on_shutdown: Vec::new(), after_serving: Vec::new() })
    }

    /// Adds a hook run when a stop is requested, before the server drains.
    pub fn on_shutdown(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.on_shutdown.push(Box::new(hook));
        self
    }

    /// Adds work awaited once the server has stopped serving, before the
    /// background tasks are stopped (e.g. a writer finishing its queue).
    pub fn after_serving(mut self, work: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        self.after_serving.push(Box::pin(work));
        self
    }

    /// Adds a background task that stops with the server.
    pub fn with_background(mut self, task: tokio::task::JoinHandle<()>) -> Self {
        self.background.push(task);
        self
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.app.port()
    }

    /// The process's runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Serves until SIGTERM / Ctrl-C, with the remote outbox relay when
    /// configured; stops the background tasks afterwards.
    pub async fn run_until_stopped(mut self) -> Result<(), StartError> {
        if let Some(relay) = self.runtime.start_remote_relay()? {
            self.background.push(relay);
        }
        let hooks = std::mem::take(&mut self.on_shutdown);
        let result = self
            .app
            .run_until(async move {
                shutdown_signal().await;
                for hook in hooks {
                    hook();
                }
            })
            .await;
        for work in self.after_serving {
            work.await;
        }
        for task in self.background {
            task.abort();
        }
        result
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for sigterm");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; draining calls");
}
