//! Billing's failures, mapped to gRPC once.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::costs::PriceError;

/// `ErrorInfo.domain` of billing failures.
pub const ERROR_DOMAIN: &str = "billing.igny8";

/// Why a billing call failed.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// A request field is invalid; nothing changed.
    #[error("invalid {field}: {description}")]
    InvalidField {
        /// The field path, e.g. `usage.quantity`.
        field: String,
        /// What is wrong and what is accepted.
        description: String,
    },
    /// The operation cannot be priced.
    #[error("{source}")]
    Price {
        /// The field path the operation came from.
        field: &'static str,
        /// Why.
        source: PriceError,
    },
    /// The balance is too low; nothing changed.
    #[error("Insufficient credits. Required: {required}, Available: {available}")]
    InsufficientCredits {
        /// Credits the deduction needs.
        required: i64,
        /// The balance.
        available: i64,
    },
    /// The idempotency key was used before for a different request.
    #[error("idempotency key {key:?} was already used for a different request on this account")]
    IdempotencyKeyReused {
        /// The key.
        key: String,
    },
    /// The account disappeared between authentication and the query.
    #[error("account {0} does not exist")]
    AccountNotFound(i64),
    /// No hold with this id belongs to the account (unknown ids and other
    /// accounts' holds are indistinguishable on purpose).
    #[error("hold {0:?} not found")]
    HoldNotFound(String),
    /// No ledger row with this id belongs to the account.
    #[error("transaction {0} not found")]
    TransactionNotFound(i64),
    /// The hold was captured, released or expired, and this action is not a
    /// repeat of the one that ended it.
    #[error("hold is not active: it is {state}")]
    HoldNotActive {
        /// `HOLD_STATE_CAPTURED`, `HOLD_STATE_RELEASED` or `HOLD_STATE_EXPIRED`.
        state: &'static str,
    },
    /// A capture asked for more than the hold holds; nothing changed.
    #[error("cannot capture {requested} credits: the hold holds {held}")]
    CaptureExceedsHold {
        /// Credits the capture asked for.
        requested: i64,
        /// Credits the hold holds.
        held: i64,
    },
    /// The transaction is not a charge (a GRANT or REFUND row): only DEDUCT
    /// and CAPTURE rows can be refunded.
    #[error(
        "transaction {id} is a {kind} row; only DEDUCT and CAPTURE transactions can be refunded"
    )]
    NotRefundable {
        /// The row.
        id: i64,
        /// Its kind, upper case.
        kind: String,
    },
    /// A refund asked for more than is left to refund; nothing changed.
    #[error("cannot refund {requested} credits: {refundable} left to refund on this transaction")]
    RefundExceedsCharge {
        /// Credits asked for (0 = everything left).
        requested: i64,
        /// Credits still refundable.
        refundable: i64,
    },
    /// The change would take the balance past the largest storable value.
    #[error("the balance would overflow: {balance} + {credits} does not fit in 64 bits")]
    BalanceOverflow {
        /// The balance now.
        balance: i64,
        /// Credits to add.
        credits: i64,
    },
    /// The operation's module is switched off for the account (docs/api.md "Module-aware charging");
    /// nothing changed.
    #[error(
        "module {module} is disabled for this account, so {operation} cannot be charged; \
         an admin can enable it with SettingsService.UpdateModuleSettings"
    )]
    ModuleDisabled {
        /// The cost table's module name, e.g. `writer`.
        module: String,
        /// The canonical operation.
        operation: String,
    },
    /// settings-svc could not say whether the module is enabled and no
    /// recent answer is cached; nothing changed (fail closed).
    #[error(
        "cannot check whether module {module} is enabled: settings-svc is unavailable; nothing changed, retry later"
    )]
    SettingsUnavailable {
        /// The cost table's module name.
        module: String,
    },
    /// The ledger writer is saturated (its queue, or this account's share of
    /// it, is full); nothing changed. Retry with backoff.
    #[error("the ledger is busy: {0}; nothing changed, retry with the same idempotency key")]
    Overloaded(&'static str),
    /// The batch this request was written in failed and was rolled back.
    #[error(
        "the ledger write failed and was rolled back; nothing changed, retry with the same idempotency key"
    )]
    WriteFailed,
    /// The database could not be reached.
    #[error("database unavailable; retry later")]
    Unavailable(#[source] sqlx::Error),
    /// The database refused a query (a bug or a broken schema).
    #[error("internal database error")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for BillingError {
    fn from(e: sqlx::Error) -> Self {
        if igny8_db::is_unavailable(&e) {
            BillingError::Unavailable(e)
        } else {
            BillingError::Database(e)
        }
    }
}

