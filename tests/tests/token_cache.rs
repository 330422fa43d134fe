//! The verified-token cache seen from a client: a remembered token still
//! expires on time, a failing token keeps failing, and a token carrying the
//! same claims under another signature is checked on its own — with HS256
//! and with an RSA key, on both backends.

use std::time::Duration;

use auth_interceptor::KeyConfig;
use igny8_proto::billing::v1::GetCreditCostRequest;
use igny8_tests::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tonic::Code;

const ACCOUNT: i64 = 1;
const EDITOR: i64 = 11;

async fn seeded(b: Backend) -> TestDb {
    let db = TestDb::new(b).await;
    db.account(ACCOUNT).credits(100).create().await;
    db.user(EDITOR)
        .account(ACCOUNT)
        .role("editor")
        .create()
        .await;
    db.user(12).account(ACCOUNT).role("owner").create().await;
    db
}

/// GetCreditCost with `token`: the status code and message on failure.
async fn cost(server: &Running, token: &str) -> Result<(), (Code, String)> {
    let mut client = server.billing(token, None).await;
    client
        .get_credit_cost(GetCreditCostRequest {
            operation: "clustering".into(),
            quantity: 1,
        })
        .await
        .map(|_| ())
        .map_err(|s| (s.code(), s.message().to_owned()))
}

fn claims(user: i64, exp: i64) -> Value {
    json!({"type": "access", "user_id": user, "account_id": ACCOUNT, "exp": exp})
}

fn sign_with(claims: &Value, alg: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign")
}

async fn remembered_tokens_still_expire(b: Backend) {
    let db = seeded(b).await;
    let mut config = test_config(&db.url);
    config.jwt.leeway = Duration::ZERO;
    let server = spawn_billing_with(config).await;
    let exp = unix_now() + 2;
    let short = sign(&claims(EDITOR, exp));
    // Accepted, and so remembered, while valid.
    for _ in 0..3 {
        cost(&server, &short).await.expect("valid until exp");
    }
    while unix_now() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..2 {
        let (code, message) = cost(&server, &short).await.unwrap_err();
        assert_eq!(code, Code::Unauthenticated, "{message}");
        assert!(message.contains("expired"), "{message}");
    }
    // A fresh token for the same user is fine.
    cost(&server, &access_token(EDITOR, Some(ACCOUNT)))
        .await
        .unwrap();
}

async fn same_claims_under_another_signature_are_refused(b: Backend) {
    let db = seeded(b).await;
    let server = spawn_billing(&db).await;
    let body = claims(EDITOR, unix_now() + 3600);
    let good = sign(&body);
    cost(&server, &good).await.unwrap();
    let forged = sign_with(
        &body,
        Algorithm::HS256,
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-xx"),
    );
    assert_eq!(
        good.rsplit_once('.').unwrap().0,
        forged.rsplit_once('.').unwrap().0,
        "same header and claims"
    );
    for _ in 0..3 {
        let (code, message) = cost(&server, &forged).await.unwrap_err();
        assert_eq!(code, Code::Unauthenticated, "{message}");
        cost(&server, &good).await.unwrap();
    }
}

async fn rsa_tokens_keep_working_and_forgeries_keep_failing(b: Backend) {
    let db = seeded(b).await;
    let mut config = test_config(&db.url);
    config.jwt.keys = KeyConfig::pem_file(&fixture("keys/rsa_public.pem")).unwrap();
    let server = spawn_billing_with(config).await;
    let key = |name: &str| {
        EncodingKey::from_rsa_pem(&std::fs::read(fixture(name)).unwrap()).expect("rsa key")
    };
    let body = claims(12, unix_now() + 3600);
    let good = sign_with(&body, Algorithm::RS256, &key("keys/rsa_private.pem"));
    let forged = sign_with(&body, Algorithm::RS256, &key("keys/other_rsa_private.pem"));
    for _ in 0..3 {
        cost(&server, &good).await.unwrap();
        let (code, message) = cost(&server, &forged).await.unwrap_err();
        assert_eq!(code, Code::Unauthenticated, "{message}");
    }
    // The HS256 test secret is no key here, cached or not.
    let (code, _) = cost(&server, &access_token(12, Some(ACCOUNT)))
        .await
        .unwrap_err();
    assert_eq!(code, Code::Unauthenticated);
}

on_both_backends!(
    remembered_tokens_still_expire,
    same_claims_under_another_signature_are_refused,
    rsa_tokens_keep_working_and_forgeries_keep_failing,
);
