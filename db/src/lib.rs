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
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

/// The URL used when `DATABASE_URL` is unset: a SQLite file in the working
/// directory, created on first use.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://igny8.db";

/// The PostgreSQL migrations this binary embeds.
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
/// The SQLite migrations this binary embeds.
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

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
    /// PostgreSQL `statement_timeout` of every connection: no statement runs
    /// longer. On SQLite it bounds the busy wait for the database lock.
    pub statement_timeout: Duration,
    /// PostgreSQL `lock_timeout` of every connection: no statement waits
    /// longer for a row or table lock (a stuck row fails fast instead of
    /// holding a pooled connection).
    pub lock_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(2),
        }
    }
}

impl PoolConfig {
    /// The same timeouts with another size: the small pool that directory
    /// lookups and readiness use, so they never queue behind writes.
    pub fn sized(&self, max_connections: u32) -> Self {
        Self {
            max_connections,
            ..self.clone()
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
                // Session settings sent at connect: every pooled connection
                // carries the bounds, whoever uses it.
                let options = PgConnectOptions::from_str(url)
                    .map_err(|e| DbError::InvalidUrl(format!("{}: {e}", redact_url(url))))?
                    .options([
                        (
                            "statement_timeout",
                            config.statement_timeout.as_millis().to_string(),
                        ),
                        ("lock_timeout", config.lock_timeout.as_millis().to_string()),
                    ]);
                check_tls_files(url)?;
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
                    // queue on the busy timeout (the statement bound) instead
                    // of failing at once.
                    .journal_mode(SqliteJournalMode::Wal)
                    // FULL: a commit is on disk before it is acknowledged,
                    // so an acknowledged deduct survives power loss (NORMAL
                    // in WAL mode may lose the last commits).
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(config.statement_timeout);
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
    ///
    /// On PostgreSQL migrations run on a connection of their own with the
    /// statement and lock time-outs lifted (an index build may take longer,
    /// and replicas queue on sqlx's advisory lock); the connection is closed
    /// afterwards, never returned to the pool.
    pub async fn migrate(&self) -> Result<(), DbError> {
        match self {
            Db::Postgres(pool) => {
                let mut conn = pool.acquire().await?.detach();
                sqlx::query("SET statement_timeout = 0")
                    .execute(&mut conn)
                    .await?;
                sqlx::query("SET lock_timeout = 0")
                    .execute(&mut conn)
                    .await?;
                // `run_direct` is `run` on a connection, without the
                // "Acquire is not general enough" trap of `&mut PgConnection`.
                let result = POSTGRES_MIGRATIONS.run_direct(None, &mut conn, false).await;
                let _ = sqlx::Connection::close(conn).await;
                result?
            }
            Db::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    /// The migrations this binary embeds that the database does not have
    /// (absent, failed, or applied with different contents), in order; empty
    /// when the schema is what this binary expects. Migrations the database
    /// has beyond these (a newer release's) do not count: they are additive.
    /// One or two small queries; also answers whether the database is up.
    pub async fn missing_migrations(&self) -> Result<Vec<MissingMigration>, DbError> {
        const APPLIED: &str = "SELECT version, checksum, success FROM _sqlx_migrations";
        let (migrator, applied): (&Migrator, Vec<AppliedMigration>) = match self {
            Db::Postgres(pool) => {
                let exists: bool =
                    sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                        .fetch_one(pool)
                        .await?;
                let rows = if exists {
                    sqlx::query_as(APPLIED).fetch_all(pool).await?
                } else {
                    Vec::new()
                };
                (&POSTGRES_MIGRATIONS, rows)
            }
            Db::Sqlite(pool) => {
                let exists: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
                )
                .fetch_one(pool)
                .await?;
                let rows = if exists > 0 {
                    sqlx::query_as(APPLIED).fetch_all(pool).await?
                } else {
                    Vec::new()
                };
                (&SQLITE_MIGRATIONS, rows)
            }
        };
        Ok(migrator
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
            .filter_map(|m| {
                let problem = match applied.iter().find(|(v, _, _)| *v == m.version) {
                    None => MigrationProblem::NotApplied,
                    Some((_, _, false)) => MigrationProblem::Failed,
                    Some((_, checksum, true)) if checksum.as_slice() != &*m.checksum => {
                        MigrationProblem::Changed
                    }
                    Some(_) => return None,
                };
                Some(MissingMigration {
                    version: m.version,
                    description: m.description.to_string(),
                    problem,
                })
            })
            .collect())
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

    /// A new pool of at most `max_connections`, connecting lazily with this
    /// pool's options (the same URL, TLS and session settings, the same
    /// acquire time-out). A connection's I/O is driven by the Tokio runtime
    /// it was opened on, so a task running on a runtime of its own (the
    /// ledger writer) takes its connections from a sibling made there.
    /// `postgres_settings` are further session settings for its PostgreSQL
    /// connections (sent at connect, like the bounds); SQLite has none.
    pub fn sibling(&self, max_connections: u32, postgres_settings: &[(&str, &str)]) -> Self {
        match self {
            Db::Postgres(pool) => Db::Postgres(
                PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(pool.options().get_acquire_timeout())
                    .connect_lazy_with(
                        (*pool.connect_options())
                            .clone()
                            .options(postgres_settings.iter().copied()),
                    ),
            ),
            Db::Sqlite(pool) => Db::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(pool.options().get_acquire_timeout())
                    .connect_lazy_with((*pool.connect_options()).clone()),
            ),
        }
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
    /// The statement that opens a writing transaction (`BEGIN IMMEDIATE` on
    /// SQLite), for callers that begin on a connection they hold.
    const BEGIN: &'static str;
    /// Begins a transaction that is allowed to write.
    fn begin_write(
        &self,
    ) -> impl std::future::Future<
        Output = Result<sqlx::Transaction<'static, Self::Database>, sqlx::Error>,
    > + Send;
}

impl BeginWrite for PgPool {
    type Database = sqlx::Postgres;
    const BEGIN: &'static str = "BEGIN";
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.begin_with(Self::BEGIN).await
    }
}

impl BeginWrite for SqlitePool {
    type Database = sqlx::Sqlite;
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with(Self::BEGIN).await
    }
}

/// A `_sqlx_migrations` row: version, checksum, success.
type AppliedMigration = (i64, Vec<u8>, bool);

/// A migration the binary needs that the database does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingMigration {
    /// Its number (the file's prefix).
    pub version: i64,
    /// Its name (the rest of the file name).
    pub description: String,
    /// What is wrong.
    pub problem: MigrationProblem,
}

/// Why a [`MissingMigration`] counts as missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationProblem {
    /// Never applied.
    NotApplied,
    /// Applied, but it failed part-way (sqlx recorded `success = false`).
    Failed,
    /// Applied from a different file than this binary embeds.
    Changed,
}

