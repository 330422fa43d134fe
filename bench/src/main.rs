//! `igny8-bench`: throughput and latency of billing-svc and settings-svc,
//! side by side with a bare tonic server measured the same way in the same
//! run, so results read as ratios on a shared, noisy machine.
//!
//! Everything runs in this process on loopback: the igny8-tests harness
//! creates a fresh migrated database (PostgreSQL by default, SQLite on
//! request), seeds it and starts the services; the callers talk to them over
//! real HTTP/2 connections. After each deduct scenario the balances and the
//! ledger are checked exactly; a mismatch makes the exit status 1.
//!
//! ```text
//! cargo run --release -p igny8-bench -- [--backend postgres|sqlite] [--concurrency 32]
//!     [--duration 10s] [--warmup 2s] [--scenarios baseline,deduct-hot,...] [--json]
//!     [--rate N | --open-loop-at-half-peak] [--max-in-flight 256]
//! ```

mod baseline;
mod cli;
mod driver;
mod report;
mod scenarios;

use std::{process::ExitCode, time::Duration};

use billing_svc::{BillingOptions, writer::WriterConfig};
use clap::Parser;
use igny8_tests::{Running, TestDb, spawn_billing_with_options, spawn_settings_with, test_config};

use crate::{
    baseline::Baseline,
    cli::{Args, Scenario},
    driver::{Plan, drive, drive_open},
    report::{Mode, Report, ScenarioReport},
    scenarios::{
        HOT_ACCOUNT, HOT_CREDITS, MODULES_ACCOUNT, SPREAD_CREDITS, Verification, baseline_callers,
        check_module_callers, connect, cost_callers, deduct_hot_callers, deduct_module_callers,
        deduct_spread_callers, seed_hot, seed_modules, seed_spread, spread_accounts, verify,
    },
};

