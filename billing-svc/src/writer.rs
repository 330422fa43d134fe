//! The batching ledger writer: one database transaction for many balance
//! changes.
//!
//! Every request that changes a balance or a hold (Deduct, Grant, Reserve,
//! CaptureHold, ReleaseHold, Refund) is queued here. A writer task per shard
//! of accounts (all of them on one thread and runtime of their own, see
//! [`Writer::start_with_clock`]) takes whatever is waiting (up to
//! `max_batch`; no timer: while one batch commits the next one gathers) and
//! applies it in **one** transaction with a constant number of statements:
//!
//! 1. lock the batch's accounts, in id order (`SELECT … FOR UPDATE` on
//!    PostgreSQL; `BEGIN IMMEDIATE` on SQLite), so batches of several
//!    replicas never deadlock;
//! 2. sweep the accounts' expired holds (only when some account holds any);
//! 3. look up every idempotency key, hold and refunded row the batch names;
//! 4. decide each request in arrival order against a running balance in
//!    memory ([`decide`], pure and unit-tested);
//! 5. write all new ledger rows with one multi-row insert, all new holds with
//!    another, update changed holds and accounts with one statement each, and
//!    (PostgreSQL) `pg_notify` once per changed account;
//! 6. commit, then answer every caller.
//!
//! If the transaction fails, nothing in it is acknowledged: a batch of
//! several is retried one request per transaction (so one poisoned request
//! cannot fail its neighbours), and what still fails answers UNAVAILABLE
//! ("nothing changed, retry with the same key"), which a client retry then
//! makes exactly-once through the idempotency key.
//!
//! Bounds: each shard's queue holds at most `queue_capacity` requests and one
//! account at most `account_share` of them; past either the request is
//! refused at once with RESOURCE_EXHAUSTED. A caller that gives up (deadline,
//! cancellation) before its batch starts is dropped from the batch.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use igny8_db::{Backend, BeginWrite, Db, on_pool};
use sqlx::pool::PoolConnection;
use tokio::sync::{mpsc, oneshot};

use crate::{
    error::BillingError,
    hold_columns,
    ledger::{Entry, HoldRow, HoldState, Kind, LedgerRow, micros},
    ledger_columns,
};

/// How the writer batches and bounds its work.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Most requests applied in one transaction (`IGNY8_LEDGER_MAX_BATCH`).
    pub max_batch: usize,
    /// Writer tasks, each owning a shard of accounts (`account % shards`)
    /// and using one connection at a time (`IGNY8_LEDGER_SHARDS`).
    pub shards: usize,
    /// Requests waiting per shard before new ones are refused
    /// (`IGNY8_LEDGER_QUEUE`).
    pub queue_capacity: usize,
    /// Requests one account may have waiting per shard
    /// (`IGNY8_LEDGER_ACCOUNT_SHARE`).
    pub account_share: usize,
}

/// Default `max_batch`: chosen by measurement (README "Benchmarks"). One
/// account under 128–256 concurrent deducts ran at 12–14k/s with batches of
/// at most 32 and collapsed to 1.5–5k/s with 64 or 128 (each batch's
/// statements stayed under 5 ms in the database; the time went between
/// them), while 32 concurrent callers ran alike with 32 or 128.
pub const DEFAULT_MAX_BATCH: usize = 32;
/// Default writer tasks on PostgreSQL (`IGNY8_LEDGER_SHARDS`).
pub const DEFAULT_POSTGRES_SHARDS: usize = 2;
/// Largest `max_batch` accepted: keeps every batch statement within
/// SQLite's expression-depth and bound-parameter limits.
pub const MAX_BATCH_LIMIT: usize = 512;
/// Default queue bound per shard.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;
/// Default per-account share of a shard's queue.
pub const DEFAULT_ACCOUNT_SHARE: usize = 1024;

impl WriterConfig {
    /// The defaults for a backend: two shards on PostgreSQL, so unrelated
    /// accounts are written in parallel (more concurrent batches than that
    /// measured slower on a 2-core machine: each batch's fixed cost is paid
    /// more often for smaller batches; README "Benchmarks"); one on SQLite,
    /// which has one writer anyway.
    pub fn for_backend(backend: Backend) -> Self {
        Self {
            max_batch: DEFAULT_MAX_BATCH,
            shards: match backend {
                Backend::Postgres => DEFAULT_POSTGRES_SHARDS,
                Backend::Sqlite => 1,
            },
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            account_share: DEFAULT_ACCOUNT_SHARE,
        }
    }

    /// The defaults for `backend`, overridden by `IGNY8_LEDGER_MAX_BATCH`,
    /// `IGNY8_LEDGER_SHARDS`, `IGNY8_LEDGER_QUEUE` and
    /// `IGNY8_LEDGER_ACCOUNT_SHARE` from `lookup`.
    pub fn from_lookup(
        backend: Backend,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let mut config = Self::for_backend(backend);
        let read = |name: &str, default: usize, max: usize| -> Result<usize, String> {
            match lookup(name).filter(|v| !v.trim().is_empty()) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) if (1..=max).contains(&n) => Ok(n),
                    _ => Err(format!(
                        "{name}: expected a whole number from 1 to {max}, got {v:?}"
                    )),
                },
            }
        };
        config.max_batch = read("IGNY8_LEDGER_MAX_BATCH", config.max_batch, MAX_BATCH_LIMIT)?;
        config.shards = read("IGNY8_LEDGER_SHARDS", config.shards, 64)?;
        config.queue_capacity = read("IGNY8_LEDGER_QUEUE", config.queue_capacity, 1_000_000)?;
        config.account_share = read(
            "IGNY8_LEDGER_ACCOUNT_SHARE",
            config.account_share.min(config.queue_capacity),
            config.queue_capacity,
        )?;
        Ok(config)
    }
}

/// A reservation to place.
#[derive(Debug, Clone)]
pub struct NewHold {
    /// Credits to hold (> 0).
    pub credits: i64,
    /// Canonical operation or empty.
    pub operation: String,
    /// Quantity priced or 0.
    pub quantity: u64,
    /// Description.
    pub description: String,
    /// Caller metadata.
    pub metadata: BTreeMap<String, String>,
    /// Reserve idempotency key.
    pub idempotency_key: String,
    /// Request fingerprint.
    pub request_hash: String,
    /// Who asks.
    pub actor: String,
    /// Lifetime.
    pub ttl: Duration,
}

/// How much of a hold to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureAmount {
    /// Credits to charge (> 0).
    pub credits: i64,
    /// The operation priced, when the amount came from usage.
    pub operation: Option<String>,
    /// The quantity priced, when the amount came from usage.
    pub quantity: u64,
}

/// A refund to give.
#[derive(Debug, Clone)]
pub struct NewRefund {
    /// The DEDUCT or CAPTURE row refunded.
    pub transaction_id: i64,
    /// Credits to give back; 0 = all that is left.
    pub credits: i64,
    /// Refund idempotency key.
    pub idempotency_key: String,
    /// Request fingerprint.
    pub request_hash: String,
    /// Why.
    pub reason: String,
    /// Who.
    pub actor: String,
}

/// One request to the writer.
#[derive(Debug, Clone)]
pub enum Op {
    /// A deduction or grant.
    Change(Entry),
    /// Place a hold.
    Reserve(NewHold),
    /// Charge a hold; `None` = the whole held amount.
    Capture {
        /// The hold.
        hold_id: String,
        /// How much.
        amount: Option<CaptureAmount>,
        /// Who.
        actor: String,
    },
    /// Free a hold.
    Release {
        /// The hold.
        hold_id: String,
    },
    /// Give back part of a charge.
    Refund(NewRefund),
}

impl Op {
    /// About how many bytes the request's values add to its batch's
    /// statements: the row it may write (text, plus fixed-width columns and
    /// per-value lengths) and its key lookup. A capture also copies its
    /// hold's description and metadata, unknown until the hold is read;
    /// typical ones are allowed for.
    fn wire_bytes(&self) -> usize {
        const FIXED: usize = 160;
        const CAPTURED_TEXT: usize = 512;
        let row = |texts: [&str; 5], metadata: &BTreeMap<String, String>, key: &str| {
            texts.iter().map(|t| t.len()).sum::<usize>()
                + metadata
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 6)
                    .sum::<usize>()
                + 2
                + 2 * key.len()
        };
        let none = BTreeMap::new();
        FIXED
            + match self {
                Op::Change(e) => row(
                    [&e.operation, &e.description, &e.request_hash, &e.actor, ""],
                    &e.metadata,
                    &e.idempotency_key,
                ),
                Op::Reserve(h) => row(
                    [&h.operation, &h.description, &h.request_hash, &h.actor, ""],
                    &h.metadata,
                    &h.idempotency_key,
                ),
                Op::Capture {
                    hold_id,
                    amount,
                    actor,
                } => {
                    let operation = amount
                        .as_ref()
                        .and_then(|a| a.operation.as_deref())
                        .unwrap_or("");
                    row([hold_id, actor, operation, "", ""], &none, hold_id) + CAPTURED_TEXT
                }
                Op::Release { hold_id } => 2 * hold_id.len(),
                Op::Refund(r) => row(
                    [&r.request_hash, &r.reason, &r.actor, "", ""],
                    &none,
                    &r.idempotency_key,
                ),
            }
    }
}

/// What a request did.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // short-lived, moved once per request
pub enum Done {
    /// A deduction, grant or refund.
    Row {
        /// The row written, or the original row on a replay.
        row: LedgerRow,
        /// True on a replay.
        replayed: bool,
    },
    /// A hold placed.
    Reserved {
        /// The hold (on a replay: as it is now).
        hold: HoldRow,
        /// Credits available right after.
        available: i64,
        /// True on a replay.
        replayed: bool,
    },
    /// A hold captured.
    Captured {
        /// The hold, captured.
        hold: HoldRow,
        /// The CAPTURE row.
        row: LedgerRow,
        /// True on a repeat of the same capture.
        replayed: bool,
    },
    /// A hold released.
    Released {
        /// The hold, released.
        hold: HoldRow,
        /// True when it was released before.
        replayed: bool,
    },
}

struct Job {
    account: i64,
    op: Op,
    reply: oneshot::Sender<Result<Done, BillingError>>,
}

struct Shard {
    tx: mpsc::Sender<Job>,
    /// Requests waiting per account, for the per-account share.
    waiting: Arc<Mutex<HashMap<i64, usize>>>,
}

/// The writer's clock: decides when holds expire. Tests replace it to
/// drive expiry without sleeping.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// A commit hook: called after every committed batch with the accounts it
/// changed (in-process change notification).
pub type OnCommit = Arc<dyn Fn(&[i64]) + Send + Sync>;

/// Handle to the writer tasks; cheap to clone. The tasks stop once every
/// handle is dropped and their queues are empty.
#[derive(Clone)]
pub struct Writer {
    shards: Arc<Vec<Shard>>,
    config: WriterConfig,
    on_commit: Arc<Mutex<Option<OnCommit>>>,
    metrics: WriterMetrics,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts one writer task per shard, on the writer's own thread.
    pub fn start(db: Db, config: WriterConfig) -> Self {
        Self::start_with_clock(db, config, system_clock())
    }

