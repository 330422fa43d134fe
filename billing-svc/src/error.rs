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
    /// A grant would take the balance past the largest storable balance;
    /// nothing changed.
    #[error(
        "granting {credits} credits would take the balance ({balance}) past the largest balance an account can hold ({max}); nothing was granted",
        max = i64::MAX
    )]
    BalanceOverflow {
        /// The balance.
        balance: i64,
        /// Credits the grant asked for.
        credits: i64,
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
            BillingError::InsufficientCredits { .. } | BillingError::BalanceOverflow { .. } => {
                Code::FailedPrecondition
            }
            BillingError::IdempotencyKeyReused { .. } => Code::AlreadyExists,
            BillingError::AccountNotFound(_) => Code::NotFound,
            BillingError::Unavailable(_) => Code::Unavailable,
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
