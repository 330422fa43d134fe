//! The directory: the platform's `users` and `accounts` tables, read-only,
//! behind a cache whose staleness is bounded.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use igny8_db::{Db, on_pool};

use crate::memo::{Flights, Memo};

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

    /// [`Directory::user_with_account`] for each of `ids` (no repeats), in
    /// the order given. A directory that can read many at once should
    /// override this; the default reads them one by one.
    async fn users_with_accounts(
        &self,
        ids: &[i64],
    ) -> Result<Vec<UserWithAccount>, DirectoryError> {
        let mut found = Vec::with_capacity(ids.len());
        for &id in ids {
            let (user, account) = self.user_with_account(id).await?;
            found.push((id, user, account));
        }
        Ok(found)
    }

    /// [`Directory::account`] for each of `ids` (no repeats), in the order
    /// given; the default reads them one by one.
    async fn accounts(
        &self,
        ids: &[i64],
    ) -> Result<Vec<(i64, Option<AccountRecord>)>, DirectoryError> {
        let mut found = Vec::with_capacity(ids.len());
        for &id in ids {
            found.push((id, self.account(id).await?));
        }
        Ok(found)
    }
}

/// A user id with what [`Directory::user_with_account`] answers for it.
pub type UserWithAccount = (i64, Option<UserRecord>, Option<AccountRecord>);

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
    async fn users_with_accounts(
        &self,
        ids: &[i64],
    ) -> Result<Vec<UserWithAccount>, DirectoryError> {
        (**self).users_with_accounts(ids).await
    }
    async fn accounts(
        &self,
        ids: &[i64],
    ) -> Result<Vec<(i64, Option<AccountRecord>)>, DirectoryError> {
        (**self).accounts(ids).await
    }
}

/// Users joined to their account (`LEFT JOIN`: the account columns are NULL
/// for a user in no account), restricted by `$where`.
macro_rules! user_with_account {
    ($where:literal) => {
        concat!(
            "SELECT u.id, u.account_id, u.role, u.is_active, a.id, a.status \
             FROM users u LEFT JOIN accounts a ON a.id = u.account_id ",
            $where
        )
    };
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
        const SQL: &str = user_with_account!("WHERE u.id = $1");
        let row: Option<UserAccountRow> =
            on_pool!(&self.db, pool => sqlx::query_as(SQL).bind(id).fetch_optional(pool).await)
                .map_err(unavailable)?;
        Ok(match row {
            None => (None, None),
            Some(row) => {
                let (_, user, account) = user_with_account(row);
                (user, account)
            }
        })
    }

    /// One read for all of `ids`.
    #[tracing::instrument(level = "debug", skip_all, fields(ids = ids.len()), err)]
    async fn users_with_accounts(
        &self,
        ids: &[i64],
    ) -> Result<Vec<UserWithAccount>, DirectoryError> {
        let rows: Vec<UserAccountRow> = self
            .fetch_by_ids(
                user_with_account!("WHERE u.id = ANY($1)"),
                user_with_account!("WHERE u.id IN (SELECT value FROM json_each($1))"),
                ids,
            )
            .await?;
        let mut found: HashMap<i64, UserWithAccount> = rows
            .into_iter()
            .map(|row| (row.0, user_with_account(row)))
            .collect();
        Ok(ids
            .iter()
            .map(|id| found.remove(id).unwrap_or((*id, None, None)))
            .collect())
    }

    /// One read for all of `ids`.
    #[tracing::instrument(level = "debug", skip_all, fields(ids = ids.len()), err)]
    async fn accounts(
        &self,
        ids: &[i64],
    ) -> Result<Vec<(i64, Option<AccountRecord>)>, DirectoryError> {
        let rows: Vec<(i64, String)> = self
            .fetch_by_ids(
                "SELECT id, status FROM accounts WHERE id = ANY($1)",
                "SELECT id, status FROM accounts WHERE id IN (SELECT value FROM json_each($1))",
                ids,
            )
            .await?;
        let found: HashMap<i64, String> = rows.into_iter().collect();
        Ok(ids
            .iter()
            .map(|&id| (id, found.get(&id).map(|status| account_record(id, status))))
            .collect())
    }
}

type UserAccountRow = (i64, Option<i64>, String, bool, Option<i64>, Option<String>);

