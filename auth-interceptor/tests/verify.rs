//! Token validation (docs/api.md, "Tokens"), rule by rule, for every key configuration.

use std::{path::PathBuf, time::Duration};

use auth_interceptor::{AuthError, KeyConfig, Principal, TokenVerifier, VerifierConfig};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, EncodingKey, Header,
    jwk::{Jwk, JwkSet},
};
use serde_json::{Value, json};

const SECRET: &[u8] = b"verify-tests-secret-0123456789abcdef";

fn key(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/keys")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn access(extra: Value) -> Value {
    let mut claims =
        json!({"type": "access", "user_id": 7, "account_id": 3, "exp": now() + 600, "iat": now()});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

fn hs(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

fn signed(alg: Algorithm, private: &str, kid: Option<&str>, claims: &Value) -> String {
    let pem = key(private);
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("{other:?}"),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn hs256() -> TokenVerifier {
    TokenVerifier::new(&VerifierConfig::hs256(SECRET)).unwrap()
}

fn with_keys(keys: KeyConfig) -> TokenVerifier {
    TokenVerifier::new(&VerifierConfig {
        keys,
        issuer: None,
        audience: None,
        leeway: Duration::from_secs(30),
    })
    .unwrap()
}

fn rejected(v: &TokenVerifier, token: &str) -> String {
    match v.verify(token) {
        Err(e @ (AuthError::InvalidToken(_) | AuthError::TokenTooLarge(_))) => e.to_string(),
        other => panic!("expected rejection, got {other:?}"),
    }
}

#[test]
fn a_valid_access_token_names_the_user_and_only_hints_the_account() {
    let t = hs256().verify(&hs(&access(json!({})))).unwrap();
    assert_eq!(
        t.principal,
        Principal::User {
            user_id: 7,
            account_hint: Some(3)
        }
    );
    let t = hs256()
        .verify(&hs(&access(json!({"account_id": null}))))
        .unwrap();
    assert_eq!(
        t.principal,
        Principal::User {
            user_id: 7,
            account_hint: None
        }
    );
}

#[test]
fn sub_may_carry_the_user_id() {
    let t = hs256()
        .verify(&hs(&access(json!({"user_id": null, "sub": "7"}))))
        .unwrap();
    assert_eq!(
        t.principal,
        Principal::User {
            user_id: 7,
            account_hint: Some(3)
        }
    );
    let msg = rejected(&hs256(), &hs(&access(json!({"user_id": 7, "sub": "8"}))));
    assert!(msg.contains("disagree"), "{msg}");
    rejected(&hs256(), &hs(&access(json!({"user_id": null}))));
    rejected(&hs256(), &hs(&access(json!({"user_id": "seven"}))));
}

#[test]
fn service_tokens_name_the_service() {
    let t = hs256()
        .verify(&hs(
            &json!({"type": "service", "sub": "writer-worker", "exp": now() + 60}),
        ))
        .unwrap();
    assert_eq!(
        t.principal,
        Principal::Service {
            name: "writer-worker".into()
        }
    );
    rejected(
        &hs256(),
        &hs(&json!({"type": "service", "exp": now() + 60})),
    );
    rejected(
        &hs256(),
        &hs(&json!({"type": "service", "sub": "bad name!", "exp": now() + 60})),
    );
}

#[test]
fn refresh_typeless_and_unknown_types_are_rejected() {
    for claims in [
        access(json!({"type": "refresh"})),
        access(json!({"type": null})),
        access(json!({"type": "admin"})),
    ] {
        rejected(&hs256(), &hs(&claims));
    }
}

#[test]
fn alg_none_is_rejected() {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&access(json!({}))).unwrap());
    for token in [format!("{header}.{body}."), format!("{header}.{body}")] {
        rejected(&hs256(), &token);
    }
}

#[test]
fn a_wrong_secret_or_key_is_rejected() {
    let other = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &access(json!({})),
        &EncodingKey::from_secret(b"another-secret-another-secret-xx"),
    )
    .unwrap();
    assert!(rejected(&hs256(), &other).contains("signature"));
    let rs = with_keys(KeyConfig::PublicKeyPem(key("rsa_public.pem")));
    rejected(
        &rs,
        &signed(
            Algorithm::RS256,
            "other_rsa_private.pem",
            None,
            &access(json!({})),
        ),
    );
}

