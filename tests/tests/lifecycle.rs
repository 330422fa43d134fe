//! Health that tells the truth, and shutdown that drains.
//!
//! - A server whose database is unreachable says NOT_SERVING and refuses
//!   calls with UNAVAILABLE (never a silent allow); one whose database goes
//!   away later flips to NOT_SERVING, and back when it returns.
//! - The real `billing-svc` binary, sent SIGTERM with calls in flight,
//!   reports NOT_SERVING, stops accepting connections, finishes those calls
//!   and exits 0; with a call stuck for good it still exits 0 once the drain
//!   bound has passed. A collector that cannot be reached delays neither
//!   start-up nor exit.
//!
//! Calls are held in flight deterministically: the test locks the
//! account's row in PostgreSQL, so a Deduct blocks in its `UPDATE` until
//! the test lets go.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use igny8_db::Db;
use igny8_proto::billing::v1::{GetBalanceRequest, GetCreditCostRequest};
use igny8_tests::*;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const ACCOUNT: i64 = 1;
const EDITOR: i64 = 10;
const BILLING: &str = igny8_proto::BILLING_SERVICE_NAME;

// ---------------------------------------------------------------------------
// In-process: the database is down, or goes away.

/// A configuration that fails fast when the database cannot be reached.
fn impatient_config(url: &str) -> service_kit::ServiceConfig {
    let mut config = test_config(url);
    config.pool.acquire_timeout = Duration::from_secs(1);
    config.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    config
}

