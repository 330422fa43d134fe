//! The batching ledger writer end to end: replicas batching against one
//! database, a batch whose transaction dies, a full queue, a caller that
//! gives up. Both backends where they apply.

use std::{collections::HashMap, time::Duration};

use billing_svc::{BillingOptions, writer::WriterConfig};
use igny8_db::on_pool;
use igny8_tests::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::Code;
use tonic_types::StatusExt;

const ACCOUNTS: i64 = 10;
const START: i64 = 1_000;

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

async fn seed_accounts(db: &TestDb) {
    for a in 1..=ACCOUNTS {
        db.account(a).credits(START).create().await;
        db.user(100 + a).account(a).role("editor").create().await;
    }
}

/// Two replicas × 200 concurrent deducts on 10 shared accounts, random keys
/// with deliberate repeats (same request: replay; different amount: key
/// reuse). Balances and ledgers exact, no deadlock, every reply correct.
async fn two_replicas_batch_exactly(b: Backend) {
    let db = TestDb::new(b).await;
    seed_accounts(&db).await;
    let replicas = [spawn_billing(&db).await, spawn_billing(&db).await];
    let mut rng = StdRng::seed_from_u64(7);
    // Per request: (replica, account, key, credits).
    let mut plan: Vec<(usize, i64, String, i64)> = Vec::new();
    for i in 0..400 {
        let account = rng.gen_range(1..=ACCOUNTS);
        let credits = rng.gen_range(1..=40);
        let key = if i > 20 && rng.gen_bool(0.2) {
            // Repeat an earlier key of this account: same or different amount.
            let earlier: Vec<&(usize, i64, String, i64)> =
                plan.iter().filter(|p| p.1 == account).collect();
            match earlier.last() {
                Some(p) if rng.gen_bool(0.5) => {
                    plan.push((i % 2, account, p.2.clone(), p.3));
                    continue;
                }
                Some(p) => p.2.clone(),
                None => format!("k{i}"),
            }
        } else {
            format!("k{i}")
        };
        plan.push((i % 2, account, key, credits));
    }
    let mut tasks = Vec::new();
    for (replica, account, key, credits) in plan.clone() {
        let mut c = replicas[replica]
            .billing(&access_token(100 + account, None), None)
            .await;
        tasks.push(tokio::spawn(async move {
            let r = c.deduct(deduct_credits(credits, &key)).await;
            (account, key, credits, r)
        }));
    }
    // Per (account, key): the one applied amount and transaction id.
    let mut applied: HashMap<(i64, String), (i64, i64)> = HashMap::new();
    let mut outcomes = Vec::new();
    for t in tasks {
        let (account, key, credits, r) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("no deadlock: every deduct answers")
            .unwrap();
        match &r {
            Ok(resp) => {
                let resp = resp.get_ref();
                let tx = resp.transaction.as_ref().unwrap();
                assert_eq!(tx.credits, -credits);
                let prev = applied.insert((account, key.clone()), (credits, tx.id));
                if let Some((c, id)) = prev {
                    assert_eq!((c, id), (credits, tx.id), "one effect per key");
                }
            }
            Err(e) => assert!(
                matches!(
                    reason(e).as_str(),
                    "INSUFFICIENT_CREDITS" | "IDEMPOTENCY_KEY_REUSED"
                ),
                "unexpected {e:?}"
            ),
        }
        outcomes.push((account, key, credits, r.map(|r| r.into_inner())));
    }
    // Every reply is consistent with what was applied.
    for (account, key, credits, r) in &outcomes {
        match (applied.get(&(*account, key.clone())), r) {
            (Some((c, _)), Err(e)) if reason(e) == "IDEMPOTENCY_KEY_REUSED" => {
                assert_ne!(c, credits, "key reuse only for a different request")
            }
            (Some((c, _)), Err(e)) => {
                // Balances only fall here, so a request refused for credits
                // while its key was applied must be a different request.
                assert_eq!(reason(e), "INSUFFICIENT_CREDITS");
                assert_ne!(c, credits);
            }
            (Some((c, _)), Ok(_)) => assert_eq!(c, credits),
            (None, Err(e)) => assert_eq!(reason(e), "INSUFFICIENT_CREDITS"),
            (None, Ok(_)) => unreachable!(),
        }
    }
    for a in 1..=ACCOUNTS {
        let charged: i64 = applied
            .iter()
            .filter(|((acc, _), _)| *acc == a)
            .map(|(_, (c, _))| c)
            .sum();
        let (sum, rows) = db.ledger_sum(a).await;
        assert_eq!(sum, -charged, "account {a}: ledger = applied deducts");
        assert_eq!(
            rows as usize,
            applied.keys().filter(|(acc, _)| *acc == a).count()
        );
        assert_eq!(db.balance(a).await, START + sum);
    }
}

