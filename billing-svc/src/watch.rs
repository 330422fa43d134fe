//! `WatchBalance`: an account's balance, held and available credits, first
//! as they are, then again after every change.
//!
//! Changes come from the ledger writer: after each committed batch its
//! commit hook notifies this process's [`ChangeHub`], and on PostgreSQL the
//! batch's transaction also sends `pg_notify(`[`crate::BALANCE_CHANNEL`]`)`,
//! which every replica's hub hears. A hold that expires changes `available`
//! without any write, so a stream also wakes at the earliest expiry of the
//! account's active holds.

use std::time::Duration;

use igny8_db::on_pool;
use igny8_proto::billing::v1 as pb;
use service_kit::{
    ChangeHub,
    streams::{Read, Watched},
};
use tokio::time::Instant;
use tonic::Status;

use crate::{
    error::BillingError,
    ledger::{Ledger, micros},
};

/// Balance, credits held by active unexpired holds, and the earliest expiry
/// among those holds, in one read.
const STATE: &str = "SELECT a.credits, \
     CAST(COALESCE((SELECT SUM(h.credits) FROM credit_holds h \
        WHERE h.account_id = a.id AND h.state = 'active' AND h.expires_at_us > $2), 0) AS BIGINT), \
     (SELECT MIN(h.expires_at_us) FROM credit_holds h \
        WHERE h.account_id = a.id AND h.state = 'active' AND h.expires_at_us > $2) \
     FROM accounts a WHERE a.id = $1";

/// Installs the ledger writer's commit hook: every committed batch notifies
/// `changes` of the accounts it changed.
pub fn notify_commits(writer: &crate::writer::Writer, changes: &ChangeHub) {
    let changes = changes.clone();
    writer.set_on_commit(std::sync::Arc::new(move |accounts: &[i64]| {
        changes.notify(accounts);
    }));
}

/// Checks `low_balance_threshold`: 0 means none, negative is refused.
pub fn threshold(request: &pb::WatchBalanceRequest) -> Result<Option<i64>, BillingError> {
    match request.low_balance_threshold {
        t if t < 0 => Err(BillingError::field(
            "low_balance_threshold",
            format!("must be 0 (no alert) or a positive number of credits, got {t}"),
        )),
        0 => Ok(None),
        t => Ok(Some(t)),
    }
}

/// One account's balance, as a `WatchBalance` stream sees it.
pub struct WatchedBalance {
    ledger: Ledger,
    account: i64,
    threshold: Option<i64>,
    /// (balance, held) last sent.
    last: Option<(i64, i64)>,
    /// Whether available was below the threshold in the last message.
    was_low: bool,
}

impl WatchedBalance {
    /// A stream's view of `account` in `ledger` (its database and clock),
    /// alerting below `threshold`.
    pub fn new(ledger: Ledger, account: i64, threshold: Option<i64>) -> Self {
        Self {
            ledger,
            account,
            threshold,
            last: None,
            was_low: false,
        }
    }
}

impl Watched for WatchedBalance {
    type Message = pb::WatchBalanceResponse;

    async fn read(&mut self) -> Result<Read<Self::Message>, Status> {
        let now_us = micros(self.ledger.now());
        let found: Option<(i64, i64, Option<i64>)> = on_pool!(self.ledger.db(), pool => {
            sqlx::query_as(STATE).bind(self.account).bind(now_us).fetch_optional(pool).await
        })
        .map_err(BillingError::from)?;
        let (balance, held, next_expiry_us) =
            found.ok_or(BillingError::AccountNotFound(self.account))?;
        // Just past the expiry: a hold stops counting once its time has passed.
        let wake_at = next_expiry_us.map(|at| {
            let after = u64::try_from(at.saturating_sub(now_us)).unwrap_or(0) + 1_000;
            Instant::now() + Duration::from_micros(after)
        });
        // A wake-up without a visible change (a notification heard twice:
        // in-process and over LISTEN) sends nothing.
        if self.last == Some((balance, held)) {
            return Ok(Read {
                message: None,
                wake_at,
            });
        }
        self.last = Some((balance, held));
        let available = balance - held;
        let low = self.threshold.is_some_and(|t| available < t);
        // Once per crossing: true on the message where available falls below
        // the threshold (the first message too, when it already is), false
        // while it stays below, armed again once it is back above.
        let low_balance = low && !self.was_low;
        self.was_low = low;
        Ok(Read {
            message: Some(pb::WatchBalanceResponse {
                account_id: self.account,
                balance,
                held,
                available,
                low_balance,
            }),
            wake_at,
        })
    }
}