impl std::fmt::Display for MissingMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04}_{}",
            self.version,
            self.description.replace(' ', "_")
        )?;
        match self.problem {
            MigrationProblem::NotApplied => write!(f, " (not applied)"),
            MigrationProblem::Failed => write!(f, " (failed part-way)"),
            MigrationProblem::Changed => write!(f, " (applied with different contents)"),
        }
    }
}

/// The missing migrations as one line, for logs.
pub fn describe_missing(missing: &[MissingMigration]) -> String {
    missing
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The certificate and key files a PostgreSQL URL names (`sslrootcert`,
/// `sslcert`, `sslkey`) must be readable: otherwise every connection would
/// fail later with an error that looks like an outage.
fn check_tls_files(url: &str) -> Result<(), DbError> {
    let Some((_, query)) = url.split_once('?') else {
        return Ok(());
    };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !matches!(key, "sslrootcert" | "sslcert" | "sslkey") {
            continue;
        }
        let path = percent_decode(value);
        // sqlx takes inline PEM here too.
        if path.starts_with("-----BEGIN") {
            continue;
        }
        if let Err(e) = std::fs::File::open(&path) {
            return Err(DbError::InvalidUrl(format!(
                "{key}={path} cannot be read: {e} (in {})",
                redact_url(url)
            )));
        }
    }
    Ok(())
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// When `err` is a failed TLS set-up with the database (the server's
/// certificate is not trusted or does not name the host, the server does
/// not offer TLS, a client certificate is refused), what went wrong;
/// `None` for any other error (an outage, a refused login).
pub fn tls_failure(err: &DbError) -> Option<String> {
    let DbError::Sqlx(err) = err else {
        return None;
    };
    match err {
        sqlx::Error::Tls(e) => Some(e.to_string()),
        // The handshake runs inside sqlx's socket, so rustls' verdict
        // arrives wrapped in an I/O error.
        sqlx::Error::Io(e) => e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(ToString::to_string),
        _ => None,
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

/// True when the error is transient — the database could not be reached,
/// is overloaded, or a time-out bounded the wait — as opposed to a query the
/// database refused: callers map it to UNAVAILABLE (retryable), never
/// INTERNAL.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|c| is_transient_code(&c)),
        _ => false,
    }
}

/// SQLSTATEs (PostgreSQL) and result codes (SQLite) that say "try again".
fn is_transient_code(code: &str) -> bool {
    // PostgreSQL: class 08 connection exceptions, class 53 insufficient
    // resources (53300 too_many_connections), 57014 query_canceled (our
    // statement_timeout), 55P03 lock_not_available (our lock_timeout),
    // 57P01..57P03 admin/crash shutdown, cannot connect now.
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "57014" | "55P03" | "57P01" | "57P02" | "57P03")
        // SQLite: BUSY, LOCKED and their extended codes (BUSY_RECOVERY,
        // LOCKED_SHAREDCACHE, BUSY_SNAPSHOT, BUSY_TIMEOUT).
        || matches!(code, "5" | "6" | "261" | "262" | "517" | "773")
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

    #[test]
    fn transient_codes_are_unavailable() {
        for code in ["53300", "55P03", "57014", "08006", "57P01", "5", "517"] {
            assert!(is_transient_code(code), "{code}");
        }
        for code in ["23505", "23514", "42P01", "1", "19"] {
            assert!(!is_transient_code(code), "{code}");
        }
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
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
