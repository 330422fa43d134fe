//! The `module_settings` table, and the cache that keeps `CheckModule` off
//! the database.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use auth_interceptor::memo::{Flights, Memo};
use chrono::{DateTime, Utc};
use igny8_db::{BeginWrite, Db, on_pool};
use service_kit::{Change, ChangeHub};

use crate::error::SettingsError;

/// How long a replica may answer from memory. An update made on this replica
/// is visible at once (the cache is written through); one made on another
/// replica as soon as its change notification arrives (PostgreSQL), and in
/// any case within this bound — the backstop for a lost notification.
pub const CACHE_TTL: Duration = Duration::from_millis(500);

/// The PostgreSQL `NOTIFY` channel of settings changes: sent by the updating
/// transaction, the account id as payload.
pub const SETTINGS_CHANNEL: &str = "igny8_settings";

/// `pg_notify` from inside the updating transaction: only committed changes
/// notify.
const NOTIFY: &str = "SELECT pg_notify($1, $2)";

/// One account's switches, in [`crate::modules::FIELDS`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switches {
    /// The account.
    pub account_id: i64,
    /// Enabled flags, in module order.
    pub enabled: [bool; 8],
    /// When the row was created.
    pub created_at: DateTime<Utc>,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct Row {
    account_id: i64,
    planner_enabled: bool,
    writer_enabled: bool,
    thinker_enabled: bool,
    automation_enabled: bool,
    site_builder_enabled: bool,
    linker_enabled: bool,
    optimizer_enabled: bool,
    publisher_enabled: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<Row> for Switches {
    fn from(r: Row) -> Self {
        Switches {
            account_id: r.account_id,
            enabled: [
                r.planner_enabled,
                r.writer_enabled,
                r.thinker_enabled,
                r.automation_enabled,
                r.site_builder_enabled,
                r.linker_enabled,
                r.optimizer_enabled,
                r.publisher_enabled,
            ],
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

const SELECT: &str = "SELECT account_id, planner_enabled, writer_enabled, thinker_enabled, \
     automation_enabled, site_builder_enabled, linker_enabled, optimizer_enabled, \
     publisher_enabled, created_at, updated_at FROM module_settings WHERE account_id = $1";

/// Creates the default row unless one exists; never fails on a race.
const CREATE: &str = "INSERT INTO module_settings (account_id, created_at, updated_at) \
     VALUES ($1, $2, $2) ON CONFLICT (account_id) DO NOTHING";

/// Sets the switches given (NULL keeps the current value).
const UPDATE: &str = "UPDATE module_settings SET \
     planner_enabled = COALESCE($1, planner_enabled), \
     writer_enabled = COALESCE($2, writer_enabled), \
     thinker_enabled = COALESCE($3, thinker_enabled), \
     automation_enabled = COALESCE($4, automation_enabled), \
     site_builder_enabled = COALESCE($5, site_builder_enabled), \
     linker_enabled = COALESCE($6, linker_enabled), \
     optimizer_enabled = COALESCE($7, optimizer_enabled), \
     publisher_enabled = COALESCE($8, publisher_enabled), \
     updated_at = $9 WHERE account_id = $10 \
     RETURNING account_id, planner_enabled, writer_enabled, thinker_enabled, \
     automation_enabled, site_builder_enabled, linker_enabled, optimizer_enabled, \
     publisher_enabled, created_at, updated_at";

/// A cached copy and when the read that produced it started.
#[derive(Clone)]
struct Cached {
    switches: Arc<Switches>,
    read_started: Instant,
}

/// Most accounts whose switches (and last local write) are kept in memory.
const CACHE_CAPACITY: usize = 100_000;

/// Module settings with a bounded-staleness read cache.
///
/// A copy is served only while its read began less than the TTL ago, and
/// only if no local write committed after that read began: a slow read
/// racing an update can never put an older copy back in front of the
/// update's result. Callers that miss one account at once share one read.
#[derive(Clone)]
pub struct SettingsStore {
    db: Db,
    cache: Arc<Memo<i64, Cached>>,
    /// Reads of accounts that missed, in progress.
    reads: Arc<Flights<i64, Result<Cached, SettingsError>>>,
    /// When this replica last committed an update, per account (kept for
    /// twice the TTL: a write only matters while a copy read before it
    /// could still be served).
    writes: Arc<Memo<i64, Instant>>,
    /// Change notifications heard (any replica), per account: copies read
    /// before are not served. Kept only while a copy could outlive them.
    heard: Arc<Mutex<Heard>>,
    changes: ChangeHub,
    ttl: Duration,
}

/// Notifications heard, for the cache.
#[derive(Default)]
struct Heard {
    accounts: HashMap<i64, Instant>,
    /// When notifications may last have been lost.
    all: Option<Instant>,
}

impl Heard {
    fn latest(&self, account: i64) -> Option<Instant> {
        self.accounts.get(&account).copied().max(self.all)
    }
}

impl std::fmt::Debug for SettingsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettingsStore").finish_non_exhaustive()
    }
}

impl SettingsStore {
    /// A store over this database, caching for `ttl`.
    pub fn new(db: Db, ttl: Duration) -> Self {
        Self {
            db,
            cache: Arc::new(Memo::new(CACHE_CAPACITY)),
            reads: Arc::default(),
            writes: Arc::new(Memo::new(CACHE_CAPACITY)),
            heard: Arc::default(),
            changes: ChangeHub::new(),
            ttl,
        }
    }

    /// Uses `hub` for change notifications: updates notify it (in-process),
    /// and every notification it carries — from any replica, on PostgreSQL
    /// — makes the account's cached copy unservable at once (before any
    /// stream subscriber hears of the change).
    pub fn with_changes(mut self, hub: ChangeHub) -> Self {
        let heard = self.heard.clone();
        // A copy lives at most `ttl` after its read ends; like `writes`, a
        // notification is kept for twice that (a read may be slow).
        let keep = self.ttl * 2;
        hub.on_change(Arc::new(move |change| {
            let now = Instant::now();
            let mut heard = heard.lock().expect("lock");
            match change {
                Change::Account(account) => {
                    heard.accounts.insert(account, now);
                    if heard.accounts.len() > 4096 {
                        heard
                            .accounts
                            .retain(|_, at| now.duration_since(*at) <= keep);
                    }
                }
                Change::All => heard.all = Some(now),
            }
        }));
        self.changes = hub;
        self
    }

    /// The change notifications of this store's accounts.
    pub fn changes(&self) -> &ChangeHub {
        &self.changes
    }

    async fn read(&self, account: i64) -> Result<Cached, SettingsError> {
        let read_started = Instant::now();
        let switches = Arc::new(self.load_or_create(account).await?);
        Ok(Cached {
            switches,
            read_started,
        })
    }

    /// Keeps `copy` for the TTL from the start of its read.
    fn remember(&self, account: i64, copy: Cached) {
        let ttl = self.ttl;
        self.cache
            .insert(account, copy, Instant::now(), |c| c.read_started + ttl);
    }

    /// When this replica last committed an update of `account`, if a copy
    /// read before it could still be served.
    fn written(&self, account: i64) -> Option<Instant> {
        let keep = self.ttl * 2;
        self.writes.get(&account).filter(|at| at.elapsed() < keep)
    }

    /// The account's switches from the database, created with every module
    /// enabled on first read. Refreshes the cache.
    #[tracing::instrument(name = "settings.get_or_create", skip(self), err(level = "debug"))]
    pub async fn get_or_create(&self, account: i64) -> Result<Arc<Switches>, SettingsError> {
        let fresh = self.read(account).await?;
        self.remember(account, fresh.clone());
        Ok(fresh.switches)
    }

    /// The account's switches, from memory when fresh enough.
    pub async fn cached(&self, account: i64) -> Result<Arc<Switches>, SettingsError> {
        let hit = self
            .cache
            .get(&account)
            .filter(|c| c.read_started.elapsed() < self.ttl);
        let entry = match hit {
            Some(entry) => entry,
            None => {
                self.reads
                    .run(account, || async {
                        let fresh = self.read(account).await?;
                        self.remember(account, fresh.clone());
                        Ok(fresh)
                    })
                    .await?
            }
        };
        let heard = self.heard.lock().expect("lock").latest(account);
        match self.written(account).max(heard) {
            Some(written) if written > entry.read_started => self.get_or_create(account).await,
            _ => Ok(entry.switches),
        }
    }

    async fn load_or_create(&self, account: i64) -> Result<Switches, SettingsError> {
        let found: Option<Row> = on_pool!(&self.db, pool => sqlx::query_as(SELECT).bind(account).fetch_optional(pool).await)?;
        if let Some(row) = found {
            return Ok(row.into());
        }
        let now = Utc::now();
        let row: Row = on_pool!(&self.db, pool => {
            sqlx::query(CREATE).bind(account).bind(now).execute(pool).await?;
            sqlx::query_as(SELECT).bind(account).fetch_one(pool).await
        })?;
        Ok(row.into())
    }

    /// Applies `changes` (one `Some` per switch to set) and returns the new
    /// switches; creates the row first when needed. The cache is written
    /// through, so this replica's next read sees the change; on PostgreSQL
    /// the transaction also notifies [`SETTINGS_CHANNEL`] (other replicas),
    /// and after the commit this process's subscribers are notified.
    #[tracing::instrument(name = "settings.update", skip(self), err(level = "debug"))]
    pub async fn update(
        &self,
        account: i64,
        changes: [Option<bool>; 8],
    ) -> Result<Arc<Switches>, SettingsError> {
        let now = Utc::now();
        let notify = self.db.backend() == igny8_db::Backend::Postgres;
        let row: Row = on_pool!(&self.db, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query(CREATE).bind(account).bind(now).execute(&mut *tx).await?;
            let mut query = sqlx::query_as(UPDATE);
            for change in changes {
                query = query.bind(change);
            }
            let row = query.bind(now).bind(account).fetch_one(&mut *tx).await?;
            if notify {
                sqlx::query(NOTIFY).bind(SETTINGS_CHANNEL).bind(account.to_string()).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            row
        });
        let switches = Arc::new(Switches::from(row));
        let committed = Instant::now();
        let keep = self.ttl * 2;
        self.writes
            .insert(account, committed, committed, |at| *at + keep);
        self.remember(
            account,
            Cached {
                switches: switches.clone(),
                read_started: committed,
            },
        );
        self.changes.notify(&[account]);
        Ok(switches)
    }
}
