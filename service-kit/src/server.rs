//! The server stack both services run: RPC span and metrics → auth layer →
//! (health | reflection v1 | reflection v1alpha | the service), database
//! readiness, the `/metrics` endpoint, and SIGTERM drain.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use auth_interceptor::{
    AuthLayer, AuthMetrics, Authenticator, CachedDirectory, SqlDirectory, TokenVerifier,
};
use http::{Request, Response};
use igny8_db::Db;
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use tokio::{net::TcpListener, sync::watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{body::Body, server::NamedService};
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};
use tower::Service;

use crate::{
    config::ServiceConfig,
    metrics::{Metrics, serve_metrics},
    rpc::{KnownMethods, RpcLayer},
    tls::{self, ReloadingTls},
};

/// The health entry for Kubernetes liveness probes: SERVING for as long as
/// the server runs, whatever the database does or whether it drains. ""
/// and the service's own name follow the database: probing those for
/// liveness would restart every pod during a database outage.
pub const LIVENESS_SERVICE: &str = "liveness";

/// How often readiness re-checks the database.
const READINESS_INTERVAL: Duration = Duration::from_secs(1);

/// How long closing the pool may take after a drain that timed out: calls
/// still in flight hold connections that will never be returned.
const POOL_CLOSE_BOUND: Duration = Duration::from_secs(2);

/// Start-up or serving failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Configuration is unusable (bad key, bad URL).
    #[error("configuration error: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC transport failed.
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection descriptors are broken (a build problem).
    #[error("reflection error: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// What a generated tonic server (`FooServiceServer<T>`) is, as far as
/// [`Server::serve`] needs: a named, cloneable HTTP service that never fails.
pub trait GrpcService:
    Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send + 'static>
    + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcService for S where
    S: Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// A bound, not yet serving, igny8 server: the listeners (gRPC and
/// metrics), the database pool, the authenticator, the health reporter and
/// the metrics registry.
pub struct Server {
    /// Migrations are enabled but could not be applied at start-up.
    migrations_pending: bool,
    config: ServiceConfig,
    service_name: &'static str,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    db: Db,
    authenticator: Arc<Authenticator>,
    auth_metrics: AuthMetrics,
    metrics: Metrics,
    health: Health,
    tls: Option<Arc<ReloadingTls>>,
    health_listener: Option<TcpListener>,
    draining_tx: watch::Sender<bool>,
}

/// Fires once the server starts draining (SIGTERM): long-lived calls
/// (streams) watch it to end with UNAVAILABLE so clients reconnect to another
/// replica, and background tasks to stop. Also fires when the server is
/// dropped without serving. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Drain {
    rx: watch::Receiver<bool>,
    /// Only for [`Drain::never`]: keeps the channel open.
    _never: Option<Arc<watch::Sender<bool>>>,
}

