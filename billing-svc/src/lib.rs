//! igny8 billing: prices AI operations in credits, checks and deducts them
//! atomically, and keeps an append-only ledger.
//!
//! The request path reads top to bottom: transport and auth
//! ([`service_kit::Server`]) → handler ([`service::Billing`]) → pricing
//! ([`costs::CostTable`]) → store ([`ledger::Ledger`]). [`metrics::Metered`]
//! sits between transport and handler to count deduct outcomes.

#![forbid(unsafe_code)]

pub mod costs;
pub mod error;
pub mod ledger;
pub mod metrics;
pub mod modules;
pub mod page_token;
pub mod service;
pub mod watch;
pub mod writer;

/// The PostgreSQL `NOTIFY` channel of balance changes: one notification per
/// changed account and committed batch, the account id as payload.
pub const BALANCE_CHANNEL: &str = "igny8_balance";

use std::{path::PathBuf, sync::Arc, time::Duration};

use auth_interceptor::KeyConfig;
use igny8_proto::billing::v1::billing_service_server::BillingServiceServer;
use service_kit::{ChangeHub, Defaults, Server, ServiceConfig, StartError};

pub use costs::CostTable;
pub use service::Billing;

/// Billing's default addresses.
pub const DEFAULTS: Defaults = Defaults {
    listen_addr: "0.0.0.0:50051",
    metrics_addr: "0.0.0.0:9101",
};

/// Billing-only configuration, beyond [`ServiceConfig`].
pub const EXTRA_HELP: &str = "  IGNY8_COST_TABLE_FILE         replace the built-in cost table with a .toml or .json file
  IGNY8_PAGE_TOKEN_KEY          ListTransactions page-token key, ≥ 32 bytes, the same on every replica
                                (unset: derived from IGNY8_JWT_SECRET, else random per process)
  IGNY8_LEDGER_MAX_BATCH        most balance changes applied in one transaction (default 32;
                                on PostgreSQL also at most ~12 KiB of values)
  IGNY8_LEDGER_SHARDS           ledger writer tasks, one connection each on top of the pool (default 2 PostgreSQL, 1 SQLite)
  IGNY8_LEDGER_QUEUE            requests waiting per writer before RESOURCE_EXHAUSTED (default 4096)
  IGNY8_LEDGER_ACCOUNT_SHARE    requests one account may have waiting per writer (default 1024)
  IGNY8_SETTINGS_URL            settings-svc, http(s)://host:port: usage Deduct/Reserve are refused
                                while the operation's module is off (unset: module checks off)
  IGNY8_SETTINGS_TOKEN_FILE     billing's service token for settings, re-read when the file
                                changes (unset: minted with IGNY8_JWT_SECRET, sub billing-svc)
  IGNY8_SETTINGS_CACHE_MS       module answers are re-asked after this, ≤ 1000 (default 250)
  IGNY8_SETTINGS_STALE_MS       and served this much longer while settings is down (default 250)
  IGNY8_SETTINGS_TIMEOUT_MS     bound on one settings call (default 1000)
  IGNY8_SETTINGS_CA_FILE        https:// only: the CA settings' certificate chains to (PEM)
  IGNY8_SETTINGS_CLIENT_CERT_FILE / IGNY8_SETTINGS_CLIENT_KEY_FILE
                                https:// to an mTLS settings: billing's client certificate
                                (default: IGNY8_TLS_CERT_FILE / IGNY8_TLS_KEY_FILE)";

/// Billing-only options, beyond [`ServiceConfig`].
#[derive(Debug, Clone, Default)]
pub struct BillingOptions {
    /// The ledger writer's batching and bounds; `None` = the defaults for
    /// the configured backend.
    pub ledger: Option<writer::WriterConfig>,
    /// Where settings-svc is, for module-aware charging; `None` = module
    /// checks off (start-up warns).
    pub settings: Option<modules::SettingsOptions>,
}

impl BillingOptions {
    /// Reads the `IGNY8_LEDGER_*` and `IGNY8_SETTINGS_*` variables for a
    /// service on `database_url`.
    pub fn from_env(database_url: &str) -> Result<Self, String> {
        let backend = igny8_db::Backend::of_url(database_url).map_err(|e| e.to_string())?;
        let ledger = writer::WriterConfig::from_lookup(backend, |name| std::env::var(name).ok())?;
        let settings = modules::SettingsOptions::from_lookup(|name| std::env::var(name).ok())?;
        Ok(Self {
            ledger: Some(ledger),
            settings,
        })
    }
}

