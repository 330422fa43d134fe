//! Holds and refunds (docs/api.md "Holds and refunds") end to end: real
//! server, real database, the generated tonic client, both backends.

use std::{collections::HashMap, time::Duration};

use igny8_proto::billing::v1::{
    CaptureHoldRequest, CheckRequest, GetBalanceRequest, GetHoldRequest, GrantRequest, Hold,
    HoldState, ListTransactionsRequest, RefundRequest, ReleaseHoldRequest, ReserveRequest,
    TransactionKind, Usage, capture_hold_request, check_request, reserve_request,
};
use igny8_tests::*;
use tonic::{Code, Status};
use tonic_types::StatusExt;

const ACCOUNT: i64 = 1;
const OTHER: i64 = 2;
const STAFF_HOME: i64 = 99;
const EDITOR: i64 = 10;
const VIEWER: i64 = 11;
const OWNER: i64 = 12;
const OTHER_EDITOR: i64 = 20;
const DEV: i64 = 90;
const DEV_IN_ACCOUNT: i64 = 91;

async fn setup(backend: Backend, credits: i64) -> (TestDb, Running) {
    let db = TestDb::new(backend).await;
    db.account(ACCOUNT).credits(credits).create().await;
    db.account(OTHER).credits(100).create().await;
    db.account(STAFF_HOME).create().await;
    for (user, account, role) in [
        (EDITOR, ACCOUNT, "editor"),
        (VIEWER, ACCOUNT, "viewer"),
        (OWNER, ACCOUNT, "owner"),
        (OTHER_EDITOR, OTHER, "editor"),
        (DEV, STAFF_HOME, "developer"),
        (DEV_IN_ACCOUNT, ACCOUNT, "developer"),
    ] {
        db.user(user).account(account).role(role).create().await;
    }
    let server = spawn_billing(&db).await;
    (db, server)
}

