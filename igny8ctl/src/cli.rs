//! The command line: `igny8ctl dev` and the operator subcommands.
//!
//! Every subcommand validates its input, prints what it did on stdout and
//! fails with a message on stderr and a non-zero exit. `token` prints only
//! the token on stdout, so `TOKEN=$(igny8ctl token user --id 1)` works.

use std::{net::SocketAddr, time::Duration};

use auth_interceptor::Role;
use billing_svc::service::MAX_CREDITS;
use clap::{
    Args, Parser, Subcommand,
    builder::{BoolishValueParser, TypedValueParser},
};
use igny8_db::DEFAULT_DATABASE_URL;

use crate::{
    dev::{self, DevOptions},
    error::CtlError,
    ops::{self, GrantRequest, Operator, User},
    tokens::{self, Audience, SecretSource, Subject},
};

/// igny8ctl: run the igny8 services locally and operate their directory
/// and ledger.
#[derive(Debug, Parser)]
#[command(name = "igny8ctl", version, about, long_about = None)]
pub struct Cli {
    /// Database: postgres://… or sqlite://… (a file, created when missing).
    #[arg(long, global = true, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// Apply pending database migrations before an operator command (`dev` always does).
    #[arg(long, global = true, env = "IGNY8_RUN_MIGRATIONS", default_value = "true",
          value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set, value_name = "BOOL")]
    pub run_migrations: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run billing and settings together on the local database, with a demo
    /// account, a token and grpcurl calls to paste. Ctrl-C stops both.
    Dev(DevArgs),
    /// Create, suspend or activate accounts.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Create users, move them between accounts, change roles, (de)activate.
    #[command(subcommand)]
    User(UserCommand),
    /// Grant credits to an account through the ledger.
    Grant(GrantArgs),
    /// Mint a token signed with IGNY8_JWT_SECRET or the development secret.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show an account's balance next to its ledger.
    Balance {
        /// The account.
        #[arg(long, value_parser = id_parser())]
        account: i64,
    },
}

/// `igny8ctl dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Billing's gRPC address.
    #[arg(
        long,
        env = "IGNY8_DEV_BILLING_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub billing_addr: SocketAddr,
    /// Settings' gRPC address.
    #[arg(
        long,
        env = "IGNY8_DEV_SETTINGS_ADDR",
        default_value = "127.0.0.1:50052"
    )]
    pub settings_addr: SocketAddr,
    /// Lifetime of the printed demo token (e.g. 1h, 30d).
    #[arg(long, default_value = "30d", value_parser = tokens::parse_ttl)]
    pub token_ttl: Duration,
}

/// `igny8ctl account …`.
#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Create an account; initial credits are a ledger grant.
    Create {
        /// Account id (default: the highest id + 1).
        #[arg(long, value_parser = id_parser())]
        id: Option<i64>,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Initial credits, granted through the ledger.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=MAX_CREDITS))]
        credits: i64,
        /// Create it suspended (read-only).
        #[arg(long)]
        suspended: bool,
    },
    /// Suspend an account: its members may read but not change anything.
    Suspend {
        /// The account.
        #[arg(long, value_parser = id_parser())]
        id: i64,
    },
    /// Reactivate a suspended account.
    Activate {
        /// The account.
        #[arg(long, value_parser = id_parser())]
        id: i64,
    },
}

/// A directory role (`owner`, `admin`, `editor`, `viewer`, `developer`),
/// parsed by the auth crate so the CLI accepts exactly what the services
/// recognise.
fn role_parser() -> impl TypedValueParser<Value = Role> {
    clap::builder::PossibleValuesParser::new(["owner", "admin", "editor", "viewer", "developer"])
        .map(|s| {
            s.parse::<Role>()
                .expect("every listed value is a directory role")
        })
}

/// `igny8ctl user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user.
    Create {
        /// User id, as the platform knows it (default: the highest id + 1).
        #[arg(long, value_parser = id_parser())]
        id: Option<i64>,
        /// Email.
        #[arg(long)]
        email: String,
        /// Role.
        #[arg(long, value_parser = role_parser())]
        role: Role,
        /// The account the user belongs to (default: none).
        #[arg(long, value_parser = id_parser())]
        account: Option<i64>,
        /// Create it deactivated.
        #[arg(long)]
        inactive: bool,
    },
    /// Move a user to another account (or out of any). Takes effect on the
    /// user's next call, with the token they already have.
    Move {
        /// The user.
        #[arg(long, value_parser = id_parser())]
        id: i64,
        /// The new account.
        #[arg(long, value_parser = id_parser(), required_unless_present = "no_account", conflicts_with = "no_account")]
        account: Option<i64>,
        /// Remove the user from their account.
        #[arg(long)]
        no_account: bool,
    },
    /// Deactivate a user: their tokens stop working.
    Deactivate {
        /// The user.
        #[arg(long, value_parser = id_parser())]
        id: i64,
    },
    /// Reactivate a user.
    Activate {
        /// The user.
        #[arg(long, value_parser = id_parser())]
        id: i64,
    },
    /// Change a user's role.
    Role {
        /// The user.
        #[arg(long, value_parser = id_parser())]
        id: i64,
        /// The new role.
        #[arg(long, value_parser = role_parser())]
        role: Role,
    },
}

