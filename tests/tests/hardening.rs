//! Issue 15's smaller findings, end to end: every hostile or careless input
//! gets a clear status, bounded in size, and changes nothing.

use std::collections::HashMap;

use auth_interceptor::KeyConfig;
use igny8_db::on_pool;
use igny8_proto::{
    billing::v1::{
        GetBalanceRequest, GrantRequest, ListTransactionsRequest,
        billing_service_client::BillingServiceClient,
    },
    settings::v1::{
        GetModuleSettingsRequest, ModuleSettings, UpdateModuleSettingsRequest,
        settings_service_client::SettingsServiceClient,
    },
};
use igny8_tests::*;
use tonic::{Code, Status, metadata::MetadataValue};
use tonic_types::StatusExt;

const ACCOUNT: i64 = 1;
const EDITOR: i64 = 10;
const ADMIN: i64 = 11;

async fn seeded(b: Backend, credits: i64) -> TestDb {
    let db = TestDb::new(b).await;
    db.account(ACCOUNT).credits(credits).create().await;
    db.user(EDITOR)
        .account(ACCOUNT)
        .role("editor")
        .create()
        .await;
    db.user(ADMIN).account(ACCOUNT).role("admin").create().await;
    db
}

fn assert_bad_field(err: &Status, field: &str, needle: &str) {
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let br = err
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("BadRequest detail on {err:?}"));
    assert_eq!(br.field_violations[0].field, field, "{err:?}");
    assert!(
        br.field_violations[0].description.contains(needle),
        "{:?} should mention {needle}",
        br.field_violations[0].description
    );
}