    /// [`Writer::start`] with a given clock.
    ///
    /// The shard tasks run on a thread and Tokio runtime of their own, with
    /// a pool of their own (one connection per shard, made on that runtime
    /// from `db`'s options). On the service's runtime the writer task waited
    /// behind every call task at each of a batch's round trips: a batch that
    /// answered many callers woke as many tasks ahead of its own next step.
    /// Measured on 2 vCPUs (same session, same bench): one account at 32
    /// callers ran at ~15k deducts/s on its own thread against ~11k, and at
    /// 128 callers ~24k against ~14k. The thread ends, closing its pool,
    /// once every handle is dropped and the queues are empty.
    pub fn start_with_clock(db: Db, config: WriterConfig, clock: Clock) -> Self {
        let on_commit: Arc<Mutex<Option<OnCommit>>> = Arc::default();
        let metrics = WriterMetrics::default();
        let shard_count = config.shards.max(1);
        let mut queues = Vec::with_capacity(shard_count);
        let shards = (0..shard_count)
            .map(|_| {
                let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
                let waiting: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
                queues.push((rx, waiting.clone()));
                Shard { tx, waiting }
            })
            .collect();
        let hook = on_commit.clone();
        let shard_metrics = metrics.clone();
        let max_batch = config.max_batch.max(1);
        let run = move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    // Dropping the queues answers every request with
                    // UNAVAILABLE (LEDGER_WRITE_FAILED).
                    tracing::error!(error = %e, "ledger writer: cannot start its runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                let own = db.sibling(
                    u32::try_from(shard_count).unwrap_or(u32::MAX),
                    WRITER_SESSION,
                );
                let tasks: Vec<_> = queues
                    .into_iter()
                    .map(|(rx, waiting)| {
                        tokio::spawn(run_shard(
                            rx,
                            ShardContext {
                                batch_bytes: batch_bytes(own.backend()),
                                db: own.clone(),
                                max_batch,
                                waiting,
                                on_commit: hook.clone(),
                                clock: clock.clone(),
                                metrics: shard_metrics.clone(),
                            },
                        ))
                    })
                    .collect();
                for task in tasks {
                    if let Err(e) = task.await {
                        tracing::error!(error = %e, "ledger writer shard stopped");
                    }
                }
                own.close().await;
            });
        };
        if let Err(e) = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(run)
        {
            // As above: the queues are gone, so requests fail, not hang.
            tracing::error!(error = %e, "ledger writer: cannot start its thread");
        }
        Self {
            shards: Arc::new(shards),
            config,
            on_commit,
            metrics,
        }
    }

    /// Installs the hook called after each commit with the changed accounts.
    pub fn set_on_commit(&self, hook: OnCommit) {
        *self.on_commit.lock().expect("hook lock") = Some(hook);
    }

    /// The writer's counters, to register on a metrics registry.
    pub fn metrics(&self) -> &WriterMetrics {
        &self.metrics
    }

    /// The configuration the writer runs with.
    pub fn config(&self) -> &WriterConfig {
        &self.config
    }

    /// Queues `op` for `account` and waits for its answer. Refused at once
    /// with [`BillingError::Overloaded`] when the queue or the account's
    /// share of it is full. Dropping the future before the batch starts
    /// withdraws the request.
    pub async fn submit(&self, account: i64, op: Op) -> Result<Done, BillingError> {
        let shard = &self.shards[shard_of(account, self.shards.len())];
        {
            let mut waiting = shard.waiting.lock().expect("share lock");
            let n = waiting.entry(account).or_default();
            if *n >= self.config.account_share {
                self.metrics
                    .refused
                    .get_or_create(&RefusedLabels {
                        limit: "account_share",
                    })
                    .inc();
                return Err(BillingError::Overloaded(
                    "this account's share of the ledger queue is full",
                ));
            }
            *n += 1;
        }
        let (reply, answer) = oneshot::channel();
        let sent = shard.tx.try_send(Job { account, op, reply });
        if let Err(e) = sent {
            release_share(&shard.waiting, account);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.metrics
                        .refused
                        .get_or_create(&RefusedLabels { limit: "queue" })
                        .inc();
                    BillingError::Overloaded("the ledger queue is full")
                }
                mpsc::error::TrySendError::Closed(_) => BillingError::WriteFailed,
            });
        }
        answer.await.unwrap_or(Err(BillingError::WriteFailed))
    }
}

fn shard_of(account: i64, shards: usize) -> usize {
    (account.unsigned_abs() % shards as u64) as usize
}

fn release_share(waiting: &Mutex<HashMap<i64, usize>>, account: i64) {
    let mut waiting = waiting.lock().expect("share lock");
    if let Some(n) = waiting.get_mut(&account) {
        *n -= 1;
        if *n == 0 {
            waiting.remove(&account);
        }
    }
}

/// What a shard's writer task needs besides its queue.
struct ShardContext {
    db: Db,
    max_batch: usize,
    /// [`batch_bytes`] of the backend.
    batch_bytes: usize,
    waiting: Arc<Mutex<HashMap<i64, usize>>>,
    on_commit: Arc<Mutex<Option<OnCommit>>>,
    clock: Clock,
    metrics: WriterMetrics,
}

/// A shard's writer task: gathers whatever is waiting (up to `max_batch`
/// requests and about [`BATCH_BYTES`] of values) into a batch, applies it,
/// answers, and gathers again.
async fn run_shard(mut rx: mpsc::Receiver<Job>, cx: ShardContext) {
    let mut fresh = Vec::with_capacity(cx.max_batch);
    // Received and not yet applied: at most `max_batch`.
    let mut taken: VecDeque<Job> = VecDeque::with_capacity(cx.max_batch);
    let mut held = Held::default();
    loop {
        if taken.is_empty() {
            let received =
                match tokio::time::timeout(IDLE_RELEASE, rx.recv_many(&mut fresh, cx.max_batch))
                    .await
                {
                    Ok(received) => received,
                    Err(_idle) => {
                        // Nothing to write for a while: give the connection
                        // back (the pool checks it before the next batch).
                        held.release().await;
                        rx.recv_many(&mut fresh, cx.max_batch).await
                    }
                };
            if received == 0 {
                break; // every handle dropped and the queue is empty
            }
        } else {
            // Left from the last batch: top up with what already waits.
            while taken.len() + fresh.len() < cx.max_batch {
                match rx.try_recv() {
                    Ok(job) => fresh.push(job),
                    Err(_) => break,
                }
            }
        }
        for job in &fresh {
            release_share(&cx.waiting, job.account);
        }
        taken.extend(fresh.drain(..));
        // Callers that gave up (deadline, cancellation) are not applied.
        taken.retain(|job| !job.reply.is_closed());
        if taken.is_empty() {
            continue;
        }
        let size = batch_len(&taken, cx.batch_bytes);
        let batch: Vec<Job> = taken.drain(..size).collect();
        let changed = process(&cx, &mut held, batch).await;
        committed(&cx, &changed);
    }
}

/// About how many bytes of values a batch's statements may carry on
/// PostgreSQL (SQLite runs in-process and has no such bound).
///
/// Larger messages are sent in more than one write (over TLS, one per
/// 16 KiB record), and sqlx 0.9 leaves Nagle's algorithm on: the second
/// write then waits for the server to acknowledge the first, which it
/// delays for ~40 ms. Measured: on one account, batches of 128 deducts
/// (~28 KB) spent 45–50 ms in their insert and throughput fell to 2,300/s;
/// batches under 16 KiB take about a millisecond. A request whose values
/// alone exceed this is a batch of its own.
const BATCH_BYTES: usize = 12 * 1024;

/// The bound on a batch's values for a backend (see [`BATCH_BYTES`]).
fn batch_bytes(backend: Backend) -> usize {
    match backend {
        Backend::Postgres => BATCH_BYTES,
        Backend::Sqlite => usize::MAX,
    }
}

/// How many of `taken` (at least one) the next batch applies: its first
/// requests while their values stay within `max_bytes`.
fn batch_len(taken: &VecDeque<Job>, max_bytes: usize) -> usize {
    let mut bytes: usize = 0;
    let mut n = 0;
    for job in taken {
        bytes = bytes.saturating_add(job.op.wire_bytes());
        if n > 0 && bytes > max_bytes {
            break;
        }
        n += 1;
    }
    n.max(1)
}

/// Runs the commit hook for a batch's changed accounts.
fn committed(cx: &ShardContext, changed: &[i64]) {
    if changed.is_empty() {
        return;
    }
    let hook = cx.on_commit.lock().expect("hook lock").clone();
    if let Some(hook) = hook {
        hook(changed);
    }
}

/// Applies a batch and answers its callers; returns the accounts changed.
async fn process(cx: &ShardContext, held: &mut Held, batch: Vec<Job>) -> Vec<i64> {
    let (db, clock, metrics) = (&cx.db, &cx.clock, &cx.metrics);
    let requests: Vec<(i64, &Op)> = batch.iter().map(|j| (j.account, &j.op)).collect();
    let size = batch.len();
    let mut result = apply_batch(db, held, &requests, clock).await;
    if let Err(e) = &result
        && igny8_db::is_unique_violation(e)
    {
        // Another replica committed one of the batch's keys after this
        // batch's lookup was made (see `lock_then_find`): a new statement
        // sees it, and the request replays it.
        result = apply_batch(db, held, &requests, clock).await;
    }
    match result {
        Ok((answers, changed)) => {
            metrics.batches.inc();
            metrics.requests.inc_by(size as u64);
            for (job, answer) in batch.into_iter().zip(answers) {
                let _ = job.reply.send(answer);
            }
            changed
        }
        // The database refused something in the batch: retry one by one so
        // the offending request cannot fail its neighbours. (When the
        // database is unreachable, retrying would only make every caller
        // wait longer: they all get UNAVAILABLE below and retry themselves.)
        Err(e) if size > 1 && !igny8_db::is_unavailable(&e) => {
            metrics.failures.inc();
            tracing::warn!(error = %e, size, "ledger batch failed; retrying its requests one by one");
            let mut changed = BTreeSet::new();
            for job in batch {
                let one = [(job.account, &job.op)];
                let answer = match apply_batch(db, held, &one, clock).await {
                    Ok((mut answers, c)) => {
                        metrics.batches.inc();
                        metrics.requests.inc();
                        changed.extend(c);
                        answers.pop().unwrap_or(Err(BillingError::WriteFailed))
                    }
                    Err(e) => {
                        metrics.failures.inc();
                        Err(batch_error(e))
                    }
                };
                let _ = job.reply.send(answer);
            }
            changed.into_iter().collect()
        }
        Err(e) => {
            metrics.failures.inc();
            for job in batch {
                let _ = job.reply.send(Err(batch_error_ref(&e)));
            }
            Vec::new()
        }
    }
}

fn batch_error(e: sqlx::Error) -> BillingError {
    batch_error_ref(&e)
}

