//! The typed result of authentication that handlers read.

use std::{fmt, str::FromStr};

use tonic::Status;

/// A role, always taken from the directory (`users.role`), never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Account owner.
    Owner,
    /// Account administrator.
    Admin,
    /// May use credits.
    Editor,
    /// Read-only member.
    Viewer,
    /// Platform staff; may act as any account.
    Developer,
    /// An internal service (a `service` token); may act as any account.
    Service,
}

impl Role {
    /// The lowercase name used in the directory and in `x-igny8-role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Editor => "editor",
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Service => "service",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    /// Parses a directory role. `service` is not a directory role: only a
    /// service token makes a service principal.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "owner" => Ok(Role::Owner),
            "admin" => Ok(Role::Admin),
            "editor" => Ok(Role::Editor),
            "viewer" => Ok(Role::Viewer),
            "developer" => Ok(Role::Developer),
            other => Err(format!("unknown role {other:?}")),
        }
    }
}

/// Who made the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A user, by directory id.
    User {
        /// `users.id`.
        id: i64,
    },
    /// An internal service, by the name in its token's `sub`.
    Service {
        /// The service name, e.g. `writer-worker`.
        name: String,
    },
}

/// The authoritative identity of a call, inserted by the auth layer as a
/// request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthContext {
    /// Who is calling.
    pub caller: Caller,
    /// The role the permission matrix was checked with.
    pub role: Role,
    /// The account the call acts on. `None` only for account-free calls
    /// (the cost table) made by a service without act-as.
    pub account_id: Option<i64>,
    /// True when the account came from `x-igny8-act-as-account`.
    pub acting_as: bool,
}

impl AuthContext {
    /// The context the auth layer attached to a request. A missing context is
    /// a wiring bug (the handler is not behind [`crate::AuthLayer`]), reported
    /// as INTERNAL rather than served unauthenticated.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<&AuthContext, Status> {
        request
            .extensions()
            .get::<AuthContext>()
            .ok_or_else(|| Status::internal("request reached a handler without an auth context"))
    }

    /// The account the call acts on, for account-scoped handlers. The layer
    /// guarantees one for every account-scoped RPC.
    pub fn account(&self) -> Result<i64, Status> {
        self.account_id
            .ok_or_else(|| Status::internal("account-scoped call without a resolved account"))
    }

    /// A stable description of the caller for ledgers and logs:
    /// `user:<id>` or `service:<name>`.
    pub fn actor(&self) -> String {
        match &self.caller {
            Caller::User { id } => format!("user:{id}"),
            Caller::Service { name } => format!("service:{name}"),
        }
    }

    /// The user id, when a user is calling.
    pub fn user_id(&self) -> Option<i64> {
        match self.caller {
            Caller::User { id } => Some(id),
            Caller::Service { .. } => None,
        }
    }
}
