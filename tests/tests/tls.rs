//! gRPC over TLS and mTLS (`IGNY8_TLS_CERT_FILE`, `IGNY8_TLS_KEY_FILE`,
//! `IGNY8_TLS_CLIENT_CA_FILE`): the tonic client, grpcurl
//! (`-cacert`/`-cert`/`-key`) and Python grpcio against real servers, with
//! certificates made per test by a throw-away CA; certificate rotation
//! without a restart; start-up refusing settings it cannot honour.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use auth_interceptor::BearerInterceptor;
use igny8_proto::billing::v1::{GetBalanceRequest, billing_service_client::BillingServiceClient};
use igny8_tests::{
    pki::{Ca, Leaf, write_pem},
    *,
};
use service_kit::{ServiceConfig, tls::TlsFiles};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const BILLING: &str = igny8_proto::BILLING_SERVICE_NAME;

/// How a test client connects: the CA it trusts and, for mTLS, its own
/// certificate.
#[derive(Clone)]
struct Client {
    ca_pem: String,
    identity: Option<Leaf>,
}

impl Client {
    fn trusting(ca: &Ca) -> Self {
        Self {
            ca_pem: ca.pem(),
            identity: None,
        }
    }

    fn with_identity(mut self, leaf: Leaf) -> Self {
        self.identity = Some(leaf);
        self
    }

    /// A fresh connection (never shared with an earlier one).
    async fn channel(&self, addr: SocketAddr) -> Result<Channel, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if let Some(id) = &self.identity {
            tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
        }
        Channel::from_shared(format!("https://{addr}"))
            .expect("endpoint")
            .tls_config(tls)
            .map_err(|e| format!("tls config: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))
    }

    /// Health of the server ("") over a new connection. With TLS 1.3 a
    /// refused client certificate surfaces on the first call, not at
    /// connect, so both count.
    async fn health(&self, addr: SocketAddr) -> Result<ServingStatus, String> {
        let channel = self.channel(addr).await?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|e| format!("health: {e}"))?
            .into_inner()
            .status;
        Ok(ServingStatus::try_from(status).expect("known status"))
    }

    /// `GetBalance` of the token's account over a new connection.
    async fn balance(&self, addr: SocketAddr, token: &str) -> Result<i64, String> {
        let channel = self.channel(addr).await?;
        let mut client = BillingServiceClient::with_interceptor(
            channel,
            BearerInterceptor::new(token).expect("ascii token"),
        );
        Ok(client
            .get_balance(GetBalanceRequest {})
            .await
            .map_err(|e| format!("GetBalance: {:?}: {}", e.code(), e.message()))?
            .into_inner()
            .balance)
    }

    async fn wait_serving(&self, addr: SocketAddr) {
        eventually(Duration::from_secs(20), "SERVING over TLS", || async {
            self.health(addr).await == Ok(ServingStatus::Serving)
        })
        .await;
    }
}

/// A directory with the server's certificate and key (and the client CA).
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(server: &Leaf, client_ca: Option<&Ca>) -> Self {
        let files = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        files.install(server);
        if let Some(ca) = client_ca {
            write_pem(files.dir.path(), "client-ca.pem", &ca.pem());
        }
        files
    }

    /// Replaces the server's certificate and key in place.
    fn install(&self, server: &Leaf) {
        write_pem(self.dir.path(), "tls.key", &server.key_pem);
        write_pem(self.dir.path(), "tls.crt", &server.cert_pem);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn tls(&self, mutual: bool) -> TlsFiles {
        TlsFiles {
            cert: self.path("tls.crt"),
            key: self.path("tls.key"),
            client_ca: mutual.then(|| self.path("client-ca.pem")),
        }
    }

    /// The variables for a binary.
    fn env(&self, mutual: bool) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "IGNY8_TLS_CERT_FILE".to_owned(),
                self.path("tls.crt").display().to_string(),
            ),
            (
                "IGNY8_TLS_KEY_FILE".to_owned(),
                self.path("tls.key").display().to_string(),
            ),
        ];
        if mutual {
            env.push((
                "IGNY8_TLS_CLIENT_CA_FILE".to_owned(),
                self.path("client-ca.pem").display().to_string(),
            ));
        }
        env
    }
}

