//! Change notification for streams and caches: "account N changed", from
//! this process and, on PostgreSQL, from every replica.
//!
//! A writer commits, then says which accounts it changed:
//!
//! - on PostgreSQL the writing transaction runs `pg_notify(channel, '<id>')`,
//!   so a notification exists only for committed changes; one `LISTEN`
//!   connection per process and channel ([`ChangeHub::start`]) receives them
//!   from every replica;
//! - in-process, the writer calls [`ChangeHub::notify`] after its commit (the
//!   only path on SQLite, and the instant one on the writing replica).
//!
//! Subscribers never queue: each watched account has one
//! [`tokio::sync::watch`] generation counter, so a notification costs a
//! counter bump however slow the readers are, and a reader learns only
//! "changed since you last looked" and re-reads the current state. Memory is
//! O(watched accounts + subscribers), never O(changes).
//!
//! Caches register a hook ([`ChangeHub::on_change`]) that runs synchronously
//! for every notification, before any subscriber wakes: whoever observes a
//! change through a stream finds the cache already invalidated.
//!
//! When the `LISTEN` connection is lost, notifications sent meanwhile are
//! gone: after reconnecting, every watched account is treated as changed and
//! every hook gets [`Change::All`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use igny8_db::Db;
use tokio::sync::watch;

use crate::server::Drain;

/// Reconnect backoff of the `LISTEN` connection.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One notification, as seen by a [`ChangeHub::on_change`] hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// This account changed.
    Account(i64),
    /// Notifications may have been lost (the `LISTEN` connection dropped):
    /// treat every account as changed.
    All,
}

/// A synchronous change hook; must be quick (it runs on the notifying path).
pub type ChangeHook = Arc<dyn Fn(Change) + Send + Sync>;

#[derive(Default)]
struct Inner {
    /// Watched accounts: a generation counter each.
    watched: Mutex<HashMap<i64, watch::Sender<u64>>>,
    hooks: Mutex<Vec<ChangeHook>>,
}

/// Fans change notifications out to subscribers. Cheap to clone.
#[derive(Clone)]
pub struct ChangeHub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ChangeHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeHub")
            .field("watched", &self.watched_accounts())
            .finish_non_exhaustive()
    }
}

impl Default for ChangeHub {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeHub {
    /// A hub fed only in-process ([`ChangeHub::notify`]).
    pub fn new() -> Self {
        Self {
            inner: Arc::default(),
        }
    }

    /// A hub that, on PostgreSQL, also listens on `channel` (payload: the
    /// account id) with one connection taken from `db`'s pool, reconnecting
    /// with backoff, until `drain` fires. On SQLite only in-process
    /// notifications exist (a SQLite file has one writing process per
    /// service).
    pub fn start(db: &Db, channel: &'static str, drain: Drain) -> Self {
        let hub = Self::new();
        if let Db::Postgres(pool) = db {
            tokio::spawn(listen(pool.clone(), channel, hub.clone(), drain));
        }
        hub
    }

    /// Records that these accounts changed (after their commit).
    pub fn notify(&self, accounts: &[i64]) {
        for &account in accounts {
            self.run_hooks(Change::Account(account));
        }
        let watched = self.inner.watched.lock().expect("hub lock");
        for account in accounts {
            if let Some(tx) = watched.get(account) {
                tx.send_modify(|g| *g = g.wrapping_add(1));
            }
        }
    }

