//! Operator actions on the directory (`accounts`, `users`) and the credit
//! ledger, for development and support.
//!
//! Credits only ever move through [`billing_svc::ledger::Ledger`], with
//! billing's own grant fingerprint, so `accounts.credits == sum(ledger)`
//! holds and a grant retried with the same idempotency key is a replay.

use billing_svc::{
    error::BillingError,
    ledger::{Applied, Entry, Kind, Ledger},
    service::{MAX_CREDITS, MAX_KEY_LEN, MAX_TEXT_LEN, grant_fingerprint},
};
use chrono::Utc;
use igny8_db::{Db, PoolConfig, is_unique_violation, on_pool};

use crate::error::CtlError;

/// Longest account name accepted.
pub const MAX_NAME_LEN: usize = 200;
/// Longest email accepted.
pub const MAX_EMAIL_LEN: usize = 254;

/// The idempotency key of an account's initial credits.
pub const INITIAL_CREDITS_KEY: &str = "igny8ctl:initial-credits";

/// An `accounts` row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Account {
    /// Id.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// `active` or `suspended`.
    pub status: String,
    /// Balance.
    pub credits: i64,
}

/// A `users` row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct User {
    /// Id.
    pub id: i64,
    /// Current account, if any.
    pub account_id: Option<i64>,
    /// Directory role.
    pub role: String,
    /// False when deactivated.
    pub is_active: bool,
    /// Email.
    pub email: String,
}

/// An account's balance next to its ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    /// The account.
    pub account: Account,
    /// Ledger rows for it.
    pub ledger_rows: i64,
    /// Their signed sum.
    pub ledger_sum: i64,
}

/// A grant to apply.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    /// Credits to add (> 0).
    pub credits: i64,
    /// Why (stored as the ledger row's description).
    pub reason: String,
    /// Idempotency key, unique per account.
    pub idempotency_key: String,
    /// Who, free text stored on the row.
    pub actor: String,
}

/// Directory and ledger access for one database.
#[derive(Debug, Clone)]
pub struct Operator {
    db: Db,
}

const ACCOUNT_COLUMNS: &str = "SELECT id, name, status, credits FROM accounts WHERE id = $1";
const USER_COLUMNS: &str = "SELECT id, account_id, role, is_active, email FROM users WHERE id = $1";

impl Operator {
    /// Opens the database and, unless `migrate` is false, applies pending
    /// migrations.
    pub async fn open(database_url: &str, migrate: bool) -> Result<Self, CtlError> {
        let db = Db::connect(
            database_url,
            &PoolConfig {
                max_connections: 2,
                ..PoolConfig::default()
            },
        )
        .await
        .map_err(|e| {
            CtlError::Invalid(format!(
                "cannot open the database {}: {e}",
                igny8_db::redact_url(database_url)
            ))
        })?;
        if migrate {
            db.migrate().await?;
        }
        Ok(Self { db })
    }