fn batch_error_ref(e: &sqlx::Error) -> BillingError {
    if igny8_db::is_check_violation(e) {
        tracing::error!(error = %e, "ledger write refused by a schema constraint");
    } else {
        tracing::warn!(error = %e, "ledger write failed");
    }
    BillingError::WriteFailed
}

/// Session settings of the writer's own PostgreSQL connections.
///
/// - `plan_cache_mode = force_generic_plan`: each statement is planned once
///   per connection, not per execution. The statements' text does not
///   depend on the batch (one array per column), so a connection prepares
///   each once; left to choose, PostgreSQL kept building a custom plan per
///   execution, and planning was about a sixth of the database's CPU under
///   load.
/// - `enable_seqscan`, `enable_hashjoin`, `enable_mergejoin` off: every
///   statement is written to be answered by index probes (unique-key
///   probes, `= ANY` beside every join on an array), and a plan made while a
///   table was small and never analysed must not keep a sequential scan as
///   the table grows. These only make other plans cost more; a statement
///   with no index path would still run.
///
/// The tests plan every writer statement with these settings on an empty
/// and on a grown, never-analysed database.
pub const WRITER_SESSION: &[(&str, &str)] = &[
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
];

/// The writer's Prometheus counters.
#[derive(Debug, Clone, Default)]
pub struct WriterMetrics {
    batches: prometheus_client::metrics::counter::Counter,
    requests: prometheus_client::metrics::counter::Counter,
    failures: prometheus_client::metrics::counter::Counter,
    refused: prometheus_client::metrics::family::Family<
        RefusedLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RefusedLabels {
    limit: &'static str,
}

impl WriterMetrics {
    /// Registers `igny8_ledger_batches_total`,
    /// `igny8_ledger_batched_requests_total`,
    /// `igny8_ledger_batch_failures_total` and
    /// `igny8_ledger_refused_total{limit}`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "igny8_ledger_batches",
            "Ledger transactions committed by the batching writer",
            self.batches.clone(),
        );
        registry.register(
            "igny8_ledger_batched_requests",
            "Requests applied in committed batches (divide by batches for the mean batch size)",
            self.requests.clone(),
        );
        registry.register(
            "igny8_ledger_batch_failures",
            "Batch transactions that failed and were rolled back",
            self.failures.clone(),
        );
        registry.register(
            "igny8_ledger_refused",
            "Requests refused at once because a writer queue bound was reached (queue, account_share)",
            self.refused.clone(),
        );
    }

    /// Committed batches and the requests they carried.
    pub fn totals(&self) -> (u64, u64) {
        (self.batches.get(), self.requests.get())
    }
}

// ---------------------------------------------------------------------------
// What the batch read, and the pure decision over it.

/// Everything [`decide`] needs, read under the batch's locks.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    /// Locked accounts: id → (credits, held), held already net of swept holds.
    pub accounts: BTreeMap<i64, (i64, i64)>,
    /// Existing ledger rows by (account, kind, key).
    pub rows_by_key: HashMap<(i64, String, String), LedgerRow>,
    /// Existing ledger rows by id (refund targets, captured holds' rows).
    pub rows_by_id: HashMap<i64, LedgerRow>,
    /// Credits already refunded per row id.
    pub refunded: HashMap<i64, i64>,
    /// Existing holds by (account, Reserve key).
    pub holds_by_key: HashMap<(i64, String), HoldRow>,
    /// Existing holds by id.
    pub holds_by_id: HashMap<String, HoldRow>,
}

/// A row to insert; its id is known after the insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRow {
    /// The row with `id` 0.
    pub row: LedgerRow,
}

/// An answer that may point at a row not yet inserted.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // short-lived, moved once per request
pub enum Pending {
    /// Final.
    Done(Done),
    /// A new or replayed deduct/grant/refund: index into `Plan::new_rows` or an
    /// existing row.
    Row(RowRef, bool),
    /// A capture: the hold after it, its row, replayed.
    Captured(Box<HoldRow>, RowRef, bool),
    /// Refused.
    Failed(BillingError),
}

/// A ledger row, existing or to be inserted.
#[derive(Debug, Clone)]
pub enum RowRef {
    /// Already stored.
    Existing(Box<LedgerRow>),
    /// `Plan::new_rows[i]`.
    New(usize),
}

/// The writes a batch makes, and its answers.
#[derive(Debug, Default)]
pub struct Plan {
    /// One per request, in order.
    pub answers: Vec<Pending>,
    /// Ledger rows to insert, in order.
    pub new_rows: Vec<NewRow>,
    /// Holds to insert.
    pub new_holds: Vec<HoldRow>,
    /// Existing holds whose state changed (captured or released), with the
    /// index of their CAPTURE row in `new_rows`.
    pub hold_updates: Vec<(HoldRow, Option<usize>)>,
    /// Accounts whose credits or held changed: id → (credits, held).
    pub accounts: BTreeMap<i64, (i64, i64)>,
}

fn new_hold_id() -> String {
    format!("hold_{:032x}", rand::random::<u128>())
}

fn expires_at(now: DateTime<Utc>, ttl: Duration) -> i64 {
    let ttl_us = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
    micros(now).saturating_add(ttl_us)
}

/// Decides every request of a batch, in arrival order, against the state it
/// read; pure, so it is tested without a database. Requests repeating a key
/// written earlier in the same batch replay that write.
pub fn decide(requests: &[(i64, &Op)], loaded: &mut Loaded, now: DateTime<Utc>) -> Plan {
    let now_us = micros(now);
    let mut plan = Plan::default();
    // Keys written in this batch → index into new_rows / new_holds.
    let mut new_row_keys: HashMap<(i64, String, String), usize> = HashMap::new();
    let mut new_hold_keys: HashMap<(i64, String), usize> = HashMap::new();
    for &(account, op) in requests {
        let Some(&(credits, held)) = plan
            .accounts
            .get(&account)
            .or_else(|| loaded.accounts.get(&account))
        else {
            plan.answers
                .push(Pending::Failed(BillingError::AccountNotFound(account)));
            continue;
        };
        let answer = match op {
            Op::Change(entry) => {
                let ns = (
                    account,
                    entry.kind.as_str().to_owned(),
                    entry.idempotency_key.clone(),
                );
                if let Some(found) = replay_row(&plan, loaded, &new_row_keys, &ns) {
                    same_request(found, &entry.request_hash, &entry.idempotency_key)
                } else if entry.credits < 0 && credits - held < -entry.credits {
                    Pending::Failed(BillingError::InsufficientCredits {
                        required: -entry.credits,
                        available: credits - held,
                    })
                } else {
                    match credits.checked_add(entry.credits) {
                        None => Pending::Failed(BillingError::BalanceOverflow {
                            balance: credits,
                            credits: entry.credits,
                        }),
                        Some(after) => {
                            let i = push_row(
                                &mut plan,
                                LedgerRow {
                                    id: 0,
                                    account_id: account,
                                    kind: entry.kind.as_str().to_owned(),
                                    credits: entry.credits,
                                    balance_after: after,
                                    operation: entry.operation.clone(),
                                    quantity: i64::try_from(entry.quantity).unwrap_or(i64::MAX),
                                    description: entry.description.clone(),
                                    metadata: json(&entry.metadata),
                                    idempotency_key: entry.idempotency_key.clone(),
                                    request_hash: entry.request_hash.clone(),
                                    actor: entry.actor.clone(),
                                    created_at: now,
                                    hold_id: None,
                                    refund_of: None,
                                },
                            );
                            new_row_keys.insert(ns, i);
                            plan.accounts.insert(account, (after, held));
                            Pending::Row(RowRef::New(i), false)
                        }
                    }
                }
            }
            Op::Reserve(h) => {
                let ns = (account, h.idempotency_key.clone());
                let existing = new_hold_keys
                    .get(&ns)
                    .map(|&i| plan.new_holds[i].clone())
                    .or_else(|| loaded.holds_by_key.get(&ns).cloned());
                match existing {
                    Some(hold) if hold.request_hash == h.request_hash => {
                        let hold = current_hold(&plan, loaded, hold);
                        Pending::Done(Done::Reserved {
                            hold,
                            available: credits - held,
                            replayed: true,
                        })
                    }
                    Some(_) => Pending::Failed(BillingError::IdempotencyKeyReused {
                        key: h.idempotency_key.clone(),
                    }),
                    None if credits - held < h.credits => {
                        Pending::Failed(BillingError::InsufficientCredits {
                            required: h.credits,
                            available: credits - held,
                        })
                    }
                    None => {
                        let hold = HoldRow {
                            id: new_hold_id(),
                            account_id: account,
                            state: "active".to_owned(),
                            credits: h.credits,
                            captured_credits: 0,
                            operation: h.operation.clone(),
                            quantity: i64::try_from(h.quantity).unwrap_or(i64::MAX),
                            description: h.description.clone(),
                            metadata: json(&h.metadata),
                            idempotency_key: h.idempotency_key.clone(),
                            request_hash: h.request_hash.clone(),
                            actor: h.actor.clone(),
                            created_at: now,
                            expires_at_us: expires_at(now, h.ttl),
                            closed_at: None,
                            transaction_id: None,
                        };
                        new_hold_keys.insert(ns, plan.new_holds.len());
                        plan.new_holds.push(hold.clone());
                        loaded.holds_by_id.insert(hold.id.clone(), hold.clone());
                        plan.accounts.insert(account, (credits, held + h.credits));
                        Pending::Done(Done::Reserved {
                            hold,
                            available: credits - held - h.credits,
                            replayed: false,
                        })
                    }
                }
            }
            Op::Capture {
                hold_id,
                amount,
                actor,
            } => match hold_of(&plan, loaded, account, hold_id) {
                None => Pending::Failed(BillingError::HoldNotFound(hold_id.clone())),
                Some(hold) => {
                    let want = amount.as_ref().map_or(hold.credits, |a| a.credits);
                    match hold.state_at(now_us) {
                        HoldState::Active if want > hold.credits => {
                            Pending::Failed(BillingError::CaptureExceedsHold {
                                requested: want,
                                held: hold.credits,
                            })
                        }
                        HoldState::Active => {
                            let after = credits - want;
                            let (operation, quantity) = match amount {
                                Some(CaptureAmount {
                                    operation: Some(op),
                                    quantity,
                                    ..
                                }) => (op.clone(), i64::try_from(*quantity).unwrap_or(i64::MAX)),
                                _ => (hold.operation.clone(), hold.quantity),
                            };
                            let i = push_row(
                                &mut plan,
                                LedgerRow {
                                    id: 0,
                                    account_id: account,
                                    kind: Kind::Capture.as_str().to_owned(),
                                    credits: -want,
                                    balance_after: after,
                                    operation,
                                    quantity,
                                    description: hold.description.clone(),
                                    metadata: hold.metadata.clone(),
                                    idempotency_key: hold.id.clone(),
                                    request_hash: hold.request_hash.clone(),
                                    actor: actor.clone(),
                                    created_at: now,
                                    hold_id: Some(hold.id.clone()),
                                    refund_of: None,
                                },
                            );
                            let mut captured = hold.clone();
                            captured.state = HoldState::Captured.as_str().to_owned();
                            captured.captured_credits = want;
                            captured.closed_at = Some(now);
                            update_hold(&mut plan, loaded, captured.clone(), Some(i));
                            plan.accounts.insert(account, (after, held - hold.credits));
                            Pending::Captured(Box::new(captured), RowRef::New(i), false)
                        }
                        HoldState::Captured if hold.captured_credits == want => {
                            let row = match plan.hold_updates.iter().find(|(h, _)| h.id == hold.id)
                            {
                                Some((_, Some(i))) => Some(RowRef::New(*i)),
                                _ => hold
                                    .transaction_id
                                    .and_then(|id| loaded.rows_by_id.get(&id))
                                    .map(|r| RowRef::Existing(Box::new(r.clone()))),
                            };
                            match row {
                                Some(row) => Pending::Captured(Box::new(hold), row, true),
                                None => Pending::Failed(BillingError::WriteFailed),
                            }
                        }
                        state => Pending::Failed(BillingError::HoldNotActive {
                            state: state.api_name(),
                        }),
                    }
                }
            },
            Op::Release { hold_id } => match hold_of(&plan, loaded, account, hold_id) {
                None => Pending::Failed(BillingError::HoldNotFound(hold_id.clone())),
                Some(hold) => match hold.state_at(now_us) {
                    HoldState::Active => {
                        let mut released = hold.clone();
                        released.state = HoldState::Released.as_str().to_owned();
                        released.closed_at = Some(now);
                        update_hold(&mut plan, loaded, released.clone(), None);
                        plan.accounts
                            .insert(account, (credits, held - hold.credits));
                        Pending::Done(Done::Released {
                            hold: released,
                            replayed: false,
                        })
                    }
                    HoldState::Released => Pending::Done(Done::Released {
                        hold,
                        replayed: true,
                    }),
                    state => Pending::Failed(BillingError::HoldNotActive {
                        state: state.api_name(),
                    }),
                },
            },
            Op::Refund(r) => {
                let ns = (
                    account,
                    Kind::Refund.as_str().to_owned(),
                    r.idempotency_key.clone(),
                );
                if let Some(found) = replay_row(&plan, loaded, &new_row_keys, &ns) {
                    same_request(found, &r.request_hash, &r.idempotency_key)
                } else {
                    match loaded.rows_by_id.get(&r.transaction_id) {
                        Some(orig)
                            if orig.account_id == account
                                && (orig.kind == "deduct" || orig.kind == "capture") =>
                        {
                            let already = loaded.refunded.get(&orig.id).copied().unwrap_or(0);
                            let refundable = (-orig.credits - already).max(0);
                            let want = if r.credits == 0 {
                                refundable
                            } else {
                                r.credits
                            };
                            if want == 0 || want > refundable {
                                Pending::Failed(BillingError::RefundExceedsCharge {
                                    requested: r.credits,
                                    refundable,
                                })
                            } else {
                                match credits.checked_add(want) {
                                    None => Pending::Failed(BillingError::BalanceOverflow {
                                        balance: credits,
                                        credits: want,
                                    }),
                                    Some(after) => {
                                        let i = push_row(
                                            &mut plan,
                                            LedgerRow {
                                                id: 0,
                                                account_id: account,
                                                kind: Kind::Refund.as_str().to_owned(),
                                                credits: want,
                                                balance_after: after,
                                                operation: orig.operation.clone(),
                                                quantity: 0,
                                                description: r.reason.clone(),
                                                metadata: "{}".to_owned(),
                                                idempotency_key: r.idempotency_key.clone(),
                                                request_hash: r.request_hash.clone(),
                                                actor: r.actor.clone(),
                                                created_at: now,
                                                hold_id: None,
                                                refund_of: Some(orig.id),
                                            },
                                        );
                                        loaded.refunded.insert(orig.id, already + want);
                                        new_row_keys.insert(ns, i);
                                        plan.accounts.insert(account, (after, held));
                                        Pending::Row(RowRef::New(i), false)
                                    }
                                }
                            }
                        }
                        Some(orig) if orig.account_id == account => {
                            Pending::Failed(BillingError::NotRefundable {
                                id: orig.id,
                                kind: orig.kind.to_uppercase(),
                            })
                        }
                        _ => Pending::Failed(BillingError::TransactionNotFound(r.transaction_id)),
                    }
                }
            }
        };
        plan.answers.push(answer);
    }
    plan
}

