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
//! ```

mod baseline;
mod cli;
mod driver;
mod report;
mod scenarios;

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use igny8_tests::{
    Running, TestDb, spawn_billing_with, spawn_billing_with_options, spawn_settings_with,
    test_config,
};

use crate::{
    baseline::Baseline,
    cli::{Args, Scenario},
    driver::{Plan, drive},
    report::{Report, ScenarioReport},
    scenarios::{
        HOT_ACCOUNT, HOT_CREDITS, MODULES_ACCOUNT, SPREAD_CREDITS, baseline_callers,
        check_module_callers, connect, cost_callers, deduct_hot_callers, deduct_module_callers,
        deduct_spread_callers, seed_hot, seed_modules, seed_spread, spread_accounts, verify,
    },
};

fn main() -> ExitCode {
    let args = Args::parse();
    install_panic_hook();
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
    let callers = args.concurrency as usize;
    let per = args.callers_per_connection as usize;
    let connections = args.connections();
    let plan = Plan {
        warmup: args.warmup,
        duration: args.duration,
    };
    let wants = |s: Scenario| scenarios.contains(&s);
    let needs_hot =
        wants(Scenario::DeductHot) || wants(Scenario::Cost) || wants(Scenario::CheckModule);
    let needs_spread = wants(Scenario::DeductSpread);
    let needs_billing =
        wants(Scenario::DeductHot) || wants(Scenario::DeductSpread) || wants(Scenario::Cost);
    let needs_modules = wants(Scenario::DeductModule);
    let needs_settings = wants(Scenario::CheckModule) || needs_modules;

    let db = if needs_billing || needs_settings {
        progress(format!("creating a fresh {} database", args.backend.name()));
        let db = TestDb::new(args.backend.harness()).await;
        if needs_hot {
            seed_hot(&db, callers).await;
        }
        if needs_modules {
            seed_modules(&db, callers).await;
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
        config.limits.max_in_flight = config.limits.max_in_flight.max(callers);
        config
    };
    let billing = match &db {
        Some(db) if needs_billing => Some(spawn_billing_with(config(&db.url)).await),
        _ => None,
    };
    let settings = match &db {
        Some(db) if needs_settings => Some(spawn_settings_with(config(&db.url)).await),
        _ => None,
    };
    // A second billing server with module checks on, asking `settings`.
    let billing_modules = match (&db, &settings) {
        (Some(db), Some(settings)) if needs_modules => Some(
            spawn_billing_with_options(
                test_config(&db.url),
                billing_svc::BillingOptions {
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

    let mut reports = Vec::with_capacity(scenarios.len());
    for scenario in scenarios.iter().copied() {
        progress(format!(
            "{}: {callers} callers on {connections} connection(s), {:?} warm-up + {:?} measured",
            scenario.name(),
            plan.warmup,
            plan.duration
        ));
        let report = match scenario {
            Scenario::Baseline => {
                let addr = baseline.as_ref().expect("started above").addr;
                let channels = connect(addr, connections).await?;
                let m = drive(baseline_callers(&channels, callers, per), 0, plan).await;
                ScenarioReport::new(scenario.name(), scenario.rpc(), m, None)
            }
            Scenario::DeductHot => {
                let channels = connect(addr_of(&billing), connections).await?;
                let m = drive(deduct_hot_callers(&channels, callers, per), 1, plan).await;
                let db = db.as_ref().expect("created above");
                let v = verify(db, &[HOT_ACCOUNT], HOT_CREDITS, &m.charged).await;
                ScenarioReport::new(scenario.name(), scenario.rpc(), m, Some(v))
            }
            Scenario::DeductSpread => {
                let channels = connect(addr_of(&billing), connections).await?;
                let accounts = spread_accounts();
                let callers = deduct_spread_callers(&channels, callers, per);
                let m = drive(callers, accounts.len(), plan).await;
                let db = db.as_ref().expect("created above");
                let v = verify(db, &accounts, SPREAD_CREDITS, &m.charged).await;
                ScenarioReport::new(scenario.name(), scenario.rpc(), m, Some(v))
            }
            Scenario::Cost => {
                let channels = connect(addr_of(&billing), connections).await?;
                let m = drive(cost_callers(&channels, callers, per), 0, plan).await;
                ScenarioReport::new(scenario.name(), scenario.rpc(), m, None)
            }
            Scenario::CheckModule => {
                let channels = connect(addr_of(&settings), connections).await?;
                let m = drive(check_module_callers(&channels, callers, per), 0, plan).await;
                ScenarioReport::new(scenario.name(), scenario.rpc(), m, None)
            }
            Scenario::DeductModule => {
                let channels = connect(addr_of(&billing_modules), connections).await?;
                let m = drive(deduct_module_callers(&channels, callers, per), 1, plan).await;
                let db = db.as_ref().expect("created above");
                let v = verify(db, &[MODULES_ACCOUNT], HOT_CREDITS, &m.charged).await;
                ScenarioReport::new(scenario.name(), scenario.rpc(), m, Some(v))
            }
        };
        progress(format!(
            "{}: {:.1} req/s, {} ok, {} errors{}",
            report.name,
            report.requests_per_sec,
            report.requests,
            report.error_count,
            report
                .verification
                .as_ref()
                .map_or(String::new(), |v| format!(
                    ", verification {}",
                    if v.passed { "passed" } else { "FAILED" }
                ))
        ));
        reports.push(report);
    }

    report_module_check_cost(&reports);

    // Stop the servers before the database goes away with `db`.
    for server in [billing, billing_modules, settings].into_iter().flatten() {
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
        reports,
    ))
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