fn main() -> ExitCode {
    let args = Args::parse();
    install_panic_hook();
    // The log subscriber the service binaries install (RUST_LOG, and
    // IGNY8_LOG_FORMAT: text by default, json as deployed): without one,
    // every span of every crate takes tracing's no-subscriber path, which is
    // not what runs in production.
    let log_format = std::env::var("IGNY8_LOG_FORMAT").ok();
    match service_kit::config::LogFormat::from_setting(log_format.as_deref()) {
        Ok(format) => service_kit::telemetry::init(format),
        Err(e) => {
            eprintln!("igny8-bench: {e}");
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("igny8-bench: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            if report.verification_passed {
                ExitCode::SUCCESS
            } else {
                eprintln!("igny8-bench: balance/ledger verification FAILED (see above)");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("igny8-bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// Progress goes to stderr so stdout holds only the table or the JSON.
fn progress(message: impl std::fmt::Display) {
    eprintln!("igny8-bench: {message}");
}

/// The harness reports setup failures (no PostgreSQL, a server that does
/// not start) by panicking with an explanation: print that explanation
/// plainly instead of a bare panic message.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info.payload_as_str().unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("igny8-bench: failed{at}:\n{message}");
    }));
}

async fn run(args: &Args) -> Result<Report, String> {
    let scenarios = args.scenarios();
    let connections = args.connections();
    let plan = Plan {
        warmup: args.warmup,
        duration: args.duration,
    };
    let wants = |s: Scenario| scenarios.contains(&s);
    let needs_hot = wants(Scenario::DeductHot)
        || wants(Scenario::DeductHotUnbatched)
        || wants(Scenario::Cost)
        || wants(Scenario::CheckModule);
    let needs_spread = wants(Scenario::DeductSpread) || wants(Scenario::DeductSpreadUnbatched);
    let needs_billing = scenarios
        .iter()
        .any(|s| (s.deducts() && !s.unbatched()) || *s == Scenario::Cost);
    let needs_unbatched = scenarios.iter().any(|s| s.unbatched());
    let needs_modules = wants(Scenario::DeductModule);
    let needs_settings = wants(Scenario::CheckModule) || needs_modules;

    let db = if needs_billing || needs_unbatched || needs_settings {
        progress(format!("creating a fresh {} database", args.backend.name()));
        let db = TestDb::new(args.backend.harness()).await;
        if needs_hot {
            seed_hot(&db, args.max_callers()).await;
        }
        if needs_modules {
            seed_modules(&db, args.max_callers()).await;
        }
        if needs_spread {
            progress(format!(
                "seeding {} accounts with one editor each",
                scenarios::SPREAD_ACCOUNTS
            ));
            seed_spread(&db).await;
        }
        Some(db)
    } else {
        None
    };
    // The bench measures throughput, not load shedding: let every caller in.
    let config = |url: &str| {
        let mut config = test_config(url);
        config.limits.max_in_flight = config.limits.max_in_flight.max(args.max_callers());
        config
    };
    // The ledger writer takes IGNY8_LEDGER_* from the environment, as the
    // service does, so settings can be compared with the same bench.
    let ledger_env = |name: &str| std::env::var(name).ok();
    let billing = match &db {
        Some(db) if needs_billing => {
            let backend = igny8_db::Backend::of_url(&db.url).map_err(|e| e.to_string())?;
            let options = BillingOptions {
                ledger: Some(WriterConfig::from_lookup(backend, ledger_env)?),
                ..Default::default()
            };
            Some(spawn_billing_with_options(config(&db.url), options).await)
        }
        _ => None,
    };
    // The same billing code whose ledger writer applies one request per
    // transaction, as with IGNY8_LEDGER_MAX_BATCH=1.
    let unbatched = match &db {
        Some(db) if needs_unbatched => {
            let backend = igny8_db::Backend::of_url(&db.url).map_err(|e| e.to_string())?;
            let ledger = WriterConfig::from_lookup(backend, |name| match name {
                "IGNY8_LEDGER_MAX_BATCH" => Some("1".to_owned()),
                _ => ledger_env(name),
            })?;
            let options = BillingOptions {
                ledger: Some(ledger),
                ..Default::default()
            };
            Some(spawn_billing_with_options(test_config(&db.url), options).await)
        }
        _ => None,
    };
    let settings = match &db {
        Some(db) if needs_settings => Some(spawn_settings_with(config(&db.url)).await),
        _ => None,
    };
    // A billing server with module checks on, asking `settings`.
    let billing_modules = match (&db, &settings) {
        (Some(db), Some(settings)) if needs_modules => Some(
            spawn_billing_with_options(
                config(&db.url),
                BillingOptions {
                    settings: Some(billing_svc::modules::SettingsOptions::new(
                        settings.endpoint(),
                    )),
                    ..Default::default()
                },
            )
            .await,
        ),
        _ => None,
    };
    let baseline = if wants(Scenario::Baseline) {
        Some(Baseline::start().await?)
    } else {
        None
    };

    let mut bench = Bench {
        args,
        plan,
        connections,
        db: db.as_ref(),
        runs: 0,
        hot_charged: vec![0; 1],
        spread_charged: vec![0; scenarios::SPREAD_ACCOUNTS],
        module_charged: vec![0; 1],
    };
    let addr_for = |scenario: Scenario| match scenario {
        Scenario::Baseline => baseline.as_ref().expect("started above").addr,
        Scenario::DeductHot | Scenario::DeductSpread | Scenario::Cost => addr_of(&billing),
        Scenario::DeductHotUnbatched | Scenario::DeductSpreadUnbatched => addr_of(&unbatched),
        Scenario::CheckModule => addr_of(&settings),
        Scenario::DeductModule => addr_of(&billing_modules),
    };
    let first = match args.rate {
        Some(rate) => Mode::Open { target_rate: rate },
        None => Mode::Closed,
    };
    // Every scenario once per round, rounds interleaved; each scenario's
    // runs pooled.
    let mut pooled: Vec<Pooled> = Vec::with_capacity(scenarios.len());
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            progress(format!("round {round} of {}", args.rounds));
        }
        for (i, scenario) in scenarios.iter().copied().enumerate() {
            let (m, verification) = bench.measure(scenario, addr_for(scenario), first).await?;
            match pooled.get_mut(i) {
                Some(p) => p.add(m, verification),
                None => pooled.push(Pooled::new(scenario, m, verification)),
            }
        }
    }
    let mut reports = Vec::with_capacity(scenarios.len() * 2);
    for p in pooled {
        let scenario = p.scenario;
        let mut report = ScenarioReport::new(
            scenario.name(),
            scenario.rpc(),
            first,
            p.total,
            p.verification,
        );
        if args.rounds > 1 {
            report.rounds_per_sec = p.rates;
        }
        let half_peak = (args.open_loop_at_half_peak && scenario.deducts())
            .then_some(report.requests_per_sec / 2.0);
        reports.push(report);
        match half_peak {
            Some(rate) if rate > 0.0 => {
                let open = Mode::Open { target_rate: rate };
                let (m, verification) = bench.measure(scenario, addr_for(scenario), open).await?;
                reports.push(ScenarioReport::new(
                    scenario.name(),
                    scenario.rpc(),
                    open,
                    m,
                    verification,
                ));
            }
            Some(_) => progress(format!(
                "{}: no call succeeded, so there is no half-peak rate to run open loop at",
                scenario.name()
            )),
            None => {}
        }
    }

    report_module_check_cost(&reports);

    // Stop the servers before the database goes away with `db`.
    for server in [billing, unbatched, billing_modules, settings]
        .into_iter()
        .flatten()
    {
        stop(server).await;
    }
    if let Some(baseline) = baseline
        && let Err(e) = baseline.stop().await
    {
        progress(e);
    }
    drop(db);

    Ok(Report::new(
        args.backend.name(),
        args.concurrency,
        connections,
        args.warmup,
        args.duration,
        args.rounds,
        reports,
    ))
}

