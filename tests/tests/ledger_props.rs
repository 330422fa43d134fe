//! Property: over any sequence of deducts, grants and replays (keys are a
//! namespace per kind), the balance
//! equals the sum of the ledger, never goes below zero, and every outcome is
//! the one a simple model predicts — on both backends.

use std::{
    collections::{BTreeMap, HashMap},
    sync::atomic::{AtomicI64, Ordering},
};

use billing_svc::{
    error::BillingError,
    ledger::{Entry, Kind, Ledger},
};
use igny8_tests::{Backend, TestDb};
use proptest::{collection::vec, prelude::*};

#[derive(Debug, Clone)]
enum Op {
    Deduct {
        credits: i64,
        key: u8,
    },
    Grant {
        credits: i64,
        key: u8,
    },
    /// Repeat the n-th earlier operation verbatim.
    Replay(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1i64..60, 0u8..12).prop_map(|(credits, key)| Op::Deduct { credits, key }),
        2 => (1i64..80, 0u8..12).prop_map(|(credits, key)| Op::Grant { credits, key }),
        2 => (0usize..64).prop_map(Op::Replay),
    ]
}

fn entry(kind: Kind, credits: i64, key: u8) -> Entry {
    let signed = if kind == Kind::Deduct {
        -credits
    } else {
        credits
    };
    Entry {
        kind,
        credits: signed,
        operation: String::new(),
        quantity: 0,
        description: String::new(),
        metadata: BTreeMap::new(),
        idempotency_key: format!("key-{key}"),
        request_hash: format!("{}:{credits}", kind.as_str()),
        actor: "test".into(),
    }
}

static NEXT_ACCOUNT: AtomicI64 = AtomicI64::new(1);

async fn run(db: &TestDb, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let account = NEXT_ACCOUNT.fetch_add(1, Ordering::Relaxed);
    let start = 30;
    db.account(account).credits(start).create().await;
    let ledger = Ledger::new(db.db.clone());
    // The model: balance, and per key the request hash and the result.
    let mut balance = start;
    // Keys are a namespace per account and per kind of request.
    let mut keys: HashMap<(Kind, String), (String, i64, i64)> = HashMap::new();
    let mut done: Vec<Entry> = Vec::new();
    for op in ops {
        let e = match op {
            Op::Deduct { credits, key } => entry(Kind::Deduct, credits, key),
            Op::Grant { credits, key } => entry(Kind::Grant, credits, key),
            Op::Replay(_) if done.is_empty() => continue,
            Op::Replay(n) => done[n % done.len()].clone(),
        };
        let got = ledger.apply(account, &e).await;
        match keys.get(&(e.kind, e.idempotency_key.clone())) {
            Some((hash, id, after)) if *hash == e.request_hash => {
                let applied =
                    got.map_err(|err| TestCaseError::fail(format!("replay failed: {err}")))?;
                prop_assert!(applied.replayed);
                prop_assert_eq!((applied.row.id, applied.row.balance_after), (*id, *after));
            }
            Some(_) => prop_assert!(
                matches!(got, Err(BillingError::IdempotencyKeyReused { .. })),
                "{:?}",
                got
            ),
            None if balance + e.credits < 0 => match got {
                Err(BillingError::InsufficientCredits {
                    required,
                    available,
                }) => {
                    prop_assert_eq!((required, available), (-e.credits, balance));
                }
                other => prop_assert!(false, "expected insufficient credits, got {:?}", other),
            },
            None => {
                let applied =
                    got.map_err(|err| TestCaseError::fail(format!("apply failed: {err}")))?;
                prop_assert!(!applied.replayed);
                balance += e.credits;
                prop_assert_eq!(applied.row.balance_after, balance);
                keys.insert(
                    (e.kind, e.idempotency_key.clone()),
                    (e.request_hash.clone(), applied.row.id, balance),
                );
                done.push(e);
            }
        }
        let stored = db.balance(account).await;
        let (sum, rows) = db.ledger_sum(account).await;
        prop_assert!(stored >= 0);
        prop_assert_eq!(stored, balance);
        prop_assert_eq!(stored, start + sum, "balance = start + sum(ledger)");
        prop_assert_eq!(rows as usize, keys.len(), "one row per applied key");
    }
    Ok(())
}

fn check(backend: Backend, cases: u32) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::new(backend));
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in vec(op(), 1..40))| {
        rt.block_on(run(&db, ops))?;
    });
    rt.block_on(async move { drop(db) });
}

#[test]
fn sqlite_ledger_invariants_hold_for_any_sequence() {
    check(Backend::Sqlite, 48);
}

#[test]
fn postgres_ledger_invariants_hold_for_any_sequence() {
    check(Backend::Postgres, 48);
}
