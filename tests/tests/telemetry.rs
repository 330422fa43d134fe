//! Traces: a billing server exporting over OTLP/gRPC to a collector running
//! in this test (a tonic server of `opentelemetry.proto.collector.trace.v1`).
//!
//! The tracing subscriber and the OpenTelemetry provider are process-wide,
//! so this file holds exactly one test and installs telemetry once, the way
//! the binaries do.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use igny8_proto::billing::v1::{DeductRequest, GetBalanceRequest, deduct_request};
use igny8_tests::*;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind},
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

const ACCOUNT: i64 = 1;
const EDITOR: i64 = 10;

/// The caller's trace context, as another service would send it.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// An exported span with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    span: Span,
}

/// Keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Exported>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| string_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| Exported {
                    service: service.clone(),
                    span,
                }));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start(self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        addr
    }

    fn spans(&self) -> Vec<Exported> {
        self.spans.lock().expect("lock").clone()
    }

    fn named(&self, name: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|e| e.span.name == name)
            .map(|e| e.span)
            .collect()
    }
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn string_attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attr(attributes, key) {
        Some(Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attributes, key) {
        Some(Value::IntValue(n)) => Some(*n),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one server span of `method` in the trace `trace_id`.
fn server_span(collector: &Collector, method: &str, trace_id: &str) -> Span {
    let name = format!("igny8.billing.v1.BillingService/{method}");
    let spans: Vec<Span> = collector
        .named(&name)
        .into_iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .collect();
    assert_eq!(
        spans.len(),
        1,
        "one {name} span in trace {trace_id}; got {spans:#?}"
    );
    spans.into_iter().next().expect("one span")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_spans_reach_the_collector_with_attributes_and_parents() {
    let collector = Collector::default();
    let collector_addr = collector.clone().start().await;

    let db = TestDb::new(Backend::Sqlite).await;
    db.account(ACCOUNT).credits(100).create().await;
    db.user(EDITOR)
        .account(ACCOUNT)
        .role("editor")
        .create()
        .await;
    let mut config = test_config(&db.url);
    config.otlp_endpoint = Some(format!("http://{collector_addr}"));
    let telemetry =
        service_kit::telemetry::install(&config, "billing-svc").expect("telemetry installs");
    assert!(
        telemetry.exporting(),
        "first install in the process exports"
    );
    let server = spawn_billing_with(config).await;
    let mut client = server.billing(&access_token(EDITOR, None), None).await;

    // 1. A call carrying a caller's `traceparent`, as another service sends it.
    let mut request = Request::new(GetBalanceRequest {});
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01")
            .parse()
            .expect("ascii"),
    );
    client.get_balance(request).await.expect("balance");

    // 2. A call made inside a span of this process: `BearerInterceptor`
    //    injects that span's context, as it does between our services.
    let caller = tracing::info_span!("caller.work");
    async {
        client
            .deduct(DeductRequest {
                cost: Some(deduct_request::Cost::Credits(5)),
                idempotency_key: "trace-1".into(),
                ..Default::default()
            })
            .await
            .expect("deduct")
    }
    .instrument(caller)
    .await;

    // 3. A refused call: still one span, with its status and no account.
    let refused_trace = "0123456789abcdef0123456789abcdef";
    let mut stranger = server.billing("not-a-jwt", None).await;
    let mut request = Request::new(GetBalanceRequest {});
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{refused_trace}-1111111111111111-01")
            .parse()
            .expect("ascii"),
    );
    let err = stranger.get_balance(request).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Export is batched: flush, then give the collector a bounded while.
    telemetry.flush().await;
    eventually(Duration::from_secs(15), "all spans exported", || {
        let collector = collector.clone();
        async move {
            let names: Vec<String> = collector.spans().into_iter().map(|e| e.span.name).collect();
            names.iter().any(|n| n == "caller.work")
                && names.iter().any(|n| n == "ledger.apply")
                && names
                    .iter()
                    .filter(|n| n.as_str() == "igny8.billing.v1.BillingService/GetBalance")
                    .count()
                    >= 2
        }
    })
    .await;

    // 1. Joined the caller's trace, as a server span with RPC attributes and
    //    the authoritative account.
    let balance = server_span(&collector, "GetBalance", TRACE_ID);
    assert_eq!(hex(&balance.parent_span_id), PARENT_SPAN_ID);
    assert_eq!(balance.kind, SpanKind::Server as i32);
    let attrs = &balance.attributes;
    assert_eq!(string_attr(attrs, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        string_attr(attrs, "rpc.service").as_deref(),
        Some("igny8.billing.v1.BillingService")
    );
    assert_eq!(
        string_attr(attrs, "rpc.method").as_deref(),
        Some("GetBalance")
    );
    assert_eq!(int_attr(attrs, "rpc.grpc.status_code"), Some(0));
    assert_eq!(int_attr(attrs, "igny8.account_id"), Some(ACCOUNT));
    // The store call under it is its child.
    let ledger_balance: Vec<Span> = collector
        .named("ledger.balance")
        .into_iter()
        .filter(|s| s.parent_span_id == balance.span_id)
        .collect();
    assert_eq!(ledger_balance.len(), 1, "ledger.balance under GetBalance");
    assert_eq!(ledger_balance[0].trace_id, balance.trace_id);

    // 2. The caller span's context travelled with the call.
    let callers = collector.named("caller.work");
    assert_eq!(callers.len(), 1);
    let caller = &callers[0];
    let deduct = server_span(&collector, "Deduct", &hex(&caller.trace_id));
    assert_eq!(deduct.parent_span_id, caller.span_id);
    assert_eq!(
        int_attr(&deduct.attributes, "igny8.account_id"),
        Some(ACCOUNT)
    );
    assert_eq!(
        string_attr(&deduct.attributes, "rpc.method").as_deref(),
        Some("Deduct")
    );
    let apply: Vec<Span> = collector
        .named("ledger.apply")
        .into_iter()
        .filter(|s| s.parent_span_id == deduct.span_id)
        .collect();
    assert_eq!(apply.len(), 1, "ledger.apply under Deduct");
    assert_eq!(apply[0].trace_id, caller.trace_id);

    // 3. The refused call.
    let refused = server_span(&collector, "GetBalance", refused_trace);
    assert_eq!(
        int_attr(&refused.attributes, "rpc.grpc.status_code"),
        Some(Code::Unauthenticated as i64)
    );
    assert_eq!(int_attr(&refused.attributes, "igny8.account_id"), None);

    // Every span names its service.
    assert!(
        collector.spans().iter().all(|e| e.service == "billing-svc"),
        "service.name is billing-svc"
    );

    server.stop().await.expect("clean stop");
    telemetry.shutdown().await;
}
