//! igny8 settings: per-account module switches for the platform's eight
//! modules.
//!
//! Request path: transport and auth ([`service_kit::Server`]) → handler
//! ([`service::Settings`]) → store with a write-through, bounded-staleness
//! cache ([`store::SettingsStore`]).

#![forbid(unsafe_code)]

pub mod error;
pub mod modules;
pub mod service;
pub mod store;

use igny8_proto::settings::v1::settings_service_server::SettingsServiceServer;
use service_kit::{ChangeHub, Defaults, Server, ServiceConfig, StartError};

pub use service::Settings;

/// Settings' default addresses.
pub const DEFAULTS: Defaults = Defaults {
    listen_addr: "0.0.0.0:50052",
    metrics_addr: "0.0.0.0:9102",
};

/// A bound settings server, ready to [`service_kit::App::run_until_stopped`].
pub type App = service_kit::App<SettingsServiceServer<Settings>>;

/// Validates configuration, binds the listen address and prepares the
/// service. Serving starts with [`service_kit::App::run_until_stopped`].
pub async fn build(config: ServiceConfig) -> Result<App, StartError> {
    let server = Server::bind(config, igny8_proto::SETTINGS_SERVICE_NAME).await?;
    let streams = server.streams();
    let changes = ChangeHub::start(server.db(), store::SETTINGS_CHANNEL, streams.drain.clone());
    let store =
        store::SettingsStore::new(server.db().clone(), store::CACHE_TTL).with_changes(changes);
    Ok(App::new(
        server,
        SettingsServiceServer::new(Settings::new(store).with_streams(streams)),
    ))
}