#[test]
fn algorithms_outside_the_configured_family_are_rejected() {
    // An RS256 token against an HS256 configuration…
    rejected(
        &hs256(),
        &signed(
            Algorithm::RS256,
            "rsa_private.pem",
            None,
            &access(json!({})),
        ),
    );
    // …and the classic confusion: HS256 signed with the RSA public key as secret.
    let rs = with_keys(KeyConfig::PublicKeyPem(key("rsa_public.pem")));
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &access(json!({})),
        &EncodingKey::from_secret(&key("rsa_public.pem")),
    )
    .unwrap();
    assert!(rejected(&rs, &confused).contains("algorithm"));
    // HS512 with the right secret is still outside the pinned HS256.
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &access(json!({})),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    rejected(&hs256(), &hs512);
}

#[test]
fn exp_is_required_and_checked_with_leeway() {
    assert!(rejected(&hs256(), &hs(&access(json!({"exp": null})))).contains("exp"));
    assert!(rejected(&hs256(), &hs(&access(json!({"exp": now() - 120})))).contains("expired"));
    // Expired 10 s ago: inside the default 30 s leeway.
    hs256()
        .verify(&hs(&access(json!({"exp": now() - 10}))))
        .unwrap();
    let strict = TokenVerifier::new(&VerifierConfig {
        leeway: Duration::ZERO,
        ..VerifierConfig::hs256(SECRET)
    })
    .unwrap();
    rejected(&strict, &hs(&access(json!({"exp": now() - 10}))));
}

#[test]
fn nbf_is_honoured_when_present() {
    assert!(rejected(&hs256(), &hs(&access(json!({"nbf": now() + 300})))).contains("nbf"));
    hs256()
        .verify(&hs(&access(json!({"nbf": now() + 10}))))
        .unwrap();
    hs256()
        .verify(&hs(&access(json!({"nbf": now() - 10}))))
        .unwrap();
}

#[test]
fn iss_and_aud_are_checked_and_required_only_when_configured() {
    // Not configured: present or absent, anything goes.
    hs256()
        .verify(&hs(&access(json!({"iss": "anyone", "aud": "anything"}))))
        .unwrap();
    let strict = TokenVerifier::new(&VerifierConfig {
        issuer: Some("https://auth.igny8".into()),
        audience: Some("igny8-services".into()),
        ..VerifierConfig::hs256(SECRET)
    })
    .unwrap();
    strict
        .verify(&hs(&access(
            json!({"iss": "https://auth.igny8", "aud": "igny8-services"}),
        )))
        .unwrap();
    for (claims, needle) in [
        (json!({"aud": "igny8-services"}), "iss"),
        (json!({"iss": "https://auth.igny8"}), "aud"),
        (
            json!({"iss": "https://evil", "aud": "igny8-services"}),
            "issuer",
        ),
        (
            json!({"iss": "https://auth.igny8", "aud": "other"}),
            "audience",
        ),
    ] {
        let msg = rejected(&strict, &hs(&access(claims)));
        assert!(msg.contains(needle), "{msg} should mention {needle}");
    }
}

#[test]
fn tokens_over_8_kib_are_rejected_before_parsing() {
    let huge = "a".repeat(8 * 1024 + 1);
    assert!(matches!(
        hs256().verify(&huge),
        Err(AuthError::TokenTooLarge(_))
    ));
    let padded = hs(&access(json!({"pad": "x".repeat(9000)})));
    assert!(matches!(
        hs256().verify(&padded),
        Err(AuthError::TokenTooLarge(_))
    ));
}