impl Drain {
    /// Completes once draining has begun (at once if it already has).
    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|d| *d).await;
    }

    /// True once draining has begun.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }

    /// A signal that never fires, for services built outside a [`Server`].
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        Self {
            rx,
            _never: Some(Arc::new(tx)),
        }
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("service", &self.service_name)
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Validates keys, prepares the (lazy) database pool and binds the
    /// listen address. Nothing is served until [`Server::serve`].
    pub async fn bind(
        config: ServiceConfig,
        service_name: &'static str,
    ) -> Result<Self, StartError> {
        let verifier = TokenVerifier::new(&config.jwt).map_err(StartError::Config)?;
        let tls = match &config.tls {
            Some(files) => Some(
                ReloadingTls::load(files.clone())
                    .await
                    .map_err(StartError::Config)?,
            ),
            None => None,
        };
        let db = Db::connect_lazy(&config.database_url, &config.pool)
            .map_err(|e| StartError::Config(e.to_string()))?;
        // A database that refuses our TLS settings (wrong CA, no TLS on the
        // server) will not fix itself: refuse to start, naming DATABASE_URL.
        check_database_tls(&db).await?;
        // Apply migrations before the port opens when the database is already
        // up, so a client that can connect also finds the schema. A database
        // that is not there yet does not stop start-up: the server comes up
        // NOT_SERVING and the readiness task keeps trying.
        let migrated = config.run_migrations && migrate_at_start(&db).await;
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen_addr,
                source,
            })?;
        let metrics_listener = match config.metrics_addr {
            None => None,
            Some(addr) => match TcpListener::bind(addr).await {
                Ok(listener) => Some(listener),
                Err(source) if config.metrics_addr_defaulted => {
                    tracing::warn!(
                        %addr,
                        error = %source,
                        "the default metrics address is taken; serving without /metrics \
                         (set IGNY8_METRICS_ADDR to choose one, or `off`)"
                    );
                    None
                }
                Err(source) => return Err(StartError::Bind { addr, source }),
            },
        };
        let health_listener = match config.health_addr {
            None => None,
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
        };
        let auth_metrics = AuthMetrics::default();
        let metrics = Metrics::new(&auth_metrics, config.pool.max_connections);
        let directory =
            CachedDirectory::new(SqlDirectory::new(db.clone()), config.directory_cache_ttl);
        let authenticator = Arc::new(Authenticator::new(
            verifier,
            Arc::new(directory),
            auth_metrics.clone(),
        ));
        let health = Health::new(service_name, metrics.serving.clone());
        health.set(ServingStatus::NotServing).await;
        health
            .reporter
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        Ok(Self {
            draining_tx: watch::channel(false).0,
            migrations_pending: config.run_migrations && !migrated,
            config,
            service_name,
            listener,
            metrics_listener,
            db,
            authenticator,
            auth_metrics,
            metrics,
            health,
            tls,
            health_listener,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// The bound plaintext health address, when `IGNY8_HEALTH_ADDR` is set.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener.as_ref().map(|l| {
            l.local_addr()
                .expect("a bound TCP listener has a local address")
        })
    }

    /// The bound metrics address, when metrics are on (useful with port 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|l| {
            l.local_addr()
                .expect("a bound TCP listener has a local address")
        })
    }

    /// The registry `/metrics` is rendered from, for a service's own series
    /// (register them before [`Server::serve`]).
    pub fn metrics_registry(&mut self) -> &mut Registry {
        &mut self.metrics.registry
    }

    /// The database pool, for the service's store.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The auth counters.
    pub fn auth_metrics(&self) -> &AuthMetrics {
        &self.auth_metrics
    }

    /// The drain signal, for streams and background tasks.
    pub fn drain(&self) -> Drain {
        Drain {
            rx: self.draining_tx.subscribe(),
            _never: None,
        }
    }

    /// What a service's streaming handlers need: the drain signal and how
    /// often to re-check the caller's access (`IGNY8_STREAM_RECHECK_SECS`).
    pub fn streams(&self) -> crate::streams::StreamEnv {
        crate::streams::StreamEnv {
            drain: self.drain(),
            recheck_every: self.config.stream_recheck,
        }
    }

    /// Serves `service` until `shutdown` completes, then reports NOT_SERVING,
    /// stops accepting and drains in-flight calls for at most the configured
    /// shutdown timeout.
    pub async fn serve<S: GrpcService>(
        self,
        service: S,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let Server {
            migrations_pending,
            config,
            service_name,
            listener,
            metrics_listener,
            db,
            authenticator,
            metrics,
            health,
            tls,
            health_listener,
            draining_tx,
            ..
        } = self;
        let rpc_layer = RpcLayer::new(
            KnownMethods::from_descriptors(
                &[
                    igny8_proto::FILE_DESCRIPTOR_SET,
                    tonic_health::pb::FILE_DESCRIPTOR_SET,
                ],
                &[service_name, "grpc.health.v1.Health"],
            ),
            metrics.rpc.clone(),
        );
        let migrations_missing = metrics.migrations_missing.clone();
        let metrics_server = metrics_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving Prometheus metrics at /metrics");
            }
            tokio::spawn(serve_metrics(listener, metrics, db.clone()))
        });
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(igny8_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // google.rpc.ErrorInfo / BadRequest: lets grpcurl print error
                // details instead of "not recognized" and raw bytes.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
                .with_service_name(service_name)
                .with_service_name("grpc.health.v1.Health")
        };
        let draining = draining_tx.subscribe();
        let readiness = tokio::spawn(readiness(
            db.clone(),
            health.clone(),
            service_name,
            if config.run_migrations {
                Schema::Apply {
                    pending: migrations_pending,
                }
            } else {
                Schema::Expect
            },
            draining.clone(),
            migrations_missing,
        ));

        let signal = {
            let health = health.clone();
            async move {
                shutdown.await;
                tracing::info!(
                    "shutdown requested: reporting NOT_SERVING and draining in-flight calls"
                );
                health.drain().await;
                draining_tx.send_replace(true);
            }
        };
        // Plaintext health for probes that cannot speak TLS: the same
        // reporter, nothing else on this port.
        let health_server = health_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving plaintext grpc.health.v1.Health for probes");
            }
            let service =
                HealthServer::new(HealthService::from_health_reporter(health.reporter.clone()));
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(TcpListenerStream::new(listener)),
            )
        });
        let addr = listener.local_addr().ok();
        tracing::info!(
            service = service_name,
            ?addr,
            tls = tls.is_some(),
            mtls = tls.as_ref().is_some_and(|t| t.mutual()),
            "serving gRPC"
        );
        // Outermost first: every call gets its span and metrics, auth
        // failures included, and auth runs inside the span.
        let serve = tonic::transport::Server::builder()
            .layer(rpc_layer)
            .layer(AuthLayer::new(authenticator))
            .add_service(HealthServer::new(HealthService::from_health_reporter(
                health.reporter.clone(),
            )))
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(service)
            .serve_with_incoming_shutdown(
                tls::incoming(TcpListenerStream::new(listener), tls),
                signal,
            );
        tokio::pin!(serve);

        let drain_deadline = {
            let mut draining = draining.clone();
            let timeout = config.shutdown_timeout;
            async move {
                let _ = draining.wait_for(|d| *d).await;
                tokio::time::sleep(timeout).await;
            }
        };
        let result = tokio::select! {
            result = &mut serve => result.map_err(StartError::from),
            () = drain_deadline => {
                tracing::warn!(timeout = ?config.shutdown_timeout, "drain timed out; exiting with calls still in flight");
                Ok(())
            }
        };
        readiness.abort();
        // After a timed-out drain, calls still running hold connections that
        // close() would wait for forever; exiting closes them anyway.
        if tokio::time::timeout(POOL_CLOSE_BOUND, db.close())
            .await
            .is_err()
        {
            tracing::warn!("database pool did not close in time; leaving it to process exit");
        }
        if let Some(metrics_server) = metrics_server {
            metrics_server.abort();
        }
        if let Some(health_server) = health_server {
            health_server.abort();
        }
        tracing::info!(service = service_name, "stopped");
        result
    }
}

