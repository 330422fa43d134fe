//! Request validation through the real billing handlers: Deduct, Grant,
//! Reserve, CaptureHold, ReleaseHold, GetHold, Refund, ListTransactions,
//! Check and GetCreditCost messages decoded from arbitrary bytes, up to three
//! calls per input on a fresh account, against the batching writer and a
//! SQLite ledger. No input may produce INTERNAL (or any server-side code),
//! every error stays small, and the balance always equals the start plus the
//! ledger. An empty `hold_id` / zero `transaction_id` means "the one the
//! previous call of this input made", so the fuzzer reaches captures and
//! refunds of real holds and rows.
#![no_main]

use std::sync::{
    Arc, LazyLock,
    atomic::{AtomicI64, Ordering},
};

use auth_interceptor::{AuthContext, Caller, Role};
use billing_svc::{Billing, CostTable, ledger::Ledger};
use igny8_db::{Db, PoolConfig};
use igny8_proto::billing::v1::{self as pb, billing_service_server::BillingService};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::{Code, Request, Status};

struct World {
    runtime: tokio::runtime::Runtime,
    db: Db,
    billing: Billing,
    next_account: AtomicI64,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // A file on tmpfs when there is one: synchronous=FULL stays cheap there.
    let dir = ["/dev/shm", "/tmp"]
        .into_iter()
        .find(|d| std::path::Path::new(d).is_dir())
        .unwrap_or(".");
    let path = format!("{dir}/igny8-fuzz-{}.db", std::process::id());
    let _ = std::fs::remove_file(&path);
    let db = runtime.block_on(async {
        let db = Db::connect(
            &format!("sqlite://{path}"),
            &PoolConfig {
                max_connections: 1,
                ..Default::default()
            },
        )
        .await
        .expect("sqlite");
        db.migrate().await.expect("migrations");
        db
    });
    // The ledger writer's tasks live on this runtime.
    let _entered = runtime.enter();
    let billing = Billing::new(
        Arc::new(CostTable::builtin()),
        Ledger::new(db.clone()),
        b"fuzz page-token key, 32 bytes long",
    );
    World {
        runtime,
        db,
        billing,
        next_account: AtomicI64::new(1),
    }
});

const START_BALANCES: [i64; 4] = [0, 100, i64::MAX - 10, i64::MAX];

async fn sqlite(db: &Db) -> &sqlx::SqlitePool {
    match db {
        Db::Sqlite(pool) => pool,
        Db::Postgres(_) => unreachable!("the fuzz ledger is SQLite"),
    }
}

fn with_account<T>(message: T, account: i64) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(AuthContext {
        caller: Caller::User { id: 1 },
        role: Role::Owner,
        account_id: Some(account),
        acting_as: false,
    });
    request
}

/// What earlier calls of one input made, for later ones to name.
#[derive(Default)]
struct Made {
    hold: Option<String>,
    transaction: Option<i64>,
}

macro_rules! decode {
    ($ty:ty, $body:expr) => {
        match <$ty>::decode($body) {
            Ok(m) => m,
            Err(_) => return Ok(()),
        }
    };
}

/// Runs one call, remembering the hold or row it made.
async fn call(
    billing: &Billing,
    kind: u8,
    body: &[u8],
    account: i64,
    made: &mut Made,
) -> Result<(), Status> {
    let hold = |id: String, made: &Made| match id.is_empty() {
        true => made.hold.clone().unwrap_or_default(),
        false => id,
    };
    match kind % 10 {
        0 => {
            let m = decode!(pb::DeductRequest, body);
            let r = billing.deduct(with_account(m, account)).await?.into_inner();
            assert!(r.balance >= 0);
            made.transaction = r.transaction.map(|t| t.id);
        }
        1 => {
            let m = decode!(pb::GrantRequest, body);
            let r = billing.grant(with_account(m, account)).await?.into_inner();
            assert!(r.balance >= 0);
            made.transaction = r.transaction.map(|t| t.id);
        }
        2 => {
            let m = decode!(pb::ReserveRequest, body);
            let r = billing.reserve(with_account(m, account)).await?.into_inner();
            made.hold = r.hold.map(|h| h.id);
        }
        3 => {
            let mut m = decode!(pb::CaptureHoldRequest, body);
            m.hold_id = hold(m.hold_id, made);
            let r = billing.capture_hold(with_account(m, account)).await?.into_inner();
            assert!(r.balance >= 0);
            made.transaction = r.transaction.map(|t| t.id);
        }
        4 => {
            let mut m = decode!(pb::ReleaseHoldRequest, body);
            m.hold_id = hold(m.hold_id, made);
            billing.release_hold(with_account(m, account)).await?;
        }
        5 => {
            let mut m = decode!(pb::GetHoldRequest, body);
            m.hold_id = hold(m.hold_id, made);
            billing.get_hold(with_account(m, account)).await?;
        }
        6 => {
            let mut m = decode!(pb::RefundRequest, body);
            if m.transaction_id == 0 {
                m.transaction_id = made.transaction.unwrap_or_default();
            }
            let r = billing.refund(with_account(m, account)).await?.into_inner();
            assert!(r.balance >= 0);
        }
        7 => {
            let m = decode!(pb::ListTransactionsRequest, body);
            let r = billing.list_transactions(with_account(m, account)).await?;
            assert!(r.get_ref().encoded_len() <= billing_svc::service::MAX_PAGE_BYTES);
        }
        8 => {
            let m = decode!(pb::CheckRequest, body);
            billing.check(with_account(m, account)).await?;
        }
        _ => {
            let m = decode!(pb::GetCreditCostRequest, body);
            billing.get_credit_cost(with_account(m, account)).await?;
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let w = &*WORLD;
    let account = w.next_account.fetch_add(1, Ordering::Relaxed);
    let start = START_BALANCES[usize::from(head >> 6)];
    w.runtime.block_on(async {
        let pool = sqlite(&w.db).await;
        sqlx::query("INSERT INTO accounts (id, name, status, credits) VALUES ($1, 'fuzz', 'active', $2)")
            .bind(account)
            .bind(start)
            .execute(pool)
            .await
            .expect("seed account");
        // Up to three calls on the account, split on 0xFF 0xFE; each body's
        // first byte picks its RPC.
        let mut made = Made::default();
        for body in split(rest).into_iter().take(3) {
            let Some((&kind, body)) = body.split_first() else {
                continue;
            };
            match call(&w.billing, kind, body, account, &mut made).await {
                Ok(_) => {}
                Err(status) => {
                    assert!(
                        !matches!(
                            status.code(),
                            Code::Internal | Code::Unknown | Code::Unavailable | Code::DataLoss
                        ),
                        "server-side failure for caller input: {status:?}"
                    );
                    assert!(
                        status.message().len() + status.details().len() < 4096,
                        "error of {} + {} bytes",
                        status.message().len(),
                        status.details().len()
                    );
                }
            }
        }
        let (balance, sum): (i64, i64) = sqlx::query_as(
            "SELECT credits, (SELECT CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM credit_ledger WHERE account_id = $1) FROM accounts WHERE id = $1",
        )
        .bind(account)
        .fetch_one(pool)
        .await
        .expect("balance");
        assert!(balance >= 0);
        assert_eq!(i128::from(balance), i128::from(start) + i128::from(sum), "ledger adds up");
    });
});

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut from = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == 0xff && data[i + 1] == 0xfe {
            out.push(&data[from..i]);
            i += 2;
            from = i;
        } else {
            i += 1;
        }
    }
    out.push(&data[from..]);
    out
}