fn json(metadata: &BTreeMap<String, String>) -> String {
    serde_json::to_string(metadata).expect("string maps serialize")
}

fn push_row(plan: &mut Plan, row: LedgerRow) -> usize {
    plan.new_rows.push(NewRow { row });
    plan.new_rows.len() - 1
}

fn replay_row(
    plan: &Plan,
    loaded: &Loaded,
    new_row_keys: &HashMap<(i64, String, String), usize>,
    ns: &(i64, String, String),
) -> Option<(RowRef, String)> {
    if let Some(&i) = new_row_keys.get(ns) {
        return Some((RowRef::New(i), plan.new_rows[i].row.request_hash.clone()));
    }
    loaded.rows_by_key.get(ns).map(|row| {
        (
            RowRef::Existing(Box::new(row.clone())),
            row.request_hash.clone(),
        )
    })
}

fn same_request(found: (RowRef, String), request_hash: &str, key: &str) -> Pending {
    let (row, stored_hash) = found;
    if stored_hash == request_hash {
        Pending::Row(row, true)
    } else {
        Pending::Failed(BillingError::IdempotencyKeyReused {
            key: key.to_owned(),
        })
    }
}

fn hold_of(plan: &Plan, loaded: &Loaded, account: i64, id: &str) -> Option<HoldRow> {
    let hold = plan
        .hold_updates
        .iter()
        .rev()
        .find(|(h, _)| h.id == id)
        .map(|(h, _)| h.clone())
        .or_else(|| loaded.holds_by_id.get(id).cloned())?;
    (hold.account_id == account).then_some(hold)
}

fn current_hold(plan: &Plan, loaded: &Loaded, hold: HoldRow) -> HoldRow {
    hold_of(plan, loaded, hold.account_id, &hold.id).unwrap_or(hold)
}

fn update_hold(plan: &mut Plan, loaded: &mut Loaded, hold: HoldRow, row: Option<usize>) {
    // A hold placed in this same batch is inserted in its final state.
    if let Some(new) = plan.new_holds.iter_mut().find(|h| h.id == hold.id) {
        *new = hold.clone();
        if let Some(i) = row {
            plan.hold_updates.retain(|(h, _)| h.id != hold.id);
            plan.hold_updates.push((hold.clone(), Some(i)));
        }
        loaded.holds_by_id.insert(hold.id.clone(), hold);
        return;
    }
    plan.hold_updates.retain(|(h, _)| h.id != hold.id);
    loaded.holds_by_id.insert(hold.id.clone(), hold.clone());
    plan.hold_updates.push((hold, row));
}

// ---------------------------------------------------------------------------
// The batch transaction.
//
// Every statement is built for the backend it runs on. On PostgreSQL its
// values travel as one array per column (`= ANY($1)`, `unnest($1, $2, …)`),
// so the statement text is the same for every batch: it is prepared once
// per connection, and every lookup is a join against the batch's keys that
// the planner can only answer through the unique index it names. On SQLite,
// where preparing is an in-process call, it carries one placeholder per
// value.

/// Dynamic SQL with numbered placeholders (`$1`, `$2`, …) that both
/// backends accept, and the values to bind in order.
#[derive(Default, Clone)]
struct Sql {
    text: String,
    args: Vec<Arg>,
}

#[derive(Debug, Clone)]
enum Arg {
    I64(i64),
    Text(String),
    OptText(Option<String>),
    OptI64(Option<i64>),
    Time(DateTime<Utc>),
    OptTime(Option<DateTime<Utc>>),
    /// One column of a batch (PostgreSQL only), built by [`Sql::array`].
    I64s(Vec<Option<i64>>),
    /// Same, text.
    Texts(Vec<Option<String>>),
    /// Same, timestamps.
    Times(Vec<Option<DateTime<Utc>>>),
}

impl Arg {
    /// Starts the array column that holds values like `self`, with the
    /// PostgreSQL type to cast it to.
    fn column(&self, len: usize) -> (Arg, &'static str) {
        match self {
            Arg::I64(_) | Arg::OptI64(_) | Arg::I64s(_) => {
                (Arg::I64s(Vec::with_capacity(len)), "bigint[]")
            }
            Arg::Text(_) | Arg::OptText(_) | Arg::Texts(_) => {
                (Arg::Texts(Vec::with_capacity(len)), "text[]")
            }
            Arg::Time(_) | Arg::OptTime(_) | Arg::Times(_) => {
                (Arg::Times(Vec::with_capacity(len)), "timestamptz[]")
            }
        }
    }

    /// Appends the scalar `value` to this array column.
    fn push_into(&mut self, value: Arg) {
        match (self, value) {
            (Arg::I64s(c), Arg::I64(v)) => c.push(Some(v)),
            (Arg::I64s(c), Arg::OptI64(v)) => c.push(v),
            (Arg::Texts(c), Arg::Text(v)) => c.push(Some(v)),
            (Arg::Texts(c), Arg::OptText(v)) => c.push(v),
            (Arg::Times(c), Arg::Time(v)) => c.push(Some(v)),
            (Arg::Times(c), Arg::OptTime(v)) => c.push(v),
            (column, value) => unreachable!("{value:?} does not fit the column {column:?}"),
        }
    }
}