/// A full queue answers RESOURCE_EXHAUSTED at once and changes nothing; the
/// rest are applied once the writer is free again.
async fn full_queue_is_refused_at_once(b: Backend) {
    let db = TestDb::new(b).await;
    seed_accounts(&db).await;
    let mut config = test_config(&db.url);
    config.pool.max_connections = 4;
    let options = BillingOptions {
        ledger: Some(WriterConfig {
            max_batch: 1,
            shards: 1,
            queue_capacity: 4,
            account_share: 4,
        }),
        ..Default::default()
    };
    let server = spawn_billing_with_options(config, options).await;
    let blocker = RowBlocker::hold(&db, 1).await;
    let token = access_token(101, None);
    let mut tasks = Vec::new();
    for i in 0..30 {
        let mut c = server.billing(&token, None).await;
        tasks.push(tokio::spawn(async move {
            c.deduct(deduct_credits(1, &format!("q{i}"))).await
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // While the writer is stuck, the overflow is refused without waiting.
    eventually(Duration::from_secs(10), "refusals", || {
        let done = tasks.iter().filter(|t| t.is_finished()).count();
        async move { done >= 20 }
    })
    .await;
    blocker.release().await;
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert_eq!(reason(&e), "LEDGER_OVERLOADED");
                refused += 1;
            }
        }
    }
    assert!(refused >= 20, "refused {refused}");
    assert!(ok >= 1);
    let (sum, rows) = db.ledger_sum(1).await;
    assert_eq!((sum, rows), (-ok, ok));
}

/// A caller whose deadline passes before its request is applied is dropped
/// from the batch: nothing is written for it.
async fn abandoned_requests_are_not_applied(b: Backend) {
    let db = TestDb::new(b).await;
    seed_accounts(&db).await;
    let server = spawn_billing(&db).await;
    let blocker = RowBlocker::hold(&db, 1).await;
    let token = access_token(101, None);
    let mut first = server.billing(&token, None).await;
    let stuck = tokio::spawn(async move { first.deduct(deduct_credits(1, "first")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = server.billing(&token, None).await;
    let mut req = tonic::Request::new(deduct_credits(1, "gave-up"));
    req.set_timeout(Duration::from_millis(300));
    let err = c.deduct(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    blocker.release().await;
    stuck.await.unwrap().unwrap();
    // Let the writer take its next batch, then check.
    let mut c = server.billing(&token, None).await;
    c.deduct(deduct_credits(1, "after")).await.unwrap();
    let keys: Vec<String> = on_pool!(&db.db, pool => sqlx::query_scalar(
        "SELECT idempotency_key FROM credit_ledger WHERE account_id = 1 ORDER BY id")
        .fetch_all(pool).await)
    .unwrap();
    assert_eq!(keys, ["first", "after"]);
}

/// A caller that gives up after its request joined a batch (here: the
/// batch waits on a lock past the caller's deadline) gets
/// DEADLINE_EXCEEDED, yet the batch still commits its request: the answer
/// is lost, not the change. The client's retry with the same key is then a
/// replay of that row, never a second charge.
async fn a_caller_that_gave_up_mid_batch_is_replayed_on_retry(b: Backend) {
    let db = TestDb::new(b).await;
    seed_accounts(&db).await;
    let server = spawn_billing(&db).await;
    let before = db.balance(1).await;
    let blocker = RowBlocker::hold(&db, 1).await;
    let mut c = server.billing(&access_token(101, None), None).await;
    // A second, long enough for the request to reach the writer however
    // loaded the machine, and shorter than the lock time-out (2 s).
    let mut req = tonic::Request::new(deduct_credits(7, "answer-lost"));
    req.set_timeout(Duration::from_secs(1));
    let err = c.deduct(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // The batch holding it still waits on the lock.
    tokio::time::sleep(Duration::from_millis(200)).await;
    blocker.release().await;
    // The same account's next request runs after that batch.
    let next = c.deduct(deduct_credits(1, "after")).await.expect("after");
    assert!(!next.into_inner().replayed);
    assert_eq!(
        db.ledger_sum(1).await,
        (-8, 2),
        "the abandoned batch did not commit its request"
    );
    let again = c
        .deduct(deduct_credits(7, "answer-lost"))
        .await
        .expect("retry")
        .into_inner();
    assert!(again.replayed, "the retry charged again: {again:?}");
    assert_eq!(again.balance, before - 7);
    assert_eq!(db.balance(1).await, before - 8);
    assert_eq!(db.ledger_sum(1).await, (-8, 2));
}

/// The largest batch the configuration allows fits every statement on both
/// backends (bound parameters, expression depth): 512 distinct deducts,
/// grants and reserves over 8 accounts in one go, all applied. On
/// PostgreSQL a batch is also bounded by its values' bytes, so the same
/// requests take more, smaller batches.
async fn largest_batch_fits(b: Backend) {
    use billing_svc::{
        ledger::{Entry, Kind, Ledger},
        writer::{MAX_BATCH_LIMIT, NewHold, Op},
    };
    let db = TestDb::new(b).await;
    seed_accounts(&db).await;
    let ledger = Ledger::with_config(
        db.db.clone(),
        WriterConfig {
            max_batch: MAX_BATCH_LIMIT,
            shards: 1,
            queue_capacity: 2 * MAX_BATCH_LIMIT,
            account_share: 2 * MAX_BATCH_LIMIT,
        },
    );
    let ops: Vec<(i64, Op)> = (0..MAX_BATCH_LIMIT)
        .map(|i| {
            let account = 1 + (i as i64 % 8);
            let key = format!("big-{i}");
            let op = match i % 3 {
                0 => Op::Reserve(NewHold {
                    credits: 1,
                    operation: String::new(),
                    quantity: 0,
                    description: "d".repeat(100),
                    metadata: [("k".to_owned(), "v".repeat(200))].into(),
                    idempotency_key: key.clone(),
                    request_hash: key,
                    actor: "test".into(),
                    ttl: Duration::from_secs(60),
                }),
                n => Op::Change(Entry {
                    kind: if n == 1 { Kind::Deduct } else { Kind::Grant },
                    credits: if n == 1 { -1 } else { 1 },
                    operation: String::new(),
                    quantity: 0,
                    description: "d".repeat(100),
                    metadata: Default::default(),
                    idempotency_key: key.clone(),
                    request_hash: key,
                    actor: "test".into(),
                }),
            };
            (account, op)
        })
        .collect();
    let answers = futures::future::join_all(
        ops.into_iter()
            .map(|(account, op)| ledger.writer().submit(account, op)),
    )
    .await;
    assert!(
        answers.iter().all(|a| a.is_ok()),
        "{:?}",
        answers.iter().find(|a| a.is_err())
    );
    let (batches, requests) = ledger.writer().metrics().totals();
    assert_eq!(requests, MAX_BATCH_LIMIT as u64);
    match b {
        // One statement can carry the largest batch.
        Backend::Sqlite => assert!(batches < 8, "{batches} batches for {requests} requests"),
        // Batches are bounded by their values' bytes too: ~450 bytes a
        // request here, 12 KiB a batch.
        Backend::Postgres => assert!(
            (16..64).contains(&batches),
            "{batches} batches for {requests} requests"
        ),
    }
    let mut total = 0;
    for a in 1..=8 {
        total += db.ledger_sum(a).await.1;
    }
    assert_eq!(
        total as usize,
        MAX_BATCH_LIMIT - MAX_BATCH_LIMIT.div_ceil(3)
    );
}

on_both_backends!(
    largest_batch_fits,
    two_replicas_batch_exactly,
    full_queue_is_refused_at_once,
    abandoned_requests_are_not_applied,
    a_caller_that_gave_up_mid_batch_is_replayed_on_retry,
);

/// A batch whose connection is killed mid-transaction acknowledges nothing
/// it did not commit: every caller gets either a committed result or
/// UNAVAILABLE, and a client retry with the same key is exactly-once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_acknowledges_nothing_uncommitted() {
    let db = TestDb::new(Backend::Postgres).await;
    seed_accounts(&db).await;
    let server = spawn_billing(&db).await;
    let blocker = RowBlocker::hold(&db, 1).await;
    let token = access_token(101, None);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = server.billing(&token, None).await;
        tasks.push(tokio::spawn(async move {
            c.deduct(deduct_credits(3, &format!("kill{i}"))).await
        }));
    }
    // Wait until the writer's batch is blocked on the row lock, then kill
    // its connection (as a database failover would).
    let pg = match &db.db {
        igny8_db::Db::Postgres(pool) => pool.clone(),
        igny8_db::Db::Sqlite(_) => unreachable!(),
    };
    eventually(
        Duration::from_secs(10),
        "a writer waiting on the lock",
        || {
            let pg = pg.clone();
            async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock'",
                )
                .fetch_one(&pg)
                .await
                .unwrap();
                n > 0
            }
        },
    )
    .await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock') t",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert!(killed >= 1);
    blocker.release().await;
    let mut acknowledged = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(r) => acknowledged.push((i, r.into_inner().transaction.unwrap().id)),
            Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        }
    }
    // Every acknowledged deduct is in the ledger exactly once.
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT idempotency_key, id FROM credit_ledger WHERE account_id = 1 ORDER BY id",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    for (i, id) in &acknowledged {
        assert!(rows.contains(&(format!("kill{i}"), *id)), "kill{i} lost");
    }
    // Clients retry everything with the same keys: exactly once each.
    let mut c = server.billing(&token, None).await;
    for i in 0..20 {
        c.deduct(deduct_credits(3, &format!("kill{i}")))
            .await
            .unwrap();
    }
    let (sum, n) = db.ledger_sum(1).await;
    assert_eq!((sum, n), (-60, 20));
    assert_eq!(db.balance(1).await, START - 60);
}

