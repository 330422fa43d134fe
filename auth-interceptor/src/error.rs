//! Every way authentication or authorization can fail, mapped to a gRPC
//! status in exactly one place.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of auth failures.
pub const ERROR_DOMAIN: &str = "auth.igny8";

/// Why a call was not let through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing credentials: send `authorization: Bearer <jwt>` metadata")]
    MissingToken,
    /// `authorization` is `Bearer` with nothing after it: usually a shell
    /// variable meant to hold the token is unset.
    #[error(
        "the bearer token is empty: `authorization: Bearer` carried no token (is the variable \
         holding it set? `igny8ctl dev` prints `export IGNY8_TOKEN=…`)"
    )]
    EmptyToken,
    /// `authorization` is not `Bearer <token>`.
    #[error("malformed authorization metadata: expected `Bearer <jwt>`")]
    MalformedAuthorization,
    /// The token is over 8 KiB.
    #[error("token is {0} bytes; tokens over 8192 bytes are rejected")]
    TokenTooLarge(usize),
    /// Signature, algorithm, expiry, issuer, audience or claims are wrong.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The token's user is missing from the directory or deactivated.
    #[error("user {0} is unknown or deactivated")]
    UserInactive(i64),
    /// The directory holds a role this service does not know.
    #[error("user {0} has a role this service does not recognise")]
    UnknownRole(i64),
    /// The user belongs to no account (`users.account_id` is NULL).
    #[error("user {0} does not belong to any account")]
    NoAccount(i64),
    /// The account (own or act-as target) does not exist.
    #[error("account {0} does not exist")]
    AccountNotFound(i64),
    /// A mutating call on a suspended account.
    #[error("account {account} is suspended: {method} is refused (reads are still allowed)")]
    AccountSuspended {
        /// The account.
        account: i64,
        /// The refused method.
        method: &'static str,
    },
    /// Act-as sent by someone who is neither a developer nor a service.
    #[error("x-igny8-act-as-account is only accepted from developers and services")]
    ActAsForbidden,
    /// The role may not call this method.
    #[error("role {role} may not call {method}")]
    RoleNotAllowed {
        /// The caller's role.
        role: &'static str,
        /// The method.
        method: &'static str,
    },
    /// A user targeting their own account where that is forbidden.
    #[error("{method} may not target the caller's own account")]
    OwnAccount {
        /// The method.
        method: &'static str,
    },
    /// A service token called an account-scoped method without act-as.
    #[error("service tokens must name the account with x-igny8-act-as-account to call {method}")]
    ActAsRequired {
        /// The method.
        method: &'static str,
    },
    /// The act-as header is not a positive integer.
    #[error("x-igny8-act-as-account must be one positive integer account id")]
    InvalidActAs,
    /// A long-lived call's caller now belongs to another account than the
    /// one the call acts on (found by a recheck).
    #[error(
        "the caller no longer belongs to account {was}; reopen the call to act on the current account"
    )]
    AccountChanged {
        /// The account the call acts on.
        was: i64,
        /// The caller's account now, if any.
        now: Option<i64>,
    },
    /// The directory could not be read; never a silent allow.
    #[error("the user directory is unavailable; retry later")]
    DirectoryUnavailable(String),
    /// No rule names this method.
    #[error("method {0} is not implemented by this server")]
    UnknownMethod(String),
}

impl AuthError {
    /// The gRPC code. Exhaustive on purpose: a new variant must choose.
    pub fn code(&self) -> Code {
        match self {
            AuthError::MissingToken
            | AuthError::EmptyToken
            | AuthError::MalformedAuthorization
            | AuthError::TokenTooLarge(_)
            | AuthError::InvalidToken(_)
            | AuthError::UserInactive(_) => Code::Unauthenticated,
            AuthError::UnknownRole(_)
            | AuthError::NoAccount(_)
            | AuthError::AccountNotFound(_)
            | AuthError::AccountSuspended { .. }
            | AuthError::ActAsForbidden
            | AuthError::RoleNotAllowed { .. }
            | AuthError::OwnAccount { .. }
            | AuthError::AccountChanged { .. } => Code::PermissionDenied,
            AuthError::ActAsRequired { .. } | AuthError::InvalidActAs => Code::InvalidArgument,
            AuthError::DirectoryUnavailable(_) => Code::Unavailable,
            AuthError::UnknownMethod(_) => Code::Unimplemented,
        }
    }