fn user_with_account(
    (id, account_id, role, is_active, account, status): UserAccountRow,
) -> UserWithAccount {
    (
        id,
        Some(UserRecord {
            id,
            account_id,
            role,
            is_active,
        }),
        account
            .zip(status)
            .map(|(account, status)| account_record(account, &status)),
    )
}

impl SqlDirectory {
    /// The rows of `ids`, in one statement: `postgres` takes them as an
    /// array, `sqlite` as a JSON array.
    async fn fetch_by_ids<R>(
        &self,
        postgres: &'static str,
        sqlite: &'static str,
        ids: &[i64],
    ) -> Result<Vec<R>, DirectoryError>
    where
        R: Send
            + Unpin
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        match &self.db {
            Db::Postgres(pool) => sqlx::query_as(postgres).bind(ids).fetch_all(pool).await,
            Db::Sqlite(pool) => {
                let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
                sqlx::query_as(sqlite)
                    .bind(format!("[{list}]"))
                    .fetch_all(pool)
                    .await
            }
        }
        .map_err(unavailable)
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
/// Answers in use are read again in the background at three quarters of
/// their `ttl` (see [`Usage`] for which count as in use), many keys per
/// read, so a key in steady use is renewed before it expires instead of
/// making the request that arrives at expiry — and every request behind it
/// — wait for the read. Under load that wait was the tail of one account's
/// latency. An answer left to expire that is called in its last quarter is
/// served and read again too. (Renewing from half the TTL read rarely used
/// keys about twice as often, for little gain.)
pub struct CachedDirectory<D> {
    inner: Arc<D>,
    ttl: Duration,
    users: Tier<Option<UserRecord>>,
    accounts: Tier<Option<AccountRecord>>,
}

/// One cache of answers, with the keys being read again in the background.
struct Tier<V> {
    answers: Answers<V>,
    /// Reads of keys that missed, in progress: a caller that misses the
    /// same key meanwhile waits for that read instead of starting its own.
    /// A failure is not cached, but the callers that waited for that read
    /// get its answer.
    loading: Flights<i64, Result<(Instant, V), DirectoryError>>,
    renewals: Arc<Mutex<Renewals>>,
    /// How long renewals gather: [`RENEW_GATHER`], or a sixteenth of a
    /// shorter TTL's, so they still land before expiry.
    gather: Duration,
}

/// Keys queued for, or in, a background read.
#[derive(Default)]
struct Renewals {
    /// Queued or being read: not queued again.
    members: HashSet<i64>,
    /// Waiting for the next read.
    queued: Vec<i64>,
    /// A task will take `queued`.
    scheduled: bool,
}

/// Answers and when the read that produced each began, with the renewals
/// they have coming.
struct Answers<V> {
    memo: Arc<Memo<i64, Answer<V>>>,
    ttl: Duration,
    /// How long after its read began an answer is due for renewal: three
    /// quarters of the TTL, less the time renewals gather.
    renew_after: Duration,
    due: Arc<Due>,
}

/// A cached answer: when the read that produced it began, and how callers
/// have used it since it was stored.
#[derive(Clone)]
struct Answer<V> {
    read_at: Instant,
    value: V,
    usage: Usage,
}

/// Whether any call read an answer since it was stored ([`Usage::USED`]),
/// and how many renewals in a row before it had no caller (the low bits).
struct Usage(AtomicU8);

impl Usage {
    const USED: u8 = 0x80;

    fn idle(idle: u8) -> Self {
        Self(AtomicU8::new(idle))
    }

    /// Records a call. Only the first call of a generation writes, so a
    /// key read on both cores does not bounce its cache line on every call.
    fn mark(&self) {
        if self.0.load(Ordering::Relaxed) & Self::USED == 0 {
            self.0.fetch_or(Self::USED, Ordering::Relaxed);
        }
    }