/// The writer keeps its connection from batch to batch while requests
/// keep coming. Connections cut between batches (a failover, an operator's
/// `pg_terminate_backend`) cost at most the batch that finds them dead:
/// those callers get UNAVAILABLE, the writer takes a fresh connection, the
/// next requests succeed, and client retries with the same keys are
/// exactly-once. Once idle, the writer gives its connection back, so the
/// server stops without waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_cost_at_most_a_batch_and_heal() {
    let db = TestDb::new(Backend::Postgres).await;
    seed_accounts(&db).await;
    let server = spawn_billing(&db).await;
    let token = access_token(101, None);
    let pg = match &db.db {
        igny8_db::Db::Postgres(pool) => pool.clone(),
        igny8_db::Db::Sqlite(_) => unreachable!(),
    };
    let mut c = server.billing(&token, None).await;
    let mut next = 0;
    let mut failed = Vec::new();
    for round in 0..5 {
        // Keep the writer busy, so its connection stays held.
        for _ in 0..20 {
            let key = format!("cut{next}");
            next += 1;
            if let Err(e) = c.deduct(deduct_credits(1, &key)).await {
                assert_eq!(e.code(), Code::Unavailable, "round {round}: {e:?}");
                failed.push(key);
            }
        }
        // Cut every connection the server has, the writer's among them.
        let killed: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
        )
        .fetch_one(&pg)
        .await
        .unwrap();
        assert!(killed >= 1, "round {round}: nothing to cut");
        // The batch after the cut may fail; the ones after it succeed.
        let mut healed = false;
        for _ in 0..3 {
            let key = format!("cut{next}");
            next += 1;
            match c.deduct(deduct_credits(1, &key)).await {
                Ok(_) => {
                    healed = true;
                    break;
                }
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable, "round {round}: {e:?}");
                    failed.push(key);
                }
            }
        }
        assert!(healed, "round {round}: the writer kept a dead connection");
    }
    assert!(
        failed.len() <= 10,
        "more than one failed batch per cut: {failed:?}"
    );
    for key in &failed {
        c.deduct(deduct_credits(1, key)).await.unwrap();
    }
    let (sum, n) = db.ledger_sum(1).await;
    assert_eq!((sum, n), (-next, next), "every key charged exactly once");
    assert_eq!(db.balance(1).await, START - next);
    // Idle now: the writer's connection goes back and the pool closes
    // within its bound instead of timing out on it.
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped = tokio::time::timeout(Duration::from_millis(1500), server.stop()).await;
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "server did not stop: {stopped:?}"
    );
}

