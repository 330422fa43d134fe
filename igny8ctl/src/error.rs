//! igny8ctl's failures. Each message says what went wrong and what to do
//! about it; `main` prints it and exits non-zero.

use billing_svc::error::BillingError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The input is well-formed for the parser but not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A row the command needs does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A row the command would create already exists.
    #[error("{0}")]
    Conflict(String),
    /// The database could not be opened or migrated.
    #[error("{0}")]
    Db(#[from] igny8_db::DbError),
    /// A query failed.
    #[error("database error while {doing}: {source}")]
    Query {
        /// What the command was doing.
        doing: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// The ledger refused a change.
    #[error("{0}")]
    Ledger(#[from] BillingError),
    /// No usable signing secret.
    #[error("{0}")]
    Secret(String),
    /// A service failed to start or stopped with an error.
    #[error("{0}")]
    Serve(String),
}

impl CtlError {
    /// A `map_err` helper for queries: `.map_err(CtlError::query("reading accounts"))`.
    pub fn query(doing: &'static str) -> impl FnOnce(sqlx::Error) -> CtlError {
        move |source| CtlError::Query { doing, source }
    }
}
