//! The permission matrix (docs/api.md, "Roles and permissions"), as data.

use std::collections::HashMap;

use crate::context::Role;

/// Whether an RPC needs an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Needs no account (the cost table). Services may call without act-as.
    Global,
    /// Acts on one account. Services must name it with act-as.
    Account,
}

/// Whether an RPC changes state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed on suspended accounts.
    Read,
    /// Refused on suspended accounts (`ACCOUNT_SUSPENDED`).
    Mutate,
}

/// Who may call one RPC.
#[derive(Debug, Clone, Copy)]
pub struct RpcRule {
    /// Full gRPC path, `/package.Service/Method`.
    pub path: &'static str,
    /// Needs an account or not.
    pub scope: Scope,
    /// Reads or mutates.
    pub access: Access,
    /// Roles allowed to call it.
    pub roles: &'static [Role],
    /// When true a user may not target the account they belong to: no member
    /// of an account can ever raise its own balance.
    pub not_on_own_account: bool,
}

impl RpcRule {
    /// The method name, for messages (`Deduct`).
    pub fn method(&self) -> &'static str {
        self.path.rsplit('/').next().unwrap_or(self.path)
    }
}

const EVERYONE: &[Role] = &[
    Role::Viewer,
    Role::Editor,
    Role::Admin,
    Role::Owner,
    Role::Developer,
    Role::Service,
];
const EDITORS_UP: &[Role] = &[
    Role::Editor,
    Role::Admin,
    Role::Owner,
    Role::Developer,
    Role::Service,
];
const ADMINS_UP: &[Role] = &[Role::Admin, Role::Owner, Role::Developer, Role::Service];
const STAFF: &[Role] = &[Role::Developer, Role::Service];

const fn rule(path: &'static str, scope: Scope, access: Access, roles: &'static [Role]) -> RpcRule {
    RpcRule {
        path,
        scope,
        access,
        roles,
        not_on_own_account: false,
    }
}

/// The role matrix of docs/api.md, one row per RPC.
pub const RULES: &[RpcRule] = &[
    rule(
        "/igny8.billing.v1.BillingService/GetCreditCost",
        Scope::Global,
        Access::Read,
        EVERYONE,
    ),
    rule(
        "/igny8.billing.v1.BillingService/ListCreditCosts",
        Scope::Global,
        Access::Read,
        EVERYONE,
    ),
    rule(
        "/igny8.billing.v1.BillingService/Check",
        Scope::Account,
        Access::Read,
        EVERYONE,
    ),
    rule(
        "/igny8.billing.v1.BillingService/GetBalance",
        Scope::Account,
        Access::Read,
        EVERYONE,
    ),
    rule(
        "/igny8.billing.v1.BillingService/ListTransactions",
        Scope::Account,
        Access::Read,
        EVERYONE,
    ),
    rule(
        "/igny8.billing.v1.BillingService/Deduct",
        Scope::Account,
        Access::Mutate,
        EDITORS_UP,
    ),
    RpcRule {
        not_on_own_account: true,
        ..rule(
            "/igny8.billing.v1.BillingService/Grant",
            Scope::Account,
            Access::Mutate,
            STAFF,
        )
    },
    rule(
        "/igny8.billing.v1.BillingService/Reserve",
        Scope::Account,
        Access::Mutate,
        EDITORS_UP,
    ),
    rule(
        "/igny8.billing.v1.BillingService/CaptureHold",
        Scope::Account,
        Access::Mutate,
        EDITORS_UP,
    ),
    rule(
        "/igny8.billing.v1.BillingService/ReleaseHold",
        Scope::Account,
        Access::Mutate,
        EDITORS_UP,
    ),
    rule(
        "/igny8.billing.v1.BillingService/GetHold",
        Scope::Account,
        Access::Read,
        EVERYONE,
    ),
    RpcRule {
        not_on_own_account: true,
        ..rule(
            "/igny8.billing.v1.BillingService/Refund",
            Scope::Account,
            Access::Mutate,
            STAFF,
        )
    },
    rule(
        "/igny8.billing.v1.BillingService/WatchBalance",
        Scope::Account,
        Access::Read,
        EVERYONE,
    ),
    rule(
        "/igny8.settings.v1.SettingsService/GetModuleSettings",
        Scope::Account,
        Access::Read,
        EVERYONE,
    ),
    rule(
        "/igny8.settings.v1.SettingsService/CheckModule",
        Scope::Account,
        Access::Read,
        EVERYONE,
    ),
    rule(
        "/igny8.settings.v1.SettingsService/UpdateModuleSettings",
        Scope::Account,
        Access::Mutate,
        ADMINS_UP,
    ),
    rule(
        "/igny8.settings.v1.SettingsService/WatchModuleSettings",
        Scope::Account,
        Access::Read,
        EVERYONE,
    ),
];

