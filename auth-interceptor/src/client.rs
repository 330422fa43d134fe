//! The client side: attach a bearer token (and act-as) to outgoing calls.

use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::Interceptor,
};

use crate::{layer::headers, secret::BearerToken};

/// A tonic client interceptor for internal callers: sets
/// `authorization: Bearer <token>` and, when configured,
/// `x-igny8-act-as-account`.
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
        Ok(request)
    }
}
