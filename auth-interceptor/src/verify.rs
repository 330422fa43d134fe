//! Token validation (docs/api.md, "Tokens"): signature first, algorithms pinned by
//! configuration, then the registered claims, then igny8's `type`.

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm},
};
use serde::Deserialize;
use serde_json::Value;

use crate::{error::AuthError, secret::Secret};

/// Tokens longer than this are rejected before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Where verification keys come from.
#[derive(Debug, Clone)]
pub enum KeyConfig {
    /// HS256 with a shared secret (the existing issuer's scheme).
    Hs256Secret(Secret<Vec<u8>>),
    /// One public key in PEM: RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA).
    PublicKeyPem(Vec<u8>),
    /// A JWKS document; the token's `kid` selects the key, and each key's
    /// algorithm is pinned (from its `alg`, else from its key type).
    Jwks(String),
}

impl KeyConfig {
    /// Reads a PEM public key file.
    pub fn pem_file(path: &Path) -> Result<Self, String> {
        std::fs::read(path)
            .map(KeyConfig::PublicKeyPem)
            .map_err(|e| format!("cannot read public key file {}: {e}", path.display()))
    }

    /// Reads a JWKS file.
    pub fn jwks_file(path: &Path) -> Result<Self, String> {
        std::fs::read_to_string(path)
            .map(KeyConfig::Jwks)
            .map_err(|e| format!("cannot read JWKS file {}: {e}", path.display()))
    }
}

/// Everything the verifier needs.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Verification keys.
    pub keys: KeyConfig,
    /// Required `iss` when set.
    pub issuer: Option<String>,
    /// Required `aud` when set.
    pub audience: Option<String>,
    /// Clock-skew leeway for `exp` and `nbf`.
    pub leeway: Duration,
}

impl VerifierConfig {
    /// HS256 with the default leeway (30 s) and no `iss`/`aud` checks.
    pub fn hs256(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            keys: KeyConfig::Hs256Secret(Secret::new(secret.into())),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        }
    }
}

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// `type: access`.
    User {
        /// From `user_id` (or a numeric `sub`).
        user_id: i64,
        /// The token's `account_id`: a hint only, never authoritative.
        account_hint: Option<i64>,
    },
    /// `type: service`.
    Service {
        /// From `sub`.
        name: String,
    },
}

/// A token whose signature and claims checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Who the token speaks for.
    pub principal: Principal,
}

/// One pinned key.
struct PinnedKey {
    key: DecodingKey,
    validation: Validation,
}

enum Keys {
    /// One key for every token (`kid` ignored).
    Single(Box<PinnedKey>),
    /// A JWKS: keys by `kid`, and the sole usable key when there is just
    /// one (for tokens that carry no `kid`).
    Set {
        by_kid: HashMap<String, Arc<PinnedKey>>,
        sole: Option<Arc<PinnedKey>>,
    },
}

/// Verifies bearer tokens against the configured keys.
pub struct TokenVerifier {
    keys: Keys,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.keys {
            Keys::Single(k) => format!("{:?}", k.validation.algorithms),
            Keys::Set { by_kid, sole } => {
                format!(
                    "jwks({} by kid, sole key: {})",
                    by_kid.len(),
                    sole.is_some()
                )
            }
        };
        f.debug_struct("TokenVerifier")
            .field("keys", &kind)
            .finish()
    }
}

#[derive(Deserialize)]
struct RawClaims {
    #[serde(rename = "type")]
    token_type: Option<String>,
    user_id: Option<Value>,
    sub: Option<Value>,
    account_id: Option<Value>,
}

impl TokenVerifier {
    /// Builds a verifier; a bad key or key file is a configuration error.
    pub fn new(config: &VerifierConfig) -> Result<Self, String> {
        let pin = |key: DecodingKey, alg: Algorithm| PinnedKey {
            key,
            validation: validation(alg, config),
        };
        let keys = match &config.keys {
            KeyConfig::Hs256Secret(secret) => {
                if secret.expose().is_empty() {
                    return Err("the HS256 secret (IGNY8_JWT_SECRET) is empty".into());
                }
                if secret.expose().len() < 32 {
                    tracing::warn!("the HS256 secret is shorter than 32 bytes; use a longer one");
                }
                let key = DecodingKey::from_secret(secret.expose());
                Keys::Single(Box::new(pin(key, Algorithm::HS256)))
            }
            KeyConfig::PublicKeyPem(pem) => {
                let (key, alg) = pem_key(pem)?;
                Keys::Single(Box::new(pin(key, alg)))
            }
            KeyConfig::Jwks(doc) => {
                let set: JwkSet =
                    serde_json::from_str(doc).map_err(|e| format!("invalid JWKS: {e}"))?;
                let mut by_kid = HashMap::new();
                let mut usable = Vec::new();
                for (i, jwk) in set.keys.iter().enumerate() {
                    let name = jwk.common.key_id.clone().unwrap_or_else(|| format!("#{i}"));
                    // A published set may hold keys for other purposes
                    // (encryption, other curves): skip them, loudly.
                    let pinned = match jwk_algorithm(jwk).and_then(|alg| {
                        DecodingKey::from_jwk(jwk)
                            .map(|key| Arc::new(pin(key, alg)))
                            .map_err(|e| e.to_string())
                    }) {
                        Ok(pinned) => pinned,
                        Err(e) => {
                            tracing::warn!(key = %name, "JWKS key skipped: {e}");
                            continue;
                        }
                    };
                    if let Some(kid) = &jwk.common.key_id {
                        by_kid.insert(kid.clone(), pinned.clone());
                    }
                    usable.push(pinned);
                }
                if usable.is_empty() {
                    return Err(
                        "JWKS has no usable key (RSA, EC P-256 or Ed25519 public keys)".into(),
                    );
                }
                let sole = (usable.len() == 1).then(|| usable.remove(0));
                Keys::Set { by_kid, sole }
            }
        };
        Ok(Self { keys })
    }

