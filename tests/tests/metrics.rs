//! The Prometheus endpoint: scraped over plain HTTP/1.1 after a known mix
//! of calls, every series the operators alert on is there with the right
//! count.

use igny8_proto::billing::v1::GetBalanceRequest;
use igny8_tests::*;
use tonic::Code;

const ACCOUNT: i64 = 1;
const OTHER: i64 = 2;
const EDITOR: i64 = 10;
const VIEWER: i64 = 11;
/// Moved from OTHER to ACCOUNT after their token was issued.
const MOVED: i64 = 12;

const BILLING: &str = igny8_proto::BILLING_SERVICE_NAME;

fn handled(method: &str, code: &str) -> String {
    format!(
        "igny8_grpc_server_handled_total{{grpc_service=\"{BILLING}\",grpc_method=\"{method}\",grpc_code=\"{code}\"}}"
    )
}

#[track_caller]
fn assert_metric(text: &str, series: &str, expected: f64) {
    assert_eq!(
        metric_value(text, series),
        Some(expected),
        "{series} in\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rpcs_auth_deducts_and_pool() {
    let db = TestDb::new(Backend::Sqlite).await;
    db.account(ACCOUNT).credits(100).create().await;
    db.account(OTHER).create().await;
    db.user(EDITOR)
        .account(ACCOUNT)
        .role("editor")
        .create()
        .await;
    db.user(VIEWER)
        .account(ACCOUNT)
        .role("viewer")
        .create()
        .await;
    db.user(MOVED)
        .account(ACCOUNT)
        .role("editor")
        .create()
        .await;
    let (server, metrics) = spawn_billing_with_metrics(test_config(&db.url)).await;

    let mut editor = server.billing(&access_token(EDITOR, None), None).await;
    editor
        .get_balance(GetBalanceRequest {})
        .await
        .expect("balance");
    // Denied: a viewer may not deduct.
    let mut viewer = server.billing(&access_token(VIEWER, None), None).await;
    let err = viewer.deduct(deduct_credits(1, "v")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Unauthenticated: a token that does not verify.
    let mut stranger = server.billing("not-a-jwt", None).await;
    let err = stranger
        .get_balance(GetBalanceRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Stale token: it still names OTHER; the call acts on ACCOUNT and counts.
    let mut moved = server
        .billing(&access_token(MOVED, Some(OTHER)), None)
        .await;
    let balance = moved
        .get_balance(GetBalanceRequest {})
        .await
        .expect("stale token still works")
        .into_inner();
    assert_eq!(balance.account_id, ACCOUNT);
    // Every deduct outcome.
    editor
        .deduct(deduct_credits(30, "a"))
        .await
        .expect("deduct");
    let replay = editor
        .deduct(deduct_credits(30, "a"))
        .await
        .expect("replay");
    assert!(replay.into_inner().replayed);
    let err = editor.deduct(deduct_credits(500, "b")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = editor.deduct(deduct_credits(31, "a")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = editor.deduct(deduct_credits(1, "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A public call is counted under its own service.
    server.health(BILLING).await;

    let (status, text) = scrape(metrics).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );

    // Requests by method and status code.
    assert_metric(&text, &handled("GetBalance", "OK"), 2.0);
    assert_metric(&text, &handled("GetBalance", "Unauthenticated"), 1.0);
    assert_metric(&text, &handled("Deduct", "OK"), 2.0);
    assert_metric(&text, &handled("Deduct", "PermissionDenied"), 1.0);
    assert_metric(&text, &handled("Deduct", "FailedPrecondition"), 1.0);
    assert_metric(&text, &handled("Deduct", "AlreadyExists"), 1.0);
    assert_metric(&text, &handled("Deduct", "InvalidArgument"), 1.0);
    assert!(
        metric_value(
            &text,
            "igny8_grpc_server_handled_total{grpc_service=\"grpc.health.v1.Health\",grpc_method=\"Check\",grpc_code=\"OK\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    // Latency histogram, same labels: the count matches, buckets are cumulative.
    let labels = format!("grpc_service=\"{BILLING}\",grpc_method=\"Deduct\",grpc_code=\"OK\"");
    assert_metric(
        &text,
        &format!("igny8_grpc_server_handling_seconds_count{{{labels}}}"),
        2.0,
    );
    assert_metric(
        &text,
        &format!("igny8_grpc_server_handling_seconds_bucket{{le=\"+Inf\",{labels}}}"),
        2.0,
    );
    assert!(
        metric_value(
            &text,
            &format!("igny8_grpc_server_handling_seconds_sum{{{labels}}}")
        )
        .is_some_and(|s| s > 0.0),
        "{text}"
    );
    // Nothing is left in flight once the responses are in.
    assert_metric(&text, "igny8_grpc_server_in_flight", 0.0);

    // Auth outcomes, including the stale-token mismatch.
    assert_metric(&text, "igny8_auth_outcomes_total{outcome=\"ok\"}", 7.0);
    assert_metric(
        &text,
        "igny8_auth_outcomes_total{outcome=\"permission_denied\"}",
        1.0,
    );
    assert_metric(
        &text,
        "igny8_auth_outcomes_total{outcome=\"unauthenticated\"}",
        1.0,
    );
    assert_metric(&text, "igny8_auth_account_mismatch_total", 1.0);

    // Deduct outcomes.
    for (outcome, n) in [
        ("ok", 1.0),
        ("replayed", 1.0),
        ("insufficient", 1.0),
        ("key_reused", 1.0),
        ("invalid", 1.0),
    ] {
        assert_metric(
            &text,
            &format!("igny8_ledger_deduct_outcomes_total{{outcome=\"{outcome}\"}}"),
            n,
        );
    }
    assert_eq!(
        metric_value(
            &text,
            "igny8_ledger_deduct_outcomes_total{outcome=\"error\"}"
        ),
        None,
        "no deduct failed on the server side"
    );

    // The writer's batches: every write that reached the database (ok,
    // replayed, insufficient, key_reused) was in a committed batch.
    let batches = metric_value(&text, "igny8_ledger_batches_total").expect("batches");
    let requests =
        metric_value(&text, "igny8_ledger_batched_requests_total").expect("batched requests");
    assert!(
        batches >= 1.0 && requests >= 4.0 && requests >= batches,
        "{batches} {requests}"
    );
    assert_metric(&text, "igny8_ledger_batch_failures_total", 0.0);

    // Pool state and health.
    let open = metric_value(&text, "igny8_db_pool_connections").expect("pool size");
    let idle = metric_value(&text, "igny8_db_pool_idle_connections").expect("pool idle");
    assert!(open >= 1.0 && idle <= open, "open {open}, idle {idle}");
    assert_metric(&text, "igny8_db_pool_max_connections", 16.0);
    assert_metric(&text, "igny8_serving", 1.0);

    // Counts are live: one more call shows up in the next scrape.
    editor
        .get_balance(GetBalanceRequest {})
        .await
        .expect("balance");
    let (_, text) = scrape(metrics).await;
    assert_metric(&text, &handled("GetBalance", "OK"), 3.0);

    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_do_not_create_series() {
    let db = TestDb::new(Backend::Sqlite).await;
    let (server, metrics) = spawn_billing_with_metrics(test_config(&db.url)).await;
    // A made-up path with a made-up token: refused as not served (before
    // the token is looked at), and counted under `unknown` so that callers
    // cannot grow the label space.
    let mut client = tonic::client::Grpc::new(server.channel().await);
    client.ready().await.expect("ready");
    let mut request = tonic::Request::new(());
    request
        .metadata_mut()
        .insert("authorization", "Bearer x".parse().expect("ascii"));
    let err = client
        .unary::<_, (), _>(
            request,
            "/igny8.billing.v1.BillingService/MintMoney"
                .parse()
                .expect("path"),
            EmptyCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    let (_, text) = scrape(metrics).await;
    assert!(!text.contains("MintMoney"), "{text}");
    assert_metric(
        &text,
        "igny8_grpc_server_handled_total{grpc_service=\"unknown\",grpc_method=\"unknown\",grpc_code=\"Unimplemented\"}",
        1.0,
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_port_serves_only_metrics() {
    let db = TestDb::new(Backend::Sqlite).await;
    let (server, metrics) = spawn_billing_with_metrics(test_config(&db.url)).await;
    let response = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(metrics).expect("connect");
        write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    })
    .await
    .expect("task");
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    server.stop().await.expect("clean stop");
}

/// Encodes and decodes nothing: enough to call a method that does not exist.
#[derive(Debug, Clone, Copy)]
struct EmptyCodec;

impl tonic::codec::Codec for EmptyCodec {
    type Encode = ();
    type Decode = ();
    type Encoder = EmptyCodec;
    type Decoder = EmptyCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl tonic::codec::Encoder for EmptyCodec {
    type Item = ();
    type Error = tonic::Status;

    fn encode(
        &mut self,
        _item: (),
        _dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl tonic::codec::Decoder for EmptyCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(
        &mut self,
        _src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, Self::Error> {
        Ok(Some(()))
    }
}
