//! `igny8.billing.v1.BillingService`: validate, price, hand to the ledger.
//!
//! Handlers never read an account from a message: the account comes from the
//! [`AuthContext`] the auth layer attached. Every validation happens before
//! any write, so a rejected request changes nothing.

use std::{collections::BTreeMap, sync::Arc};

use auth_interceptor::{AuthContext, Recheck};
use igny8_proto::billing::v1::{
    self as pb, billing_service_server::BillingService, capture_hold_request, check_request,
    deduct_request, reserve_request,
};
use serde::Serialize;
use service_kit::{
    ChangeHub, StreamEnv,
    streams::{self, WatchStream},
};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::{
    costs::{CostTable, PriceError},
    error::BillingError,
    ledger::{Entry, HoldRow, Kind, Ledger, LedgerRow, micros},
    page_token::PageTokens,
    watch::{self, WatchedBalance},
    writer::{CaptureAmount, Done, NewHold, NewRefund, Op},
};

/// Largest raw credit amount accepted in one call (Check, Deduct, Grant).
pub const MAX_CREDITS: i64 = 1_000_000_000_000;
/// Longest idempotency key.
pub const MAX_KEY_LEN: usize = 128;
/// Longest description or reason.
pub const MAX_TEXT_LEN: usize = 512;
/// Most metadata entries on a deduction.
pub const MAX_METADATA_ENTRIES: usize = 16;
/// Longest metadata key.
pub const MAX_METADATA_KEY_LEN: usize = 64;
/// Longest metadata value.
pub const MAX_METADATA_VALUE_LEN: usize = 256;
/// A hold's lifetime when none is asked for.
pub const DEFAULT_HOLD_TTL: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// Shortest hold lifetime.
pub const MIN_HOLD_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest hold lifetime.
pub const MAX_HOLD_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);
/// Longest hold id accepted (ids are 37 characters).
const MAX_HOLD_ID_LEN: usize = 64;
/// `ListTransactions` page size when none is asked for.
pub const DEFAULT_PAGE_SIZE: i32 = 50;
/// Largest `ListTransactions` page.
pub const MAX_PAGE_SIZE: i32 = 1000;
/// Largest encoded `ListTransactions` response: what a default gRPC client
/// accepts (4 MiB). A page that would grow past it ends early, with a
/// `next_page_token`, whatever `page_size` asked for.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// The billing service.
#[derive(Debug, Clone)]
pub struct Billing {
    table: Arc<CostTable>,
    ledger: Ledger,
    tokens: PageTokens,
    /// Balance changes of this process (and, on PostgreSQL, every replica).
    changes: ChangeHub,
    streams: StreamEnv,
    modules: Option<crate::modules::ModuleGate>,
}

/// A cost as asked for: by usage or as raw credits.
enum CostSpec {
    Usage(pb::Usage),
    Credits(i64),
}

impl From<check_request::Cost> for CostSpec {
    fn from(c: check_request::Cost) -> Self {
        match c {
            check_request::Cost::Usage(u) => CostSpec::Usage(u),
            check_request::Cost::Credits(n) => CostSpec::Credits(n),
        }
    }
}

impl From<reserve_request::Cost> for CostSpec {
    fn from(c: reserve_request::Cost) -> Self {
        match c {
            reserve_request::Cost::Usage(u) => CostSpec::Usage(u),
            reserve_request::Cost::Credits(n) => CostSpec::Credits(n),
        }
    }
}

impl From<capture_hold_request::Amount> for CostSpec {
    fn from(c: capture_hold_request::Amount) -> Self {
        match c {
            capture_hold_request::Amount::Usage(u) => CostSpec::Usage(u),
            capture_hold_request::Amount::Credits(n) => CostSpec::Credits(n),
        }
    }
}

impl From<deduct_request::Cost> for CostSpec {
    fn from(c: deduct_request::Cost) -> Self {
        match c {
            deduct_request::Cost::Usage(u) => CostSpec::Usage(u),
            deduct_request::Cost::Credits(n) => CostSpec::Credits(n),
        }
    }
}