impl Sql {
    fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            args: Vec::new(),
        }
    }

    fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    fn arg(&mut self, arg: Arg) -> &mut Self {
        self.args.push(arg);
        let _ = write!(self.text, "${}", self.args.len());
        self
    }

    /// `CASE <key> WHEN $k THEN $v … END` over `(key value, new value)` pairs:
    /// one column of a multi-row `UPDATE` (SQLite).
    fn case(&mut self, key: &str, pairs: impl IntoIterator<Item = (Arg, Arg)>) -> &mut Self {
        self.push("CASE ").push(key);
        for (k, v) in pairs {
            self.push(" WHEN ").arg(k).push(" THEN ").arg(v);
        }
        self.push(" END")
    }

    /// `WITH step AS (<self>) <then>`: both in one PostgreSQL statement (a
    /// data-modifying `WITH` runs to completion whether or not it is read),
    /// `then`'s placeholders renumbered after `self`'s.
    fn with_then(self, then: Sql) -> Sql {
        self.with_as("WITH step AS (", then)
    }

    /// [`Sql::with_then`] with another `WITH` head (`WITH name AS (`).
    fn with_as(self, head: &str, then: Sql) -> Sql {
        let shift = self.args.len();
        let mut sql = Sql::new(head);
        sql.push(&self.text).push(") ");
        let mut rest = then.text.as_str();
        while let Some(at) = rest.find('$') {
            sql.push(&rest[..at]);
            let digits = rest[at + 1..]
                .find(|c: char| !c.is_ascii_digit())
                .map_or(rest.len() - at - 1, |n| n);
            let n: usize = rest[at + 1..at + 1 + digits]
                .parse()
                .expect("placeholders are numbered");
            let _ = write!(sql.text, "${}", n + shift);
            rest = &rest[at + 1 + digits..];
        }
        sql.push(rest);
        sql.args = self.args;
        sql.args.extend(then.args);
        sql
    }

    /// `$a, $b, …` for each value.
    fn list(&mut self, args: impl IntoIterator<Item = Arg>) -> &mut Self {
        for (i, arg) in args.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.arg(arg);
        }
        self
    }

    /// ` = ANY($k::type[])` on PostgreSQL, ` IN ($a, $b, …)` on SQLite: the
    /// condition that a column is one of `values` (at least one).
    fn is_in(&mut self, backend: Backend, values: Vec<Arg>) -> &mut Self {
        match backend {
            Backend::Postgres => self.push(" = ANY(").array(values).push(")"),
            Backend::Sqlite => self.push(" IN (").list(values).push(")"),
        }
    }

    /// `$k::type[]`: the scalars `values` (at least one, all of one kind) as
    /// one PostgreSQL array.
    fn array(&mut self, values: Vec<Arg>) -> &mut Self {
        let (mut column, cast) = values
            .first()
            .expect("an array of at least one value")
            .column(values.len());
        for value in values {
            column.push_into(value);
        }
        self.arg(column).push("::").push(cast)
    }

    /// `unnest($1::t1[], $2::t2[], …)`: `rows` (at least one, each with the
    /// same kinds of value in the same order) as one PostgreSQL array per
    /// column, read back as rows.
    fn unnest<const N: usize>(&mut self, rows: Vec<[Arg; N]>) -> &mut Self {
        let mut columns: Vec<Vec<Arg>> = (0..N).map(|_| Vec::with_capacity(rows.len())).collect();
        for row in rows {
            for (column, value) in columns.iter_mut().zip(row) {
                column.push(value);
            }
        }
        self.push("unnest(");
        for (i, column) in columns.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.array(column);
        }
        self.push(")")
    }

    /// `(…), (…)`: `rows` as a SQLite `VALUES` list.
    fn values<const N: usize>(&mut self, rows: Vec<[Arg; N]>) -> &mut Self {
        for (i, row) in rows.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.push("(").list(row).push(")");
        }
        self
    }
}

/// The database side of [`Sql`]: its values as one backend's arguments,
/// and where a writer keeps its connection.
trait BatchDb: sqlx::Database {
    /// Ends a batch's transaction. On PostgreSQL the next batch's `BEGIN`
    /// rides in the same round trip (`COMMIT; BEGIN`), so a held connection
    /// waits between batches in an empty transaction: one round trip fewer
    /// per batch. On SQLite `BEGIN IMMEDIATE` takes the database's write
    /// lock, so it is sent only when a batch starts.
    const COMMIT: &'static str;
    /// Whether [`BatchDb::COMMIT`] leaves a transaction open.
    const COMMIT_BEGINS: bool;
    fn arguments(args: Vec<Arg>) -> Result<Self::Arguments, sqlx::error::BoxDynError>;
    /// This backend's slot in a writer's [`Held`] connection.
    fn held(held: &mut Held) -> &mut Slot<Self>;
}

/// [`BatchDb`] for a backend: scalars bind the same way on both, `$arrays`
/// says what becomes of the array columns.
macro_rules! batch_db {
    ($db:ty, $slot:ident, $commit:expr, $arrays:expr) => {
        impl BatchDb for $db {
            const COMMIT: &'static str = $commit.0;
            const COMMIT_BEGINS: bool = $commit.1;
            fn held(held: &mut Held) -> &mut Slot<Self> {
                &mut held.$slot
            }
            fn arguments(args: Vec<Arg>) -> Result<Self::Arguments, sqlx::error::BoxDynError> {
                use sqlx::Arguments as _;
                let mut out = Self::Arguments::default();
                let arrays = $arrays;
                for arg in args {
                    match arg {
                        Arg::I64(v) => out.add(v),
                        Arg::Text(v) => out.add(v),
                        Arg::OptText(v) => out.add(v),
                        Arg::OptI64(v) => out.add(v),
                        Arg::Time(v) => out.add(v),
                        Arg::OptTime(v) => out.add(v),
                        array => arrays(&mut out, array),
                    }?;
                }
                Ok(out)
            }
        }
    };
}

batch_db!(
    sqlx::Postgres,
    postgres,
    ("COMMIT; BEGIN", true),
    |out: &mut sqlx::postgres::PgArguments, array: Arg| {
        use sqlx::Arguments as _;
        match array {
            Arg::I64s(v) => out.add(v),
            Arg::Texts(v) => out.add(v),
            Arg::Times(v) => out.add(v),
            scalar => unreachable!("{scalar:?} is bound as a scalar"),
        }
    }
);
batch_db!(
    sqlx::Sqlite,
    sqlite,
    ("COMMIT", false),
    |_: &mut sqlx::sqlite::SqliteArguments, _: Arg| -> Result<(), sqlx::error::BoxDynError> {
        Err("array arguments are built only for PostgreSQL".into())
    }
);

/// `sql` as a query on `pool`'s backend (the pool only names the backend).
fn query<'q, DB: BatchDb>(
    _pool: &sqlx::Pool<DB>,
    sql: Sql,
) -> Result<sqlx::query::Query<'q, DB, DB::Arguments>, sqlx::Error>
where
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let args = DB::arguments(sql.args).map_err(sqlx::Error::Encode)?;
    Ok(sqlx::query_with(sqlx::AssertSqlSafe(sql.text), args))
}

/// `sql` as a query mapping rows to `O`.
fn query_as<'q, DB: BatchDb, O>(
    _pool: &sqlx::Pool<DB>,
    sql: Sql,
) -> Result<sqlx::query::QueryAs<'q, DB, O, DB::Arguments>, sqlx::Error>
where
    DB::Arguments: sqlx::IntoArguments<DB>,
    O: for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let args = DB::arguments(sql.args).map_err(sqlx::Error::Encode)?;
    Ok(sqlx::query_as_with(sqlx::AssertSqlSafe(sql.text), args))
}

/// The SQL of one batch's reads, built from what it needs.
struct Reads {
    sweep: Sql,
    holds_by_key: Option<Sql>,
    holds_by_id: Option<Sql>,
}

fn i64s(values: impl IntoIterator<Item = i64>) -> Vec<Arg> {
    values.into_iter().map(Arg::I64).collect()
}

/// Locks the batch's accounts in id order (on SQLite `BEGIN IMMEDIATE`
/// already holds the one write lock).
fn lock_accounts(backend: Backend, requests: &[(i64, &Op)]) -> Sql {
    let accounts: BTreeSet<i64> = requests.iter().map(|(a, _)| *a).collect();
    let mut lock = Sql::new("SELECT id, credits, held FROM accounts WHERE id");
    lock.is_in(backend, i64s(accounts)).push(" ORDER BY id");
    if backend == Backend::Postgres {
        lock.push(" FOR UPDATE");
    }
    lock
}

/// Existing rows of `table` (with `columns`) matching any of `keys` on
/// `key_columns`, each key answered through the unique index on them.
fn by_keys<const N: usize>(
    backend: Backend,
    table: &str,
    columns: &str,
    key_columns: [&str; N],
    keys: Vec<[Arg; N]>,
) -> Sql {
    let mut sql = Sql::new("SELECT ");
    match backend {
        // One index probe per key: the planner has no choice to get wrong
        // (an OR of many keys of one hot account may otherwise be planned
        // as a scan of every row of the account).
        Backend::Postgres => {
            let names: Vec<String> = (0..N).map(|i| format!("k{i}")).collect();
            sql.push("t.* FROM ")
                .unnest(keys)
                .push(" AS k(")
                .push(&names.join(", "))
                .push(") CROSS JOIN LATERAL (SELECT ")
                .push(columns)
                .push(" FROM ")
                .push(table)
                .push(" WHERE ");
            for (i, (column, name)) in key_columns.iter().zip(&names).enumerate() {
                if i > 0 {
                    sql.push(" AND ");
                }
                sql.push(column).push(" = k.").push(name);
            }
            // OFFSET 0 keeps the subquery from being flattened into a join
            // the planner could answer with a hash over a whole-table scan.
            sql.push(" OFFSET 0) AS t");
        }
        Backend::Sqlite => {
            sql.push(columns).push(" FROM ").push(table).push(" WHERE ");
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    sql.push(" OR ");
                }
                sql.push("(");
                for (j, (column, value)) in key_columns.iter().zip(key).enumerate() {
                    if j > 0 {
                        sql.push(" AND ");
                    }
                    sql.push(column).push(" = ").arg(value);
                }
                sql.push(")");
            }
        }
    }
    sql
}

fn reads(backend: Backend, requests: &[(i64, &Op)], now: DateTime<Utc>) -> Reads {
    let accounts: BTreeSet<i64> = requests.iter().map(|(a, _)| *a).collect();
    let mut sweep = Sql::new("UPDATE credit_holds SET state = 'expired', closed_at = ");
    sweep
        .arg(Arg::Time(now))
        .push(" WHERE state = 'active' AND expires_at_us <= ")
        .arg(Arg::I64(micros(now)))
        .push(" AND account_id")
        .is_in(backend, i64s(accounts))
        .push(" RETURNING account_id, credits");

    let mut hold_keys = Vec::new();
    let mut hold_ids = BTreeSet::new();
    for (account, op) in requests {
        match op {
            Op::Reserve(h) => {
                hold_keys.push([Arg::I64(*account), Arg::Text(h.idempotency_key.clone())]);
            }
            Op::Capture { hold_id, .. } | Op::Release { hold_id } => {
                hold_ids.insert(hold_id.clone());
            }
            Op::Change(_) | Op::Refund(_) => {}
        }
    }
    let holds_by_key = (!hold_keys.is_empty()).then(|| {
        by_keys(
            backend,
            "credit_holds",
            hold_columns!(),
            ["account_id", "idempotency_key"],
            hold_keys,
        )
    });
    let holds_by_id = (!hold_ids.is_empty()).then(|| {
        let mut sql = Sql::new(concat!(
            "SELECT ",
            hold_columns!(),
            " FROM credit_holds WHERE id"
        ));
        sql.is_in(backend, hold_ids.into_iter().map(Arg::Text).collect());
        sql
    });
    Reads {
        sweep,
        holds_by_key,
        holds_by_id,
    }
}

/// The batch's existing ledger rows by idempotency key (deducts, grants,
/// refunds), if it has any such request.
fn rows_by_key(backend: Backend, requests: &[(i64, &Op)]) -> Option<Sql> {
    let keys: Vec<[Arg; 3]> = requests
        .iter()
        .filter_map(|(account, op)| {
            let (kind, key) = match op {
                Op::Change(e) => (e.kind, &e.idempotency_key),
                Op::Refund(r) => (Kind::Refund, &r.idempotency_key),
                Op::Reserve(_) | Op::Capture { .. } | Op::Release { .. } => return None,
            };
            Some([
                Arg::I64(*account),
                Arg::Text(kind.as_str().to_owned()),
                Arg::Text(key.clone()),
            ])
        })
        .collect();
    (!keys.is_empty()).then(|| {
        by_keys(
            backend,
            "credit_ledger",
            ledger_columns!(),
            ["account_id", "kind", "idempotency_key"],
            keys,
        )
    })
}

