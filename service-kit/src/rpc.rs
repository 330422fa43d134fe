//! The outermost layer of the stack: one tracing span and one set of
//! metrics per RPC, whatever its outcome (auth failures included).
//!
//! For each call the layer
//!
//! 1. names it from the path (`/pkg.Service/Method`), checked against the
//!    methods the server actually serves so that made-up paths cannot grow
//!    the span-name or label space (they become `unknown`), and answers a
//!    method this server does not serve with UNIMPLEMENTED at once, before
//!    any token check (see [`KnownMethods::not_served`]);
//! 2. opens the span `grpc.request` (exported to OpenTelemetry as
//!    `pkg.Service/Method`, kind SERVER) whose parent is the caller's span
//!    when the request carries W3C `traceparent` metadata; everything below
//!    (auth, handler, `#[tracing::instrument]`ed store calls) runs inside it
//!    and so becomes its children;
//! 3. watches the response to its end: the gRPC status is in the headers
//!    of a trailers-only response (every error tonic or the auth layer
//!    returns) or in the trailers after the body, and only then is the call
//!    over. The status code goes on the span and on the metrics; the span
//!    closes when the response body is done, so its duration is the RPC's.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use prost::Message;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};

use crate::metrics::{RpcLabels, RpcMetrics, RpcSeries, code_label};

/// Reflection is served in two versions; neither ships a descriptor set we
/// could read the paths from, and they are fixed by the gRPC project.
const REFLECTION_METHODS: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The igny8 services and the port each listens on unless configured
/// otherwise (`IGNY8_LISTEN_ADDR`; the dev launcher uses the same ports).
const USUAL_PORTS: [(&str, u16); 2] = [
    (igny8_proto::BILLING_SERVICE_NAME, 50051),
    (igny8_proto::SETTINGS_SERVICE_NAME, 50052),
];

/// `ErrorInfo.domain` of a call to a method this server does not serve.
pub const UNKNOWN_METHOD_DOMAIN: &str = "server.igny8";

/// A method's names, shared by every call to it, and its metric series
/// once a call has ended with each status code.
#[derive(Debug)]
struct RpcName {
    /// `pkg.Service`.
    service: Arc<String>,
    /// `Method`.
    method: Arc<String>,
    /// `pkg.Service/Method`: the OpenTelemetry span name (semantic conventions).
    span_name: String,
    /// By `tonic::Code` (0–16): the series are created on first use, so
    /// only codes that occurred are exported.
    series: [OnceLock<RpcSeries>; 17],
}

impl RpcName {
    fn new(service: &str, method: &str) -> Arc<Self> {
        Arc::new(Self {
            service: Arc::new(service.to_owned()),
            method: Arc::new(method.to_owned()),
            span_name: format!("{service}/{method}"),
            series: Default::default(),
        })
    }

    /// This method's series for `code`, in `metrics`.
    fn series(&self, metrics: &RpcMetrics, code: Code) -> &RpcSeries {
        self.series[code as usize].get_or_init(|| {
            metrics.series(&RpcLabels {
                grpc_service: self.service.clone(),
                grpc_method: self.method.clone(),
                grpc_code: code_label(code),
            })
        })
    }
}

/// The methods a server serves, by HTTP/2 path.
#[derive(Debug)]
pub(crate) struct KnownMethods {
    by_path: HashMap<String, Arc<RpcName>>,
    unknown: Arc<RpcName>,
    /// The application service this server serves (the first name given).
    served: String,
}

