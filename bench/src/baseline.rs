//! The baseline server: a bare `tonic::transport::Server` with only the
//! health service — no auth layer, no database, no reflection — served the
//! same way as the igny8 services (a `TcpListener` on loopback port 0 fed to
//! `serve_with_incoming_shutdown`, each accepted connection with
//! `TCP_NODELAY` as the services' accept loop sets it), so the only
//! difference measured is the work the services do per call.

use std::net::SocketAddr;

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};

/// A running baseline server.
pub struct Baseline {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Baseline {
    /// Binds `127.0.0.1:0` and starts serving `grpc.health.v1.Health`.
    pub async fn start() -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("baseline server cannot bind 127.0.0.1:0: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("baseline server has no local address: {e}"))?;
        // The reporter starts with the server-wide service "" SERVING.
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = oneshot::channel::<()>();
        // Without it a response written in two parts could wait for the
        // client's delayed ACK (~40 ms): measured, the baseline's slowest
        // open-loop call fell from 45–57 ms to 18 ms.
        let incoming = TcpListenerStream::new(listener).map(|accepted| {
            if let Ok(stream) = &accepted {
                let _ = stream.set_nodelay(true);
            }
            accepted
        });
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        Ok(Self { addr, stop, task })
    }

    /// Stops accepting, lets open calls finish and waits for the server.
    pub async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("baseline server failed: {e}")),
            Err(e) => Err(format!("baseline server task failed: {e}")),
        }
    }
}
