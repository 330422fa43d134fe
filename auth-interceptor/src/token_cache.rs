//! Verified tokens, remembered by a hash of the token until they expire.
//!
//! A client sends the same bearer token on every call until it refreshes
//! it. Checking its signature each time costs 1–2 µs with HS256 and
//! 30–150 µs with RS256 / ES256 / EdDSA; the answer cannot change before the
//! token expires, because the keys are fixed for the life of the process.
//! So a successful verification is kept:
//!
//! - **by SHA-256 of the token**: the raw token is never stored, and a
//!   different token — even one carrying the same claims, or a forged
//!   signature over them — hashes differently and is verified on its own;
//! - **never past `exp` + leeway**: exactly the last second at which the
//!   verifier itself would still accept the token (the entry is dropped
//!   then, and every read checks the deadline against the wall clock too).
//!   `nbf` needs no bound: a token that verified is already past `nbf` −
//!   leeway, and time only moves on. A token whose `exp` is not a plain
//!   integer is verified every time;
//! - **failures are not kept**: a token that fails is verified again on its
//!   next use and fails again, so a failure can never become a success
//!   (and a token that was merely early is accepted once its `nbf` passes);
//! - **bounded** ([`TOKEN_CACHE_CAPACITY`] tokens; when full, expired
//!   tokens are dropped first, then the one that expires soonest).
//!
//! Only the signature and claims check is skipped. Who the token's user is,
//! which account they are in and whether it is active are still resolved on
//! every call through the directory (and its own short-lived cache).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use sha2::{Digest, Sha256};

use crate::{
    error::AuthError,
    memo::Memo,
    verify::{TokenVerifier, VerifiedToken},
};

/// At most this many verified tokens are remembered (one per active
/// session, roughly; ~200 bytes each).
pub const TOKEN_CACHE_CAPACITY: u64 = 10_000;

/// A verification result and the last Unix second it holds for.
#[derive(Clone)]
struct Entry {
    token: Arc<VerifiedToken>,
    valid_until: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Verifies tokens through a [`TokenVerifier`], remembering successes (see
/// the module docs).
pub struct TokenCache {
    verifier: TokenVerifier,
    verified: Memo<[u8; 32], Entry>,
    /// Full verifications run (cache misses and failures).
    verifications: AtomicU64,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("verifier", &self.verifier)
            .field("entries", &self.verified.len())
            .finish()
    }
}

impl TokenCache {
    /// Remembers what `verifier` accepts, for at most `capacity` tokens.
    pub fn new(verifier: TokenVerifier, capacity: u64) -> Self {
        Self {
            verifier,
            verified: Memo::new(usize::try_from(capacity).unwrap_or(usize::MAX)),
            verifications: AtomicU64::new(0),
        }
    }

    /// The verifier behind the cache.
    pub fn verifier(&self) -> &TokenVerifier {
        &self.verifier
    }

    /// What [`TokenVerifier::verify`] would answer for `token` now.
    pub async fn verify(&self, token: &str) -> Result<Arc<VerifiedToken>, AuthError> {
        // Oversized tokens are refused before any work, hashing included.
        if token.len() > crate::verify::MAX_TOKEN_BYTES {
            return self.verifier.verify(token).map(Arc::new);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(entry) = self.verified.get(&key) {
            // Past `valid_until` the entry is never served; it is dropped
            // here, or when its shard needs the room.
            if unix_now() < entry.valid_until {
                return Ok(entry.token);
            }
            self.verified.remove(&key);
        }
        self.verifications.fetch_add(1, Ordering::Relaxed);
        let (verified, valid_until) = self.verifier.verify_until(token)?;
        let verified = Arc::new(verified);
        if let Some(valid_until) = valid_until {
            let now = unix_now();
            if now < valid_until {
                let entry = Entry {
                    token: verified.clone(),
                    valid_until,
                };
                self.verified
                    .insert(key, entry, now, |entry| entry.valid_until);
            }
        }
        Ok(verified)
    }

    /// How many tokens were fully verified (signature and claims) so far:
    /// one per token while it is remembered, one per call for failures.
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    /// Tokens currently remembered (for tests and debugging).
    pub async fn len(&self) -> u64 {
        self.verified.len() as u64
    }

    /// True when no token is remembered.
    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }
}

#[cfg(test)]
mod tests {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use hmac::{Hmac, Mac};

    use std::time::Duration;

    use super::*;
    use crate::verify::{Principal, VerifierConfig};

    const SECRET: &[u8] = b"token-cache-test-secret-0123456789abcdef";

