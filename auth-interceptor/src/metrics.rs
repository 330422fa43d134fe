//! Counters for authentication outcomes.

use std::sync::{Arc, OnceLock};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Auth counters: outcomes by kind, and stale-token account mismatches.
#[derive(Debug, Clone, Default)]
pub struct AuthMetrics {
    outcomes: Family<OutcomeLabels, Counter>,
    /// The `ok` series, the one nearly every call counts: kept once
    /// created, so a call does not look it up in the family.
    ok: Arc<OnceLock<Counter>>,
    account_mismatch: Counter,
}

impl AuthMetrics {
    /// Registers the counters under `igny8_auth_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "igny8_auth_outcomes",
            "Authentication outcomes by kind (ok, unauthenticated, permission_denied, ...)",
            self.outcomes.clone(),
        );
        registry.register(
            "igny8_auth_account_mismatch",
            "Access tokens whose account_id hint differed from the user's current account",
            self.account_mismatch.clone(),
        );
    }

    pub(crate) fn outcome(&self, outcome: &'static str) {
        if outcome == "ok" {
            self.ok
                .get_or_init(|| {
                    self.outcomes
                        .get_or_create(&OutcomeLabels { outcome })
                        .clone()
                })
                .inc();
            return;
        }
        self.outcomes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub(crate) fn mismatch(&self) {
        self.account_mismatch.inc();
    }

    /// How many stale-token mismatches were seen.
    pub fn account_mismatches(&self) -> u64 {
        self.account_mismatch.get()
    }

    /// How many calls ended with this outcome.
    pub fn outcomes(&self, outcome: &'static str) -> u64 {
        self.outcomes
            .get_or_create(&OutcomeLabels { outcome })
            .get()
    }
}
