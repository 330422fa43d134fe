//! What both igny8 services share at run time, written once:
//!
//! - [`config`]: environment configuration, validated at start-up;
//! - [`server`]: the server stack (auth layer, health, reflection v1 and
//!   v1alpha), database readiness, and SIGTERM drain;
//! - [`telemetry`]: logging set-up.
//!
//! A service supplies its tonic service and its name; [`server::Server`]
//! does the rest.

#![forbid(unsafe_code)]

pub mod config;
pub mod main_helper;
pub mod server;
pub mod telemetry;

pub use config::{ConfigError, Defaults, ServiceConfig};
pub use server::{Server, StartError, shutdown_signal};
