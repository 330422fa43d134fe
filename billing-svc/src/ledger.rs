//! The credit ledger: balance changes, holds and their append-only rows.
//!
//! Every change of balance or of holds goes through one path, the
//! [`writer`](crate::writer): requests are queued, gathered into batches and
//! applied together in one database transaction per batch. This module holds
//! the types the writer and the handlers share, the read queries, and
//! [`Ledger`], the façade the handlers call.
//!
//! The balance can never go below what active holds reserve, and never below
//! zero: the writer decides each request against the locked account row, and
//! the schema backs it up (`accounts_held_within_balance`,
//! `accounts_credits_non_negative`, the refund bound trigger).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use igny8_db::{Db, on_pool};

use crate::{
    error::BillingError,
    writer::{Clock, Done, Op, Writer, WriterConfig, system_clock},
};

/// What kind of change a row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Credits used.
    Deduct,
    /// Credits added.
    Grant,
    /// A hold charged.
    Capture,
    /// Part of an earlier charge given back.
    Refund,
}

impl Kind {
    /// The value stored in `credit_ledger.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deduct => "deduct",
            Kind::Grant => "grant",
            Kind::Capture => "capture",
            Kind::Refund => "refund",
        }
    }
}

/// A deduction or grant to apply.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Deduct or grant.
    pub kind: Kind,
    /// Signed change: negative for deductions.
    pub credits: i64,
    /// Canonical operation (usage-priced deductions) or empty.
    pub operation: String,
    /// Quantity priced, or 0.
    pub quantity: u64,
    /// Description or grant reason.
    pub description: String,
    /// Caller metadata.
    pub metadata: BTreeMap<String, String>,
    /// Idempotency key, unique per account and kind.
    pub idempotency_key: String,
    /// Fingerprint of the request, to tell a retry from a key reuse.
    pub request_hash: String,
    /// `user:<id>` or `service:<name>`.
    pub actor: String,
}

/// A ledger row as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LedgerRow {
    /// Row id, increasing.
    pub id: i64,
    /// The account.
    pub account_id: i64,
    /// `deduct`, `grant`, `capture` or `refund`.
    pub kind: String,
    /// Signed change.
    pub credits: i64,
    /// Balance right after the change.
    pub balance_after: i64,
    /// Canonical operation or empty.
    pub operation: String,
    /// Quantity or 0.
    pub quantity: i64,
    /// Description or reason.
    pub description: String,
    /// JSON object of string pairs.
    pub metadata: String,
    /// The idempotency key (for captures: the hold id).
    pub idempotency_key: String,
    /// Request fingerprint.
    pub request_hash: String,
    /// Who made the change.
    pub actor: String,
    /// When.
    pub created_at: DateTime<Utc>,
    /// For captures: the hold captured.
    pub hold_id: Option<String>,
    /// For refunds: the row refunded.
    pub refund_of: Option<i64>,
}

/// A hold as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct HoldRow {
    /// Opaque id.
    pub id: String,
    /// The account.
    pub account_id: i64,
    /// `active`, `captured`, `released` or `expired` as stored; an active
    /// hold past its expiry is expired whatever this says (see
    /// [`HoldRow::state_at`]).
    pub state: String,
    /// Credits held.
    pub credits: i64,
    /// Credits charged by the capture.
    pub captured_credits: i64,
    /// Canonical operation or empty.
    pub operation: String,
    /// Quantity or 0.
    pub quantity: i64,
    /// Description.
    pub description: String,
    /// JSON object of string pairs.
    pub metadata: String,
    /// The Reserve idempotency key.
    pub idempotency_key: String,
    /// Request fingerprint.
    pub request_hash: String,
    /// Who placed it.
    pub actor: String,
    /// When it was placed.
    pub created_at: DateTime<Utc>,
    /// Expiry, microseconds since the Unix epoch.
    pub expires_at_us: i64,
    /// When it was captured, released or swept as expired.
    pub closed_at: Option<DateTime<Utc>>,
    /// The CAPTURE row, once captured.
    pub transaction_id: Option<i64>,
}