/// A connection of `db` (PostgreSQL), for planning.
async fn pg_connection(db: &TestDb) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    let igny8_db::Db::Postgres(pg) = &db.db else {
        unreachable!()
    };
    pg.acquire().await.unwrap()
}

/// The plan of `EXECUTE <execute>`, one line per node.
async fn plan(conn: &mut sqlx::PgConnection, execute: &str) -> String {
    let lines: Vec<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN EXECUTE {execute}")))
            .fetch_all(conn)
            .await
            .unwrap();
    lines.join("\n")
}

/// Adds `rows` grants to account 1's ledger (without analysing it).
async fn grow_ledger(conn: &mut sqlx::PgConnection, rows: i64) {
    sqlx::query(
        "INSERT INTO credit_ledger (account_id, kind, credits, balance_after, \
         idempotency_key, request_hash, actor, created_at) \
         SELECT 1, 'grant', 1, g, 'k' || g, 'h', 'test', now() \
         FROM generate_series(1, $1) g",
    )
    .bind(rows)
    .execute(conn)
    .await
    .unwrap();
}

/// Idempotency-key lookups can only probe the unique index. On a fresh,
/// never-analysed ledger the planner costs every index alike, and a
/// connection keeps the generic plan it made then while the table grows: a
/// lookup planned on the newest-first index scanned every row of the
/// account per key (one hot account slowed ~10×). The newest-first index is
/// partial (`id > 0`, true of every row), so only the transaction pages,
/// which say `id > 0`, can use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lookups_can_only_probe_the_unique_index() {
    let db = TestDb::new(Backend::Postgres).await;
    seed_accounts(&db).await;
    let mut conn = pg_connection(&db).await;
    for step in [
        // The plan a connection would keep whatever the arguments.
        "SET plan_cache_mode = force_generic_plan",
        "PREPARE one(bigint, text, text) AS SELECT id FROM credit_ledger \
         WHERE account_id = $1 AND kind = $2 AND idempotency_key = $3",
        // The writer's batch lookup: one probe per key.
        "PREPARE batch(bigint[], text[], text[]) AS SELECT t.* \
         FROM unnest($1, $2, $3) AS k(k0, k1, k2) CROSS JOIN LATERAL \
         (SELECT id FROM credit_ledger WHERE account_id = k.k0 AND kind = k.k1 \
         AND idempotency_key = k.k2 OFFSET 0) AS t",
        "PREPARE page(bigint, bigint, bigint) AS SELECT id FROM credit_ledger \
         WHERE account_id = $1 AND id > 0 AND id < $2 ORDER BY id DESC LIMIT $3",
    ] {
        sqlx::query(step).execute(&mut *conn).await.unwrap();
    }
    for rows in [0, 20_000] {
        if rows > 0 {
            // Grown, still never analysed.
            grow_ledger(&mut conn, rows).await;
        }
        for lookup in [
            "one(1, 'deduct', 'x')",
            "batch(ARRAY[1, 1]::bigint[], ARRAY['deduct', 'deduct'], ARRAY['x', 'y'])",
        ] {
            let plan = plan(&mut conn, lookup).await;
            assert!(
                plan.contains("credit_ledger_idempotency") && !plan.contains("pages_idx"),
                "{rows} rows, {lookup}:\n{plan}"
            );
        }
        let page = plan(&mut conn, "page(1, 9223372036854775807, 50)").await;
        assert!(
            page.contains("credit_ledger_account_pages_idx"),
            "{rows} rows:\n{page}"
        );
    }
}

