//! Command-line options.

use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Throughput and latency of the igny8 services, side by side with a bare
/// tonic server on the same machine in the same run.
///
/// Starts everything in-process on loopback: a fresh migrated database
/// (PostgreSQL by default, via the igny8-tests harness), billing-svc,
/// settings-svc and a minimal baseline server; seeds accounts, editor users
/// and tokens; then drives each scenario over real HTTP/2 connections with
/// N concurrent callers for a fixed duration after a warm-up.
#[derive(Debug, Parser)]
#[command(name = "igny8-bench", version, about, long_about)]
pub struct Args {
    /// Database the services run on. PostgreSQL uses $DATABASE_URL (a
    /// postgres:// URL) or 127.0.0.1:5432 and creates a throw-away database.
    #[arg(long, value_enum, default_value_t = BackendArg::Postgres)]
    pub backend: BackendArg,

    /// Concurrent callers, each issuing one call at a time.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,

    /// Callers sharing one HTTP/2 connection (callers are spread over
    /// ceil(concurrency / this) connections).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub callers_per_connection: u32,

    /// Measured time per scenario, e.g. `10s`, `1500ms`, `1m`.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub duration: Duration,

    /// Unmeasured warm-up per scenario before the measured time (`0s` for none).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Comma-separated scenarios to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "baseline,deduct-hot,deduct-hot-unbatched,deduct-spread,deduct-spread-unbatched,cost,check-module,deduct-module"
    )]
    pub scenarios: Vec<Scenario>,

    /// Run every scenario this many times, interleaved (each round runs
    /// every scenario once, in order), and report each scenario over all its
    /// rounds pooled. On a shared machine whose speed drifts from one
    /// second to the next, every scenario then samples the same stretches of
    /// time as the baseline it is divided by. `--open-loop-at-half-peak`
    /// rows run once, after the rounds, at half the pooled peak.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,

    /// Open loop: start calls on a fixed schedule of this many per second
    /// (whatever the responses) instead of back to back, and measure each
    /// call's latency from its scheduled start.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// For the deduct scenarios: after the closed-loop run, run the scenario
    /// again open loop at half the rate it just reached, and report that
    /// row's latency too.
    #[arg(long, conflicts_with = "rate")]
    pub open_loop_at_half_peak: bool,

    /// Open loop: the most calls in flight at once. When all are busy, due
    /// calls wait (and the wait counts in their latency).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_in_flight: u32,

    /// Print one JSON document on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// The requested scenarios with repeats removed, first occurrence kept.
    pub fn scenarios(&self) -> Vec<Scenario> {
        let mut out = Vec::new();
        for s in &self.scenarios {
            if !out.contains(s) {
                out.push(*s);
            }
        }
        out
    }

    /// How many HTTP/2 connections the callers are spread over.
    pub fn connections(&self) -> usize {
        self.concurrency.div_ceil(self.callers_per_connection) as usize
    }

    /// Whether any scenario runs open loop.
    pub fn open_loop(&self) -> bool {
        self.rate.is_some() || self.open_loop_at_half_peak
    }

    /// How many distinct callers (and so editor users) a run needs.
    pub fn max_callers(&self) -> usize {
        if self.open_loop() {
            self.concurrency.max(self.max_in_flight) as usize
        } else {
            self.concurrency as usize
        }
    }
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// PostgreSQL (a fresh database on the local or $DATABASE_URL server).
    Postgres,
    /// Embedded SQLite (a temporary file).
    Sqlite,
}

impl BackendArg {
    /// The harness's backend.
    pub fn harness(self) -> igny8_tests::Backend {
        match self {
            BackendArg::Postgres => igny8_tests::Backend::Postgres,
            BackendArg::Sqlite => igny8_tests::Backend::Sqlite,
        }
    }

    /// The name used in output.
    pub fn name(self) -> &'static str {
        match self {
            BackendArg::Postgres => "postgres",
            BackendArg::Sqlite => "sqlite",
        }
    }
}

/// One measured workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// `grpc.health.v1.Health/Check` on a bare tonic server: no auth, no
    /// database. The transport ceiling on this machine.
    Baseline,
    /// Every caller deducts 1 credit from the same account.
    DeductHot,
    /// `deduct-hot` on a second billing server whose ledger writer applies
    /// one request per transaction (`IGNY8_LEDGER_MAX_BATCH=1`): the same
    /// code without batching.
    DeductHotUnbatched,
    /// Callers deduct 1 credit from accounts picked at random among 1,000.
    DeductSpread,
    /// `deduct-spread` with `IGNY8_LEDGER_MAX_BATCH=1`.
    DeductSpreadUnbatched,
    /// `GetCreditCost`, auth included.
    Cost,
    /// `CheckModule` on settings-svc, auth included.
    CheckModule,
    /// `deduct-hot` priced by usage on a billing server with module checks
    /// on (asking settings-svc); compare with `deduct-hot`.
    DeductModule,
}

