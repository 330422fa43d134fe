//! Interop with a non-Rust client: the real `billing-svc` and `settings-svc`
//! binaries driven by Python's grpcio (`tests/python/interop.py`), with stubs
//! generated at run time from the repository's `.proto` files.
//!
//! The Python packages are a hard requirement, like grpcurl: when they are
//! missing the test fails and says what to install; it never skips.

use std::{path::PathBuf, process::Command};

use igny8_tests::*;

/// The pip line that installs everything `interop.py` imports.
const PIP_INSTALL: &str = "python3 -m pip install 'grpcio>=1.60,<2' 'grpcio-tools>=1.60,<2' \
     'grpcio-health-checking>=1.60,<2' 'grpcio-reflection>=1.60,<2' 'grpcio-status>=1.60,<2'";

/// The modules `interop.py` needs, one per package of [`PIP_INSTALL`].
const IMPORTS: &str = "import grpc, grpc_tools.protoc, grpc_health.v1.health_pb2, \
     grpc_reflection.v1alpha.reflection_pb2, grpc_status.rpc_status";

/// The script, relative to this crate.
const SCRIPT: &str = "python/interop.py";

/// The interpreter: `$PYTHON`, else `python3` on `PATH`.
fn python() -> PathBuf {
    std::env::var_os("PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

/// Fails, with the install command, unless the interpreter and every
/// package the script imports are present.
fn require_python_packages() {
    let python = python();
    let out = Command::new(&python)
        .args(["-c", IMPORTS])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): install Python 3.11+ (apt-get install python3 python3-pip) \
                 or set PYTHON=/path/to/python3, then: {PIP_INSTALL}",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "the Python gRPC packages are missing for {}:\n{}\nInstall them with:\n  {PIP_INSTALL}\n\
         (bash .ci/run installs them)",
        python.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_drives_both_binaries() {
    require_python_packages();

    let db = TestDb::new(Backend::Postgres).await;
    db.account(1).credits(100).create().await;
    // The account a spoofed x-igny8-account-id header points at.
    db.account(2).credits(5000).create().await;
    // An owner: UpdateModuleSettings needs admin or owner (docs/api.md, "Roles and permissions").
    db.user(10).account(1).role("owner").create().await;

    let billing = Process::start(
        "billing-svc",
        igny8_proto::BILLING_SERVICE_NAME,
        &db.url,
        &[],
    )
    .await;
    let settings = Process::start(
        "settings-svc",
        igny8_proto::SETTINGS_SERVICE_NAME,
        &db.url,
        &[],
    )
    .await;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(SCRIPT);
    let mut cmd = Command::new(python());
    cmd.arg(&script)
        .args(["--billing", &billing.addr.to_string()])
        .args(["--settings", &settings.addr.to_string()])
        .args(["--token", &access_token(10, Some(1))])
        .args(["--service-token", &service_token("python-interop")])
        .args(["--account", "1", "--user", "10", "--credits", "100"])
        .args(["--other-account", "2"])
        // Keep the checkout free of __pycache__ and the output unbuffered.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("python task")
        .unwrap_or_else(|e| panic!("run {SCRIPT}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        SCRIPT,
        out.status
    );
    assert!(
        stdout.contains("checks passed"),
        "no summary from {}:\n{stdout}\n{stderr}",
        SCRIPT
    );
    println!("{stdout}");

    // The Python client's writes are visible in the database the Rust side
    // owns: one deduction of 10 (the replay and the refusal wrote nothing),
    // and a capture of 15 refunded in full.
    assert_eq!(db.balance(1).await, 90);
    assert_eq!(db.ledger_sum(1).await, (-10, 3));
    assert_eq!(
        db.balance(2).await,
        5000,
        "the spoofed account was untouched"
    );
    drop((billing, settings));
}