fn tls_config(db: &TestDb, tls: TlsFiles) -> ServiceConfig {
    let mut config = test_config(&db.url);
    config.tls = Some(tls);
    config
}

async fn seeded(backend: Backend) -> TestDb {
    let db = TestDb::new(backend).await;
    db.account(1).credits(100).create().await;
    db.user(10).account(1).role("owner").create().await;
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_tonic_clients_and_refuses_plaintext_and_unknown_cas() {
    let db = seeded(Backend::Sqlite).await;
    let ca = Ca::new("igny8 test CA");
    let rogue = Ca::new("someone else's CA");
    let files = Files::new(&ca.server(), None);
    let mut config = tls_config(&db, files.tls(false));
    config.health_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let app = billing_svc::build(config, billing_svc::CostTable::builtin())
        .await
        .expect("billing builds");
    let health_addr = app.health_addr().expect("health port on");
    let server_addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let server = Running::at(server_addr);
    let client = Client::trusting(&ca);
    client.wait_serving(server.addr).await;
    // Probes that cannot speak TLS (the kubelet's) use the plaintext
    // health port, which serves health and nothing else.
    assert_eq!(
        health_at(health_addr, BILLING)
            .await
            .expect("plaintext health"),
        ServingStatus::Serving
    );
    let other = BillingServiceClient::new(
        Channel::from_shared(format!("http://{health_addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the health port"),
    )
    .get_balance(GetBalanceRequest {})
    .await;
    assert_eq!(
        other.expect_err("only health on the health port").code(),
        tonic::Code::Unimplemented
    );

    let token = access_token(10, Some(1));
    assert_eq!(client.balance(server.addr, &token).await, Ok(100));

    let plaintext = health_at(server.addr, BILLING).await;
    assert!(
        plaintext.is_err(),
        "a plaintext client must not be served: {plaintext:?}"
    );
    let untrusted = Client::trusting(&rogue).health(server.addr).await;
    assert!(
        untrusted.is_err(),
        "a client that does not trust the server's CA must fail: {untrusted:?}"
    );
    // Without mTLS a client certificate is not needed, and one offered is
    // not an error either.
    let with_cert = client.clone().with_identity(ca.client("anyone"));
    assert_eq!(
        with_cert.health(server.addr).await,
        Ok(ServingStatus::Serving)
    );
    let _ = stop.send(());
    handle.await.expect("server task").expect("clean stop");
    assert!(
        health_at(health_addr, BILLING).await.is_err(),
        "the health port closes with the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_client_certificate_from_the_configured_ca() {
    let db = seeded(Backend::Postgres).await;
    let server_ca = Ca::new("igny8 server CA");
    let client_ca = Ca::new("igny8 client CA");
    let rogue = Ca::new("someone else's CA");
    let files = Files::new(&server_ca.server(), Some(&client_ca));
    let (server, _) = start_billing_unready(tls_config(&db, files.tls(true))).await;
    let good = Client::trusting(&server_ca).with_identity(client_ca.client("billing-caller"));
    good.wait_serving(server.addr).await;
    let token = access_token(10, Some(1));
    assert_eq!(good.balance(server.addr, &token).await, Ok(100));

    let anonymous = Client::trusting(&server_ca).health(server.addr).await;
    assert!(
        anonymous.is_err(),
        "no client certificate must be refused: {anonymous:?}"
    );
    let forged = Client::trusting(&server_ca)
        .with_identity(rogue.client("billing-caller"))
        .health(server.addr)
        .await;
    assert!(
        forged.is_err(),
        "a client certificate from another CA must be refused: {forged:?}"
    );
    // mTLS authenticates the peer; it does not replace the bearer token.
    let no_token = good.balance(server.addr, "not-a-token").await;
    assert!(
        no_token
            .as_ref()
            .is_err_and(|e| e.contains("Unauthenticated")),
        "{no_token:?}"
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_reach_new_connections_without_a_restart() {
    let db = seeded(Backend::Sqlite).await;
    let old_ca = Ca::new("igny8 CA, old");
    let new_ca = Ca::new("igny8 CA, new");
    let files = Files::new(&old_ca.server(), None);
    let (server, _) = start_billing_unready(tls_config(&db, files.tls(false))).await;
    let old = Client::trusting(&old_ca);
    let new = Client::trusting(&new_ca);
    old.wait_serving(server.addr).await;
    assert!(new.health(server.addr).await.is_err());
    let token = access_token(10, Some(1));
    // A connection made before the rotation, kept open across it.
    let kept = old.channel(server.addr).await.expect("connect");
    let mut kept = BillingServiceClient::with_interceptor(
        kept,
        BearerInterceptor::new(token.as_str()).expect("ascii token"),
    );
    kept.get_balance(GetBalanceRequest {})
        .await
        .expect("first call");

    // A half-finished rotation (the new key, the old certificate) cannot be
    // used: the server keeps the certificate it has.
    let next = new_ca.server();
    write_pem(files.dir.path(), "tls.key", &next.key_pem);
    tokio::time::sleep(service_kit::tls::RELOAD_INTERVAL * 3).await;
    assert_eq!(
        old.health(server.addr).await,
        Ok(ServingStatus::Serving),
        "a mismatched key/certificate pair must not replace the working one"
    );

    // The rotation completes: new connections get the new certificate.
    files.install(&next);
    eventually(
        Duration::from_secs(10),
        "the new certificate on new connections",
        || async { new.health(server.addr).await == Ok(ServingStatus::Serving) },
    )
    .await;
    assert!(
        old.health(server.addr).await.is_err(),
        "new connections no longer get the old certificate"
    );
    assert_eq!(new.balance(server.addr, &token).await, Ok(100));
    // The connection made before the rotation keeps working.
    let balance = kept
        .get_balance(GetBalanceRequest {})
        .await
        .expect("the open connection survives the rotation")
        .into_inner()
        .balance;
    assert_eq!(balance, 100);
    server.stop().await.expect("clean stop");
}

async fn refused(config: ServiceConfig) -> String {
    match billing_svc::build(config, billing_svc::CostTable::builtin()).await {
        Ok(_) => panic!("start-up must refuse this TLS configuration"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_tls_settings_it_cannot_honour() {
    let db = TestDb::new(Backend::Sqlite).await;
    let ca = Ca::new("igny8 test CA");
    let files = Files::new(&ca.server(), Some(&ca));
    let other = ca.server();
    let dir = files.dir.path();

    // A file that is not there.
    let mut tls = files.tls(false);
    tls.cert = dir.join("missing.crt");
    let err = refused(tls_config(&db, tls)).await;
    assert!(
        err.contains("IGNY8_TLS_CERT_FILE") && err.contains("missing.crt"),
        "{err}"
    );
    let mut tls = files.tls(true);
    tls.client_ca = Some(dir.join("missing-ca.pem"));
    let err = refused(tls_config(&db, tls)).await;
    assert!(err.contains("IGNY8_TLS_CLIENT_CA_FILE"), "{err}");

    // A key that belongs to another certificate.
    let mut tls = files.tls(false);
    tls.key = write_pem(dir, "other.key", &other.key_pem);
    let err = refused(tls_config(&db, tls)).await;
    assert!(
        err.contains("IGNY8_TLS_KEY_FILE") && err.contains("does not match"),
        "{err}"
    );

    // Files without what they should hold.
    let mut tls = files.tls(false);
    tls.cert = write_pem(dir, "key-as-cert.pem", &other.key_pem);
    let err = refused(tls_config(&db, tls)).await;
    assert!(
        err.contains("IGNY8_TLS_CERT_FILE") && err.contains("no PEM certificate"),
        "{err}"
    );
    let mut tls = files.tls(false);
    tls.key = write_pem(dir, "cert-as-key.pem", &other.cert_pem);
    let err = refused(tls_config(&db, tls)).await;
    assert!(err.contains("IGNY8_TLS_KEY_FILE"), "{err}");
    let mut tls = files.tls(true);
    tls.client_ca = Some(write_pem(dir, "empty-ca.pem", "\n"));
    let err = refused(tls_config(&db, tls)).await;
    assert!(err.contains("IGNY8_TLS_CLIENT_CA_FILE"), "{err}");

    // The binary: a client CA without server TLS, and a mismatched key,
    // stop start-up with the variable named.
    for (env, needle) in [
        (
            vec![(
                "IGNY8_TLS_CLIENT_CA_FILE".to_owned(),
                files.path("client-ca.pem").display().to_string(),
            )],
            "IGNY8_TLS_CLIENT_CA_FILE",
        ),
        (
            {
                let mut env = files.env(false);
                env[1].1 = dir.join("other.key").display().to_string();
                env
            },
            "IGNY8_TLS_KEY_FILE",
        ),
    ] {
        let out = Command::new(workspace_binary("billing-svc"))
            .env_clear()
            .env("DATABASE_URL", &db.url)
            .env("IGNY8_JWT_SECRET", SECRET)
            .env("IGNY8_LISTEN_ADDR", "127.0.0.1:0")
            .env("IGNY8_METRICS_ADDR", "off")
            .envs(env)
            .stdin(Stdio::null())
            .output()
            .expect("run billing-svc");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "must not start: {stderr}");
        assert!(stderr.contains(needle), "{stderr} should name {needle}");
    }
}

/// Starts a service binary with TLS and waits until `client` sees it
/// SERVING.
async fn start_tls_binary(
    name: &str,
    db: &TestDb,
    files: &Files,
    mutual: bool,
    client: &Client,
) -> Process {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let child = Command::new(workspace_binary(name))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("IGNY8_JWT_SECRET", SECRET)
        .env("IGNY8_LISTEN_ADDR", addr.to_string())
        .env("IGNY8_METRICS_ADDR", "off")
        .env("IGNY8_RUN_MIGRATIONS", "false")
        .env("RUST_LOG", "warn")
        .envs(files.env(mutual))
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let process = Process { child, addr };
    client.wait_serving(addr).await;
    process
}

/// `grpcurl -cacert <dir>/ca.pem <before…> ADDR <after…>`: success and
/// stdout+stderr.
fn grpcurl_tls(addr: SocketAddr, dir: &Path, before: &[&str], after: &[&str]) -> (bool, String) {
    let out = Command::new(grpcurl())
        .arg("-cacert")
        .arg(dir.join("ca.pem"))
        .args(before)
        .arg(addr.to_string())
        .args(after)
        .output()
        .expect("run grpcurl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_calls_over_mtls_with_cacert_cert_and_key() {
    let db = seeded(Backend::Sqlite).await;
    let ca = Ca::new("igny8 test CA");
    let files = Files::new(&ca.server(), Some(&ca));
    let client_leaf = ca.client("grpcurl");
    write_pem(files.dir.path(), "ca.pem", &ca.pem());
    let cert = write_pem(files.dir.path(), "client.crt", &client_leaf.cert_pem);
    let key = write_pem(files.dir.path(), "client.key", &client_leaf.key_pem);
    let client = Client::trusting(&ca).with_identity(client_leaf);
    let server = start_tls_binary("billing-svc", &db, &files, true, &client).await;

    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let auth = format!("authorization: Bearer {}", access_token(10, Some(1)));
    let (ok, text) = grpcurl_tls(
        server.addr,
        files.dir.path(),
        &["-cert", &cert, "-key", &key, "-H", &auth, "-d", "{}"],
        &[&format!("{BILLING}/GetBalance")],
    );
    assert!(ok, "grpcurl over mTLS: {text}");
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(json["balance"], serde_json::json!("100"), "{json}");

    // Reflection works over the same transport.
    let (ok, text) = grpcurl_tls(
        server.addr,
        files.dir.path(),
        &["-cert", &cert, "-key", &key],
        &["list"],
    );
    assert!(ok && text.contains(BILLING), "{text}");

    // Without a client certificate the server refuses the connection.
    let (ok, text) = grpcurl_tls(server.addr, files.dir.path(), &[], &["list"]);
    assert!(!ok, "no client certificate must fail: {text}");
    // Plaintext against a TLS port fails too.
    let out = Command::new(grpcurl())
        .args(["-plaintext", "-max-time", "5"])
        .arg(server.addr.to_string())
        .arg("list")
        .output()
        .expect("run grpcurl");
    assert!(!out.status.success(), "plaintext must fail");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_calls_over_mtls() {
    let python = std::env::var_os("PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from);
    let probe = Command::new(&python)
        .args(["-c", "import grpc, grpc_health.v1.health_pb2"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        probe.status.success(),
        "Python grpcio is missing: python3 -m pip install 'grpcio>=1.60,<2' \
         'grpcio-health-checking>=1.60,<2' (bash .ci/run does): {}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let db = seeded(Backend::Postgres).await;
    let ca = Ca::new("igny8 test CA");
    let files = Files::new(&ca.server(), Some(&ca));
    let client_leaf = ca.client("python");
    write_pem(files.dir.path(), "ca.pem", &ca.pem());
    write_pem(files.dir.path(), "client.crt", &client_leaf.cert_pem);
    write_pem(files.dir.path(), "client.key", &client_leaf.key_pem);
    let client = Client::trusting(&ca).with_identity(client_leaf);
    let server = start_tls_binary("settings-svc", &db, &files, true, &client).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/tls_check.py");
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .args(["--addr", &server.addr.to_string()])
        .args(["--dir", &files.dir.path().display().to_string()])
        .args(["--service", igny8_proto::SETTINGS_SERVICE_NAME])
        .args(["--token", &access_token(10, Some(1))])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("python task")
        .expect("run tls_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("tls checks passed"),
        "tls_check.py failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    drop(server);
}

/// billing asks an mTLS settings-svc over `https://` with the CA and its own
/// client certificate: usage charges go through while the module is on and
/// are refused with MODULE_DISABLED once it is off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_asks_an_mtls_settings_over_https() {
    use billing_svc::{BillingOptions, modules::SettingsOptions};
    use igny8_proto::settings::v1::{
        ModuleSettings, UpdateModuleSettingsRequest, settings_service_client::SettingsServiceClient,
    };
    let db = seeded(Backend::Sqlite).await;
    let ca = Ca::new("igny8 test CA");
    let files = Files::new(&ca.server(), Some(&ca));
    let app = settings_svc::build(tls_config(&db, files.tls(true)))
        .await
        .expect("settings builds");
    let settings = app.local_addr();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let client = Client::trusting(&ca).with_identity(ca.client("admin-tool"));
    client.wait_serving(settings).await;

    let billing_id = ca.client("billing-svc");
    let dir = tempfile::tempdir().unwrap();
    let mut options = SettingsOptions::new(format!("https://localhost:{}", settings.port()));
    options.ca_file = Some(write_pem(dir.path(), "ca.pem", &ca.pem()));
    options.client_identity = Some((
        write_pem(dir.path(), "billing.crt", &billing_id.cert_pem),
        write_pem(dir.path(), "billing.key", &billing_id.key_pem),
    ));
    let billing = spawn_billing_with_options(
        test_config(&db.url),
        BillingOptions {
            settings: Some(options.clone()),
            ..Default::default()
        },
    )
    .await;
    let token = access_token(10, None);
    let mut c = billing.billing(&token, None).await;
    c.deduct(deduct_usage("content", 100, "tls-1"))
        .await
        .expect("a usage deduct asks settings over mTLS");

    let mut s = SettingsServiceClient::with_interceptor(
        client.channel(settings).await.unwrap(),
        BearerInterceptor::new(token.clone()).unwrap(),
    );
    s.update_module_settings(UpdateModuleSettingsRequest {
        settings: Some(ModuleSettings {
            writer_enabled: false,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["writer_enabled".into()],
        }),
    })
    .await
    .unwrap();
    let attempt = std::sync::atomic::AtomicUsize::new(0);
    eventually(Duration::from_secs(5), "MODULE_DISABLED over mTLS", || {
        let mut c = c.clone();
        // A fresh key each time: a retried key that was charged replays.
        let key = format!(
            "tls-2-{}",
            attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        async move {
            match c.deduct(deduct_usage("content", 100, &key)).await {
                Err(e) => {
                    e.code() == tonic::Code::FailedPrecondition && e.message().contains("writer")
                }
                Ok(_) => false,
            }
        }
    })
    .await;

    // Without billing's client certificate, settings refuses the
    // connection: billing fails closed.
    let mut no_identity = options;
    no_identity.client_identity = None;
    no_identity.serve_stale_for = Duration::ZERO;
    let lonely = spawn_billing_with_options(
        test_config(&db.url),
        BillingOptions {
            settings: Some(no_identity),
            ..Default::default()
        },
    )
    .await;
    let mut c = lonely.billing(&token, None).await;
    let err = c
        .deduct(deduct_usage("clustering", 1, "tls-3"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}