    /// An operator over an existing pool.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The pool.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.db.close().await;
    }

    /// The account, if it exists.
    pub async fn account(&self, id: i64) -> Result<Option<Account>, CtlError> {
        on_pool!(&self.db, pool => sqlx::query_as(ACCOUNT_COLUMNS).bind(id).fetch_optional(pool).await)
            .map_err(CtlError::query("reading the account"))
    }

    async fn existing_account(&self, id: i64) -> Result<Account, CtlError> {
        self.account(id).await?.ok_or_else(|| {
            CtlError::NotFound(format!(
                "account {id} does not exist (create it with `igny8ctl account create --id {id} --name …`)"
            ))
        })
    }

    /// The user, if it exists.
    pub async fn user(&self, id: i64) -> Result<Option<User>, CtlError> {
        on_pool!(&self.db, pool => sqlx::query_as(USER_COLUMNS).bind(id).fetch_optional(pool).await)
            .map_err(CtlError::query("reading the user"))
    }

    async fn existing_user(&self, id: i64) -> Result<User, CtlError> {
        self.user(id).await?.ok_or_else(|| {
            CtlError::NotFound(format!(
                "user {id} does not exist (create it with `igny8ctl user create --id {id} --email … --role …`)"
            ))
        })
    }

    /// Inserts an account row with a zero balance; `None` picks the next
    /// free id. Returns the id.
    async fn insert_account(
        &self,
        id: Option<i64>,
        name: &str,
        status: &str,
    ) -> Result<Option<i64>, CtlError> {
        let result = match id {
            Some(id) => on_pool!(&self.db, pool => sqlx::query(
                    "INSERT INTO accounts (id, name, status, credits) \
                     VALUES ($1, $2, $3, 0) ON CONFLICT (id) DO NOTHING")
                .bind(id).bind(name).bind(status)
                .execute(pool).await.map(|r| (r.rows_affected() == 1).then_some(id))),
            None => on_pool!(&self.db, pool => sqlx::query_scalar(
                    "INSERT INTO accounts (id, name, status, credits) \
                     SELECT COALESCE(MAX(id), 0) + 1, $1, $2, 0 FROM accounts RETURNING id")
                .bind(name).bind(status)
                .fetch_optional(pool).await),
        };
        match result {
            Ok(id) => Ok(id),
            // Two creators picked the same next id: the caller retries.
            Err(e) if is_unique_violation(&e) => Ok(None),
            Err(e) => Err(CtlError::query("creating the account")(e)),
        }
    }

    /// Creates an account (`id` `None`: the next free id) and grants its
    /// initial credits through the ledger.
    pub async fn create_account(
        &self,
        id: Option<i64>,
        name: &str,
        credits: i64,
        suspended: bool,
        actor: &str,
    ) -> Result<(Account, Option<Applied>), CtlError> {
        let name = validate_name(name)?;
        validate_amount("--credits", credits, 0)?;
        let status = if suspended { "suspended" } else { "active" };
        let mut attempts = 0;
        let id = loop {
            match self.insert_account(id, &name, status).await? {
                Some(id) => break id,
                None if id.is_some() || attempts >= 5 => {
                    let taken = id.unwrap_or_default();
                    return Err(CtlError::Conflict(match id {
                        Some(_) => format!(
                            "account {taken} already exists; pick another --id, or leave --id out to use the next free one"
                        ),
                        None => "could not pick a free account id (other writers keep taking it); pass --id".into(),
                    }));
                }
                None => attempts += 1,
            }
        };
        let applied = if credits > 0 {
            Some(
                self.grant(
                    id,
                    &GrantRequest {
                        credits,
                        reason: "initial credits".into(),
                        idempotency_key: INITIAL_CREDITS_KEY.into(),
                        actor: actor.to_owned(),
                    },
                )
                .await?,
            )
        } else {
            None
        };
        Ok((self.existing_account(id).await?, applied))
    }

    /// Sets an account's status. Returns the account as it was before.
    pub async fn set_account_status(&self, id: i64, suspended: bool) -> Result<Account, CtlError> {
        let before = self.existing_account(id).await?;
        let status = if suspended { "suspended" } else { "active" };
        on_pool!(&self.db, pool => sqlx::query("UPDATE accounts SET status = $1, updated_at = $2 WHERE id = $3")
            .bind(status).bind(Utc::now()).bind(id).execute(pool).await.map(|r| r.rows_affected()))
            .map_err(CtlError::query("updating the account"))?;
        Ok(before)
    }

    /// Creates a user (`id` `None`: the next free id).
    pub async fn create_user(
        &self,
        id: Option<i64>,
        email: &str,
        role: &str,
        account: Option<i64>,
        active: bool,
    ) -> Result<User, CtlError> {
        let email = validate_email(email)?;
        if let Some(account) = account {
            self.existing_account(account).await?;
        }
        for _ in 0..5 {
            let result = match id {
                Some(id) => on_pool!(&self.db, pool => sqlx::query_scalar(
                        "INSERT INTO users (id, account_id, role, is_active, email) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING RETURNING id")
                    .bind(id).bind(account).bind(role).bind(active).bind(&email)
                    .fetch_optional(pool).await),
                None => on_pool!(&self.db, pool => sqlx::query_scalar(
                        "INSERT INTO users (id, account_id, role, is_active, email) \
                         SELECT COALESCE(MAX(id), 0) + 1, $1, $2, $3, $4 FROM users RETURNING id")
                    .bind(account).bind(role).bind(active).bind(&email)
                    .fetch_optional(pool).await),
            };
            let created: Option<i64> = match result {
                Ok(created) => created,
                Err(e) if is_unique_violation(&e) => None,
                Err(e) => return Err(CtlError::query("creating the user")(e)),
            };
            match (created, id) {
                (Some(created), _) => return self.existing_user(created).await,
                (None, Some(id)) => {
                    return Err(CtlError::Conflict(format!(
                        "user {id} already exists; change it with `igny8ctl user move|role|activate|deactivate --id {id}`, \
                         or leave --id out to use the next free id"
                    )));
                }
                (None, None) => continue,
            }
        }
        Err(CtlError::Conflict(
            "could not pick a free user id (other writers keep taking it); pass --id".into(),
        ))
    }

    /// Moves a user to `account` (or out of any account). Returns the user
    /// as it was before.
    pub async fn move_user(&self, id: i64, account: Option<i64>) -> Result<User, CtlError> {
        let before = self.existing_user(id).await?;
        if let Some(account) = account {
            self.existing_account(account).await?;
        }
        on_pool!(&self.db, pool => sqlx::query("UPDATE users SET account_id = $1, updated_at = $2 WHERE id = $3")
            .bind(account).bind(Utc::now()).bind(id).execute(pool).await.map(|r| r.rows_affected()))
            .map_err(CtlError::query("moving the user"))?;
        Ok(before)
    }

    /// Activates or deactivates a user. Returns the user as it was before.
    pub async fn set_user_active(&self, id: i64, active: bool) -> Result<User, CtlError> {
        let before = self.existing_user(id).await?;
        on_pool!(&self.db, pool => sqlx::query("UPDATE users SET is_active = $1, updated_at = $2 WHERE id = $3")
            .bind(active).bind(Utc::now()).bind(id).execute(pool).await.map(|r| r.rows_affected()))
            .map_err(CtlError::query("updating the user"))?;
        Ok(before)
    }

    /// Changes a user's role. Returns the user as it was before.
    pub async fn set_user_role(&self, id: i64, role: &str) -> Result<User, CtlError> {
        let before = self.existing_user(id).await?;
        on_pool!(&self.db, pool => sqlx::query("UPDATE users SET role = $1, updated_at = $2 WHERE id = $3")
            .bind(role).bind(Utc::now()).bind(id).execute(pool).await.map(|r| r.rows_affected()))
            .map_err(CtlError::query("changing the role"))?;
        Ok(before)
    }

    /// Grants credits through the ledger, once per idempotency key.
    pub async fn grant(&self, account: i64, grant: &GrantRequest) -> Result<Applied, CtlError> {
        validate_amount("--credits", grant.credits, 1)?;
        validate_reason(&grant.reason)?;
        validate_key(&grant.idempotency_key)?;
        self.existing_account(account).await?;
        Ledger::new(self.db.clone())
            .apply(
                account,
                &Entry {
                    kind: Kind::Grant,
                    credits: grant.credits,
                    operation: String::new(),
                    quantity: 0,
                    description: grant.reason.clone(),
                    metadata: Default::default(),
                    idempotency_key: grant.idempotency_key.clone(),
                    request_hash: grant_fingerprint(grant.credits, &grant.reason),
                    actor: grant.actor.clone(),
                },
            )
            .await
            .map_err(|e| ledger_error(account, e))
    }

    /// An account's balance and its ledger totals.
    pub async fn balance(&self, account: i64) -> Result<Balance, CtlError> {
        let account = self.existing_account(account).await?;
        let (sum, rows): (Option<i64>, i64) = on_pool!(&self.db, pool => sqlx::query_as(
                "SELECT CAST(SUM(credits) AS BIGINT), COUNT(*) FROM credit_ledger WHERE account_id = $1")
            .bind(account.id).fetch_one(pool).await)
            .map_err(CtlError::query("summing the ledger"))?;
        Ok(Balance {
            account,
            ledger_rows: rows,
            ledger_sum: sum.unwrap_or(0),
        })
    }
}