    /// The idle count of the answer that renews this one, or `None` when it
    /// has gone unused for [`IDLE_RENEWALS`] renewals and is left to expire.
    fn next_idle(&self) -> Option<u8> {
        let state = self.0.load(Ordering::Relaxed);
        if state & Self::USED != 0 {
            Some(0)
        } else if state < IDLE_RENEWALS {
            Some(state + 1)
        } else {
            None
        }
    }
}

// Not derived: an atomic is not `Clone`. A clone carries the state it had.
impl Clone for Usage {
    fn clone(&self) -> Self {
        Self(AtomicU8::new(self.0.load(Ordering::Relaxed)))
    }
}

/// How many renewals in a row an answer nobody read is still renewed. A key
/// called at least about once a second (three renewals at three quarters of
/// the default TTL) never has a caller wait for its read; a key that stopped
/// being called costs at most this many rows of batched reads.
const IDLE_RENEWALS: u8 = 2;

/// The renewals coming: a key and when its answer is due, in the order the
/// answers were stored (which is about the order of the times: every answer
/// is due the same time after its read began).
#[derive(Default)]
struct Due {
    queue: Mutex<VecDeque<(Instant, i64)>>,
    /// A task is renewing what falls due (see [`Tier::keep_renewing`]).
    running: AtomicBool,
}

// Not derived: `V` need not be `Clone` for the handle to be.
impl<V> Clone for Answers<V> {
    fn clone(&self) -> Self {
        Self {
            memo: self.memo.clone(),
            ttl: self.ttl,
            renew_after: self.renew_after,
            due: self.due.clone(),
        }
    }
}

/// At most this many answers per tier; when full, stale answers are
/// dropped first, then the oldest.
const TIER_CAPACITY: usize = 100_000;

impl<V: Clone> Answers<V> {
    /// The answer for `id` and when its read began; counts as a use.
    fn get(&self, id: i64) -> Option<(Instant, V)> {
        self.memo.get_with(&id, |a| {
            a.usage.mark();
            (a.read_at, a.value.clone())
        })
    }

    /// Stores `value`, read by a read that began at `read_at`, and puts it
    /// in line for renewal. An answer renewing one nobody read counts one
    /// more idle renewal; any other starts from none.
    fn put(&self, id: i64, read_at: Instant, value: V) {
        let idle = self
            .memo
            .get_with(&id, |a| a.usage.next_idle())
            .flatten()
            .unwrap_or(0);
        let ttl = self.ttl;
        let answer = Answer {
            read_at,
            value,
            usage: Usage::idle(idle),
        };
        self.memo
            .insert(id, answer, Instant::now(), |a| a.read_at + ttl);
        let mut queue = self.due.queue.lock().expect("due lock");
        // Bounded like the answers; past it, a key is renewed by its callers.
        if queue.len() < TIER_CAPACITY {
            queue.push_back((read_at + self.renew_after, id));
        }
    }

    fn remove(&self, id: i64) {
        self.memo.remove(&id);
    }

    /// When the next renewal falls due; `None` (and the renewing task marked
    /// stopped) when none is in line.
    fn next_due(&self) -> Option<Instant> {
        let queue = self.due.queue.lock().expect("due lock");
        let next = queue.front().map(|&(at, _)| at);
        if next.is_none() {
            self.due.running.store(false, Ordering::Release);
        }
        next
    }

    /// Takes the keys due by `by` whose answers are worth renewing (read
    /// lately, see [`Usage`]) and are not being read already; marks them as
    /// being read. Keys whose answer was replaced since they were put in
    /// line are skipped: the newer answer has its own place.
    fn take_due(&self, by: Instant, renewals: &Mutex<Renewals>) -> Vec<i64> {
        let mut due = Vec::new();
        {
            let mut queue = self.due.queue.lock().expect("due lock");
            while let Some(&(at, id)) = queue.front() {
                if at > by {
                    break;
                }
                queue.pop_front();
                due.push(id);
            }
        }
        let mut renewals = renewals.lock().expect("renewals lock");
        due.retain(|&id| {
            let worth = self.memo.get_with(&id, |a| {
                a.read_at + self.renew_after <= by && a.usage.next_idle().is_some()
            });
            worth == Some(true) && renewals.members.insert(id)
        });
        due
    }
}

/// How long renewals gather before one read takes them all, at most: a small
/// part of the quarter of the TTL left when a key is queued.
const RENEW_GATHER: Duration = Duration::from_millis(20);

/// The most keys one renewal read asks for.
const RENEW_BATCH: usize = 500;

impl<V: Clone + Send + Sync + 'static> Tier<V> {
    fn new(ttl: Duration) -> Self {
        let gather = RENEW_GATHER.min(ttl / 16);
        Self {
            answers: Answers {
                memo: Arc::new(Memo::new(TIER_CAPACITY)),
                ttl,
                renew_after: (ttl / 4 * 3).saturating_sub(gather),
                due: Arc::default(),
            },
            loading: Flights::default(),
            renewals: Arc::default(),
            gather,
        }
    }

