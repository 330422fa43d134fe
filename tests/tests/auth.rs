//! Account resolution and roles (docs/api.md) end to end: which tenant a call acts on, who may call
//! what, and how directory changes take effect — on both backends.

use std::{sync::Arc, time::Duration};

use auth_interceptor::{
    AuthContext, AuthError, AuthMetrics, Caller, Directory, Policy, Principal, Resolver, Role,
    SqlDirectory, VerifiedToken,
};
use igny8_proto::{
    billing::v1::{GetBalanceRequest, GetCreditCostRequest, GrantRequest},
    settings::v1::{
        CheckModuleRequest, GetModuleSettingsRequest, Module, UpdateModuleSettingsRequest,
    },
};
use igny8_tests::*;
use serde_json::json;
use tonic::{Code, Request, metadata::MetadataValue};
use tonic_types::StatusExt;

const A1: i64 = 1;
const A2: i64 = 2;
const SUSPENDED: i64 = 3;

/// Two active accounts, one suspended, and users of every role.
async fn directory(b: Backend) -> TestDb {
    let db = TestDb::new(b).await;
    db.account(A1).credits(100).create().await;
    db.account(A2).credits(200).create().await;
    db.account(SUSPENDED).credits(50).suspended().create().await;
    db.user(11).account(A1).role("owner").create().await;
    db.user(12).account(A1).role("admin").create().await;
    db.user(13).account(A1).role("editor").create().await;
    db.user(14).account(A1).role("viewer").create().await;
    db.user(15).account(A2).role("developer").create().await;
    db.user(16).role("owner").create().await; // in no account
    db.user(17)
        .account(A1)
        .role("owner")
        .inactive()
        .create()
        .await;
    db.user(18).account(SUSPENDED).role("owner").create().await;
    db.user(19).account(A1).role("superuser").create().await;
    db.user(20).account(A1).role(" Editor ").create().await;
    db
}

fn rule(method: &str) -> auth_interceptor::RpcRule {
    *Policy::default()
        .rule(&format!("/igny8.billing.v1.BillingService/{method}"))
        .expect("known method")
}

fn user(user_id: i64, hint: Option<i64>) -> VerifiedToken {
    VerifiedToken {
        principal: Principal::User {
            user_id,
            account_hint: hint,
        },
    }
}

fn service(name: &str) -> VerifiedToken {
    VerifiedToken {
        principal: Principal::Service { name: name.into() },
    }
}