impl BillingError {
    /// Shorthand for [`BillingError::InvalidField`].
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        BillingError::InvalidField {
            field: field.into(),
            description: description.into(),
        }
    }

    /// The gRPC code. Exhaustive on purpose.
    pub fn code(&self) -> Code {
        match self {
            BillingError::InvalidField { .. } | BillingError::Price { .. } => Code::InvalidArgument,
            BillingError::InsufficientCredits { .. } => Code::FailedPrecondition,
            BillingError::IdempotencyKeyReused { .. } => Code::AlreadyExists,
            BillingError::AccountNotFound(_)
            | BillingError::HoldNotFound(_)
            | BillingError::TransactionNotFound(_) => Code::NotFound,
            BillingError::HoldNotActive { .. }
            | BillingError::CaptureExceedsHold { .. }
            | BillingError::RefundExceedsCharge { .. }
            | BillingError::NotRefundable { .. }
            | BillingError::BalanceOverflow { .. }
            | BillingError::ModuleDisabled { .. } => Code::FailedPrecondition,
            BillingError::Overloaded(_) => Code::ResourceExhausted,
            BillingError::Unavailable(_)
            | BillingError::WriteFailed
            | BillingError::SettingsUnavailable { .. } => Code::Unavailable,
            BillingError::Database(_) => Code::Internal,
        }
    }
}

