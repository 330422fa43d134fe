//! Keeps the benchmark working: the built `igny8-bench` binary runs every
//! scenario for one second on both backends and its JSON is checked for
//! structure, zero errors and exact balances. No timing assertions: the
//! numbers themselves are only ever compared within one run.

use std::process::Command;

use serde_json::Value;

const ALL: &str = "baseline,deduct-hot,deduct-hot-unbatched,deduct-spread,deduct-spread-unbatched,cost,check-module,deduct-module";

/// Runs the binary briefly with `--json` and parses what it printed.
fn bench(backend: &str, scenarios: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_igny8-bench"))
        .args(["--backend", backend, "--scenarios", scenarios])
        .args(["--duration", "1s", "--warmup", "0s", "--concurrency", "4"])
        .arg("--json")
        .output()
        .expect("igny8-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "igny8-bench --backend {backend} --scenarios {scenarios} exited with {}:\n{stderr}",
        out.status
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}):\n{}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn number(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("`{field}` is not a number in {v:#}"))
}

/// One scenario's entry: work done, nothing failed, percentiles ordered,
/// deducts verified exactly.
fn assert_scenario_sound(s: &Value) {
    let name = s["name"].as_str().expect("scenario name");
    assert!(s["rpc"].as_str().is_some_and(|r| r.contains('/')), "{s:#}");
    assert!(
        number(s, "requests") > 0.0,
        "{name} made no successful call: {s:#}"
    );
    assert!(number(s, "requests_per_sec") > 0.0, "{s:#}");
    assert!(number(s, "elapsed_secs") >= 1.0, "{s:#}");
    assert_eq!(s["error_count"], 0, "{name} had errors: {s:#}");
    assert_eq!(s["errors"], serde_json::json!({}), "{s:#}");
    assert_eq!(s["warmup_errors"], serde_json::json!({}), "{s:#}");

    let l = &s["latency_ms"];
    let (p50, p90, p99, max) = (
        number(l, "p50"),
        number(l, "p90"),
        number(l, "p99"),
        number(l, "max"),
    );
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max, "{l}");

    if name.starts_with("deduct-") {
        let v = &s["verification"];
        assert_eq!(v["passed"], true, "{name}: {v:#}");
        // deduct-hot and deduct-module charge one account; deduct-spread
        // spreads over 1,000.
        let accounts = if name.starts_with("deduct-spread") {
            1000
        } else {
            1
        };
        assert_eq!(v["accounts"], accounts, "{v:#}");
        // Every measured success was a deduct the server acknowledged.
        assert!(
            number(v, "successful_deducts") >= number(s, "requests"),
            "{s:#}"
        );
    } else {
        assert!(s["verification"].is_null(), "{s:#}");
    }
}

/// The run-level fields of a `--concurrency 4` run.
fn assert_run_sound(report: &Value, backend: &str, scenarios: &[&str]) {
    assert_eq!(report["tool"], "igny8-bench");
    assert_eq!(report["backend"], backend);
    assert_eq!(report["concurrency"], 4);
    assert_eq!(report["connections"], 1, "4 callers fit on one connection");
    assert_eq!(report["duration_secs"], 1.0);
    assert_eq!(report["warmup_secs"], 0.0);
    assert!(number(report, "cpus") >= 1.0);
    assert_eq!(report["verification_passed"], true, "{report:#}");
    let names: Vec<&str> = report["scenarios"]
        .as_array()
        .expect("scenarios array")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, scenarios);
    for s in report["scenarios"].as_array().expect("scenarios") {
        assert_scenario_sound(s);
    }
}

/// One scenario alone: no baseline in the run, so no ratio (except for
/// baseline itself, which is 1).
fn scenario_alone(backend: &str, scenario: &str) {
    let report = bench(backend, scenario);
    assert_run_sound(&report, backend, &[scenario]);
    let ratio = &report["scenarios"][0]["ratio_to_baseline"];
    if scenario == "baseline" {
        assert_eq!(ratio, 1.0);
    } else {
        assert!(ratio.is_null(), "{ratio}");
    }
}

macro_rules! each_scenario {
    ($backend:ident) => {
        mod $backend {
            #[test]
            fn baseline() {
                super::scenario_alone(stringify!($backend), "baseline");
            }
            #[test]
            fn deduct_hot() {
                super::scenario_alone(stringify!($backend), "deduct-hot");
            }
            #[test]
            fn deduct_hot_unbatched() {
                super::scenario_alone(stringify!($backend), "deduct-hot-unbatched");
            }
            #[test]
            fn deduct_spread_unbatched() {
                super::scenario_alone(stringify!($backend), "deduct-spread-unbatched");
            }
            #[test]
            fn deduct_spread() {
                super::scenario_alone(stringify!($backend), "deduct-spread");
            }
            #[test]
            fn cost() {
                super::scenario_alone(stringify!($backend), "cost");
            }
            #[test]
            fn check_module() {
                super::scenario_alone(stringify!($backend), "check-module");
            }

            #[test]
            fn deduct_module() {
                super::scenario_alone(stringify!($backend), "deduct-module");
            }
        }
    };
}

each_scenario!(sqlite);
each_scenario!(postgres);