/// A priced cost.
struct Priced {
    credits: i64,
    operation: String,
    quantity: u64,
}

/// The parts of a request that make it "the same request" for idempotency.
#[derive(Serialize)]
struct Fingerprint<'a> {
    kind: &'static str,
    credits: Option<i64>,
    operation: &'a str,
    quantity: u64,
    description: &'a str,
    metadata: &'a BTreeMap<String, String>,
    /// Reserve only: the hold's lifetime in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u128>,
    /// Refund only: the row refunded.
    #[serde(skip_serializing_if = "Option::is_none")]
    refund_of: Option<i64>,
}

impl Fingerprint<'_> {
    fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("fingerprints serialize");
        Sha256::digest(json)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The request fingerprint of a grant of `credits` for `reason`: what tells
/// a retried grant (replayed) from a reused idempotency key (refused). Public
/// so that every writer of grants (the `Grant` RPC, the operator CLI) agrees.
pub fn grant_fingerprint(credits: i64, reason: &str) -> String {
    Fingerprint {
        kind: "grant",
        credits: Some(credits),
        operation: "",
        quantity: 0,
        description: reason,
        metadata: &BTreeMap::new(),
        ttl_ms: None,
        refund_of: None,
    }
    .hash()
}

impl Billing {
    /// A service over this table and ledger; page tokens are keyed with
    /// `page_token_key`.
    pub fn new(table: Arc<CostTable>, ledger: Ledger, page_token_key: &[u8]) -> Self {
        let changes = ChangeHub::new();
        watch::notify_commits(ledger.writer(), &changes);
        Self {
            table,
            ledger,
            tokens: PageTokens::new(page_token_key),
            changes,
            streams: StreamEnv::detached(),
            modules: None,
        }
    }

    /// Refuses usage charges of disabled modules, asking `gate`; `None` =
    /// module checks off.
    pub fn with_modules(mut self, gate: Option<crate::modules::ModuleGate>) -> Self {
        self.modules = gate;
        self
    }

    /// docs/api.md "Module-aware charging": a usage charge (not raw credits) of a disabled module is
    /// refused. Called after every other validation, before any write. A
    /// retry of a request already recorded under `key` goes on to the
    /// writer, which replays it: a module switched off later does not turn
    /// "you were charged" into an error.
    async fn check_module(
        &self,
        account: i64,
        priced: &Priced,
        hold: bool,
        key: &str,
    ) -> Result<(), BillingError> {
        let Some(gate) = &self.modules else {
            return Ok(());
        };
        if priced.operation.is_empty() {
            return Ok(());
        }
        match gate.check(account, &priced.operation).await {
            Err(refused) if self.ledger.key_used(account, hold, key).await? => {
                tracing::debug!(account, %refused, "a retry of a recorded request: replaying");
                Ok(())
            }
            other => other,
        }
    }

    /// Balance streams use `changes` (fed by the ledger writer's commits
    /// here, and by other replicas when it listens on PostgreSQL), end when
    /// this server drains and re-check access as `streams` says.
    pub fn with_streams(mut self, changes: ChangeHub, streams: StreamEnv) -> Self {
        watch::notify_commits(self.ledger.writer(), &changes);
        self.changes = changes;
        self.streams = streams;
        self
    }

    /// The ledger this service writes through.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    fn now_us(&self) -> i64 {
        micros(self.ledger.now())
    }

    fn price(&self, cost: Option<CostSpec>, prefix: &str) -> Result<Priced, BillingError> {
        match cost {
            None => Err(BillingError::field(
                "cost",
                "set either `usage` {operation, quantity} or `credits`",
            )),
            Some(CostSpec::Credits(credits)) => {
                if !(1..=MAX_CREDITS).contains(&credits) {
                    return Err(BillingError::field(
                        "credits",
                        format!("must be from 1 to {MAX_CREDITS}, got {credits}"),
                    ));
                }
                Ok(Priced {
                    credits,
                    operation: String::new(),
                    quantity: 0,
                })
            }
            Some(CostSpec::Usage(usage)) => {
                let price = price_usage(&self.table, &usage.operation, usage.quantity, prefix)?;
                Ok(Priced {
                    credits: price.credits,
                    operation: price.cost.operation.clone(),
                    quantity: price.quantity,
                })
            }
        }
    }
}