/// PostgreSQL: the accounts' lock and the key lookup in one statement (one
/// round trip). The lock is taken in id order as [`lock_accounts`] does;
/// account rows carry `lock_id`, found ledger rows a NULL one.
///
/// One statement has one snapshot, taken before any wait for a lock: when
/// another replica commits a row for one of the batch's keys while this
/// statement waits for its lock, the lookup does not see that row, the
/// batch's insert of the same key then fails on the unique index, and the
/// batch is applied again, in a new transaction that sees it (a replay).
/// Balances are never read from the snapshot: a locked row is its newest
/// version.
fn lock_then_find(lock: Sql, lookup: Sql) -> Sql {
    let found = lookup
        .text
        .strip_prefix("SELECT ")
        .expect("a lookup is a SELECT")
        .to_owned();
    // The locked rows, with a NULL for each ledger column (the same text for
    // every batch, built once).
    static LOCKED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let nulls = vec!["NULL"; ledger_columns!().split(',').count()].join(", ");
        format!(" UNION ALL SELECT id, credits, held, {nulls} FROM locked")
    });
    let mut then = Sql::new(
        "SELECT NULL::bigint AS lock_id, NULL::bigint AS lock_credits, \
         NULL::bigint AS lock_held, ",
    );
    then.push(&found).push(&LOCKED);
    then.args = lookup.args;
    lock.with_as("WITH locked AS MATERIALIZED (", then)
}

/// Row ids the batch must read after the holds are known: refund targets and
/// captured holds' rows.
fn row_ids_needed(requests: &[(i64, &Op)], loaded: &Loaded) -> BTreeSet<i64> {
    let mut ids = BTreeSet::new();
    for (_, op) in requests {
        match op {
            Op::Refund(r) => {
                ids.insert(r.transaction_id);
            }
            Op::Capture { hold_id, .. } => {
                if let Some(id) = loaded
                    .holds_by_id
                    .get(hold_id)
                    .and_then(|h| h.transaction_id)
                {
                    ids.insert(id);
                }
            }
            _ => {}
        }
    }
    ids
}

fn refunds_needed(requests: &[(i64, &Op)]) -> BTreeSet<i64> {
    requests
        .iter()
        .filter_map(|(_, op)| match op {
            Op::Refund(r) => Some(r.transaction_id),
            _ => None,
        })
        .collect()
}

/// Ledger rows by id.
fn rows_by_id(backend: Backend, ids: BTreeSet<i64>) -> Option<Sql> {
    (!ids.is_empty()).then(|| {
        let mut sql = Sql::new(concat!(
            "SELECT ",
            ledger_columns!(),
            " FROM credit_ledger WHERE id"
        ));
        sql.is_in(backend, i64s(ids));
        sql
    })
}

/// Credits already refunded of each of `ids`.
fn refunded_sums(backend: Backend, ids: BTreeSet<i64>) -> Option<Sql> {
    (!ids.is_empty()).then(|| {
        let mut sql = Sql::new(
            "SELECT refund_of, CAST(SUM(credits) AS BIGINT) FROM credit_ledger WHERE refund_of",
        );
        sql.is_in(backend, i64s(ids)).push(" GROUP BY refund_of");
        sql
    })
}

/// `INSERT INTO <table> (<columns>) ` followed by `rows`: an `unnest` of
/// column arrays on PostgreSQL, a `VALUES` list on SQLite.
fn insert<const N: usize>(
    backend: Backend,
    table: &str,
    columns: &str,
    rows: Vec<[Arg; N]>,
) -> Sql {
    let mut sql = Sql::new("INSERT INTO ");
    sql.push(table).push(" (").push(columns).push(") ");
    match backend {
        Backend::Postgres => sql.push("SELECT * FROM ").unnest(rows),
        Backend::Sqlite => sql.push("VALUES ").values(rows),
    };
    sql
}

fn insert_rows(backend: Backend, plan: &Plan) -> Option<Sql> {
    if plan.new_rows.is_empty() {
        return None;
    }
    let rows = plan
        .new_rows
        .iter()
        .map(|NewRow { row }| {
            [
                Arg::I64(row.account_id),
                Arg::Text(row.kind.clone()),
                Arg::I64(row.credits),
                Arg::I64(row.balance_after),
                Arg::Text(row.operation.clone()),
                Arg::I64(row.quantity),
                Arg::Text(row.description.clone()),
                Arg::Text(row.metadata.clone()),
                Arg::Text(row.idempotency_key.clone()),
                Arg::Text(row.request_hash.clone()),
                Arg::Text(row.actor.clone()),
                Arg::Time(row.created_at),
                Arg::OptText(row.hold_id.clone()),
                Arg::OptI64(row.refund_of),
            ]
        })
        .collect();
    let mut sql = insert(
        backend,
        "credit_ledger",
        "account_id, kind, credits, balance_after, operation, quantity, description, metadata, \
         idempotency_key, request_hash, actor, created_at, hold_id, refund_of",
        rows,
    );
    // Only what tells the rows apart and their new ids: every other column
    // is what the plan wrote.
    sql.push(" RETURNING id, account_id, kind, idempotency_key");
    Some(sql)
}

fn hold_args(h: &HoldRow, transaction_id: Option<i64>) -> [Arg; 16] {
    [
        Arg::Text(h.id.clone()),
        Arg::I64(h.account_id),
        Arg::Text(h.state.clone()),
        Arg::I64(h.credits),
        Arg::I64(h.captured_credits),
        Arg::Text(h.operation.clone()),
        Arg::I64(h.quantity),
        Arg::Text(h.description.clone()),
        Arg::Text(h.metadata.clone()),
        Arg::Text(h.idempotency_key.clone()),
        Arg::Text(h.request_hash.clone()),
        Arg::Text(h.actor.clone()),
        Arg::Time(h.created_at),
        Arg::I64(h.expires_at_us),
        Arg::OptTime(h.closed_at),
        Arg::OptI64(transaction_id.or(h.transaction_id)),
    ]
}

/// New holds are inserted after the ledger rows, in their final state (a
/// hold placed and captured in one batch carries its CAPTURE row id).
fn insert_holds(backend: Backend, plan: &Plan, row_ids: &[i64]) -> Option<Sql> {
    if plan.new_holds.is_empty() {
        return None;
    }
    let rows = plan
        .new_holds
        .iter()
        .map(|h| hold_args(h, capture_row_of(plan, &h.id).map(|r| row_ids[r])))
        .collect();
    Some(insert(backend, "credit_holds", hold_columns!(), rows))
}

fn capture_row_of(plan: &Plan, hold_id: &str) -> Option<usize> {
    plan.hold_updates
        .iter()
        .find(|(h, _)| h.id == hold_id)
        .and_then(|(_, r)| *r)
}

/// One multi-row `UPDATE` of `table` setting `columns` from `rows`, each row
/// being the key (in `key`) followed by the new values (a join against the
/// unnested rows on PostgreSQL, `CASE` per column on SQLite), and `also`
/// to one value on every row.
fn update_many<const N: usize>(
    backend: Backend,
    table: &str,
    key: &str,
    columns: &[&str],
    rows: Vec<[Arg; N]>,
    also: Option<(&str, Arg)>,
) -> Sql {
    debug_assert_eq!(columns.len() + 1, N);
    let mut sql = Sql::new("UPDATE ");
    sql.push(table).push(" SET ");
    for (i, column) in columns.iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.push(column).push(" = ");
        match backend {
            Backend::Postgres => sql.push("u.").push(column),
            Backend::Sqlite => sql.case(key, rows.iter().map(|r| (r[0].clone(), r[i + 1].clone()))),
        };
    }
    if let Some((column, value)) = also {
        sql.push(", ").push(column).push(" = ").arg(value);
    }
    match backend {
        Backend::Postgres => {
            // The rows' keys are the first array: matching them again with
            // `= ANY` lets the planner reach the table through its key
            // index whatever it guesses of the unnest (a cached generic plan
            // otherwise hash-joins it against a scan of the whole table).
            let keys = format!("${}", sql.args.len() + 1);
            sql.push(" FROM ")
                .unnest(rows)
                .push(" AS u(")
                .push(key)
                .push(", ")
                .push(&columns.join(", "))
                .push(") WHERE ")
                .push(table)
                .push(".")
                .push(key)
                .push(" = u.")
                .push(key)
                .push(" AND ")
                .push(table)
                .push(".")
                .push(key)
                .push(" = ANY(")
                .push(&keys)
                .push(")");
        }
        Backend::Sqlite => {
            let keys: Vec<Arg> = rows.iter().map(|row| row[0].clone()).collect();
            sql.push(" WHERE ")
                .push(key)
                .push(" IN (")
                .list(keys)
                .push(")");
        }
    }
    sql
}

/// Existing holds that changed: one multi-row `UPDATE` over all of them.
fn update_holds(backend: Backend, plan: &Plan, row_ids: &[i64]) -> Option<Sql> {
    let rows: Vec<[Arg; 5]> = plan
        .hold_updates
        .iter()
        .filter(|(h, _)| !plan.new_holds.iter().any(|n| n.id == h.id))
        .map(|(h, row)| {
            [
                Arg::Text(h.id.clone()),
                Arg::Text(h.state.clone()),
                Arg::I64(h.captured_credits),
                Arg::OptI64(row.map(|r| row_ids[r]).or(h.transaction_id)),
                Arg::OptTime(h.closed_at),
            ]
        })
        .collect();
    (!rows.is_empty()).then(|| {
        update_many(
            backend,
            "credit_holds",
            "id",
            &["state", "captured_credits", "transaction_id", "closed_at"],
            rows,
            None,
        )
    })
}

/// Moves every changed account's balance and held amount with one
/// multi-row `UPDATE`; on PostgreSQL the same statement sends
/// `pg_notify('igny8_balance', '<account>')` once per changed account from
/// its `RETURNING` (in the transaction, so only committed changes notify).
fn update_accounts(backend: Backend, plan: &Plan, now: DateTime<Utc>) -> Option<Sql> {
    if plan.accounts.is_empty() {
        return None;
    }
    let rows = plan
        .accounts
        .iter()
        .map(|(id, (credits, held))| [Arg::I64(*id), Arg::I64(*credits), Arg::I64(*held)])
        .collect();
    let moved = update_many(
        backend,
        "accounts",
        "id",
        &["credits", "held"],
        rows,
        Some(("updated_at", Arg::Time(now))),
    );
    let mut sql = moved;
    if backend == Backend::Postgres {
        sql.push(" RETURNING pg_notify('")
            .push(crate::BALANCE_CHANNEL)
            .push("', CAST(accounts.id AS TEXT))");
    }
    Some(sql)
}