/// Every statement of the ledger writer, planned as its connections plan
/// them (one generic plan per connection, kept while the tables grow),
/// reads and writes through index probes: planned on a nearly empty,
/// never-analysed database, and still so once the ledger, the holds and the
/// accounts have grown (the plan is the one made first). Without the
/// writer's session settings, four of them planned a sequential scan on
/// the empty tables and kept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_statements_plan_as_index_probes() {
    let db = TestDb::new(Backend::Postgres).await;
    seed_accounts(&db).await;
    let mut conn = pg_connection(&db).await;
    for (name, value) in billing_svc::writer::WRITER_SESSION {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET {name} = '{value}'")))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let statements = billing_svc::writer::postgres_statements();
    for (i, text) in statements.iter().enumerate() {
        sqlx::query(sqlx::AssertSqlSafe(format!("PREPARE w{i} AS {text}")))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{text}: {e}"));
    }
    let mut scans = Vec::new();
    for grown in [false, true] {
        if grown {
            grow_ledger(&mut conn, 20_000).await;
            for step in [
                "INSERT INTO accounts (id, name, status, credits, created_at, updated_at) \
                 SELECT g, 'a' || g, 'active', 1000, now(), now() FROM generate_series(1000, 20999) g",
                "INSERT INTO credit_holds (id, account_id, state, credits, idempotency_key, \
                 request_hash, actor, created_at, expires_at_us, closed_at) \
                 SELECT 'hold_' || g, 1, 'released', 1, 'r' || g, 'h', 'test', now(), 0, now() \
                 FROM generate_series(1, 20000) g",
            ] {
                sqlx::query(step).execute(&mut *conn).await.unwrap();
            }
        }
        for (i, text) in statements.iter().enumerate() {
            let params = (1..)
                .take_while(|n| text.contains(&format!("${n}")))
                .count();
            let nulls = vec!["NULL"; params].join(", ");
            let plan = plan(&mut conn, &format!("w{i}({nulls})")).await;
            if ["Seq Scan", "Hash Join", "Merge Join", "pages_idx"]
                .iter()
                .any(|bad| plan.contains(bad))
            {
                scans.push(format!("grown: {grown}\n{text}\n{plan}"));
            }
        }
    }
    assert!(scans.is_empty(), "{}", scans.join("\n\n"));
}