/// What the scenario runs of one invocation share.
struct Bench<'a> {
    args: &'a Args,
    plan: Plan,
    connections: usize,
    db: Option<&'a TestDb>,
    /// Deduct runs so far: each run's idempotency keys are its own.
    runs: usize,
    /// Deducts acknowledged so far on the hot account, over every run.
    hot_charged: Vec<u64>,
    /// The same per spread account.
    spread_charged: Vec<u64>,
    /// The same on the modules account.
    module_charged: Vec<u64>,
}

impl Bench<'_> {
    /// Runs one scenario against `addr`, closed or open loop, and verifies
    /// the balances after a deduct scenario (against every deduct
    /// acknowledged so far on those accounts, earlier runs included).
    async fn measure(
        &mut self,
        scenario: Scenario,
        addr: std::net::SocketAddr,
        mode: Mode,
    ) -> Result<(driver::Measurement, Option<Verification>), String> {
        let (callers, per) = match mode {
            Mode::Closed => (
                self.args.concurrency as usize,
                self.args.callers_per_connection as usize,
            ),
            // The same connections, shared by more (mostly idle) callers.
            Mode::Open { .. } => {
                let n = self.args.max_in_flight as usize;
                (n, n.div_ceil(self.connections))
            }
        };
        progress(match mode {
            Mode::Closed => format!(
                "{}: {callers} callers on {} connection(s), {:?} warm-up + {:?} measured",
                scenario.name(),
                self.connections,
                self.plan.warmup,
                self.plan.duration
            ),
            Mode::Open { target_rate } => format!(
                "{}: open loop at {target_rate:.0} calls/s (at most {callers} in flight) on {} connection(s), {:?} warm-up + {:?} measured",
                scenario.name(),
                self.connections,
                self.plan.warmup,
                self.plan.duration
            ),
        });
        let channels = connect(addr, self.connections).await?;
        let run = self.runs;
        self.runs += 1;
        let (m, verification) = match scenario {
            Scenario::Baseline => {
                let m = self
                    .drive(baseline_callers(&channels, callers, per), 0, mode)
                    .await;
                (m, None)
            }
            Scenario::DeductHot | Scenario::DeductHotUnbatched => {
                let callers = deduct_hot_callers(&channels, callers, per, run);
                let m = self.drive(callers, 1, mode).await;
                add(&mut self.hot_charged, &m.charged);
                let db = self.db.expect("created above");
                let v = verify(db, &[HOT_ACCOUNT], HOT_CREDITS, &self.hot_charged).await;
                (m, Some(v))
            }
            Scenario::DeductSpread | Scenario::DeductSpreadUnbatched => {
                let accounts = spread_accounts();
                let callers = deduct_spread_callers(&channels, callers, per, run);
                let m = self.drive(callers, accounts.len(), mode).await;
                add(&mut self.spread_charged, &m.charged);
                let db = self.db.expect("created above");
                let v = verify(db, &accounts, SPREAD_CREDITS, &self.spread_charged).await;
                (m, Some(v))
            }
            Scenario::Cost => {
                let m = self
                    .drive(cost_callers(&channels, callers, per), 0, mode)
                    .await;
                (m, None)
            }
            Scenario::CheckModule => {
                let callers = check_module_callers(&channels, callers, per);
                let m = self.drive(callers, 0, mode).await;
                (m, None)
            }
            Scenario::DeductModule => {
                let callers = deduct_module_callers(&channels, callers, per, run);
                let m = self.drive(callers, 1, mode).await;
                add(&mut self.module_charged, &m.charged);
                let db = self.db.expect("created above");
                let v = verify(db, &[MODULES_ACCOUNT], HOT_CREDITS, &self.module_charged).await;
                (m, Some(v))
            }
        };
        let label = mode.label(scenario.name());
        progress(format!(
            "{label}: {:.1} req/s, {} ok, {} errors{}",
            m.rate(),
            m.ok,
            m.error_count(),
            verification.as_ref().map_or(String::new(), |v| format!(
                ", verification {}",
                if v.passed { "passed" } else { "FAILED" }
            ))
        ));
        Ok((m, verification))
    }

    async fn drive<C: driver::Caller>(
        &self,
        callers: Vec<C>,
        accounts: usize,
        mode: Mode,
    ) -> driver::Measurement {
        match mode {
            Mode::Closed => drive(callers, accounts, self.plan).await,
            Mode::Open { target_rate } => {
                drive_open(callers, accounts, self.plan, target_rate).await
            }
        }
    }
}