/// The text of every statement the writer runs on PostgreSQL, for a batch
/// holding one request of each kind (for the tests that check their plans;
/// the text does not depend on the batch's size or values).
#[doc(hidden)]
pub fn postgres_statements() -> Vec<String> {
    let backend = Backend::Postgres;
    let now = DateTime::from_timestamp_micros(1_800_000_000_000_000).unwrap_or_default();
    let hold = |id: &str, credits: i64| HoldRow {
        id: id.to_owned(),
        account_id: 1,
        state: "active".to_owned(),
        credits,
        captured_credits: 0,
        operation: String::new(),
        quantity: 0,
        description: String::new(),
        metadata: "{}".to_owned(),
        idempotency_key: format!("reserve-{id}"),
        request_hash: "h".to_owned(),
        actor: "user:1".to_owned(),
        created_at: now,
        expires_at_us: micros(now) + 60_000_000,
        closed_at: None,
        transaction_id: None,
    };
    let charged = LedgerRow {
        id: 7,
        account_id: 2,
        kind: Kind::Deduct.as_str().to_owned(),
        credits: -5,
        balance_after: 995,
        operation: String::new(),
        quantity: 0,
        description: String::new(),
        metadata: "{}".to_owned(),
        idempotency_key: "charged".to_owned(),
        request_hash: "h".to_owned(),
        actor: "user:1".to_owned(),
        created_at: now,
        hold_id: None,
        refund_of: None,
    };
    let entry = |kind: Kind, credits: i64, key: &str| Entry {
        kind,
        credits,
        operation: String::new(),
        quantity: 0,
        description: String::new(),
        metadata: BTreeMap::new(),
        idempotency_key: key.to_owned(),
        request_hash: "h".to_owned(),
        actor: "user:1".to_owned(),
    };
    let ops = [
        (1, Op::Change(entry(Kind::Deduct, -1, "d"))),
        (2, Op::Change(entry(Kind::Grant, 1, "g"))),
        (
            2,
            Op::Reserve(NewHold {
                credits: 3,
                operation: String::new(),
                quantity: 0,
                description: String::new(),
                metadata: BTreeMap::new(),
                idempotency_key: "r".to_owned(),
                request_hash: "h".to_owned(),
                actor: "user:1".to_owned(),
                ttl: Duration::from_secs(60),
            }),
        ),
        (
            1,
            Op::Capture {
                hold_id: "h1".to_owned(),
                amount: None,
                actor: "user:1".to_owned(),
            },
        ),
        (
            1,
            Op::Release {
                hold_id: "h2".to_owned(),
            },
        ),
        (
            2,
            Op::Refund(NewRefund {
                transaction_id: charged.id,
                credits: 0,
                idempotency_key: "f".to_owned(),
                request_hash: "h".to_owned(),
                reason: "r".to_owned(),
                actor: "user:1".to_owned(),
            }),
        ),
    ];
    let requests: Vec<(i64, &Op)> = ops.iter().map(|(a, op)| (*a, op)).collect();
    let mut loaded = Loaded {
        accounts: [(1, (1_000, 30)), (2, (1_000, 0))].into(),
        rows_by_id: [(charged.id, charged)].into(),
        holds_by_id: [
            ("h1".to_owned(), hold("h1", 10)),
            ("h2".to_owned(), hold("h2", 20)),
        ]
        .into(),
        ..Loaded::default()
    };
    let r = reads(backend, &requests, now);
    // The lock alone (a batch of holds only), and with the key lookup.
    let lock = lock_accounts(backend, &requests);
    let mut all = vec![lock.clone()];
    all.extend(rows_by_key(backend, &requests).map(|keys| lock_then_find(lock, keys)));
    all.push(r.sweep);
    all.extend([r.holds_by_key, r.holds_by_id].into_iter().flatten());
    all.extend(rows_by_id(backend, row_ids_needed(&requests, &loaded)));
    all.extend(refunded_sums(backend, refunds_needed(&requests)));
    let plan = decide(&requests, &mut loaded, now);
    let row_ids: Vec<i64> = (1..=plan.new_rows.len() as i64).collect();
    all.extend(insert_holds(backend, &plan, &row_ids));
    all.extend(update_holds(backend, &plan, &row_ids));
    if let Some(update) = update_accounts(backend, &plan, now) {
        all.extend(insert_rows(backend, &plan).map(|insert| update.clone().with_then(insert)));
        // Without new ledger rows (only holds placed or released) the
        // update runs alone.
        all.push(update);
    }
    all.into_iter().map(|sql| sql.text).collect()
}

type Answers = Vec<Result<Done, BillingError>>;

/// A writer task's own connection, kept from one batch to the next while
/// requests keep coming. Taking a connection from the pool for every batch
/// cost a round trip each time (the pool pings every connection it hands
/// out). Given back to the pool after [`IDLE_RELEASE`] without requests;
/// closed after a batch fails on it in a way that leaves its state unknown.
#[derive(Default)]
struct Held {
    postgres: Slot<sqlx::Postgres>,
    sqlite: Slot<sqlx::Sqlite>,
}

/// One backend's held connection, and whether a transaction is open on it
/// (on PostgreSQL, the empty one the last `COMMIT; BEGIN` opened).
struct Slot<DB: sqlx::Database> {
    conn: Option<PoolConnection<DB>>,
    in_transaction: bool,
}

impl<DB: sqlx::Database> Default for Slot<DB> {
    fn default() -> Self {
        Self {
            conn: None,
            in_transaction: false,
        }
    }
}

impl<DB: BatchDb> Slot<DB>
where
    for<'e> &'e mut DB::Connection: sqlx::Executor<'e, Database = DB>,
{
    /// Gives the connection back to the pool, outside any transaction (the
    /// empty one is rolled back; a connection that cannot do that is
    /// closed instead).
    async fn release(&mut self) {
        if self.in_transaction {
            self.end_failed(false).await;
        }
        self.conn = None;
    }

    /// After a failed batch: rolls its transaction back so the connection
    /// can serve the next batch, or, when the connection itself failed (or
    /// does not answer the rollback within [`ROLLBACK_WAIT`]), closes it so
    /// the next batch takes one the pool has checked.
    async fn end_failed(&mut self, connection_failed: bool) {
        self.in_transaction = false;
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if !connection_failed {
            let rollback = sqlx::raw_sql("ROLLBACK").execute(&mut **conn);
            if let Ok(Ok(_)) = tokio::time::timeout(ROLLBACK_WAIT, rollback).await {
                return;
            }
        }
        if let Some(conn) = self.conn.take() {
            // Detached, it is closed when dropped; the pool opens another.
            drop(conn.detach());
        }
    }
}

impl Held {
    async fn release(&mut self) {
        self.postgres.release().await;
        self.sqlite.release().await;
    }
}

/// How long a writer keeps its connection with nothing to write. Given
/// back, a connection is pinged by the pool before its next batch, so one
/// cut while the writer was idle costs no failed batch.
const IDLE_RELEASE: Duration = Duration::from_millis(50);

/// How long a failed batch's rollback may take before its connection is
/// closed instead.
const ROLLBACK_WAIT: Duration = Duration::from_secs(1);

/// The held connection, in a transaction that may write: taken from the
/// pool (which pings it first) when none is held, begun with the pool's
/// [`BeginWrite::BEGIN`] (`BEGIN IMMEDIATE` on SQLite) unless the last
/// commit already began it.
async fn begin_batch<'c, DB: BatchDb>(
    pool: &sqlx::Pool<DB>,
    slot: &'c mut Slot<DB>,
) -> Result<&'c mut DB::Connection, sqlx::Error>
where
    sqlx::Pool<DB>: BeginWrite,
    for<'e> &'e mut DB::Connection: sqlx::Executor<'e, Database = DB>,
{
    if slot.conn.is_none() {
        slot.in_transaction = false;
        slot.conn = Some(pool.acquire().await?);
    }
    let conn = slot.conn.as_mut().expect("just taken");
    if !slot.in_transaction {
        sqlx::raw_sql(<sqlx::Pool<DB> as BeginWrite>::BEGIN)
            .execute(&mut **conn)
            .await?;
        slot.in_transaction = true;
    }
    Ok(&mut **conn)
}

/// Commits the batch on the held connection ([`BatchDb::COMMIT`]).
async fn commit_batch<DB: BatchDb>(
    _pool: &sqlx::Pool<DB>,
    slot: &mut Slot<DB>,
) -> Result<(), sqlx::Error>
where
    for<'e> &'e mut DB::Connection: sqlx::Executor<'e, Database = DB>,
{
    let conn = slot.conn.as_mut().ok_or(sqlx::Error::PoolClosed)?;
    sqlx::raw_sql(DB::COMMIT).execute(&mut **conn).await?;
    slot.in_transaction = DB::COMMIT_BEGINS;
    Ok(())
}

/// One transaction for the whole batch. `Err` means it was rolled back and
/// nothing in it happened; the held connection is then rolled back for the
/// next batch, or closed after a connection-level error.
async fn apply_batch(
    db: &Db,
    held: &mut Held,
    requests: &[(i64, &Op)],
    clock: &Clock,
) -> Result<(Answers, Vec<i64>), sqlx::Error> {
    let result = apply_on(db, held, requests, clock).await;
    if let Err(e) = &result {
        let connection_failed = igny8_db::is_unavailable(e);
        match db.backend() {
            Backend::Postgres => held.postgres.end_failed(connection_failed).await,
            Backend::Sqlite => held.sqlite.end_failed(connection_failed).await,
        }
    }
    result
}

