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

use std::{future::Future, net::SocketAddr};

use igny8_proto::settings::v1::settings_service_server::SettingsServiceServer;
use service_kit::{Defaults, Server, ServiceConfig, StartError};

pub use service::Settings;

/// Settings' default addresses.
pub const DEFAULTS: Defaults = Defaults {
    listen_addr: "0.0.0.0:50052",
    metrics_addr: "0.0.0.0:9102",
};

/// A bound settings server.
#[derive(Debug)]
pub struct App {
    server: Server,
    settings: Settings,
}

impl App {
    /// Validates configuration, binds the listen address and prepares the
    /// service.
    pub async fn build(config: ServiceConfig) -> Result<Self, StartError> {
        let server = Server::bind(config, igny8_proto::SETTINGS_SERVICE_NAME).await?;
        let store = store::SettingsStore::new(server.db().clone(), store::CACHE_TTL);
        Ok(Self {
            server,
            settings: Settings::new(store),
        })
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The bound metrics address, when `IGNY8_METRICS_ADDR` is not `off`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.server.metrics_addr()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        self.server
            .serve(SettingsServiceServer::new(self.settings), shutdown)
            .await
    }
}
