//! The results: one JSON document (`--json`) or a table.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use serde::Serialize;

use crate::{driver::Measurement, scenarios::Verification};

/// A whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `igny8-bench`.
    pub tool: &'static str,
    /// The bench crate's version.
    pub version: &'static str,
    /// `postgres` or `sqlite`.
    pub backend: &'static str,
    /// Concurrent callers.
    pub concurrency: u32,
    /// HTTP/2 connections the callers share.
    pub connections: usize,
    /// Warm-up per scenario, seconds.
    pub warmup_secs: f64,
    /// Measured time per scenario and round, seconds.
    pub duration_secs: f64,
    /// Rounds each closed-loop scenario ran (`--rounds`), interleaved and
    /// pooled.
    pub rounds: u32,
    /// CPUs available to this process.
    pub cpus: usize,
    /// One entry per scenario, in run order.
    pub scenarios: Vec<ScenarioReport>,
    /// For each deduct scenario run both ways (closed loop): batched
    /// throughput over `IGNY8_LEDGER_MAX_BATCH=1` throughput.
    pub batching_gains: Vec<BatchingGain>,
    /// Every deduct verification passed (true when none ran).
    pub verification_passed: bool,
}

/// What batching bought one deduct scenario, within one run.
#[derive(Debug, Serialize)]
pub struct BatchingGain {
    /// `deduct-hot` or `deduct-spread`.
    pub scenario: &'static str,
    /// req/s with the default ledger writer.
    pub batched_per_sec: f64,
    /// req/s with one request per transaction.
    pub unbatched_per_sec: f64,
    /// `batched_per_sec / unbatched_per_sec`.
    pub ratio: f64,
}

/// How a scenario's calls were started.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Mode {
    /// Each caller starts its next call when the previous one returned.
    Closed,
    /// Calls due on a fixed schedule; latency from the scheduled start.
    Open {
        /// Calls scheduled per second.
        target_rate: f64,
    },
}

impl Mode {
    /// `name`, with the open-loop rate when there is one (`deduct-hot
    /// open@5000/s`).
    pub fn label(self, name: &str) -> String {
        match self {
            Mode::Closed => name.to_owned(),
            Mode::Open { target_rate } => format!("{name} open@{target_rate:.0}/s"),
        }
    }
}

/// One scenario's numbers.
#[derive(Debug, Serialize)]
pub struct ScenarioReport {
    /// `baseline`, `deduct-hot`, ...
    pub name: &'static str,
    /// The RPC called.
    pub rpc: &'static str,
    /// Closed or open loop (with the scheduled rate).
    pub load: Mode,
    /// Open loop: how late measured calls started after their scheduled
    /// time (already part of `latency_ms`); null for closed loop.
    pub start_lag_ms: Option<Lag>,
    /// Successful calls in the measured window.
    pub requests: u64,
    /// Length of the measured window, seconds.
    pub elapsed_secs: f64,
    /// `requests / elapsed_secs`: over every round pooled.
    pub requests_per_sec: f64,
    /// With `--rounds` > 1: each round's throughput, in order; empty
    /// otherwise.
    pub rounds_per_sec: Vec<f64>,
    /// `requests_per_sec` divided by baseline's from the same run; null when
    /// baseline was not run.
    pub ratio_to_baseline: Option<f64>,
    /// Latency of successful calls; null when none succeeded.
    pub latency_ms: Option<Latency>,
    /// Failed measured calls by gRPC status name (`INVALID_RESPONSE`: an
    /// OK whose content was wrong).
    pub errors: BTreeMap<&'static str, u64>,
    /// Sum of `errors`.
    pub error_count: u64,
    /// One message per error label (warm-up included).
    pub error_samples: BTreeMap<&'static str, String>,
    /// Calls made during the warm-up.
    pub warmup_requests: u64,
    /// Failed warm-up calls by label.
    pub warmup_errors: BTreeMap<&'static str, u64>,
    /// Balance and ledger check, for the deduct scenarios.
    pub verification: Option<Verification>,
}

/// Latency percentiles in milliseconds (nearest rank).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest call.
    pub max: f64,
}

/// Open-loop start lag in milliseconds (nearest rank).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Lag {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Latest start.
    pub max: f64,
}

