//! The real `billing-svc` binary killed with SIGKILL in the middle of a
//! load of deducts, then started again on the same port against the same
//! database, twice, while every client retries each call with its own
//! idempotency key until it is answered.
//!
//! A key is a Deduct, or (every fourth) a Reserve and a CaptureHold of the
//! same hold. Every key ends up as exactly one ledger row (and one captured
//! hold): a call whose batch committed before the kill but whose answer was
//! lost is replayed on retry, never charged twice; one that was not
//! committed is applied by the retry. Every answer a client got names that
//! row and its balance, and the balance is the starting credits less one
//! charge per key. Both backends.
//!
//! The same load on PostgreSQL with every database connection the server
//! holds cut twice (`pg_terminate_backend`) instead: the same outcome.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use igny8_db::on_pool;
use igny8_proto::billing::v1::{
    CaptureHoldRequest, ReserveRequest, capture_hold_request, reserve_request,
};
use igny8_tests::*;
use tonic::Code;

const ACCOUNT: i64 = 1;
const CREDITS: i64 = 1_000_000;
const CHARGE: i64 = 3;
const CLIENTS: usize = 12;
const KEYS_PER_CLIENT: usize = 60;
const BILLING: &str = igny8_proto::BILLING_SERVICE_NAME;

/// What a client was finally told for one key: a Deduct's row, or the
/// CAPTURE row of a hold reserved under the key and then captured.
#[derive(Debug, Clone)]
struct Answer {
    key: String,
    /// The hold, for a reserve-and-capture key.
    hold_id: Option<String>,
    transaction_id: i64,
    balance: i64,
    /// Any of the key's calls was a replay.
    replayed: bool,
    /// The failed attempts before the answers.
    failures: Vec<Code>,
}

/// The codes a call can end with when the server dies under it or is not
/// listening yet: retried with the same request. Anything else is a wrong
/// answer for a valid call on a funded account.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Makes the call `$call` until it is answered, retrying what
/// [`retryable`] allows (the same request each time) and adding the
/// failures seen to `$failures`; evaluates to the response message.
macro_rules! answered {
    ($what:expr, $failures:expr, $call:expr) => {{
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            match $call.await {
                Ok(response) => break response.into_inner(),
                Err(status) => {
                    assert!(
                        retryable(status.code()),
                        "{}: {status:?} is not an answer a retry should see",
                        $what
                    );
                    $failures.push(status.code());
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{} still unanswered after 90 s: {:?}",
                        $what,
                        $failures
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }};
}

/// Every fourth key is a hold: Reserve twice the charge, then capture the
/// charge.
fn is_hold(k: usize) -> bool {
    k % 4 == 3
}

/// Charges `CHARGE` once per key in turn (Deduct, or Reserve and
/// CaptureHold), retrying each call until it is answered; counts answered
/// keys in `done`.
async fn client_loop(
    addr: SocketAddr,
    token: String,
    keys: Vec<String>,
    done: Arc<AtomicUsize>,
) -> Vec<Answer> {
    // The harness's client: its channel connects again after the server
    // went away, on the next call.
    let mut client = Running::at(addr).billing(&token, None).await;
    let mut answers = Vec::with_capacity(keys.len());
    for (k, key) in keys.into_iter().enumerate() {
        let mut failures = Vec::new();
        let answer = if is_hold(k) {
            let reserve = ReserveRequest {
                cost: Some(reserve_request::Cost::Credits(2 * CHARGE)),
                idempotency_key: key.clone(),
                ..Default::default()
            };
            let reserved = answered!(
                format!("reserve {key}"),
                failures,
                client.reserve(reserve.clone())
            );
            let hold_id = reserved.hold.expect("a hold").id;
            let capture = CaptureHoldRequest {
                hold_id: hold_id.clone(),
                amount: Some(capture_hold_request::Amount::Credits(CHARGE)),
            };
            let captured = answered!(
                format!("capture {key}"),
                failures,
                client.capture_hold(capture.clone())
            );
            Answer {
                key,
                hold_id: Some(hold_id),
                transaction_id: captured.transaction.expect("a capture row").id,
                balance: captured.balance,
                replayed: reserved.replayed || captured.replayed,
                failures,
            }
        } else {
            let request = deduct_credits(CHARGE, &key);
            let r = answered!(
                format!("deduct {key}"),
                failures,
                client.deduct(request.clone())
            );
            Answer {
                key,
                hold_id: None,
                transaction_id: r.transaction.expect("a ledger row").id,
                balance: r.balance,
                replayed: r.replayed,
                failures,
            }
        };
        done.fetch_add(1, Ordering::Relaxed);
        answers.push(answer);
    }
    answers
}

async fn start(db: &TestDb, addr: SocketAddr) -> Process {
    Process::start_at("billing-svc", BILLING, &db.url, addr, &[], Stdio::null()).await
}

/// Waits until at least `n` keys were acknowledged, looking every
/// millisecond so that the disruption lands while the load still runs.
async fn until_done(done: &AtomicUsize, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::Relaxed) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} keys not acknowledged within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The account's ledger rows by id: kind, idempotency key, balance after.
async fn ledger_rows(db: &TestDb) -> HashMap<i64, (String, String, i64)> {
    let rows: Vec<(i64, String, String, i64)> = on_pool!(&db.db, pool => sqlx::query_as(
        "SELECT id, kind, idempotency_key, balance_after FROM credit_ledger WHERE account_id = $1")
        .bind(ACCOUNT)
        .fetch_all(pool)
        .await)
    .expect("ledger rows");
    rows.into_iter()
        .map(|(id, kind, key, after)| (id, (kind, key, after)))
        .collect()
}

/// The account's holds: id → (idempotency key, state, captured credits,
/// capture row).
async fn holds(db: &TestDb) -> HashMap<String, (String, String, i64, Option<i64>)> {
    let rows: Vec<(String, String, String, i64, Option<i64>)> =
        on_pool!(&db.db, pool => sqlx::query_as(
        "SELECT id, idempotency_key, state, captured_credits, transaction_id \
         FROM credit_holds WHERE account_id = $1")
        .bind(ACCOUNT)
        .fetch_all(pool)
        .await)
        .expect("holds");
    rows.into_iter()
        .map(|(id, key, state, captured, row)| (id, (key, state, captured, row)))
        .collect()
}

/// What happens to the server mid-load.
#[derive(Debug, Clone, Copy)]
enum Disruption {
    /// SIGKILL, then the binary started again on the same port.
    Kill,
    /// Every connection to the database terminated by the database.
    CutDatabase,
}

/// Terminates every other session on the test database; returns how many.
async fn cut_database_connections(db: &TestDb) -> i64 {
    on_pool!(&db.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()) t")
        .fetch_one(pool)
        .await)
    .expect("terminate backends")
}

