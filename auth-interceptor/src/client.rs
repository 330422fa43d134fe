//! The client side: attach a bearer token (and act-as) to outgoing calls,
//! and the caller's trace context so the callee's spans join its trace.

use opentelemetry::propagation::Injector;
use tonic::{
    Request, Status,
    metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap, MetadataValue},
    service::Interceptor,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{layer::headers, secret::BearerToken};

/// A tonic client interceptor for internal callers: sets
/// `authorization: Bearer <token>`, when configured
/// `x-igny8-act-as-account`, and W3C `traceparent`/`tracestate` from the
/// current `tracing` span (when the process exports traces; see
/// `service_kit::telemetry`), so the call continues the caller's trace.
///
/// ```ignore
/// let client = BillingServiceClient::with_interceptor(
///     channel,
///     BearerInterceptor::new(token)?.act_as(account_id),
/// );
/// ```
#[derive(Clone)]
pub struct BearerInterceptor {
    authorization: AsciiMetadataValue,
    act_as: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for BearerInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerInterceptor")
            .field("authorization", &"<redacted>")
            .field("act_as", &self.act_as)
            .finish()
    }
}

impl BearerInterceptor {
    /// Sends this token. Fails when the token cannot be a metadata value.
    pub fn new(token: impl Into<BearerToken>) -> Result<Self, Status> {
        let token: BearerToken = token.into();
        let mut authorization: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {}", token.expose()))
                .map_err(|_| Status::invalid_argument("token is not valid ASCII metadata"))?;
        authorization.set_sensitive(true);
        Ok(Self {
            authorization,
            act_as: None,
        })
    }

    /// Also acts as this account (developers and services only).
    pub fn act_as(mut self, account_id: i64) -> Self {
        self.act_as = Some(MetadataValue::from(account_id));
        self
    }
}

impl From<String> for BearerToken {
    fn from(s: String) -> Self {
        BearerToken::new(s)
    }
}

impl From<&str> for BearerToken {
    fn from(s: &str) -> Self {
        BearerToken::new(s)
    }
}

impl Interceptor for BearerInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert("authorization", self.authorization.clone());
        if let Some(act_as) = &self.act_as {
            metadata.insert(headers::ACT_AS, act_as.clone());
        }
        inject_trace_context(metadata);
        Ok(request)
    }
}

/// Writes the current span's context with the process's propagator. Without
/// trace export there is no valid span context and nothing is written.
fn inject_trace_context(metadata: &mut MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Propagators emit lowercase ASCII names and values; anything else
        // cannot travel as metadata and is dropped rather than failing the call.
        if let (Ok(key), Ok(value)) = (
            key.parse::<AsciiMetadataKey>(),
            AsciiMetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}