/// Where a hold is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    /// Counts against available credits.
    Active,
    /// Charged.
    Captured,
    /// Freed.
    Released,
    /// Past its expiry.
    Expired,
}

impl HoldState {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Active => "active",
            HoldState::Captured => "captured",
            HoldState::Released => "released",
            HoldState::Expired => "expired",
        }
    }

    /// The API's enum value name, for error details.
    pub fn api_name(self) -> &'static str {
        match self {
            HoldState::Active => "HOLD_STATE_ACTIVE",
            HoldState::Captured => "HOLD_STATE_CAPTURED",
            HoldState::Released => "HOLD_STATE_RELEASED",
            HoldState::Expired => "HOLD_STATE_EXPIRED",
        }
    }
}

impl HoldRow {
    /// The hold's state at `now_us` (microseconds since the epoch): an
    /// active hold stops being active the instant its expiry passes,
    /// whether or not the sweep has recorded it.
    pub fn state_at(&self, now_us: i64) -> HoldState {
        match self.state.as_str() {
            "active" if self.expires_at_us <= now_us => HoldState::Expired,
            "active" => HoldState::Active,
            "captured" => HoldState::Captured,
            "released" => HoldState::Released,
            _ => HoldState::Expired,
        }
    }
}

/// The result of [`Ledger::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The row written, or the original row on a replay.
    pub row: LedgerRow,
    /// True when an earlier identical request already wrote `row`.
    pub replayed: bool,
}

/// An account's balance and what its active holds reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    /// Credits on the account.
    pub balance: i64,
    /// Credits held by active, unexpired holds.
    pub held: i64,
}

impl Balance {
    /// What Check, Deduct and Reserve may use.
    pub fn available(&self) -> i64 {
        self.balance - self.held
    }
}

/// The columns of [`LedgerRow`], in one place for every query.
#[macro_export]
#[doc(hidden)]
macro_rules! ledger_columns {
    () => {
        "id, account_id, kind, credits, balance_after, operation, quantity, description, \
         metadata, idempotency_key, request_hash, actor, created_at, hold_id, refund_of"
    };
}

/// The columns of [`HoldRow`], in one place for every query.
#[macro_export]
#[doc(hidden)]
macro_rules! hold_columns {
    () => {
        "id, account_id, state, credits, captured_credits, operation, quantity, description, \
         metadata, idempotency_key, request_hash, actor, created_at, expires_at_us, closed_at, \
         transaction_id"
    };
}

const PAGE: &str = concat!(
    "SELECT ",
    ledger_columns!(),
    // `id > 0` is always true; it lets PostgreSQL use the partial
    // newest-first index (migration 0007).
    " FROM credit_ledger WHERE account_id = $1 AND id > 0 AND id < $2 ORDER BY id DESC LIMIT $3"
);

const BALANCE: &str = "SELECT credits, CAST(COALESCE((SELECT SUM(h.credits) FROM credit_holds h \
     WHERE h.account_id = a.id AND h.state = 'active' AND h.expires_at_us > $2), 0) AS BIGINT) \
     FROM accounts a WHERE a.id = $1";

const HOLD: &str = concat!(
    "SELECT ",
    hold_columns!(),
    " FROM credit_holds WHERE id = $1 AND account_id = $2"
);

/// Microseconds since the Unix epoch.
pub fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// Ledger access for one database: writes through the batching writer,
/// reads straight from the pool.
#[derive(Clone)]
pub struct Ledger {
    db: Db,
    writer: Writer,
    clock: Clock,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("db", &self.db)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// The ledger in this database, with a writer of the default
    /// configuration for its backend. Must be called inside a Tokio runtime.
    pub fn new(db: Db) -> Self {
        let config = WriterConfig::for_backend(db.backend());
        Self::with_config(db, config)
    }

    /// The ledger in this database, with this writer configuration.
    pub fn with_config(db: Db, config: WriterConfig) -> Self {
        Self::with_clock(db, config, system_clock())
    }

