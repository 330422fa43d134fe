//! The scenarios: seeding, the callers that drive each RPC and check its
//! responses, and the exact balance verification after deducts.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use auth_interceptor::BearerInterceptor;
use futures::{StreamExt, stream};
use igny8_proto::{
    billing::v1::{
        DeductRequest, GetCreditCostRequest, billing_service_client::BillingServiceClient,
        deduct_request,
    },
    settings::v1::{CheckModuleRequest, Module, settings_service_client::SettingsServiceClient},
};
use igny8_tests::{TestDb, access_token};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::driver::{Caller, Outcome};

/// The account every `deduct-hot` caller charges.
pub const HOT_ACCOUNT: i64 = 1;
/// Its starting balance: more than any run can spend.
pub const HOT_CREDITS: i64 = 1_000_000_000_000;
/// How many accounts `deduct-spread` charges.
pub const SPREAD_ACCOUNTS: usize = 1_000;
/// The first of them (ids are consecutive).
pub const FIRST_SPREAD_ACCOUNT: i64 = 1_001;
/// Each one's starting balance.
pub const SPREAD_CREDITS: i64 = 1_000_000_000;
/// Editor `i` of the hot account has user id `HOT_EDITORS + i`.
const HOT_EDITORS: i64 = 1_000_000;
/// The editor of spread account `k` has user id `SPREAD_EDITORS + k`.
const SPREAD_EDITORS: i64 = 2_000_000;
/// Concurrent statements while seeding and verifying.
const DB_PARALLELISM: usize = 8;

type Billing = BillingServiceClient<InterceptedService<Channel, BearerInterceptor>>;
type Settings = SettingsServiceClient<InterceptedService<Channel, BearerInterceptor>>;

/// Seeds the hot account with one editor per caller. Callers of `cost` and
/// `check-module` act as these editors too.
pub async fn seed_hot(db: &TestDb, callers: usize) {
    db.account(HOT_ACCOUNT).credits(HOT_CREDITS).create().await;
    stream::iter(0..callers as i64)
        .for_each_concurrent(DB_PARALLELISM, |i| async move {
            db.user(HOT_EDITORS + i)
                .account(HOT_ACCOUNT)
                .role("editor")
                .create()
                .await
        })
        .await;
}

/// Seeds the 1,000 spread accounts, each with one editor.
pub async fn seed_spread(db: &TestDb) {
    stream::iter(0..SPREAD_ACCOUNTS as i64)
        .for_each_concurrent(DB_PARALLELISM, |k| async move {
            db.account(FIRST_SPREAD_ACCOUNT + k)
                .credits(SPREAD_CREDITS)
                .create()
                .await
        })
        .await;
    stream::iter(0..SPREAD_ACCOUNTS as i64)
        .for_each_concurrent(DB_PARALLELISM, |k| async move {
            db.user(SPREAD_EDITORS + k)
                .account(FIRST_SPREAD_ACCOUNT + k)
                .role("editor")
                .create()
                .await
        })
        .await;
}

/// The spread account ids, by account index.
pub fn spread_accounts() -> Vec<i64> {
    (0..SPREAD_ACCOUNTS as i64)
        .map(|k| FIRST_SPREAD_ACCOUNT + k)
        .collect()
}

/// Opens `n` separate HTTP/2 connections to `addr`.
pub async fn connect(addr: SocketAddr, n: usize) -> Result<Vec<Channel>, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad endpoint for {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        // Generous: a stuck server shows up as DEADLINE_EXCEEDED, not a hang.
        .timeout(Duration::from_secs(30));
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(
            endpoint
                .connect()
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?,
        );
    }
    Ok(channels)
}

/// The connection caller `i` uses.
fn channel_for(channels: &[Channel], i: usize, callers_per_connection: usize) -> Channel {
    channels[(i / callers_per_connection).min(channels.len() - 1)].clone()
}

fn bearer(user: i64, account: i64) -> BearerInterceptor {
    BearerInterceptor::new(access_token(user, Some(account))).expect("harness tokens are ASCII")
}

/// `baseline`: `grpc.health.v1.Health/Check` for the server as a whole.
pub struct BaselineCaller {
    client: HealthClient<Channel>,
}

