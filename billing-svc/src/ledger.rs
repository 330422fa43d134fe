//! The credit ledger: balance changes and their append-only rows, written
//! together in one database transaction.
//!
//! The balance can never go below zero because the database decides it:
//! the conditional `UPDATE … WHERE credits + delta >= 0` either moves the
//! balance or matches nothing, and `accounts_credits_non_negative` backs it
//! up. There is no read-then-write in application code. The first statement
//! of every write locks the account row (PostgreSQL) or the database
//! (SQLite `BEGIN IMMEDIATE`), so writers of one account are serialized and
//! everything read after it is current.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use igny8_db::{BeginWrite, Db, on_pool};

use crate::error::BillingError;

/// What kind of change a row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Credits used.
    Deduct,
    /// Credits added.
    Grant,
}

impl Kind {
    /// The value stored in `credit_ledger.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deduct => "deduct",
            Kind::Grant => "grant",
        }
    }
}

/// A change to apply.
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
    /// Idempotency key, unique per account.
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
    /// `deduct` or `grant`.
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
    /// The idempotency key.
    pub idempotency_key: String,
    /// Request fingerprint.
    pub request_hash: String,
    /// Who made the change.
    pub actor: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// The result of [`Ledger::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The row written, or the original row on a replay.
    pub row: LedgerRow,
    /// True when an earlier identical request already wrote `row`.
    pub replayed: bool,
}

/// The columns of [`LedgerRow`], in one place for every query.
macro_rules! columns {
    () => {
        "id, account_id, kind, credits, balance_after, operation, quantity, description, \
         metadata, idempotency_key, request_hash, actor, created_at"
    };
}

// `credits >= -$1 AND credits <= $4` rather than `credits + $1 >= 0`: the
// sum is only computed for a row it cannot overflow ($4 = i64::MAX - grant).
const MOVE_BALANCE: &str = "UPDATE accounts SET credits = credits + $1, updated_at = $2 \
     WHERE id = $3 AND credits >= -$1 AND credits <= $4 RETURNING credits";

const INSERT_ROW: &str = concat!(
    "INSERT INTO credit_ledger (account_id, kind, credits, balance_after, \
     operation, quantity, description, metadata, idempotency_key, request_hash, actor, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
     ON CONFLICT (account_id, idempotency_key) DO NOTHING \
     RETURNING ",
    columns!()
);

const BY_KEY: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM credit_ledger WHERE account_id = $1 AND idempotency_key = $2"
);

const PAGE: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM credit_ledger WHERE account_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
);

const BALANCE: &str = "SELECT credits FROM accounts WHERE id = $1";

/// What one write transaction found.
enum Outcome {
    /// Balance moved and the row was written.
    Written(LedgerRow),
    /// The key already has a row (written earlier or concurrently).
    KeyTaken(Option<LedgerRow>),
    /// The balance could not cover the change; the current balance, if
    /// the account exists.
    Refused(Option<i64>),
}

/// Ledger access for one database.
#[derive(Debug, Clone)]
pub struct Ledger {
    db: Db,
}

impl Ledger {
    /// The ledger in this database.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Applies `entry` to `account` exactly once per idempotency key.
    ///
    /// A key seen before with the same request fingerprint replays the
    /// original row; with a different fingerprint it is
    /// [`BillingError::IdempotencyKeyReused`]. A change the balance cannot
    /// cover is [`BillingError::InsufficientCredits`] and changes nothing.
    #[tracing::instrument(
        name = "ledger.apply",
        skip(self, entry),
        fields(kind = entry.kind.as_str(), credits = entry.credits),
        err(level = "debug")
    )]
    pub async fn apply(&self, account: i64, entry: &Entry) -> Result<Applied, BillingError> {
        let metadata = serde_json::to_string(&entry.metadata).expect("string maps serialize");
        let now = Utc::now();
        let quantity = i64::try_from(entry.quantity).expect("quantities are bounded at 1e9");
        let outcome = on_pool!(&self.db, pool => {
            let mut tx = pool.begin_write().await?;
            let moved: Option<i64> = sqlx::query_scalar(MOVE_BALANCE)
                .bind(entry.credits)
                .bind(now)
                .bind(account)
                .bind(i64::MAX - entry.credits.max(0))
                .fetch_optional(&mut *tx)
                .await?;
            match moved {
                Some(balance_after) => {
                    let row: Option<LedgerRow> = sqlx::query_as(INSERT_ROW)
                        .bind(account)
                        .bind(entry.kind.as_str())
                        .bind(entry.credits)
                        .bind(balance_after)
                        .bind(&entry.operation)
                        .bind(quantity)
                        .bind(&entry.description)
                        .bind(&metadata)
                        .bind(&entry.idempotency_key)
                        .bind(&entry.request_hash)
                        .bind(&entry.actor)
                        .bind(now)
                        .fetch_optional(&mut *tx)
                        .await?;
                    match row {
                        Some(row) => {
                            tx.commit().await?;
                            Outcome::Written(row)
                        }
                        None => {
                            // The key is taken: undo the balance move.
                            tx.rollback().await?;
                            Outcome::KeyTaken(None)
                        }
                    }
                }
                None => {
                    let existing: Option<LedgerRow> = sqlx::query_as(BY_KEY)
                        .bind(account)
                        .bind(&entry.idempotency_key)
                        .fetch_optional(&mut *tx)
                        .await?;
                    let outcome = match existing {
                        Some(row) => Outcome::KeyTaken(Some(row)),
                        None => Outcome::Refused(
                            sqlx::query_scalar(BALANCE).bind(account).fetch_optional(&mut *tx).await?,
                        ),
                    };
                    tx.rollback().await?;
                    outcome
                }
            }
        });
        match outcome {
            Outcome::Written(row) => Ok(Applied {
                row,
                replayed: false,
            }),
            Outcome::KeyTaken(row) => {
                let row = match row {
                    Some(row) => row,
                    None => self
                        .by_key(account, &entry.idempotency_key)
                        .await?
                        .ok_or_else(|| BillingError::Database(sqlx::Error::RowNotFound))?,
                };
                if row.request_hash == entry.request_hash {
                    Ok(Applied {
                        row,
                        replayed: true,
                    })
                } else {
                    Err(BillingError::IdempotencyKeyReused {
                        key: entry.idempotency_key.clone(),
                    })
                }
            }
            // A grant is only ever refused for the ceiling.
            Outcome::Refused(Some(balance)) if entry.credits > 0 => {
                Err(BillingError::BalanceOverflow {
                    balance,
                    credits: entry.credits,
                })
            }
            Outcome::Refused(Some(available)) => Err(BillingError::InsufficientCredits {
                required: -entry.credits,
                available,
            }),
            Outcome::Refused(None) => Err(BillingError::AccountNotFound(account)),
        }
    }

    async fn by_key(&self, account: i64, key: &str) -> Result<Option<LedgerRow>, BillingError> {
        Ok(
            on_pool!(&self.db, pool => sqlx::query_as(BY_KEY).bind(account).bind(key).fetch_optional(pool).await)?,
        )
    }

    /// The account's balance.
    #[tracing::instrument(name = "ledger.balance", skip(self), err(level = "debug"))]
    pub async fn balance(&self, account: i64) -> Result<i64, BillingError> {
        let balance: Option<i64> = on_pool!(&self.db, pool => sqlx::query_scalar(BALANCE).bind(account).fetch_optional(pool).await)?;
        balance.ok_or(BillingError::AccountNotFound(account))
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
