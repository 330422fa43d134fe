//! PostgreSQL over TLS: `sslmode` and `sslrootcert` in `DATABASE_URL` are
//! honoured. The test starts its own PostgreSQL (initdb in a temporary
//! directory, another port, `ssl=on` with a certificate from a throw-away
//! CA), leaving the shared server's configuration alone.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use igny8_db::{Db, PoolConfig, on_pool};
use igny8_tests::{pki::Ca, *};

/// The newest PostgreSQL server binaries on this machine.
fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL server binaries not found under /usr/lib/postgresql \
             (apt-get install postgresql; bash .ci/run does)",
        )
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
        .expect("no initdb under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// initdb and postgres refuse to run as root: run them as `postgres` then.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn check(what: &str, out: std::io::Result<Output>) {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private PostgreSQL with TLS on, stopped on drop.
struct TlsPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl TlsPostgres {
    fn start() -> Self {
        let bin = pg_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let ca = Ca::new("igny8 test database CA");
        let server = ca.server();
        std::fs::write(root.join("server.crt"), &server.cert_pem).expect("write cert");
        std::fs::write(root.join("server.key"), &server.key_pem).expect("write key");
        std::fs::write(root.join("ca.pem"), ca.pem()).expect("write CA");
        if is_root() {
            // The server runs as `postgres`: it needs its directory, and
            // insists its key is private to it.
            check(
                "chown",
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(root)
                    .output(),
            );
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(
            root.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod key");
        check(
            "initdb",
            as_server_user(&bin.join("initdb"))
                .args(["-D"])
                .arg(root.join("data"))
                .args(["-A", "trust", "-U", "postgres", "--no-sync"])
                .output(),
        );
        let port = free_port();
        let options = format!(
            "-p {port} -k {root} -c listen_addresses=127.0.0.1 -c ssl=on \
             -c ssl_cert_file={root}/server.crt -c ssl_key_file={root}/server.key -c fsync=off",
            root = root.display()
        );
        check(
            "pg_ctl start",
            as_server_user(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(root.join("data"))
                .args(["-o", &options, "-l"])
                .arg(root.join("server.log"))
                .args(["-w", "-t", "30", "start"])
                .output(),
        );
        Self { dir, bin, port }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn url(&self, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{query}",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = as_server_user(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

async fn refused(url: &str) -> String {
    let mut config = test_config(url);
    config.run_migrations = true;
    match billing_svc::build(config, billing_svc::CostTable::builtin()).await {
        Ok(_) => panic!("start-up must refuse DATABASE_URL {url}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_verify_full_and_refusals_naming_database_url() {
    let pg = tokio::task::spawn_blocking(TlsPostgres::start)
        .await
        .expect("start PostgreSQL");

    // verify-full against the CA that signed the server: the service
    // migrates, serves, and its connections are encrypted.
    let url = pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        pg.path("ca.pem")
    ));
    let mut config = test_config(&url);
    config.run_migrations = true;
    let billing = spawn_billing_with(config).await;
    let db = Db::connect(&url, &PoolConfig::default())
        .await
        .expect("connect over TLS");
    let ssl: bool = on_pool!(&db, pool => sqlx::query_scalar(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    ).fetch_one(pool).await)
    .expect("pg_stat_ssl");
    assert!(ssl, "the connection must be encrypted");
    on_pool!(&db, pool => sqlx::query("INSERT INTO accounts (id, name, status, credits) VALUES (1, 'a', 'active', 42)").execute(pool).await.map(|_| ()))
        .expect("seed account");
    on_pool!(&db, pool => sqlx::query("INSERT INTO users (id, email, role, account_id, is_active) VALUES (10, 'u@x', 'owner', 1, TRUE)").execute(pool).await.map(|_| ()))
        .expect("seed user");
    let balance = billing
        .billing(&access_token(10, Some(1)), None)
        .await
        .get_balance(igny8_proto::billing::v1::GetBalanceRequest {})
        .await
        .expect("GetBalance through a TLS database connection")
        .into_inner()
        .balance;
    assert_eq!(balance, 42);
    billing.stop().await.expect("clean stop");
    db.close().await;

    // A CA that did not sign the server's certificate.
    let rogue = Ca::new("someone else's CA");
    let rogue_path = pg.dir.path().join("rogue.pem");
    std::fs::write(&rogue_path, rogue.pem()).expect("write rogue CA");
    let err = refused(&pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        rogue_path.display()
    )))
    .await;
    assert!(
        err.contains("DATABASE_URL") && err.contains("certificate"),
        "{err}"
    );

    // A CA file that is not there.
    let err = refused(&pg.url("sslmode=verify-full&sslrootcert=/no/such/ca.pem")).await;
    assert!(
        err.contains("DATABASE_URL") && err.contains("/no/such/ca.pem"),
        "{err}"
    );

    // An sslmode PostgreSQL does not have.
    let err = refused(&pg.url("sslmode=sometimes")).await;
    assert!(err.contains("DATABASE_URL"), "{err}");

    // sslmode=require encrypts without verifying the certificate.
    let required = Db::connect(&pg.url("sslmode=require"), &PoolConfig::default())
        .await
        .expect("sslmode=require connects");
    required.close().await;

    // The binary says the same at start-up, naming the variable.
    let out = tokio::task::spawn_blocking({
        let url = pg.url(&format!(
            "sslmode=verify-full&sslrootcert={}",
            rogue_path.display()
        ));
        move || {
            Command::new(workspace_binary("billing-svc"))
                .env_clear()
                .env("DATABASE_URL", url)
                .env("IGNY8_JWT_SECRET", SECRET)
                .env("IGNY8_LISTEN_ADDR", "127.0.0.1:0")
                .env("IGNY8_METRICS_ADDR", "off")
                .env("IGNY8_RUN_MIGRATIONS", "false")
                .output()
                .expect("run billing-svc")
        }
    })
    .await
    .expect("binary task");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must not start: {stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
}
