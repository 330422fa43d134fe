//! The directory: the platform's `users` and `accounts` tables, read-only,
//! behind a cache whose staleness is bounded.

use std::{
    collections::HashSet,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use igny8_db::{Db, on_pool};
use moka::future::Cache;

/// How long a directory answer may be served from memory. Changes made by the
/// platform (user moved, deactivated, role changed, account suspended) are
/// honoured within this bound — under the 1 s the contract allows.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_millis(500);

/// The longest cache TTL accepted, whatever the configuration: with the time
/// a request takes around the lookup, answers stay well under the 1 s rule.
/// [`CachedDirectory::new`] caps larger values to this.
pub const MAX_CACHE_TTL: Duration = Duration::from_millis(900);

/// A row of `users`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserRecord {
    /// `users.id`.
    pub id: i64,
    /// The user's current account; `None` when removed from every account.
    pub account_id: Option<i64>,
    /// The directory role, as stored.
    pub role: String,
    /// False once the user is deactivated.
    pub is_active: bool,
}

/// Whether an account may change state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountStatus {
    /// Reads and mutations allowed.
    Active,
    /// Reads only. Unknown statuses are treated as suspended (fail closed).
    Suspended,
}

/// A row of `accounts`, as far as authorization needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    /// `accounts.id`.
    pub id: i64,
    /// `accounts.status`.
    pub status: AccountStatus,
}

/// The directory could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("directory unavailable: {0}")]
pub struct DirectoryError(pub String);

/// Read access to users and accounts.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// The user with this id, if any.
    async fn user(&self, id: i64) -> Result<Option<UserRecord>, DirectoryError>;
    /// The account with this id, if any.
    async fn account(&self, id: i64) -> Result<Option<AccountRecord>, DirectoryError>;
    /// The user with this id and, when they belong to one, their current
    /// account: what a user's request on their own account needs. A
    /// directory that can read both at once should override this; the
    /// default reads the user, then the account.
    async fn user_with_account(
        &self,
        id: i64,
    ) -> Result<(Option<UserRecord>, Option<AccountRecord>), DirectoryError> {
        let user = self.user(id).await?;
        let account = match user.as_ref().and_then(|u| u.account_id) {
            Some(account) => self.account(account).await?,
            None => None,
        };
        Ok((user, account))
    }
}

#[async_trait]
impl<D: Directory + ?Sized> Directory for Arc<D> {
    async fn user(&self, id: i64) -> Result<Option<UserRecord>, DirectoryError> {
        (**self).user(id).await
    }
    async fn account(&self, id: i64) -> Result<Option<AccountRecord>, DirectoryError> {
        (**self).account(id).await
    }
    async fn user_with_account(
        &self,
        id: i64,
    ) -> Result<(Option<UserRecord>, Option<AccountRecord>), DirectoryError> {
        (**self).user_with_account(id).await
    }
}

/// The directory in the service's own database (PostgreSQL or SQLite).
#[derive(Debug, Clone)]
pub struct SqlDirectory {
    db: Db,
}

impl SqlDirectory {
    /// Reads the directory tables through this pool.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

fn unavailable(e: sqlx::Error) -> DirectoryError {
    DirectoryError(e.to_string())
}

#[async_trait]
impl Directory for SqlDirectory {
    #[tracing::instrument(level = "debug", skip(self), err)]
    async fn user(&self, id: i64) -> Result<Option<UserRecord>, DirectoryError> {
        const SQL: &str = "SELECT id, account_id, role, is_active FROM users WHERE id = $1";
        on_pool!(&self.db, pool => sqlx::query_as::<_, UserRecord>(SQL).bind(id).fetch_optional(pool).await)
            .map_err(unavailable)
    }

    #[tracing::instrument(level = "debug", skip(self), err)]
    async fn account(&self, id: i64) -> Result<Option<AccountRecord>, DirectoryError> {
        const SQL: &str = "SELECT id, status FROM accounts WHERE id = $1";
        let row: Option<(i64, String)> =
            on_pool!(&self.db, pool => sqlx::query_as(SQL).bind(id).fetch_optional(pool).await)
                .map_err(unavailable)?;
        Ok(row.map(|(id, status)| account_record(id, &status)))
    }

