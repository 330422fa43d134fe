//! BillingService end to end: real server, real database, real client.

use std::collections::HashMap;

use igny8_proto::billing::v1::{
    CheckRequest, DeductRequest, GetBalanceRequest, GetCreditCostRequest, GrantRequest,
    ListCreditCostsRequest, ListTransactionsRequest, TransactionKind, Usage, check_request,
};
use igny8_tests::*;
use tonic::Code;
use tonic_types::StatusExt;

const ACCOUNT: i64 = 1;
const EDITOR: i64 = 10;
const DEV: i64 = 90;

/// An account with `credits`, an editor in it, a developer elsewhere.
async fn setup(backend: Backend, credits: i64) -> (TestDb, Running) {
    let db = TestDb::new(backend).await;
    db.account(ACCOUNT).credits(credits).create().await;
    db.account(99).create().await;
    db.user(EDITOR)
        .account(ACCOUNT)
        .role("editor")
        .create()
        .await;
    db.user(DEV).account(99).role("developer").create().await;
    let server = spawn_billing(&db).await;
    (db, server)
}

async fn assert_ledger_matches(db: &TestDb, account: i64, started_at: i64) {
    let balance = db.balance(account).await;
    let (sum, _) = db.ledger_sum(account).await;
    assert_eq!(
        balance,
        started_at + sum,
        "balance must equal the start plus the ledger"
    );
    assert!(balance >= 0);
}