/// One [`BaselineCaller`] per caller.
pub fn baseline_callers(channels: &[Channel], callers: usize, per: usize) -> Vec<BaselineCaller> {
    (0..callers)
        .map(|i| BaselineCaller {
            client: HealthClient::new(channel_for(channels, i, per)),
        })
        .collect()
}

impl Caller for BaselineCaller {
    async fn call(&mut self) -> Outcome {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        match self.client.check(request).await {
            Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => Outcome::ok(),
            Ok(r) => Outcome::invalid(format!(
                "health status {} (want SERVING)",
                r.get_ref().status
            )),
            Err(status) => Outcome::status(&status),
        }
    }
}

/// Who a deduct is charged to.
struct Target {
    /// Index into the scenario's account list, for verification.
    index: usize,
    /// The account the server must report on the ledger row.
    account: i64,
    /// An editor of that account.
    auth: BearerInterceptor,
}

/// `deduct-hot` and `deduct-spread`: `Deduct` of 1 credit with a unique
/// idempotency key, to one of `targets` picked at random (one target for
/// `deduct-hot`: this caller's own editor of the hot account).
pub struct DeductCaller {
    channel: Channel,
    targets: Arc<[Target]>,
    rng: u64,
    key_prefix: String,
    seq: u64,
}

/// `deduct-hot` callers: caller `i` is editor `i` of the hot account.
/// `run` makes idempotency keys unique across runs on one database.
pub fn deduct_hot_callers(
    channels: &[Channel],
    callers: usize,
    per: usize,
    run: usize,
) -> Vec<DeductCaller> {
    (0..callers)
        .map(|i| DeductCaller {
            channel: channel_for(channels, i, per),
            targets: Arc::new([Target {
                index: 0,
                account: HOT_ACCOUNT,
                auth: bearer(HOT_EDITORS + i as i64, HOT_ACCOUNT),
            }]),
            rng: seed(i),
            key_prefix: format!("bench-hot-{run}-{i}-"),
            seq: 0,
        })
        .collect()
}

/// `deduct-spread` callers: each call acts as the editor of a random one of
/// the 1,000 spread accounts. `run` makes idempotency keys unique across
/// runs on one database.
pub fn deduct_spread_callers(
    channels: &[Channel],
    callers: usize,
    per: usize,
    run: usize,
) -> Vec<DeductCaller> {
    let targets: Arc<[Target]> = spread_accounts()
        .into_iter()
        .enumerate()
        .map(|(index, account)| Target {
            index,
            account,
            auth: bearer(SPREAD_EDITORS + index as i64, account),
        })
        .collect();
    (0..callers)
        .map(|i| DeductCaller {
            channel: channel_for(channels, i, per),
            targets: targets.clone(),
            rng: seed(i),
            key_prefix: format!("bench-spread-{run}-{i}-"),
            seq: 0,
        })
        .collect()
}