    /// The `ErrorInfo.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "MISSING_CREDENTIALS",
            AuthError::EmptyToken | AuthError::MalformedAuthorization => "MALFORMED_CREDENTIALS",
            AuthError::TokenTooLarge(_) => "TOKEN_TOO_LARGE",
            AuthError::InvalidToken(_) => "INVALID_TOKEN",
            AuthError::UserInactive(_) => "USER_INACTIVE",
            AuthError::UnknownRole(_) => "UNKNOWN_ROLE",
            AuthError::NoAccount(_) => "NO_ACCOUNT",
            AuthError::AccountNotFound(_) => "ACCOUNT_NOT_FOUND",
            AuthError::AccountSuspended { .. } => "ACCOUNT_SUSPENDED",
            AuthError::ActAsForbidden => "ACT_AS_FORBIDDEN",
            AuthError::RoleNotAllowed { .. } => "ROLE_NOT_ALLOWED",
            AuthError::OwnAccount { .. } => "OWN_ACCOUNT_FORBIDDEN",
            AuthError::AccountChanged { .. } => "ACCOUNT_CHANGED",
            AuthError::ActAsRequired { .. } => "ACT_AS_REQUIRED",
            AuthError::InvalidActAs => "INVALID_ACT_AS",
            AuthError::DirectoryUnavailable(_) => "DIRECTORY_UNAVAILABLE",
            AuthError::UnknownMethod(_) => "UNKNOWN_METHOD",
        }
    }

    /// The metric label of this outcome.
    pub(crate) fn outcome(&self) -> &'static str {
        match self.code() {
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission_denied",
            Code::InvalidArgument => "invalid_argument",
            Code::Unavailable => "unavailable",
            _ => "other",
        }
    }
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        match &err {
            AuthError::DirectoryUnavailable(detail) => {
                tracing::error!(error = %detail, "directory unavailable; refusing the call");
            }
            other => tracing::debug!(reason = other.reason(), "call refused: {other}"),
        }
        let mut metadata = HashMap::new();
        match &err {
            AuthError::AccountSuspended { account, .. } | AuthError::AccountNotFound(account) => {
                metadata.insert("account_id".to_owned(), account.to_string());
            }
            AuthError::RoleNotAllowed { role, method } => {
                metadata.insert("role".to_owned(), (*role).to_owned());
                metadata.insert("method".to_owned(), (*method).to_owned());
            }
            _ => {}
        }
        Status::with_error_details(
            err.code(),
            err.to_string(),
            ErrorDetails::with_error_info(err.reason(), ERROR_DOMAIN, metadata),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_code() {
        let table = [
            (AuthError::MissingToken, Code::Unauthenticated),
            (AuthError::EmptyToken, Code::Unauthenticated),
            (AuthError::MalformedAuthorization, Code::Unauthenticated),
            (AuthError::TokenTooLarge(9000), Code::Unauthenticated),
            (AuthError::InvalidToken("x".into()), Code::Unauthenticated),
            (AuthError::UserInactive(1), Code::Unauthenticated),
            (AuthError::UnknownRole(1), Code::PermissionDenied),
            (AuthError::NoAccount(1), Code::PermissionDenied),
            (AuthError::AccountNotFound(1), Code::PermissionDenied),
            (
                AuthError::AccountSuspended {
                    account: 1,
                    method: "Deduct",
                },
                Code::PermissionDenied,
            ),
            (AuthError::ActAsForbidden, Code::PermissionDenied),
            (
                AuthError::RoleNotAllowed {
                    role: "viewer",
                    method: "Deduct",
                },
                Code::PermissionDenied,
            ),
            (
                AuthError::OwnAccount { method: "Grant" },
                Code::PermissionDenied,
            ),
            (
                AuthError::ActAsRequired { method: "Deduct" },
                Code::InvalidArgument,
            ),
            (AuthError::InvalidActAs, Code::InvalidArgument),
            (
                AuthError::AccountChanged {
                    was: 1,
                    now: Some(2),
                },
                Code::PermissionDenied,
            ),
            (
                AuthError::DirectoryUnavailable("down".into()),
                Code::Unavailable,
            ),
            (AuthError::UnknownMethod("/x/Y".into()), Code::Unimplemented),
        ];
        for (err, code) in table {
            let reason = err.reason();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{reason}");
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, ERROR_DOMAIN);
        }
    }

    #[test]
    fn unavailable_does_not_leak_the_cause() {
        let status = Status::from(AuthError::DirectoryUnavailable("password=hunter2".into()));
        assert!(!status.message().contains("hunter2"));
    }
}