impl Scenario {
    /// The name used on the command line and in output.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::DeductHot => "deduct-hot",
            Scenario::DeductHotUnbatched => "deduct-hot-unbatched",
            Scenario::DeductSpread => "deduct-spread",
            Scenario::DeductSpreadUnbatched => "deduct-spread-unbatched",
            Scenario::Cost => "cost",
            Scenario::CheckModule => "check-module",
            Scenario::DeductModule => "deduct-module",
        }
    }

    /// Whether the scenario deducts (and so is verified afterwards).
    pub fn deducts(self) -> bool {
        self.batched().is_some()
    }

    /// For a deduct scenario, the same scenario with batching on.
    pub fn batched(self) -> Option<Scenario> {
        match self {
            Scenario::DeductHot | Scenario::DeductHotUnbatched => Some(Scenario::DeductHot),
            Scenario::DeductSpread | Scenario::DeductSpreadUnbatched => {
                Some(Scenario::DeductSpread)
            }
            _ => None,
        }
    }

    /// Whether the scenario runs on the `IGNY8_LEDGER_MAX_BATCH=1` server.
    pub fn unbatched(self) -> bool {
        matches!(
            self,
            Scenario::DeductHotUnbatched | Scenario::DeductSpreadUnbatched
        )
    }

    /// The RPC the scenario calls.
    pub fn rpc(self) -> &'static str {
        match self {
            Scenario::Baseline => "grpc.health.v1.Health/Check",
            Scenario::DeductHot
            | Scenario::DeductHotUnbatched
            | Scenario::DeductSpread
            | Scenario::DeductSpreadUnbatched
            | Scenario::DeductModule => "igny8.billing.v1.BillingService/Deduct",
            Scenario::Cost => "igny8.billing.v1.BillingService/GetCreditCost",
            Scenario::CheckModule => "igny8.settings.v1.SettingsService/CheckModule",
        }
    }
}

/// Parses `10s`, `1500ms`, `1.5s`, `2m`, `250us` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (examples: 10s, 1500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" | "min" => value * 60.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}` (use us, ms, s or m)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

/// A positive, finite number of calls per second.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate <= 1e7 => Ok(rate),
        _ => Err(format!(
            "`{text}` is not a rate: give calls per second, e.g. 500 (at most 10000000)"
        )),
    }
}

/// [`parse_duration`], refusing zero.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_positive_duration("0s").is_err());
    }

    #[test]
    fn default_run_measures_every_scenario_with_32_callers_on_4_connections() {
        let args = Args::parse_from(["igny8-bench"]);
        assert_eq!(
            args.scenarios(),
            [
                Scenario::Baseline,
                Scenario::DeductHot,
                Scenario::DeductHotUnbatched,
                Scenario::DeductSpread,
                Scenario::DeductSpreadUnbatched,
                Scenario::Cost,
                Scenario::CheckModule,
                Scenario::DeductModule,
            ]
        );
        assert_eq!(args.backend, BackendArg::Postgres);
        assert_eq!(args.connections(), 4);
        assert_eq!(args.duration, Duration::from_secs(10));
        assert_eq!(args.warmup, Duration::from_secs(2));
    }

    #[test]
    fn open_loop_options() {
        let args = Args::parse_from(["igny8-bench", "--rate", "1500.5"]);
        assert_eq!(args.rate, Some(1500.5));
        assert!(args.open_loop());
        assert_eq!(args.max_callers(), 256);
        let args = Args::parse_from(["igny8-bench", "--open-loop-at-half-peak"]);
        assert!(args.open_loop() && args.rate.is_none());
        assert!(!Args::parse_from(["igny8-bench"]).open_loop());
        assert_eq!(Args::parse_from(["igny8-bench"]).max_callers(), 32);
        for bad in ["0", "-5", "fast", "inf", "NaN"] {
            assert!(
                Args::try_parse_from(["igny8-bench", "--rate", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(
            Args::try_parse_from(["igny8-bench", "--rate", "10", "--open-loop-at-half-peak"])
                .is_err()
        );
    }

    #[test]
    fn repeated_scenarios_run_once() {
        let args = Args::parse_from(["igny8-bench", "--scenarios", "cost,baseline,cost"]);
        assert_eq!(args.scenarios(), [Scenario::Cost, Scenario::Baseline]);
    }
}