    /// After a call: queues `renew` (an answer the call found in its last
    /// quarter) with [`Tier::renew`], and starts [`Tier::keep_renewing`]
    /// unless it runs. `reader` makes the read both use, only when one is
    /// needed (most calls need neither).
    fn in_background<F, Fut>(&self, renew: Option<i64>, reader: impl Fn() -> F)
    where
        F: Fn(Vec<i64>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Some(id) = renew {
            self.renew(id, reader());
        }
        if !self.renewing() {
            self.keep_renewing(reader());
        }
    }

    /// Whether [`Tier::keep_renewing`] has a task running.
    fn renewing(&self) -> bool {
        self.answers.due.running.load(Ordering::Acquire)
    }

    /// Starts the task that renews answers as they fall due, unless it runs
    /// already: it sleeps until the next answer in line is due, takes every
    /// answer due within `gather` of it that was read lately (see
    /// [`Usage`]), reads them with one `read` and stores what it finds —
    /// which puts them in line again. It ends when nothing is in line (every
    /// answer left unused for [`IDLE_RENEWALS`] renewals); the next call
    /// starts it again. Outside a Tokio runtime nothing is renewed.
    ///
    /// Renewal does not wait for a call to land in the last quarter of the
    /// TTL ([`Tier::renew`]): a key called a few times a second, but never
    /// in that window, would otherwise expire and make its next caller wait
    /// for the read.
    fn keep_renewing<F, Fut>(&self, read: F)
    where
        F: Fn(Vec<i64>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            // Under the lock `next_due` marks the task stopped with.
            let queue = self.answers.due.queue.lock().expect("due lock");
            if queue.is_empty() || self.answers.due.running.swap(true, Ordering::AcqRel) {
                return;
            }
        }
        let (answers, renewals, gather) =
            (self.answers.clone(), self.renewals.clone(), self.gather);
        runtime.spawn(async move {
            while let Some(at) = answers.next_due() {
                tokio::time::sleep_until(at.into()).await;
                let ids = answers.take_due(Instant::now() + gather, &renewals);
                if ids.is_empty() {
                    continue;
                }
                read(ids.clone()).await;
                let mut renewals = renewals.lock().expect("renewals lock");
                for id in &ids {
                    renewals.members.remove(id);
                }
            }
        });
    }

    /// Queues `id` to be read again in the background, unless it is queued
    /// or being read already. Keys queued within `gather` of each
    /// other are read together, by `read`, which stores what it finds; a
    /// failed read leaves the cached answers to expire as usual. Outside a
    /// Tokio runtime nothing is renewed.
    fn renew<F, Fut>(&self, id: i64, read: F)
    where
        F: FnOnce(Vec<i64>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut renewals = self.renewals.lock().expect("renewals lock");
            if !renewals.members.insert(id) {
                return;
            }
            renewals.queued.push(id);
            if renewals.scheduled {
                return;
            }
            renewals.scheduled = true;
        }
        let renewals = self.renewals.clone();
        let gather = self.gather;
        runtime.spawn(async move {
            tokio::time::sleep(gather).await;
            let ids = {
                let mut renewals = renewals.lock().expect("renewals lock");
                renewals.scheduled = false;
                std::mem::take(&mut renewals.queued)
            };
            read(ids.clone()).await;
            let mut renewals = renewals.lock().expect("renewals lock");
            for id in &ids {
                renewals.members.remove(id);
            }
        });
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

/// Reads `ids` again, [`RENEW_BATCH`] at a time, and caches each user with
/// their account (aged from the same read).
async fn renew_users<D: Directory>(
    inner: Arc<D>,
    users: Answers<Option<UserRecord>>,
    accounts: Answers<Option<AccountRecord>>,
    ids: Vec<i64>,
) {
    for chunk in ids.chunks(RENEW_BATCH) {
        let started = Instant::now();
        let Ok(found) = inner.users_with_accounts(chunk).await else {
            continue;
        };
        for (id, user, account) in found {
            cache_account_of(&accounts, started, user.as_ref(), account);
            users.put(id, started, user);
        }
    }
}

