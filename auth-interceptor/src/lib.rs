//! Who is calling, for which account, with which role — decided in one place.
//!
//! Every igny8 gRPC server puts [`AuthLayer`] in front of its handlers. For
//! each call the layer:
//!
//! 1. reads `authorization: Bearer <jwt>` and verifies it ([`TokenVerifier`]:
//!    pinned algorithms, `exp`/`nbf` with leeway, `iss`/`aud` when configured);
//! 2. resolves the **authoritative account** from the directory
//!    ([`Resolver`]): the user's *current* `users.account_id`, never the
//!    token's hint; `x-igny8-act-as-account` for developers and services;
//! 3. checks the permission matrix ([`Policy`], data, not scattered `if`s);
//! 4. strips inbound `x-igny8-*` identity metadata, sets the authoritative
//!    values, and hands the handler a typed [`AuthContext`] extension;
//! 5. echoes `x-igny8-account-id` on the response.
//!
//! Health and reflection are reachable without a token. Failures map to
//! gRPC codes in one place ([`AuthError`]). Internal callers attach tokens
//! with [`BearerInterceptor`].

#![forbid(unsafe_code)]

mod client;
mod context;
mod directory;
mod echo;
mod error;
mod layer;
pub mod memo;
mod metrics;
mod policy;
mod resolve;
mod secret;
mod token_cache;
mod verify;

pub use client::BearerInterceptor;
pub use context::{AuthContext, Caller, Role};
pub use directory::{
    AccountRecord, AccountStatus, CachedDirectory, DEFAULT_CACHE_TTL, Directory, DirectoryError,
    MAX_CACHE_TTL, SqlDirectory, UserRecord,
};
pub use echo::{MAX_ECHO_CHARS, echo};
pub use error::{AuthError, ERROR_DOMAIN};
pub use layer::{AuthLayer, AuthService, Authenticator, headers};
pub use metrics::AuthMetrics;
pub use policy::{Access, Policy, RpcRule, Scope};
pub use resolve::{Recheck, Resolver};
pub use secret::{BearerToken, Secret};
pub use token_cache::{TOKEN_CACHE_CAPACITY, TokenCache};
pub use verify::{
    KeyConfig, MAX_TOKEN_BYTES, Principal, TokenVerifier, VerifiedToken, VerifierConfig,
};