async fn dead_database_is_not_serving_and_calls_are_unavailable(url: &str) {
    let (server, metrics) = start_billing_unready(impatient_config(url)).await;
    let metrics = metrics.expect("metrics on");
    // Several readiness rounds (one a second): it never claims SERVING.
    for _ in 0..5 {
        for service in ["", BILLING] {
            assert_eq!(
                server.health(service).await,
                ServingStatus::NotServing,
                "health of {service:?} with the database down"
            );
        }
        // Alive all the same: a database outage must not restart pods.
        assert_eq!(
            server.health(service_kit::LIVENESS_SERVICE).await,
            ServingStatus::Serving
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The directory cannot be read: calls are refused, not let through.
    let mut client = server.billing(&access_token(EDITOR, None), None).await;
    let err = client
        .get_balance(GetBalanceRequest {})
        .await
        .expect_err("no silent allow");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = client
        .get_credit_cost(GetCreditCostRequest {
            operation: "clustering".into(),
            quantity: 1,
        })
        .await
        .expect_err("even a call that needs no balance is authenticated");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let (_, text) = scrape(metrics).await;
    assert_eq!(metric_value(&text, "igny8_serving"), Some(0.0), "{text}");
    assert_eq!(
        metric_value(&text, "igny8_auth_outcomes_total{outcome=\"unavailable\"}"),
        Some(2.0),
        "{text}"
    );
    server.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refusing_connections_means_not_serving() {
    // Port 1 on loopback refuses every connection.
    dead_database_is_not_serving_and_calls_are_unavailable("postgres://postgres@127.0.0.1:1/none")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_that_cannot_be_opened_means_not_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The parent directory does not exist, so the file cannot be created.
    let url = format!(
        "sqlite://{}",
        dir.path().join("missing").join("igny8.db").display()
    );
    dead_database_is_not_serving_and_calls_are_unavailable(&url).await;
}

/// Runs one statement on the PostgreSQL server's maintenance database.
async fn admin(sql: String) {
    let admin = Db::connect(
        &postgres_admin_url(),
        &igny8_db::PoolConfig {
            max_connections: 1,
            ..Default::default()
        },
    )
    .await
    .expect("admin connection");
    igny8_db::on_pool!(&admin, pool => sqlx::query(sqlx::AssertSqlSafe(sql.clone())).execute(pool).await.map(|_| ()))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    admin.close().await;
}

fn database_name(db: &TestDb) -> String {
    db.url.rsplit('/').next().expect("database name").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_flips_health_and_back() {
    let db = TestDb::new(Backend::Postgres).await;
    db.account(ACCOUNT).credits(10).create().await;
    db.user(EDITOR)
        .account(ACCOUNT)
        .role("editor")
        .create()
        .await;
    let server = spawn_billing_with(impatient_config(&db.url)).await;
    let mut client = server.billing(&access_token(EDITOR, None), None).await;
    client.get_balance(GetBalanceRequest {}).await.expect("up");

    // The database goes away: no new connections, existing ones killed.
    let name = database_name(&db);
    admin(format!(
        "ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"
    ))
    .await;
    admin(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ))
    .await;
    eventually(
        Duration::from_secs(15),
        "NOT_SERVING after the database went away",
        || async {
            server.health("").await == ServingStatus::NotServing
                && server.health(BILLING).await == ServingStatus::NotServing
        },
    )
    .await;
    // Past the directory cache's bound, calls are refused.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = client
        .get_balance(GetBalanceRequest {})
        .await
        .expect_err("no silent allow while the database is gone");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // It comes back.
    admin(format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")).await;
    eventually(
        Duration::from_secs(15),
        "SERVING after the database came back",
        || async { server.health(BILLING).await == ServingStatus::Serving },
    )
    .await;
    let balance = client
        .get_balance(GetBalanceRequest {})
        .await
        .expect("calls work again")
        .into_inner();
    assert_eq!(balance.balance, 10);
    server.stop().await.expect("stops cleanly");
}

// ---------------------------------------------------------------------------
// The real binary and SIGTERM.

/// `billing-svc` as a child process, its stderr collected line by line.
struct Binary {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Binary {
    /// Starts billing-svc on `db` (JSON logs) and waits for SERVING.
    async fn start(db: &TestDb, extra: &[(&str, &str)]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut command = Command::new(workspace_binary("billing-svc"));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &db.url)
            .env("IGNY8_JWT_SECRET", SECRET)
            .env("IGNY8_LISTEN_ADDR", addr.to_string())
            .env("IGNY8_METRICS_ADDR", "off")
            .env("IGNY8_RUN_MIGRATIONS", "false")
            .env("IGNY8_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start billing-svc");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("piped stderr");
        {
            // Drain the pipe so the child never blocks on a full buffer.
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    stderr.lock().expect("lock").push(line);
                }
            });
        }
        let mut binary = Binary {
            child,
            addr,
            stderr,
        };
        let within = Duration::from_secs(20);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(ServingStatus::Serving) = health_at(addr, BILLING).await {
                break;
            }
            if let Some(status) = binary.child.try_wait().expect("try_wait") {
                panic!(
                    "billing-svc exited during start-up ({status}):\n{}",
                    binary.logs()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "billing-svc did not report SERVING within {within:?}:\n{}",
                binary.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        binary
    }

    fn logs(&self) -> String {
        self.stderr.lock().expect("lock").join("\n")
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "billing-svc still running {within:?} after SIGTERM:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every log line is a JSON object (IGNY8_LOG_FORMAT=json), and one of
    /// them has `needle` in its message.
    fn assert_json_logs_mention(&self, needle: &str) {
        let lines = self.stderr.lock().expect("lock").clone();
        let mut found = false;
        for line in lines.iter().filter(|l| !l.trim().is_empty()) {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let message = value["fields"]["message"].as_str().unwrap_or_default();
            found |= message.contains(needle);
        }
        assert!(
            found,
            "no log line mentions {needle:?}:\n{}",
            lines.join("\n")
        );
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many sessions of this database wait on a lock.
async fn lock_waiters(db: &TestDb) -> i64 {
    igny8_db::on_pool!(&db.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'")
        .fetch_one(pool).await)
    .expect("pg_stat_activity")
}

/// Locks the account's row until the returned transaction ends, so that
/// every Deduct on it blocks inside the database.
async fn lock_account(db: &TestDb) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let Db::Postgres(pool) = &db.db else {
        panic!("row locks need PostgreSQL");
    };
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT credits FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(ACCOUNT)
        .execute(&mut *tx)
        .await
        .expect("lock the account row");
    tx
}

async fn seeded(credits: i64) -> TestDb {
    let db = TestDb::new(Backend::Postgres).await;
    db.account(ACCOUNT).credits(credits).create().await;
    db.user(EDITOR)
        .account(ACCOUNT)
        .role("editor")
        .create()
        .await;
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_then_exits_zero() {
    const IN_FLIGHT: usize = 4;
    let db = seeded(100).await;
    let mut binary = Binary::start(&db, &[("IGNY8_SHUTDOWN_TIMEOUT_SECS", "30")]).await;
    let endpoint = format!("http://{}", binary.addr);
    let running = Running::at(binary.addr);

    // Watch health on its own connection, opened before the signal.
    let mut watch = HealthClient::new(running.channel().await)
        .watch(HealthCheckRequest {
            service: BILLING.into(),
        })
        .await
        .expect("watch health")
        .into_inner();
    let first = watch.message().await.expect("watch").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    // Calls held in flight by the row lock.
    let lock = lock_account(&db).await;
    let client = running.billing(&access_token(EDITOR, None), None).await;
    let calls: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .deduct(deduct_credits(5, &format!("drain-{i}")))
                    .await
            })
        })
        .collect();
    // The ledger writer's batch waits on the lock; the other calls wait in
    // its queue behind it. All of them are in flight.
    eventually(
        Duration::from_secs(15),
        "the ledger writer blocked on the row lock",
        || async { lock_waiters(&db).await >= 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        calls.iter().all(|c| !c.is_finished()),
        "a call finished past the lock"
    );

    binary.sigterm();

    // NOT_SERVING is announced...
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a health update within 10 s of SIGTERM")
        .expect("watch stream")
        .expect("a status");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch); // a watch is an in-flight call too: let the drain finish
    // ...no new connection is accepted...
    eventually(
        Duration::from_secs(10),
        "connections refused after SIGTERM",
        || async {
            std::net::TcpStream::connect_timeout(&binary.addr, Duration::from_millis(500)).is_err()
        },
    )
    .await;
    // ...and the calls in flight are still being waited for.
    assert!(binary.running(), "exited with calls still in flight");

    lock.rollback().await.expect("release the row lock");
    let mut balances = Vec::new();
    for call in calls {
        let response = call
            .await
            .expect("call task")
            .unwrap_or_else(|status| panic!("in-flight call failed during drain: {status:?}"))
            .into_inner();
        assert!(!response.replayed);
        balances.push(response.balance);
    }
    balances.sort_unstable();
    assert_eq!(balances, [80, 85, 90, 95], "each call applied once");
    assert_eq!(db.balance(ACCOUNT).await, 80);

    let status = binary.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}:\n{}",
        binary.logs()
    );
    assert!(
        tonic::transport::Endpoint::from_shared(endpoint)
            .expect("endpoint")
            .connect()
            .await
            .is_err(),
        "nothing listens after exit"
    );
    binary.assert_json_logs_mention("shutdown requested");
    binary.assert_json_logs_mention("stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_bounded_by_the_shutdown_timeout() {
    let db = seeded(100).await;
    let mut binary = Binary::start(&db, &[("IGNY8_SHUTDOWN_TIMEOUT_SECS", "1")]).await;
    let running = Running::at(binary.addr);
    let lock = lock_account(&db).await;
    let mut client = running.billing(&access_token(EDITOR, None), None).await;
    let stuck = tokio::spawn(async move { client.deduct(deduct_credits(5, "stuck")).await });
    eventually(
        Duration::from_secs(15),
        "the Deduct blocked on the row lock",
        || async { lock_waiters(&db).await == 1 },
    )
    .await;

    binary.sigterm();
    // The lock is held throughout: only the 1 s bound can end the drain.
    let status = binary.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}:\n{}",
        binary.logs()
    );
    binary.assert_json_logs_mention("drain timed out");
    let result = stuck.await.expect("call task");
    assert!(
        result.is_err(),
        "a call cut off by exit cannot succeed: {result:?}"
    );

    // The abandoned transaction never committed.
    lock.rollback().await.expect("release the row lock");
    assert_eq!(db.balance(ACCOUNT).await, 100);
    assert_eq!(db.ledger_sum(ACCOUNT).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_collector_delays_neither_start_nor_exit() {
    let db = seeded(100).await;
    // A collector that never answers: connections are queued by the kernel
    // but never accepted, so every export hangs until its own timeout.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", black_hole.local_addr().expect("addr"));
    let mut binary = Binary::start(&db, &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]).await;
    let running = Running::at(binary.addr);
    let mut client = running.billing(&access_token(EDITOR, None), None).await;
    client
        .deduct(deduct_credits(5, "traced"))
        .await
        .expect("calls work without a collector");
    binary.sigterm();
    // The final flush gives up after its bound instead of holding the exit.
    let status = binary.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}:\n{}",
        binary.logs()
    );
    binary.assert_json_logs_mention("exporting traces over OTLP/gRPC");
    drop(black_hole);
}

