//! Property: random sequences of Reserve / Capture / Release / Deduct /
//! Grant / Refund / replays / key reuses / expiry, fed through the batching
//! writer, answer exactly as a one-at-a-time in-memory model does, and the
//! books agree with it afterwards — on both backends.
//!
//! Each round's requests are submitted together, in order (the writer
//! applies a shard's queue in arrival order, in batches of a random size), so
//! batch boundaries vary while the expected answers stay deterministic. The
//! clock is the test's: expiry is driven by advancing it between rounds,
//! never by sleeping.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use billing_svc::{
    error::BillingError,
    ledger::{Entry, Kind, Ledger},
    writer::{CaptureAmount, Done, NewHold, NewRefund, Op as WOp, WriterConfig},
};
use chrono::{DateTime, Utc};
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
    Reserve {
        credits: i64,
        key: u8,
        ttl: u64,
    },
    Capture {
        hold: usize,
        amount: Option<i64>,
    },
    Release {
        hold: usize,
    },
    Refund {
        tx: usize,
        credits: i64,
        key: u8,
    },
    /// Repeat the n-th earlier request verbatim.
    Replay(usize),
    /// End the round and move the clock on by this many seconds.
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1i64..60, 0u8..6).prop_map(|(credits, key)| Op::Deduct { credits, key }),
        2 => (1i64..80, 0u8..6).prop_map(|(credits, key)| Op::Grant { credits, key }),
        4 => (1i64..60, 0u8..6, 1u64..6).prop_map(|(credits, key, ttl)| Op::Reserve { credits, key, ttl }),
        3 => (0usize..16, proptest::option::of(1i64..70)).prop_map(|(hold, amount)| Op::Capture { hold, amount }),
        2 => (0usize..16).prop_map(|hold| Op::Release { hold }),
        2 => (0usize..16, 0i64..40, 0u8..6).prop_map(|(tx, credits, key)| Op::Refund { tx, credits, key }),
        2 => (0usize..64).prop_map(Op::Replay),
        2 => (0u64..5).prop_map(Op::Advance),
    ]
}

/// A request as sent, with the ids it names resolved.
#[derive(Debug, Clone)]
enum Req {
    Deduct(i64, String),
    Grant(i64, String),
    Reserve(i64, String, u64),
    Capture(String, Option<i64>),
    Release(String),
    Refund(i64, i64, String),
}

impl Req {
    fn hash(&self) -> String {
        format!("{self:?}")
    }

    fn to_op(&self) -> WOp {
        let change = |kind: Kind, credits: i64, key: &str| {
            WOp::Change(Entry {
                kind,
                credits,
                operation: String::new(),
                quantity: 0,
                description: String::new(),
                metadata: BTreeMap::new(),
                idempotency_key: key.to_owned(),
                request_hash: self.hash(),
                actor: "test".into(),
            })
        };
        match self {
            Req::Deduct(c, k) => change(Kind::Deduct, -c, k),
            Req::Grant(c, k) => change(Kind::Grant, *c, k),
            Req::Reserve(c, k, ttl) => WOp::Reserve(NewHold {
                credits: *c,
                operation: String::new(),
                quantity: 0,
                description: String::new(),
                metadata: BTreeMap::new(),
                idempotency_key: k.clone(),
                request_hash: self.hash(),
                actor: "test".into(),
                ttl: Duration::from_secs(*ttl),
            }),
            Req::Capture(id, amount) => WOp::Capture {
                hold_id: id.clone(),
                amount: amount.map(|credits| CaptureAmount {
                    credits,
                    operation: None,
                    quantity: 0,
                }),
                actor: "test".into(),
            },
            Req::Release(id) => WOp::Release {
                hold_id: id.clone(),
            },
            Req::Refund(tx, c, k) => WOp::Refund(NewRefund {
                transaction_id: *tx,
                credits: *c,
                idempotency_key: k.clone(),
                request_hash: self.hash(),
                reason: String::new(),
                actor: "test".into(),
            }),
        }
    }
}

/// What the model expects, in comparable form.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Row {
        id: Option<i64>,
        credits: i64,
        balance_after: i64,
        replayed: bool,
    },
    Reserved {
        id: Option<String>,
        credits: i64,
        available: i64,
        replayed: bool,
    },
    Captured {
        hold: String,
        row: Option<i64>,
        credits: i64,
        balance_after: i64,
        replayed: bool,
    },
    Released {
        hold: String,
        replayed: bool,
    },
    Insufficient(i64, i64),
    KeyReused,
    HoldNotFound,
    NotActive(&'static str),
    CaptureExceeds,
    RefundExceeds(i64),
    NotRefundable,
    TxNotFound,
}