/// A distinct non-zero xorshift state per caller.
fn seed(i: usize) -> u64 {
    (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

impl DeductCaller {
    fn next_target(&mut self) -> &Target {
        // xorshift64: cheap, uniform enough, reproducible per caller.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        &self.targets[(self.rng % self.targets.len() as u64) as usize]
    }
}

impl Caller for DeductCaller {
    async fn call(&mut self) -> Outcome {
        self.deduct(deduct_request::Cost::Credits(1), "").await
    }
}

impl DeductCaller {
    /// One `Deduct` of `cost` (which must price at 1 credit) under a fresh
    /// key; `operation` is the canonical operation the row must name.
    async fn deduct(&mut self, cost: deduct_request::Cost, operation: &str) -> Outcome {
        self.seq += 1;
        let request = DeductRequest {
            cost: Some(cost),
            idempotency_key: format!("{}{}", self.key_prefix, self.seq),
            description: "igny8-bench".to_owned(),
            ..Default::default()
        };
        let channel = self.channel.clone();
        let target = self.next_target();
        let (index, account) = (target.index, target.account);
        let mut client: Billing =
            BillingServiceClient::with_interceptor(channel, target.auth.clone());
        let response = match client.deduct(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Outcome::status(&status),
        };
        if response.replayed {
            return Outcome::invalid("a fresh idempotency key was replayed".to_owned());
        }
        // Not a replay: the server charged the account, whatever else is wrong.
        let outcome = match &response.transaction {
            None => Outcome::invalid("Deduct returned no transaction".to_owned()),
            Some(t) if t.account_id != account => Outcome::invalid(format!(
                "charged account {} instead of {account}",
                t.account_id
            )),
            Some(t) if t.credits != -1 => {
                Outcome::invalid(format!("ledger delta {} instead of -1", t.credits))
            }
            Some(t) if t.operation != operation => Outcome::invalid(format!(
                "ledger operation {:?} instead of {operation:?}",
                t.operation
            )),
            Some(t) if t.balance_after != response.balance || response.balance < 0 => {
                Outcome::invalid(format!(
                    "balance {} / balance_after {}",
                    response.balance, t.balance_after
                ))
            }
            Some(_) => Outcome::ok(),
        };
        outcome.charged(index)
    }
}

/// The account `deduct-module` charges: its own, so that its balance is
/// verified independently of `deduct-hot`.
pub const MODULES_ACCOUNT: i64 = 2;
/// Editor `i` of the modules account has user id `MODULES_EDITORS + i`.
const MODULES_EDITORS: i64 = 3_000_000;

/// Seeds the modules account (balance [`HOT_CREDITS`]) with one editor per
/// caller.
pub async fn seed_modules(db: &TestDb, callers: usize) {
    db.account(MODULES_ACCOUNT)
        .credits(HOT_CREDITS)
        .create()
        .await;
    stream::iter(0..callers as i64)
        .for_each_concurrent(DB_PARALLELISM, |i| async move {
            db.user(MODULES_EDITORS + i)
                .account(MODULES_ACCOUNT)
                .role("editor")
                .create()
                .await
        })
        .await;
}

/// `deduct-module`: `deduct-hot` priced by usage — `content_generation`
/// of 100 words, 1 credit — on a billing server that asks settings-svc
/// whether the writer module is on before charging (docs/api.md "Module-aware charging"). Compared
/// with `deduct-hot` (raw credits, no module check), it shows what module
/// checks cost.
pub struct ModuleDeductCaller(DeductCaller);

/// `deduct-module` callers: caller `i` is editor `i` of the modules account.
/// `run` makes idempotency keys unique across runs on one database.
pub fn deduct_module_callers(
    channels: &[Channel],
    callers: usize,
    per: usize,
    run: usize,
) -> Vec<ModuleDeductCaller> {
    (0..callers)
        .map(|i| {
            ModuleDeductCaller(DeductCaller {
                channel: channel_for(channels, i, per),
                targets: Arc::new([Target {
                    index: 0,
                    account: MODULES_ACCOUNT,
                    auth: bearer(MODULES_EDITORS + i as i64, MODULES_ACCOUNT),
                }]),
                rng: seed(i),
                key_prefix: format!("bench-modules-{run}-{i}-"),
                seq: 0,
            })
        })
        .collect()
}

impl Caller for ModuleDeductCaller {
    async fn call(&mut self) -> Outcome {
        let usage = deduct_request::Cost::Usage(igny8_proto::billing::v1::Usage {
            operation: "content_generation".to_owned(),
            quantity: 100,
        });
        self.0.deduct(usage, "content_generation").await
    }
}

/// (operation as sent, quantity, canonical operation, credits) — aliases
/// and word pricing included so the whole lookup path runs.
const PRICES: [(&str, u64, &str, i64); 5] = [
    ("clustering", 1, "clustering", 10),
    ("ideas", 2, "idea_generation", 30),
    ("content", 250, "content_generation", 2),
    ("optimization", 1000, "optimization", 5),
    ("images", 4, "image_generation", 20),
];

/// `cost`: `GetCreditCost` over a rotation of operations, each answer
/// checked against the built-in cost table.
pub struct CostCaller {
    client: Billing,
    next: usize,
}

/// `cost` callers: caller `i` is editor `i` of the hot account.
pub fn cost_callers(channels: &[Channel], callers: usize, per: usize) -> Vec<CostCaller> {
    (0..callers)
        .map(|i| CostCaller {
            client: BillingServiceClient::with_interceptor(
                channel_for(channels, i, per),
                bearer(HOT_EDITORS + i as i64, HOT_ACCOUNT),
            ),
            next: i,
        })
        .collect()
}

impl Caller for CostCaller {
    async fn call(&mut self) -> Outcome {
        let (operation, quantity, canonical, credits) = PRICES[self.next % PRICES.len()];
        self.next += 1;
        let request = GetCreditCostRequest {
            operation: operation.to_owned(),
            quantity,
        };
        match self.client.get_credit_cost(request).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.operation == canonical && r.credits == credits {
                    Outcome::ok()
                } else {
                    Outcome::invalid(format!(
                        "{operation} × {quantity}: got {} credits for {}, want {credits} for {canonical}",
                        r.credits, r.operation
                    ))
                }
            }
            Err(status) => Outcome::status(&status),
        }
    }
}