fn reserve(credits: i64, key: &str) -> ReserveRequest {
    ReserveRequest {
        cost: Some(reserve_request::Cost::Credits(credits)),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

fn reserve_ttl(credits: i64, key: &str, ttl: Duration) -> ReserveRequest {
    ReserveRequest {
        ttl: Some(prost_types::Duration {
            seconds: ttl.as_secs() as i64,
            nanos: ttl.subsec_nanos() as i32,
        }),
        ..reserve(credits, key)
    }
}

fn capture(hold_id: &str, credits: Option<i64>) -> CaptureHoldRequest {
    CaptureHoldRequest {
        hold_id: hold_id.into(),
        amount: credits.map(capture_hold_request::Amount::Credits),
    }
}

fn release(hold_id: &str) -> ReleaseHoldRequest {
    ReleaseHoldRequest {
        hold_id: hold_id.into(),
    }
}

fn refund(transaction_id: i64, credits: i64, key: &str) -> RefundRequest {
    RefundRequest {
        transaction_id,
        credits,
        idempotency_key: key.into(),
        reason: "support ticket 42".into(),
    }
}

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

fn info(status: &Status) -> HashMap<String, String> {
    status
        .get_details_error_info()
        .map(|i| i.metadata)
        .unwrap_or_default()
}

fn state(hold: &Hold) -> HoldState {
    HoldState::try_from(hold.state).unwrap()
}

/// (balance, held, available) as GetBalance reports it.
async fn balance_of(server: &Running, user: i64) -> (i64, i64, i64) {
    let mut c = server.billing(&access_token(user, None), None).await;
    let b = c
        .get_balance(GetBalanceRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.available, b.balance - b.held);
    (b.balance, b.held, b.available)
}

/// `balance == start + sum(ledger)` and `held == sum(active, unexpired holds)`.
async fn assert_books_balance(db: &TestDb, server: &Running, user: i64, account: i64, start: i64) {
    let stored = db.balance(account).await;
    let (sum, _) = db.ledger_sum(account).await;
    assert_eq!(stored, start + sum, "balance = start + sum(ledger)");
    let (balance, held, _) = balance_of(server, user).await;
    assert_eq!(balance, stored);
    let active: i64 = igny8_db::on_pool!(&db.db, pool => sqlx::query_scalar::<_, i64>(
        "SELECT CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM credit_holds WHERE account_id = $1 AND state = 'active' AND expires_at_us > $2")
        .bind(account)
        .bind(unix_now_micros())
        .fetch_one(pool).await)
    .unwrap();
    assert_eq!(held, active, "held = sum(active holds)");
    assert!(balance >= held && held >= 0);
}

async fn reserve_moves_nothing_but_available(b: Backend) {
    let (db, server) = setup(b, 100).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let r = c
        .reserve(ReserveRequest {
            description: "draft article".into(),
            metadata: [("job".to_owned(), "7".to_owned())].into(),
            ..reserve(30, "r1")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.replayed);
    assert_eq!(r.available, 70);
    let hold = r.hold.unwrap();
    assert_eq!(state(&hold), HoldState::Active);
    assert_eq!((hold.account_id, hold.credits), (ACCOUNT, 30));
    assert_eq!(hold.captured_credits, 0);
    assert_eq!(hold.idempotency_key, "r1");
    assert_eq!(hold.description, "draft article");
    assert_eq!(hold.metadata["job"], "7");
    assert!(!hold.id.is_empty());
    // Default lifetime: 15 minutes.
    let (created, expires) = (hold.create_time.unwrap(), hold.expire_time.unwrap());
    assert!((expires.seconds - created.seconds - 900).abs() <= 1);
    // No balance moved, no ledger row.
    assert_eq!(balance_of(&server, EDITOR).await, (100, 30, 70));
    assert_eq!(db.ledger_sum(ACCOUNT).await, (0, 0));
    // Check and Deduct decide against available.
    let check = c
        .check(CheckRequest {
            cost: Some(check_request::Cost::Credits(71)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!check.sufficient);
    assert_eq!(check.available_credits, 70);
    let err = c.deduct(deduct_credits(71, "d1")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "Insufficient credits. Required: 71, Available: 70"
    );
    assert_eq!(info(&err)["available"], "70");
    // Reserve too: not enough available is the Deduct error.
    let err = c.reserve(reserve(71, "r2")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "INSUFFICIENT_CREDITS");
    assert_eq!(
        err.message(),
        "Insufficient credits. Required: 71, Available: 70"
    );
    c.deduct(deduct_credits(70, "d2")).await.unwrap();
    assert_eq!(balance_of(&server, EDITOR).await, (30, 30, 0));
    // Usage-priced reserve: 250 words of content = 2 credits... refused now.
    let err = c
        .reserve(ReserveRequest {
            cost: Some(reserve_request::Cost::Usage(Usage {
                operation: "content".into(),
                quantity: 250,
            })),
            idempotency_key: "r3".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(info(&err)["required"], "2");
    // GetHold reads it back, viewers included.
    let mut viewer = server.billing(&access_token(VIEWER, None), None).await;
    let got = viewer
        .get_hold(GetHoldRequest {
            hold_id: hold.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(got, hold);
    assert_books_balance(&db, &server, EDITOR, ACCOUNT, 100).await;
}

async fn capture_charges_at_most_the_hold(b: Backend) {
    let (db, server) = setup(b, 100).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let hold = c
        .reserve(reserve(40, "r1"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    // More than held: refused, nothing changes.
    let err = c
        .capture_hold(capture(&hold.id, Some(41)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "CAPTURE_EXCEEDS_HOLD");
    assert_eq!(balance_of(&server, EDITOR).await, (100, 40, 60));
    // Usage-priced capture: 2500 words of content = 25 credits.
    let got = c
        .capture_hold(CaptureHoldRequest {
            hold_id: hold.id.clone(),
            amount: Some(capture_hold_request::Amount::Usage(Usage {
                operation: "content".into(),
                quantity: 2500,
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!got.replayed);
    assert_eq!(got.balance, 75);
    let tx = got.transaction.unwrap();
    assert_eq!(tx.kind, TransactionKind::Capture as i32);
    assert_eq!((tx.credits, tx.balance_after), (-25, 75));
    assert_eq!(tx.hold_id, hold.id);
    assert_eq!(tx.operation, "content_generation");
    let captured = got.hold.unwrap();
    assert_eq!(state(&captured), HoldState::Captured);
    assert_eq!(captured.captured_credits, 25);
    assert_eq!(captured.transaction_id, tx.id);
    // The remainder is free at once.
    assert_eq!(balance_of(&server, EDITOR).await, (75, 0, 75));
    // The same capture replays; another amount or a release is refused.
    let again = c
        .capture_hold(CaptureHoldRequest {
            hold_id: hold.id.clone(),
            amount: Some(capture_hold_request::Amount::Credits(25)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.transaction.unwrap().id, tx.id);
    assert_eq!(again.balance, 75);
    for err in [
        c.capture_hold(capture(&hold.id, Some(5)))
            .await
            .unwrap_err(),
        c.capture_hold(capture(&hold.id, None)).await.unwrap_err(),
        c.release_hold(release(&hold.id)).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(reason(&err), "HOLD_NOT_ACTIVE");
        assert_eq!(info(&err)["state"], "HOLD_STATE_CAPTURED");
    }
    // A whole-hold capture (no amount) of another hold.
    let h2 = c
        .reserve(reserve(10, "r2"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    let whole = c
        .capture_hold(capture(&h2.id, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(whole.transaction.unwrap().credits, -10);
    assert_eq!(whole.balance, 65);
    // Listed with its kind and link.
    let rows = c
        .list_transactions(ListTransactionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .transactions;
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r.kind == TransactionKind::Capture as i32)
    );
    assert_eq!(rows[1].hold_id, hold.id);
    assert_books_balance(&db, &server, EDITOR, ACCOUNT, 100).await;
}

async fn capture_never_fails_for_lack_of_credits(b: Backend) {
    let (db, server) = setup(b, 50).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let hold = c
        .reserve(reserve(50, "r1"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    // Everything else is refused while the hold stands…
    let err = c.deduct(deduct_credits(1, "d1")).await.unwrap_err();
    assert_eq!(reason(&err), "INSUFFICIENT_CREDITS");
    // …and the capture of all of it goes through.
    let got = c
        .capture_hold(capture(&hold.id, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.balance, 0);
    assert_books_balance(&db, &server, EDITOR, ACCOUNT, 50).await;
}

async fn release_gives_everything_back(b: Backend) {
    let (db, server) = setup(b, 100).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let hold = c
        .reserve(reserve(60, "r1"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    let r = c
        .release_hold(release(&hold.id))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.replayed);
    assert_eq!(state(&r.hold.unwrap()), HoldState::Released);
    assert_eq!(balance_of(&server, EDITOR).await, (100, 0, 100));
    let again = c
        .release_hold(release(&hold.id))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    let err = c.capture_hold(capture(&hold.id, None)).await.unwrap_err();
    assert_eq!(reason(&err), "HOLD_NOT_ACTIVE");
    assert_eq!(info(&err)["state"], "HOLD_STATE_RELEASED");
    assert_eq!(db.ledger_sum(ACCOUNT).await, (0, 0));
    assert_books_balance(&db, &server, EDITOR, ACCOUNT, 100).await;
}

async fn expiry_is_exact(b: Backend) {
    let (db, server) = setup(b, 100).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let hold = c
        .reserve(reserve_ttl(70, "r1", Duration::from_secs(1)))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(balance_of(&server, EDITOR).await, (100, 70, 30));
    let expire = hold.expire_time.unwrap();
    let expire_at =
        std::time::UNIX_EPOCH + Duration::new(expire.seconds as u64, expire.nanos as u32);
    let wait = expire_at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    // No write has happened since: the hold stopped counting by itself.
    assert_eq!(balance_of(&server, EDITOR).await, (100, 0, 100));
    let got = c
        .get_hold(GetHoldRequest {
            hold_id: hold.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(state(&got), HoldState::Expired);
    for err in [
        c.capture_hold(capture(&hold.id, None)).await.unwrap_err(),
        c.release_hold(release(&hold.id)).await.unwrap_err(),
    ] {
        assert_eq!(reason(&err), "HOLD_NOT_ACTIVE");
        assert_eq!(info(&err)["state"], "HOLD_STATE_EXPIRED");
    }
    // The whole balance is usable again (this write also sweeps the hold).
    c.deduct(deduct_credits(100, "d1")).await.unwrap();
    let state_stored: String = igny8_db::on_pool!(&db.db, pool => sqlx::query_scalar::<_, String>(
        "SELECT state FROM credit_holds WHERE id = $1").bind(&hold.id).fetch_one(pool).await)
    .unwrap();
    assert_eq!(state_stored, "expired");
    assert_books_balance(&db, &server, EDITOR, ACCOUNT, 100).await;
}

async fn holds_of_other_accounts_are_not_found(b: Backend) {
    let (_db, server) = setup(b, 100).await;
    let mut mine = server.billing(&access_token(EDITOR, None), None).await;
    let mut theirs = server
        .billing(&access_token(OTHER_EDITOR, None), None)
        .await;
    let hold = theirs
        .reserve(reserve(10, "r1"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    let unknown = "hold_00000000000000000000000000000000";
    for id in [hold.id.as_str(), unknown] {
        let errs = [
            mine.get_hold(GetHoldRequest { hold_id: id.into() })
                .await
                .unwrap_err(),
            mine.capture_hold(capture(id, None)).await.unwrap_err(),
            mine.release_hold(release(id)).await.unwrap_err(),
        ];
        for err in errs {
            assert_eq!(err.code(), Code::NotFound, "{err:?}");
            assert_eq!(reason(&err), "HOLD_NOT_FOUND");
            // Identical for a foreign hold and an unknown id, apart from the id.
            assert_eq!(err.message(), format!("hold {id:?} not found"));
        }
    }
    // Theirs is untouched.
    let still = theirs
        .get_hold(GetHoldRequest {
            hold_id: hold.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(state(&still), HoldState::Active);
    // Malformed ids: empty is invalid; a huge one is not found, cut short.
    let err = mine
        .get_hold(GetHoldRequest { hold_id: "".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = mine
        .capture_hold(capture(&"x".repeat(100_000), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().len() < 200);
}

async fn reserve_is_idempotent_and_validated(b: Backend) {
    let (db, server) = setup(b, 100).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let first = c.reserve(reserve(10, "k")).await.unwrap().into_inner();
    let again = c.reserve(reserve(10, "k")).await.unwrap().into_inner();
    assert!(again.replayed);
    assert_eq!(again.hold.unwrap().id, first.hold.as_ref().unwrap().id);
    assert_eq!(balance_of(&server, EDITOR).await, (100, 10, 90));
    let err = c.reserve(reserve(11, "k")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(reason(&err), "IDEMPOTENCY_KEY_REUSED");
    // A replay after the hold ended shows it as it is now.
    let id = first.hold.unwrap().id;
    c.release_hold(release(&id)).await.unwrap();
    let after = c.reserve(reserve(10, "k")).await.unwrap().into_inner();
    assert!(after.replayed);
    assert_eq!(state(&after.hold.unwrap()), HoldState::Released);
    // Keys are a namespace per kind: the same text works for a Deduct.
    let d = c.deduct(deduct_credits(5, "k")).await.unwrap().into_inner();
    assert!(!d.replayed);
    // Validation changes nothing.
    let bad: Vec<(ReserveRequest, &str)> = vec![
        (reserve(0, "v1"), "credits"),
        (reserve(-3, "v2"), "credits"),
        (reserve(5, ""), "idempotency_key"),
        (reserve_ttl(5, "v3", Duration::from_millis(500)), "ttl"),
        (
            reserve_ttl(5, "v4", Duration::from_secs(24 * 3600 + 1)),
            "ttl",
        ),
        (
            ReserveRequest {
                ttl: Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
                ..reserve(5, "v5")
            },
            "ttl",
        ),
        (
            ReserveRequest {
                cost: None,
                ..reserve(5, "v6")
            },
            "cost",
        ),
        (
            ReserveRequest {
                cost: Some(reserve_request::Cost::Usage(Usage {
                    operation: "teleport".into(),
                    quantity: 1,
                })),
                ..reserve(5, "v7")
            },
            "usage.operation",
        ),
    ];
    for (req, field) in bad {
        let err = c.reserve(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        let br = err.get_details_bad_request().unwrap();
        assert_eq!(br.field_violations[0].field, field);
    }
    // Bounds are inclusive: 1 s and 24 h are accepted.
    c.reserve(reserve_ttl(1, "t1", Duration::from_secs(1)))
        .await
        .unwrap();
    c.reserve(reserve_ttl(1, "t2", Duration::from_secs(24 * 3600)))
        .await
        .unwrap();
    assert_books_balance(&db, &server, EDITOR, ACCOUNT, 100).await;
}

async fn refunds_are_bounded_linked_and_staff_only(b: Backend) {
    let (db, server) = setup(b, 100).await;
    let mut editor = server.billing(&access_token(EDITOR, None), None).await;
    let charge = editor
        .deduct(deduct_credits(30, "d1"))
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap();
    let mut dev = server
        .billing(&access_token(DEV, None), Some(ACCOUNT))
        .await;
    let r1 = dev
        .refund(refund(charge.id, 10, "f1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r1.replayed);
    assert_eq!(r1.balance, 80);
    let row = r1.transaction.unwrap();
    assert_eq!(row.kind, TransactionKind::Refund as i32);
    assert_eq!((row.credits, row.refund_of), (10, charge.id));
    assert_eq!(row.description, "support ticket 42");
    // Replay, key reuse.
    let again = dev
        .refund(refund(charge.id, 10, "f1"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.transaction.unwrap().id, row.id);
    let err = dev.refund(refund(charge.id, 11, "f1")).await.unwrap_err();
    assert_eq!(reason(&err), "IDEMPOTENCY_KEY_REUSED");
    // More than is left.
    let err = dev.refund(refund(charge.id, 21, "f2")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "REFUND_EXCEEDS_CHARGE");
    assert_eq!(info(&err)["refundable"], "20");
    // 0 = all that is left.
    let rest = dev
        .refund(refund(charge.id, 0, "f3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.transaction.unwrap().credits, 20);
    assert_eq!(rest.balance, 100);
    let err = dev.refund(refund(charge.id, 0, "f4")).await.unwrap_err();
    assert_eq!(reason(&err), "REFUND_EXCEEDS_CHARGE");
    assert_eq!(info(&err)["refundable"], "0");
    // Captures can be refunded too; grants and refunds cannot.
    let hold = editor
        .reserve(reserve(40, "r1"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    let cap = editor
        .capture_hold(capture(&hold.id, Some(15)))
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap();
    let svc = service_token("support-bot");
    let mut service = server.billing(&svc, Some(ACCOUNT)).await;
    let r = service
        .refund(refund(cap.id, 0, "f5"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.transaction.unwrap().credits, 15);
    let grant = service
        .grant(GrantRequest {
            credits: 5,
            idempotency_key: "g1".into(),
            reason: "promo".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap();
    let err = service.refund(refund(grant.id, 1, "f6")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "NOT_REFUNDABLE");
    let err = service.refund(refund(row.id, 1, "f7")).await.unwrap_err();
    assert_eq!(reason(&err), "NOT_REFUNDABLE");
    // Keys are a namespace per kind: Deduct key "d1" does not block a Refund "d1".
    dev.refund(refund(cap.id, 0, "d1")).await.unwrap_err(); // nothing left: refused on amount, not key
    let err = dev.refund(refund(charge.id, 0, "d1")).await.unwrap_err();
    assert_eq!(reason(&err), "REFUND_EXCEEDS_CHARGE");
    // Unknown and other accounts' transactions are NOT_FOUND.
    let mut other_editor = server
        .billing(&access_token(OTHER_EDITOR, None), None)
        .await;
    let theirs = other_editor
        .deduct(deduct_credits(5, "x"))
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap();
    for id in [theirs.id, 999_999] {
        let err = dev.refund(refund(id, 1, "f8")).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{id}");
        assert_eq!(reason(&err), "TRANSACTION_NOT_FOUND");
    }
    // Roles: members never refund; staff never on their own account.
    for user in [EDITOR, OWNER, VIEWER] {
        let mut c = server.billing(&access_token(user, None), None).await;
        let err = c.refund(refund(charge.id, 1, "f9")).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "user {user}");
    }
    let mut own = server
        .billing(&access_token(DEV_IN_ACCOUNT, None), None)
        .await;
    let err = own.refund(refund(charge.id, 1, "f10")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Validation.
    for (req, field) in [
        (refund(0, 1, "v1"), "transaction_id"),
        (refund(charge.id, -1, "v2"), "credits"),
        (refund(charge.id, 1, ""), "idempotency_key"),
    ] {
        let err = dev.refund(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            err.get_details_bad_request().unwrap().field_violations[0].field,
            field
        );
    }
    assert_books_balance(&db, &server, EDITOR, ACCOUNT, 100).await;
}

async fn roles_follow_the_matrix(b: Backend) {
    let (_db, server) = setup(b, 100).await;
    let mut editor = server.billing(&access_token(EDITOR, None), None).await;
    let hold = editor
        .reserve(reserve(5, "r0"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    let mut viewer = server.billing(&access_token(VIEWER, None), None).await;
    let denied = [
        viewer.reserve(reserve(1, "r1")).await.unwrap_err(),
        viewer
            .capture_hold(capture(&hold.id, None))
            .await
            .unwrap_err(),
        viewer.release_hold(release(&hold.id)).await.unwrap_err(),
    ];
    for err in denied {
        assert_eq!(err.code(), Code::PermissionDenied);
    }
    viewer
        .get_hold(GetHoldRequest {
            hold_id: hold.id.clone(),
        })
        .await
        .unwrap();
    // Owners, developers and services (act-as) may hold.
    let mut owner = server.billing(&access_token(OWNER, None), None).await;
    owner.reserve(reserve(1, "r2")).await.unwrap();
    let mut dev = server
        .billing(&access_token(DEV, None), Some(ACCOUNT))
        .await;
    let h = dev
        .reserve(reserve(1, "r3"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(h.account_id, ACCOUNT);
    let mut svc = server
        .billing(&service_token("writer-worker"), Some(ACCOUNT))
        .await;
    svc.capture_hold(capture(&h.id, None)).await.unwrap();
    // A service without act-as names no account.
    let mut bare = server.billing(&service_token("writer-worker"), None).await;
    let err = bare.reserve(reserve(1, "r4")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn concurrent_reserves_never_overcommit(b: Backend) {
    let (db, server) = setup(b, 200).await;
    let token = access_token(EDITOR, None);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut c = server.billing(&token, None).await;
        tasks.push(tokio::spawn(async move {
            c.reserve(reserve(10, &format!("r{i}"))).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(reason(&e), "INSUFFICIENT_CREDITS", "{e:?}"),
        }
    }
    assert_eq!(ok, 20);
    assert_eq!(balance_of(&server, EDITOR).await, (200, 200, 0));
    assert_books_balance(&db, &server, EDITOR, ACCOUNT, 200).await;
}

async fn racing_holds_deducts_captures_releases_never_overdraw(b: Backend) {
    let start = 500;
    let (db, server) = setup(b, start).await;
    let token = access_token(EDITOR, None);
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let mut c = server.billing(&token, None).await;
        tasks.push(tokio::spawn(async move {
            let credits = 5 + (i % 7) as i64 * 5;
            match i % 4 {
                0 => {
                    let _ = c.deduct(deduct_credits(credits, &format!("d{i}"))).await;
                }
                1 => {
                    if let Ok(r) = c.reserve(reserve(credits, &format!("r{i}"))).await {
                        let id = r.into_inner().hold.unwrap().id;
                        let _ = c.capture_hold(capture(&id, Some(credits / 2 + 1))).await;
                    }
                }
                2 => {
                    if let Ok(r) = c.reserve(reserve(credits, &format!("r{i}"))).await {
                        let id = r.into_inner().hold.unwrap().id;
                        let _ = c.release_hold(release(&id)).await;
                    }
                }
                _ => {
                    // Left active.
                    let _ = c.reserve(reserve(credits, &format!("r{i}"))).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_books_balance(&db, &server, EDITOR, ACCOUNT, start).await;
}

async fn capture_racing_expiry_has_one_winner(b: Backend) {
    let (db, server) = setup(b, 1000).await;
    let mut c = server.billing(&access_token(EDITOR, None), None).await;
    let mut captured = 0;
    let mut expired = 0;
    for round in 0..6u64 {
        let hold = c
            .reserve(reserve_ttl(
                10,
                &format!("r{round}"),
                Duration::from_secs(1),
            ))
            .await
            .unwrap()
            .into_inner()
            .hold
            .unwrap();
        let expire = hold.expire_time.unwrap();
        let expire_at =
            std::time::UNIX_EPOCH + Duration::new(expire.seconds as u64, expire.nanos as u32);
        // Aim the capture around the expiry instant: a little before or after.
        let offset_ms = [-20i64, -5, 0, 2, 5, 15][round as usize];
        let target = if offset_ms >= 0 {
            expire_at + Duration::from_millis(offset_ms as u64)
        } else {
            expire_at - Duration::from_millis((-offset_ms) as u64)
        };
        let wait = target
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        let result = c.capture_hold(capture(&hold.id, None)).await;
        let after = c
            .get_hold(GetHoldRequest {
                hold_id: hold.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .hold
            .unwrap();
        match result {
            Ok(r) => {
                captured += 1;
                assert_eq!(state(&after), HoldState::Captured);
                assert_eq!(after.transaction_id, r.into_inner().transaction.unwrap().id);
            }
            Err(e) => {
                expired += 1;
                assert_eq!(info(&e)["state"], "HOLD_STATE_EXPIRED", "{e:?}");
                assert_eq!(state(&after), HoldState::Expired);
                assert_eq!(after.transaction_id, 0);
            }
        }
    }
    assert_eq!(captured + expired, 6);
    // Exactly the captured holds were charged.
    let (sum, rows) = db.ledger_sum(ACCOUNT).await;
    assert_eq!((sum, rows), (-10 * captured, captured));
    assert_books_balance(&db, &server, EDITOR, ACCOUNT, 1000).await;
}

/// The refund bound is the database's own rule, not only the writer's: a
/// ledger row written straight into the table cannot refund more than its
/// charge, while rows of other kinds pass the trigger untouched.
async fn the_database_refuses_refunds_beyond_the_charge(b: Backend) {
    let (db, server) = setup(b, 100).await;
    let mut editor = server.billing(&access_token(EDITOR, None), None).await;
    let charge = editor
        .deduct(deduct_credits(30, "d1"))
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap();
    let insert = |kind: &'static str, credits: i64, key: &'static str, refund_of: Option<i64>| {
        let pool = db.db.clone();
        async move {
            let sql = "INSERT INTO credit_ledger (account_id, kind, credits, balance_after, \
                       idempotency_key, request_hash, actor, created_at, refund_of) \
                       VALUES ($1, $2, $3, 1000, $4, 'h', 'test', $5, $6)";
            igny8_db::on_pool!(&pool, pool => sqlx::query(sql)
                .bind(ACCOUNT)
                .bind(kind)
                .bind(credits)
                .bind(key)
                .bind(chrono::Utc::now())
                .bind(refund_of)
                .execute(pool)
                .await
                .map(|_| ()))
        }
    };
    insert("refund", 31, "r1", Some(charge.id))
        .await
        .expect_err("a refund beyond the charge is refused");
    insert("refund", 30, "r2", Some(charge.id))
        .await
        .expect("a refund of the whole charge is allowed");
    insert("refund", 1, "r3", Some(charge.id))
        .await
        .expect_err("nothing is left to refund");
    insert("refund", 1, "r4", Some(9_999_999))
        .await
        .expect_err("only a charge of the account can be refunded");
    insert("deduct", -1, "d2", None)
        .await
        .expect("other kinds do not meet the refund rule");
    assert_eq!(db.ledger_sum(ACCOUNT).await, (-30 + 30 - 1, 3));
}

on_both_backends!(
    reserve_moves_nothing_but_available,
    capture_charges_at_most_the_hold,
    capture_never_fails_for_lack_of_credits,
    release_gives_everything_back,
    expiry_is_exact,
    holds_of_other_accounts_are_not_found,
    reserve_is_idempotent_and_validated,
    refunds_are_bounded_linked_and_staff_only,
    roles_follow_the_matrix,
    concurrent_reserves_never_overcommit,
    racing_holds_deducts_captures_releases_never_overdraw,
    capture_racing_expiry_has_one_winner,
    the_database_refuses_refunds_beyond_the_charge,
);

/// A SIGKILL of billing-svc between Reserve and Capture loses nothing: after
/// a restart the hold is still active and the capture succeeds once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_reserve_and_capture_loses_nothing() {
    let db = TestDb::new(Backend::Postgres).await;
    db.account(ACCOUNT).credits(100).create().await;
    db.user(EDITOR)
        .account(ACCOUNT)
        .role("editor")
        .create()
        .await;
    let token = access_token(EDITOR, None);
    let first = Process::start(
        "billing-svc",
        igny8_proto::BILLING_SERVICE_NAME,
        &db.url,
        &[],
    )
    .await;
    let mut c = Running::at(first.addr).billing(&token, None).await;
    let hold = c
        .reserve(reserve(40, "r1"))
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    first.signal("KILL");
    drop(first);
    let second = Process::start(
        "billing-svc",
        igny8_proto::BILLING_SERVICE_NAME,
        &db.url,
        &[],
    )
    .await;
    let server = Running::at(second.addr);
    let mut c = server.billing(&token, None).await;
    let got = c
        .get_hold(GetHoldRequest {
            hold_id: hold.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(state(&got), HoldState::Active);
    assert_eq!(balance_of(&server, EDITOR).await, (100, 40, 60));
    let cap = c
        .capture_hold(capture(&hold.id, Some(25)))
        .await
        .unwrap()
        .into_inner();
    assert!(!cap.replayed);
    let again = c
        .capture_hold(capture(&hold.id, Some(25)))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(db.ledger_sum(ACCOUNT).await, (-25, 1));
    assert_eq!(balance_of(&server, EDITOR).await, (75, 0, 75));
}

fn unix_now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}