impl KnownMethods {
    /// Every method of the services named in `services` found in the
    /// encoded `FileDescriptorSet`s, plus reflection.
    pub(crate) fn from_descriptors(sets: &[&[u8]], services: &[&str]) -> Self {
        let mut by_path = HashMap::new();
        for set in sets {
            // The sets are compiled into the binary; one that does not decode
            // is a build defect and reflection would already have refused it.
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    let full = match file.package() {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    if !services.contains(&full.as_str()) {
                        continue;
                    }
                    for method in &service.method {
                        by_path.insert(
                            format!("/{full}/{}", method.name()),
                            RpcName::new(&full, method.name()),
                        );
                    }
                }
            }
        }
        for path in REFLECTION_METHODS {
            let (service, method) = path[1..].split_once('/').expect("a /service/method path");
            by_path.insert(path.to_owned(), RpcName::new(service, method));
        }
        Self {
            by_path,
            unknown: RpcName::new("unknown", "unknown"),
            served: services.first().copied().unwrap_or_default().to_owned(),
        }
    }

    fn name(&self, path: &str) -> &Arc<RpcName> {
        self.by_path.get(path).unwrap_or(&self.unknown)
    }

    /// The UNIMPLEMENTED status for a call to `path` when this server does
    /// not serve it, `None` when it does. A method of the other igny8
    /// service (a BillingService call sent to settings-svc's port) is the
    /// usual mistake, so the message names the service served here and
    /// where the other one usually listens.
    pub(crate) fn not_served(&self, path: &str) -> Option<Status> {
        if self.by_path.contains_key(path) {
            return None;
        }
        let method = path.strip_prefix('/').unwrap_or(path);
        let served = &self.served;
        let here = USUAL_PORTS
            .iter()
            .find(|(name, _)| name == served)
            .map(|(_, port)| format!(" (usually port {port})"))
            .unwrap_or_default();
        let elsewhere = USUAL_PORTS
            .iter()
            .filter(|(name, _)| name != served)
            .map(|(name, port)| format!("{name} usually listens on port {port}"))
            .collect::<Vec<_>>()
            .join(", ");
        let asked = USUAL_PORTS
            .iter()
            .find(|(name, _)| name != served && method.starts_with(&format!("{name}/")));
        let message = match asked {
            Some((name, port)) => format!(
                "{method} is not served on this port: this port serves {served}{here}; \
                 {name} usually listens on port {port}"
            ),
            None => format!(
                "unknown method {method}: this port serves {served}{here}, grpc.health.v1.Health \
                 and server reflection; {elsewhere}"
            ),
        };
        let info = HashMap::from([
            ("service".to_owned(), served.clone()),
            ("method".to_owned(), method.to_owned()),
        ]);
        Some(Status::with_error_details(
            Code::Unimplemented,
            message,
            ErrorDetails::with_error_info("UNKNOWN_METHOD", UNKNOWN_METHOD_DOMAIN, info),
        ))
    }
}

/// Wraps a server's routes in [`RpcService`].
#[derive(Debug, Clone)]
pub(crate) struct RpcLayer {
    methods: Arc<KnownMethods>,
    metrics: Arc<RpcMetrics>,
}

impl RpcLayer {
    pub(crate) fn new(methods: KnownMethods, metrics: RpcMetrics) -> Self {
        Self {
            methods: Arc::new(methods),
            metrics: Arc::new(metrics),
        }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            methods: self.methods.clone(),
            metrics: self.metrics.clone(),
            inner,
        }
    }
}

/// Traces and measures each call to the inner service (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct RpcService<S> {
    methods: Arc<KnownMethods>,
    metrics: Arc<RpcMetrics>,
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RpcService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Default + Unpin + Send + 'static,
{
    type Response = Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // Serve with the service that was polled ready (tower's pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let name = self.methods.name(request.uri().path()).clone();
        // Field names follow the OpenTelemetry RPC semantic conventions;
        // `otel.*` fields steer tracing-opentelemetry (name, kind, status).
        // The empty fields are recorded later: the account by the auth
        // layer once it has resolved it, the status when the call ends.
        let span = tracing::info_span!(
            "grpc.request",
            otel.name = name.span_name.as_str(),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = name.service.as_str(),
            rpc.method = name.method.as_str(),
            rpc.grpc.status_code = Empty,
            igny8.account_id = Empty,
        );
        crate::telemetry::set_remote_parent(&span, request.headers());
        let mut observer = Observer::start(span.clone(), self.metrics.clone(), name);
        // A method this server does not serve is refused here, before the
        // auth layer: the answer is the same with or without a token.
        let call = match self.methods.not_served(request.uri().path()) {
            Some(refused) => Err(refused),
            None => Ok(inner.call(request)),
        };
        Box::pin(
            async move {
                let result = match call {
                    Ok(call) => call.await,
                    Err(refused) => Ok(refused.into_http()),
                };
                match result {
                    Ok(response) => {
                        if let Some(code) = grpc_status(response.headers()) {
                            observer.finish(code);
                        }
                        Ok(response.map(|body| ObservedBody {
                            inner: body,
                            observer,
                        }))
                    }
                    Err(e) => {
                        // The transport turns this into a reset stream.
                        observer.finish(Code::Unknown);
                        Err(e)
                    }
                }
            }
            .instrument(span),
        )
    }
}

