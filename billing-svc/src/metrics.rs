//! Deduct outcomes as a Prometheus counter,
//! `igny8_ledger_deduct_outcomes_total{outcome}`.
//!
//! The outcome is read from what the handler returned, in one place, rather
//! than counted along its many early returns: [`Metered`] wraps the service
//! and classifies each `Deduct` result. Every other RPC passes straight
//! through (the server stack already counts every RPC by status code).

use igny8_proto::billing::v1::{self as pb, billing_service_server::BillingService};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tonic::{Code, Request, Response, Status};

/// How a `Deduct` call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeductOutcome {
    /// Credits were deducted and a ledger row written.
    Ok,
    /// An identical earlier request was replayed; nothing changed.
    Replayed,
    /// The balance could not cover it (`FAILED_PRECONDITION`).
    Insufficient,
    /// The idempotency key was used for a different request (`ALREADY_EXISTS`).
    KeyReused,
    /// The request was malformed (`INVALID_ARGUMENT`).
    Invalid,
    /// Anything else: database trouble, a missing account.
    Error,
}

impl DeductOutcome {
    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeductOutcome::Ok => "ok",
            DeductOutcome::Replayed => "replayed",
            DeductOutcome::Insufficient => "insufficient",
            DeductOutcome::KeyReused => "key_reused",
            DeductOutcome::Invalid => "invalid",
            DeductOutcome::Error => "error",
        }
    }

    /// Classifies a handler result. The codes are the ones
    /// [`crate::error::BillingError`] maps its variants to.
    pub fn of(result: &Result<Response<pb::DeductResponse>, Status>) -> Self {
        match result {
            Ok(response) if response.get_ref().replayed => DeductOutcome::Replayed,
            Ok(_) => DeductOutcome::Ok,
            Err(status) => match status.code() {
                Code::FailedPrecondition => DeductOutcome::Insufficient,
                Code::AlreadyExists => DeductOutcome::KeyReused,
                Code::InvalidArgument => DeductOutcome::Invalid,
                _ => DeductOutcome::Error,
            },
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The deduct outcome counter.
#[derive(Debug, Clone, Default)]
pub struct DeductMetrics {
    outcomes: Family<OutcomeLabels, Counter>,
}

impl DeductMetrics {
    /// Registers `igny8_ledger_deduct_outcomes_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "igny8_ledger_deduct_outcomes",
            "Deduct calls by outcome (ok, replayed, insufficient, key_reused, invalid, error)",
            self.outcomes.clone(),
        );
    }

    /// Counts one outcome.
    pub fn record(&self, outcome: DeductOutcome) {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// How many calls ended with `outcome`.
    pub fn count(&self, outcome: DeductOutcome) -> u64 {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .get()
    }
}

/// A [`BillingService`] that counts `Deduct` outcomes of the one it wraps.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    deducts: DeductMetrics,
}

impl<S> Metered<S> {
    /// Wraps `inner`, counting into `deducts`.
    pub fn new(inner: S, deducts: DeductMetrics) -> Self {
        Self { inner, deducts }
    }
}

#[tonic::async_trait]
impl<S: BillingService> BillingService for Metered<S> {
    async fn get_credit_cost(
        &self,
        request: Request<pb::GetCreditCostRequest>,
    ) -> Result<Response<pb::GetCreditCostResponse>, Status> {
        self.inner.get_credit_cost(request).await
    }

    async fn list_credit_costs(
        &self,
        request: Request<pb::ListCreditCostsRequest>,
    ) -> Result<Response<pb::ListCreditCostsResponse>, Status> {
        self.inner.list_credit_costs(request).await
    }

    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        self.inner.check(request).await
    }

    async fn deduct(
        &self,
        request: Request<pb::DeductRequest>,
    ) -> Result<Response<pb::DeductResponse>, Status> {
        // Calls the auth layer refused never get here: they are counted in
        // igny8_auth_outcomes_total instead.
        let result = self.inner.deduct(request).await;
        self.deducts.record(DeductOutcome::of(&result));
        result
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        self.inner.get_balance(request).await
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        self.inner.list_transactions(request).await
    }

    async fn grant(
        &self,
        request: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::GrantResponse>, Status> {
        self.inner.grant(request).await
    }

    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        self.inner.reserve(request).await
    }

    async fn capture_hold(
        &self,
        request: Request<pb::CaptureHoldRequest>,
    ) -> Result<Response<pb::CaptureHoldResponse>, Status> {
        self.inner.capture_hold(request).await
    }

    async fn release_hold(
        &self,
        request: Request<pb::ReleaseHoldRequest>,
    ) -> Result<Response<pb::ReleaseHoldResponse>, Status> {
        self.inner.release_hold(request).await
    }

    async fn get_hold(
        &self,
        request: Request<pb::GetHoldRequest>,
    ) -> Result<Response<pb::GetHoldResponse>, Status> {
        self.inner.get_hold(request).await
    }

    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::RefundResponse>, Status> {
        self.inner.refund(request).await
    }

    type WatchBalanceStream = S::WatchBalanceStream;

    async fn watch_balance(
        &self,
        request: Request<pb::WatchBalanceRequest>,
    ) -> Result<Response<Self::WatchBalanceStream>, Status> {
        self.inner.watch_balance(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_status_mapping() {
        let ok = |replayed| {
            Ok(Response::new(pb::DeductResponse {
                replayed,
                ..Default::default()
            }))
        };
        assert_eq!(DeductOutcome::of(&ok(false)), DeductOutcome::Ok);
        assert_eq!(DeductOutcome::of(&ok(true)), DeductOutcome::Replayed);
        for (code, outcome) in [
            (Code::FailedPrecondition, DeductOutcome::Insufficient),
            (Code::AlreadyExists, DeductOutcome::KeyReused),
            (Code::InvalidArgument, DeductOutcome::Invalid),
            (Code::NotFound, DeductOutcome::Error),
            (Code::Internal, DeductOutcome::Error),
            (Code::Unavailable, DeductOutcome::Error),
        ] {
            assert_eq!(
                DeductOutcome::of(&Err(Status::new(code, "x"))),
                outcome,
                "{code:?}"
            );
        }
    }
}
