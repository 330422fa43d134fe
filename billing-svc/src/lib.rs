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

use std::{path::PathBuf, sync::Arc};

use auth_interceptor::KeyConfig;
use igny8_proto::billing::v1::billing_service_server::BillingServiceServer;
use service_kit::{Defaults, Server, ServiceConfig, StartError};

pub use costs::CostTable;
pub use service::Billing;

/// Billing's default addresses.
pub const DEFAULTS: Defaults = Defaults {
    listen_addr: "0.0.0.0:50051",
    metrics_addr: "0.0.0.0:9101",
};

/// Billing-only configuration, beyond [`ServiceConfig`].
pub const EXTRA_HELP: &str =
    "  IGNY8_COST_TABLE_FILE         replace the built-in cost table with a .toml or .json file";

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
    let key_material = match &config.jwt.keys {
        KeyConfig::Hs256Secret(secret) => secret.expose().clone(),
        KeyConfig::PublicKeyPem(pem) => pem.clone(),
        KeyConfig::Jwks(doc) => doc.clone().into_bytes(),
    };
    let mut server = Server::bind(config, igny8_proto::BILLING_SERVICE_NAME).await?;
    let billing = Billing::new(
        Arc::new(table),
        ledger::Ledger::new(server.db().clone()),
        &key_material,
    );
    let deducts = metrics::DeductMetrics::default();
    deducts.register(server.metrics_registry());
    let service = BillingServiceServer::new(metrics::Metered::new(billing, deducts));
    Ok(App::new(server, service))
}
