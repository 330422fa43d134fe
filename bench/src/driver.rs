//! The load driver: N callers, each one call at a time, for a warm-up and
//! then a measured window; every response is checked.
//!
//! Two ways to drive them:
//!
//! - **closed loop** ([`drive`]): each caller starts its next call when the
//!   previous one returned; latency is measured from the call's start. This
//!   finds the peak rate, but a slow server also slows the callers, so
//!   queueing inside the server is partly hidden.
//! - **open loop** ([`drive_open`]): calls are due on a fixed schedule (call
//!   *k* at `start + k / rate`) whatever the responses; a free caller takes
//!   the next due slot, and latency is measured from the slot's *scheduled*
//!   time. When every caller is busy, slots wait, and that wait is part of
//!   their latency: a server that falls behind cannot hide its queue.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use tonic::Code;

/// One simulated client issuing calls back to back.
pub trait Caller: Send + 'static {
    /// Issues one call and checks its response.
    fn call(&mut self) -> impl Future<Output = Outcome> + Send;
}

/// What one call did.
#[derive(Debug)]
pub struct Outcome {
    /// `Ok` when the call succeeded and its response was what the scenario
    /// expects; a failure is never counted as throughput.
    pub result: Result<(), Failure>,
    /// Index of the account the server charged, if it did (deduct
    /// scenarios). Recorded even when the response failed a check, because
    /// the balance moved anyway.
    pub charged: Option<usize>,
}

impl Outcome {
    /// A successful call that charged nothing.
    pub fn ok() -> Self {
        Self {
            result: Ok(()),
            charged: None,
        }
    }

    /// A call that returned a gRPC error.
    pub fn status(status: &tonic::Status) -> Self {
        Self {
            result: Err(Failure {
                label: code_name(status.code()),
                message: status.message().to_owned(),
            }),
            charged: None,
        }
    }

    /// A call that succeeded with an unexpected response.
    pub fn invalid(message: String) -> Self {
        Self {
            result: Err(Failure {
                label: INVALID_RESPONSE,
                message,
            }),
            charged: None,
        }
    }

    /// Marks the account the server charged.
    pub fn charged(mut self, account: usize) -> Self {
        self.charged = Some(account);
        self
    }
}

/// The error label of an OK response whose content was wrong.
pub const INVALID_RESPONSE: &str = "INVALID_RESPONSE";

/// A failed call: its gRPC status name (or [`INVALID_RESPONSE`]) and message.
#[derive(Debug)]
pub struct Failure {
    /// `UNAVAILABLE`, `FAILED_PRECONDITION`, ..., or `INVALID_RESPONSE`.
    pub label: &'static str,
    /// What the server (or the check) said.
    pub message: String,
}

/// The canonical upper-case name of a gRPC status code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// How long to warm up and then measure.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Unmeasured time first (caches, pools, connections, JIT-free but
    /// allocator and page-cache warm).
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
}

/// What the callers of one scenario did, merged.
#[derive(Debug, Default)]
pub struct Measurement {
    /// Successful calls started inside the measured window.
    pub ok: u64,
    /// From the start of the measured window until the last caller's last
    /// call returned (callers start no call after the window closes, but
    /// finish the one in flight).
    pub elapsed: Duration,
    /// Latencies of the successful measured calls, sorted, in nanoseconds.
    pub latencies_ns: Vec<u64>,
    /// Failed measured calls by label.
    pub errors: BTreeMap<&'static str, u64>,
    /// One message per failure label, to say what went wrong.
    pub error_samples: BTreeMap<&'static str, String>,
    /// Calls started during the warm-up, successful or not.
    pub warmup_calls: u64,
    /// Failed warm-up calls by label.
    pub warmup_errors: BTreeMap<&'static str, u64>,
    /// Per account index: how many calls the server charged, warm-up
    /// included (for the balance verification).
    pub charged: Vec<u64>,
    /// Open loop only: how late the measured calls started after their
    /// scheduled time (timer resolution, and waiting for a free caller),
    /// sorted, in nanoseconds. Already included in `latencies_ns`.
    pub start_lags_ns: Vec<u64>,
}