    /// One read: the user joined to their account.
    #[tracing::instrument(level = "debug", skip(self), err)]
    async fn user_with_account(
        &self,
        id: i64,
    ) -> Result<(Option<UserRecord>, Option<AccountRecord>), DirectoryError> {
        const SQL: &str = "SELECT u.id, u.account_id, u.role, u.is_active, a.id, a.status \
             FROM users u LEFT JOIN accounts a ON a.id = u.account_id WHERE u.id = $1";
        type Row = (i64, Option<i64>, String, bool, Option<i64>, Option<String>);
        let row: Option<Row> =
            on_pool!(&self.db, pool => sqlx::query_as(SQL).bind(id).fetch_optional(pool).await)
                .map_err(unavailable)?;
        Ok(match row {
            None => (None, None),
            Some((id, account_id, role, is_active, account, status)) => (
                Some(UserRecord {
                    id,
                    account_id,
                    role,
                    is_active,
                }),
                account
                    .zip(status)
                    .map(|(account, status)| account_record(account, &status)),
            ),
        })
    }
}

/// Unknown statuses are suspended (fail closed).
fn account_record(id: i64, status: &str) -> AccountRecord {
    AccountRecord {
        id,
        status: if status == "active" {
            AccountStatus::Active
        } else {
            AccountStatus::Suspended
        },
    }
}

/// A directory in front of another, answering from memory for at most `ttl`.
///
/// The age of an answer is counted from when its read *began*, not from when
/// it was stored, so a slow read cannot stretch the staleness bound: an
/// answer older than `ttl` is never served. Absent users and accounts are
/// cached too (a user created a moment ago is seen within the same bound).
/// Failures are never cached. Concurrent misses for one key share a single
/// load.
///
/// An answer past three quarters of its `ttl` is still served, and read
/// again in the background (once at a time per key), so a key in steady use
/// is renewed before it expires instead of making every request that
/// arrives at expiry wait for the read. Under load that wait was the tail of
/// one account's latency: every request arriving while the read ran queued
/// behind it. (Renewing from half the TTL read rarely used keys about twice
/// as often, for little gain.)
pub struct CachedDirectory<D> {
    inner: Arc<D>,
    ttl: Duration,
    users: Tier<Option<UserRecord>>,
    accounts: Tier<Option<AccountRecord>>,
}

/// One cache of answers, with the keys being read again in the background.
struct Tier<V> {
    cache: Cache<i64, (Instant, V)>,
    renewing: Arc<Mutex<HashSet<i64>>>,
}

impl<V: Clone + Send + Sync + 'static> Tier<V> {
    fn new(ttl: Duration) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            renewing: Arc::default(),
        }
    }
}

impl<D: Directory> CachedDirectory<D> {
    /// Caches `inner` for `ttl` (see [`DEFAULT_CACHE_TTL`]), capped at
    /// [`MAX_CACHE_TTL`].
    pub fn new(inner: D, ttl: Duration) -> Self {
        let ttl = ttl.min(MAX_CACHE_TTL);
        Self {
            inner: Arc::new(inner),
            ttl,
            users: Tier::new(ttl),
            accounts: Tier::new(ttl),
        }
    }