fn price_usage<'t>(
    table: &'t CostTable,
    operation: &str,
    quantity: u64,
    prefix: &str,
) -> Result<crate::costs::Price<'t>, BillingError> {
    if operation.trim().is_empty() {
        let known: Vec<_> = table.rows().iter().map(|r| r.operation.as_str()).collect();
        return Err(BillingError::field(
            format!("{prefix}operation"),
            format!("required; one of: {}", known.join(", ")),
        ));
    }
    table
        .price(operation, quantity)
        .map_err(|source| BillingError::Price {
            field: match (&source, prefix.is_empty()) {
                (PriceError::UnknownOperation { .. }, true) => "operation",
                (PriceError::UnknownOperation { .. }, false) => "usage.operation",
                (PriceError::QuantityTooLarge(_), true) => "quantity",
                (PriceError::QuantityTooLarge(_), false) => "usage.quantity",
            },
            source,
        })
}

fn check_key(key: &str) -> Result<(), BillingError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err(BillingError::field(
            "idempotency_key",
            format!("required: 1 to {MAX_KEY_LEN} printable ASCII characters"),
        ));
    }
    Ok(())
}

fn check_text(field: &str, text: &str, required: bool) -> Result<(), BillingError> {
    if required && text.trim().is_empty() {
        return Err(BillingError::field(field, "required"));
    }
    if text.chars().count() > MAX_TEXT_LEN {
        return Err(BillingError::field(
            field,
            format!("at most {MAX_TEXT_LEN} characters"),
        ));
    }
    if let Some(at) = text.find('\0') {
        // PostgreSQL text cannot hold U+0000: refuse it here, for both
        // backends alike, rather than fail in the database.
        return Err(BillingError::field(
            field,
            format!("must not contain the NUL character (U+0000); found at byte {at}"),
        ));
    }
    Ok(())
}

fn check_metadata(
    metadata: std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, BillingError> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(BillingError::field(
            "metadata",
            format!(
                "at most {MAX_METADATA_ENTRIES} entries, got {}",
                metadata.len()
            ),
        ));
    }
    for (k, v) in &metadata {
        if k.is_empty() || k.chars().count() > MAX_METADATA_KEY_LEN {
            return Err(BillingError::field(
                "metadata",
                format!("keys must be 1 to {MAX_METADATA_KEY_LEN} characters"),
            ));
        }
        if v.chars().count() > MAX_METADATA_VALUE_LEN {
            return Err(BillingError::field(
                format!("metadata[{k}]"),
                format!("values must be at most {MAX_METADATA_VALUE_LEN} characters"),
            ));
        }
    }
    Ok(metadata.into_iter().collect())
}

/// The leading rows whose encoded page stays within [`MAX_PAGE_BYTES`]
/// (always at least one), and the id of the last one kept. Sets `more` when
/// rows were left for the next page.
fn within_bytes(rows: Vec<LedgerRow>, more: &mut bool) -> (Vec<pb::Transaction>, Option<i64>) {
    use prost::Message;
    // Room for `next_page_token` (a 43-character token and its framing).
    let budget = MAX_PAGE_BYTES - 64;
    let mut used = 0;
    let mut out = Vec::with_capacity(rows.len());
    let mut last_id = None;
    for row in rows {
        let id = row.id;
        let t = transaction(row);
        let len = t.encoded_len();
        let framed = 1 + prost::length_delimiter_len(len) + len;
        if used + framed > budget && !out.is_empty() {
            *more = true;
            break;
        }
        used += framed;
        last_id = Some(id);
        out.push(t);
    }
    (out, last_id)
}