/// The resolution rule (docs/api.md, "Which account a call acts on"), one row per case, against the real
/// directory tables.
async fn resolution_rules(b: Backend) {
    let db = directory(b).await;
    let dir: Arc<dyn Directory> = Arc::new(SqlDirectory::new(db.db.clone()));
    let metrics = AuthMetrics::default();
    let resolver = Resolver::new(dir, metrics.clone());
    type Want = Result<(Option<i64>, Role), AuthError>;
    let cases: Vec<(&str, VerifiedToken, Option<i64>, &str, Want)> = vec![
        (
            "token account matches",
            user(11, Some(A1)),
            None,
            "Deduct",
            Ok((Some(A1), Role::Owner)),
        ),
        (
            "stale token after a move: current account wins",
            user(13, Some(A2)),
            None,
            "Deduct",
            Ok((Some(A1), Role::Editor)),
        ),
        (
            "no account in token: the user's current one",
            user(14, None),
            None,
            "GetBalance",
            Ok((Some(A1), Role::Viewer)),
        ),
        (
            "developer acting for another account",
            user(15, Some(A2)),
            Some(A1),
            "Grant",
            Ok((Some(A1), Role::Developer)),
        ),
        (
            "user removed from every account, token names one",
            user(16, Some(A1)),
            None,
            "GetBalance",
            Err(AuthError::NoAccount(16)),
        ),
        (
            "unknown user",
            user(999, Some(A1)),
            None,
            "GetBalance",
            Err(AuthError::UserInactive(999)),
        ),
        (
            "deactivated user",
            user(17, Some(A1)),
            None,
            "GetBalance",
            Err(AuthError::UserInactive(17)),
        ),
        (
            "suspended account may read",
            user(18, None),
            None,
            "GetBalance",
            Ok((Some(SUSPENDED), Role::Owner)),
        ),
        (
            "suspended account may not mutate",
            user(18, None),
            None,
            "Deduct",
            Err(AuthError::AccountSuspended {
                account: SUSPENDED,
                method: "Deduct",
            }),
        ),
        (
            "act-as by an owner",
            user(11, None),
            Some(A2),
            "GetBalance",
            Err(AuthError::ActAsForbidden),
        ),
        (
            "act-as by a viewer",
            user(14, None),
            Some(A2),
            "GetBalance",
            Err(AuthError::ActAsForbidden),
        ),
        (
            "act-as into a missing account",
            user(15, None),
            Some(404),
            "GetBalance",
            Err(AuthError::AccountNotFound(404)),
        ),
        (
            "act-as into a suspended account, mutating",
            user(15, None),
            Some(SUSPENDED),
            "Deduct",
            Err(AuthError::AccountSuspended {
                account: SUSPENDED,
                method: "Deduct",
            }),
        ),
        (
            "service with act-as",
            service("writer-worker"),
            Some(A2),
            "Deduct",
            Ok((Some(A2), Role::Service)),
        ),
        (
            "service without act-as on an account method",
            service("writer-worker"),
            None,
            "Deduct",
            Err(AuthError::ActAsRequired { method: "Deduct" }),
        ),
        (
            "service without act-as on the cost table",
            service("writer-worker"),
            None,
            "GetCreditCost",
            Ok((None, Role::Service)),
        ),
        (
            "service act-as into a missing account",
            service("writer-worker"),
            Some(404),
            "GetBalance",
            Err(AuthError::AccountNotFound(404)),
        ),
        (
            "viewer may not deduct",
            user(14, None),
            None,
            "Deduct",
            Err(AuthError::RoleNotAllowed {
                role: "viewer",
                method: "Deduct",
            }),
        ),
        (
            "owner may not grant",
            user(11, None),
            None,
            "Grant",
            Err(AuthError::RoleNotAllowed {
                role: "owner",
                method: "Grant",
            }),
        ),
        (
            "developer may not grant to their own account",
            user(15, None),
            None,
            "Grant",
            Err(AuthError::OwnAccount { method: "Grant" }),
        ),
    ];
    for (name, token, act_as, method, want) in cases {
        let got = resolver
            .resolve(&token, act_as, &rule(method))
            .await
            .map(|ctx| (ctx.account_id, ctx.role));
        assert_eq!(got, want, "{name}");
    }
    // The stale token, and the removed user whose token still names A1.
    assert_eq!(metrics.account_mismatches(), 2);

    let ctx: AuthContext = resolver
        .resolve(&user(15, None), Some(A1), &rule("GetBalance"))
        .await
        .unwrap();
    assert!(ctx.acting_as);
    assert_eq!(ctx.caller, Caller::User { id: 15 });
    assert_eq!(ctx.actor(), "user:15");
}

async fn balance_of(
    server: &Running,
    token: &str,
    act_as: Option<i64>,
) -> Result<(i64, String), tonic::Status> {
    let mut c = server.billing(token, act_as).await;
    let r = c.get_balance(GetBalanceRequest {}).await?;
    let header = r
        .metadata()
        .get("x-igny8-account-id")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    Ok((r.into_inner().account_id, header))
}

async fn stale_token_uses_current_account(b: Backend) {
    let db = directory(b).await;
    let server = spawn_billing(&db).await;
    let token = access_token(13, Some(A1));
    assert_eq!(
        balance_of(&server, &token, None).await.unwrap(),
        (A1, A1.to_string())
    );
    db.move_user(13, Some(A2)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Same token, no re-login: the move is honoured within 1 s.
    assert_eq!(
        balance_of(&server, &token, None).await.unwrap(),
        (A2, A2.to_string())
    );
}

async fn removed_user_is_denied_even_with_a_token_naming_the_account(b: Backend) {
    let db = directory(b).await;
    let server = spawn_billing(&db).await;
    let token = access_token(13, Some(A1));
    balance_of(&server, &token, None).await.unwrap();
    db.move_user(13, None).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let err = balance_of(&server, &token, None).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.get_details_error_info().unwrap().reason, "NO_ACCOUNT");
}

