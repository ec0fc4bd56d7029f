//! Storage shared by every service.
//!
//! - [`Db`]: one sqlx `AnyPool`, SQLite for the embedded default and
//!   PostgreSQL when distributed, chosen by the URL scheme. SQL is written once
//!   with `$n` placeholders that both accept.
//! - Migrations belong to the crate that owns the tables; each crate keeps its
//!   own migrations table ([`Db::migrate`]), so crates migrate independently.
//! - [`outbox`]: the audit outbox (R11), written inside the caller's transaction.
//! - [`page`]: opaque page tokens for list calls.

pub mod filter;
pub mod outbox;
pub mod page;

use estate_core::Error;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};
use std::str::FromStr;
use std::time::Duration;

pub use sqlx;

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file (embedded default).
    Sqlite,
    /// A PostgreSQL server (distributed mode).
    Postgres,
}

/// Errors opening or migrating a database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is neither `sqlite:` nor `postgres:`.
    #[error("database url must start with sqlite:// or postgres://")]
    UnsupportedUrl,
    /// Connecting failed.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// How to open a [`Db`].
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// `sqlite://path` or `postgres://…`.
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// Wait for a pooled connection at most this long.
    pub acquire_timeout: Duration,
    /// PostgreSQL statement timeout in milliseconds (0: none).
    pub statement_timeout_ms: u64,
}

/// A connection pool and its engine.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

impl Db {
    /// Opens the pool. A SQLite file and its directory are created if missing.
    pub async fn connect(opts: &DbOptions) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if let Some(path) = opts.url.strip_prefix("sqlite://") {
            let path_only = path.split('?').next().unwrap_or(path);
            if let Some(parent) = std::path::Path::new(path_only).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|e| StoreError::Connect(sqlx::Error::Io(e)))?;
            }
            let url = if path.contains('?') { opts.url.clone() } else { format!("{}?mode=rwc", opts.url) };
            (Backend::Sqlite, url)
        } else if opts.url.starts_with("postgres://") || opts.url.starts_with("postgresql://") {
            (Backend::Postgres, opts.url.clone())
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        let connect_opts = AnyConnectOptions::from_str(&url).map_err(StoreError::Connect)?;
        let statement_timeout_ms = opts.statement_timeout_ms;
        let pool = AnyPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(opts.acquire_timeout)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    match backend {
                        Backend::Sqlite => {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA busy_timeout = 5000").await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            conn.execute("PRAGMA synchronous = NORMAL").await?;
                        }
                        Backend::Postgres => {
                            // Plans cached while a table was small (a seq scan)
                            // would stay in use as it grows; plan each query
                            // with the table as it is now.
                            conn.execute("SET plan_cache_mode = force_custom_plan").await?;
                            if statement_timeout_ms > 0 {
                                let sql = format!("SET statement_timeout = {statement_timeout_ms}");
                                conn.execute(sqlx::AssertSqlSafe(sql)).await?;
                            }
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(connect_opts)
            .await
            .map_err(StoreError::Connect)?;
        Ok(Self { pool, backend })
    }

    /// The pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The engine.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs `migrator` with its own bookkeeping table `_migrations_<owner>`,
    /// ignoring other crates' migrations.
    pub async fn migrate(&self, owner: &'static str, mut migrator: Migrator) -> Result<(), StoreError> {
        migrator.set_ignore_missing(true);
        migrator.dangerous_set_table_name(format!("_migrations_{owner}"));
        migrator.run(&self.pool).await.map_err(StoreError::Migrate)
    }

    /// Applies the outbox migrations owned by this crate.
    pub async fn migrate_outbox(&self) -> Result<(), StoreError> {
        let migrator = match self.backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        self.migrate("store", migrator).await
    }

    /// Starts a write transaction. On SQLite it is `BEGIN IMMEDIATE`, so the
    /// write lock is taken up front: a transaction that reads and then writes
    /// waits for other writers (busy timeout) instead of failing when another
    /// connection or process committed in between.
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_error),
            Backend::Postgres => self.pool.begin().await.map_err(db_error),
        }
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Maps a storage error to the domain error. Connection trouble becomes
/// UNAVAILABLE (the caller may retry); everything else is INTERNAL with the
/// detail logged, not returned.
pub fn db_error(err: sqlx::Error) -> Error {
    match &err {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
            Error::Unavailable("the database is unavailable, retry shortly".into())
        }
        sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
            Error::Unavailable("the database timed out, retry shortly".into())
        }
        _ => Error::Internal(format!("database: {err}")),
    }
}

/// Whether `err` is a unique-constraint violation.
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}
