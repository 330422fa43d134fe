//! docs/api.md, "Which account a call acts on": the one rule that decides which account a call acts on.

use std::sync::Arc;

use crate::{
    context::{AuthContext, Caller, Role},
    directory::{AccountStatus, Directory, DirectoryError},
    error::AuthError,
    metrics::AuthMetrics,
    policy::{Access, RpcRule, Scope},
    verify::{Principal, VerifiedToken},
};

/// Resolves verified tokens to an [`AuthContext`] against the directory.
#[derive(Clone)]
pub struct Resolver {
    directory: Arc<dyn Directory>,
    metrics: AuthMetrics,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl From<DirectoryError> for AuthError {
    fn from(e: DirectoryError) -> Self {
        AuthError::DirectoryUnavailable(e.0)
    }
}

/// What it takes to decide a call's access again later: the verified token,
/// the act-as header and the method's rule, with the [`Resolver`] that
/// decided it the first time. The auth layer attaches one to every request
/// (next to the [`AuthContext`]); long-lived calls (streams) run it
/// periodically, so the one rule of docs/api.md ("How the account is chosen") decides again, against the
/// directory as it is now.
#[derive(Clone)]
pub struct Recheck {
    resolver: Resolver,
    token: VerifiedToken,
    act_as: Option<i64>,
    rule: RpcRule,
    context: AuthContext,
}

impl std::fmt::Debug for Recheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recheck")
            .field("method", &self.rule.method())
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl Recheck {
    /// The recheck the auth layer attached to a request. Missing means the
    /// handler is not behind [`crate::AuthLayer`] (a wiring bug).
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Recheck, tonic::Status> {
        request
            .extensions()
            .get::<Recheck>()
            .cloned()
            .ok_or_else(|| {
                tonic::Status::internal("request reached a handler without an auth recheck")
            })
    }

    /// The context the call was admitted with.
    pub fn context(&self) -> &AuthContext {
        &self.context
    }

    /// Decides the call's access again (see [`Resolver::recheck`]).
    pub async fn run(&self) -> Result<AuthContext, AuthError> {
        self.resolver.recheck(self).await
    }
}

impl Resolver {
    /// Decides an admitted call's access again, with the same rule and the
    /// directory as it is now (through the same bounded-staleness cache).
    /// Besides every refusal [`Resolver::resolve`] can give (user removed or
    /// deactivated, role no longer allowed, account gone), a caller whose
    /// authoritative account is no longer the one the call acts on (a user
    /// moved to another account) is refused with
    /// [`AuthError::AccountChanged`].
    pub async fn recheck(&self, admitted: &Recheck) -> Result<AuthContext, AuthError> {
        let now = self
            .resolve(&admitted.token, admitted.act_as, &admitted.rule)
            .await?;
        if now.account_id != admitted.context.account_id {
            return Err(AuthError::AccountChanged {
                was: admitted.context.account_id.unwrap_or_default(),
                now: now.account_id,
            });
        }
        Ok(now)
    }

    /// A [`Recheck`] for a call admitted as `context`.
    pub(crate) fn recheck_for(
        &self,
        token: VerifiedToken,
        act_as: Option<i64>,
        rule: RpcRule,
        context: AuthContext,
    ) -> Recheck {
        Recheck {
            resolver: self.clone(),
            token,
            act_as,
            rule,
            context,
        }
    }

    /// A resolver reading this directory and counting into these metrics.
    pub fn new(directory: Arc<dyn Directory>, metrics: AuthMetrics) -> Self {
        Self { directory, metrics }
    }

    /// Decides who is calling, for which account, with which role, and
    /// whether `rule` lets them.
    ///
    /// For users: the account is the user's *current* `users.account_id`
    /// (the token's `account_id` is only compared, and a mismatch is logged
    /// and counted); act-as is for developers only; a user without an account
    /// is refused. For services: act-as names the account and is required on
    /// account-scoped methods. In every case the target account must exist,
    /// and must be active for mutating methods.
    pub async fn resolve(
        &self,
        token: &VerifiedToken,
        act_as: Option<i64>,
        rule: &RpcRule,
    ) -> Result<AuthContext, AuthError> {
        let method = rule.method();
        let (caller, role, own_account, target) = match &token.principal {
            Principal::User {
                user_id,
                account_hint,
            } => {
                let user = self
                    .directory
                    .user(*user_id)
                    .await?
                    .filter(|u| u.is_active)
                    .ok_or(AuthError::UserInactive(*user_id))?;
                let role: Role = user
                    .role
                    .parse()
                    .map_err(|_| AuthError::UnknownRole(user.id))?;
                if act_as.is_some() && role != Role::Developer {
                    return Err(AuthError::ActAsForbidden);
                }
                if let (None, Some(hint)) =
                    (act_as, account_hint.filter(|h| Some(*h) != user.account_id))
                {
                    self.metrics.mismatch();
                    tracing::warn!(
                        user_id = user.id,
                        token_account_id = hint,
                        current_account_id = ?user.account_id,
                        "stale token: account_id differs from the user's current account; using the current one"
                    );
                }
                let target = match (act_as, user.account_id) {
                    (Some(target), _) | (None, Some(target)) => target,
                    (None, None) => return Err(AuthError::NoAccount(user.id)),
                };
                (
                    Caller::User { id: user.id },
                    role,
                    user.account_id,
                    Some(target),
                )
            }
            Principal::Service { name } => {
                if act_as.is_none() && rule.scope == Scope::Account {
                    return Err(AuthError::ActAsRequired { method });
                }
                (
                    Caller::Service { name: name.clone() },
                    Role::Service,
                    None,
                    act_as,
                )
            }
        };

        if let Some(target) = target {
            let account = self
                .directory
                .account(target)
                .await?
                .ok_or(AuthError::AccountNotFound(target))?;
            if rule.access == Access::Mutate && account.status != AccountStatus::Active {
                return Err(AuthError::AccountSuspended {
                    account: target,
                    method,
                });
            }
        }
        if !rule.roles.contains(&role) {
            return Err(AuthError::RoleNotAllowed {
                role: role.as_str(),
                method,
            });
        }
        if rule.not_on_own_account && own_account.is_some() && own_account == target {
            return Err(AuthError::OwnAccount { method });
        }
        Ok(AuthContext {
            caller,
            role,
            account_id: target,
            acting_as: act_as.is_some(),
        })
    }
}