async fn deactivation_and_role_changes_apply_within_a_second(b: Backend) {
    let db = directory(b).await;
    let server = spawn_billing(&db).await;
    let token = access_token(13, None);
    let mut c = server.billing(&token, None).await;
    let deduct = |key: &str| deduct_credits(1, key);
    c.deduct(deduct("a")).await.unwrap();
    db.set_user_role(13, "viewer").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        c.deduct(deduct("b")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    c.get_balance(GetBalanceRequest {}).await.unwrap();
    db.set_user_active(13, false).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        c.get_balance(GetBalanceRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    db.set_user_active(13, true).await;
    db.set_account_status(A1, "suspended").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    c.get_balance(GetBalanceRequest {}).await.unwrap();
    db.set_user_role(13, "editor").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let err = c.deduct(deduct("c")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "ACCOUNT_SUSPENDED"
    );
    assert_eq!(db.balance(A1).await, 99);
}

async fn spoofed_identity_metadata_is_replaced(b: Backend) {
    let db = directory(b).await;
    let server = spawn_billing(&db).await;
    let mut c = server.billing(&access_token(14, Some(A1)), None).await;
    let mut req = Request::new(GetBalanceRequest {});
    req.metadata_mut()
        .insert("x-igny8-account-id", MetadataValue::from(A2));
    req.metadata_mut()
        .insert("x-igny8-role", MetadataValue::from_static("developer"));
    req.metadata_mut()
        .insert("x-igny8-user-id", MetadataValue::from(15));
    let r = c.get_balance(req).await.unwrap();
    assert_eq!(r.metadata().get("x-igny8-account-id").unwrap(), "1");
    assert_eq!(
        r.into_inner(),
        igny8_proto::billing::v1::GetBalanceResponse {
            account_id: A1,
            balance: 100,
            held: 0,
            available: 100,
        }
    );
    // The spoofed role did not make the viewer a developer either.
    let mut req = Request::new(deduct_credits(1, "k"));
    req.metadata_mut()
        .insert("x-igny8-role", MetadataValue::from_static("owner"));
    assert_eq!(
        c.deduct(req).await.unwrap_err().code(),
        Code::PermissionDenied
    );
}

async fn act_as_is_for_developers_and_services_only(b: Backend) {
    let db = directory(b).await;
    let server = spawn_billing(&db).await;
    assert_eq!(
        balance_of(&server, &access_token(15, None), Some(A1))
            .await
            .unwrap(),
        (A1, "1".into())
    );
    assert_eq!(
        balance_of(&server, &service_token("scheduler"), Some(A2))
            .await
            .unwrap(),
        (A2, "2".into())
    );
    for u in [11, 12, 13, 14] {
        let err = balance_of(&server, &access_token(u, None), Some(A2))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "user {u}");
        assert_eq!(
            err.get_details_error_info().unwrap().reason,
            "ACT_AS_FORBIDDEN"
        );
    }
    let err = balance_of(&server, &access_token(15, None), Some(404))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = balance_of(&server, &service_token("scheduler"), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "ACT_AS_REQUIRED"
    );
    let mut svc = server.billing(&service_token("scheduler"), None).await;
    let cost = svc
        .get_credit_cost(GetCreditCostRequest {
            operation: "clustering".into(),
            quantity: 1,
        })
        .await
        .unwrap();
    assert!(cost.metadata().get("x-igny8-account-id").is_none());
    let mut bad = Request::new(GetBalanceRequest {});
    bad.metadata_mut()
        .insert("x-igny8-act-as-account", MetadataValue::from_static("one"));
    let mut dev = server.billing(&access_token(15, None), None).await;
    assert_eq!(
        dev.get_balance(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

async fn bad_tokens_are_unauthenticated(b: Backend) {
    let db = directory(b).await;
    let server = spawn_billing(&db).await;
    let header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
    let none_body =
        base64_url(&json!({"type": "access", "user_id": 11, "exp": unix_now() + 60}).to_string());
    let wrong_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"type": "access", "user_id": 11, "exp": unix_now() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret-not-the-secret-xx"),
    )
    .unwrap();
    let tokens = [
        ("alg none", format!("{header}.{none_body}.")),
        ("wrong key", wrong_key),
        (
            "expired",
            sign(&json!({"type": "access", "user_id": 11, "exp": unix_now() - 3600})),
        ),
        (
            "refresh",
            sign(&json!({"type": "refresh", "user_id": 11, "exp": unix_now() + 60})),
        ),
        (
            "typeless",
            sign(&json!({"user_id": 11, "exp": unix_now() + 60})),
        ),
        ("garbage", "not.a.jwt".to_owned()),
        ("oversized", "a".repeat(9000)),
        ("unknown user", access_token(4242, Some(A1))),
        ("deactivated user", access_token(17, Some(A1))),
    ];
    for (name, token) in tokens {
        let err = balance_of(&server, &token, None).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err:?}");
        assert!(
            !err.message().contains(&token),
            "{name}: the token must not be echoed"
        );
    }
    let mut anonymous = igny8_proto::billing::v1::billing_service_client::BillingServiceClient::new(
        server.channel().await,
    );
    let err = anonymous
        .get_credit_cost(GetCreditCostRequest {
            operation: "clustering".into(),
            quantity: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut req = Request::new(GetBalanceRequest {});
    req.metadata_mut().insert(
        "authorization",
        MetadataValue::from_static("Basic dXNlcjpwYXNz"),
    );
    assert_eq!(
        anonymous.get_balance(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // Health needs no token.
    assert_eq!(
        server.health("").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

fn base64_url(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The role matrix of docs/api.md, every role against every RPC of both services.
async fn permission_matrix(b: Backend) {
    let db = directory(b).await;
    let billing = spawn_billing(&db).await;
    let settings = spawn_settings(&db).await;
    // (principal, token, act-as)
    let principals = [
        ("viewer", access_token(14, None), None),
        ("editor", access_token(13, None), None),
        ("admin", access_token(12, None), None),
        ("owner", access_token(11, None), None),
        ("developer", access_token(15, None), Some(A1)),
        ("service", service_token("writer-worker"), Some(A1)),
    ];
    // (rpc, roles allowed)
    let everyone = ["viewer", "editor", "admin", "owner", "developer", "service"];
    let matrix: [(&str, &[&str]); 10] = [
        ("GetCreditCost", &everyone),
        ("ListCreditCosts", &everyone),
        ("Check", &everyone),
        ("GetBalance", &everyone),
        ("ListTransactions", &everyone),
        (
            "Deduct",
            &["editor", "admin", "owner", "developer", "service"],
        ),
        ("Grant", &["developer", "service"]),
        ("GetModuleSettings", &everyone),
        ("CheckModule", &everyone),
        (
            "UpdateModuleSettings",
            &["admin", "owner", "developer", "service"],
        ),
    ];
    for (who, token, act_as) in &principals {
        let mut bc = billing.billing(token, *act_as).await;
        let mut sc = settings.settings(token, *act_as).await;
        for (i, (rpc, allowed)) in matrix.iter().enumerate() {
            let key = format!("{who}-{i}");
            let result = match *rpc {
                "GetCreditCost" => bc
                    .get_credit_cost(GetCreditCostRequest {
                        operation: "linking".into(),
                        quantity: 1,
                    })
                    .await
                    .map(|_| ()),
                "ListCreditCosts" => bc
                    .list_credit_costs(igny8_proto::billing::v1::ListCreditCostsRequest {})
                    .await
                    .map(|_| ()),
                "Check" => bc
                    .check(igny8_proto::billing::v1::CheckRequest {
                        cost: Some(igny8_proto::billing::v1::check_request::Cost::Credits(1)),
                    })
                    .await
                    .map(|_| ()),
                "GetBalance" => bc.get_balance(GetBalanceRequest {}).await.map(|_| ()),
                "ListTransactions" => bc
                    .list_transactions(igny8_proto::billing::v1::ListTransactionsRequest::default())
                    .await
                    .map(|_| ()),
                "Deduct" => bc.deduct(deduct_credits(1, &key)).await.map(|_| ()),
                "Grant" => bc
                    .grant(GrantRequest {
                        credits: 1,
                        idempotency_key: key,
                        reason: "matrix".into(),
                    })
                    .await
                    .map(|_| ()),
                "GetModuleSettings" => sc
                    .get_module_settings(GetModuleSettingsRequest {})
                    .await
                    .map(|_| ()),
                "CheckModule" => sc
                    .check_module(CheckModuleRequest {
                        module: Module::Writer as i32,
                    })
                    .await
                    .map(|_| ()),
                "UpdateModuleSettings" => sc
                    .update_module_settings(UpdateModuleSettingsRequest {
                        settings: Some(igny8_proto::settings::v1::ModuleSettings {
                            writer_enabled: true,
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["writer_enabled".into()],
                        }),
                    })
                    .await
                    .map(|_| ()),
                other => unreachable!("{other}"),
            };
            if allowed.contains(who) {
                result.unwrap_or_else(|e| panic!("{who} should be allowed {rpc}: {e:?}"));
            } else {
                let err = result.expect_err(&format!("{who} must be denied {rpc}"));
                assert_eq!(err.code(), Code::PermissionDenied, "{who} {rpc}");
            }
        }
    }
    // Deducts by editor/admin/owner/developer/service and grants by developer/service.
    assert_eq!(db.balance(A1).await, 100 - 5 + 2);
}

/// The directory's one-read lookup of a user and their account answers
/// exactly what the two separate reads answer: a member, a member of a
/// suspended account, a user in no account, an unknown user. So do the
/// reads of many at once.
async fn user_with_account_is_the_two_reads_in_one(b: Backend) {
    let db = directory(b).await;
    let dir = SqlDirectory::new(db.db.clone());
    for id in [11, 16, 17, 18, 999] {
        let (user, account) = dir.user_with_account(id).await.unwrap();
        let want_user = dir.user(id).await.unwrap();
        let want_account = match want_user.as_ref().and_then(|u| u.account_id) {
            Some(a) => dir.account(a).await.unwrap(),
            None => None,
        };
        assert_eq!((&user, &account), (&want_user, &want_account), "user {id}");
    }
    let (_, account) = dir.user_with_account(18).await.unwrap();
    assert_eq!(
        account.map(|a| a.status),
        Some(auth_interceptor::AccountStatus::Suspended)
    );
    assert_eq!(dir.user_with_account(999).await.unwrap(), (None, None));
    let (user, account) = dir.user_with_account(16).await.unwrap();
    assert_eq!((user.map(|u| u.account_id), account), (Some(None), None));

    // The batch reads (background renewals) answer what the single reads
    // answer, in the order asked, unknown ids included.
    let ids = [18, 999, 11, 16, 17, 20];
    let batch = dir.users_with_accounts(&ids).await.unwrap();
    let mut single = Vec::new();
    for id in ids {
        let (user, account) = dir.user_with_account(id).await.unwrap();
        single.push((id, user, account));
    }
    assert_eq!(batch, single);
    let ids = [SUSPENDED, 999, A1, A2];
    let batch = dir.accounts(&ids).await.unwrap();
    let mut single = Vec::new();
    for id in ids {
        single.push((id, dir.account(id).await.unwrap()));
    }
    assert_eq!(batch, single);
    assert_eq!(batch[1], (999, None));
    assert!(dir.users_with_accounts(&[]).await.unwrap().is_empty());
}

on_both_backends!(
    user_with_account_is_the_two_reads_in_one,
    resolution_rules,
    stale_token_uses_current_account,
    removed_user_is_denied_even_with_a_token_naming_the_account,
    deactivation_and_role_changes_apply_within_a_second,
    spoofed_identity_metadata_is_replaced,
    act_as_is_for_developers_and_services_only,
    bad_tokens_are_unauthenticated,
    permission_matrix,
);

/// Tokens never appear in logs, even at debug level and on failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_logs() {
    let db = directory(Backend::Sqlite).await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let server = Process::start_logging(
        "billing-svc",
        igny8_proto::BILLING_SERVICE_NAME,
        &db.url,
        &[("RUST_LOG", "debug"), ("IGNY8_LOG_FORMAT", "json")],
        log.reopen().unwrap().into(),
    )
    .await;
    let running_addr = format!("http://{}", server.addr);
    let channel = tonic::transport::Channel::from_shared(running_addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let good = access_token(13, Some(A2)); // a stale hint: logged as a mismatch
    let expired = sign(&json!({"type": "access", "user_id": 13, "exp": unix_now() - 3600}));
    let foreign = access_token(999, None);
    for token in [&good, &expired, &foreign] {
        let mut c = igny8_proto::billing::v1::billing_service_client::BillingServiceClient::with_interceptor(
            channel.clone(),
            auth_interceptor::BearerInterceptor::new(token.as_str()).unwrap(),
        );
        let _ = c.get_balance(GetBalanceRequest {}).await;
        let _ = c.deduct(deduct_credits(1, "k")).await;
    }
    drop(server);
    let logs = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        logs.contains("stale token"),
        "the mismatch is logged: {logs}"
    );
    for token in [&good, &expired, &foreign] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!logs.contains(signature), "a token reached the logs");
    }
}