/// The health reporter for the server ("") and the service name, kept in
/// step with the `igny8_serving` gauge. Once draining, it stays NOT_SERVING:
/// the lock makes a readiness check that raced the drain unable to flip it
/// back.
#[derive(Clone)]
struct Health {
    reporter: HealthReporter,
    service_name: &'static str,
    serving: Gauge,
    draining: Arc<tokio::sync::Mutex<bool>>,
}

impl Health {
    fn new(service_name: &'static str, serving: Gauge) -> Self {
        Self {
            reporter: HealthReporter::new(),
            service_name,
            serving,
            draining: Arc::default(),
        }
    }

    /// Reports `status`, unless draining has begun.
    async fn set(&self, status: ServingStatus) {
        let draining = self.draining.lock().await;
        if !*draining {
            self.report(status).await;
        }
    }

    /// Reports NOT_SERVING for good.
    async fn drain(&self) {
        let mut draining = self.draining.lock().await;
        *draining = true;
        self.report(ServingStatus::NotServing).await;
    }

    async fn report(&self, status: ServingStatus) {
        for name in ["", self.service_name] {
            self.reporter.set_service_status(name, status).await;
        }
        self.serving
            .set(i64::from(status == ServingStatus::Serving));
    }
}

/// Bound on the start-up migration attempt: long enough for a database that
/// answers, short enough that an unreachable one does not hold start-up.
const STARTUP_MIGRATION_BOUND: Duration = Duration::from_secs(10);

/// Tries to apply migrations; true when they are applied. Two services
/// starting together on one fresh database race to apply the same
/// migrations and the loser fails; a few quick retries let it find them
/// applied instead of coming up NOT_SERVING for a readiness round.
async fn migrate_at_start(db: &Db) -> bool {
    let attempts = async {
        let mut last = None;
        for attempt in 0..5u64 {
            match db.migrate().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "migrations not applied yet");
                    last = Some(e);
                }
            }
            tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
        }
        Err(last.expect("at least one attempt"))
    };
    match tokio::time::timeout(STARTUP_MIGRATION_BOUND, attempts).await {
        Ok(Ok(())) => {
            tracing::info!("database migrations applied");
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "migrations not applied at start-up; serving NOT_SERVING and retrying");
            false
        }
        Err(_) => {
            tracing::warn!("database did not answer at start-up; serving NOT_SERVING and retrying");
            false
        }
    }
}

