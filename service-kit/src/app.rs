//! A bound server with its service ready to run: what each service crate's
//! `build` returns, so the binaries, the launcher, the tests and the bench
//! start every service the same way.

use std::{future::Future, net::SocketAddr};

use crate::server::{GrpcService, Server, StartError};

/// A [`Server`] and the tonic service it will serve.
#[derive(Debug)]
pub struct App<S> {
    server: Server,
    service: S,
}

impl<S: GrpcService> App<S> {
    /// Pairs a bound server with its service.
    pub fn new(server: Server, service: S) -> Self {
        Self { server, service }
    }

    /// The bound gRPC address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The bound metrics address, when `IGNY8_METRICS_ADDR` is not `off`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.server.metrics_addr()
    }

    /// The bound plaintext health address, when `IGNY8_HEALTH_ADDR` is set.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.server.health_addr()
    }

    /// Serves until `shutdown` completes, then drains (see [`Server::serve`]).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        self.server.serve(self.service, shutdown).await
    }
}
