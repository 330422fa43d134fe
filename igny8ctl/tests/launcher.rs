//! `igny8ctl dev` as a newcomer runs it: a subprocess in an empty directory,
//! its printed grpcurl calls run as printed with the real grpcurl, stopped
//! with a signal, started again on the same data.

mod common;

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    field, igny8ctl,
    launcher::{Launcher, START_TIMEOUT, wait_exit},
    run,
};
use serde_json::Value;

/// Runs a printed line exactly as a shell would, with the real grpcurl on
/// PATH. Returns stdout; panics with the output when it fails.
fn sh(line: &str) -> String {
    let grpcurl = igny8_tests::grpcurl();
    let dir = grpcurl.parent().expect("grpcurl dir");
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .args(["-c", line])
        .env("PATH", path)
        .output()
        .expect("run sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "printed call failed ({}):\n{line}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn sh_json(line: &str) -> Value {
    let text = sh(line);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn secret_file(dir: &Path) -> PathBuf {
    dir.join(".igny8-dev-secret")
}

#[test]
fn dev_prints_calls_that_work_and_a_restart_reuses_the_data() {
    let dir = tempfile::tempdir().expect("temp dir");

    // First start: an empty directory.
    let first = Launcher::start(dir.path(), &[]);
    let stderr = first.stderr();
    assert!(
        stderr.contains("DEVELOPMENT SECRET"),
        "the generated secret must be announced loudly:\n{stderr}"
    );
    assert!(dir.path().join("igny8.db").is_file(), "SQLite default file");
    let secret = std::fs::read_to_string(secret_file(dir.path())).expect("dev secret file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(secret_file(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the dev secret is private");
    }
    let banner = first.banner.join("\n");
    for needle in [
        format!("billing   listening on {}", first.billing),
        format!("settings  listening on {}", first.settings),
        "(created now)".to_owned(),
    ] {
        assert!(banner.contains(&needle), "{needle:?} in:\n{banner}");
    }
    // Five calls, plus the CaptureHold of the hold example.
    assert_eq!(first.calls().len(), 6, "{banner}");
    for call in first.calls().iter().filter(|c| !c.ends_with(" list")) {
        assert!(call.contains(" -emit-defaults "), "{call}");
    }
    let token = first.token();
    for call in first.calls() {
        if call.contains("Bearer") {
            assert!(
                call.contains(&token),
                "calls carry the printed token: {call}"
            );
        }
    }

    let list = sh(&first.call(" list"));
    assert!(list.contains("igny8.billing.v1.BillingService"), "{list}");
    let balance = sh_json(&first.call("/GetBalance"));
    assert_eq!(field(&balance, "account_id"), "1", "{balance}");
    assert_eq!(field(&balance, "balance"), "1000", "{balance}");
    let cost = sh_json(&first.call("/GetCreditCost"));
    assert_eq!(field(&cost, "operation"), "content_generation", "{cost}");
    assert_eq!(field(&cost, "credits"), "2", "{cost}");
    let deduct = sh_json(&first.call("/Deduct"));
    assert_eq!(field(&deduct, "balance"), "998", "{deduct}");
    // -emit-defaults: `false` is printed, not left out.
    assert_eq!(field(&deduct, "replayed"), false, "{deduct}");
    let module = sh_json(&first.call("/CheckModule"));
    assert_eq!(field(&module, "module"), "MODULE_WRITER", "{module}");
    assert_eq!(field(&module, "enabled"), true, "{module}");

    // The hold example: both lines, as printed, in one shell.
    let reserve_line = first
        .banner
        .iter()
        .map(|l| l.trim())
        .find(|l| l.starts_with("HOLD_ID=$(grpcurl ") && l.ends_with("Reserve | python3 -c 'import json, sys; print(json.load(sys.stdin)[\"hold\"][\"id\"])')"))
        .unwrap_or_else(|| panic!("no Reserve line in:\n{banner}"))
        .to_owned();
    let capture_line = first.call("/CaptureHold");
    let hold = |_: ()| sh_json(&format!("{reserve_line}\n{capture_line}"));
    let captured = hold(());
    assert_eq!(
        field(field(&captured, "hold"), "state"),
        "HOLD_STATE_CAPTURED",
        "{captured}"
    );
    assert_eq!(field(&captured, "balance"), "973", "{captured}");
    assert_eq!(field(&captured, "replayed"), false, "{captured}");
    // Run again: the Reserve key replays the same hold, the capture replays.
    let again = hold(());
    assert_eq!(field(&again, "replayed"), true, "{again}");
    assert_eq!(field(&again, "balance"), "973", "{again}");

    let old_balance_call = first.call("/GetBalance");
    let old_billing = first.billing;
    let (status, stderr) = first.stop("INT");
    assert!(status.success(), "Ctrl-C exits 0, got {status}\n{stderr}");
    assert!(stderr.contains("both services stopped cleanly"), "{stderr}");

    // Second start: same directory, same database, same secret.
    let second = Launcher::start(dir.path(), &[]);
    assert_eq!(
        std::fs::read_to_string(secret_file(dir.path())).unwrap(),
        secret,
        "the dev secret is reused, not regenerated"
    );
    let banner = second.banner.join("\n");
    assert!(
        !banner.contains("(created now)"),
        "no demo row is created twice:\n{banner}"
    );
    assert!(
        banner.contains("balance 973 credits"),
        "the earlier Deduct and capture are remembered:\n{banner}"
    );

    // The first run's token still works.
    let old_token_call =
        old_balance_call.replace(&old_billing.to_string(), &second.billing.to_string());
    let balance = sh_json(&old_token_call);
    assert_eq!(field(&balance, "balance"), "973", "{balance}");

    // The printed Deduct is idempotent across restarts.
    let replay = sh_json(&second.call("/Deduct"));
    assert_eq!(field(&replay, "replayed"), true, "{replay}");
    assert_eq!(field(&replay, "balance"), "998", "{replay}");

    // One grant, one deduction and one capture in the ledger: nothing
    // seeded twice.
    let shown = run(igny8ctl(dir.path()).args(["balance", "--account", "1"]));
    let out = shown.ok();
    assert!(out.contains("\"Demo\" (active): 973 credits"), "{out}");
    assert!(out.contains("ledger: 3 rows summing to 973"), "{out}");

    // The operator CLI mints with the same development secret.
    let minted = run(igny8ctl(dir.path()).args(["token", "user", "--id", "1"]));
    let fresh = minted.ok().trim().to_owned();
    assert!(minted.stderr.contains("DEVELOPMENT"), "{}", minted.stderr);
    let call = second.call("/GetBalance").replace(&second.token(), &fresh);
    assert_eq!(field(&sh_json(&call), "balance"), "973");

    let (status, stderr) = second.stop("TERM");
    assert!(status.success(), "SIGTERM exits 0, got {status}\n{stderr}");
}

#[test]
fn dev_honours_database_url_and_jwt_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("custom.db");
    let url = format!("sqlite://{}", db.display());
    let launcher = Launcher::start(
        dir.path(),
        &[
            ("DATABASE_URL", &url),
            (
                "IGNY8_JWT_SECRET",
                "an-operator-chosen-secret-0123456789abcdef",
            ),
        ],
    );
    let stderr = launcher.stderr();
    assert!(!stderr.contains("DEVELOPMENT SECRET"), "{stderr}");
    assert!(stderr.contains("IGNY8_JWT_SECRET"), "{stderr}");
    assert!(db.is_file(), "DATABASE_URL is used");
    assert!(
        !dir.path().join("igny8.db").exists(),
        "not the default file"
    );
    assert!(
        !secret_file(dir.path()).exists(),
        "no dev secret when one is configured"
    );
    let balance = sh_json(&launcher.call("/GetBalance"));
    assert_eq!(field(&balance, "balance"), "1000", "{balance}");
    let (status, stderr) = launcher.stop("TERM");
    assert!(status.success(), "{status}\n{stderr}");
}

#[test]
fn dev_explains_a_busy_port() {
    let dir = tempfile::tempdir().expect("temp dir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = igny8ctl(dir.path())
        .args([
            "dev",
            "--billing-addr",
            &addr,
            "--settings-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start igny8ctl dev");
    let status = wait_exit(&mut child, START_TIMEOUT)
        .unwrap_or_else(|| panic!("igny8ctl dev kept running on a busy port"));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("--billing-addr"),
        "the error names the address and the flag to change it:\n{stderr}"
    );
    drop(taken);
}

/// `dev` wires billing to its settings (docs/api.md "Module-aware charging"): switching the writer
/// module off with the printed token makes a new usage Deduct fail with
/// MODULE_DISABLED, while the printed Deduct itself (a recorded key) still
/// replays.
#[test]
fn dev_billing_checks_modules_with_its_settings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dev = Launcher::start(dir.path(), &[]);
    let deduct = dev.call("/Deduct");
    let first = sh_json(&deduct);
    assert_ne!(field(&first, "replayed"), true, "{first}");

    let check = dev.call("/CheckModule");
    let off = check
        .replace(
            r#"'{"module":"MODULE_WRITER"}'"#,
            r#"'{"settings":{"writer_enabled":false},"update_mask":{"paths":["writer_enabled"]}}'"#,
        )
        .replace("/CheckModule", "/UpdateModuleSettings");
    assert_ne!(
        off, check,
        "the printed CheckModule call has the expected shape"
    );
    let updated = sh_json(&off);
    // grpcurl leaves out fields at their default (false).
    assert_ne!(
        field(&updated["settings"], "writer_enabled"),
        true,
        "{updated}"
    );
    assert_eq!(
        field(&updated["settings"], "planner_enabled"),
        true,
        "{updated}"
    );

    let grpcurl = igny8_tests::grpcurl();
    let path = format!(
        "{}:{}",
        grpcurl.parent().expect("grpcurl dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut attempt = 0;
    let refused = loop {
        attempt += 1;
        let line = deduct.replace(
            igny8ctl::dev::DEMO_DEDUCT_KEY,
            &format!("after-writer-off-{attempt}"),
        );
        let out = Command::new("sh")
            .args(["-c", &line])
            .env("PATH", &path)
            .output()
            .expect("run sh");
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "usage Deduct still charged 10 s after the writer module was switched off"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        refused.contains("FailedPrecondition") && refused.contains("MODULE_DISABLED"),
        "{refused}"
    );
    // The printed Deduct's key was recorded before: it replays.
    let replay = sh_json(&deduct);
    assert_eq!(field(&replay, "replayed"), true, "{replay}");
    let (status, stderr) = dev.stop("TERM");
    assert!(status.success(), "{stderr}");
}