/// How long start-up waits for the database to answer the TLS check.
const STARTUP_TLS_CHECK_BOUND: Duration = Duration::from_secs(10);

/// Connects once at start-up: a TLS failure (a certificate the configured
/// CA does not vouch for, a server without TLS under `sslmode=require`) is a
/// configuration error that no retry will fix, so start-up stops with it.
/// An unreachable database is not: the server comes up NOT_SERVING.
async fn check_database_tls(db: &Db) -> Result<(), StartError> {
    match tokio::time::timeout(STARTUP_TLS_CHECK_BOUND, db.ping()).await {
        Ok(Err(e)) => match igny8_db::tls_failure(&e) {
            Some(reason) => Err(StartError::Config(format!(
                "DATABASE_URL: TLS with the database failed: {reason}; check sslmode and \
                 sslrootcert (the CA that signed the server's certificate) in DATABASE_URL"
            ))),
            None => Ok(()),
        },
        Ok(Ok(())) | Err(_) => Ok(()),
    }
}

/// What readiness requires of the schema.
#[derive(Debug, Clone, Copy)]
enum Schema {
    /// `IGNY8_RUN_MIGRATIONS=true`: this server applies them; `pending` when
    /// start-up could not.
    Apply {
        /// Not applied yet.
        pending: bool,
    },
    /// `IGNY8_RUN_MIGRATIONS=false`: someone else applies them (the
    /// Kubernetes migrate Job); wait until every migration this binary
    /// embeds is in the database.
    Expect,
}

/// Keeps health honest: NOT_SERVING until the database answers and has the
/// schema this binary needs (applying migrations first, when enabled),
/// NOT_SERVING again while it does not, and for good once draining starts.
async fn readiness(
    db: Db,
    health: Health,
    service_name: &'static str,
    schema: Schema,
    mut draining: watch::Receiver<bool>,
    migrations_missing: Gauge,
) {
    let mut migrated = matches!(schema, Schema::Apply { pending: false });
    let mut last = None;
    let mut last_missing: Option<Vec<igny8_db::MissingMigration>> = None;
    loop {
        if *draining.borrow() {
            return;
        }
        let status = match schema {
            Schema::Apply { .. } => match db.ping().await {
                Ok(()) if migrated => ServingStatus::Serving,
                Ok(()) => match db.migrate().await {
                    Ok(()) => {
                        tracing::info!("database migrations applied");
                        migrated = true;
                        migrations_missing.set(0);
                        ServingStatus::Serving
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "database migrations failed; will retry");
                        ServingStatus::NotServing
                    }
                },
                Err(e) => {
                    if last != Some(ServingStatus::NotServing) {
                        tracing::error!(error = %e, "database unreachable: reporting NOT_SERVING");
                    }
                    ServingStatus::NotServing
                }
            },
            // The schema query doubles as the ping.
            Schema::Expect => match db.missing_migrations().await {
                Ok(missing) => {
                    migrations_missing.set(i64::try_from(missing.len()).unwrap_or(i64::MAX));
                    if last_missing.as_ref() != Some(&missing) {
                        if missing.is_empty() {
                            if last_missing.is_some() {
                                tracing::info!("every migration this binary needs is applied");
                            }
                        } else {
                            tracing::warn!(
                                missing = %igny8_db::describe_missing(&missing),
                                "the database lacks migrations this binary needs \
                                 (IGNY8_RUN_MIGRATIONS=false): reporting NOT_SERVING until they \
                                 are applied (`<service> migrate` or the migrate Job)"
                            );
                        }
                    }
                    let ready = missing.is_empty();
                    last_missing = Some(missing);
                    if ready {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    }
                }
                Err(e) => {
                    if last != Some(ServingStatus::NotServing) {
                        tracing::error!(error = %e, "database unreachable: reporting NOT_SERVING");
                    }
                    ServingStatus::NotServing
                }
            },
        };
        if last != Some(status) && !*draining.borrow() {
            health.set(status).await;
            if status == ServingStatus::Serving {
                tracing::info!(
                    service = service_name,
                    "database reachable: reporting SERVING"
                );
            }
            last = Some(status);
        }
        tokio::select! {
            () = tokio::time::sleep(READINESS_INTERVAL) => {}
            _ = draining.changed() => {}
        }
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