/// One scenario's runs over the rounds.
struct Pooled {
    scenario: Scenario,
    total: driver::Measurement,
    /// The latest verification, or the first that failed.
    verification: Option<Verification>,
    /// Each round's throughput, in order.
    rates: Vec<f64>,
}

impl Pooled {
    fn new(scenario: Scenario, m: driver::Measurement, verification: Option<Verification>) -> Self {
        Self {
            scenario,
            rates: vec![m.rate()],
            total: m,
            verification,
        }
    }

    fn add(&mut self, m: driver::Measurement, verification: Option<Verification>) {
        self.rates.push(m.rate());
        self.total.absorb(m);
        // A later check covers every deduct so far; a failed one stays.
        if self.verification.as_ref().is_none_or(|v| v.passed) {
            self.verification = verification.or(self.verification.take());
        }
    }
}

/// Adds one run's charged counts to the running totals.
fn add(totals: &mut [u64], run: &[u64]) {
    for (total, n) in totals.iter_mut().zip(run) {
        *total += n;
    }
}

/// What module checks cost: `deduct-module` (usage, module checks on)
/// over `deduct-hot` (raw credits, none), when both ran.
fn report_module_check_cost(reports: &[ScenarioReport]) {
    let rate = |name: &str| {
        reports
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.requests_per_sec)
    };
    if let (Some(modules), Some(plain)) = (rate("deduct-module"), rate("deduct-hot"))
        && plain > 0.0
    {
        progress(format!(
            "deduct-module / deduct-hot = {:.2} (usage Deduct with module checks vs plain Deduct)",
            modules / plain
        ));
    }
}

fn addr_of(server: &Option<Running>) -> std::net::SocketAddr {
    server.as_ref().expect("started above").addr
}

/// Stops a service, as SIGTERM would; a slow drain is reported, not fatal.
async fn stop(server: Running) {
    match tokio::time::timeout(Duration::from_secs(10), server.stop()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => progress(format!("a service stopped with an error: {e}")),
        Err(_) => progress("a service did not stop within 10 s"),
    }
}
