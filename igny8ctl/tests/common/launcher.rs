//! `igny8ctl dev` as a subprocess, for the launcher and README tests.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use super::igny8ctl;

/// Bound on start-up (first start creates and migrates the database).
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on a clean stop after a signal.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `igny8ctl dev` and what it printed up to its ready line.
pub struct Launcher {
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// What it printed on stdout before its ready line.
    pub banner: Vec<String>,
    /// Billing's address.
    pub billing: SocketAddr,
    /// Settings' address.
    pub settings: SocketAddr,
}

impl Launcher {
    /// Starts `igny8ctl dev` in `dir` on ports the OS picks, and waits for
    /// its ready line.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Launcher {
        let mut cmd = igny8ctl(dir);
        cmd.args([
            "dev",
            "--billing-addr",
            "127.0.0.1:0",
            "--settings-addr",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start igny8ctl dev");
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let mut pipe = child.stderr.take().expect("stderr");
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stderr
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        let deadline = Instant::now() + START_TIMEOUT;
        let mut banner = Vec::new();
        let ready = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.starts_with("ready: ") => break line,
                Ok(line) => banner.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    panic!(
                        "igny8ctl dev printed no ready line within {START_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                        banner.join("\n"),
                        stderr.lock().unwrap()
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait");
                    std::thread::sleep(Duration::from_millis(100));
                    panic!(
                        "igny8ctl dev exited ({status}) before it was ready\nstdout:\n{}\nstderr:\n{}",
                        banner.join("\n"),
                        stderr.lock().unwrap()
                    );
                }
            }
        };
        let addr = |name: &str| -> SocketAddr {
            ready
                .split_whitespace()
                .find_map(|part| part.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name}= in {ready:?}"))
                .parse()
                .unwrap_or_else(|e| panic!("{name} address in {ready:?}: {e}"))
        };
        Launcher {
            billing: addr("billing"),
            settings: addr("settings"),
            child,
            stderr,
            banner,
        }
    }

    /// The token from the `export IGNY8_TOKEN=…` line.
    pub fn token(&self) -> String {
        self.banner
            .iter()
            .find_map(|l| l.trim().strip_prefix("export IGNY8_TOKEN="))
            .unwrap_or_else(|| panic!("no export line in:\n{}", self.banner.join("\n")))
            .to_owned()
    }

    /// The printed grpcurl call whose line ends with `suffix`.
    pub fn call(&self, suffix: &str) -> String {
        self.banner
            .iter()
            .map(|l| l.trim())
            .find(|l| l.starts_with("grpcurl ") && l.ends_with(suffix))
            .unwrap_or_else(|| {
                panic!(
                    "no printed grpcurl call ending with {suffix:?} in:\n{}",
                    self.banner.join("\n")
                )
            })
            .to_owned()
    }

    pub fn calls(&self) -> Vec<String> {
        self.banner
            .iter()
            .map(|l| l.trim())
            .filter(|l| l.starts_with("grpcurl "))
            .map(str::to_owned)
            .collect()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `signal` with `kill` and waits (bounded) for the exit.
    pub fn stop(mut self, signal: &str) -> (ExitStatus, String) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
        let status = wait_exit(&mut self.child, STOP_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "igny8ctl dev did not exit within {STOP_TIMEOUT:?} of SIG{signal}\nstderr:\n{}",
                self.stderr()
            )
        });
        // Let the reader thread take the last of stderr.
        std::thread::sleep(Duration::from_millis(200));
        let stderr = self.stderr();
        (status, stderr)
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits at most `timeout` for `child` to exit.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}