    /// The TTL in force (the configured one, capped).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// A cached answer no older than `ttl`, counted from the start of its read;
/// past three quarters of it, read again in the background.
async fn fresh<V, F, Fut>(
    tier: &Tier<V>,
    id: i64,
    ttl: Duration,
    load: F,
) -> Result<V, DirectoryError>
where
    V: Clone + Send + Sync + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<V, DirectoryError>> + Send + 'static,
{
    if ttl.is_zero() {
        return load().await;
    }
    let cache = &tier.cache;
    // A hit (nearly every call) builds no read: `try_get_with` would need
    // the read's future, and its own bookkeeping, before looking.
    let (read_at, value) = match cache.get(&id).await {
        Some(hit) => hit,
        None => {
            let started = Instant::now();
            let read = load();
            cache
                .try_get_with(id, async move { read.await.map(|v| (started, v)) })
                .await
                .map_err(|e| (*e).clone())?
        }
    };
    let age = read_at.elapsed();
    if age < ttl {
        if age >= ttl / 4 * 3 {
            renew(tier, id, load());
        }
        return Ok(value);
    }
    // The read that produced this answer began too long ago (it was slow,
    // or this call joined it late): read again, now.
    cache.invalidate(&id).await;
    let started = Instant::now();
    let value = load().await?;
    cache.insert(id, (started, value.clone())).await;
    Ok(value)
}

/// Reads `id` again in the background unless a read of it is under way
/// (outside a Tokio runtime, it is left to expire). A failed read leaves the
/// cached answer to expire as usual.
fn renew<V, Fut>(tier: &Tier<V>, id: i64, read: Fut)
where
    V: Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<V, DirectoryError>> + Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if !tier.renewing.lock().expect("renewing lock").insert(id) {
        return;
    }
    let cache = tier.cache.clone();
    let renewing = tier.renewing.clone();
    runtime.spawn(async move {
        let started = Instant::now();
        if let Ok(value) = read.await {
            cache.insert(id, (started, value)).await;
        }
        renewing.lock().expect("renewing lock").remove(&id);
    });
}

#[async_trait]
impl<D: Directory> Directory for CachedDirectory<D> {
    /// A miss reads the user together with their account, and caches both
    /// (the account aged from the same read), so the account lookup that
    /// follows in the same request is answered from memory.
    async fn user(&self, id: i64) -> Result<Option<UserRecord>, DirectoryError> {
        fresh(&self.users, id, self.ttl, || {
            let inner = self.inner.clone();
            let accounts = self.accounts.cache.clone();
            let ttl = self.ttl;
            async move {
                let started = Instant::now();
                let (user, account) = inner.user_with_account(id).await?;
                if let Some(account_id) = user.as_ref().and_then(|u| u.account_id)
                    && !ttl.is_zero()
                {
                    accounts.insert(account_id, (started, account)).await;
                }
                Ok(user)
            }
        })
        .await
    }