/// `igny8ctl grant`.
#[derive(Debug, Args)]
pub struct GrantArgs {
    /// The account.
    #[arg(long, value_parser = id_parser())]
    pub account: i64,
    /// Credits to add.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..=MAX_CREDITS))]
    pub credits: i64,
    /// Why (stored on the ledger row).
    #[arg(long)]
    pub reason: String,
    /// Makes a retry safe: the same key and request is applied once (default: a new key).
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// `igny8ctl token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// An access token for a user.
    User {
        /// The user.
        #[arg(long, value_parser = id_parser())]
        id: i64,
        /// Lifetime (e.g. 90s, 15m, 1h, 30d).
        #[arg(long, default_value = "1h", value_parser = tokens::parse_ttl)]
        ttl: Duration,
        /// `account_id` claim: a hint only; the services use the user's current account.
        #[arg(long, value_parser = id_parser())]
        account_hint: Option<i64>,
    },
    /// A service token (services name the account with x-igny8-act-as-account).
    Service {
        /// The service name, e.g. writer-worker.
        #[arg(long, value_parser = service_name)]
        name: String,
        /// Lifetime (e.g. 90s, 15m, 1h, 30d).
        #[arg(long, default_value = "1h", value_parser = tokens::parse_ttl)]
        ttl: Duration,
    },
}

fn id_parser() -> clap::builder::RangedI64ValueParser<i64> {
    clap::value_parser!(i64).range(1..)
}

fn service_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(s.to_owned())
    } else {
        Err("1 to 128 characters: letters, digits, '-', '_', '.', ':'".into())
    }
}

/// The ledger actor for operator changes: `operator:<$USER>`.
pub fn operator_actor() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "cli".to_owned());
    format!("operator:{user}")
}