impl Measurement {
    /// Successful measured calls per second.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    /// Failed measured calls.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The latency at percentile `p` (nearest rank), if any call succeeded.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        nearest_rank(&self.latencies_ns, p)
    }

    /// The slowest successful call.
    pub fn max(&self) -> Option<Duration> {
        self.latencies_ns.last().map(|&ns| Duration::from_nanos(ns))
    }

    /// Open loop: the start lag at percentile `p` (nearest rank).
    pub fn start_lag(&self, p: f64) -> Option<Duration> {
        nearest_rank(&self.start_lags_ns, p)
    }

    /// Pools another run of the same scenario into this one: calls,
    /// failures and measured time add up, latencies are merged.
    pub fn absorb(&mut self, other: Measurement) {
        self.ok += other.ok;
        self.elapsed += other.elapsed;
        self.latencies_ns.extend(other.latencies_ns);
        self.latencies_ns.sort_unstable();
        self.start_lags_ns.extend(other.start_lags_ns);
        self.start_lags_ns.sort_unstable();
        merge(&mut self.errors, other.errors);
        for (label, message) in other.error_samples {
            self.error_samples.entry(label).or_insert(message);
        }
        self.warmup_calls += other.warmup_calls;
        merge(&mut self.warmup_errors, other.warmup_errors);
        if self.charged.len() < other.charged.len() {
            self.charged.resize(other.charged.len(), 0);
        }
        for (sum, n) in self.charged.iter_mut().zip(other.charged) {
            *sum += n;
        }
    }
}

fn nearest_rank(sorted_ns: &[u64], p: f64) -> Option<Duration> {
    let n = sorted_ns.len();
    if n == 0 {
        return None;
    }
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    Some(Duration::from_nanos(sorted_ns[rank.clamp(1, n) - 1]))
}

/// Runs `callers` concurrently (one task each) for `plan`, closed loop;
/// `accounts` is the number of account indexes a caller may report as
/// charged.
pub async fn drive<C: Caller>(callers: Vec<C>, accounts: usize, plan: Plan) -> Measurement {
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let until = measure_from + plan.duration;
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|caller| tokio::spawn(run_caller(caller, accounts, measure_from, until)))
        .collect();
    collect(tasks, accounts, measure_from).await
}

/// Runs `callers` open loop for `plan`: calls are due at `rate` per second
/// from the start of the warm-up, each taken by whichever caller is free;
/// latency counts from the scheduled time. `callers.len()` bounds the calls
/// in flight.
pub async fn drive_open<C: Caller>(
    callers: Vec<C>,
    accounts: usize,
    plan: Plan,
    rate: f64,
) -> Measurement {
    assert!(rate > 0.0 && rate.is_finite(), "rate must be positive");
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let until = measure_from + plan.duration;
    let schedule = Schedule::start(start, rate, until);
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|caller| {
            tokio::spawn(run_open_caller(
                caller,
                accounts,
                schedule.clone(),
                measure_from,
            ))
        })
        .collect();
    let mut total = collect(tasks, accounts, measure_from).await;
    // The calls due in the window, over the window (or longer, when the
    // last ones ran over): a last call that finished early does not make
    // the window shorter.
    total.elapsed = total.elapsed.max(plan.duration);
    total.start_lags_ns.sort_unstable();
    total
}

/// The open-loop schedule: slot `k` is due at `start + k × interval`.
///
/// A dedicated OS thread releases each slot when it falls due (sleeping on
/// the kernel's high-resolution timer with its timer slack cut to 1 ns), and
/// callers take released slots from a channel. Tokio's own timer fires on a
/// 1 ms wheel: with it every call started up to a millisecond late (0.6–1 ms
/// at p50 when measured), which is the load generator's error, not the
/// server's queueing, and it went straight into every latency.
#[derive(Clone)]
struct Schedule {
    due: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Instant>>>,
}

/// How many released slots may wait for a free caller before the clock
/// thread waits too (the slots keep their due times, so the wait still
/// counts in their latency).
const RELEASED_SLOTS: usize = 64 * 1024;

impl Schedule {
    /// Starts releasing slots at `rate` per second from `start`; the last
    /// slot is the last one due before `until`.
    fn start(start: Instant, rate: f64, until: Instant) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(RELEASED_SLOTS);
        let interval_ns = 1e9 / rate;
        std::thread::Builder::new()
            .name("open-loop-clock".into())
            .spawn(move || {
                precise_sleeps();
                for k in 0u64.. {
                    let due = start + Duration::from_nanos((k as f64 * interval_ns) as u64);
                    if due >= until {
                        break;
                    }
                    wait_until(due);
                    if tx.blocking_send(due).is_err() {
                        break; // every caller is gone
                    }
                }
            })
            .expect("start the open-loop clock thread");
        Self {
            due: Arc::new(tokio::sync::Mutex::new(rx)),
        }
    }

    /// The next released slot's due time; `None` once the schedule is over.
    async fn next(&self) -> Option<Instant> {
        self.due.lock().await.recv().await
    }
}

