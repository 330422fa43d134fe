//! Prometheus metrics, served as text on a separate admin address
//! (`IGNY8_METRICS_ADDR`, `GET /metrics`).
//!
//! The port is separate from gRPC so that scraping needs no token and a
//! NetworkPolicy can open it to the monitoring namespace only. Series:
//!
//! | series | labels | what |
//! |---|---|---|
//! | `igny8_grpc_server_handled_total` | `grpc_service`, `grpc_method`, `grpc_code` | finished RPCs |
//! | `igny8_grpc_server_handling_seconds` | same | RPC latency histogram, first byte in → trailers out |
//! | `igny8_grpc_server_in_flight` | — | RPCs started and not yet finished |
//! | `igny8_auth_outcomes_total` | `outcome` | authentication outcomes (auth crate) |
//! | `igny8_auth_account_mismatch_total` | — | stale tokens: account hint ≠ current account |
//! | `igny8_db_pool_connections` | — | open database connections |
//! | `igny8_db_pool_idle_connections` | — | of which idle |
//! | `igny8_db_pool_max_connections` | — | the pool's upper bound |
//! | `igny8_serving` | — | 1 while health reports SERVING, else 0 |
//! | `igny8_db_migrations_missing` | — | migrations this binary embeds that the database lacks (last readiness check) |
//!
//! Services add their own (billing: `igny8_ledger_deduct_outcomes_total`)
//! through [`crate::Server::metrics_registry`].

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use igny8_db::Db;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;

/// Latency buckets in seconds: 1 ms to 10 s, dense where a credit check
/// lives (a few milliseconds) and wide enough to see lock waits.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How long a scrape connection may stay open; Prometheus scrapes in well
/// under a second, so anything slower is a stuck or hostile client.
const SCRAPE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Labels of one RPC series. Method names come from the served descriptors
/// (bounded); anything else is counted as `unknown` so a client cannot grow
/// the label space by calling made-up paths.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RpcLabels {
    pub(crate) grpc_service: Arc<String>,
    pub(crate) grpc_method: Arc<String>,
    pub(crate) grpc_code: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Per-RPC counters and latency.
#[derive(Debug, Clone)]
pub(crate) struct RpcMetrics {
    handled: Family<RpcLabels, Counter>,
    latency: Family<RpcLabels, Histogram, fn() -> Histogram>,
    in_flight: Gauge,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            handled: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            in_flight: Gauge::default(),
        }
    }
}

impl RpcMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "igny8_grpc_server_handled",
            "RPCs completed, by service, method and gRPC status code",
            self.handled.clone(),
        );
        registry.register_with_unit(
            "igny8_grpc_server_handling",
            "RPC latency from request to trailers, by service, method and gRPC status code",
            Unit::Seconds,
            self.latency.clone(),
        );
        registry.register(
            "igny8_grpc_server_in_flight",
            "RPCs started and not yet finished",
            self.in_flight.clone(),
        );
    }

    pub(crate) fn started(&self) {
        self.in_flight.inc();
    }

    pub(crate) fn finished(&self, labels: &RpcLabels, elapsed: Duration) {
        self.in_flight.dec();
        self.handled.get_or_create(labels).inc();
        self.latency
            .get_or_create(labels)
            .observe(elapsed.as_secs_f64());
    }
}

/// Database pool gauges, refreshed at each scrape (reading the pool is
/// two atomic loads, so there is no reason to poll it in the background).
#[derive(Debug, Clone, Default)]
struct PoolMetrics {
    size: Gauge,
    idle: Gauge,
    max: Gauge,
}

impl PoolMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "igny8_db_pool_connections",
            "Open database connections (busy and idle)",
            self.size.clone(),
        );
        registry.register(
            "igny8_db_pool_idle_connections",
            "Open database connections not in use",
            self.idle.clone(),
        );
        registry.register(
            "igny8_db_pool_max_connections",
            "Upper bound of the database pool (IGNY8_DB_MAX_CONNECTIONS)",
            self.max.clone(),
        );
    }

    fn refresh(&self, db: &Db) {
        let state = db.pool_state();
        self.size.set(i64::from(state.size));
        self.idle.set(i64::from(state.idle));
    }
}

/// Everything a server exports, and the registry it is exported from.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) rpc: RpcMetrics,
    pool: PoolMetrics,
    pub(crate) serving: Gauge,
    pub(crate) migrations_missing: Gauge,
}

impl Metrics {
    /// A registry with the RPC, auth, pool and health series.
    pub(crate) fn new(auth: &auth_interceptor::AuthMetrics, max_connections: u32) -> Self {
        let mut registry = Registry::default();
        let rpc = RpcMetrics::default();
        rpc.register(&mut registry);
        auth.register(&mut registry);
        let pool = PoolMetrics::default();
        pool.max.set(i64::from(max_connections));
        pool.register(&mut registry);
        let serving = Gauge::default();
        registry.register(
            "igny8_serving",
            "1 while the health service reports SERVING (database reachable, not draining)",
            serving.clone(),
        );
        let migrations_missing = Gauge::default();
        registry.register(
            "igny8_db_migrations_missing",
            "Migrations this binary embeds that the database has not applied (readiness stays NOT_SERVING while > 0)",
            migrations_missing.clone(),
        );
        Self {
            registry,
            rpc,
            pool,
            serving,
            migrations_missing,
        }
    }
}

/// Serves `GET /metrics` on `listener` until the task is aborted.
///
/// HTTP/1.1 only, one small hyper connection per scrape: this is an admin
/// port for Prometheus, not an API.
pub(crate) async fn serve_metrics(listener: TcpListener, metrics: Metrics, db: Db) {
    let Metrics { registry, pool, .. } = metrics;
    let state = Arc::new((registry, pool, db));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move {
                    let (registry, pool, db) = &*state;
                    Ok::<_, Infallible>(respond(&request, registry, pool, db))
                }
            });
            let connection = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(SCRAPE_CONNECTION_TIMEOUT, connection).await;
        });
    }
}

fn respond<B>(
    request: &Request<B>,
    registry: &Registry,
    pool: &PoolMetrics,
    db: &Db,
) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(text.as_bytes())))
            .expect("static response parts are valid")
    };
    if request.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found: try /metrics\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    pool.refresh(db);
    let mut body = String::new();
    if prometheus_client::encoding::text::encode(&mut body, registry).is_err() {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// The canonical name of a gRPC status code, as `grpc_code` label values
/// (the spelling of grpc-go and grpcurl: `OK`, `InvalidArgument`, ...).
pub(crate) fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}
