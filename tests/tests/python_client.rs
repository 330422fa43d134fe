//! The Python client package (`clients/python`) tested with pytest
//! against the real `billing-svc` and `settings-svc` binaries on a fresh
//! PostgreSQL database. The pytest fixtures start (and, for the restart
//! test, SIGKILL and restart) the binaries themselves; this test builds them
//! and tells pytest where they are.
//!
//! Python, pytest, mypy and the pinned stub generators are a hard
//! requirement, like grpcurl: when they are missing the test fails and says
//! what to install (`bash .ci/run` installs them). It never skips.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use igny8_tests::*;

/// The pip line that installs what the pytest suite imports.
const PIP_INSTALL: &str = "python3 -m pip install -r clients/python/requirements-dev.txt";

/// The modules the suite needs, one per package of `requirements-dev.txt`
/// (plus the client's own dependencies).
const IMPORTS: &str = "import grpc, grpc_status, google.protobuf, grpc_health.v1.health_pb2, \
     grpc_tools.protoc, mypy_protobuf, pytest, mypy, ensurepip";

/// The interpreter: `$PYTHON`, else `python3` on `PATH`.
fn python() -> PathBuf {
    std::env::var_os("PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("clients")
        .join("python")
}

fn require_python_packages() {
    let python = python();
    let out = Command::new(&python)
        .args(["-c", IMPORTS])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): install Python 3.10+ (apt-get install python3 python3-pip \
                 python3-venv) or set PYTHON=/path/to/python3, then: {PIP_INSTALL}",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "Python packages are missing for {}:\n{}\nInstall them from the repository root with:\n  \
         {PIP_INSTALL}\n(Debian also needs python3-venv; bash .ci/run installs all of it)",
        python.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The counts in pytest's last summary line (`3 passed, 2 skipped in 4.1s`).
fn count(summary: &str, what: &str) -> usize {
    let words: Vec<&str> = summary
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .filter(|w| w[1] == what)
        .filter_map(|w| w[0].parse::<usize>().ok())
        .sum()
}

/// Runs pytest on `clients/python/tests` with `args`, asserts it passed with
/// at least `min_passed` tests, and returns its output.
fn pytest(args: &[&str], min_passed: usize) -> String {
    require_python_packages();
    let billing = workspace_binary("billing-svc");
    let settings = workspace_binary("settings-svc");
    let out = Command::new(python())
        .args([
            "-m",
            "pytest",
            "tests",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ])
        .args(args)
        .current_dir(package_dir())
        .env("IGNY8_BILLING_BIN", &billing)
        .env("IGNY8_SETTINGS_BIN", &settings)
        .env("IGNY8_TEST_JWT_SECRET", SECRET)
        .env("IGNY8_TEST_POSTGRES_URL", postgres_admin_url())
        // Keep the checkout free of __pycache__ and the output unbuffered.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("run python3 -m pytest");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Exit status 5 (no tests collected) fails here like any other.
    assert!(
        out.status.success(),
        "pytest failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.contains(" in ") && (l.contains("passed") || l.contains("skipped")))
        .unwrap_or_default();
    let passed = count(summary, "passed");
    assert!(
        passed >= min_passed,
        "expected at least {min_passed} passing tests, pytest says {summary:?}:\n{stdout}"
    );
    println!("{stdout}");
    stdout
}

/// Every method and exception, the retry across a SIGKILL restart, compat,
/// asyncio, the streams, the committed stubs and `mypy --strict`. The
/// module-check test skips, saying why, while billing-svc lacks
/// `IGNY8_SETTINGS_URL` (module-aware charging); the minimum
/// count keeps the stream tests from skipping unnoticed.
#[test]
fn python_client_against_the_real_binaries() {
    pytest(&["-k", "not fresh_venv"], 45);
}

/// The README's one install command, in a fresh virtual environment (needs
/// PyPI for grpcio and friends). Separate so it runs beside the suite above.
#[test]
fn python_client_installs_into_a_fresh_venv() {
    pytest(&["-k", "fresh_venv"], 1);
}

#[test]
fn pytest_summary_counts() {
    assert_eq!(count("30 passed, 5 skipped in 20.1s", "passed"), 30);
    assert_eq!(count("30 passed, 5 skipped in 20.1s", "skipped"), 5);
    assert_eq!(count("no tests ran in 0.1s", "passed"), 0);
}