/// Reads `ids` again, [`RENEW_BATCH`] at a time, and caches them.
async fn renew_accounts<D: Directory>(
    inner: Arc<D>,
    accounts: Answers<Option<AccountRecord>>,
    ids: Vec<i64>,
) {
    for chunk in ids.chunks(RENEW_BATCH) {
        let started = Instant::now();
        let Ok(found) = inner.accounts(chunk).await else {
            continue;
        };
        for (id, account) in found {
            accounts.put(id, started, account);
        }
    }
}

/// Caches the account read with `user` (when they have one), aged from the
/// same read.
fn cache_account_of(
    accounts: &Answers<Option<AccountRecord>>,
    started: Instant,
    user: Option<&UserRecord>,
    account: Option<AccountRecord>,
) {
    if let Some(account_id) = user.and_then(|u| u.account_id) {
        accounts.put(account_id, started, account);
    }
}

/// A cached answer no older than `ttl`, counted from the start of its read,
/// and whether it is past three quarters of `ttl` (time to read it again).
async fn fresh<V, F, Fut>(
    tier: &Tier<V>,
    id: i64,
    ttl: Duration,
    load: F,
) -> Result<(V, bool), DirectoryError>
where
    V: Clone + Send + Sync + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<V, DirectoryError>> + Send + 'static,
{
    if ttl.is_zero() {
        return Ok((load().await?, false));
    }
    let (read_at, value) = match tier.answers.get(id) {
        Some(hit) => hit,
        None => {
            let answers = &tier.answers;
            tier.loading
                .run(id, || async {
                    let started = Instant::now();
                    let read = load().await.map(|v| (started, v));
                    if let Ok((_, value)) = &read {
                        answers.put(id, started, value.clone());
                    }
                    read
                })
                .await?
        }
    };
    let age = read_at.elapsed();
    if age < ttl {
        return Ok((value, age >= ttl / 4 * 3));
    }
    // The read that produced this answer began too long ago (it was slow,
    // or this call joined it late): read again, now.
    tier.answers.remove(id);
    let started = Instant::now();
    let value = load().await?;
    tier.answers.put(id, started, value.clone());
    Ok((value, false))
}

#[async_trait]
impl<D: Directory> Directory for CachedDirectory<D> {
    /// A miss reads the user together with their account, and caches both
    /// (the account aged from the same read), so the account lookup that
    /// follows in the same request is answered from memory.
    async fn user(&self, id: i64) -> Result<Option<UserRecord>, DirectoryError> {
        let (user, renew) = fresh(&self.users, id, self.ttl, || {
            let inner = self.inner.clone();
            let accounts = self.accounts.answers.clone();
            let ttl = self.ttl;
            async move {
                let started = Instant::now();
                let (user, account) = inner.user_with_account(id).await?;
                if !ttl.is_zero() {
                    cache_account_of(&accounts, started, user.as_ref(), account);
                }
                Ok(user)
            }
        })
        .await?;
        self.users.in_background(renew.then_some(id), || {
            let (inner, users) = (self.inner.clone(), self.users.answers.clone());
            let accounts = self.accounts.answers.clone();
            move |ids| renew_users(inner.clone(), users.clone(), accounts.clone(), ids)
        });
        Ok(user)
    }

    async fn account(&self, id: i64) -> Result<Option<AccountRecord>, DirectoryError> {
        let (account, renew) = fresh(&self.accounts, id, self.ttl, || {
            let inner = self.inner.clone();
            async move { inner.account(id).await }
        })
        .await?;
        self.accounts.in_background(renew.then_some(id), || {
            let (inner, accounts) = (self.inner.clone(), self.accounts.answers.clone());
            move |ids| renew_accounts(inner.clone(), accounts.clone(), ids)
        });
        Ok(account)
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
        /// Calls of `users_with_accounts`.
        batches: AtomicUsize,
        /// Calls of `user`: reads of one user.
        one_by_one: AtomicUsize,
    }

    impl Counting {
        /// User `id`, an owner of account 1, active as the test last set.
        fn record(&self, id: i64) -> UserRecord {
            UserRecord {
                id,
                account_id: Some(1),
                role: "owner".into(),
                is_active: *self.active.lock().unwrap(),
            }
        }
    }