async fn disrupted_mid_load_applies_every_key_once(backend: Backend, disruption: Disruption) {
    let db = TestDb::new(backend).await;
    db.account(ACCOUNT).credits(CREDITS).create().await;
    for c in 0..CLIENTS as i64 {
        db.user(100 + c)
            .account(ACCOUNT)
            .role("editor")
            .create()
            .await;
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut server = start(&db, addr).await;

    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let keys = (0..KEYS_PER_CLIENT)
                .map(|k| format!("crash-{c}-{k}"))
                .collect();
            tokio::spawn(client_loop(
                addr,
                access_token(100 + c as i64, None),
                keys,
                done.clone(),
            ))
        })
        .collect();
    let total = CLIENTS * KEYS_PER_CLIENT;

    // Disrupted twice with calls in flight.
    for share in [3, 6] {
        until_done(&done, total * share / 10).await;
        match disruption {
            Disruption::Kill => {
                server.child.kill().expect("SIGKILL billing-svc");
                server.child.wait().expect("reap billing-svc");
            }
            Disruption::CutDatabase => {
                assert!(cut_database_connections(&db).await >= 1, "nothing to cut");
            }
        }
        assert!(
            done.load(Ordering::Relaxed) < total,
            "every key was answered before the disruption: the load ended too soon"
        );
        if let Disruption::Kill = disruption {
            tokio::time::sleep(Duration::from_millis(200)).await;
            server = start(&db, addr).await;
        }
    }

    let mut answers = Vec::with_capacity(total);
    for client in clients {
        answers.extend(client.await.expect("client task"));
    }
    drop(server);

    let ledger = ledger_rows(&db).await;
    let holds = holds(&db).await;
    let held = answers.iter().filter(|a| a.hold_id.is_some()).count();
    assert_eq!(ledger.len(), total, "one ledger row per key, no more");
    assert_eq!(holds.len(), held, "one hold per reserve key, no more");
    for a in &answers {
        let key = &a.key;
        let (kind, row_key, after) = ledger
            .get(&a.transaction_id)
            .unwrap_or_else(|| panic!("key {key}: its answer names no ledger row"));
        assert_eq!(
            *after, a.balance,
            "key {key}: the answer's balance is not its row's"
        );
        match &a.hold_id {
            None => assert_eq!((kind.as_str(), row_key), ("deduct", key)),
            Some(hold) => {
                assert_eq!(kind, "capture", "key {key}");
                let (hold_key, state, captured, row) = &holds[hold];
                assert_eq!(
                    (hold_key, state.as_str(), *captured, *row),
                    (key, "captured", CHARGE, Some(a.transaction_id)),
                    "key {key}: the hold"
                );
            }
        }
        assert!(
            !a.replayed || !a.failures.is_empty(),
            "key {key} replayed without having been sent before"
        );
    }
    let retried = answers.iter().filter(|a| !a.failures.is_empty()).count();
    let replays = answers.iter().filter(|a| a.replayed).count();
    if let Disruption::Kill = disruption {
        // A cut connection costs at most the batch in flight on it, which
        // may be empty at that instant; a kill always cuts the calls.
        assert!(retried > 0, "no call was cut by the kills");
    }
    let charged = CHARGE * total as i64;
    assert_eq!(db.balance(ACCOUNT).await, CREDITS - charged);
    assert_eq!(db.ledger_sum(ACCOUNT).await, (-charged, total as i64));
    eprintln!(
        "{backend:?}, {disruption:?}: {total} keys ({held} holds), {retried} retried, {replays} of them replayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_postgres() {
    disrupted_mid_load_applies_every_key_once(Backend::Postgres, Disruption::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_sqlite() {
    disrupted_mid_load_applies_every_key_once(Backend::Sqlite, Disruption::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_cut_mid_load_postgres() {
    disrupted_mid_load_applies_every_key_once(Backend::Postgres, Disruption::CutDatabase).await;
}
