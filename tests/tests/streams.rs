//! WatchBalance and WatchModuleSettings end to end (docs/api.md "Live changes"): the current
//! state first, then every change — from the same process, and on
//! PostgreSQL from another replica — the low-balance alert, slow readers,
//! access re-checks, drain, the CheckModule cache across replicas, and
//! grpcurl against the real binary.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use igny8_proto::{
    billing::v1::{
        ReleaseHoldRequest, ReserveRequest, WatchBalanceRequest, WatchBalanceResponse,
        billing_service_client::BillingServiceClient, reserve_request,
    },
    settings::v1::{
        CheckModuleRequest, Module, ModuleSettings, UpdateModuleSettingsRequest,
        WatchModuleSettingsRequest, WatchModuleSettingsResponse,
    },
};
use igny8_tests::*;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;

const A1: i64 = 1;
const A2: i64 = 2;
const EDITOR: i64 = 10;
const ADMIN: i64 = 11;
const VIEWER: i64 = 12;

/// How long a message may take before the test gives up: generous on a
/// noisy 2-core machine; the delays are measured and printed, not asserted.
const ARRIVAL: Duration = Duration::from_secs(10);

async fn seed(b: Backend, credits: i64) -> TestDb {
    let db = TestDb::new(b).await;
    db.account(A1).credits(credits).create().await;
    db.account(A2).credits(5).create().await;
    db.user(EDITOR).account(A1).role("editor").create().await;
    db.user(ADMIN).account(A1).role("admin").create().await;
    db.user(VIEWER).account(A1).role("viewer").create().await;
    db
}

async fn next<T>(stream: &mut Streaming<T>) -> T {
    match tokio::time::timeout(ARRIVAL, stream.message()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => panic!("stream ended without a status"),
        Ok(Err(status)) => panic!("stream failed: {status:?}"),
        Err(_) => panic!("no message within {ARRIVAL:?}"),
    }
}

/// Reads until the stream ends and returns the status it ended with.
async fn ends_with<T: std::fmt::Debug>(stream: &mut Streaming<T>, within: Duration) -> Status {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("stream ended OK; expected an error status"),
            Ok(Err(status)) => return status,
            Err(_) => panic!("stream still open after {within:?}"),
        }
    }
}

fn balance(m: &WatchBalanceResponse) -> (i64, i64, i64, bool) {
    (m.balance, m.held, m.available, m.low_balance)
}

fn watch(threshold: i64) -> WatchBalanceRequest {
    WatchBalanceRequest {
        low_balance_threshold: threshold,
    }
}