/// Milliseconds, rounded to the microsecond.
fn ms(d: Option<Duration>) -> f64 {
    d.map_or(0.0, |d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

impl ScenarioReport {
    /// Summarises a measurement (the ratio is filled in by [`Report::new`]).
    pub fn new(
        name: &'static str,
        rpc: &'static str,
        load: Mode,
        m: Measurement,
        verification: Option<Verification>,
    ) -> Self {
        let latency_ms = (m.ok > 0).then(|| Latency {
            p50: ms(m.percentile(50.0)),
            p90: ms(m.percentile(90.0)),
            p99: ms(m.percentile(99.0)),
            max: ms(m.max()),
        });
        let start_lag_ms =
            (matches!(load, Mode::Open { .. }) && !m.start_lags_ns.is_empty()).then(|| Lag {
                p50: ms(m.start_lag(50.0)),
                p99: ms(m.start_lag(99.0)),
                max: ms(m.start_lag(100.0)),
            });
        Self {
            name,
            rpc,
            load,
            start_lag_ms,
            requests: m.ok,
            elapsed_secs: m.elapsed.as_secs_f64(),
            requests_per_sec: m.rate(),
            rounds_per_sec: Vec::new(),
            ratio_to_baseline: None,
            latency_ms,
            error_count: m.error_count(),
            errors: m.errors,
            error_samples: m.error_samples,
            warmup_requests: m.warmup_calls,
            warmup_errors: m.warmup_errors,
            verification,
        }
    }

    /// The scenario's name, with the open-loop rate when there is one.
    pub fn label(&self) -> String {
        self.load.label(self.name)
    }
}

impl Report {
    /// Assembles the run and computes the ratios to baseline.
    pub fn new(
        backend: &'static str,
        concurrency: u32,
        connections: usize,
        warmup: Duration,
        duration: Duration,
        rounds: u32,
        mut scenarios: Vec<ScenarioReport>,
    ) -> Self {
        let baseline = scenarios
            .iter()
            .find(|s| s.name == "baseline" && s.load == Mode::Closed)
            .map(|s| s.requests_per_sec)
            .filter(|&r| r > 0.0);
        if let Some(baseline) = baseline {
            for s in &mut scenarios {
                s.ratio_to_baseline = Some(s.requests_per_sec / baseline);
            }
        }
        let closed = |name: &str| {
            scenarios
                .iter()
                .find(|s| s.name == name && s.load == Mode::Closed)
        };
        let batching_gains = scenarios
            .iter()
            .filter(|s| s.load == Mode::Closed)
            .filter_map(|batched| {
                let unbatched = closed(&format!("{}-unbatched", batched.name))?;
                (unbatched.requests_per_sec > 0.0).then(|| BatchingGain {
                    scenario: batched.name,
                    batched_per_sec: batched.requests_per_sec,
                    unbatched_per_sec: unbatched.requests_per_sec,
                    ratio: batched.requests_per_sec / unbatched.requests_per_sec,
                })
            })
            .collect();
        let verification_passed = scenarios
            .iter()
            .filter_map(|s| s.verification.as_ref())
            .all(|v| v.passed);
        Self {
            tool: "igny8-bench",
            version: env!("CARGO_PKG_VERSION"),
            backend,
            concurrency,
            connections,
            warmup_secs: warmup.as_secs_f64(),
            duration_secs: duration.as_secs_f64(),
            rounds,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            scenarios,
            batching_gains,
            verification_passed,
        }
    }

    /// The JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serialises")
    }

    /// The human-readable table, with error and verification lines under it.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "igny8-bench {}: backend {}, {} callers on {} connection(s), warm-up {}s + {}s measured per scenario{}, {} CPU(s)",
            self.version,
            self.backend,
            self.concurrency,
            self.connections,
            self.warmup_secs,
            self.duration_secs,
            if self.rounds > 1 {
                format!(" and round, {} rounds interleaved and pooled", self.rounds)
            } else {
                String::new()
            },
            self.cpus
        );
        let _ = writeln!(out);
        let width = self
            .scenarios
            .iter()
            .map(|s| s.label().chars().count())
            .max()
            .unwrap_or(0)
            .max("scenario".len());
        let _ = writeln!(
            out,
            "| {:<width$} |     req/s | × baseline |  p50 ms |  p90 ms |  p99 ms |  max ms |       ok | errors |",
            "scenario"
        );
        let _ = writeln!(
            out,
            "|-{}-|----------:|-----------:|--------:|--------:|--------:|--------:|---------:|-------:|",
            "-".repeat(width)
        );
        for s in &self.scenarios {
            let ratio = s
                .ratio_to_baseline
                .map_or_else(|| "—".to_owned(), |r| format!("{r:.3}"));
            let [p50, p90, p99, max] = match s.latency_ms {
                Some(l) => [l.p50, l.p90, l.p99, l.max].map(|v| format!("{v:.2}")),
                None => ["—"; 4].map(str::to_owned),
            };
            let _ = writeln!(
                out,
                "| {:<width$} | {:>9.1} | {:>10} | {:>7} | {:>7} | {:>7} | {:>7} | {:>8} | {:>6} |",
                s.label(),
                s.requests_per_sec,
                ratio,
                p50,
                p90,
                p99,
                max,
                s.requests,
                s.error_count
            );
        }
        let _ = writeln!(out);
        for s in &self.scenarios {
            if s.error_count > 0 || !s.warmup_errors.is_empty() {
                let list = |m: &BTreeMap<&str, u64>| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = writeln!(
                    out,
                    "errors   {}: {} (warm-up: {})",
                    s.label(),
                    list(&s.errors),
                    list(&s.warmup_errors)
                );
                for (label, message) in &s.error_samples {
                    let _ = writeln!(out, "         {label}: {message}");
                }
            }
        }
        for g in &self.batching_gains {
            let _ = writeln!(
                out,
                "batching {}: {:.1}× the same scenario with IGNY8_LEDGER_MAX_BATCH=1 ({:.1} vs {:.1} req/s)",
                g.scenario, g.ratio, g.batched_per_sec, g.unbatched_per_sec
            );
        }
        for s in &self.scenarios {
            if !s.rounds_per_sec.is_empty() {
                let rates: Vec<String> =
                    s.rounds_per_sec.iter().map(|r| format!("{r:.0}")).collect();
                let _ = writeln!(out, "rounds   {}: {} req/s", s.label(), rates.join(", "));
            }
        }
        for s in &self.scenarios {
            if let Some(lag) = s.start_lag_ms {
                let _ = writeln!(
                    out,
                    "lag      {}: calls started after their scheduled time by p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (included in the latency)",
                    s.label(),
                    lag.p50,
                    lag.p99,
                    lag.max
                );
            }
        }
        for s in &self.scenarios {
            if let Some(v) = &s.verification {
                let _ = writeln!(
                    out,
                    "verify   {}: {} — {}",
                    s.label(),
                    if v.passed { "PASS" } else { "FAIL" },
                    v.detail
                );
            }
        }
        out
    }
}
