//! The async tower layer that authenticates every call before its handler.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use crate::{
    context::AuthContext,
    directory::Directory,
    error::AuthError,
    metrics::AuthMetrics,
    policy::Policy,
    resolve::{Recheck, Resolver},
    secret::BearerToken,
    token_cache::{TOKEN_CACHE_CAPACITY, TokenCache},
    verify::{TokenVerifier, VerifiedToken},
};

/// Metadata names the layer reads and writes.
pub mod headers {
    /// The authoritative account (set by the layer; echoed on responses).
    pub const ACCOUNT_ID: &str = "x-igny8-account-id";
    /// The authoritative user id (set by the layer for user callers).
    pub const USER_ID: &str = "x-igny8-user-id";
    /// The authoritative role (set by the layer).
    pub const ROLE: &str = "x-igny8-role";
    /// The account a developer or service acts as.
    pub const ACT_AS: &str = "x-igny8-act-as-account";
    /// Identity metadata a caller may never set: removed from every request.
    pub const IDENTITY: [&str; 3] = [ACCOUNT_ID, USER_ID, ROLE];

    // The two parsers, public for the fuzz targets in `fuzz/`.
    pub use super::{act_as, bearer};
}

// The same names as parsed header names, built at compile time: a `&str`
// key is parsed and validated again on every insert, remove and lookup
// (about 1,100 instructions each, measured with callgrind).
const ACCOUNT_ID_NAME: HeaderName = HeaderName::from_static(headers::ACCOUNT_ID);
const USER_ID_NAME: HeaderName = HeaderName::from_static(headers::USER_ID);
const ROLE_NAME: HeaderName = HeaderName::from_static(headers::ROLE);
const ACT_AS_NAME: HeaderName = HeaderName::from_static(headers::ACT_AS);
const IDENTITY_NAMES: [HeaderName; 3] = [ACCOUNT_ID_NAME, USER_ID_NAME, ROLE_NAME];

/// Verifies, resolves and authorizes one call.
pub struct Authenticator {
    /// Verifies tokens, each successful one once until it expires.
    verifier: TokenCache,
    resolver: Resolver,
    policy: Policy,
    metrics: AuthMetrics,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator with the policy of docs/api.md, "Roles and permissions".
    pub fn new(
        verifier: TokenVerifier,
        directory: Arc<dyn Directory>,
        metrics: AuthMetrics,
    ) -> Self {
        Self {
            verifier: TokenCache::new(verifier, TOKEN_CACHE_CAPACITY),
            resolver: Resolver::new(directory, metrics.clone()),
            policy: Policy::default(),
            metrics,
        }
    }

    /// Authenticates a call to `path` carrying these headers.
    pub async fn authenticate(
        &self,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<AuthContext, AuthError> {
        self.admit(path, headers).await.map(|(ctx, _)| ctx)
    }

    /// [`Authenticator::authenticate`], plus what it takes to decide again
    /// later ([`Recheck`]).
    pub async fn admit(
        &self,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(AuthContext, Recheck), AuthError> {
        let result = self.admit_inner(path, headers).await;
        match &result {
            Ok(_) => self.metrics.outcome("ok"),
            Err(e) => self.metrics.outcome(e.outcome()),
        }
        result
    }

    async fn admit_inner(
        &self,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(AuthContext, Recheck), AuthError> {
        let token = bearer(headers)?;
        let verified = self.verifier.verify(token.expose()).await?;
        let rule = self
            .policy
            .rule(path)
            .ok_or_else(|| AuthError::UnknownMethod(crate::echo(path)))?;
        let act_as = act_as(headers)?;
        let ctx = self.resolver.resolve(&verified, act_as, rule).await?;
        let recheck =
            self.resolver
                .recheck_for(VerifiedToken::clone(&verified), act_as, *rule, ctx.clone());
        Ok((ctx, recheck))
    }
}

/// The token of the one `authorization: Bearer <jwt>` entry.
pub fn bearer(headers: &HeaderMap) -> Result<BearerToken, AuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::MissingToken)?;
    let extra = values.count();
    if extra > 0 {
        return Err(AuthError::DuplicateAuthorization(extra + 1));
    }
    if value.len() > crate::verify::MAX_TOKEN_BYTES + 16 {
        return Err(AuthError::TokenTooLarge(value.len()));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::MalformedAuthorization)?
        .trim();
    // `Bearer $TOKEN` with the variable unset arrives as `Bearer` (or
    // `Bearer ` when the client keeps the space): say so plainly.
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedAuthorization);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::EmptyToken);
    }
    Ok(BearerToken::new(token))
}

