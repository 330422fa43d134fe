//! What the launcher and CLI tests share: running the built `igny8ctl`
//! binary with a clean environment.

#![allow(dead_code)]

pub mod launcher;

use std::{
    path::Path,
    process::{Command, Output},
};

/// The binary under test.
pub const IGNY8CTL: &str = env!("CARGO_BIN_EXE_igny8ctl");

/// Environment that would change igny8ctl's behaviour: removed from every
/// subprocess so the tests see the defaults unless they set them.
pub const SCRUBBED_ENV: &[&str] = &[
    "DATABASE_URL",
    "IGNY8_JWT_SECRET",
    "IGNY8_JWT_PUBLIC_KEY_FILE",
    "IGNY8_JWKS_FILE",
    "IGNY8_JWT_ISSUER",
    "IGNY8_JWT_AUDIENCE",
    "IGNY8_RUN_MIGRATIONS",
    "IGNY8_DEV_BILLING_ADDR",
    "IGNY8_DEV_SETTINGS_ADDR",
    "IGNY8_COST_TABLE_FILE",
    "IGNY8_LOG_FORMAT",
    "IGNY8_METRICS_ADDR",
    "IGNY8_LISTEN_ADDR",
];

/// `igny8ctl` in `dir` with the scrubbed environment.
pub fn igny8ctl(dir: &Path) -> Command {
    let mut cmd = Command::new(IGNY8CTL);
    cmd.current_dir(dir).env("RUST_LOG", "warn");
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// A finished command's exit status and output, readable in assertions.
#[derive(Debug)]
pub struct Ran {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Ran {
    /// Panics unless the command succeeded; returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "expected success, got {self:#?}");
        &self.stdout
    }

    /// Panics unless the command failed with `code`; returns stderr.
    pub fn fails(&self, code: i32) -> &str {
        assert_eq!(self.code, Some(code), "expected exit {code}, got {self:#?}");
        &self.stderr
    }
}

impl From<Output> for Ran {
    fn from(out: Output) -> Self {
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `cmd` to completion.
pub fn run(cmd: &mut Command) -> Ran {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {IGNY8CTL}: {e}"))
        .into()
}

/// A field of grpcurl's JSON output, whichever naming grpcurl used
/// (`balance_after` or `balanceAfter`).
pub fn field<'a>(v: &'a serde_json::Value, snake: &str) -> &'a serde_json::Value {
    if let Some(x) = v.get(snake) {
        return x;
    }
    let mut camel = String::new();
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            camel.extend(c.to_uppercase());
            upper = false;
        } else {
            camel.push(c);
        }
    }
    v.get(&camel).unwrap_or(&serde_json::Value::Null)
}
