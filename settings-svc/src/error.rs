//! Settings failures, mapped to gRPC once.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Why a settings call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SettingsError {
    /// A request field is invalid; nothing changed.
    #[error("invalid {field}: {description}")]
    InvalidField {
        /// Field path, e.g. `update_mask.paths[0]`.
        field: String,
        /// What is wrong and what is accepted.
        description: String,
    },
    /// The database could not be reached (the cause, for logs).
    #[error("database unavailable; retry later")]
    Unavailable(String),
    /// The database refused a query (the cause, for logs).
    #[error("internal database error")]
    Database(String),
}

impl SettingsError {
    /// Shorthand for [`SettingsError::InvalidField`].
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        SettingsError::InvalidField {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl From<sqlx::Error> for SettingsError {
    fn from(e: sqlx::Error) -> Self {
        if igny8_db::is_unavailable(&e) {
            SettingsError::Unavailable(e.to_string())
        } else {
            SettingsError::Database(e.to_string())
        }
    }
}

impl From<SettingsError> for Status {
    fn from(err: SettingsError) -> Self {
        let message = err.to_string();
        match &err {
            SettingsError::InvalidField { field, description } => Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation(field.clone(), description.clone()),
            ),
            SettingsError::Unavailable(e) => {
                tracing::error!(error = %e, "database unavailable");
                Status::unavailable(message)
            }
            SettingsError::Database(e) => {
                tracing::error!(error = %e, "database error");
                Status::internal(message)
            }
        }
    }
}
