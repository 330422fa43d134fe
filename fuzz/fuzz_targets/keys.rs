//! Key configuration parsing at start-up: any bytes as a PEM public key and
//! as a JWKS document. Never panics; refusals say why in bounded text.
#![no_main]

use auth_interceptor::{KeyConfig, TokenVerifier, VerifierConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = |keys| VerifierConfig {
        keys,
        ..VerifierConfig::hs256(b"x".to_vec())
    };
    if let Err(e) = TokenVerifier::new(&config(KeyConfig::PublicKeyPem(data.to_vec()))) {
        assert!(!e.is_empty());
    }
    if let Ok(doc) = std::str::from_utf8(data)
        && let Err(e) = TokenVerifier::new(&config(KeyConfig::Jwks(doc.to_owned())))
    {
        assert!(!e.is_empty());
    }
});