/// The account of the one `x-igny8-act-as-account` entry, if any.
pub fn act_as(headers: &HeaderMap) -> Result<Option<i64>, AuthError> {
    let mut values = headers.get_all(ACT_AS_NAME).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::InvalidActAs);
    }
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|id| *id > 0)
        .map(Some)
        .ok_or(AuthError::InvalidActAs)
}

fn strip_identity(headers: &mut HeaderMap) {
    for name in IDENTITY_NAMES {
        headers.remove(name);
    }
}

fn set_identity(headers: &mut HeaderMap, ctx: &AuthContext) {
    if let Some(account) = ctx.account_id {
        headers.insert(ACCOUNT_ID_NAME, HeaderValue::from(account));
    }
    if let Some(user) = ctx.user_id() {
        headers.insert(USER_ID_NAME, HeaderValue::from(user));
    }
    headers.insert(ROLE_NAME, HeaderValue::from_static(ctx.role.as_str()));
}

/// Puts [`AuthService`] in front of a server's routes.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    /// A layer authenticating with `auth`.
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            auth: self.auth.clone(),
            inner,
        }
    }
}

/// Authenticates each request, then calls the inner service with an
/// [`AuthContext`] extension and authoritative identity metadata.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    auth: Arc<Authenticator>,
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The clone is the one that was not polled ready; swap so the ready
        // one serves this request (tower's documented pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            if Policy::is_public(request.uri().path()) {
                strip_identity(request.headers_mut());
                return inner.call(request).await;
            }
            let (ctx, recheck) = match auth.admit(request.uri().path(), request.headers()).await {
                Ok(admitted) => admitted,
                Err(err) => return Ok(Status::from(err).into_http()),
            };
            let headers = request.headers_mut();
            strip_identity(headers);
            set_identity(headers, &ctx);
            let account = ctx.account_id;
            if let Some(account) = account {
                // The server stack's RPC span declares this field; recording
                // it here puts the authoritative tenant on the trace.
                tracing::Span::current().record("igny8.account_id", account);
            }
            request.extensions_mut().insert(ctx);
            request.extensions_mut().insert(recheck);
            let mut response = inner.call(request).await?;
            if let Some(account) = account {
                response
                    .headers_mut()
                    .insert(ACCOUNT_ID_NAME, HeaderValue::from(account));
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(&map(&[])), Err(AuthError::MissingToken));
        assert_eq!(
            bearer(&map(&[("authorization", "Basic abc")])),
            Err(AuthError::MalformedAuthorization)
        );
        for empty in ["Bearer ", "Bearer", "bearer   "] {
            assert_eq!(
                bearer(&map(&[("authorization", empty)])),
                Err(AuthError::EmptyToken),
                "{empty:?}"
            );
        }
        for malformed in ["", "Basic", "a.b.c", "Token a.b.c"] {
            assert_eq!(
                bearer(&map(&[("authorization", malformed)])),
                Err(AuthError::MalformedAuthorization),
                "{malformed:?}"
            );
        }
        assert_eq!(
            bearer(&map(&[("authorization", "bearer a.b.c")]))
                .unwrap()
                .expose(),
            "a.b.c"
        );
        assert_eq!(
            bearer(&map(&[
                ("authorization", "Bearer a.b.c"),
                ("authorization", "Bearer d.e.f")
            ])),
            Err(AuthError::DuplicateAuthorization(2))
        );
    }

    #[test]
    fn act_as_parsing() {
        assert_eq!(act_as(&map(&[])), Ok(None));
        assert_eq!(
            act_as(&map(&[("x-igny8-act-as-account", "42")])),
            Ok(Some(42))
        );
        for bad in ["", "x", "-1", "0", "1.5"] {
            assert_eq!(
                act_as(&map(&[("x-igny8-act-as-account", bad)])),
                Err(AuthError::InvalidActAs),
                "{bad:?}"
            );
        }
        assert_eq!(
            act_as(&map(&[
                ("x-igny8-act-as-account", "1"),
                ("x-igny8-act-as-account", "2")
            ])),
            Err(AuthError::InvalidActAs)
        );
    }

    #[test]
    fn identity_is_stripped_and_replaced() {
        let mut h = map(&[
            ("x-igny8-account-id", "999"),
            ("x-igny8-account-id", "998"),
            ("x-igny8-role", "developer"),
            ("x-igny8-user-id", "1"),
        ]);
        strip_identity(&mut h);
        assert!(h.is_empty());
        let ctx = AuthContext {
            caller: crate::Caller::User { id: 7 },
            role: crate::Role::Viewer,
            account_id: Some(3),
            acting_as: false,
        };
        set_identity(&mut h, &ctx);
        assert_eq!(h["x-igny8-account-id"], "3");
        assert_eq!(h["x-igny8-user-id"], "7");
        assert_eq!(h["x-igny8-role"], "viewer");
    }
}
