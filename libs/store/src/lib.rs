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
use std::sync::Arc;
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

/// How often the SQLite write-ahead log is copied back into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL pages (4 KiB) above which the checkpointer restarts the log, and the
/// size (in pages) the WAL file is cut back to when it is reset: 64 MiB.
const WAL_RESTART_PAGES: i64 = 16_384;

/// Copies the SQLite WAL into the database file every [`CHECKPOINT_EVERY`]
/// with a PASSIVE checkpoint (it never waits for readers or blocks writers),
/// on a pooled connection, until the pool closes. With SQLite's automatic
/// checkpoint, the commit that crossed 1,000 WAL pages did the copy itself
/// and stalled every writer queued behind it (the gate benchmark's p99).
///
/// A checkpoint copies frames but does not reset the log: SQLite starts the
/// WAL again from its beginning only when a writer begins while every frame
/// has been copied. A PASSIVE copy of a quarter second of commits takes tens
/// of milliseconds, during which the next commits land, so under a steady
/// stream of commits that moment never came: the WAL grew without bound
/// (550 MB in a 40 s benchmark) and every read searched a longer WAL index.
/// So when the WAL holds more than `restart_pages` pages, the checkpointer
/// makes two more passes, then copies the few frames written meanwhile
/// holding the writers' turn: then everything is copied when the next writer
/// begins, and that writer restarts the log (`journal_size_limit` truncates
/// the file).
/// The turn is held for that short copy only: 3–4 ms in gate-bench (20 ms
/// when it followed a single pass; a RESTART checkpoint would also wait for
/// readers, in SQLite's busy handler). If a reader still uses the old
/// frames, the restart waits for a later tick.
fn spawn_checkpointer(pool: AnyPool, writer: Arc<tokio::sync::Mutex<()>>, restart_pages: i64) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            match wal_checkpoint(&pool).await {
                Ok((_, pages, _)) if pages > restart_pages => {
                    // Two more passes without the turn, each copying what was
                    // committed during the one before, so that what is left
                    // to copy (and fsync) while writers wait is a few frames.
                    for _ in 0..2 {
                        let _ = wal_checkpoint(&pool).await;
                    }
                    let _turn = writer.lock().await;
                    if let Err(e) = wal_checkpoint(&pool).await {
                        tracing::debug!(error = %e, "wal catch-up skipped");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if pool.is_closed() {
                        return;
                    }
                    tracing::debug!(error = %e, "wal checkpoint skipped");
                }
            }
        }
    });
}

/// A PASSIVE checkpoint: (busy, pages in the WAL, pages copied).
async fn wal_checkpoint(pool: &AnyPool) -> Result<(i64, i64, i64), sqlx::Error> {
    sqlx::query_as::<sqlx::Any, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(pool).await
}

/// A connection pool and its engine.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    /// SQLite: write transactions of this process take turns here, in order,
    /// instead of meeting SQLITE_BUSY and sleeping in SQLite's busy handler
    /// (1, 2, 5, … 100 ms steps), which made a gate decision wait 100+ ms
    /// behind the audit relay. Other processes still meet the busy timeout.
    writer: Option<Arc<tokio::sync::Mutex<()>>>,
}

/// A write transaction (see [`Db::begin`]); derefs to the connection. Its
/// `db.transaction` span (a child of the caller's) lasts from the request
/// for the transaction to its commit, rollback or drop, so traces show the
/// database work on SQLite too, where sqlx's per-statement reports come from
/// a worker thread outside any span.
#[derive(Debug)]
pub struct WriteTx {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    _span: tracing::Span,
}

impl WriteTx {
    /// Commits.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl Db {
    /// Opens the pool. A SQLite file and its directory are created if missing.
    pub async fn connect(opts: &DbOptions) -> Result<Self, StoreError> {
        Self::open(opts, WAL_RESTART_PAGES).await
    }