/// `check-module`: `CheckModule` over the eight modules, each answer
/// checked (every module is enabled on a new account).
pub struct CheckModuleCaller {
    client: Settings,
    next: usize,
}

/// `check-module` callers: caller `i` is editor `i` of the hot account.
pub fn check_module_callers(
    channels: &[Channel],
    callers: usize,
    per: usize,
) -> Vec<CheckModuleCaller> {
    (0..callers)
        .map(|i| CheckModuleCaller {
            client: SettingsServiceClient::with_interceptor(
                channel_for(channels, i, per),
                bearer(HOT_EDITORS + i as i64, HOT_ACCOUNT),
            ),
            next: i,
        })
        .collect()
}

impl Caller for CheckModuleCaller {
    async fn call(&mut self) -> Outcome {
        // Modules 1..=8; 0 is MODULE_UNSPECIFIED.
        let module = (self.next % 8) as i32 + 1;
        self.next += 1;
        match self
            .client
            .check_module(CheckModuleRequest { module })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                if r.module == module && r.enabled {
                    Outcome::ok()
                } else {
                    Outcome::invalid(format!(
                        "{:?}: got module {} enabled={}",
                        Module::try_from(module).unwrap_or(Module::Unspecified),
                        r.module,
                        r.enabled
                    ))
                }
            }
            Err(status) => Outcome::status(&status),
        }
    }
}

/// The result of checking balances and ledger after a deduct scenario.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verification {
    /// Every account matched exactly.
    pub passed: bool,
    /// Accounts checked.
    pub accounts: usize,
    /// Deducts the server acknowledged (warm-up included).
    pub successful_deducts: u64,
    /// A one-line account of what was checked, or the first mismatches.
    pub detail: String,
}

/// For each account: `start − acknowledged deducts == balance`,
/// `balance == start + sum(ledger)` and one ledger row per deduct.
pub async fn verify(db: &TestDb, accounts: &[i64], start: i64, charged: &[u64]) -> Verification {
    let rows: Vec<(i64, u64, i64, i64, i64)> = stream::iter(accounts.iter().zip(charged))
        .map(|(&account, &deducts)| async move {
            let balance = db.balance(account).await;
            let (ledger_sum, ledger_rows) = db.ledger_sum(account).await;
            (account, deducts, balance, ledger_sum, ledger_rows)
        })
        .buffered(DB_PARALLELISM)
        .collect()
        .await;
    let successful_deducts: u64 = charged.iter().sum();
    let mut mismatches = Vec::new();
    for (account, deducts, balance, ledger_sum, ledger_rows) in rows {
        let expected = start - deducts as i64;
        if balance != expected || balance != start + ledger_sum || ledger_rows != deducts as i64 {
            mismatches.push(format!(
                "account {account}: balance {balance}, expected {start} − {deducts} = {expected}; \
                 start + ledger sum = {}; {ledger_rows} ledger rows for {deducts} deducts",
                start + ledger_sum
            ));
        }
    }
    let detail = if mismatches.is_empty() {
        format!(
            "{} account(s): balance == start − {successful_deducts} acknowledged deducts == start + sum(ledger), one ledger row each",
            accounts.len()
        )
    } else {
        let shown = mismatches.len().min(5);
        format!(
            "{} of {} account(s) wrong: {}{}",
            mismatches.len(),
            accounts.len(),
            mismatches[..shown].join("; "),
            if mismatches.len() > shown {
                "; ..."
            } else {
                ""
            }
        )
    };
    Verification {
        passed: mismatches.is_empty(),
        accounts: accounts.len(),
        successful_deducts,
        detail,
    }
}