    async fn account(&self, id: i64) -> Result<Option<AccountRecord>, DirectoryError> {
        fresh(&self.accounts, id, self.ttl, || {
            let inner = self.inner.clone();
            async move { inner.account(id).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    /// Counts loads; the test flips `active` and `down`.
    #[derive(Default)]
    struct Counting {
        loads: AtomicUsize,
        account_loads: AtomicUsize,
        /// When set, each load takes a permit first.
        gate: Option<Arc<tokio::sync::Semaphore>>,
        active: Mutex<bool>,
        down: Mutex<bool>,
        /// Extra latency of each load.
        delay_ms: u64,
    }

    #[async_trait]
    impl Directory for Counting {
        async fn user(&self, id: i64) -> Result<Option<UserRecord>, DirectoryError> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            tokio::time::sleep(Duration::from_millis(20 + self.delay_ms)).await;
            if *self.down.lock().unwrap() {
                return Err(DirectoryError("down".into()));
            }
            Ok(Some(UserRecord {
                id,
                account_id: Some(1),
                role: "owner".into(),
                is_active: *self.active.lock().unwrap(),
            }))
        }
        async fn account(&self, id: i64) -> Result<Option<AccountRecord>, DirectoryError> {
            self.account_loads.fetch_add(1, Ordering::SeqCst);
            Ok(Some(account_record(id, "active")))
        }
    }

    #[tokio::test]
    async fn answers_near_expiry_are_renewed_in_the_background() {
        let gate = Arc::new(tokio::sync::Semaphore::new(1));
        let inner = Arc::new(Counting {
            gate: Some(gate.clone()),
            ..Default::default()
        });
        *inner.active.lock().unwrap() = true;
        let cached = Arc::new(CachedDirectory::new(inner.clone(), MAX_CACHE_TTL));
        assert!(cached.user(1).await.unwrap().unwrap().is_active);
        tokio::time::sleep(MAX_CACHE_TTL / 4 * 3 + Duration::from_millis(10)).await;
        // Near expiry, with the directory's next read held at the gate:
        // every caller is answered from memory (none waits for the read),
        // and the key is read again once, in the background.
        *inner.active.lock().unwrap() = false;
        let calls = (0..10).map(|_| {
            let c = cached.clone();
            tokio::spawn(async move { c.user(1).await })
        });
        for call in calls.collect::<Vec<_>>() {
            assert!(call.await.unwrap().unwrap().unwrap().is_active);
        }
        let renewal_started = async {
            while inner.loads.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), renewal_started)
            .await
            .expect("a renewal started");
        gate.add_permits(1);
        // The renewed answer replaces the old one, without another read.
        let renewed = async {
            while cached.user(1).await.unwrap().unwrap().is_active {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), renewed)
            .await
            .expect("the renewed answer is served");
        assert_eq!(inner.loads.load(Ordering::SeqCst), 2, "one renewal");
    }

    #[tokio::test]
    async fn a_user_read_caches_their_account_from_the_same_read() {
        let inner = Arc::new(Counting::default());
        let cached = CachedDirectory::new(inner.clone(), Duration::from_millis(200));
        assert_eq!(cached.user(7).await.unwrap().unwrap().account_id, Some(1));
        assert_eq!(inner.account_loads.load(Ordering::SeqCst), 1);
        assert_eq!(
            cached.account(1).await.unwrap().unwrap().status,
            AccountStatus::Active
        );
        assert_eq!(
            inner.account_loads.load(Ordering::SeqCst),
            1,
            "the account came with the user"
        );
        // Aged from the user's read: both expire together.
        tokio::time::sleep(Duration::from_millis(300)).await;
        cached.account(1).await.unwrap();
        assert_eq!(inner.account_loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn answers_are_reused_within_the_ttl_then_refreshed() {
        let inner = Arc::new(Counting::default());
        *inner.active.lock().unwrap() = true;
        let cached = CachedDirectory::new(inner.clone(), Duration::from_millis(200));
        assert!(cached.user(1).await.unwrap().unwrap().is_active);
        *inner.active.lock().unwrap() = false;
        assert!(
            cached.user(1).await.unwrap().unwrap().is_active,
            "served from memory"
        );
        assert_eq!(inner.loads.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !cached.user(1).await.unwrap().unwrap().is_active,
            "refreshed after the ttl"
        );
    }

    #[tokio::test]
    async fn the_ttl_is_capped_and_counted_from_the_start_of_the_read() {
        let inner = Arc::new(Counting::default());
        let cached = CachedDirectory::new(inner.clone(), Duration::from_secs(3600));
        assert_eq!(
            cached.ttl(),
            MAX_CACHE_TTL,
            "configuration cannot lift the bound"
        );

        // A read slower than the TTL is never served from memory afterwards.
        let slow = Arc::new(Counting {
            delay_ms: 120,
            ..Default::default()
        });
        let cached = CachedDirectory::new(slow.clone(), Duration::from_millis(100));
        cached.user(1).await.unwrap();
        let loads = slow.loads.load(Ordering::SeqCst);
        assert_eq!(loads, 2, "the answer was already too old: read again");
    }

    #[tokio::test]
    async fn failures_are_not_cached_and_concurrent_misses_share_a_load() {
        let inner = Arc::new(Counting::default());
        *inner.down.lock().unwrap() = true;
        let cached = Arc::new(CachedDirectory::new(inner.clone(), DEFAULT_CACHE_TTL));
        assert!(cached.user(1).await.is_err());
        *inner.down.lock().unwrap() = false;
        assert!(
            cached.user(1).await.is_ok(),
            "the failure was not remembered"
        );

        let before = inner.loads.load(Ordering::SeqCst);
        let calls = (0..10).map(|_| {
            let c = cached.clone();
            tokio::spawn(async move { c.user(2).await })
        });
        for call in calls.collect::<Vec<_>>() {
            call.await.unwrap().unwrap();
        }
        assert_eq!(inner.loads.load(Ordering::SeqCst) - before, 1);
    }
}