async fn cost_table_rows_and_rules(b: Backend) {
    let (_db, server) = setup(b, 0).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let cases: &[(&str, u64, i64, &str, u64)] = &[
        ("clustering", 0, 10, "clustering", 1),
        ("clustering", 2, 20, "clustering", 2),
        ("ideas", 1, 15, "idea_generation", 1),
        ("idea_generation", 3, 45, "idea_generation", 3),
        ("content", 50, 1, "content_generation", 50),
        ("content_generation", 250, 2, "content_generation", 250),
        ("content_generation", 0, 1, "content_generation", 100),
        ("reparse", 1, 2, "image_prompt_extraction", 1),
        ("images", 4, 20, "image_generation", 4),
        ("linking", 1, 8, "linking", 1),
        ("optimization", 1000, 5, "optimization", 1000),
        (
            "site_structure_generation",
            0,
            50,
            "site_structure_generation",
            1,
        ),
        ("site_page_generation", 3, 60, "site_page_generation", 3),
    ];
    for (op, q, credits, canonical, quantity) in cases {
        let r = c
            .get_credit_cost(GetCreditCostRequest {
                operation: (*op).into(),
                quantity: *q,
            })
            .await
            .unwrap_or_else(|s| panic!("{op}: {s:?}"))
            .into_inner();
        assert_eq!(
            (r.operation.as_str(), r.credits, r.quantity),
            (*canonical, *credits, *quantity),
            "{op} × {q}"
        );
    }
    let r = c
        .get_credit_cost(GetCreditCostRequest {
            operation: "content".into(),
            quantity: 250,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.unit.as_str(), r.base_credits), ("word", 1));

    let err = c
        .get_credit_cost(GetCreditCostRequest {
            operation: "keyword_magic".into(),
            quantity: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("clustering") && err.message().contains("site_page_generation"),
        "{}",
        err.message()
    );
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "operation"
    );

    let err = c
        .get_credit_cost(GetCreditCostRequest {
            operation: "clustering".into(),
            quantity: 1_000_000_001,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .get_credit_cost(GetCreditCostRequest {
            operation: String::new(),
            quantity: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let list = c
        .list_credit_costs(ListCreditCostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .costs;
    assert_eq!(list.len(), 9);
    let content = list
        .iter()
        .find(|c| c.operation == "content_generation")
        .unwrap();
    assert_eq!(
        (
            content.aliases.clone(),
            content.credits,
            content.unit_size,
            content.module.as_str()
        ),
        (vec!["content".to_owned()], 1, 100, "writer")
    );
    let site = list
        .iter()
        .find(|c| c.operation == "site_page_generation")
        .unwrap();
    assert_eq!(site.module, "site_builder");
}

async fn deduct_and_balance(b: Backend) {
    let (db, server) = setup(b, 100).await;
    let mut c = server
        .billing(&access_token(EDITOR, Some(ACCOUNT)), None)
        .await;
    let mut req = deduct_usage("content", 250, "job-1");
    req.description = "article 7".into();
    req.metadata = HashMap::from([("job".to_owned(), "7".to_owned())]);
    let r = c.deduct(req).await.unwrap().into_inner();
    assert!(!r.replayed);
    assert_eq!(r.balance, 98);
    let t = r.transaction.unwrap();
    assert_eq!(t.kind, TransactionKind::Deduct as i32);
    assert_eq!(
        (t.credits, t.balance_after, t.account_id),
        (-2, 98, ACCOUNT)
    );
    assert_eq!(
        (t.operation.as_str(), t.quantity),
        ("content_generation", 250)
    );
    assert_eq!(t.actor, format!("user:{EDITOR}"));
    assert_eq!(t.metadata["job"], "7");
    assert_eq!(t.description, "article 7");
    assert!(t.create_time.unwrap().seconds > 1_700_000_000);

    let bal = c
        .get_balance(GetBalanceRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((bal.account_id, bal.balance), (ACCOUNT, 98));
    let r = c
        .deduct(deduct_credits(8, "job-2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.balance, 90);
    assert_eq!(r.transaction.unwrap().operation, "");
    assert_ledger_matches(&db, ACCOUNT, 100).await;
}

async fn insufficient_credits_change_nothing(b: Backend) {
    let (db, server) = setup(b, 3).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let err = c.deduct(deduct_usage("ideas", 1, "k1")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "Insufficient credits. Required: 15, Available: 3"
    );
    let info = err.get_details_error_info().unwrap();
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("INSUFFICIENT_CREDITS", "billing.igny8")
    );
    assert_eq!(
        (
            info.metadata["required"].as_str(),
            info.metadata["available"].as_str()
        ),
        ("15", "3")
    );
    assert_eq!(db.balance(ACCOUNT).await, 3);
    assert_eq!(db.ledger_sum(ACCOUNT).await, (0, 0));
    // The key was not consumed by the failure: it works once credits exist.
    let r = c
        .deduct(deduct_credits(3, "k1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.balance, 0);
}

async fn check_is_advisory(b: Backend) {
    let (db, server) = setup(b, 12).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let r = c
        .check(CheckRequest {
            cost: Some(check_request::Cost::Usage(Usage {
                operation: "clustering".into(),
                quantity: 1,
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.sufficient, r.required_credits, r.available_credits),
        (true, 10, 12)
    );
    let r = c
        .check(CheckRequest {
            cost: Some(check_request::Cost::Credits(13)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.sufficient, r.required_credits, r.available_credits),
        (false, 13, 12)
    );
    for bad in [
        None,
        Some(check_request::Cost::Credits(0)),
        Some(check_request::Cost::Credits(-5)),
    ] {
        let err = c.check(CheckRequest { cost: bad }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.get_details_bad_request().is_some());
    }
    assert_eq!(db.balance(ACCOUNT).await, 12);
}

async fn invalid_deducts_change_nothing(b: Backend) {
    let (db, server) = setup(b, 100).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let mut many = deduct_credits(1, "m");
    many.metadata = (0..17).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let mut long_desc = deduct_credits(1, "d");
    long_desc.description = "x".repeat(513);
    let cases = [
        (deduct_credits(1, ""), "idempotency_key"),
        (deduct_credits(1, &"k".repeat(129)), "idempotency_key"),
        (deduct_credits(1, "bad\u{7}key"), "idempotency_key"),
        (deduct_credits(0, "z"), "credits"),
        (deduct_credits(-4, "n"), "credits"),
        (deduct_usage("nope", 1, "u"), "usage.operation"),
        (
            deduct_usage("clustering", 1_000_000_001, "q"),
            "usage.quantity",
        ),
        (
            DeductRequest {
                idempotency_key: "c".into(),
                ..Default::default()
            },
            "cost",
        ),
        (many, "metadata"),
        (long_desc, "description"),
    ];
    for (req, field) in cases {
        let err = c.deduct(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(
            err.get_details_bad_request().unwrap().field_violations[0].field,
            field
        );
    }
    assert_eq!(db.balance(ACCOUNT).await, 100);
    assert_eq!(db.ledger_sum(ACCOUNT).await, (0, 0));
}

async fn replay_and_key_reuse(b: Backend) {
    let (db, server) = setup(b, 100).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let first = c
        .deduct(deduct_usage("clustering", 1, "job-9"))
        .await
        .unwrap()
        .into_inner();
    // An alias with the same meaning is the same request.
    let again = c
        .deduct(deduct_usage("CLUSTERING", 1, "job-9"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(
        again.transaction.as_ref().unwrap().id,
        first.transaction.as_ref().unwrap().id
    );
    assert_eq!(again.balance, 90);
    assert_eq!(db.balance(ACCOUNT).await, 90);

    let err = c
        .deduct(deduct_usage("clustering", 2, "job-9"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "IDEMPOTENCY_KEY_REUSED"
    );
    // Reuse for a request that could not even be paid is still a reuse.
    let err = c.deduct(deduct_credits(1_000, "job-9")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(db.balance(ACCOUNT).await, 90);
    assert_eq!(db.ledger_sum(ACCOUNT).await, (-10, 1));

    // A replay still replays after the balance ran out.
    c.deduct(deduct_credits(90, "drain")).await.unwrap();
    let again = c
        .deduct(deduct_usage("clustering", 1, "job-9"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.balance, 90, "a replay returns the original result");

    // Keys are per account: another account may use the same key.
    db.account(2).credits(50).create().await;
    db.user(20).account(2).role("owner").create().await;
    let mut other = server.billing(&access_token(20, None), None).await;
    let r = other
        .deduct(deduct_usage("clustering", 1, "job-9"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.replayed);
    assert_eq!(r.balance, 40);
}

async fn concurrent_deducts_never_overdraw(b: Backend) {
    let (db, server) = setup(b, 50).await;
    let token = access_token(EDITOR, None);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = server.billing(&token, None).await;
        tasks.push(tokio::spawn(async move {
            c.deduct(deduct_credits(1, &format!("k{i}"))).await
        }));
    }
    let (mut ok, mut insufficient) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::FailedPrecondition => insufficient += 1,
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert_eq!((ok, insufficient), (50, 150));
    assert_eq!(db.balance(ACCOUNT).await, 0);
    assert_eq!(db.ledger_sum(ACCOUNT).await, (-50, 50));
}

async fn concurrent_same_key_deducts_once(b: Backend) {
    let (db, server) = setup(b, 100).await;
    let token = access_token(EDITOR, None);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut c = server.billing(&token, None).await;
        tasks.push(tokio::spawn(async move {
            c.deduct(deduct_usage("linking", 1, "same")).await
        }));
    }
    let mut ids = Vec::new();
    let mut fresh = 0;
    for t in tasks {
        let r = t
            .await
            .unwrap()
            .expect("every caller gets the transaction")
            .into_inner();
        fresh += usize::from(!r.replayed);
        ids.push(r.transaction.unwrap().id);
        assert_eq!(r.balance, 92);
    }
    assert_eq!(fresh, 1);
    ids.dedup();
    assert_eq!(ids.len(), 1);
    assert_eq!(db.balance(ACCOUNT).await, 92);
    assert_eq!(db.ledger_sum(ACCOUNT).await, (-8, 1));
}

async fn transactions_page_newest_first(b: Backend) {
    let (_db, server) = setup(b, 1000).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    for i in 0..7 {
        c.deduct(deduct_credits(i + 1, &format!("t{i}")))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_transactions(ListTransactionsRequest {
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.transactions.len() <= 3);
        seen.extend(page.transactions.iter().map(|t| t.credits));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, vec![-7, -6, -5, -4, -3, -2, -1]);

    let all = c
        .list_transactions(ListTransactionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.transactions.len(), 7);
    assert!(all.next_page_token.is_empty());
    let capped = c
        .list_transactions(ListTransactionsRequest {
            page_size: 5000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capped.transactions.len(), 7);

    let first = c
        .list_transactions(ListTransactionsRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut tampered = first.next_page_token.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    for bad in [String::from_utf8(tampered).unwrap(), "garbage".into()] {
        let err = c
            .list_transactions(ListTransactionsRequest {
                page_size: 2,
                page_token: bad,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    let err = c
        .list_transactions(ListTransactionsRequest {
            page_size: -1,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn page_tokens_are_bound_to_their_account(b: Backend) {
    let (db, server) = setup(b, 100).await;
    db.account(2).credits(100).create().await;
    db.user(20).account(2).role("owner").create().await;
    let mut one = server.billing(&access_token(EDITOR, None), None).await;
    let mut two = server.billing(&access_token(20, None), None).await;
    for i in 0..3 {
        one.deduct(deduct_credits(1, &format!("a{i}")))
            .await
            .unwrap();
        two.deduct(deduct_credits(1, &format!("b{i}")))
            .await
            .unwrap();
    }
    let page = one
        .list_transactions(ListTransactionsRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.transactions.iter().all(|t| t.account_id == ACCOUNT));
    let err = two
        .list_transactions(ListTransactionsRequest {
            page_size: 1,
            page_token: page.next_page_token,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let theirs = two
        .list_transactions(ListTransactionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.transactions.iter().all(|t| t.account_id == 2));
    assert_eq!(theirs.transactions.len(), 3);
}

async fn grants_by_staff_only(b: Backend) {
    let (db, server) = setup(b, 0).await;
    let grant = |key: &str| GrantRequest {
        credits: 25,
        idempotency_key: key.into(),
        reason: "support ticket 12".into(),
    };

    let mut dev = server
        .billing(&access_token(DEV, None), Some(ACCOUNT))
        .await;
    let r = dev.grant(grant("g1")).await.unwrap().into_inner();
    assert_eq!(r.balance, 25);
    let t = r.transaction.unwrap();
    assert_eq!(
        (t.kind, t.credits, t.description.as_str()),
        (TransactionKind::Grant as i32, 25, "support ticket 12")
    );
    assert_eq!(t.actor, format!("user:{DEV}"));
    assert!(dev.grant(grant("g1")).await.unwrap().into_inner().replayed);

    let mut svc = server
        .billing(&service_token("billing-admin"), Some(ACCOUNT))
        .await;
    let r = svc.grant(grant("g2")).await.unwrap().into_inner();
    assert_eq!(r.balance, 50);
    assert_eq!(r.transaction.unwrap().actor, "service:billing-admin");

    for role in ["owner", "admin", "editor", "viewer"] {
        db.set_user_role(EDITOR, role).await;
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        let mut c = server.billing(&access_token(EDITOR, None), None).await;
        let err = c.grant(grant(&format!("self-{role}"))).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{role}");
    }
    // Not even a developer may raise the balance of their own account.
    let mut own = server.billing(&access_token(DEV, None), None).await;
    assert_eq!(
        own.grant(grant("own")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let mut own_as = server.billing(&access_token(DEV, None), Some(99)).await;
    assert_eq!(
        own_as.grant(grant("own2")).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    for bad in [
        GrantRequest {
            credits: 0,
            ..grant("b1")
        },
        GrantRequest {
            credits: -1,
            ..grant("b2")
        },
        GrantRequest {
            reason: "r".repeat(513),
            ..grant("b3")
        },
        GrantRequest {
            idempotency_key: String::new(),
            ..grant("b4")
        },
    ] {
        assert_eq!(
            dev.grant(bad).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
    // A reason is optional.
    let r = dev
        .grant(GrantRequest {
            reason: String::new(),
            ..grant("no-reason")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.balance, 75);
    assert_eq!(db.balance(ACCOUNT).await, 75);
    assert_ledger_matches(&db, ACCOUNT, 0).await;
}

on_both_backends!(
    cost_table_rows_and_rules,
    deduct_and_balance,
    insufficient_credits_change_nothing,
    check_is_advisory,
    invalid_deducts_change_nothing,
    replay_and_key_reuse,
    concurrent_deducts_never_overdraw,
    concurrent_same_key_deducts_once,
    transactions_page_newest_first,
    page_tokens_are_bound_to_their_account,
    grants_by_staff_only,
);