/// [`apply_batch`] on the held connection.
async fn apply_on(
    db: &Db,
    held: &mut Held,
    requests: &[(i64, &Op)],
    clock: &Clock,
) -> Result<(Answers, Vec<i64>), sqlx::Error> {
    let backend = db.backend();
    on_pool!(db, pool => {
        let tx = begin_batch(pool, BatchDb::held(held)).await?;
        // The time is taken once the accounts are locked, so every decision
        // about expiry is made under the lock that orders it.
        let lock = lock_accounts(backend, requests);
        let mut keys = rows_by_key(backend, requests);
        let mut accounts: Vec<(i64, i64, i64)> = Vec::new();
        let mut found: Vec<LedgerRow> = Vec::new();
        match keys.take_if(|_| backend == Backend::Postgres) {
            // One round trip for both (see `lock_then_find`).
            Some(lookup) => {
                use sqlx::Row as _;
                let rows = query(pool, lock_then_find(lock, lookup))?
                    .fetch_all(&mut *tx)
                    .await?;
                for row in &rows {
                    match row.try_get::<Option<i64>, _>("lock_id")? {
                        Some(id) => accounts.push((
                            id,
                            row.try_get("lock_credits")?,
                            row.try_get("lock_held")?,
                        )),
                        None => found.push(sqlx::FromRow::from_row(row)?),
                    }
                }
            }
            None => accounts = query_as(pool, lock)?.fetch_all(&mut *tx).await?,
        }
        // Microseconds: what both backends store, so answers built in memory
        // equal what a later read returns.
        let now = clock();
        let now = DateTime::from_timestamp_micros(micros(now)).unwrap_or(now);
        let r = reads(backend, requests, now);
        let mut loaded = Loaded {
            accounts: accounts.iter().map(|&(id, c, h)| (id, (c, h))).collect(),
            ..Loaded::default()
        };
        let mut swept_accounts = BTreeSet::new();
        if accounts.iter().any(|&(_, _, held)| held > 0) {
            let swept: Vec<(i64, i64)> =
                query_as(pool, r.sweep)?.fetch_all(&mut *tx).await?;
            for (account, credits) in swept {
                if let Some(a) = loaded.accounts.get_mut(&account) {
                    a.1 -= credits;
                    swept_accounts.insert(account);
                }
            }
        }
        if let Some(sql) = keys {
            found = query_as(pool, sql)?.fetch_all(&mut *tx).await?;
        }
        for row in found {
            loaded
                .rows_by_key
                .insert((row.account_id, row.kind.clone(), row.idempotency_key.clone()), row);
        }
        if let Some(sql) = r.holds_by_key {
            let holds: Vec<HoldRow> =
                query_as(pool, sql)?.fetch_all(&mut *tx).await?;
            for hold in holds {
                loaded
                    .holds_by_key
                    .insert((hold.account_id, hold.idempotency_key.clone()), hold.clone());
                loaded.holds_by_id.insert(hold.id.clone(), hold);
            }
        }
        if let Some(sql) = r.holds_by_id {
            let holds: Vec<HoldRow> =
                query_as(pool, sql)?.fetch_all(&mut *tx).await?;
            for hold in holds {
                loaded.holds_by_id.insert(hold.id.clone(), hold);
            }
        }
        if let Some(sql) = rows_by_id(backend, row_ids_needed(requests, &loaded)) {
            let rows: Vec<LedgerRow> =
                query_as(pool, sql)?.fetch_all(&mut *tx).await?;
            for row in rows {
                loaded.rows_by_id.insert(row.id, row);
            }
        }
        if let Some(sql) = refunded_sums(backend, refunds_needed(requests)) {
            let sums: Vec<(i64, i64)> =
                query_as(pool, sql)?.fetch_all(&mut *tx).await?;
            loaded.refunded.extend(sums);
        }

        let mut plan = decide(requests, &mut loaded, now);
        // Swept holds leave `held` even when nothing else changed the account.
        for account in swept_accounts {
            if let Some(&state) = loaded.accounts.get(&account) {
                plan.accounts.entry(account).or_insert(state);
            }
        }

        // On PostgreSQL the accounts' update rides in the same statement as
        // the ledger insert (one round trip fewer per batch).
        let mut accounts_update = update_accounts(backend, &plan, now);
        let mut inserted: Vec<Inserted> = Vec::new();
        if let Some(mut sql) = insert_rows(backend, &plan) {
            if backend == Backend::Postgres
                && let Some(update) = accounts_update.take()
            {
                sql = update.with_then(sql);
            }
            inserted = query_as(pool, sql)?.fetch_all(&mut *tx).await?;
        }
        let row_ids = match_inserted(&plan, &inserted)?;
        let changed: Vec<i64> = plan.accounts.keys().copied().collect();
        for sql in [
            insert_holds(backend, &plan, &row_ids),
            update_holds(backend, &plan, &row_ids),
            accounts_update,
        ]
        .into_iter()
        .flatten()
        {
            query(pool, sql)?.execute(&mut *tx).await?;
        }
        commit_batch(pool, BatchDb::held(held)).await?;
        Ok((resolve(plan, &row_ids), changed))
    })
}

/// What the ledger insert returns of each row: id, account, kind, key.
type Inserted = (i64, i64, String, String);

/// The inserted rows' ids, in the plan's order (RETURNING order is not
/// guaranteed, so rows are matched by their unique key).
fn match_inserted(plan: &Plan, inserted: &[Inserted]) -> Result<Vec<i64>, sqlx::Error> {
    let by_key: HashMap<(i64, &str, &str), i64> = inserted
        .iter()
        .map(|(id, account, kind, key)| ((*account, kind.as_str(), key.as_str()), *id))
        .collect();
    plan.new_rows
        .iter()
        .map(|NewRow { row }| {
            by_key
                .get(&(
                    row.account_id,
                    row.kind.as_str(),
                    row.idempotency_key.as_str(),
                ))
                .copied()
                .ok_or(sqlx::Error::RowNotFound)
        })
        .collect()
}

/// Every answer, new rows carrying the ids the database gave them.
fn resolve(mut plan: Plan, row_ids: &[i64]) -> Answers {
    let pending_answers = std::mem::take(&mut plan.answers);
    let row = |r: RowRef| -> LedgerRow {
        match r {
            RowRef::Existing(row) => *row,
            RowRef::New(i) => LedgerRow {
                id: row_ids[i],
                ..plan.new_rows[i].row.clone()
            },
        }
    };
    pending_answers
        .into_iter()
        .map(|pending| match pending {
            Pending::Done(done) => Ok(done),
            Pending::Failed(e) => Err(e),
            Pending::Row(r, replayed) => Ok(Done::Row {
                row: row(r),
                replayed,
            }),
            Pending::Captured(hold, r, replayed) => {
                let row = row(r);
                let mut hold = *hold;
                hold.transaction_id = Some(row.id);
                Ok(Done::Captured {
                    hold,
                    row,
                    replayed,
                })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deduct(key: &str) -> Op {
        Op::Change(Entry {
            kind: Kind::Deduct,
            credits: -1,
            operation: String::new(),
            quantity: 0,
            description: String::new(),
            metadata: BTreeMap::new(),
            idempotency_key: key.to_owned(),
            request_hash: format!("hash-{key}"),
            actor: "user:1".to_owned(),
        })
    }

    /// Every statement a batch of `n` deducts over `accounts` accounts runs.
    fn statements(backend: Backend, n: usize, accounts: i64) -> Vec<String> {
        let ops: Vec<Op> = (0..n).map(|i| deduct(&format!("k{i}"))).collect();
        let requests: Vec<(i64, &Op)> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| (1 + i as i64 % accounts, op))
            .collect();
        let now = DateTime::from_timestamp_micros(1_800_000_000_000_000).unwrap();
        let mut loaded = Loaded {
            accounts: (1..=accounts).map(|a| (a, (1_000, 0))).collect(),
            ..Loaded::default()
        };
        let plan = decide(&requests, &mut loaded, now);
        let r = reads(backend, &requests, now);
        let mut all = vec![lock_accounts(backend, &requests), r.sweep];
        all.extend(rows_by_key(backend, &requests));
        let insert = insert_rows(backend, &plan).unwrap();
        let update = update_accounts(backend, &plan, now).unwrap();
        all.push(update.with_then(insert));
        for sql in &all {
            let highest = (1..=sql.args.len())
                .rev()
                .find(|n| sql.text.contains(&format!("${n}")));
            assert_eq!(
                highest,
                Some(sql.args.len()),
                "every argument has its placeholder: {}",
                sql.text
            );
        }
        all.into_iter().map(|sql| sql.text).collect()
    }

    #[test]
    fn postgres_statements_do_not_depend_on_the_batch() {
        let one = statements(Backend::Postgres, 1, 1);
        assert_eq!(one, statements(Backend::Postgres, 64, 1));
        assert_eq!(one, statements(Backend::Postgres, 300, 17));
        // SQLite carries one placeholder per value instead.
        assert_ne!(
            statements(Backend::Sqlite, 1, 1),
            statements(Backend::Sqlite, 2, 1)
        );
    }

    #[test]
    fn the_statement_catalogue_covers_every_write() {
        let all = postgres_statements();
        for start in [
            "SELECT id, credits, held FROM accounts",
            "WITH locked AS MATERIALIZED (SELECT id, credits, held FROM accounts",
            "UPDATE credit_holds SET state = 'expired'",
            "SELECT t.* FROM unnest($1::bigint[], $2::text[])",
            "SELECT id, account_id, state",
            "SELECT id, account_id, kind",
            "SELECT refund_of",
            "INSERT INTO credit_holds",
            "UPDATE credit_holds SET state = u.",
            "WITH step AS (UPDATE accounts",
            "UPDATE accounts",
        ] {
            assert!(
                all.iter().any(|s| s.starts_with(start)),
                "no statement starts with {start:?}: {all:#?}"
            );
        }
    }

    #[test]
    fn a_batch_takes_requests_while_their_values_fit() {
        let job = |op: Op| Job {
            account: 1,
            op,
            reply: oneshot::channel().0,
        };
        let small: VecDeque<Job> = (0..200)
            .map(|i| job(deduct(&format!("key-{i:04}"))))
            .collect();
        let n = batch_len(&small, BATCH_BYTES);
        let each = small[0].op.wire_bytes();
        assert_eq!(n, BATCH_BYTES / each, "as many as fit");
        assert_eq!(batch_len(&small, usize::MAX), 200, "SQLite: no bound");

        let mut big = deduct("big");
        if let Op::Change(e) = &mut big {
            e.metadata = (0..16)
                .map(|i| (format!("k{i:062}"), "v".repeat(256)))
                .collect();
        }
        assert!(big.wire_bytes() > 5_000);
        let mut mixed: VecDeque<Job> = (0..3).map(|i| job(deduct(&format!("k{i}")))).collect();
        mixed.push_back(job(big.clone()));
        mixed.push_back(job(big.clone()));
        mixed.push_back(job(big.clone()));
        assert_eq!(
            batch_len(&mixed, BATCH_BYTES),
            5,
            "stops before the third big one"
        );
        let alone: VecDeque<Job> = [job(big)].into();
        assert_eq!(
            batch_len(&alone, 1),
            1,
            "an oversized request is a batch of its own"
        );
    }

    #[test]
    fn with_then_renumbers_the_second_statement() {
        let mut first = Sql::new("UPDATE t SET a = ");
        first.arg(Arg::I64(1)).push(" WHERE b = ").arg(Arg::I64(2));
        let mut second = Sql::new("INSERT INTO u VALUES (");
        second
            .list([Arg::I64(3), Arg::I64(4)])
            .push(") RETURNING x, y = $2");
        let both = first.with_then(second);
        assert_eq!(
            both.text,
            "WITH step AS (UPDATE t SET a = $1 WHERE b = $2) \
             INSERT INTO u VALUES ($3, $4) RETURNING x, y = $4"
        );
        let values: Vec<i64> = both
            .args
            .iter()
            .map(|a| match a {
                Arg::I64(v) => *v,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(values, [1, 2, 3, 4]);
    }

    #[test]
    fn arrays_are_one_per_column() {
        let mut sql = Sql::new("SELECT * FROM ");
        sql.unnest(vec![
            [Arg::I64(1), Arg::OptText(None), Arg::Time(Utc::now())],
            [Arg::I64(2), Arg::Text("b".into()), Arg::OptTime(None)],
        ]);
        assert_eq!(
            sql.text,
            "SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[])"
        );
        assert!(matches!(&sql.args[0], Arg::I64s(v) if v == &[Some(1), Some(2)]));
        assert!(matches!(&sql.args[1], Arg::Texts(v) if v == &[None, Some("b".to_owned())]));
        assert!(matches!(&sql.args[2], Arg::Times(v) if v.len() == 2 && v[1].is_none()));
    }
}
