//! `.ci/postgres.sh` (the PostgreSQL step of `bash .ci/run`) never changes
//! the authentication of a server it did not create. Run against a
//! throwaway cluster that asks for a password over TCP: without the
//! "created by .ci/run" record it stops and asks for DATABASE_URL, and the
//! role and pg_hba.conf are untouched; with the record (a cluster it
//! installed itself) it sets a password and prints a DATABASE_URL that works.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use igny8_tests::free_port;

/// PostgreSQL's server binaries: `pg_config --bindir`, else Debian's
/// `/usr/lib/postgresql/<version>/bin`, newest first.
fn pg_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("initdb").is_file() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "initdb not found: this test needs PostgreSQL's server binaries \
             (Debian: apt-get install postgresql; bash .ci/run installs it)"
        )
    })
}

fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A throwaway cluster: trust on its socket, a password (which no role has)
/// over TCP, the way a fresh Debian cluster is set up. Stopped on drop.
struct Cluster {
    bin: PathBuf,
    /// The OS user that owns it (`postgres` when the tests run as root,
    /// since initdb refuses root).
    os_user: String,
    dir: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket(&self) -> &Path {
        self.dir.path()
    }

    /// `program args…` as the cluster's OS user.
    fn as_owner(&self, program: &Path, args: &[&str]) -> Output {
        let mut cmd = if self.os_user == whoami() {
            Command::new(program)
        } else {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.os_user, "--"]).arg(program);
            c
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run as the cluster's owner")
    }

    fn start() -> Cluster {
        let bin = pg_bindir();
        let os_user = if whoami() == "root" {
            "postgres".to_owned()
        } else {
            whoami()
        };
        let dir = tempfile::tempdir().expect("temp dir");
        // The owner must be able to create data/ and the socket in here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let cluster = Cluster {
            bin,
            os_user,
            dir,
            port: free_port(),
        };
        let data = cluster.data();
        let out = cluster.as_owner(
            &cluster.bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ],
        );
        assert!(out.status.success(), "initdb: {out:?}");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            cluster.port,
            cluster.socket().display()
        );
        let log = cluster.dir.path().join("log");
        let out = cluster.as_owner(
            &cluster.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {out:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        cluster
    }

    /// A query over the socket as the owner.
    fn query(&self, sql: &str) -> String {
        let out = self.as_owner(
            &self.bin.join("psql"),
            &[
                "-w",
                "-h",
                self.socket().to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-XqAtc",
                sql,
                "postgres",
            ],
        );
        assert!(out.status.success(), "psql {sql}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn hba(&self) -> String {
        std::fs::read_to_string(self.data().join("pg_hba.conf")).expect("read pg_hba.conf")
    }

    /// Runs `.ci/postgres.sh` against this cluster with `mark` as its record.
    fn run_script(&self, mark: &Path) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/postgres.sh");
        Command::new("bash")
            .arg(script)
            .env_remove("DATABASE_URL")
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("IGNY8_CI_PG_PORT", self.port.to_string())
            .env("IGNY8_CI_PG_SOCKET_DIR", self.socket())
            .env("IGNY8_CI_PG_MARK", mark)
            .env("IGNY8_CI_PG_OS_USER", &self.os_user)
            .env("IGNY8_CI_PG_SETUP", "0")
            .output()
            .expect("run .ci/postgres.sh")
    }

    /// Whether a TCP login as postgres with `password` works.
    fn tcp_login(&self, password: Option<&str>) -> bool {
        let url = match password {
            Some(p) => format!("postgres://postgres:{p}@127.0.0.1:{}/postgres", self.port),
            None => format!("postgres://postgres@127.0.0.1:{}/postgres", self.port),
        };
        Command::new(self.bin.join("psql"))
            .args(["-w", &url, "-XqAtc", "SELECT 1"])
            .output()
            .expect("run psql")
            .status
            .success()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.as_owner(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

#[test]
fn ci_postgres_never_changes_the_authentication_of_a_server_it_did_not_create() {
    let cluster = Cluster::start();
    let password_of = |c: &Cluster| {
        c.query("SELECT coalesce(rolpassword, '<none>') FROM pg_authid WHERE rolname = 'postgres'")
    };
    let hba = cluster.hba();
    assert_eq!(password_of(&cluster), "<none>");
    assert!(
        !cluster.tcp_login(None),
        "the cluster must ask for a password over TCP"
    );

    // Not created by .ci/run: no record, or a record of another cluster.
    let mark = cluster.dir.path().join("created-by-ci");
    std::fs::write(&mark, format!("{} /nonexistent/data\n", cluster.port)).expect("write record");
    for record in [false, true] {
        if !record {
            let _ = std::fs::remove_file(&mark);
        }
        let out = cluster.run_script(&mark);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            stderr.contains("will not change its authentication")
                && stderr.contains("DATABASE_URL="),
            "the refusal says why and what to do: {stderr}"
        );
        assert!(out.stdout.is_empty(), "no DATABASE_URL offered: {out:?}");
        assert_eq!(password_of(&cluster), "<none>", "the role is untouched");
        assert_eq!(cluster.hba(), hba, "pg_hba.conf is untouched");
    }

    // Created by .ci/run (recorded): it may set a password, and says which URL to use.
    std::fs::write(
        &mark,
        format!("{} {}\n", cluster.port, cluster.data().display()),
    )
    .expect("write record");
    let out = cluster.run_script(&mark);
    assert!(out.status.success(), "{out:?}");
    let url = format!(
        "postgres://postgres:postgres@127.0.0.1:{}/postgres",
        cluster.port
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("DATABASE_URL={url}")
    );
    assert!(cluster.tcp_login(Some("postgres")), "the printed URL works");
    assert_eq!(cluster.hba(), hba, "only the role's password changed");
}