    /// The ledger with this writer configuration and clock (tests drive
    /// hold expiry with it).
    pub fn with_clock(db: Db, config: WriterConfig, clock: Clock) -> Self {
        let writer = Writer::start_with_clock(db.clone(), config, clock.clone());
        Self { db, writer, clock }
    }

    /// The time, as this ledger's clock tells it.
    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// The writer, for operations beyond [`Ledger::apply`].
    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// The database, for reads beyond this type's (balance streams).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Applies `entry` (a deduct or a grant) to `account` exactly once per
    /// idempotency key.
    ///
    /// A key seen before with the same request fingerprint replays the
    /// original row; with a different fingerprint it is
    /// [`BillingError::IdempotencyKeyReused`]. A change the available credits
    /// cannot cover is [`BillingError::InsufficientCredits`] and changes
    /// nothing.
    #[tracing::instrument(
        name = "ledger.apply",
        skip(self, entry),
        fields(kind = entry.kind.as_str(), credits = entry.credits),
        err(level = "debug")
    )]
    pub async fn apply(&self, account: i64, entry: &Entry) -> Result<Applied, BillingError> {
        match self
            .writer
            .submit(account, Op::Change(entry.clone()))
            .await?
        {
            Done::Row { row, replayed, .. } => Ok(Applied { row, replayed }),
            other => unreachable!("a change answers with a row, got {other:?}"),
        }
    }

    /// The account's balance and active holds, as of now.
    #[tracing::instrument(name = "ledger.balance", skip(self), err(level = "debug"))]
    pub async fn balance(&self, account: i64) -> Result<Balance, BillingError> {
        let now_us = micros(self.now());
        let found: Option<(i64, i64)> = on_pool!(&self.db, pool => sqlx::query_as(BALANCE).bind(account).bind(now_us).fetch_optional(pool).await)?;
        let (balance, held) = found.ok_or(BillingError::AccountNotFound(account))?;
        Ok(Balance { balance, held })
    }

    /// One hold of the account, or [`BillingError::HoldNotFound`].
    #[tracing::instrument(name = "ledger.hold", skip(self), err(level = "debug"))]
    pub async fn hold(&self, account: i64, id: &str) -> Result<HoldRow, BillingError> {
        let found: Option<HoldRow> = on_pool!(&self.db, pool => sqlx::query_as(HOLD).bind(id).bind(account).fetch_optional(pool).await)?;
        found.ok_or_else(|| BillingError::HoldNotFound(id.to_owned()))
    }

    /// Whether the account already used `key` for a deduct (`hold = false`)
    /// or a reserve (`hold = true`): such a request is a retry, answered by
    /// the writer (replayed, or refused as a key reuse) even when a new one
    /// would be refused before reaching it (a module switched off since).
    #[tracing::instrument(name = "ledger.key_used", skip(self, key), err(level = "debug"))]
    pub async fn key_used(
        &self,
        account: i64,
        hold: bool,
        key: &str,
    ) -> Result<bool, BillingError> {
        let found: Option<i64> = if hold {
            on_pool!(&self.db, pool => sqlx::query_scalar("SELECT account_id FROM credit_holds WHERE account_id = $1 AND idempotency_key = $2").bind(account).bind(key).fetch_optional(pool).await)?
        } else {
            on_pool!(&self.db, pool => sqlx::query_scalar("SELECT account_id FROM credit_ledger WHERE account_id = $1 AND kind = 'deduct' AND idempotency_key = $2").bind(account).bind(key).fetch_optional(pool).await)?
        };
        Ok(found.is_some())
    }

    /// Up to `limit` rows older than `before_id` (or the newest when
    /// `None`), newest first.
    #[tracing::instrument(name = "ledger.page", skip(self), err(level = "debug"))]
    pub async fn page(
        &self,
        account: i64,
        before_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<LedgerRow>, BillingError> {
        let before = before_id.unwrap_or(i64::MAX);
        Ok(
            on_pool!(&self.db, pool => sqlx::query_as(PAGE).bind(account).bind(before).bind(limit).fetch_all(pool).await)?,
        )
    }
}