#[test]
fn one_run_of_every_scenario_reports_ratios_to_its_own_baseline() {
    let report = bench("sqlite", ALL);
    let names: Vec<&str> = ALL.split(',').collect();
    assert_run_sound(&report, "sqlite", &names);
    for s in report["scenarios"].as_array().expect("scenarios") {
        let ratio = number(s, "ratio_to_baseline");
        let expected =
            number(s, "requests_per_sec") / number(&report["scenarios"][0], "requests_per_sec");
        assert!((ratio - expected).abs() < 1e-9, "{s:#}");
    }
    // Batched vs one request per transaction, for both deduct scenarios.
    let gains = report["batching_gains"].as_array().expect("batching_gains");
    let scenarios: Vec<&str> = gains
        .iter()
        .map(|g| g["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(scenarios, ["deduct-hot", "deduct-spread"]);
    for g in gains {
        let expected = number(g, "batched_per_sec") / number(g, "unbatched_per_sec");
        assert!((number(g, "ratio") - expected).abs() < 1e-9, "{g:#}");
    }
}

/// Runs the binary with extra arguments and parses its JSON.
fn bench_with(backend: &str, scenarios: &str, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_igny8-bench"))
        .args(["--backend", backend, "--scenarios", scenarios])
        .args(["--duration", "1s", "--warmup", "0s", "--concurrency", "4"])
        .args(extra)
        .arg("--json")
        .output()
        .expect("igny8-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}:\n{stderr}", out.status);
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

#[test]
fn open_loop_at_a_fixed_rate() {
    let report = bench_with(
        "sqlite",
        "baseline,cost",
        &["--rate", "200", "--max-in-flight", "16"],
    );
    for s in report["scenarios"].as_array().expect("scenarios") {
        assert_eq!(s["load"]["mode"], "open", "{s:#}");
        assert_eq!(s["load"]["target_rate"], 200.0, "{s:#}");
        assert_scenario_sound(s);
        // 200/s for 1 s: exactly 200 calls were due in the window.
        assert_eq!(
            number(s, "requests") + number(s, "error_count"),
            200.0,
            "{s:#}"
        );
        let lag = &s["start_lag_ms"];
        assert!(number(lag, "p50") <= number(lag, "p99"), "{lag}");
        // No closed-loop baseline: no ratio.
        assert!(s["ratio_to_baseline"].is_null(), "{s:#}");
    }
}

/// Each row's scenario name and load mode (`closed` or `open`), in order.
fn rows(scenarios: &[Value]) -> Vec<(&str, &str)> {
    scenarios
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap(),
                s["load"]["mode"].as_str().unwrap(),
            )
        })
        .collect()
}

#[test]
fn open_loop_at_half_the_measured_peak() {
    let report = bench_with("sqlite", "deduct-hot,cost", &["--open-loop-at-half-peak"]);
    let s = report["scenarios"].as_array().expect("scenarios");
    let rows = rows(s);
    // Only the deduct scenario gets the extra open-loop run.
    assert_eq!(
        rows,
        [
            ("deduct-hot", "closed"),
            ("deduct-hot", "open"),
            ("cost", "closed")
        ]
    );
    let peak = number(&s[0], "requests_per_sec");
    assert!((number(&s[1]["load"], "target_rate") - peak / 2.0).abs() < 1e-9);
    for row in s {
        assert_scenario_sound(row);
    }
    // The second run's deducts are verified on top of the first run's.
    assert!(
        number(&s[1]["verification"], "successful_deducts")
            >= number(&s[0]["verification"], "successful_deducts") + number(&s[1], "requests")
    );
    assert_eq!(report["verification_passed"], true);
}

#[test]
fn rounds_run_interleaved_and_pool_into_one_row_per_scenario() {
    let report = bench_with(
        "sqlite",
        "baseline,deduct-hot,cost,deduct-module",
        &["--rounds", "2", "--open-loop-at-half-peak"],
    );
    assert_eq!(report["rounds"], 2);
    let s = report["scenarios"].as_array().expect("scenarios");
    let rows = rows(s);
    // One pooled row per scenario; the open-loop row runs once, after.
    assert_eq!(
        rows,
        [
            ("baseline", "closed"),
            ("deduct-hot", "closed"),
            ("deduct-hot", "open"),
            ("cost", "closed"),
            ("deduct-module", "closed")
        ]
    );
    for row in s {
        // Sound: also no replayed key in a later round.
        assert_scenario_sound(row);
        let rounds = row["rounds_per_sec"].as_array().expect("rounds_per_sec");
        if row["load"]["mode"] == "closed" {
            // Two 1 s rounds: pooled over about 2 s, between the two rates.
            assert_eq!(rounds.len(), 2, "{row:#}");
            assert!(number(row, "elapsed_secs") >= 2.0, "{row:#}");
            let rates: Vec<f64> = rounds.iter().map(|r| r.as_f64().unwrap()).collect();
            let pooled = number(row, "requests_per_sec");
            let (lo, hi) = (rates[0].min(rates[1]), rates[0].max(rates[1]));
            assert!(lo * 0.999 <= pooled && pooled <= hi * 1.001, "{row:#}");
        } else {
            assert!(rounds.is_empty(), "{row:#}");
            let peak = number(&s[1], "requests_per_sec");
            assert!((number(&row["load"], "target_rate") - peak / 2.0).abs() < 1e-9);
        }
    }
    // Both rounds' deducts are in the verified balance.
    assert!(number(&s[1]["verification"], "successful_deducts") >= number(&s[1], "requests"));
    assert_eq!(report["verification_passed"], true);
}

/// Runs the binary with `args`, which it must refuse; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_igny8-bench"))
        .args(args)
        .output()
        .expect("igny8-bench runs");
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_arguments_are_refused_with_a_clear_message() {
    let stderr = refused(&["--scenarios", "baseline,deduct-everything"]);
    assert!(
        stderr.contains("deduct-everything") && stderr.contains("deduct-hot"),
        "{stderr}"
    );
    let stderr = refused(&["--duration", "0s"]);
    assert!(
        stderr.contains("--duration") && stderr.contains("greater than zero"),
        "{stderr}"
    );
    let stderr = refused(&["--rounds", "0"]);
    assert!(
        stderr.contains("--rounds") && stderr.contains("1..=20"),
        "{stderr}"
    );
}
