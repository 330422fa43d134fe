//! The one igny8 schema and the handle both services use to reach it.
//!
//! [`Db`] is a connection pool over either PostgreSQL (production) or an
//! embedded SQLite file (the default: no server to install). Queries are
//! written once and run on whichever backend is configured through
//! [`on_pool!`]; where the SQL must differ, the caller matches on [`Db`].
//! Migrations for both backends are embedded in the binary ([`Db::migrate`]).

use std::{str::FromStr, time::Duration};

use sqlx::{
    PgPool, SqlitePool,
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

/// The URL used when `DATABASE_URL` is unset: a SQLite file in the working
/// directory, created on first use.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://igny8.db";

/// A database error, with what the caller was doing.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is not a `postgres://` or `sqlite:` URL, or does not parse.
    #[error("invalid DATABASE_URL: {0}")]
    InvalidUrl(String),
    /// The database could not be reached or answered with an error.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL (15+).
    Postgres,
    /// Embedded SQLite (bundled).
    Sqlite,
}

impl Backend {
    /// The backend a database URL names, without connecting.
    pub fn of_url(url: &str) -> Result<Self, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(DbError::InvalidUrl(format!(
                "{} (expected postgres://… or sqlite://…)",
                redact_url(url)
            )))
        }
    }
}

/// Pool sizing and timeouts.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Upper bound of open connections.
    pub max_connections: u32,
    /// How long a query waits for a free connection before failing.
    pub acquire_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// A pool over one of the two supported backends.
#[derive(Debug, Clone)]
pub enum Db {
    /// A PostgreSQL pool.
    Postgres(PgPool),
    /// A SQLite pool over one database file.
    Sqlite(SqlitePool),
}

/// Runs the same expression against whichever pool a [`Db`] holds.
///
/// The body is type-checked once per backend, so one query text serves both
/// where their SQL agrees (`$1` placeholders, `RETURNING`, `ON CONFLICT`).
///
/// ```ignore
/// let n: i64 = on_pool!(&db, pool => sqlx::query_scalar("SELECT 1").fetch_one(pool).await)?;
/// ```
#[macro_export]
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::Db::Postgres($pool) => $body,
            $crate::Db::Sqlite($pool) => $body,
        }
    };
}

impl Db {
    /// Parses the URL and builds a pool that connects on first use, so a
    /// server can start (and report NOT_SERVING) before its database is up.
    /// Only a malformed URL fails here.
    pub fn connect_lazy(url: &str, config: &PoolConfig) -> Result<Self, DbError> {
        match Backend::of_url(url)? {
            Backend::Postgres => {
                let options = PgConnectOptions::from_str(url)
                    .map_err(|e| DbError::InvalidUrl(format!("{}: {e}", redact_url(url))))?;
                Ok(Db::Postgres(
                    PgPoolOptions::new()
                        .max_connections(config.max_connections)
                        .acquire_timeout(config.acquire_timeout)
                        .connect_lazy_with(options),
                ))
            }
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)
                    .map_err(|e| DbError::InvalidUrl(format!("{}: {e}", redact_url(url))))?
                    .create_if_missing(true)
                    .foreign_keys(true)
                    // WAL lets readers run beside the one writer; writers
                    // queue on the busy timeout instead of failing.
                    .journal_mode(SqliteJournalMode::Wal)
                    // FULL: a commit is on disk before it is acknowledged,
                    // so an acknowledged deduct survives power loss (NORMAL
                    // in WAL mode may lose the last commits).
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(30));
                Ok(Db::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(config.max_connections)
                        .acquire_timeout(config.acquire_timeout.max(Duration::from_secs(30)))
                        .connect_lazy_with(options),
                ))
            }
        }
    }

    /// Connects and checks that the database answers.
    pub async fn connect(url: &str, config: &PoolConfig) -> Result<Self, DbError> {
        let db = Self::connect_lazy(url, config)?;
        db.ping().await?;
        Ok(db)
    }

    /// The backend this pool talks to.
    pub fn backend(&self) -> Backend {
        match self {
            Db::Postgres(_) => Backend::Postgres,
            Db::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// One round trip: succeeds when the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Applies every embedded migration not yet applied. Safe to run from
    /// several replicas at once on PostgreSQL (sqlx takes an advisory lock).
    pub async fn migrate(&self) -> Result<(), DbError> {
        match self {
            Db::Postgres(pool) => sqlx::migrate!("./migrations/postgres").run(pool).await?,
            Db::Sqlite(pool) => sqlx::migrate!("./migrations/sqlite").run(pool).await?,
        }
        Ok(())
    }

    /// Open and idle connections, for pool metrics.
    pub fn pool_state(&self) -> PoolState {
        on_pool!(self, pool => PoolState {
            size: pool.size(),
            idle: u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
        })
    }

    /// Closes every connection; later queries fail.
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await);
    }
}