/// A binary started on a fresh, empty database applies the migrations before
/// its port opens: the directory tables exist as soon as anyone can connect,
/// and the service is SERVING without a readiness round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_applied_before_the_port_opens() {
    for backend in [Backend::Postgres, Backend::Sqlite] {
        let db = TestDb::empty(backend).await;
        let server = Process::start(
            "settings-svc",
            igny8_proto::SETTINGS_SERVICE_NAME,
            &db.url,
            &[],
        )
        .await;
        db.account(1).create().await;
        db.user(1).account(1).role("owner").create().await;
        let running = Running::at(server.addr);
        let mut c = running.settings(&access_token(1, None), None).await;
        let s = c
            .get_module_settings(igny8_proto::settings::v1::GetModuleSettingsRequest {})
            .await
            .expect("schema in place")
            .into_inner();
        assert_eq!(s.settings.unwrap().account_id, 1, "{backend:?}");
    }
}

/// A second replica on one host (the default metrics port already taken)
/// still starts, without /metrics; an explicitly configured address that is
/// taken is a start-up error naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_default_metrics_port_does_not_stop_start_up() {
    let db = TestDb::new(Backend::Sqlite).await;
    // Hold settings' default metrics port (or find it already held).
    let _held = std::net::TcpListener::bind("0.0.0.0:9102");
    let server = Process::start(
        "settings-svc",
        igny8_proto::SETTINGS_SERVICE_NAME,
        &db.url,
        &[("IGNY8_METRICS_ADDR", "")],
    )
    .await;
    assert_eq!(
        Running::at(server.addr)
            .health(igny8_proto::SETTINGS_SERVICE_NAME)
            .await,
        ServingStatus::Serving
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(workspace_binary("settings-svc"))
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("IGNY8_JWT_SECRET", SECRET)
        .env("IGNY8_LISTEN_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("IGNY8_METRICS_ADDR", &addr)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&addr), "{stderr}");
}