    async fn open(opts: &DbOptions, wal_restart_pages: i64) -> Result<Self, StoreError> {
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
            // A ping before each use finds a PostgreSQL connection the server
            // dropped; a SQLite connection is a file handle in this process,
            // and its ping was one more hop to the connection's thread on
            // every statement.
            .test_before_acquire(backend == Backend::Postgres)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    match backend {
                        Backend::Sqlite => {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA busy_timeout = 5000").await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            conn.execute("PRAGMA synchronous = NORMAL").await?;
                            // Statement journals (a multi-row INSERT into
                            // indexed tables needs one) stay in memory
                            // instead of spilling to a temporary file.
                            conn.execute("PRAGMA temp_store = MEMORY").await?;
                            // Checkpoints run in the background (see
                            // `spawn_checkpointer`), not inside some writer's
                            // commit, which they used to stall for tens of ms.
                            conn.execute("PRAGMA wal_autocheckpoint = 0").await?;
                            let limit = format!("PRAGMA journal_size_limit = {}", wal_restart_pages * 4096);
                            conn.execute(sqlx::AssertSqlSafe(limit)).await?;
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
        let writer = if backend == Backend::Sqlite {
            let writer = Arc::new(tokio::sync::Mutex::new(()));
            spawn_checkpointer(pool.clone(), writer.clone(), wal_restart_pages);
            Some(writer)
        } else {
            None
        };
        Ok(Self { pool, backend, writer })
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
    pub async fn begin(&self) -> Result<WriteTx, Error> {
        let system = match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgresql",
        };
        let span = tracing::info_span!("db.transaction", otel.kind = "client", db.system = system);
        match (&self.writer, self.backend) {
            (Some(turn), Backend::Sqlite) => {
                let turn = turn.clone().lock_owned().await;
                let tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?;
                Ok(WriteTx { tx, _turn: Some(turn), _span: span })
            }
            (_, Backend::Sqlite) => Ok(WriteTx {
                tx: self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?,
                _turn: None,
                _span: span,
            }),
            (_, Backend::Postgres) => {
                Ok(WriteTx { tx: self.pool.begin().await.map_err(db_error)?, _turn: None, _span: span })
            }
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
        // Connection exceptions (08…), operator intervention such as a
        // shutdown or a restart in progress (57…), insufficient resources
        // (53…): the server, not the request, is the problem.
        sqlx::Error::Database(db)
            if db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57") || c.starts_with("53")) =>
        {
            Error::Unavailable("the database is unavailable, retry shortly".into())
        }
        sqlx::Error::WorkerCrashed | sqlx::Error::Protocol(_) => {
            Error::Unavailable("the database connection failed, retry shortly".into())
        }
        _ => Error::Internal(format!("database: {err}")),
    }
}

/// Whether `err` is a unique-constraint violation.
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// `count` bind parameters for a statement on `conn`, numbered from `first`
/// (PostgreSQL: `$first, …`). On SQLite they are anonymous `?`, bound in
/// order: SQLite looks each numbered `$n` up by a linear scan of the
/// statement's parameter names, so binding a multi-row statement with
/// numbered parameters grows with the square of its size (6% of the
/// all-in-one gate's CPU in a profile); anonymous ones are found in constant
/// time. The statement must bind its values in the order they appear.
pub fn params(conn: &sqlx::AnyConnection, first: usize, count: usize) -> String {
    let sqlite = conn.backend_name().eq_ignore_ascii_case("sqlite");
    let mut out = String::with_capacity(count * 5);
    for i in 0..count {
        if i > 0 {
            out.push_str(", ");
        }
        if sqlite {
            out.push('?');
        } else {
            out.push('$');
            out.push_str(&(first + i).to_string());
        }
    }
    out
}

/// `rows` parenthesised groups of `cols` parameters for a multi-row
/// `INSERT … VALUES` on `conn`, numbered from 1 (see [`params`]).
pub fn value_rows(conn: &sqlx::AnyConnection, rows: usize, cols: usize) -> String {
    (0..rows).map(|r| format!("({})", params(conn, r * cols + 1, cols))).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under commits that never pause, the WAL is still reset and cut back:
    /// its file shrinks during the run and never holds everything written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_steady_writes() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("wal.db");
        let opts = DbOptions {
            url: format!("sqlite://{}", path.display()),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout_ms: 0,
        };
        // 64 pages: a 256 KiB WAL limit.
        let db = Db::open(&opts, 64).await?;
        sqlx::query("CREATE TABLE blobs (id INTEGER PRIMARY KEY, body BLOB NOT NULL)").execute(db.pool()).await?;
        let wal = dir.path().join("wal.db-wal");
        let body = vec![7u8; 16 * 1024];
        let (mut written, mut largest, mut shrank, mut last) = (0u64, 0u64, false, 0u64);
        let until = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < until {
            let mut tx = db.begin().await?;
            sqlx::query("INSERT INTO blobs (body) VALUES ($1)").bind(body.clone()).execute(&mut *tx).await?;
            tx.commit().await?;
            written += body.len() as u64;
            let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            shrank |= size < last;
            largest = largest.max(size);
            last = size;
        }
        db.close().await;
        assert!(written > 8 * 1024 * 1024, "only {written} bytes written; the test needs a steady stream");
        assert!(shrank, "the WAL never shrank while {written} bytes were committed (largest {largest} bytes)");
        assert!(largest < written / 2, "the WAL grew to {largest} bytes of {written} written");
        Ok(())
    }
}