fn reserve(credits: i64, key: &str, ttl: Duration) -> ReserveRequest {
    ReserveRequest {
        cost: Some(reserve_request::Cost::Credits(credits)),
        idempotency_key: key.into(),
        ttl: Some(prost_types::Duration {
            seconds: i64::try_from(ttl.as_secs()).unwrap(),
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn switch(field: &str, on: bool) -> UpdateModuleSettingsRequest {
    let mut s = ModuleSettings::default();
    match field {
        "writer_enabled" => s.writer_enabled = on,
        "planner_enabled" => s.planner_enabled = on,
        other => panic!("test helper does not know {other}"),
    }
    UpdateModuleSettingsRequest {
        settings: Some(s),
        update_mask: Some(prost_types::FieldMask {
            paths: vec![field.to_owned()],
        }),
    }
}

fn settings_of(m: WatchModuleSettingsResponse) -> ModuleSettings {
    m.settings.expect("settings")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

async fn balance_stream_first_then_every_change(b: Backend) {
    let db = seed(b, 100).await;
    let server = spawn_billing(&db).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let mut s = c.watch_balance(watch(0)).await.unwrap().into_inner();
    let first = next(&mut s).await;
    assert_eq!(first.account_id, A1);
    assert_eq!(balance(&first), (100, 0, 100, false));

    c.deduct(deduct_credits(10, "d1")).await.unwrap();
    assert_eq!(balance(&next(&mut s).await), (90, 0, 90, false));
    // A replay changes nothing and sends nothing; the next change does.
    c.deduct(deduct_credits(10, "d1")).await.unwrap();
    c.deduct(deduct_credits(5, "d2")).await.unwrap();
    assert_eq!(balance(&next(&mut s).await), (85, 0, 85, false));

    let hold = c
        .reserve(reserve(20, "r1", Duration::from_secs(900)))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(balance(&next(&mut s).await), (85, 20, 65, false));
    c.release_hold(ReleaseHoldRequest { hold_id: hold.id })
        .await
        .unwrap();
    assert_eq!(balance(&next(&mut s).await), (85, 0, 85, false));

    // A hold that expires changes `available` with no write at all: the
    // stream wakes at the expiry.
    c.reserve(reserve(30, "r2", Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(balance(&next(&mut s).await), (85, 30, 55, false));
    let expired = next(&mut s).await;
    assert_eq!(balance(&expired), (85, 0, 85, false), "the hold expired");

    // Another account's changes never reach this stream.
    let mut other = server.billing(&service_token("ops"), Some(A2)).await;
    other.deduct(deduct_credits(1, "other")).await.unwrap();
    c.deduct(deduct_credits(1, "d3")).await.unwrap();
    assert_eq!(balance(&next(&mut s).await), (84, 0, 84, false));
}

async fn low_balance_alerts_once_per_crossing(b: Backend) {
    let db = seed(b, 100).await;
    let server = spawn_billing(&db).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;

    let refused = c.watch_balance(watch(-1)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("low_balance_threshold"),
        "{refused:?}"
    );

    let mut s = c.watch_balance(watch(50)).await.unwrap().into_inner();
    assert_eq!(balance(&next(&mut s).await), (100, 0, 100, false));
    c.deduct(deduct_credits(40, "d1")).await.unwrap();
    assert_eq!(balance(&next(&mut s).await), (60, 0, 60, false));
    c.deduct(deduct_credits(20, "d2")).await.unwrap();
    assert_eq!(
        balance(&next(&mut s).await),
        (40, 0, 40, true),
        "first below"
    );
    c.deduct(deduct_credits(5, "d3")).await.unwrap();
    assert_eq!(
        balance(&next(&mut s).await),
        (35, 0, 35, false),
        "still below: no second alert"
    );
    // A hold counts: available is what matters.
    let mut dev = server.billing(&service_token("ops"), Some(A1)).await;
    dev.grant(igny8_proto::billing::v1::GrantRequest {
        credits: 100,
        idempotency_key: "g1".into(),
        reason: "top-up".into(),
    })
    .await
    .unwrap();
    assert_eq!(balance(&next(&mut s).await), (135, 0, 135, false));
    c.reserve(reserve(100, "r1", Duration::from_secs(900)))
        .await
        .unwrap();
    assert_eq!(
        balance(&next(&mut s).await),
        (135, 100, 35, true),
        "falls below again after recovering: alerts again"
    );

    // Already below when the stream opens: the first message says so.
    let mut low = c.watch_balance(watch(1000)).await.unwrap().into_inner();
    assert_eq!(balance(&next(&mut low).await), (135, 100, 35, true));
}

async fn settings_stream_first_then_every_change(b: Backend) {
    let db = seed(b, 0).await;
    let server = spawn_settings(&db).await;
    let mut viewer = server.settings(&access_token(VIEWER, None), None).await;
    let mut admin = server.settings(&access_token(ADMIN, None), None).await;
    let mut s = viewer
        .watch_module_settings(WatchModuleSettingsRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = settings_of(next(&mut s).await);
    assert_eq!(first.account_id, A1);
    assert!(first.writer_enabled && first.planner_enabled && first.publisher_enabled);

    admin
        .update_module_settings(switch("writer_enabled", false))
        .await
        .unwrap();
    let second = settings_of(next(&mut s).await);
    assert!(!second.writer_enabled && second.planner_enabled);
    admin
        .update_module_settings(switch("planner_enabled", false))
        .await
        .unwrap();
    let third = settings_of(next(&mut s).await);
    assert!(!third.writer_enabled && !third.planner_enabled);
    admin
        .update_module_settings(switch("writer_enabled", true))
        .await
        .unwrap();
    let fourth = settings_of(next(&mut s).await);
    assert!(fourth.writer_enabled && !fourth.planner_enabled);

    // Every role of docs/api.md "Roles" may watch; a service needs act-as.
    let mut svc = server.settings(&service_token("worker"), None).await;
    let refused = svc
        .watch_module_settings(WatchModuleSettingsRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let mut svc = server.settings(&service_token("worker"), Some(A1)).await;
    let mut s2 = svc
        .watch_module_settings(WatchModuleSettingsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!settings_of(next(&mut s2).await).planner_enabled);
}

/// Streams re-check access every `IGNY8_STREAM_RECHECK_SECS` (1 s here):
/// removed, moved or deactivated users lose their streams; others keep them.
async fn streams_recheck_access(b: Backend) {
    let db = seed(b, 100).await;
    db.user(20).account(A1).role("viewer").create().await;
    db.user(21).account(A1).role("editor").create().await;
    db.user(22).account(A1).role("admin").create().await;
    let mut config = test_config(&db.url);
    config.stream_recheck = Duration::from_secs(1);
    let billing = spawn_billing_with(config.clone()).await;
    let settings = spawn_settings_with(config).await;

    let mut removed = billing
        .billing(&access_token(VIEWER, None), None)
        .await
        .watch_balance(watch(0))
        .await
        .unwrap()
        .into_inner();
    let mut moved = settings
        .settings(&access_token(20, None), None)
        .await
        .watch_module_settings(WatchModuleSettingsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut deactivated = billing
        .billing(&access_token(21, None), None)
        .await
        .watch_balance(watch(0))
        .await
        .unwrap()
        .into_inner();
    let mut stays = billing
        .billing(&access_token(EDITOR, None), None)
        .await
        .watch_balance(watch(0))
        .await
        .unwrap()
        .into_inner();
    let mut demoted = settings
        .settings(&access_token(22, None), None)
        .await
        .watch_module_settings(WatchModuleSettingsRequest {})
        .await
        .unwrap()
        .into_inner();
    for s in [&mut removed, &mut deactivated, &mut stays] {
        next(s).await;
    }
    next(&mut moved).await;
    next(&mut demoted).await;

    let started = Instant::now();
    db.move_user(VIEWER, None).await;
    db.move_user(20, Some(A2)).await;
    db.set_user_active(21, false).await;
    // Every directory role may watch; a role this service does not know may not.
    db.set_user_role(22, "guest").await;

    // Recheck every 1 s + directory cache 500 ms: well inside 10 s.
    let within = Duration::from_secs(10);
    let status = ends_with(&mut removed, within).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "NO_ACCOUNT");
    let status = ends_with(&mut moved, within).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "ACCOUNT_CHANGED");
    let status = ends_with(&mut deactivated, within).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "USER_INACTIVE");
    let status = ends_with(&mut demoted, within).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "UNKNOWN_ROLE");
    println!(
        "streams of removed/moved/deactivated/demoted users ended after {:?} (recheck every 1 s)",
        started.elapsed()
    );

    // Past at least one recheck, the member still streams.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    billing
        .billing(&access_token(EDITOR, None), None)
        .await
        .deduct(deduct_credits(7, "still-here"))
        .await
        .unwrap();
    assert_eq!(balance(&next(&mut stays).await), (93, 0, 93, false));
}

/// SIGTERM's drain ends open streams with UNAVAILABLE (clients reconnect
/// elsewhere) instead of holding the drain until its timeout.
async fn drain_ends_streams_with_unavailable(b: Backend) {
    let db = seed(b, 100).await;
    let mut config = test_config(&db.url);
    config.shutdown_timeout = Duration::from_secs(30);
    let billing = spawn_billing_with(config.clone()).await;
    let settings = spawn_settings_with(config).await;
    let mut balance_stream = billing
        .billing(&access_token(EDITOR, None), None)
        .await
        .watch_balance(watch(0))
        .await
        .unwrap()
        .into_inner();
    let mut settings_stream = settings
        .settings(&access_token(EDITOR, None), None)
        .await
        .watch_module_settings(WatchModuleSettingsRequest {})
        .await
        .unwrap()
        .into_inner();
    next(&mut balance_stream).await;
    next(&mut settings_stream).await;

    let started = Instant::now();
    let stopping = tokio::spawn(async move { (billing.stop().await, settings.stop().await) });
    for status in [
        ends_with(&mut balance_stream, Duration::from_secs(10)).await,
        ends_with(&mut settings_stream, Duration::from_secs(10)).await,
    ] {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("reopen"), "{status:?}");
    }
    let (b, s) = tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("servers stop well before the 30 s drain timeout")
        .unwrap();
    b.unwrap();
    s.unwrap();
    println!("drain with open streams took {:?}", started.elapsed());
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `n` deducts of 1 credit from 8 concurrent callers; returns deducts/s.
async fn deduct_burst(server: &Running, n: usize, tag: &str) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = server.billing(&access_token(EDITOR, None), None).await;
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(8) {
                c.deduct(deduct_credits(1, &format!("{tag}-{i}")))
                    .await
                    .expect("deduct succeeds");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// A reader that never reads: writers do not wait for it, its memory is
/// bounded by HTTP/2 flow control, and once it reads again it catches up
/// with the latest state.
async fn never_reading_stream_does_not_block_deducts(b: Backend) {
    const N: usize = 400;
    let db = seed(b, 10_000).await;
    let server = spawn_billing(&db).await;

    let rss_start = rss_kib();
    let without = deduct_burst(&server, N, "a").await;
    let rss_without = rss_kib();

    // A tiny receive window: the server's sends back up after a few
    // messages, as they would behind a stalled client.
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .initial_stream_window_size(1024)
        .connect()
        .await
        .unwrap();
    let mut watcher = BillingServiceClient::with_interceptor(
        channel,
        auth_interceptor::BearerInterceptor::new(access_token(VIEWER, None).as_str()).unwrap(),
    );
    let mut stalled = watcher.watch_balance(watch(0)).await.unwrap().into_inner();
    assert_eq!(next(&mut stalled).await.balance, 10_000 - N as i64);
    let rss_before = rss_kib();
    let with = deduct_burst(&server, N, "b").await;
    let more = deduct_burst(&server, N, "c").await;
    let rss_after = rss_kib();
    println!(
        "{b:?}: deducts/s without a stream {without:.0}, with a stalled stream {with:.0} and {more:.0}; \
         RSS {rss_start} KiB -> {rss_without} KiB without a stream, {rss_before} KiB -> {rss_after} KiB with it"
    );
    let expected = 10_000 - 3 * N as i64;
    assert_eq!(db.balance(A1).await, expected);
    assert_eq!(db.ledger_sum(A1).await.0, -3 * N as i64);
    assert!(
        rss_after.saturating_sub(rss_before) < 256 * 1024,
        "memory grew by {} KiB",
        rss_after - rss_before
    );

    // Reading again drains what flow control let through, then the latest
    // state: never all 800 intermediate balances queued somewhere.
    let mut seen = 0;
    loop {
        let m = next(&mut stalled).await;
        seen += 1;
        if m.balance == expected {
            break;
        }
    }
    println!(
        "{b:?}: the stalled reader caught up after {seen} messages for {} changes",
        2 * N
    );
    drop(stalled);
    let after = deduct_burst(&server, N, "d").await;
    println!("{b:?}: deducts/s again without a stream {after:.0}");
    assert_eq!(db.balance(A1).await, expected - N as i64);
}

on_both_backends!(
    balance_stream_first_then_every_change,
    low_balance_alerts_once_per_crossing,
    settings_stream_first_then_every_change,
    streams_recheck_access,
    drain_ends_streams_with_unavailable,
    never_reading_stream_does_not_block_deducts,
);

/// Two replicas of each service on one PostgreSQL: changes made through
/// replica 1 reach streams on replica 2 (LISTEN/NOTIFY), and replica 2's
/// CheckModule cache drops its copy as soon as the notification arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_changes_on_postgres() {
    let db = seed(Backend::Postgres, 1_000).await;
    let billing1 = spawn_billing(&db).await;
    let billing2 = spawn_billing(&db).await;
    let settings1 = spawn_settings(&db).await;
    let settings2 = spawn_settings(&db).await;

    // Balance: deduct on 1, stream on 2.
    let mut c1 = billing1.billing(&access_token(EDITOR, None), None).await;
    let mut s2 = billing2
        .billing(&access_token(VIEWER, None), None)
        .await
        .watch_balance(watch(0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut s2).await.balance, 1_000);
    let mut delays = Vec::new();
    for i in 1..=15 {
        c1.deduct(deduct_credits(1, &format!("r{i}")))
            .await
            .unwrap();
        let committed = Instant::now();
        let m = next(&mut s2).await;
        delays.push(committed.elapsed());
        assert_eq!(m.balance, 1_000 - i, "every change arrives, in order");
    }
    let balance_median = median(delays.clone());
    println!(
        "WatchBalance replica 1 -> replica 2: median {balance_median:?}, max {:?}",
        delays.iter().max().unwrap()
    );

    // Settings: update on 1, stream and CheckModule on 2.
    let mut admin1 = settings1.settings(&access_token(ADMIN, None), None).await;
    let mut viewer2 = settings2.settings(&access_token(VIEWER, None), None).await;
    let mut w2 = viewer2
        .watch_module_settings(WatchModuleSettingsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(settings_of(next(&mut w2).await).writer_enabled);
    let check = CheckModuleRequest {
        module: Module::Writer as i32,
    };
    let mut delays = Vec::new();
    for i in 0..10 {
        let on = i % 2 == 1;
        // Replica 2 caches the current answer…
        let before = viewer2
            .check_module(check)
            .await
            .unwrap()
            .into_inner()
            .enabled;
        assert_eq!(before, !on);
        // …replica 1 changes it…
        admin1
            .update_module_settings(switch("writer_enabled", on))
            .await
            .unwrap();
        let committed = Instant::now();
        let m = settings_of(next(&mut w2).await);
        delays.push(committed.elapsed());
        assert_eq!(m.writer_enabled, on);
        // …and once replica 2 has heard of it, its cache never answers with
        // the old value (without the notification it would, for 500 ms).
        let after = viewer2
            .check_module(check)
            .await
            .unwrap()
            .into_inner()
            .enabled;
        assert_eq!(after, on, "round {i}: replica 2's cache was not dropped");
    }
    println!(
        "WatchModuleSettings replica 1 -> replica 2: median {:?}, max {:?}",
        median(delays.clone()),
        delays.iter().max().unwrap()
    );
    drop((billing1, billing2, settings1, settings2));
}

/// A LISTEN connection that is killed is re-established, and the streams
/// it feeds are woken (and find any change they missed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_its_connection_dies() {
    let db = seed(Backend::Postgres, 100).await;
    let billing1 = spawn_billing(&db).await;
    let billing2 = spawn_billing(&db).await;
    let mut s2 = billing2
        .billing(&access_token(VIEWER, None), None)
        .await
        .watch_balance(watch(0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut s2).await.balance, 100);
    // Kill every LISTEN connection on this database (both replicas').
    let igny8_db::Db::Postgres(pool) = &db.db else {
        unreachable!("a PostgreSQL test database")
    };
    let killed: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%' \
         AND pid <> pg_backend_pid()) AS t",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(killed, 2, "one LISTEN connection per replica");
    // A change made now may be lost as a notification while replica 2
    // reconnects; either its notification or the reconnect's wake-up makes
    // the stream read the new state.
    let mut c1 = billing1.billing(&access_token(EDITOR, None), None).await;
    c1.deduct(deduct_credits(1, "k1")).await.unwrap();
    while next(&mut s2).await.balance != 99 {}
    // And the re-established listener carries the next change as usual.
    c1.deduct(deduct_credits(1, "k2")).await.unwrap();
    while next(&mut s2).await.balance != 98 {}
    eventually(
        Duration::from_secs(10),
        "both replicas listen again",
        || async {
            let listening: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            listening == 2
        },
    )
    .await;
}

/// `grpcurl -plaintext -H <token> -d <data> <addr> <method>` running in the
/// background, and each JSON message it prints, as it prints it.
fn grpcurl_stream(
    addr: std::net::SocketAddr,
    token: &str,
    data: &str,
    method: &str,
) -> (
    std::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut child = std::process::Command::new(grpcurl())
        .args([
            "-plaintext",
            "-H",
            &format!("authorization: Bearer {token}"),
            "-d",
            data,
            &addr.to_string(),
            method,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run grpcurl");
    // grpcurl prints each message as an indented JSON object ending in a
    // line holding only `}`.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut object = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            object.push_str(&line);
            object.push('\n');
            if line == "}" {
                let _ = tx.send(std::mem::take(&mut object));
            }
        }
    });
    (child, rx)
}

async fn printed(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> serde_json::Value {
    let text = tokio::time::timeout(ARRIVAL, rx.recv())
        .await
        .expect("grpcurl printed a message in time")
        .expect("grpcurl still running");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// grpcurl prints stream messages as they arrive: the first, then one
/// after a change made while it runs — for both streams, against the real
/// binaries, through reflection only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_prints_stream_messages_as_they_arrive() {
    let db = seed(Backend::Sqlite, 100).await;
    let billing = Process::start(
        "billing-svc",
        igny8_proto::BILLING_SERVICE_NAME,
        &db.url,
        &[],
    )
    .await;
    let settings = Process::start(
        "settings-svc",
        igny8_proto::SETTINGS_SERVICE_NAME,
        &db.url,
        &[],
    )
    .await;

    let (mut child, mut rx) = grpcurl_stream(
        billing.addr,
        &access_token(EDITOR, None),
        r#"{"low_balance_threshold": 95}"#,
        "igny8.billing.v1.BillingService/WatchBalance",
    );
    let first = printed(&mut rx).await;
    assert_eq!(first["balance"], "100");
    assert_eq!(first["available"], "100");
    let mut c = Running::at(billing.addr)
        .billing(&access_token(EDITOR, None), None)
        .await;
    c.deduct(deduct_credits(10, "via-grpcurl")).await.unwrap();
    let second = printed(&mut rx).await;
    assert_eq!(second["balance"], "90");
    assert_eq!(second["low_balance"], true);
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, mut rx) = grpcurl_stream(
        settings.addr,
        &access_token(VIEWER, None),
        "{}",
        "igny8.settings.v1.SettingsService/WatchModuleSettings",
    );
    let first = printed(&mut rx).await;
    assert_eq!(first["settings"]["writer_enabled"], true);
    Running::at(settings.addr)
        .settings(&access_token(ADMIN, None), None)
        .await
        .update_module_settings(switch("writer_enabled", false))
        .await
        .unwrap();
    let second = printed(&mut rx).await;
    // grpcurl leaves false booleans out of its JSON.
    assert_ne!(second["settings"]["writer_enabled"], true, "{second}");
    assert_eq!(second["settings"]["planner_enabled"], true, "{second}");
    child.kill().unwrap();
    child.wait().unwrap();
}