/// Holds an account's row lock (PostgreSQL) or the database write lock
/// (SQLite) from a separate connection until released, so the writer's next
/// batch waits.
struct RowBlocker {
    done: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RowBlocker {
    async fn hold(db: &TestDb, account: i64) -> Self {
        let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
        let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
        let pool = db.db.clone();
        let task = tokio::spawn(async move {
            match pool {
                igny8_db::Db::Postgres(pg) => {
                    let mut tx = pg.begin().await.unwrap();
                    sqlx::query("SELECT credits FROM accounts WHERE id = $1 FOR UPDATE")
                        .bind(account)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    let _ = locked_tx.send(());
                    let _ = done_rx.await;
                    tx.rollback().await.unwrap();
                }
                igny8_db::Db::Sqlite(lite) => {
                    use igny8_db::BeginWrite;
                    let tx = lite.begin_write().await.unwrap();
                    let _ = locked_tx.send(());
                    let _ = done_rx.await;
                    tx.rollback().await.unwrap();
                }
            }
        });
        locked_rx.await.unwrap();
        Self { done, task }
    }

    async fn release(self) {
        let _ = self.done.send(());
        self.task.await.unwrap();
    }
}

/// A ledger on `db` whose writer has one shard and batches of at most 16.
fn one_shard_ledger(db: &TestDb) -> billing_svc::ledger::Ledger {
    billing_svc::ledger::Ledger::with_config(
        db.db.clone(),
        WriterConfig {
            max_batch: 16,
            shards: 1,
            queue_capacity: 64,
            account_share: 64,
        },
    )
}

/// A 1-credit deduct straight to the writer, fingerprinted by its key.
fn deduct_entry(key: &str) -> billing_svc::ledger::Entry {
    billing_svc::ledger::Entry {
        kind: billing_svc::ledger::Kind::Deduct,
        credits: -1,
        operation: String::new(),
        quantity: 0,
        description: String::new(),
        metadata: Default::default(),
        idempotency_key: key.into(),
        request_hash: key.into(),
        actor: "test".into(),
    }
}

/// A request the database refuses (here a NUL byte PostgreSQL cannot store,
/// sent straight to the writer past the API's validation) fails alone: the
/// rest of its batch is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_does_not_fail_its_batch() {
    use billing_svc::{error::BillingError, ledger::Entry, writer::Op};
    let db = TestDb::new(Backend::Postgres).await;
    seed_accounts(&db).await;
    let ledger = one_shard_ledger(&db);
    let entry = |key: &str, description: &str| {
        Op::Change(Entry {
            description: description.into(),
            ..deduct_entry(key)
        })
    };
    // Occupy the writer with a batch stuck on a row lock, so the next three
    // queue up and are taken as one batch.
    let blocker = RowBlocker::hold(&db, 1).await;
    let first = {
        let writer = ledger.writer().clone();
        let op = entry("first", "fine");
        tokio::spawn(async move { writer.submit(1, op).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ops = vec![
        entry("a", "fine"),
        entry("b", "nul\0byte"),
        entry("c", "fine"),
    ];
    let release = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        blocker.release().await;
    };
    let (answers, ()) = tokio::join!(
        futures::future::join_all(ops.into_iter().map(|op| ledger.writer().submit(1, op))),
        release
    );
    first.await.unwrap().unwrap();
    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    assert!(
        matches!(answers[1], Err(BillingError::WriteFailed)),
        "{:?}",
        answers[1]
    );
    assert!(answers[2].is_ok(), "{:?}", answers[2]);
    assert_eq!(db.ledger_sum(1).await, (-3, 3));
    // Committed: "first", then "a" and "c" each alone after their batch
    // with "b" failed.
    assert_eq!(ledger.writer().metrics().totals(), (3, 3));
}

/// A batch locks its accounts and looks up its keys in one statement, whose
/// snapshot predates its wait for the lock. When another replica commits a
/// row for one of the batch's keys during that wait, the batch's insert
/// meets the unique index, and the batch is applied again: the request
/// replays that row, and the account is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_committed_elsewhere_during_the_lock_wait_is_replayed() {
    use billing_svc::{
        ledger::Entry,
        writer::{Done, Op},
    };
    let db = TestDb::new(Backend::Postgres).await;
    seed_accounts(&db).await;
    let igny8_db::Db::Postgres(pg) = &db.db else {
        unreachable!()
    };
    let ledger = one_shard_ledger(&db);
    let mut other = pg.begin().await.unwrap();
    sqlx::query("SELECT credits FROM accounts WHERE id = 1 FOR UPDATE")
        .execute(&mut *other)
        .await
        .unwrap();
    let writer = ledger.writer().clone();
    let waiting = tokio::spawn(async move {
        writer
            .submit(
                1,
                Op::Change(Entry {
                    credits: -5,
                    request_hash: "same-request".into(),
                    ..deduct_entry("k")
                }),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The other replica charges the same request, and commits.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO credit_ledger (account_id, kind, credits, balance_after, \
         idempotency_key, request_hash, actor, created_at) \
         VALUES (1, 'deduct', -5, $1, 'k', 'same-request', 'test', now()) RETURNING id",
    )
    .bind(START - 5)
    .fetch_one(&mut *other)
    .await
    .unwrap();
    sqlx::query("UPDATE accounts SET credits = credits - 5 WHERE id = 1")
        .execute(&mut *other)
        .await
        .unwrap();
    other.commit().await.unwrap();
    match waiting.await.unwrap() {
        Ok(Done::Row { row, replayed }) => {
            assert!(replayed, "a replay of the committed row");
            assert_eq!(row.id, id);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(db.ledger_sum(1).await, (-5, 1));
    assert_eq!(db.balance(1).await, START - 5);
}

/// Between batches the writer's PostgreSQL connection waits in the empty
/// transaction its last `COMMIT; BEGIN` opened; once idle, the connection
/// goes back to the pool outside any transaction, and the next batch
/// begins again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_writer_gives_back_a_connection_outside_any_transaction() {
    let db = TestDb::new(Backend::Postgres).await;
    seed_accounts(&db).await;
    let igny8_db::Db::Postgres(pg) = &db.db else {
        unreachable!()
    };
    let ledger = one_shard_ledger(&db);
    let deduct = |key: &str| billing_svc::writer::Op::Change(deduct_entry(key));
    let states = || async {
        let states: Vec<String> = sqlx::query_scalar(
            "SELECT state FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND backend_type = 'client backend' ORDER BY state",
        )
        .fetch_all(pg)
        .await
        .unwrap();
        states
    };
    ledger.writer().submit(1, deduct("one")).await.unwrap();
    assert!(
        states().await.contains(&"idle in transaction".to_owned()),
        "the next batch's transaction is open: {:?}",
        states().await
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let idle = states().await;
    assert!(
        !idle.is_empty() && idle.iter().all(|s| s == "idle"),
        "given back outside any transaction: {idle:?}"
    );
    ledger.writer().submit(1, deduct("two")).await.unwrap();
    assert_eq!(db.ledger_sum(1).await, (-2, 2));
}

/// Each committed batch notifies `igny8_balance` once per changed account,
/// from inside its transaction; refused requests notify nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_batches_notify_once_per_account() {
    use billing_svc::{
        ledger::{Entry, Ledger},
        writer::Op,
    };
    let db = TestDb::new(Backend::Postgres).await;
    seed_accounts(&db).await;
    let igny8_db::Db::Postgres(pg) = &db.db else {
        unreachable!()
    };
    let mut listener = sqlx::postgres::PgListener::connect_with(pg).await.unwrap();
    listener.listen(billing_svc::BALANCE_CHANNEL).await.unwrap();
    let ledger = Ledger::new(db.db.clone());
    let deduct = |key: &str, credits: i64| {
        Op::Change(Entry {
            credits: -credits,
            ..deduct_entry(key)
        })
    };
    // Refused: nothing changes, nothing is sent.
    assert!(
        ledger
            .writer()
            .submit(3, deduct("x", START + 1))
            .await
            .is_err()
    );
    ledger.writer().submit(3, deduct("a", 1)).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification")
        .unwrap();
    assert_eq!(n.payload(), "3");
    // Nothing else is pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.recv())
            .await
            .is_err()
    );
}