fn ledger_error(account: i64, e: BillingError) -> CtlError {
    match e {
        BillingError::IdempotencyKeyReused { key } => CtlError::Conflict(format!(
            "idempotency key {key:?} was already used on account {account} for a different grant; \
             nothing changed. Use a new --idempotency-key (or leave it out to generate one)"
        )),
        BillingError::AccountNotFound(id) => {
            CtlError::NotFound(format!("account {id} does not exist"))
        }
        BillingError::Unavailable(source) => CtlError::Query {
            doing: "writing the ledger",
            source,
        },
        BillingError::Database(source) => CtlError::Query {
            doing: "writing the ledger",
            source,
        },
        other => CtlError::Ledger(other),
    }
}

/// A trimmed, non-empty account name without control characters.
pub fn validate_name(name: &str) -> Result<String, CtlError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control)
    {
        return Err(CtlError::Invalid(format!(
            "--name must be 1 to {MAX_NAME_LEN} characters without control characters, got {name:?}"
        )));
    }
    Ok(name.to_owned())
}

/// A plausible email address: `local@domain`, no spaces.
pub fn validate_email(email: &str) -> Result<String, CtlError> {
    let email = email.trim();
    let ok = email.len() <= MAX_EMAIL_LEN
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(email.split_once('@'), Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@')
                && !domain.starts_with('.') && !domain.ends_with('.'));
    if !ok {
        return Err(CtlError::Invalid(format!(
            "--email must look like name@example.com (at most {MAX_EMAIL_LEN} characters), got {email:?}"
        )));
    }
    Ok(email.to_owned())
}