fn check_ttl(ttl: Option<prost_types::Duration>) -> Result<std::time::Duration, BillingError> {
    let Some(ttl) = ttl else {
        return Ok(DEFAULT_HOLD_TTL);
    };
    let invalid = || {
        BillingError::field(
            "ttl",
            format!(
                "must be from {}s to {}s, got {}s {}ns",
                MIN_HOLD_TTL.as_secs(),
                MAX_HOLD_TTL.as_secs(),
                ttl.seconds,
                ttl.nanos
            ),
        )
    };
    let (Ok(secs), Ok(nanos)) = (u64::try_from(ttl.seconds), u32::try_from(ttl.nanos)) else {
        return Err(invalid());
    };
    if nanos >= 1_000_000_000 {
        return Err(invalid());
    }
    let ttl = std::time::Duration::new(secs, nanos);
    if !(MIN_HOLD_TTL..=MAX_HOLD_TTL).contains(&ttl) {
        return Err(invalid());
    }
    Ok(ttl)
}

fn check_hold_id(id: &str) -> Result<(), BillingError> {
    if id.trim().is_empty() {
        return Err(BillingError::field(
            "hold_id",
            "required: the id Reserve returned",
        ));
    }
    if id.chars().count() > MAX_HOLD_ID_LEN {
        return Err(BillingError::HoldNotFound(crate::error::truncate(
            id,
            MAX_HOLD_ID_LEN,
        )));
    }
    Ok(())
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or_default(),
    }
}

fn timestamp_us(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1000).unwrap_or_default(),
    }
}

/// A hold as the API shows it, with its state as of `now_us`.
pub fn hold(row: HoldRow, now_us: i64) -> pb::Hold {
    let state = match row.state_at(now_us) {
        crate::ledger::HoldState::Active => pb::HoldState::Active,
        crate::ledger::HoldState::Captured => pb::HoldState::Captured,
        crate::ledger::HoldState::Released => pb::HoldState::Released,
        crate::ledger::HoldState::Expired => pb::HoldState::Expired,
    };
    pb::Hold {
        id: row.id,
        account_id: row.account_id,
        state: state as i32,
        credits: row.credits,
        captured_credits: row.captured_credits,
        operation: row.operation,
        quantity: u64::try_from(row.quantity).unwrap_or_default(),
        description: row.description,
        metadata: serde_json::from_str(&row.metadata).unwrap_or_default(),
        idempotency_key: row.idempotency_key,
        create_time: Some(timestamp(row.created_at)),
        expire_time: Some(timestamp_us(row.expires_at_us)),
        transaction_id: row.transaction_id.unwrap_or_default(),
    }
}

/// The writer answered a request with the wrong kind of result: a bug.
fn unexpected(done: &Done) -> Status {
    tracing::error!(
        ?done,
        "the ledger writer answered with the wrong kind of result"
    );
    Status::internal("the ledger answered unexpectedly")
}