    /// An HS256 token over `claims` (JSON), signed with `secret`.
    fn sign(claims: &str, secret: &[u8]) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.as_bytes());
        let input = format!("{header}.{payload}");
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{input}.{sig}")
    }

    fn access(user: i64, exp: u64) -> String {
        format!(r#"{{"type":"access","user_id":{user},"exp":{exp}}}"#)
    }

    fn cache(leeway_secs: u64) -> TokenCache {
        let mut config = VerifierConfig::hs256(SECRET);
        config.leeway = Duration::from_secs(leeway_secs);
        TokenCache::new(TokenVerifier::new(&config).unwrap(), 100)
    }

    fn user_of(token: &VerifiedToken) -> i64 {
        match token.principal {
            Principal::User { user_id, .. } => user_id,
            Principal::Service { .. } => panic!("not a user"),
        }
    }

    #[tokio::test]
    async fn a_valid_token_is_verified_once_and_then_served_from_memory() {
        let cache = cache(0);
        let token = sign(&access(7, unix_now() + 3600), SECRET);
        assert_eq!(user_of(&cache.verify(&token).await.unwrap()), 7);
        assert_eq!(cache.len().await, 1);
        for _ in 0..5 {
            let again = cache.verify(&token).await.unwrap();
            assert_eq!(user_of(&again), 7);
        }
        assert_eq!(cache.len().await, 1, "the same token is one entry");
        assert_eq!(cache.verifications(), 1, "verified once, then remembered");
        // Another valid token is verified (once) on its own.
        let other = sign(&access(8, unix_now() + 3600), SECRET);
        assert_eq!(user_of(&cache.verify(&other).await.unwrap()), 8);
        assert_eq!(user_of(&cache.verify(&other).await.unwrap()), 8);
        assert_eq!(cache.verifications(), 2);
    }

    #[tokio::test]
    async fn failures_stay_failures_and_are_not_remembered() {
        let cache = cache(0);
        let forged = sign(
            &access(7, unix_now() + 3600),
            b"not-the-secret-at-all-0123456789",
        );
        for _ in 0..3 {
            assert!(matches!(
                cache.verify(&forged).await,
                Err(AuthError::InvalidToken(m)) if m == "bad signature"
            ));
        }
        let expired = sign(&access(7, unix_now() - 100), SECRET);
        for _ in 0..3 {
            assert!(matches!(
                cache.verify(&expired).await,
                Err(AuthError::InvalidToken(m)) if m == "token has expired"
            ));
        }
        let refresh = sign(
            &format!(
                r#"{{"type":"refresh","user_id":7,"exp":{}}}"#,
                unix_now() + 3600
            ),
            SECRET,
        );
        assert!(cache.verify(&refresh).await.is_err());
        assert!(cache.verify(&refresh).await.is_err());
        assert!(cache.is_empty().await);
        assert_eq!(cache.verifications(), 8, "every failing call is verified");
    }

    #[tokio::test]
    async fn a_different_token_with_the_same_claims_is_verified_on_its_own() {
        let cache = cache(0);
        let claims = access(7, unix_now() + 3600);
        let good = sign(&claims, SECRET);
        cache.verify(&good).await.unwrap();
        // Same header and claims, other signature: not the cached token.
        let forged = sign(&claims, b"not-the-secret-at-all-0123456789");
        assert_eq!(
            good.rsplit_once('.').unwrap().0,
            forged.rsplit_once('.').unwrap().0
        );
        assert!(cache.verify(&forged).await.is_err());
        // Truncated or altered signature of the cached token: also refused.
        assert!(cache.verify(&good[..good.len() - 2]).await.is_err());
        assert!(cache.verify(&format!("{good}A")).await.is_err());
        assert!(cache.verify(&good).await.is_ok(), "the cached one still is");
    }

    #[tokio::test]
    async fn nothing_is_served_past_exp_plus_leeway() {
        // Expires in 2 s, no leeway: accepted now, refused once it expired,
        // although it was cached while valid.
        let cache = cache(0);
        let exp = unix_now() + 2;
        let token = sign(&access(7, exp), SECRET);
        assert!(cache.verify(&token).await.is_ok());
        assert_eq!(cache.len().await, 1, "remembered while valid");
        while unix_now() <= exp {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(matches!(
            cache.verify(&token).await,
            Err(AuthError::InvalidToken(m)) if m == "token has expired"
        ));
        assert!(cache.is_empty().await);
    }

    #[tokio::test]
    async fn a_full_cache_keeps_its_bound_and_the_tokens_that_last() {
        let cache = cache(0); // 100 tokens
        let now = unix_now();
        // 300 valid tokens, each expiring later than the one before.
        let tokens: Vec<String> = (0..300)
            .map(|i| sign(&access(i + 1, now + 3600 + i as u64), SECRET))
            .collect();
        for token in &tokens {
            cache.verify(token).await.unwrap();
            assert!(cache.len().await <= 100);
        }
        assert_eq!(cache.verifications(), 300);
        // The last one expires latest: still remembered. The first, which
        // expires soonest, made room long ago and is verified again.
        cache.verify(&tokens[299]).await.unwrap();
        assert_eq!(cache.verifications(), 300);
        cache.verify(&tokens[0]).await.unwrap();
        assert_eq!(cache.verifications(), 301);
    }

    #[tokio::test]
    async fn leeway_is_honoured_like_the_verifier_does() {
        // Expired 10 s ago, leeway 60 s: still valid, and cached.
        let cache = cache(60);
        let token = sign(&access(7, unix_now() - 10), SECRET);
        assert!(cache.verify(&token).await.is_ok());
        assert!(cache.verify(&token).await.is_ok());
        assert_eq!(cache.len().await, 1);
        // Not valid before nbf − leeway: refused, and refused again.
        let early = sign(
            &format!(
                r#"{{"type":"access","user_id":7,"exp":{},"nbf":{}}}"#,
                unix_now() + 3600,
                unix_now() + 600
            ),
            SECRET,
        );
        assert!(cache.verify(&early).await.is_err());
        assert!(cache.verify(&early).await.is_err());
    }
}