fn validate_amount(flag: &str, credits: i64, min: i64) -> Result<(), CtlError> {
    if !(min..=MAX_CREDITS).contains(&credits) {
        return Err(CtlError::Invalid(format!(
            "{flag} must be from {min} to {MAX_CREDITS}, got {credits}"
        )));
    }
    Ok(())
}

fn validate_reason(reason: &str) -> Result<(), CtlError> {
    if reason.trim().is_empty() || reason.chars().count() > MAX_TEXT_LEN {
        return Err(CtlError::Invalid(format!(
            "--reason is required: 1 to {MAX_TEXT_LEN} characters saying why the credits are granted"
        )));
    }
    Ok(())
}

/// An idempotency key as billing accepts them: 1 to 128 printable ASCII
/// characters.
pub fn validate_key(key: &str) -> Result<(), CtlError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err(CtlError::Invalid(format!(
            "--idempotency-key must be 1 to {MAX_KEY_LEN} printable ASCII characters, got {key:?}"
        )));
    }
    Ok(())
}

/// A fresh idempotency key for a grant given without one.
pub fn generated_key() -> String {
    format!(
        "igny8ctl-grant-{}-{:08x}",
        Utc::now().format("%Y%m%dT%H%M%S"),
        rand::random::<u32>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_checked_loosely_but_surely() {
        for good in ["a@b.c", " demo@igny8.local ", "x+y@sub.example.com"] {
            assert!(validate_email(good).is_ok(), "{good}");
        }
        for bad in [
            "", "no-at", "@x.com", "a@", "a b@c.d", "a@b@c", "a@.com", "a@com.",
        ] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_keys_are_bounded() {
        assert_eq!(validate_name("  Acme ").unwrap(), "Acme");
        assert!(validate_name("   ").is_err());
        assert!(validate_name("a\nb").is_err());
        assert!(validate_name(&"n".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(validate_key("k-1").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("é").is_err());
        assert!(validate_key(&generated_key()).is_ok());
    }
}
