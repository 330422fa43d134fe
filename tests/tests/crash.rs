//! The real `billing-svc` binary killed with SIGKILL in the middle of a
//! load of deducts, then started again on the same port against the same
//! database, twice, while every client retries each call with its own
//! idempotency key until it is answered.
//!
//! Every key ends up as exactly one ledger row: a call whose batch committed
//! before the kill but whose answer was lost is replayed on retry, never
//! charged twice; one that was not committed is applied by the retry. Every
//! answer a client got names that row and its balance, and the balance is
//! the starting credits less one charge per key. Both backends.
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

use auth_interceptor::BearerInterceptor;
use igny8_db::on_pool;
use igny8_proto::billing::v1::billing_service_client::BillingServiceClient;
use igny8_tests::*;
use tonic::{Code, transport::Channel};

const ACCOUNT: i64 = 1;
const CREDITS: i64 = 1_000_000;
const CHARGE: i64 = 3;
const CLIENTS: usize = 12;
const KEYS_PER_CLIENT: usize = 40;
const BILLING: &str = igny8_proto::BILLING_SERVICE_NAME;

/// What a client was finally told for one key.
#[derive(Debug, Clone)]
struct Answer {
    transaction_id: i64,
    balance: i64,
    replayed: bool,
}

/// The codes a call can end with when the server dies under it or is not
/// listening yet: retried with the same key. Anything else is a wrong
/// answer for a valid deduct on a funded account.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Calls Deduct for each of `keys` in turn, retrying each until it is
/// answered; counts acknowledged keys in `done`.
async fn client_loop(
    addr: SocketAddr,
    token: String,
    keys: Vec<String>,
    done: Arc<AtomicUsize>,
) -> Vec<(String, Answer, Vec<Code>)> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let mut client = BillingServiceClient::with_interceptor(
        channel,
        BearerInterceptor::new(token.as_str()).expect("ascii token"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut answers = Vec::with_capacity(keys.len());
    for key in keys {
        let mut failures = Vec::new();
        let answer = loop {
            match client.deduct(deduct_credits(CHARGE, &key)).await {
                Ok(response) => {
                    let r = response.into_inner();
                    break Answer {
                        transaction_id: r.transaction.expect("a ledger row").id,
                        balance: r.balance,
                        replayed: r.replayed,
                    };
                }
                Err(status) => {
                    assert!(
                        retryable(status.code()),
                        "key {key}: {status:?} is not an answer a retry should see"
                    );
                    failures.push(status.code());
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "key {key} still unanswered after 90 s: {failures:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        done.fetch_add(1, Ordering::Relaxed);
        answers.push((key, answer, failures));
    }
    answers
}

async fn start(db: &TestDb, addr: SocketAddr) -> Process {
    Process::start_at("billing-svc", BILLING, &db.url, addr, &[], Stdio::null()).await
}

/// Waits until at least `n` keys were acknowledged.
async fn until_done(done: &AtomicUsize, n: usize) {
    eventually(
        Duration::from_secs(60),
        &format!("{n} deducts acknowledged"),
        || async { done.load(Ordering::Relaxed) >= n },
    )
    .await;
}

/// The account's ledger rows: id and balance after, by idempotency key.
async fn ledger_by_key(db: &TestDb) -> (HashMap<String, (i64, i64)>, usize) {
    let rows: Vec<(String, i64, i64)> = on_pool!(&db.db, pool => sqlx::query_as(
        "SELECT idempotency_key, id, balance_after FROM credit_ledger WHERE account_id = $1")
        .bind(ACCOUNT)
        .fetch_all(pool)
        .await)
    .expect("ledger rows");
    let count = rows.len();
    let by_key = rows
        .into_iter()
        .map(|(key, id, after)| (key, (id, after)))
        .collect();
    (by_key, count)
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

    let (ledger, rows) = ledger_by_key(&db).await;
    assert_eq!(rows, total, "one ledger row per key, no more");
    let mut retried = 0;
    let mut replays = 0;
    for (key, answer, failures) in &answers {
        let &(id, after) = ledger
            .get(key)
            .unwrap_or_else(|| panic!("key {key} was acknowledged but has no ledger row"));
        assert_eq!(
            (answer.transaction_id, answer.balance),
            (id, after),
            "key {key}: the answer names another row than the ledger holds"
        );
        retried += usize::from(!failures.is_empty());
        replays += usize::from(answer.replayed);
        assert!(
            !answer.replayed || !failures.is_empty(),
            "key {key} replayed without having been sent before"
        );
    }
    if let Disruption::Kill = disruption {
        // A cut connection costs at most the batch in flight on it, which
        // may be empty at that instant; a kill always cuts the calls.
        assert!(retried > 0, "no call was cut by the kills");
    }
    assert_eq!(db.balance(ACCOUNT).await, CREDITS - CHARGE * total as i64);
    assert_eq!(
        db.ledger_sum(ACCOUNT).await,
        (-CHARGE * total as i64, total as i64)
    );
    eprintln!(
        "{backend:?}, {disruption:?}: {total} keys, {retried} retried, {replays} of them replayed"
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