    /// Verifies a raw JWT: size, signature, `exp`/`nbf`/`iss`/`aud`, then
    /// `type` and the principal claims.
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TokenTooLarge(token.len()));
        }
        let pinned: &PinnedKey = match &self.keys {
            Keys::Single(k) => k,
            Keys::Set { by_kid, sole } => {
                let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
                match (header.kid, sole) {
                    (Some(kid), _) => by_kid.get(&kid).ok_or_else(|| {
                        AuthError::InvalidToken(format!("unknown key id {kid:?}"))
                    })?,
                    (None, Some(sole)) => sole,
                    (None, None) => {
                        return Err(AuthError::InvalidToken(
                            "token has no `kid` and the key set has several keys".into(),
                        ));
                    }
                }
            }
        };
        let data = jsonwebtoken::decode::<RawClaims>(token, &pinned.key, &pinned.validation)
            .map_err(invalid)?;
        principal(data.claims).map(|principal| VerifiedToken { principal })
    }
}

fn validation(alg: Algorithm, config: &VerifierConfig) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = config.leeway.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp"];
    v.validate_aud = false;
    if let Some(aud) = &config.audience {
        v.set_audience(&[aud]);
        v.validate_aud = true;
        required.push("aud");
    }
    if let Some(iss) = &config.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

fn pem_key(pem: &[u8]) -> Result<(DecodingKey, Algorithm), String> {
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Ok((k, Algorithm::RS256));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Ok((k, Algorithm::ES256));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        return Ok((k, Algorithm::EdDSA));
    }
    Err("public key PEM is not an RSA, EC P-256 or Ed25519 public key".into())
}

fn jwk_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    let from_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return Err("only RSA, EC P-256 and Ed25519 public keys are accepted".into()),
    };
    match jwk.common.key_algorithm {
        None => Ok(from_type),
        Some(KeyAlgorithm::RS256) if from_type == Algorithm::RS256 => Ok(from_type),
        Some(KeyAlgorithm::ES256) if from_type == Algorithm::ES256 => Ok(from_type),
        Some(KeyAlgorithm::EdDSA) if from_type == Algorithm::EdDSA => Ok(from_type),
        Some(other) => Err(format!("algorithm {other:?} is not accepted for this key")),
    }
}

fn invalid(err: jsonwebtoken::errors::Error) -> AuthError {
    match err.kind() {
        ErrorKind::ExpiredSignature => AuthError::InvalidToken("token has expired".into()),
        ErrorKind::ImmatureSignature => {
            AuthError::InvalidToken("token is not valid yet (nbf)".into())
        }
        ErrorKind::InvalidSignature => AuthError::InvalidToken("bad signature".into()),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            AuthError::InvalidToken("algorithm not accepted".into())
        }
        ErrorKind::InvalidIssuer => AuthError::InvalidToken("wrong issuer".into()),
        ErrorKind::InvalidAudience => AuthError::InvalidToken("wrong audience".into()),
        ErrorKind::MissingRequiredClaim(c) => {
            AuthError::InvalidToken(format!("missing required claim `{c}`"))
        }
        _ => AuthError::InvalidToken("malformed token".into()),
    }
}

fn as_id(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .filter(|id| *id > 0)
}

fn principal(claims: RawClaims) -> Result<Principal, AuthError> {
    match claims.token_type.as_deref() {
        Some("access") => {
            let from_user_id = match &claims.user_id {
                Some(v) => Some(as_id(v).ok_or_else(|| {
                    AuthError::InvalidToken("`user_id` is not a positive integer".into())
                })?),
                None => None,
            };
            let from_sub = claims.sub.as_ref().and_then(as_id);
            let user_id = match (from_user_id, from_sub) {
                (Some(a), Some(b)) if a != b => {
                    return Err(AuthError::InvalidToken(
                        "`user_id` and `sub` disagree".into(),
                    ));
                }
                (Some(id), _) | (None, Some(id)) => id,
                (None, None) => {
                    return Err(AuthError::InvalidToken(
                        "access token has no integer `user_id` (or `sub`)".into(),
                    ));
                }
            };
            let account_hint = claims.account_id.as_ref().and_then(as_id);
            Ok(Principal::User {
                user_id,
                account_hint,
            })
        }
        Some("service") => {
            let name = match &claims.sub {
                Some(Value::String(s)) if valid_service_name(s) => s.clone(),
                _ => {
                    return Err(AuthError::InvalidToken(
                        "service token needs `sub`: 1-64 chars of [A-Za-z0-9._-]".into(),
                    ));
                }
            };
            Ok(Principal::Service { name })
        }
        Some("refresh") => Err(AuthError::InvalidToken(
            "refresh tokens are not accepted".into(),
        )),
        Some(other) => Err(AuthError::InvalidToken(format!(
            "token type {:?} is not accepted",
            other.chars().take(32).collect::<String>()
        ))),
        None => Err(AuthError::InvalidToken("token has no `type` claim".into())),
    }
}

fn valid_service_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