    /// Waits until `done` answers true, checking every 5 ms, for at most 5 s.
    async fn wait_until<F, Fut>(what: &str, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let wait = async {
            while !done().await {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect(what);
    }

    #[async_trait]
    impl Directory for Counting {
        async fn user(&self, id: i64) -> Result<Option<UserRecord>, DirectoryError> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            self.one_by_one.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            tokio::time::sleep(Duration::from_millis(20 + self.delay_ms)).await;
            if *self.down.lock().unwrap() {
                return Err(DirectoryError("down".into()));
            }
            Ok(Some(self.record(id)))
        }
        async fn account(&self, id: i64) -> Result<Option<AccountRecord>, DirectoryError> {
            self.account_loads.fetch_add(1, Ordering::SeqCst);
            Ok(Some(account_record(id, "active")))
        }
        async fn users_with_accounts(
            &self,
            ids: &[i64],
        ) -> Result<Vec<UserWithAccount>, DirectoryError> {
            // One read, however many keys (as one statement would be).
            self.batches.fetch_add(1, Ordering::SeqCst);
            self.loads.fetch_add(ids.len(), Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(ids
                .iter()
                .map(|&id| (id, Some(self.record(id)), Some(account_record(1, "active"))))
                .collect())
        }
    }

    type Cached = Arc<CachedDirectory<Arc<Counting>>>;

    /// A directory whose loads each take a permit of the returned gate
    /// (`permits` to start with), behind a cache with `ttl`; its users are
    /// active.
    fn gated(
        permits: usize,
        ttl: Duration,
    ) -> (Arc<tokio::sync::Semaphore>, Arc<Counting>, Cached) {
        let gate = Arc::new(tokio::sync::Semaphore::new(permits));
        let inner = Arc::new(Counting {
            gate: Some(gate.clone()),
            ..Default::default()
        });
        *inner.active.lock().unwrap() = true;
        let cached = Arc::new(CachedDirectory::new(inner.clone(), ttl));
        (gate, inner, cached)
    }

    /// Each of `ids` asked for by a task of its own, at once.
    fn spawn_users(
        cached: &Cached,
        ids: impl IntoIterator<Item = i64>,
    ) -> Vec<tokio::task::JoinHandle<Result<Option<UserRecord>, DirectoryError>>> {
        ids.into_iter()
            .map(|id| {
                let c = cached.clone();
                tokio::spawn(async move { c.user(id).await })
            })
            .collect()
    }

    #[tokio::test]
    async fn keys_in_use_are_renewed_together_before_they_expire() {
        let inner = Arc::new(Counting::default());
        *inner.active.lock().unwrap() = true;
        let cached = Arc::new(CachedDirectory::new(inner.clone(), MAX_CACHE_TTL));
        let ids: Vec<i64> = (1..=50).collect();
        // All read at once, so all fall due together; each used once more.
        for read in spawn_users(&cached, ids.iter().copied()) {
            read.await.unwrap().unwrap();
        }
        for &id in &ids {
            assert!(cached.user(id).await.unwrap().unwrap().is_active);
        }
        assert_eq!(inner.loads.load(Ordering::SeqCst), 50);
        *inner.active.lock().unwrap() = false;
        // Nobody calls near expiry: the renewal does not wait for a caller.
        // One batch reads every key, and every answer is then the new one.
        wait_until("every key was read again", || async {
            inner.loads.load(Ordering::SeqCst) >= 100
        })
        .await;
        assert_eq!(inner.batches.load(Ordering::SeqCst), 1, "one batch read");
        for &id in &ids {
            wait_until("the renewed answers are served", || async {
                !cached.user(id).await.unwrap().unwrap().is_active
            })
            .await;
        }
        assert_eq!(inner.loads.load(Ordering::SeqCst), 100, "no other read");
        assert_eq!(
            inner.one_by_one.load(Ordering::SeqCst),
            50,
            "no caller read"
        );
    }

    #[tokio::test]
    async fn a_key_called_outside_the_last_quarter_never_makes_a_caller_wait() {
        let inner = Arc::new(Counting::default());
        let cached = CachedDirectory::new(inner.clone(), MAX_CACHE_TTL);
        cached.user(1).await.unwrap();
        // Every 560 ms of a 900 ms TTL: never in the last quarter of the
        // first answer (675–900 ms), and past its TTL at the second call.
        // Renewals in the background keep every call answered from memory
        // (each has over 200 ms to land before the answer it renews
        // expires).
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(560)).await;
            cached.user(1).await.unwrap();
        }
        assert_eq!(
            inner.one_by_one.load(Ordering::SeqCst),
            1,
            "only the first call read"
        );
        assert!(inner.batches.load(Ordering::SeqCst) >= 3, "renewed instead");
    }