/// A ledger row as the API shows it.
pub fn transaction(row: LedgerRow) -> pb::Transaction {
    let kind = match row.kind.as_str() {
        "deduct" => pb::TransactionKind::Deduct,
        "grant" => pb::TransactionKind::Grant,
        "capture" => pb::TransactionKind::Capture,
        "refund" => pb::TransactionKind::Refund,
        _ => pb::TransactionKind::Unspecified,
    };
    let metadata = serde_json::from_str(&row.metadata).unwrap_or_default();
    pb::Transaction {
        id: row.id,
        account_id: row.account_id,
        kind: kind as i32,
        credits: row.credits,
        balance_after: row.balance_after,
        operation: row.operation,
        quantity: u64::try_from(row.quantity).unwrap_or_default(),
        description: row.description,
        metadata,
        idempotency_key: row.idempotency_key,
        actor: row.actor,
        create_time: Some(timestamp(row.created_at)),
        hold_id: row.hold_id.unwrap_or_default(),
        refund_of: row.refund_of.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl BillingService for Billing {
    async fn get_credit_cost(
        &self,
        request: Request<pb::GetCreditCostRequest>,
    ) -> Result<Response<pb::GetCreditCostResponse>, Status> {
        let r = request.into_inner();
        let price = price_usage(&self.table, &r.operation, r.quantity, "")?;
        Ok(Response::new(pb::GetCreditCostResponse {
            operation: price.cost.operation.clone(),
            credits: price.credits,
            unit: price.cost.unit.clone(),
            base_credits: price.cost.credits,
            quantity: price.quantity,
        }))
    }

    async fn list_credit_costs(
        &self,
        _request: Request<pb::ListCreditCostsRequest>,
    ) -> Result<Response<pb::ListCreditCostsResponse>, Status> {
        let costs = self
            .table
            .rows()
            .iter()
            .map(|row| pb::CreditCost {
                operation: row.operation.clone(),
                aliases: row.aliases.clone(),
                credits: row.credits,
                unit: row.unit.clone(),
                unit_size: row.unit_size,
                module: row.module.clone(),
            })
            .collect();
        Ok(Response::new(pb::ListCreditCostsResponse { costs }))
    }

    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let account = AuthContext::of(&request)?.account()?;
        let priced = self.price(request.into_inner().cost.map(CostSpec::from), "usage.")?;
        let available = self.ledger.balance(account).await?.available();
        Ok(Response::new(pb::CheckResponse {
            sufficient: available >= priced.credits,
            required_credits: priced.credits,
            available_credits: available,
        }))
    }

    async fn deduct(
        &self,
        request: Request<pb::DeductRequest>,
    ) -> Result<Response<pb::DeductResponse>, Status> {
        let ctx = AuthContext::of(&request)?;
        let (account, actor) = (ctx.account()?, ctx.actor());
        let r = request.into_inner();
        check_key(&r.idempotency_key)?;
        let priced = self.price(r.cost.map(CostSpec::from), "usage.")?;
        check_text("description", &r.description, false)?;
        let metadata = check_metadata(r.metadata)?;
        self.check_module(account, &priced, false, &r.idempotency_key)
            .await?;
        let request_hash = Fingerprint {
            kind: "deduct",
            credits: priced.operation.is_empty().then_some(priced.credits),
            operation: &priced.operation,
            quantity: priced.quantity,
            description: &r.description,
            metadata: &metadata,
            ttl_ms: None,
            refund_of: None,
        }
        .hash();
        let applied = self
            .ledger
            .apply(
                account,
                &Entry {
                    kind: Kind::Deduct,
                    credits: -priced.credits,
                    operation: priced.operation,
                    quantity: priced.quantity,
                    description: r.description,
                    metadata,
                    idempotency_key: r.idempotency_key,
                    request_hash,
                    actor,
                },
            )
            .await?;
        tracing::debug!(account, replayed = applied.replayed, "deducted");
        Ok(Response::new(pb::DeductResponse {
            balance: applied.row.balance_after,
            transaction: Some(transaction(applied.row)),
            replayed: applied.replayed,
        }))
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let account = AuthContext::of(&request)?.account()?;
        let balance = self.ledger.balance(account).await?;
        Ok(Response::new(pb::GetBalanceResponse {
            account_id: account,
            balance: balance.balance,
            held: balance.held,
            available: balance.available(),
        }))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let account = AuthContext::of(&request)?.account()?;
        let r = request.into_inner();
        let page_size = match r.page_size {
            n if n < 0 => {
                return Err(BillingError::field("page_size", "must not be negative").into());
            }
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let before = match r.page_token.as_str() {
            "" => None,
            token => Some(self.tokens.open(account, token).ok_or_else(|| {
                BillingError::field(
                    "page_token",
                    "not a page token issued for this account; start again with an empty token",
                )
            })?),
        };
        let mut rows = self
            .ledger
            .page(account, before, i64::from(page_size) + 1)
            .await?;
        let mut more = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let (transactions, last_id) = within_bytes(rows, &mut more);
        let next_page_token = match last_id {
            Some(last) if more => self.tokens.issue(account, last),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListTransactionsResponse {
            transactions,
            next_page_token,
        }))
    }

    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::GrantResponse>, Status> {
        let ctx = AuthContext::of(&request)?;
        let (account, actor) = (ctx.account()?, ctx.actor());
        let r = request.into_inner();
        if !(1..=MAX_CREDITS).contains(&r.credits) {
            return Err(BillingError::field(
                "credits",
                format!("must be from 1 to {MAX_CREDITS}, got {}", r.credits),
            )
            .into());
        }
        check_key(&r.idempotency_key)?;
        check_text("reason", &r.reason, false)?;
        let request_hash = grant_fingerprint(r.credits, &r.reason);
        let applied = self
            .ledger
            .apply(
                account,
                &Entry {
                    kind: Kind::Grant,
                    credits: r.credits,
                    operation: String::new(),
                    quantity: 0,
                    description: r.reason,
                    metadata: BTreeMap::new(),
                    idempotency_key: r.idempotency_key,
                    request_hash,
                    actor,
                },
            )
            .await?;
        tracing::info!(
            account,
            credits = applied.row.credits,
            replayed = applied.replayed,
            "granted"
        );
        Ok(Response::new(pb::GrantResponse {
            balance: applied.row.balance_after,
            transaction: Some(transaction(applied.row)),
            replayed: applied.replayed,
        }))
    }

    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let ctx = AuthContext::of(&request)?;
        let (account, actor) = (ctx.account()?, ctx.actor());
        let r = request.into_inner();
        check_key(&r.idempotency_key)?;
        let priced = self.price(r.cost.map(CostSpec::from), "usage.")?;
        let ttl = check_ttl(r.ttl)?;
        check_text("description", &r.description, false)?;
        let metadata = check_metadata(r.metadata)?;
        self.check_module(account, &priced, true, &r.idempotency_key)
            .await?;
        let request_hash = Fingerprint {
            kind: "reserve",
            credits: priced.operation.is_empty().then_some(priced.credits),
            operation: &priced.operation,
            quantity: priced.quantity,
            description: &r.description,
            metadata: &metadata,
            ttl_ms: Some(ttl.as_millis()),
            refund_of: None,
        }
        .hash();
        let op = Op::Reserve(NewHold {
            credits: priced.credits,
            operation: priced.operation,
            quantity: priced.quantity,
            description: r.description,
            metadata,
            idempotency_key: r.idempotency_key,
            request_hash,
            actor,
            ttl,
        });
        match self.ledger.writer().submit(account, op).await? {
            Done::Reserved {
                hold: row,
                available,
                replayed,
            } => {
                tracing::debug!(account, replayed, "reserved");
                Ok(Response::new(pb::ReserveResponse {
                    hold: Some(hold(row, self.now_us())),
                    available,
                    replayed,
                }))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn capture_hold(
        &self,
        request: Request<pb::CaptureHoldRequest>,
    ) -> Result<Response<pb::CaptureHoldResponse>, Status> {
        let ctx = AuthContext::of(&request)?;
        let (account, actor) = (ctx.account()?, ctx.actor());
        let r = request.into_inner();
        check_hold_id(&r.hold_id)?;
        let amount = match r.amount {
            None => None,
            Some(amount) => {
                let priced = self.price(Some(CostSpec::from(amount)), "usage.")?;
                Some(CaptureAmount {
                    credits: priced.credits,
                    operation: (!priced.operation.is_empty()).then_some(priced.operation),
                    quantity: priced.quantity,
                })
            }
        };
        let op = Op::Capture {
            hold_id: r.hold_id,
            amount,
            actor,
        };
        match self.ledger.writer().submit(account, op).await? {
            Done::Captured {
                hold: h,
                row,
                replayed,
            } => {
                tracing::debug!(account, replayed, "captured");
                Ok(Response::new(pb::CaptureHoldResponse {
                    hold: Some(hold(h, self.now_us())),
                    balance: row.balance_after,
                    transaction: Some(transaction(row)),
                    replayed,
                }))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn release_hold(
        &self,
        request: Request<pb::ReleaseHoldRequest>,
    ) -> Result<Response<pb::ReleaseHoldResponse>, Status> {
        let account = AuthContext::of(&request)?.account()?;
        let r = request.into_inner();
        check_hold_id(&r.hold_id)?;
        let op = Op::Release { hold_id: r.hold_id };
        match self.ledger.writer().submit(account, op).await? {
            Done::Released { hold: h, replayed } => Ok(Response::new(pb::ReleaseHoldResponse {
                hold: Some(hold(h, self.now_us())),
                replayed,
            })),
            other => Err(unexpected(&other)),
        }
    }

    async fn get_hold(
        &self,
        request: Request<pb::GetHoldRequest>,
    ) -> Result<Response<pb::GetHoldResponse>, Status> {
        let account = AuthContext::of(&request)?.account()?;
        let r = request.into_inner();
        check_hold_id(&r.hold_id)?;
        let row = self.ledger.hold(account, &r.hold_id).await?;
        Ok(Response::new(pb::GetHoldResponse {
            hold: Some(hold(row, self.now_us())),
        }))
    }

    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::RefundResponse>, Status> {
        let ctx = AuthContext::of(&request)?;
        let (account, actor) = (ctx.account()?, ctx.actor());
        let r = request.into_inner();
        if r.transaction_id <= 0 {
            return Err(BillingError::field(
                "transaction_id",
                "required: the id of a DEDUCT or CAPTURE transaction of this account",
            )
            .into());
        }
        if !(0..=MAX_CREDITS).contains(&r.credits) {
            return Err(BillingError::field(
                "credits",
                format!(
                    "must be from 0 (everything left) to {MAX_CREDITS}, got {}",
                    r.credits
                ),
            )
            .into());
        }
        check_key(&r.idempotency_key)?;
        check_text("reason", &r.reason, false)?;
        let request_hash = Fingerprint {
            kind: "refund",
            credits: Some(r.credits),
            operation: "",
            quantity: 0,
            description: &r.reason,
            metadata: &BTreeMap::new(),
            ttl_ms: None,
            refund_of: Some(r.transaction_id),
        }
        .hash();
        let op = Op::Refund(NewRefund {
            transaction_id: r.transaction_id,
            credits: r.credits,
            idempotency_key: r.idempotency_key,
            request_hash,
            reason: r.reason,
            actor,
        });
        match self.ledger.writer().submit(account, op).await? {
            Done::Row { row, replayed } => {
                tracing::info!(account, credits = row.credits, replayed, "refunded");
                Ok(Response::new(pb::RefundResponse {
                    balance: row.balance_after,
                    transaction: Some(transaction(row)),
                    replayed,
                }))
            }
            other => Err(unexpected(&other)),
        }
    }

    type WatchBalanceStream = WatchStream<pb::WatchBalanceResponse>;

    async fn watch_balance(
        &self,
        request: Request<pb::WatchBalanceRequest>,
    ) -> Result<Response<Self::WatchBalanceStream>, Status> {
        let account = AuthContext::of(&request)?.account()?;
        let recheck = Recheck::of(&request)?;
        let threshold = watch::threshold(request.get_ref())?;
        // Subscribe before the first read: no change can fall in between.
        let subscription = self.changes.subscribe(account);
        let watched = WatchedBalance::new(self.ledger.clone(), account, threshold);
        Ok(Response::new(streams::watch(
            self.streams.clone(),
            subscription,
            recheck,
            watched,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_be_printable_and_bounded() {
        assert!(check_key("job-42/retry:1").is_ok());
        assert!(check_key(&"k".repeat(128)).is_ok());
        for bad in ["", "tab\there", "é", &"k".repeat(129)] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_is_bounded() {
        let many = (0..17).map(|i| (i.to_string(), String::new())).collect();
        assert!(check_metadata(many).is_err());
        let long = [("k".to_owned(), "v".repeat(257))].into_iter().collect();
        assert!(check_metadata(long).is_err());
        let ok = [("job".to_owned(), "42".to_owned())].into_iter().collect();
        assert!(check_metadata(ok).is_ok());
    }
}