/// Opening a transaction that will write, the right way for each backend.
///
/// On SQLite a plain (deferred) transaction that reads before it writes can
/// fail with `SQLITE_BUSY` when another writer commits in between, without
/// waiting on the busy timeout; `BEGIN IMMEDIATE` takes the write lock up
/// front so writers queue instead. PostgreSQL needs nothing special: row
/// locks taken by the first `UPDATE` serialize writers of one account.
pub trait BeginWrite {
    /// The database type.
    type Database: sqlx::Database;
    /// Begins a transaction that is allowed to write.
    fn begin_write(
        &self,
    ) -> impl std::future::Future<
        Output = Result<sqlx::Transaction<'static, Self::Database>, sqlx::Error>,
    > + Send;
}

impl BeginWrite for PgPool {
    type Database = sqlx::Postgres;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.begin().await
    }
}

impl BeginWrite for SqlitePool {
    type Database = sqlx::Sqlite;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

/// A snapshot of a pool's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolState {
    /// Connections open (idle or in use).
    pub size: u32,
    /// Connections open and idle.
    pub idle: u32,
}

/// The URL with any password replaced by `***`, for messages and logs.
///
/// The user information ends at the *last* `@` before the query (passwords
/// with an unescaped `@` or `/` are common in generated secrets), and
/// `password=` / `sslpassword=` query parameters are redacted too. When in
/// doubt it hides more, never less.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let before_query = rest.split_once('?').map_or(rest, |(b, _)| b);
    // A password holding `?` pushes its `@` past the query mark: then the
    // last `@` anywhere ends the user information.
    let at = before_query.rfind('@').or_else(|| rest.rfind('@'));
    let mut out = format!("{scheme}://");
    let remainder = match at {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => out.push_str(&format!("{user}:***@")),
                None => out.push_str(&format!("{userinfo}@")),
            }
            &rest[at + 1..]
        }
        None => rest,
    };
    match remainder.split_once('?') {
        None => out.push_str(remainder),
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _))
                        if key.eq_ignore_ascii_case("password")
                            || key.eq_ignore_ascii_case("sslpassword") =>
                    {
                        format!("{key}=***")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            out.push_str(path);
            out.push('?');
            out.push_str(&params.join("&"));
        }
    }
    out
}

/// True when the error is a unique-constraint violation.
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// True when the error says the database could not be reached (as opposed to
/// a query the database refused): callers map it to UNAVAILABLE.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_)
    ) || matches!(err, sqlx::Error::Database(e) if e.code().is_some_and(|c| c == "57P01" || c == "57P03" || c == "5" || c == "6"))
}

/// True when the error is a CHECK-constraint violation.
pub fn is_check_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.is_check_violation())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://igny8:s3cret@db:5432/igny8"),
            "postgres://igny8:***@db:5432/igny8"
        );
        assert_eq!(redact_url("sqlite://igny8.db"), "sqlite://igny8.db");
        for (url, secret) in [
            ("postgres://igny8:p@ss@db:5432/igny8", "p@ss"),
            (
                "postgres://igny8:a/b+c=@d@db/igny8?sslmode=require",
                "a/b+c=@d",
            ),
            (
                "postgres://igny8@db/igny8?password=hunter2&sslmode=verify-full",
                "hunter2",
            ),
            (
                "postgres://db/igny8?sslmode=require&PASSWORD=hunter2",
                "hunter2",
            ),
            ("postgres://db/igny8?sslpassword=hunter2", "hunter2"),
            ("postgres://igny8:pa?ss@db/igny8", "pa?ss"),
        ] {
            let r = redact_url(url);
            assert!(!r.contains(secret), "{url} -> {r}");
            assert!(r.contains("***"), "{url} -> {r}");
        }
        assert_eq!(
            redact_url("postgres://igny8:p@ss@db:5432/igny8?sslmode=verify-full&password=x"),
            "postgres://igny8:***@db:5432/igny8?sslmode=verify-full&password=***"
        );
    }

    #[test]
    fn unknown_schemes_are_rejected() {
        let err = Backend::of_url("mysql://x").unwrap_err();
        assert!(err.to_string().contains("expected postgres://"), "{err}");
    }

    #[tokio::test]
    async fn sqlite_file_is_created_and_migrated_twice() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = Db::connect(&url, &PoolConfig::default()).await.unwrap();
        db.migrate().await.unwrap();
        db.migrate().await.unwrap();
        let n: i64 = on_pool!(&db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM accounts").fetch_one(pool).await).unwrap();
        assert_eq!(n, 0);
        // synchronous=FULL (2) on every pooled connection.
        let sync: i64 =
            on_pool!(&db, pool => sqlx::query_scalar("PRAGMA synchronous").fetch_one(pool).await)
                .unwrap();
        assert_eq!(sync, 2, "SQLite must run with synchronous=FULL");
    }
}