/// `grpc-status`, parsed once (a `&str` key is parsed on every lookup).
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get(GRPC_STATUS)
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// Records the end of one call, exactly once.
struct Observer {
    span: Span,
    metrics: Arc<RpcMetrics>,
    name: Arc<RpcName>,
    start: Instant,
    finished: bool,
}

impl Observer {
    fn start(span: Span, metrics: Arc<RpcMetrics>, name: Arc<RpcName>) -> Self {
        metrics.started();
        Self {
            span,
            metrics,
            name,
            start: Instant::now(),
            finished: false,
        }
    }

    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.span.record("rpc.grpc.status_code", code as i32);
        if is_server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        let elapsed = self.elapsed();
        self.metrics
            .finished(self.name.series(&self.metrics, code), elapsed);
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Drop for Observer {
    /// Dropped before a status was seen: the client went away (or the
    /// connection did) mid-call, which gRPC calls CANCELLED.
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// The OpenTelemetry semantic conventions mark a server span as an error
/// only for codes that mean the server failed, not the caller.
fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// A response body that finishes its call's [`Observer`] when the trailers
/// go out (or the body ends or is dropped without them).
pub(crate) struct ObservedBody<B> {
    inner: B,
    observer: Observer,
}

impl<B: Body + Unpin> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.observer.finish(code);
                }
            }
            Some(Err(_)) => this.observer.finish(Code::Internal),
            // A gRPC response always ends with a status; none means the
            // handler's body ended abnormally.
            None => this.observer.finish(Code::Unknown),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_come_from_the_served_descriptors_only() {
        let known = KnownMethods::from_descriptors(
            &[
                igny8_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
            &[igny8_proto::BILLING_SERVICE_NAME, "grpc.health.v1.Health"],
        );
        let deduct = known.name("/igny8.billing.v1.BillingService/Deduct");
        assert_eq!(
            (deduct.service.as_str(), deduct.method.as_str()),
            ("igny8.billing.v1.BillingService", "Deduct")
        );
        assert_eq!(
            known
                .name("/grpc.health.v1.Health/Check")
                .span_name
                .as_str(),
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(
            known
                .name("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
                .method
                .as_str(),
            "ServerReflectionInfo"
        );
        // Settings is in the same descriptor set but not served here.
        for path in [
            "/igny8.settings.v1.SettingsService/CheckModule",
            "/igny8.billing.v1.BillingService/Steal",
            "/x",
        ] {
            assert_eq!(known.name(path).method.as_str(), "unknown", "{path}");
        }
    }

    #[test]
    fn a_method_not_served_here_names_this_service_and_where_the_other_listens() {
        let known = KnownMethods::from_descriptors(
            &[
                igny8_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
            &[igny8_proto::SETTINGS_SERVICE_NAME, "grpc.health.v1.Health"],
        );
        for served in [
            "/igny8.settings.v1.SettingsService/CheckModule",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(known.not_served(served).is_none(), "{served}");
        }
        let wrong_port = known
            .not_served("/igny8.billing.v1.BillingService/Deduct")
            .expect("billing is not served by settings");
        assert_eq!(wrong_port.code(), Code::Unimplemented);
        assert_eq!(
            wrong_port.message(),
            "igny8.billing.v1.BillingService/Deduct is not served on this port: this port \
             serves igny8.settings.v1.SettingsService (usually port 50052); \
             igny8.billing.v1.BillingService usually listens on port 50051"
        );
        let info = wrong_port.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("UNKNOWN_METHOD", UNKNOWN_METHOD_DOMAIN)
        );
        let unknown = known
            .not_served("/igny8.settings.v1.SettingsService/Steal")
            .unwrap();
        assert!(
            unknown.message().starts_with(
                "unknown method igny8.settings.v1.SettingsService/Steal: this port serves \
                 igny8.settings.v1.SettingsService"
            ) && unknown
                .message()
                .ends_with("igny8.billing.v1.BillingService usually listens on port 50051"),
            "{}",
            unknown.message()
        );
    }

    #[test]
    fn status_codes_are_read_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", "9".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(Code::FailedPrecondition));
        assert!(!is_server_error(Code::FailedPrecondition));
        assert!(is_server_error(Code::Unavailable));
    }
}
