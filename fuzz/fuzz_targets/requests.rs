//! Request validation through the real billing handlers: Deduct, Grant,
//! ListTransactions, Check and GetCreditCost messages decoded from arbitrary
//! bytes, against a SQLite ledger. No input may produce INTERNAL (or any
//! server-side code), every error stays small, and the ledger always adds
//! up. (Reserve/Capture/Release join when holds land: add them to `call`.)
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

/// Runs one call; `Ok(true)` when it may have changed the balance.
async fn call(billing: &Billing, kind: u8, body: &[u8], account: i64) -> Result<bool, Status> {
    match kind % 5 {
        0 => {
            let Ok(m) = pb::DeductRequest::decode(body) else {
                return Ok(false);
            };
            let r = billing.deduct(with_account(m, account)).await?.into_inner();
            assert!(r.balance >= 0);
            Ok(true)
        }
        1 => {
            let Ok(m) = pb::GrantRequest::decode(body) else {
                return Ok(false);
            };
            let r = billing.grant(with_account(m, account)).await?.into_inner();
            assert!(r.balance >= 0);
            Ok(true)
        }
        2 => {
            let Ok(m) = pb::ListTransactionsRequest::decode(body) else {
                return Ok(false);
            };
            let r = billing.list_transactions(with_account(m, account)).await?;
            assert!(r.get_ref().encoded_len() <= billing_svc::service::MAX_PAGE_BYTES);
            Ok(false)
        }
        3 => {
            let Ok(m) = pb::CheckRequest::decode(body) else {
                return Ok(false);
            };
            billing.check(with_account(m, account)).await?;
            Ok(false)
        }
        _ => {
            let Ok(m) = pb::GetCreditCostRequest::decode(body) else {
                return Ok(false);
            };
            billing.get_credit_cost(with_account(m, account)).await?;
            Ok(false)
        }
    }
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
        // Up to three calls on the account, split on 0xFF 0xFE.
        for (i, body) in split(rest).into_iter().take(3).enumerate() {
            let kind = head.wrapping_add(i as u8) & 0x3f;
            match call(&w.billing, kind, body, account).await {
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