/// Paths reachable without a token.
const PUBLIC_PREFIXES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The rules by path.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: HashMap<&'static str, RpcRule>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new(RULES)
    }
}

impl Policy {
    /// A policy over these rules.
    pub fn new(rules: &[RpcRule]) -> Self {
        Self {
            rules: rules.iter().map(|r| (r.path, *r)).collect(),
        }
    }

    /// The rule for a path; `None` for a method no rule names.
    pub fn rule(&self, path: &str) -> Option<&RpcRule> {
        self.rules.get(path)
    }

    /// True for health and reflection, which need no token.
    pub fn is_public(path: &str) -> bool {
        PUBLIC_PREFIXES.iter().any(|p| path.starts_with(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matrix of docs/api.md written out, checked against the rules.
    #[test]
    fn matrix_matches_the_spec() {
        use Role::*;
        let table: &[(&str, &[Role], &[Role])] = &[
            (
                "GetCreditCost",
                &[Viewer, Editor, Admin, Owner, Developer, Service],
                &[],
            ),
            (
                "ListCreditCosts",
                &[Viewer, Editor, Admin, Owner, Developer, Service],
                &[],
            ),
            (
                "Check",
                &[Viewer, Editor, Admin, Owner, Developer, Service],
                &[],
            ),
            (
                "GetBalance",
                &[Viewer, Editor, Admin, Owner, Developer, Service],
                &[],
            ),
            (
                "ListTransactions",
                &[Viewer, Editor, Admin, Owner, Developer, Service],
                &[],
            ),
            (
                "Deduct",
                &[Editor, Admin, Owner, Developer, Service],
                &[Viewer],
            ),
            (
                "Grant",
                &[Developer, Service],
                &[Viewer, Editor, Admin, Owner],
            ),
            (
                "GetModuleSettings",
                &[Viewer, Editor, Admin, Owner, Developer, Service],
                &[],
            ),
            (
                "CheckModule",
                &[Viewer, Editor, Admin, Owner, Developer, Service],
                &[],
            ),
            (
                "UpdateModuleSettings",
                &[Admin, Owner, Developer, Service],
                &[Viewer, Editor],
            ),
            (
                "Reserve",
                &[Editor, Admin, Owner, Developer, Service],
                &[Viewer],
            ),
            (
                "CaptureHold",
                &[Editor, Admin, Owner, Developer, Service],
                &[Viewer],
            ),
            (
                "ReleaseHold",
                &[Editor, Admin, Owner, Developer, Service],
                &[Viewer],
            ),
            (
                "GetHold",
                &[Viewer, Editor, Admin, Owner, Developer, Service],
                &[],
            ),
            (
                "WatchBalance",
                &[Viewer, Editor, Admin, Owner, Developer, Service],
                &[],
            ),
            (
                "Refund",
                &[Developer, Service],
                &[Viewer, Editor, Admin, Owner],
            ),
            (
                "WatchModuleSettings",
                &[Viewer, Editor, Admin, Owner, Developer, Service],
                &[],
            ),
        ];
        assert_eq!(table.len(), RULES.len());
        for (method, allowed, denied) in table {
            let rule = RULES.iter().find(|r| r.method() == *method).expect(method);
            for role in *allowed {
                assert!(
                    rule.roles.contains(role),
                    "{method}: {role} should be allowed"
                );
            }
            for role in *denied {
                assert!(
                    !rule.roles.contains(role),
                    "{method}: {role} should be denied"
                );
            }
        }
    }

    #[test]
    fn only_health_and_reflection_are_public() {
        assert!(Policy::is_public("/grpc.health.v1.Health/Check"));
        assert!(Policy::is_public(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!Policy::is_public(
            "/igny8.billing.v1.BillingService/GetCreditCost"
        ));
        assert!(!Policy::is_public("/grpc.health.v1.HealthX/Check"));
    }
}