async fn nul_in_text_is_invalid_argument(b: Backend) {
    let db = seeded(b, 100).await;
    let server = spawn_billing(&db).await;
    let mut editor = server.billing(&access_token(EDITOR, None), None).await;
    let mut ops = server
        .billing(&service_token("billing-admin"), Some(ACCOUNT))
        .await;

    let mut deduct = deduct_credits(5, "nul-1");
    deduct.description = "before\0after".into();
    let err = editor.deduct(deduct).await.unwrap_err();
    assert_bad_field(&err, "description", "NUL");

    let err = ops
        .grant(GrantRequest {
            credits: 5,
            idempotency_key: "nul-2".into(),
            reason: "\0".into(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&err, "reason", "NUL");

    assert_eq!(db.balance(ACCOUNT).await, 100, "nothing changed");
    assert_eq!(db.ledger_sum(ACCOUNT).await, (0, 0));
    // NUL in metadata is stored JSON-escaped and reads back intact.
    let mut deduct = deduct_credits(5, "nul-3");
    deduct.metadata = HashMap::from([("k\0".to_owned(), "v\0".to_owned())]);
    let t = editor.deduct(deduct).await.unwrap().into_inner();
    assert_eq!(t.transaction.unwrap().metadata["k\0"], "v\0");
}

async fn overflowing_grant_is_failed_precondition(b: Backend) {
    let start = i64::MAX - 5;
    let db = seeded(b, start).await;
    let server = spawn_billing(&db).await;
    let mut ops = server
        .billing(&service_token("billing-admin"), Some(ACCOUNT))
        .await;
    let grant = |credits: i64, key: &str| GrantRequest {
        credits,
        idempotency_key: key.into(),
        reason: "top-up".into(),
    };

    let err = ops.grant(grant(10, "too-much")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let info = err.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "BALANCE_OVERFLOW");
    assert_eq!(info.domain, "billing.igny8");
    assert_eq!(info.metadata["balance"], start.to_string());
    assert_eq!(info.metadata["credits"], "10");
    assert_eq!(db.balance(ACCOUNT).await, start, "nothing granted");
    assert_eq!(db.ledger_sum(ACCOUNT).await, (0, 0), "no ledger row");

    // Up to the ceiling is fine, and a retry replays.
    let r = ops.grant(grant(5, "exactly")).await.unwrap().into_inner();
    assert_eq!(r.balance, i64::MAX);
    let again = ops.grant(grant(5, "exactly")).await.unwrap().into_inner();
    assert!(again.replayed);
    assert_eq!(again.balance, i64::MAX);
    let err = ops.grant(grant(1, "one-more")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Spending from a full account still works.
    let mut editor = server.billing(&access_token(EDITOR, None), None).await;
    let d = editor
        .deduct(deduct_credits(7, "spend"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.balance, i64::MAX - 7);
}

/// Seeds `n` copies of one maximal ledger row (512 four-byte characters of
/// description, 16 metadata entries of 256 four-byte characters), directly
/// in SQL: about 19 KB each once encoded.
async fn seed_maximal_rows(db: &TestDb, editor: &mut Billing, n: i64) {
    let mut deduct = deduct_credits(1, "max-0");
    deduct.description = "𝄞".repeat(512);
    deduct.metadata = (0..16)
        .map(|i| (format!("{i:0>64}"), "𝄞".repeat(256)))
        .collect();
    let first = editor.deduct(deduct).await.unwrap().into_inner();
    let id = first.transaction.unwrap().id;
    let sql = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $2) \
        INSERT INTO credit_ledger (account_id, kind, credits, balance_after, operation, \
        quantity, description, metadata, idempotency_key, request_hash, actor, created_at) \
        SELECT account_id, kind, credits, balance_after, operation, quantity, description, \
        metadata, 'max-' || CAST(n.i AS TEXT), request_hash, actor, created_at \
        FROM credit_ledger, n WHERE id = $1";
    db.exec(sql, &[serde_json::json!(id), serde_json::json!(n - 1)])
        .await;
}

type Billing = BillingServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        auth_interceptor::BearerInterceptor,
    >,
>;

async fn pages_fit_a_default_client(b: Backend) {
    let db = seeded(b, 1_000_000).await;
    let server = spawn_billing(&db).await;
    // The generated client with its defaults: it refuses messages over 4 MiB.
    let mut editor = server.billing(&access_token(EDITOR, None), None).await;
    let rows = 300;
    seed_maximal_rows(&db, &mut editor, rows).await;

    let mut token = String::new();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = editor
            .list_transactions(ListTransactionsRequest {
                page_size: 1000,
                page_token: token.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("page {pages}: {e:?}"))
            .into_inner();
        pages += 1;
        let bytes = prost::Message::encoded_len(&page);
        assert!(bytes <= 4 * 1024 * 1024, "page {pages} is {bytes} bytes");
        assert!(!page.transactions.is_empty());
        seen.extend(page.transactions.iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages >= 2, "300 maximal rows cannot fit one 4 MiB page");
    assert_eq!(seen.len() as i64, rows, "every row exactly once");
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "newest first, no repeats"
    );
}

async fn page_tokens_use_their_own_key(b: Backend) {
    let db = seeded(b, 100).await;
    let mut keyed = test_config(&db.url);
    keyed.page_token_key = Some(auth_interceptor::Secret::new(vec![7; 32]));
    let one = spawn_billing_with(keyed.clone()).await;
    let two = spawn_billing_with(keyed).await;
    let mut other_key = test_config(&db.url);
    other_key.page_token_key = Some(auth_interceptor::Secret::new(vec![8; 32]));
    let three = spawn_billing_with(other_key).await;

    let token = access_token(EDITOR, None);
    let mut c1 = one.billing(&token, None).await;
    for i in 0..3 {
        c1.deduct(deduct_credits(1, &format!("k{i}")))
            .await
            .unwrap();
    }
    let first = c1
        .list_transactions(ListTransactionsRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let next = ListTransactionsRequest {
        page_size: 1,
        page_token: first.next_page_token,
    };
    // Another replica with the same key continues the listing…
    let page = two
        .billing(&token, None)
        .await
        .list_transactions(next.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.transactions.len(), 1);
    // …one with another key refuses the token, and says what to do.
    let err = three
        .billing(&token, None)
        .await
        .list_transactions(next)
        .await
        .unwrap_err();
    assert_bad_field(&err, "page_token", "start again");

    // With a public JWT key and no page-token key, tokens never come from
    // the (public) key: two such replicas do not accept each other's.
    let public = |url: &str| {
        let mut c = test_config(url);
        c.jwt.keys = KeyConfig::PublicKeyPem(
            std::fs::read(fixture("keys/rsa_public.pem")).expect("fixture"),
        );
        c
    };
    let a = spawn_billing_with(public(&db.url)).await;
    let b2 = spawn_billing_with(public(&db.url)).await;
    let rs = rs256_access_token(EDITOR);
    let first = a
        .billing(&rs, None)
        .await
        .list_transactions(ListTransactionsRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let err = b2
        .billing(&rs, None)
        .await
        .list_transactions(ListTransactionsRequest {
            page_size: 1,
            page_token: first.next_page_token,
        })
        .await
        .unwrap_err();
    assert_bad_field(&err, "page_token", "start again");
}

fn rs256_access_token(user: i64) -> String {
    let pem = std::fs::read(fixture("keys/rsa_private.pem")).expect("fixture");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &serde_json::json!({"type": "access", "user_id": user, "exp": unix_now() + 600}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).expect("key"),
    )
    .expect("sign")
}

async fn a_second_authorization_header_is_unauthenticated(b: Backend) {
    let db = seeded(b, 100).await;
    let billing = spawn_billing(&db).await;
    let settings = spawn_settings(&db).await;
    let good: MetadataValue<_> = format!("Bearer {}", access_token(EDITOR, None))
        .parse()
        .unwrap();
    let other: MetadataValue<_> = format!("Bearer {}", access_token(ADMIN, None))
        .parse()
        .unwrap();
    for second in [good.clone(), other] {
        let mut req = tonic::Request::new(GetBalanceRequest {});
        req.metadata_mut().append("authorization", good.clone());
        req.metadata_mut().append("authorization", second.clone());
        let err = BillingServiceClient::new(billing.channel().await)
            .get_balance(req)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert_eq!(
            err.get_details_error_info().unwrap().reason,
            "MALFORMED_CREDENTIALS"
        );
        assert!(err.message().contains("exactly one"), "{}", err.message());

        let mut req = tonic::Request::new(GetModuleSettingsRequest {});
        req.metadata_mut().append("authorization", good.clone());
        req.metadata_mut().append("authorization", second);
        let err = SettingsServiceClient::new(settings.channel().await)
            .get_module_settings(req)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    // One header still works.
    let mut req = tonic::Request::new(GetBalanceRequest {});
    req.metadata_mut().append("authorization", good);
    BillingServiceClient::new(billing.channel().await)
        .get_balance(req)
        .await
        .unwrap();
}

async fn errors_echo_caller_input_bounded(b: Backend) {
    let db = seeded(b, 100).await;
    let settings = spawn_settings(&db).await;
    let billing = spawn_billing(&db).await;
    let mut c = settings.settings(&access_token(ADMIN, None), None).await;
    // A 100 KB unknown mask path (under the 128 KiB request limit).
    let huge = "x".repeat(100_000);
    let err = c
        .update_module_settings(UpdateModuleSettingsRequest {
            settings: Some(ModuleSettings {
                writer_enabled: true,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![huge.clone()],
            }),
        })
        .await
        .unwrap_err();
    assert_bad_field(&err, "update_mask.paths[0]", "bytes in all");
    assert!(err.message().len() < 1024, "{} bytes", err.message().len());
    assert!(err.details().len() < 2048, "{} bytes", err.details().len());

    // Billing: an unknown operation is echoed cut to 64 characters.
    let mut editor = billing.billing(&access_token(EDITOR, None), None).await;
    let err = editor
        .deduct(deduct_usage(&huge, 1, "u1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().len() < 1024, "{} bytes", err.message().len());
    assert!(err.details().len() < 2048, "{} bytes", err.details().len());
    assert_eq!(db.balance(ACCOUNT).await, 100);
}

async fn false_flags_without_a_mask_are_refused(b: Backend) {
    let db = seeded(b, 0).await;
    let server = spawn_settings(&db).await;
    let mut c = server.settings(&access_token(ADMIN, None), None).await;
    // Read, modify, write back without a mask: the classic mistake.
    let mut s = c
        .get_module_settings(GetModuleSettingsRequest {})
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    s.writer_enabled = false;
    let err = c
        .update_module_settings(UpdateModuleSettingsRequest {
            settings: Some(s),
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_bad_field(&err, "update_mask", "writer_enabled");
    // A body with only a false flag (on the wire: nothing set) too.
    let err = c
        .update_module_settings(UpdateModuleSettingsRequest {
            settings: Some(ModuleSettings {
                linker_enabled: false,
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_bad_field(&err, "update_mask", "update_mask");
    let now = c
        .get_module_settings(GetModuleSettingsRequest {})
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert!(now.writer_enabled && now.linker_enabled, "nothing changed");
    // Doing what the message says works.
    let r = c
        .update_module_settings(UpdateModuleSettingsRequest {
            settings: Some(s),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["writer_enabled".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert!(!r.writer_enabled);
}

async fn the_ledger_is_append_only_in_the_schema(b: Backend) {
    let db = seeded(b, 100).await;
    let server = spawn_billing(&db).await;
    let mut editor = server.billing(&access_token(EDITOR, None), None).await;
    let row = editor
        .deduct(deduct_credits(5, "keep-me"))
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap();
    let attempts: &[&str] = match b {
        Backend::Postgres => &[
            "TRUNCATE credit_ledger CASCADE",
            "TRUNCATE accounts CASCADE",
            "DELETE FROM credit_ledger",
            "UPDATE credit_ledger SET credits = -1",
        ],
        Backend::Sqlite => &[
            "DELETE FROM credit_ledger",
            "UPDATE credit_ledger SET credits = -1",
            // REPLACE would delete the row it collides with: on the id…
            "INSERT OR REPLACE INTO credit_ledger (id, account_id, kind, credits, balance_after, \
             idempotency_key, request_hash, actor, created_at) \
             SELECT id, account_id, 'grant', 1000, 1000, 'other', 'h', 'x', created_at FROM credit_ledger",
            // …or on the idempotency key of its kind.
            "INSERT OR REPLACE INTO credit_ledger (account_id, kind, credits, balance_after, \
             idempotency_key, request_hash, actor, created_at) \
             SELECT account_id, kind, -1, 0, idempotency_key, 'h', 'x', created_at FROM credit_ledger",
            "REPLACE INTO credit_ledger (account_id, kind, credits, balance_after, \
             idempotency_key, request_hash, actor, created_at) \
             SELECT account_id, kind, -1, 0, idempotency_key, 'h', 'x', created_at FROM credit_ledger",
        ],
    };
    for sql in attempts {
        let result = on_pool!(&db.db, pool => sqlx::query(*sql).execute(pool).await.map(|_| ()));
        let err = result.expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(db.ledger_sum(ACCOUNT).await, (-5, 1));
    let listed = editor
        .list_transactions(ListTransactionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .transactions;
    assert_eq!(listed, vec![row], "the row is exactly as written");
    // The service's own retry path still replays.
    let again = editor
        .deduct(deduct_credits(5, "keep-me"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(db.balance(ACCOUNT).await, 95);
}

on_both_backends!(
    nul_in_text_is_invalid_argument,
    overflowing_grant_is_failed_precondition,
    pages_fit_a_default_client,
    page_tokens_use_their_own_key,
    a_second_authorization_header_is_unauthenticated,
    errors_echo_caller_input_bounded,
    false_flags_without_a_mask_are_refused,
    the_ledger_is_append_only_in_the_schema,
);