/// Blocks the calling (clock) thread until `due`.
fn wait_until(due: Instant) {
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

/// Makes this thread's sleeps end within a few µs of their deadline: Linux
/// otherwise lets a timer fire up to 50 µs late (the default timer slack) to
/// coalesce wake-ups. Best effort (elsewhere, or if refused, the slack
/// stays); spinning instead would take CPU from the servers under test on a
/// small machine.
fn precise_sleeps() {
    let _ = std::fs::write("/proc/thread-self/timerslack_ns", "1");
}

async fn collect(
    tasks: Vec<tokio::task::JoinHandle<CallerStats>>,
    accounts: usize,
    measure_from: Instant,
) -> Measurement {
    let mut total = Measurement {
        charged: vec![0; accounts],
        ..Default::default()
    };
    let mut last_finish = measure_from;
    for task in tasks {
        let stats = task.await.expect("a benchmark caller task panicked");
        last_finish = last_finish.max(stats.finished);
        total.ok += stats.ok;
        total.latencies_ns.extend(stats.latencies_ns);
        total.start_lags_ns.extend(stats.start_lags_ns);
        total.warmup_calls += stats.warmup_calls;
        merge(&mut total.errors, stats.errors);
        merge(&mut total.warmup_errors, stats.warmup_errors);
        for (label, message) in stats.error_samples {
            total.error_samples.entry(label).or_insert(message);
        }
        for (sum, n) in total.charged.iter_mut().zip(stats.charged) {
            *sum += n;
        }
    }
    total.elapsed = last_finish.saturating_duration_since(measure_from);
    total.latencies_ns.sort_unstable();
    total
}

fn merge(into: &mut BTreeMap<&'static str, u64>, from: BTreeMap<&'static str, u64>) {
    for (label, n) in from {
        *into.entry(label).or_default() += n;
    }
}

/// One caller's share of a [`Measurement`].
struct CallerStats {
    ok: u64,
    latencies_ns: Vec<u64>,
    start_lags_ns: Vec<u64>,
    errors: BTreeMap<&'static str, u64>,
    error_samples: BTreeMap<&'static str, String>,
    warmup_calls: u64,
    warmup_errors: BTreeMap<&'static str, u64>,
    charged: Vec<u64>,
    finished: Instant,
}

impl CallerStats {
    fn new(accounts: usize, measure_from: Instant) -> Self {
        Self {
            ok: 0,
            latencies_ns: Vec::with_capacity(16 * 1024),
            start_lags_ns: Vec::new(),
            errors: BTreeMap::new(),
            error_samples: BTreeMap::new(),
            warmup_calls: 0,
            warmup_errors: BTreeMap::new(),
            charged: vec![0; accounts],
            finished: measure_from,
        }
    }

    /// Counts one call; `measured` says whether it belongs to the window.
    fn record(&mut self, outcome: Outcome, latency: Duration, measured: bool) {
        if let Some(account) = outcome.charged {
            self.charged[account] += 1;
        }
        match outcome.result {
            Ok(()) if measured => {
                self.ok += 1;
                self.latencies_ns.push(nanos(latency));
            }
            Ok(()) => self.warmup_calls += 1,
            Err(failure) if measured => {
                *self.errors.entry(failure.label).or_default() += 1;
                self.error_samples
                    .entry(failure.label)
                    .or_insert(failure.message);
            }
            Err(failure) => {
                self.warmup_calls += 1;
                *self.warmup_errors.entry(failure.label).or_default() += 1;
                self.error_samples
                    .entry(failure.label)
                    .or_insert(failure.message);
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

async fn run_caller<C: Caller>(
    mut caller: C,
    accounts: usize,
    measure_from: Instant,
    until: Instant,
) -> CallerStats {
    let mut stats = CallerStats::new(accounts, measure_from);
    loop {
        let began = Instant::now();
        if began >= until {
            break;
        }
        let outcome = caller.call().await;
        stats.record(outcome, began.elapsed(), began >= measure_from);
    }
    stats.finished = Instant::now();
    stats
}

async fn run_open_caller<C: Caller>(
    mut caller: C,
    accounts: usize,
    schedule: Schedule,
    measure_from: Instant,
) -> CallerStats {
    let mut stats = CallerStats::new(accounts, measure_from);
    while let Some(due) = schedule.next().await {
        let measured = due >= measure_from;
        if measured {
            stats.start_lags_ns.push(nanos(due.elapsed()));
        }
        let outcome = caller.call().await;
        // From the scheduled time, not from when the call could start.
        stats.record(outcome, due.elapsed(), measured);
    }
    stats.finished = Instant::now();
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Flaky {
        n: u64,
    }

    impl Caller for Flaky {
        async fn call(&mut self) -> Outcome {
            self.n += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
            match self.n % 4 {
                0 => Outcome::status(&tonic::Status::unavailable("down")),
                1 => Outcome::invalid("wrong".into()).charged(0),
                _ => Outcome::ok().charged(1),
            }
        }
    }

    #[tokio::test]
    async fn failures_are_counted_by_code_and_never_as_throughput() {
        let plan = Plan {
            warmup: Duration::ZERO,
            duration: Duration::from_millis(100),
        };
        let m = drive(vec![Flaky { n: 0 }, Flaky { n: 0 }], 2, plan).await;
        let total = m.ok + m.error_count();
        assert!(total > 8, "{total} calls");
        assert_eq!(m.latencies_ns.len() as u64, m.ok);
        assert_eq!(
            m.errors.keys().copied().collect::<Vec<_>>(),
            [INVALID_RESPONSE, "UNAVAILABLE"]
        );
        assert_eq!(m.error_samples["UNAVAILABLE"], "down");
        // Charged calls are tracked whether or not the response passed.
        assert_eq!(m.charged[1], m.ok);
        assert_eq!(m.charged[0], m.errors[INVALID_RESPONSE]);
        assert!(m.elapsed >= plan.duration);
    }

    /// Takes 10 ms per call, whatever the schedule.
    struct Slow;

    impl Caller for Slow {
        async fn call(&mut self) -> Outcome {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Outcome::ok()
        }
    }

    #[tokio::test]
    async fn open_loop_counts_queueing_from_the_scheduled_start() {
        // 1,000 calls/s due for 100 ms, one caller needing 10 ms each: the
        // 100 due calls all run, one after the other, and the last one
        // starts ~900 ms after it was due. A closed loop would report 10 ms.
        let plan = Plan {
            warmup: Duration::ZERO,
            duration: Duration::from_millis(100),
        };
        let m = drive_open(vec![Slow], 0, plan, 1000.0).await;
        assert_eq!(m.ok, 100, "every scheduled call runs, late or not");
        assert_eq!(m.start_lags_ns.len(), 100);
        // Call k is due at k ms and cannot finish before 10 (k + 1) ms.
        assert!(m.max().unwrap() >= Duration::from_millis(900), "{m:?}");
        assert!(m.start_lag(100.0).unwrap() >= Duration::from_millis(800));
        assert!(m.elapsed >= Duration::from_millis(1000));
    }

    #[tokio::test]
    async fn open_loop_issues_exactly_the_scheduled_calls() {
        // 2,000/s for 50 ms of warm-up and 100 ms measured: 100 + 200 slots.
        let plan = Plan {
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(100),
        };
        let callers = (0..4).map(|_| Flaky { n: 0 }).collect();
        let m = drive_open(callers, 2, plan, 2000.0).await;
        assert_eq!(m.ok + m.error_count(), 200, "{m:?}");
        assert_eq!(m.warmup_calls, 100);
        assert!(m.elapsed >= plan.duration, "the window is never shorter");
        assert_eq!(m.latencies_ns.len() as u64, m.ok);
        let unavailable = m.errors.get("UNAVAILABLE").copied().unwrap_or(0)
            + m.warmup_errors.get("UNAVAILABLE").copied().unwrap_or(0);
        assert_eq!(m.charged.iter().sum::<u64>(), 300 - unavailable);
    }

    #[test]
    fn pooled_runs_add_up() {
        let run = |ok: u64, ms: u64, latencies: &[u64]| Measurement {
            ok,
            elapsed: Duration::from_millis(ms),
            latencies_ns: latencies.to_vec(),
            errors: BTreeMap::from([("UNAVAILABLE", 1)]),
            charged: vec![ok],
            ..Default::default()
        };
        let mut pooled = run(2, 1000, &[5, 9]);
        pooled.absorb(run(3, 500, &[1, 7, 8]));
        assert_eq!(pooled.ok, 5);
        assert_eq!(pooled.elapsed, Duration::from_millis(1500));
        assert_eq!(pooled.latencies_ns, [1, 5, 7, 8, 9]);
        assert_eq!(pooled.errors["UNAVAILABLE"], 2);
        assert_eq!(pooled.charged, [5]);
        // 5 calls over 1.5 s: the rate of the pooled time, not a mean of
        // the two runs' rates (2/s and 6/s).
        assert!((pooled.rate() - 5.0 / 1.5).abs() < 1e-9);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let m = Measurement {
            latencies_ns: (1..=100).map(|ms| ms * 1_000_000).collect(),
            ..Default::default()
        };
        assert_eq!(m.percentile(50.0), Some(Duration::from_millis(50)));
        assert_eq!(m.percentile(99.0), Some(Duration::from_millis(99)));
        assert_eq!(m.percentile(100.0), Some(Duration::from_millis(100)));
        assert_eq!(m.max(), Some(Duration::from_millis(100)));
        assert_eq!(Measurement::default().percentile(50.0), None);
    }
}
