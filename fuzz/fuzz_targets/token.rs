//! Token parsing and verification: any string, three key configurations.
//! Never panics; anything accepted names a sane principal.
#![no_main]

use std::sync::LazyLock;

use auth_interceptor::{KeyConfig, Principal, TokenVerifier, VerifierConfig};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef0123456789";

static VERIFIERS: LazyLock<Vec<TokenVerifier>> = LazyLock::new(|| {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/keys/");
    let pem = |name: &str| std::fs::read(format!("{keys}{name}")).expect("fixture key");
    let jwks = serde_json::json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "a", "use": "sig",
         "x": "Wb842j7PrWKB7RJrCJvKXRvwkKasdEIVKWrbjq5TjeA",
         "y": "Om3zERwB3G4pmWes72kPDe4gmEv3UwFqZQTejDJSaMg"},
        {"kty": "OKP", "crv": "Ed25519", "kid": "b",
         "x": "00hhGB-meHzRIz2R6_WPrsV-THWEt8NqaAeyGozkn7c"}
    ]});
    let mut iss_aud = VerifierConfig::hs256(SECRET);
    iss_aud.issuer = Some("igny8".into());
    iss_aud.audience = Some("billing".into());
    [
        VerifierConfig::hs256(SECRET),
        iss_aud,
        VerifierConfig {
            keys: KeyConfig::PublicKeyPem(pem("rsa_public.pem")),
            ..VerifierConfig::hs256(SECRET)
        },
        VerifierConfig {
            keys: KeyConfig::Jwks(jwks.to_string()),
            ..VerifierConfig::hs256(SECRET)
        },
    ]
    .iter()
    .map(|c| TokenVerifier::new(c).expect("fuzz key configurations are valid"))
    .collect()
});

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    for v in VERIFIERS.iter() {
        match v.verify(token) {
            Ok(t) => match t.principal {
                Principal::User {
                    user_id,
                    account_hint,
                } => {
                    assert!(user_id > 0);
                    assert!(account_hint.is_none_or(|a| a > 0));
                }
                Principal::Service { name } => {
                    assert!((1..=64).contains(&name.len()));
                }
            },
            Err(e) => {
                // Whatever the token says, the error stays small.
                assert!(e.to_string().len() < 512, "{e}");
            }
        }
    }
});