    /// Treats every account as changed (notifications may have been lost).
    pub fn notify_all(&self) {
        self.run_hooks(Change::All);
        let watched = self.inner.watched.lock().expect("hub lock");
        for tx in watched.values() {
            tx.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Runs `hook` for every notification of any account, before
    /// subscribers wake (for caches).
    pub fn on_change(&self, hook: ChangeHook) {
        self.inner.hooks.lock().expect("hub lock").push(hook);
    }

    fn run_hooks(&self, change: Change) {
        let hooks = self.inner.hooks.lock().expect("hub lock").clone();
        for hook in hooks {
            hook(change);
        }
    }

    /// Watches one account. Subscribe *before* reading the state you will
    /// compare against, so no change falls between the read and the watch.
    pub fn subscribe(&self, account: i64) -> Subscription {
        let mut watched = self.inner.watched.lock().expect("hub lock");
        let rx = watched
            .entry(account)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Subscription {
            rx: Some(rx),
            account,
            hub: self.inner.clone(),
        }
    }

    /// How many accounts have at least one subscriber.
    pub fn watched_accounts(&self) -> usize {
        self.inner.watched.lock().expect("hub lock").len()
    }
}

/// One subscriber's view of one account: "changed since last seen".
pub struct Subscription {
    rx: Option<watch::Receiver<u64>>,
    account: i64,
    hub: Arc<Inner>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// Marks everything so far as seen.
    pub fn mark_seen(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            rx.borrow_and_update();
        }
    }

    /// Waits until the account changes after the last [`Subscription::changed`]
    /// or [`Subscription::mark_seen`]; any number of changes in between wake
    /// it once.
    pub async fn changed(&mut self) {
        match self.rx.as_mut() {
            // The hub keeps the sender while this receiver lives.
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut watched = self.hub.watched.lock().expect("hub lock");
        if watched
            .get(&self.account)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            watched.remove(&self.account);
        }
    }
}

/// The per-process `LISTEN` loop.
async fn listen(pool: sqlx::PgPool, channel: &'static str, hub: ChangeHub, mut drain: Drain) {
    let mut backoff = BACKOFF_MIN;
    let mut warned = false;
    loop {
        let connected = tokio::select! {
            () = drain.wait() => return,
            r = connect(&pool, channel) => r,
        };
        let mut listener = match connected {
            Ok(listener) => listener,
            Err(e) => {
                if !warned {
                    tracing::warn!(channel, error = %e, "cannot LISTEN for changes yet; retrying with backoff (changes from other replicas are late until then)");
                    warned = true;
                }
                tokio::select! {
                    () = drain.wait() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if warned {
            tracing::info!(channel, "listening for changes again");
        } else {
            tracing::debug!(channel, "listening for changes");
        }
        warned = false;
        backoff = BACKOFF_MIN;
        // Anything sent while not listening is lost: wake every watcher.
        hub.notify_all();
        loop {
            let next = tokio::select! {
                () = drain.wait() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => match n.payload().trim().parse::<i64>() {
                    Ok(account) => hub.notify(&[account]),
                    Err(_) => {
                        tracing::warn!(
                            channel,
                            payload = n.payload(),
                            "ignoring a notification that is not an account id"
                        );
                    }
                },
                Ok(None) => {
                    tracing::warn!(channel, "LISTEN connection lost; reconnecting");
                    break;
                }
                Err(e) => {
                    tracing::warn!(channel, error = %e, "LISTEN connection failed; reconnecting");
                    break;
                }
            }
        }
        // A fresh listener next round; give a failing server a moment.
        drop(listener);
        tokio::select! {
            () = drain.wait() => return,
            () = tokio::time::sleep(BACKOFF_MIN) => {}
        }
    }
}

async fn connect(
    pool: &sqlx::PgPool,
    channel: &'static str,
) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn coalesces_and_cleans_up() {
        let hub = ChangeHub::new();
        let mut a = hub.subscribe(1);
        let mut b = hub.subscribe(1);
        assert_eq!(hub.watched_accounts(), 1);
        for _ in 0..10_000 {
            hub.notify(&[1, 2]);
        }
        // Ten thousand changes wake each reader once.
        tokio::time::timeout(Duration::from_secs(1), a.changed())
            .await
            .expect("woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), a.changed())
                .await
                .is_err(),
            "no second wake without a new change"
        );
        b.mark_seen();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), b.changed())
                .await
                .is_err()
        );
        hub.notify_all();
        tokio::time::timeout(Duration::from_secs(1), b.changed())
            .await
            .expect("woken by notify_all");
        drop(a);
        assert_eq!(hub.watched_accounts(), 1);
        drop(b);
        assert_eq!(
            hub.watched_accounts(),
            0,
            "the last subscriber removes the entry"
        );
    }
}