fn describe_user(u: &User) -> String {
    format!(
        "user {} <{}>: {} of {}, {}",
        u.id,
        u.email,
        u.role,
        u.account_id
            .map_or_else(|| "no account".to_owned(), |a| format!("account {a}")),
        if u.is_active { "active" } else { "inactive" }
    )
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let url = cli.database_url;
    igny8_db::Backend::of_url(&url)
        .map_err(|e| CtlError::Invalid(format!("--database-url: {e}")))?;
    let open = || Operator::open(&url, cli.run_migrations);
    match cli.command {
        Command::Dev(args) => {
            dev::run(DevOptions {
                database_url: url.clone(),
                billing_addr: args.billing_addr,
                settings_addr: args.settings_addr,
                token_ttl: args.token_ttl,
            })
            .await
        }
        Command::Token(command) => {
            let secret = tokens::signing_secret(&url)?;
            let audience = Audience::from_env();
            let (subject, ttl) = match command {
                TokenCommand::User {
                    id,
                    ttl,
                    account_hint,
                } => (Subject::User { id, account_hint }, ttl),
                TokenCommand::Service { name, ttl } => (Subject::Service { name }, ttl),
            };
            let token = tokens::mint(&secret, &subject, ttl, &audience)?;
            let who = match &subject {
                Subject::User { id, .. } => format!("an access token for user {id}"),
                Subject::Service { name } => format!("a service token for {name:?}"),
            };
            let signer = match &secret.source {
                SecretSource::Env => "IGNY8_JWT_SECRET".to_owned(),
                SecretSource::DevFile { path, .. } => {
                    format!("the DEVELOPMENT secret in {}", path.display())
                }
            };
            eprintln!(
                "igny8ctl: minted {who}, valid {}, signed with {signer}",
                tokens::format_ttl(ttl)
            );
            println!("{token}");
            Ok(())
        }
        Command::Account(command) => {
            let op = open().await?;
            match command {
                AccountCommand::Create {
                    id,
                    name,
                    credits,
                    suspended,
                } => {
                    let (account, grant) = op
                        .create_account(id, &name, credits, suspended, &operator_actor())
                        .await?;
                    println!(
                        "created account {} {:?} ({}) with {} credits",
                        account.id, account.name, account.status, account.credits
                    );
                    if let Some(applied) = grant {
                        println!(
                            "  initial credits granted through the ledger: row {}, key {:?}, actor {}",
                            applied.row.id, applied.row.idempotency_key, applied.row.actor
                        );
                    }
                }
                AccountCommand::Suspend { id } | AccountCommand::Activate { id } => {
                    let suspend = matches!(command, AccountCommand::Suspend { .. });
                    let before = op.set_account_status(id, suspend).await?;
                    let after = if suspend { "suspended" } else { "active" };
                    if before.status == after {
                        println!(
                            "account {id} {:?} was already {after}; nothing changed",
                            before.name
                        );
                    } else {
                        println!(
                            "account {id} {:?}: {} -> {after}{}",
                            before.name,
                            before.status,
                            if suspend {
                                " (members may still read; changes are refused with ACCOUNT_SUSPENDED)"
                            } else {
                                ""
                            }
                        );
                    }
                }
            }
            op.close().await;
            Ok(())
        }
        Command::User(command) => {
            let op = open().await?;
            match command {
                UserCommand::Create {
                    id,
                    email,
                    role,
                    account,
                    inactive,
                } => {
                    let user = op
                        .create_user(id, &email, role.as_str(), account, !inactive)
                        .await?;
                    println!("created {}", describe_user(&user));
                }
                UserCommand::Move {
                    id,
                    account,
                    no_account,
                } => {
                    let target = if no_account { None } else { account };
                    let before = op.move_user(id, target).await?;
                    let name = |a: Option<i64>| {
                        a.map_or_else(|| "no account".to_owned(), |a| format!("account {a}"))
                    };
                    if before.account_id == target {
                        println!("user {id} is already in {}; nothing changed", name(target));
                    } else {
                        println!(
                            "moved user {id} from {} to {} (effective on the next call, with the same token)",
                            name(before.account_id),
                            name(target)
                        );
                    }
                }
                UserCommand::Deactivate { id } | UserCommand::Activate { id } => {
                    let active = matches!(command, UserCommand::Activate { .. });
                    let before = op.set_user_active(id, active).await?;
                    let word = if active { "active" } else { "inactive" };
                    if before.is_active == active {
                        println!(
                            "user {id} <{}> was already {word}; nothing changed",
                            before.email
                        );
                    } else if active {
                        println!("activated user {id} <{}>", before.email);
                    } else {
                        println!(
                            "deactivated user {id} <{}>: their tokens are refused from the next call",
                            before.email
                        );
                    }
                }
                UserCommand::Role { id, role } => {
                    let before = op.set_user_role(id, role.as_str()).await?;
                    if before.role == role.as_str() {
                        println!("user {id} is already {}; nothing changed", before.role);
                    } else {
                        println!(
                            "user {id} <{}>: role {} -> {}",
                            before.email,
                            before.role,
                            role.as_str()
                        );
                    }
                }
            }
            op.close().await;
            Ok(())
        }
        Command::Grant(args) => {
            let op = open().await?;
            let generated = args.idempotency_key.is_none();
            let key = args.idempotency_key.unwrap_or_else(ops::generated_key);
            let applied = op
                .grant(
                    args.account,
                    &GrantRequest {
                        credits: args.credits,
                        reason: args.reason,
                        idempotency_key: key.clone(),
                        actor: operator_actor(),
                    },
                )
                .await?;
            let row = &applied.row;
            if applied.replayed {
                println!(
                    "already granted: key {key:?} was applied earlier as ledger row {} ({} credits by {}); nothing changed, balance after that grant was {}",
                    row.id, row.credits, row.actor, row.balance_after
                );
            } else {
                println!(
                    "granted {} credits to account {}: balance {} (ledger row {}, key {key:?}, actor {})",
                    row.credits, row.account_id, row.balance_after, row.id, row.actor
                );
                if generated {
                    println!("  to retry this exact grant safely, pass --idempotency-key {key:?}");
                }
            }
            op.close().await;
            Ok(())
        }
        Command::Balance { account } => {
            let op = open().await?;
            let b = op.balance(account).await?;
            println!(
                "account {} {:?} ({}): {} credits",
                b.account.id, b.account.name, b.account.status, b.account.credits
            );
            let diff = b.account.credits - b.ledger_sum;
            println!(
                "  ledger: {} row{} summing to {}{}",
                b.ledger_rows,
                if b.ledger_rows == 1 { "" } else { "s" },
                b.ledger_sum,
                if diff == 0 {
                    String::new()
                } else {
                    format!(" ({diff} credits were set outside the ledger)")
                }
            );
            op.close().await;
            Ok(())
        }
    }
}
