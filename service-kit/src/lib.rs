//! What both igny8 services share at run time, written once:
//!
//! - [`config`]: environment configuration, validated at start-up;
//! - [`server`]: the server stack (RPC spans and metrics, auth layer,
//!   health, reflection v1 and v1alpha), database readiness, the `/metrics`
//!   endpoint, and SIGTERM drain;
//! - [`telemetry`]: logs (text or JSON) and OpenTelemetry trace export with
//!   W3C trace-context propagation;
//! - [`tls`]: gRPC server TLS and mTLS, certificates re-read on change;
//! - [`limits`]: transport limits and fair sharing (connection and stream
//!   bounds, time-outs, in-flight caps per server and per principal);
//! - [`main_helper`]: the `main` both binaries share.
//!
//! A service supplies its tonic service and its name; [`server::Server`]
//! does the rest.

#![forbid(unsafe_code)]

pub mod app;
pub mod changes;
pub mod config;
pub mod limits;
mod log_fields;
pub mod main_helper;
mod metrics;
mod rpc;
pub mod server;
pub mod streams;
pub mod telemetry;
pub mod tls;

pub use app::App;
pub use changes::{Change, ChangeHub, Subscription};
pub use config::{ConfigError, Defaults, ServiceConfig};
pub use server::{Drain, GrpcService, LIVENESS_SERVICE, Server, StartError, shutdown_signal};
pub use streams::StreamEnv;
pub use telemetry::Telemetry;