fn observed(r: &Result<Done, BillingError>) -> Expect {
    match r {
        Ok(Done::Row { row, replayed }) => Expect::Row {
            id: Some(row.id),
            credits: row.credits,
            balance_after: row.balance_after,
            replayed: *replayed,
        },
        Ok(Done::Reserved {
            hold,
            available,
            replayed,
        }) => Expect::Reserved {
            id: Some(hold.id.clone()),
            credits: hold.credits,
            available: *available,
            replayed: *replayed,
        },
        Ok(Done::Captured {
            hold,
            row,
            replayed,
        }) => Expect::Captured {
            hold: hold.id.clone(),
            row: Some(row.id),
            credits: row.credits,
            balance_after: row.balance_after,
            replayed: *replayed,
        },
        Ok(Done::Released { hold, replayed }) => Expect::Released {
            hold: hold.id.clone(),
            replayed: *replayed,
        },
        Err(BillingError::InsufficientCredits {
            required,
            available,
        }) => Expect::Insufficient(*required, *available),
        Err(BillingError::IdempotencyKeyReused { .. }) => Expect::KeyReused,
        Err(BillingError::HoldNotFound(_)) => Expect::HoldNotFound,
        Err(BillingError::HoldNotActive { state }) => Expect::NotActive(state),
        Err(BillingError::CaptureExceedsHold { .. }) => Expect::CaptureExceeds,
        Err(BillingError::RefundExceedsCharge { refundable, .. }) => {
            Expect::RefundExceeds(*refundable)
        }
        Err(BillingError::NotRefundable { .. }) => Expect::NotRefundable,
        Err(BillingError::TransactionNotFound(_)) => Expect::TxNotFound,
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[derive(Debug, Clone)]
struct MHold {
    credits: i64,
    state: &'static str,
    captured: i64,
    expires_us: i64,
    row: Option<i64>,
    after: i64,
}

#[derive(Debug, Default)]
struct Model {
    balance: i64,
    holds: HashMap<String, MHold>,
    /// (kind, key) → (hash, row id, balance_after, credits)
    keys: HashMap<(&'static str, String), (String, i64, i64, i64)>,
    /// Reserve key → (hash, hold id)
    hold_keys: HashMap<String, (String, String)>,
    /// row id → (charge kind?, credits charged, refunded)
    rows: HashMap<i64, (bool, i64, i64)>,
}

impl Model {
    fn held(&self, now_us: i64) -> i64 {
        self.holds
            .values()
            .filter(|h| h.state == "active" && h.expires_us > now_us)
            .map(|h| h.credits)
            .sum()
    }

    fn state_of(h: &MHold, now_us: i64) -> &'static str {
        match h.state {
            "active" if h.expires_us <= now_us => "HOLD_STATE_EXPIRED",
            "active" => "HOLD_STATE_ACTIVE",
            "captured" => "HOLD_STATE_CAPTURED",
            "released" => "HOLD_STATE_RELEASED",
            _ => "HOLD_STATE_EXPIRED",
        }
    }

    /// Predicts the answer; ids of new rows and holds come from `got` (they
    /// are the database's), and are recorded for later requests.
    fn apply(&mut self, req: &Req, now_us: i64, got: &Expect) -> Expect {
        let available = self.balance - self.held(now_us);
        match req {
            Req::Deduct(c, key) | Req::Grant(c, key) => {
                let (kind, delta) = match req {
                    Req::Deduct(..) => ("deduct", -c),
                    _ => ("grant", *c),
                };
                if let Some((hash, id, after, credits)) = self.keys.get(&(kind, key.clone())) {
                    return if *hash == req.hash() {
                        Expect::Row {
                            id: Some(*id),
                            credits: *credits,
                            balance_after: *after,
                            replayed: true,
                        }
                    } else {
                        Expect::KeyReused
                    };
                }
                if delta < 0 && available < -delta {
                    return Expect::Insufficient(-delta, available);
                }
                self.balance += delta;
                let id = new_id(got);
                self.keys
                    .insert((kind, key.clone()), (req.hash(), id, self.balance, delta));
                self.rows.insert(id, (kind == "deduct", -delta, 0));
                Expect::Row {
                    id: Some(id),
                    credits: delta,
                    balance_after: self.balance,
                    replayed: false,
                }
            }
            Req::Reserve(c, key, ttl) => {
                if let Some((hash, id)) = self.hold_keys.get(key) {
                    return if *hash == req.hash() {
                        Expect::Reserved {
                            id: Some(id.clone()),
                            credits: *c,
                            available,
                            replayed: true,
                        }
                    } else {
                        Expect::KeyReused
                    };
                }
                if available < *c {
                    return Expect::Insufficient(*c, available);
                }
                let id = match got {
                    Expect::Reserved { id: Some(id), .. } => id.clone(),
                    _ => "missing".into(),
                };
                self.holds.insert(
                    id.clone(),
                    MHold {
                        credits: *c,
                        state: "active",
                        captured: 0,
                        expires_us: now_us + (*ttl as i64) * 1_000_000,
                        row: None,
                        after: 0,
                    },
                );
                self.hold_keys.insert(key.clone(), (req.hash(), id.clone()));
                Expect::Reserved {
                    id: Some(id),
                    credits: *c,
                    available: available - c,
                    replayed: false,
                }
            }
            Req::Capture(id, amount) => {
                let Some(h) = self.holds.get(id).cloned() else {
                    return Expect::HoldNotFound;
                };
                let want = amount.unwrap_or(h.credits);
                match Self::state_of(&h, now_us) {
                    "HOLD_STATE_ACTIVE" if want > h.credits => Expect::CaptureExceeds,
                    "HOLD_STATE_ACTIVE" => {
                        self.balance -= want;
                        let row = new_id(got);
                        self.rows.insert(row, (true, want, 0));
                        let m = self.holds.get_mut(id).unwrap();
                        m.state = "captured";
                        m.captured = want;
                        m.row = Some(row);
                        m.after = self.balance;
                        Expect::Captured {
                            hold: id.clone(),
                            row: Some(row),
                            credits: -want,
                            balance_after: self.balance,
                            replayed: false,
                        }
                    }
                    "HOLD_STATE_CAPTURED" if h.captured == want => Expect::Captured {
                        hold: id.clone(),
                        row: h.row,
                        credits: -want,
                        balance_after: h.after,
                        replayed: true,
                    },
                    state => Expect::NotActive(state),
                }
            }
            Req::Release(id) => {
                let Some(h) = self.holds.get(id).cloned() else {
                    return Expect::HoldNotFound;
                };
                match Self::state_of(&h, now_us) {
                    "HOLD_STATE_ACTIVE" => {
                        self.holds.get_mut(id).unwrap().state = "released";
                        Expect::Released {
                            hold: id.clone(),
                            replayed: false,
                        }
                    }
                    "HOLD_STATE_RELEASED" => Expect::Released {
                        hold: id.clone(),
                        replayed: true,
                    },
                    state => Expect::NotActive(state),
                }
            }
            Req::Refund(tx, c, key) => {
                if let Some((hash, id, after, credits)) = self.keys.get(&("refund", key.clone())) {
                    return if *hash == req.hash() {
                        Expect::Row {
                            id: Some(*id),
                            credits: *credits,
                            balance_after: *after,
                            replayed: true,
                        }
                    } else {
                        Expect::KeyReused
                    };
                }
                let Some(&(charge, charged, refunded)) = self.rows.get(tx) else {
                    return Expect::TxNotFound;
                };
                if !charge {
                    return Expect::NotRefundable;
                }
                let refundable = charged - refunded;
                let want = if *c == 0 { refundable } else { *c };
                if want == 0 || want > refundable {
                    return Expect::RefundExceeds(refundable);
                }
                self.balance += want;
                self.rows.get_mut(tx).unwrap().2 += want;
                let id = new_id(got);
                self.rows.insert(id, (false, 0, 0));
                self.keys.insert(
                    ("refund", key.clone()),
                    (req.hash(), id, self.balance, want),
                );
                Expect::Row {
                    id: Some(id),
                    credits: want,
                    balance_after: self.balance,
                    replayed: false,
                }
            }
        }
    }
}

fn new_id(got: &Expect) -> i64 {
    match got {
        Expect::Row { id: Some(id), .. } | Expect::Captured { row: Some(id), .. } => *id,
        _ => -1,
    }
}

static NEXT_ACCOUNT: AtomicI64 = AtomicI64::new(1);

async fn run(db: &TestDb, ops: Vec<Op>, max_batch: usize) -> Result<(), TestCaseError> {
    let account = NEXT_ACCOUNT.fetch_add(1, Ordering::Relaxed);
    let start = 100;
    db.account(account).credits(start).create().await;
    let clock_us = Arc::new(AtomicI64::new(Utc::now().timestamp_micros()));
    let clock = {
        let clock_us = clock_us.clone();
        Arc::new(move || DateTime::from_timestamp_micros(clock_us.load(Ordering::SeqCst)).unwrap())
    };
    let config = WriterConfig {
        max_batch,
        shards: 1,
        queue_capacity: 1000,
        account_share: 1000,
    };
    let ledger = Ledger::with_clock(db.db.clone(), config, clock);
    let mut model = Model {
        balance: start,
        ..Model::default()
    };
    let mut sent: Vec<Req> = Vec::new();
    let mut hold_ids: Vec<String> = Vec::new();
    let mut row_ids: Vec<i64> = Vec::new();
    let mut round: Vec<Req> = Vec::new();
    let mut ops = ops;
    ops.push(Op::Advance(0));
    for op in ops {
        let req = match op {
            Op::Deduct { credits, key } => Req::Deduct(credits, format!("k{key}")),
            Op::Grant { credits, key } => Req::Grant(credits, format!("k{key}")),
            Op::Reserve { credits, key, ttl } => Req::Reserve(credits, format!("k{key}"), ttl),
            Op::Capture { hold, amount } => Req::Capture(pick(&hold_ids, hold), amount),
            Op::Release { hold } => Req::Release(pick(&hold_ids, hold)),
            Op::Refund { tx, credits, key } => Req::Refund(
                if row_ids.is_empty() {
                    999_999_999
                } else {
                    row_ids[tx % row_ids.len()]
                },
                credits,
                format!("k{key}"),
            ),
            Op::Replay(_) if sent.is_empty() => continue,
            Op::Replay(n) => sent[n % sent.len()].clone(),
            Op::Advance(secs) => {
                // Submit the round together, in order; then compare.
                let now_us = clock_us.load(Ordering::SeqCst);
                let futures: Vec<_> = round
                    .iter()
                    .map(|r| ledger.writer().submit(account, r.to_op()))
                    .collect();
                let answers = futures::future::join_all(futures).await;
                for (req, got) in round.drain(..).zip(answers) {
                    let got = observed(&got);
                    let want = model.apply(&req, now_us, &got);
                    prop_assert_eq!(&got, &want, "request {:?}", req);
                    match &got {
                        Expect::Reserved {
                            id: Some(id),
                            replayed: false,
                            ..
                        } => hold_ids.push(id.clone()),
                        Expect::Row {
                            id: Some(id),
                            replayed: false,
                            ..
                        }
                        | Expect::Captured {
                            row: Some(id),
                            replayed: false,
                            ..
                        } => row_ids.push(*id),
                        _ => {}
                    }
                    sent.push(req);
                }
                clock_us.fetch_add((secs * 1_000_000) as i64, Ordering::SeqCst);
                continue;
            }
        };
        round.push(req);
    }
    // The books agree with the model.
    let now_us = clock_us.load(Ordering::SeqCst);
    let b = ledger.balance(account).await.unwrap();
    prop_assert_eq!(b.balance, model.balance);
    prop_assert_eq!(b.held, model.held(now_us));
    let (sum, _) = db.ledger_sum(account).await;
    prop_assert_eq!(model.balance, start + sum, "balance = start + sum(ledger)");
    Ok(())
}

fn pick(ids: &[String], i: usize) -> String {
    if ids.is_empty() {
        "hold_unknown".into()
    } else {
        ids[i % ids.len()].clone()
    }
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
    proptest!(config, |(ops in vec(op(), 1..60), max_batch in 1usize..8)| {
        rt.block_on(run(&db, ops, max_batch))?;
    });
    rt.block_on(async move { drop(db) });
}

#[test]
fn sqlite_writer_matches_the_model() {
    check(Backend::Sqlite, 40);
}

#[test]
fn postgres_writer_matches_the_model() {
    check(Backend::Postgres, 40);
}
