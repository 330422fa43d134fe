//! Logs and traces.
//!
//! One global `tracing` subscriber per process ([`install`]) with two
//! independent outputs, each with its own filter:
//!
//! - log lines on stderr, text or JSON (`IGNY8_LOG_FORMAT`), filtered by
//!   `RUST_LOG` (default `info`);
//! - when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over
//!   OTLP/gRPC by a batch exporter. Its filter is fixed (our spans at INFO
//!   and above, never the HTTP/2 and exporter internals, which would
//!   otherwise trace the exporter's own traffic), so `RUST_LOG=warn` quiets
//!   the logs without losing traces.
//!
//! W3C trace context (`traceparent`/`tracestate`) is read from incoming
//! request metadata by the server stack and written to outgoing requests by
//! `auth_interceptor::BearerInterceptor`, both through the global
//! propagator installed here, so a call from one service to another is one
//! trace. Tokens never reach logs: the auth crate only ever holds them in
//! redacting wrappers.

use std::time::Duration;

use http::HeaderMap;
use opentelemetry::{KeyValue, propagation::Extractor, trace::TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::{Level, Span, level_filters::LevelFilter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, filter::Targets, fmt, prelude::*};

use crate::config::{LogFormat, ServiceConfig};

/// How long shutdown waits for the last spans to reach the collector. The
/// exporter's own timeout (`OTEL_EXPORTER_OTLP_TIMEOUT`, default 10 s) may
/// be longer; an unreachable collector must not hold up the pod's exit.
const FLUSH_BOUND: Duration = Duration::from_secs(5);

/// Crates whose spans would describe the exporter's own gRPC traffic.
const NOT_TRACED: [&str; 7] = [
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "opentelemetry",
    "opentelemetry_sdk",
];

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built from the configuration.
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: cannot set up the OTLP exporter: {0}")]
    Exporter(String),
    /// Installed outside a Tokio runtime with an exporter configured.
    #[error("telemetry::install must run inside a Tokio runtime when OTLP export is enabled")]
    NoRuntime,
}

/// The installed trace pipeline. Keep it for the life of the process and
/// call [`Telemetry::shutdown`] before exiting so the last spans are sent.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends every finished span now (tests; export is otherwise batched).
    pub async fn flush(&self) {
        if let Some(provider) = self.provider.clone() {
            run_bounded("flush", move || provider.force_flush()).await;
        }
    }

    /// Flushes and stops the exporter, waiting at most a few seconds.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            run_bounded("shutdown", move || provider.shutdown()).await;
        }
    }
}

/// The SDK's flush and shutdown block their thread until the batch thread
/// is done, and the export needs the Tokio runtime to make progress: run
/// them on a blocking thread so this works from any async context, even a
/// current-thread runtime.
async fn run_bounded<E: std::fmt::Display + Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<(), E> + Send + 'static,
) {
    match tokio::time::timeout(FLUSH_BOUND, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace export {what} failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "trace export {what} panicked"),
        Err(_) => {
            tracing::warn!(bound = ?FLUSH_BOUND, "trace export {what} timed out; spans may be lost")
        }
    }
}

/// Installs the process-wide subscriber: logs as configured and, when
/// `config.otlp_endpoint` is set, OTLP trace export for `service_name`.
///
/// With an endpoint this must run inside a Tokio runtime (the exporter's
/// gRPC channel lives there). Nothing is connected here: the channel is
/// lazy and the batch exporter runs on its own thread, so an unreachable
/// collector neither delays nor fails start-up; failed exports are logged.
///
/// The subscriber is global: only the first call in a process installs
/// anything; later calls return a [`Telemetry`] that exports nothing.
pub fn install(
    config: &ServiceConfig,
    service_name: &'static str,
) -> Result<Telemetry, TelemetryError> {
    let provider = match &config.otlp_endpoint {
        None => None,
        Some(endpoint) => Some(tracer_provider(endpoint, service_name)?),
    };
    let otel = provider.as_ref().map(|provider| {
        let mut targets = Targets::new().with_default(Level::INFO);
        for target in NOT_TRACED {
            targets = targets.with_target(target, LevelFilter::OFF);
        }
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name))
            .with_filter(targets)
    });
    let installed = tracing_subscriber::registry()
        .with(log_layer(config.log_format))
        .with(otel)
        .try_init()
        .is_ok();
    match provider {
        Some(provider) if installed => {
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            opentelemetry::global::set_tracer_provider(provider.clone());
            tracing::info!(
                endpoint = config.otlp_endpoint.as_deref().unwrap_or_default(),
                "exporting traces over OTLP/gRPC"
            );
            Ok(Telemetry {
                provider: Some(provider),
            })
        }
        Some(provider) => {
            // Someone installed a subscriber first (a second server in one
            // test process): this provider would never see a span.
            let _ = provider.shutdown();
            Ok(Telemetry { provider: None })
        }
        None => Ok(Telemetry { provider: None }),
    }
}

/// Installs logging only (no trace export), for tools and early start-up
/// errors. Safe to call twice (the second is a no-op).
pub fn init(format: LogFormat) {
    let _ = tracing_subscriber::registry()
        .with(log_layer(format))
        .try_init();
}

fn log_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        LogFormat::Text => fmt::layer()
            .fmt_fields(crate::log_fields::TextFields)
            .with_writer(std::io::stderr)
            // Colour codes only for a person at a terminal, not in files or
            // log collectors.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .fmt_fields(crate::log_fields::JsonFields)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    }
}

fn tracer_provider(
    endpoint: &str,
    service_name: &'static str,
) -> Result<SdkTracerProvider, TelemetryError> {
    // tonic's lazy channel spawns its connection worker on the current
    // runtime; without one it would panic.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime);
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint);
    if endpoint.starts_with("https://") {
        // The collector's certificate must chain to a public (Mozilla) root.
        builder = builder.with_tls_config(
            tonic::transport::ClientTlsConfig::new()
                .with_webpki_roots()
                .assume_http2(true),
        );
    }
    let exporter = builder
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = Resource::builder()
        .with_service_name(service_name)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Makes the caller's span (W3C `traceparent` in `headers`) the parent of
/// `span`. Without valid trace context, or without trace export, `span`
/// stays a root.
pub(crate) fn set_remote_parent(span: &Span, headers: &HeaderMap) {
    // A parsed name: a `&str` key would be parsed on every call.
    const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
    if !headers.contains_key(TRACEPARENT) {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    // Fails only when the span is disabled or export is off: nothing to do.
    let _ = span.set_parent(parent);
}

/// Reads propagation fields from HTTP/2 headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