impl From<BillingError> for Status {
    fn from(err: BillingError) -> Self {
        let message = err.to_string();
        let details = match &err {
            BillingError::InvalidField { field, description } => {
                ErrorDetails::with_bad_request_violation(field.clone(), description.clone())
            }
            BillingError::Price { field, source } => {
                let mut d = ErrorDetails::with_bad_request_violation(*field, source.to_string());
                let reason = match source {
                    PriceError::UnknownOperation { .. } => "UNKNOWN_OPERATION",
                    PriceError::QuantityTooLarge(_) => "QUANTITY_TOO_LARGE",
                };
                d.set_error_info(reason, ERROR_DOMAIN, HashMap::new());
                d
            }
            BillingError::InsufficientCredits {
                required,
                available,
            } => ErrorDetails::with_error_info(
                "INSUFFICIENT_CREDITS",
                ERROR_DOMAIN,
                HashMap::from([
                    ("required".to_owned(), required.to_string()),
                    ("available".to_owned(), available.to_string()),
                ]),
            ),
            BillingError::BalanceOverflow { balance, credits } => ErrorDetails::with_error_info(
                "BALANCE_OVERFLOW",
                ERROR_DOMAIN,
                HashMap::from([
                    ("balance".to_owned(), balance.to_string()),
                    ("credits".to_owned(), credits.to_string()),
                    ("max_balance".to_owned(), i64::MAX.to_string()),
                ]),
            ),
            BillingError::IdempotencyKeyReused { key } => ErrorDetails::with_error_info(
                "IDEMPOTENCY_KEY_REUSED",
                ERROR_DOMAIN,
                HashMap::from([("idempotency_key".to_owned(), key.clone())]),
            ),
            BillingError::AccountNotFound(id) => ErrorDetails::with_error_info(
                "ACCOUNT_NOT_FOUND",
                ERROR_DOMAIN,
                HashMap::from([("account_id".to_owned(), id.to_string())]),
            ),
            BillingError::HoldNotFound(id) => ErrorDetails::with_error_info(
                "HOLD_NOT_FOUND",
                ERROR_DOMAIN,
                HashMap::from([("hold_id".to_owned(), truncate(id, 64))]),
            ),
            BillingError::TransactionNotFound(id) => ErrorDetails::with_error_info(
                "TRANSACTION_NOT_FOUND",
                ERROR_DOMAIN,
                HashMap::from([("transaction_id".to_owned(), id.to_string())]),
            ),
            BillingError::HoldNotActive { state } => ErrorDetails::with_error_info(
                "HOLD_NOT_ACTIVE",
                ERROR_DOMAIN,
                HashMap::from([("state".to_owned(), (*state).to_owned())]),
            ),
            BillingError::CaptureExceedsHold { requested, held } => ErrorDetails::with_error_info(
                "CAPTURE_EXCEEDS_HOLD",
                ERROR_DOMAIN,
                HashMap::from([
                    ("requested".to_owned(), requested.to_string()),
                    ("held".to_owned(), held.to_string()),
                ]),
            ),
            BillingError::RefundExceedsCharge {
                requested,
                refundable,
            } => ErrorDetails::with_error_info(
                "REFUND_EXCEEDS_CHARGE",
                ERROR_DOMAIN,
                HashMap::from([
                    ("requested".to_owned(), requested.to_string()),
                    ("refundable".to_owned(), refundable.to_string()),
                ]),
            ),
            BillingError::NotRefundable { kind, .. } => ErrorDetails::with_error_info(
                "NOT_REFUNDABLE",
                ERROR_DOMAIN,
                HashMap::from([("kind".to_owned(), kind.clone())]),
            ),
            BillingError::ModuleDisabled { module, operation } => ErrorDetails::with_error_info(
                "MODULE_DISABLED",
                ERROR_DOMAIN,
                HashMap::from([
                    ("module".to_owned(), module.clone()),
                    ("operation".to_owned(), operation.clone()),
                ]),
            ),
            BillingError::SettingsUnavailable { module } => ErrorDetails::with_error_info(
                "SETTINGS_UNAVAILABLE",
                ERROR_DOMAIN,
                HashMap::from([("module".to_owned(), module.clone())]),
            ),
            BillingError::Overloaded(what) => ErrorDetails::with_error_info(
                "LEDGER_OVERLOADED",
                ERROR_DOMAIN,
                HashMap::from([("limit".to_owned(), (*what).to_owned())]),
            ),
            BillingError::WriteFailed => {
                ErrorDetails::with_error_info("LEDGER_WRITE_FAILED", ERROR_DOMAIN, HashMap::new())
            }
            BillingError::Unavailable(e) => {
                tracing::error!(error = %e, "database unavailable");
                ErrorDetails::new()
            }
            BillingError::Database(e) => {
                tracing::error!(error = %e, "database error");
                ErrorDetails::new()
            }
        };
        Status::with_error_details(err.code(), message, details)
    }
}

/// At most `max` characters of caller input, for messages and details.
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insufficient_credits_carries_the_contract() {
        let status = Status::from(BillingError::InsufficientCredits {
            required: 15,
            available: 3,
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "Insufficient credits. Required: 15, Available: 3"
        );
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INSUFFICIENT_CREDITS");
        assert_eq!(info.domain, "billing.igny8");
        assert_eq!(info.metadata["required"], "15");
        assert_eq!(info.metadata["available"], "3");
    }

    #[test]
    fn codes() {
        let table = [
            (
                BillingError::field("credits", "must be > 0"),
                Code::InvalidArgument,
            ),
            (
                BillingError::Price {
                    field: "operation",
                    source: PriceError::QuantityTooLarge(1),
                },
                Code::InvalidArgument,
            ),
            (
                BillingError::IdempotencyKeyReused { key: "k".into() },
                Code::AlreadyExists,
            ),
            (BillingError::AccountNotFound(1), Code::NotFound),
            (
                BillingError::BalanceOverflow {
                    balance: i64::MAX,
                    credits: 1,
                },
                Code::FailedPrecondition,
            ),
            (
                BillingError::from(sqlx::Error::PoolTimedOut),
                Code::Unavailable,
            ),
            (BillingError::from(sqlx::Error::RowNotFound), Code::Internal),
        ];
        for (err, code) in table {
            assert_eq!(Status::from(err).code(), code);
        }
        let bad = Status::from(BillingError::field("idempotency_key", "required"));
        let br = bad.get_details_bad_request().unwrap();
        assert_eq!(br.field_violations[0].field, "idempotency_key");
    }
}