#[test]
fn public_keys_from_pem_rs256_es256_eddsa() {
    for (alg, private, public) in [
        (Algorithm::RS256, "rsa_private.pem", "rsa_public.pem"),
        (Algorithm::ES256, "ec_private.pem", "ec_public.pem"),
        (Algorithm::EdDSA, "ed_private.pem", "ed_public.pem"),
    ] {
        let v = with_keys(KeyConfig::PublicKeyPem(key(public)));
        let t = v
            .verify(&signed(alg, private, None, &access(json!({}))))
            .unwrap();
        assert_eq!(
            t.principal,
            Principal::User {
                user_id: 7,
                account_hint: Some(3)
            },
            "{alg:?}"
        );
        rejected(&v, &hs(&access(json!({}))));
    }
    assert!(
        TokenVerifier::new(&VerifierConfig {
            keys: KeyConfig::PublicKeyPem(b"not a key".to_vec()),
            ..VerifierConfig::hs256(SECRET)
        })
        .is_err()
    );
}

fn jwk(alg: Algorithm, private: &str, kid: &str) -> Jwk {
    let pem = key(private);
    let enc = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_ed_pem(&pem),
    }
    .unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, alg).unwrap();
    jwk.common.key_id = Some(kid.into());
    jwk
}

#[test]
fn jwks_selects_the_key_by_kid_and_pins_its_algorithm() {
    let set = JwkSet {
        keys: vec![
            jwk(Algorithm::RS256, "rsa_private.pem", "rsa-1"),
            jwk(Algorithm::ES256, "ec_private.pem", "ec-1"),
            jwk(Algorithm::EdDSA, "ed_private.pem", "ed-1"),
        ],
    };
    let v = with_keys(KeyConfig::Jwks(serde_json::to_string(&set).unwrap()));
    v.verify(&signed(
        Algorithm::RS256,
        "rsa_private.pem",
        Some("rsa-1"),
        &access(json!({})),
    ))
    .unwrap();
    v.verify(&signed(
        Algorithm::ES256,
        "ec_private.pem",
        Some("ec-1"),
        &access(json!({})),
    ))
    .unwrap();
    v.verify(&signed(
        Algorithm::EdDSA,
        "ed_private.pem",
        Some("ed-1"),
        &access(json!({})),
    ))
    .unwrap();
    // Right key, wrong kid; unknown kid; no kid; a foreign key under a known kid.
    rejected(
        &v,
        &signed(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("ec-1"),
            &access(json!({})),
        ),
    );
    assert!(
        rejected(
            &v,
            &signed(
                Algorithm::RS256,
                "rsa_private.pem",
                Some("nope"),
                &access(json!({}))
            )
        )
        .contains("unknown key")
    );
    assert!(
        rejected(
            &v,
            &signed(
                Algorithm::RS256,
                "rsa_private.pem",
                None,
                &access(json!({}))
            )
        )
        .contains("kid")
    );
    rejected(
        &v,
        &signed(
            Algorithm::RS256,
            "other_rsa_private.pem",
            Some("rsa-1"),
            &access(json!({})),
        ),
    );
}

#[test]
fn jwks_tolerates_foreign_keys_and_a_lone_key_without_kid() {
    let mut oct =
        Jwk::from_encoding_key(&EncodingKey::from_secret(SECRET), Algorithm::HS256).unwrap();
    oct.common.key_id = Some("hs".into());
    let config = |keys: Vec<Jwk>| VerifierConfig {
        keys: KeyConfig::Jwks(serde_json::to_string(&JwkSet { keys }).unwrap()),
        ..VerifierConfig::hs256(SECRET)
    };
    // Only a symmetric key: nothing usable, a configuration error.
    assert!(TokenVerifier::new(&config(vec![oct.clone()])).is_err());
    // A usable key beside a foreign one: the foreign one is skipped, and an
    // HS256 token signed with its secret is still refused.
    let mut lone = jwk(Algorithm::ES256, "ec_private.pem", "x");
    lone.common.key_id = None;
    let v = TokenVerifier::new(&config(vec![oct, lone])).unwrap();
    rejected(&v, &hs(&access(json!({}))));
    // The one usable key serves tokens that carry no kid.
    v.verify(&signed(
        Algorithm::ES256,
        "ec_private.pem",
        None,
        &access(json!({})),
    ))
    .unwrap();
    rejected(
        &v,
        &signed(
            Algorithm::ES256,
            "ec_private.pem",
            Some("x"),
            &access(json!({})),
        ),
    );
    assert!(TokenVerifier::new(&VerifierConfig::hs256(Vec::new())).is_err());
}