/// Reads `IGNY8_COST_TABLE_FILE` (when set) or returns the built-in table.
pub fn cost_table_from_env() -> Result<CostTable, String> {
    match std::env::var_os("IGNY8_COST_TABLE_FILE").filter(|v| !v.is_empty()) {
        Some(path) => CostTable::from_file(&PathBuf::from(path)),
        None => Ok(CostTable::builtin()),
    }
}

/// The page-token MAC key material: `IGNY8_PAGE_TOKEN_KEY`; else the HS256
/// secret (a secret every replica shares; [`PageTokens`](page_token::PageTokens)
/// hashes it with its own label, so the MAC key is not the JWT key); else 32
/// random bytes, with a warning: a public key is no secret, so tokens are
/// then only good on this process, and a client that gets a token from
/// another replica or across a restart is told to start again.
fn page_token_key(config: &ServiceConfig) -> Vec<u8> {
    match (&config.page_token_key, &config.jwt.keys) {
        (Some(key), _) => key.expose().clone(),
        (None, KeyConfig::Hs256Secret(secret)) => secret.expose().clone(),
        (None, KeyConfig::PublicKeyPem(_) | KeyConfig::Jwks(_)) => {
            tracing::warn!(
                "IGNY8_PAGE_TOKEN_KEY is unset and the JWT key is public: ListTransactions page tokens use a random per-process key and are refused by other replicas and after a restart; set IGNY8_PAGE_TOKEN_KEY (≥ 32 bytes, the same on every replica)"
            );
            rand::random::<[u8; 32]>().to_vec()
        }
    }
}

/// A bound billing server, ready to [`service_kit::App::run_until_stopped`].
pub type App = service_kit::App<BillingServiceServer<metrics::Metered<Billing>>>;

/// Validates configuration, binds the listen address and prepares the
/// service with this cost table. Serving starts with
/// [`service_kit::App::run_until_stopped`].
pub async fn build(config: ServiceConfig, table: CostTable) -> Result<App, StartError> {
    build_with(config, table, BillingOptions::default()).await
}

/// [`build`] with billing-only options.
pub async fn build_with(
    config: ServiceConfig,
    table: CostTable,
    options: BillingOptions,
) -> Result<App, StartError> {
    let key_material = page_token_key(&config);
    let table = Arc::new(table);
    let gate = match &options.settings {
        Some(settings) => {
            let gate = modules::ModuleGate::new(settings, &config.jwt, table.clone())
                .map_err(StartError::Config)?;
            if settings.refresh_after + settings.serve_stale_for > Duration::from_millis(500) {
                tracing::warn!(
                    "IGNY8_SETTINGS_CACHE_MS + IGNY8_SETTINGS_STALE_MS exceed 500 ms: with settings' \
                     own 500 ms cache, a module switched off may be charged for over 1 s"
                );
            }
            tracing::info!(settings = %settings.url, "module checks on");
            Some(gate)
        }
        None => {
            tracing::warn!(
                "IGNY8_SETTINGS_URL is not set: module checks are off, so Deduct and Reserve \
                 charge for operations of disabled modules too"
            );
            None
        }
    };
    let mut server = Server::bind(config, igny8_proto::BILLING_SERVICE_NAME).await?;
    let streams = server.streams();
    let changes = ChangeHub::start(server.db(), BALANCE_CHANNEL, streams.drain.clone());
    let billing = Billing::new(
        table,
        match options.ledger {
            Some(ledger) => ledger::Ledger::with_config(server.db().clone(), ledger),
            None => ledger::Ledger::new(server.db().clone()),
        },
        &key_material,
    )
    .with_streams(changes, streams)
    .with_modules(gate);
    billing
        .ledger()
        .writer()
        .metrics()
        .register(server.metrics_registry());
    let deducts = metrics::DeductMetrics::default();
    deducts.register(server.metrics_registry());
    let service = BillingServiceServer::new(metrics::Metered::new(billing, deducts));
    Ok(App::new(server, service))
}
