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
pub mod page_token;
pub mod service;
pub mod watch;
pub mod writer;

/// The PostgreSQL `NOTIFY` channel of balance changes: one notification per
/// changed account and committed batch, the account id as payload.
pub const BALANCE_CHANNEL: &str = "igny8_balance";

use std::{path::PathBuf, sync::Arc};

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
  IGNY8_LEDGER_MAX_BATCH        most balance changes applied in one transaction (default 128)
  IGNY8_LEDGER_SHARDS           ledger writer tasks, one connection each (default 4 PostgreSQL, 1 SQLite)
  IGNY8_LEDGER_QUEUE            requests waiting per writer before RESOURCE_EXHAUSTED (default 4096)
  IGNY8_LEDGER_ACCOUNT_SHARE    requests one account may have waiting per writer (default 1024)";

/// Billing-only options, beyond [`ServiceConfig`].
#[derive(Debug, Clone, Default)]
pub struct BillingOptions {
    /// The ledger writer's batching and bounds; `None` = the defaults for
    /// the configured backend.
    pub ledger: Option<writer::WriterConfig>,
}

impl BillingOptions {
    /// Reads the `IGNY8_LEDGER_*` variables for a service on `database_url`.
    pub fn from_env(database_url: &str) -> Result<Self, String> {
        let backend = igny8_db::Backend::of_url(database_url).map_err(|e| e.to_string())?;
        let ledger = writer::WriterConfig::from_lookup(backend, |name| std::env::var(name).ok())?;
        Ok(Self {
            ledger: Some(ledger),
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
    let key_material = match &config.jwt.keys {
        KeyConfig::Hs256Secret(secret) => secret.expose().clone(),
        KeyConfig::PublicKeyPem(pem) => pem.clone(),
        KeyConfig::Jwks(doc) => doc.clone().into_bytes(),
    };
    let mut server = Server::bind(config, igny8_proto::BILLING_SERVICE_NAME).await?;
    let streams = server.streams();
    let changes = ChangeHub::start(server.db(), BALANCE_CHANNEL, streams.drain.clone());
    let billing = Billing::new(
        Arc::new(table),
        match options.ledger {
            Some(ledger) => ledger::Ledger::with_config(server.db().clone(), ledger),
            None => ledger::Ledger::new(server.db().clone()),
        },
        &key_material,
    )
    .with_streams(changes, streams);
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