    #[tokio::test]
    async fn a_key_nobody_calls_is_renewed_a_bounded_number_of_times() {
        let inner = Arc::new(Counting::default());
        let ttl = Duration::from_millis(200);
        let cached = CachedDirectory::new(inner.clone(), ttl);
        cached.user(1).await.unwrap();
        wait_until("renewals stopped", || async { !cached.users.renewing() }).await;
        assert_eq!(
            inner.batches.load(Ordering::SeqCst),
            usize::from(IDLE_RENEWALS),
            "renewed {IDLE_RENEWALS} times, then left to expire"
        );
        assert!(cached.users.answers.due.queue.lock().unwrap().is_empty());
        tokio::time::sleep(ttl * 2).await;
        assert_eq!(
            inner.batches.load(Ordering::SeqCst),
            usize::from(IDLE_RENEWALS)
        );
        // Called again, it is read again and back in line.
        cached.user(1).await.unwrap();
        assert_eq!(inner.one_by_one.load(Ordering::SeqCst), 2);
        assert!(cached.users.renewing());
    }

    #[tokio::test]
    async fn answers_near_expiry_are_renewed_in_the_background() {
        let (gate, inner, cached) = gated(1, MAX_CACHE_TTL);
        assert!(cached.user(1).await.unwrap().unwrap().is_active);
        tokio::time::sleep(MAX_CACHE_TTL / 4 * 3 + Duration::from_millis(10)).await;
        // Near expiry, with the directory's next read held at the gate:
        // every caller is answered from memory (none waits for the read),
        // and the key is read again once, in the background.
        *inner.active.lock().unwrap() = false;
        for call in spawn_users(&cached, [1; 10]) {
            assert!(call.await.unwrap().unwrap().unwrap().is_active);
        }
        wait_until("a renewal started", || async {
            inner.loads.load(Ordering::SeqCst) >= 2
        })
        .await;
        gate.add_permits(1);
        // The renewed answer replaces the old one, without another read.
        wait_until("the renewed answer is served", || async {
            !cached.user(1).await.unwrap().unwrap().is_active
        })
        .await;
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
        // Aged from the user's read (both started just before it), so both
        // expire together.
        let (user_read, _) = cached.users.answers.get(7).unwrap();
        let (account_read, _) = cached.accounts.answers.get(1).unwrap();
        assert!(account_read.duration_since(user_read) < Duration::from_millis(5));
        assert!(user_read.duration_since(account_read).is_zero());
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
        for call in spawn_users(&cached, [2; 10]) {
            call.await.unwrap().unwrap();
        }
        assert_eq!(inner.loads.load(Ordering::SeqCst) - before, 1);
        assert!(cached.users.loading.is_empty(), "the read is done");
    }

    #[tokio::test]
    async fn a_read_every_caller_gave_up_on_is_started_again() {
        let (gate, inner, cached) = gated(0, DEFAULT_CACHE_TTL);
        // Three callers miss user 1 and wait for the one read, held at the
        // gate; all three give up.
        let calls = spawn_users(&cached, [1; 3]);
        wait_until("the read started", || async {
            inner.loads.load(Ordering::SeqCst) == 1
        })
        .await;
        // (A waiter takes over a read whose caller gave up, so each of
        // them may have started one.)
        for call in &calls {
            call.abort();
        }
        for call in calls {
            assert!(call.await.unwrap_err().is_cancelled());
        }
        assert!(cached.users.loading.is_empty(), "nothing left behind");
        // The next caller reads again, and is answered.
        let before = inner.loads.load(Ordering::SeqCst);
        gate.add_permits(1);
        assert!(cached.user(1).await.unwrap().unwrap().is_active);
        assert_eq!(inner.loads.load(Ordering::SeqCst), before + 1);
        assert!(cached.users.loading.is_empty());
    }
}
