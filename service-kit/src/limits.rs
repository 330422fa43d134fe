//! Transport limits and fair sharing: what keeps one client or one tenant
//! from taking a server down.
//!
//! - [`Limits`]: every bound, with its default and environment variable
//!   (the README configuration table and `docs/decisions.md` explain them).
//! - [`incoming`]: the accept loop. It caps open connections (one over the
//!   cap is accepted and closed at once), backs off when the process runs
//!   out of file descriptors instead of spinning, and wraps each socket in
//!   [`LimitedIo`], which closes a connection that starts no call within the
//!   header-read time-out, that stays without a call in flight for the idle
//!   time-out, or that is idle when the server starts draining.
//! - [`ConnLayer`]: per call, tells the connection a call is in flight, and
//!   bounds the request body in time (body-read time-out) and size.
//! - [`FairLayer`]: after authentication, admits a call only while the
//!   server has fewer than `max_in_flight` calls in flight and its principal
//!   (the account it acts on, else the calling service or user) holds less
//!   than its share; otherwise `RESOURCE_EXHAUSTED` at once, never a queue.
//! - [`FairShare`]: the counting primitive behind [`FairLayer`], reusable by
//!   any other bounded resource (a write queue) that must be shared the same
//!   way.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use auth_interceptor::{AuthContext, Caller};
use futures::Stream;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    time::{Instant, Sleep},
};
use tonic::{
    Code, Status,
    body::Body,
    transport::server::{Connected, TcpConnectInfo},
};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

/// `ErrorInfo.domain` of refusals by the transport limits.
pub const ERROR_DOMAIN: &str = "server.igny8";

/// HTTP/2 flow-control window of each stream: how much request body a
/// client may send before the server reads it. Equal to the protocol's
/// initial value; the largest valid request is a few KiB.
pub const STREAM_WINDOW_BYTES: u32 = 64 * 1024;

/// HTTP/2 flow-control window of a whole connection: the most unread request
/// data one connection can make the server buffer.
pub const CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;

/// Once the server drains, how long a connection must have had no call in
/// flight before it is closed: time for the last response to be written and
/// for the client to act on GOAWAY.
const DRAIN_GRACE: Duration = Duration::from_millis(250);

/// File descriptors kept free beside connections (pools, listeners, logs).
const FD_RESERVE: usize = 64;

/// Every transport and fairness bound of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `IGNY8_MAX_CONCURRENT_STREAMS`: HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`
    /// per connection (default 128).
    pub max_concurrent_streams: u32,
    /// `IGNY8_MAX_CONNECTIONS`: open gRPC connections (default 512; lowered
    /// at start-up to what the process's file-descriptor limit allows).
    pub max_connections: usize,
    /// `IGNY8_HEADER_READ_TIMEOUT_SECS`: a new connection must start its first
    /// call within this (default 10 s).
    pub header_read_timeout: Duration,
    /// `IGNY8_IDLE_TIMEOUT_SECS`: a connection with no call in flight for this
    /// long is closed (default 120 s).
    pub idle_timeout: Duration,
    /// `IGNY8_BODY_READ_TIMEOUT_SECS`: a call's request body must arrive in
    /// full within this of the call's start (default 10 s).
    pub body_read_timeout: Duration,
    /// `IGNY8_MAX_REQUEST_BYTES`: the largest request body (default 128 KiB).
    pub max_request_bytes: usize,
    /// `IGNY8_HTTP2_KEEPALIVE_SECS`: HTTP/2 PING interval (default 30 s).
    pub keepalive_interval: Duration,
    /// `IGNY8_HTTP2_KEEPALIVE_TIMEOUT_SECS`: a PING unanswered this long
    /// closes the connection (default 10 s).
    pub keepalive_timeout: Duration,
    /// `IGNY8_MAX_IN_FLIGHT`: authenticated calls in flight on the server
    /// (default 256); above it, `RESOURCE_EXHAUSTED` at once.
    pub max_in_flight: usize,
    /// `IGNY8_PRINCIPAL_SHARE_PERCENT`: the share of the in-flight calls, and
    /// of the database pool, one principal may hold (default 25); `None`
    /// (`off`) disables the per-principal cap.
    pub principal_share_percent: Option<u8>,
    /// `IGNY8_DB_AUX_CONNECTIONS`: size of the separate pool for directory
    /// lookups and readiness (default 2).
    pub aux_pool_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 128,
            max_connections: 512,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            body_read_timeout: Duration::from_secs(10),
            max_request_bytes: 128 * 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_in_flight: 1024,
            principal_share_percent: Some(25),
            aux_pool_size: 2,
        }
    }
}

impl Limits {
    /// How many calls one principal may have in flight: its share of the
    /// in-flight cap, at least 1. `None` when fairness is off.
    ///
    /// Not a share of the database pool: writes wait in the ledger writer's
    /// queue (bounded per account by its own share), not on a connection
    /// each, and a read holds a pooled connection for one short query; so
    /// the in-flight cap is what bounds one tenant's hold on the server.
    pub fn principal_cap(&self) -> Option<usize> {
        let share = usize::from(self.principal_share_percent?);
        Some((self.max_in_flight * share / 100).max(1))
    }

    /// `max_connections`, lowered so connections cannot use up the file
    /// descriptors the process needs for everything else (`soft_nofile` is
    /// the soft `RLIMIT_NOFILE`, when known).
    pub fn effective_max_connections(&self, soft_nofile: Option<usize>, pool_size: u32) -> usize {
        let Some(nofile) = soft_nofile else {
            return self.max_connections;
        };
        let reserve = FD_RESERVE + pool_size as usize + self.aux_pool_size as usize;
        self.max_connections
            .min(nofile.saturating_sub(reserve).max(1))
    }
}

/// The soft open-files limit of this process, from `/proc/self/limits`
/// (Linux); `None` elsewhere or when unlimited.
pub fn soft_nofile_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------
// Accept loop

/// True for accept errors that say the process (or system) is out of a
/// resource: retrying at once would spin. Linux errno values: EMFILE 24,
/// ENFILE 23, ENOBUFS 105, ENOMEM 12.
fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Exponential back-off for accept errors: 5 ms doubling to 1 s, reset by
/// the next accepted connection.
#[derive(Debug, Default)]
struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn step(&mut self) -> Duration {
        let delay = self.next.unwrap_or(Self::FIRST);
        self.next = Some((delay * 2).min(Self::MAX));
        delay
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

/// Calls `accept` until it succeeds: per-connection errors (the peer went
/// away before we accepted) are retried at once, running out of
/// descriptors or memory sleeps with back-off first.
async fn accept_with_backoff<T, F, Fut>(backoff: &mut Backoff, mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(conn) => {
                backoff.reset();
                return conn;
            }
            Err(e) if is_resource_exhaustion(&e) => {
                let delay = backoff.step();
                tracing::warn!(error = %e, ?delay, "cannot accept connections (out of file descriptors or memory); backing off");
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "accept failed for one connection");
            }
        }
    }
}

/// The connections a server accepts, bounded and wrapped in [`LimitedIo`].
/// Never yields an error (tonic's own loop would retry it at once and spin).
/// `draining` turns true when the server starts its shutdown.
pub fn incoming(
    listener: TcpListener,
    limits: &Limits,
    max_connections: usize,
    draining: watch::Receiver<bool>,
) -> impl Stream<Item = Result<LimitedIo, io::Error>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(max_connections));
    let timeouts = IoTimeouts {
        header_read: limits.header_read_timeout,
        idle: limits.idle_timeout,
    };
    let state = (listener, slots, Backoff::default(), draining);
    futures::stream::unfold(
        state,
        move |(listener, slots, mut backoff, draining)| async move {
            loop {
                let (stream, remote) =
                    accept_with_backoff(&mut backoff, || listener.accept()).await;
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    // Over the bound: close at once (the client sees a reset
                    // and retries elsewhere) rather than leave it queued.
                    tracing::debug!(%remote, "connection refused: at the connection limit");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let io = LimitedIo::new(stream, remote, permit, timeouts, draining.clone());
                return Some((Ok(io), (listener, slots, backoff, draining)));
            }
        },
    )
}

// ---------------------------------------------------------------------------
// Connections

#[derive(Debug, Clone, Copy)]
struct IoTimeouts {
    header_read: Duration,
    idle: Duration,
}

/// What a connection and the calls on it share.
#[derive(Debug)]
pub struct ConnState {
    /// Calls in flight on the connection.
    active: AtomicUsize,
    /// True once the connection has started a call.
    served: AtomicBool,
    /// When the last call finished (or the connection opened).
    idle_since: Mutex<Instant>,
}

impl ConnState {
    fn new() -> Self {
        Self {
            active: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    fn call_started(self: &Arc<Self>) -> CallGuard {
        self.served.store(true, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }
}

/// Marks a call in flight on its connection until dropped.
#[derive(Debug)]
struct CallGuard(Arc<ConnState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        // The timestamp first: a connection whose count reaches 0 must not
        // be judged against a stale idle start.
        if let Ok(mut since) = self.0.idle_since.lock() {
            *since = Instant::now();
        }
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The request extension [`LimitedIo`] gives every call on its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    state: Arc<ConnState>,
    local: Option<SocketAddr>,
    remote: SocketAddr,
}

/// An accepted TCP connection that closes itself (reads end) when it starts
/// no call within the header-read time-out, stays without a call for the
/// idle time-out, or is idle once the server drains. Holds its slot of the
/// connection bound until dropped.
pub struct LimitedIo {
    io: TcpStream,
    info: ConnInfo,
    timeouts: IoTimeouts,
    timer: Pin<Box<Sleep>>,
    draining: Pin<Box<dyn Future<Output = ()> + Send>>,
    drained: bool,
    drain_armed: bool,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for LimitedIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitedIo")
            .field("remote", &self.info.remote)
            .finish_non_exhaustive()
    }
}

impl LimitedIo {
    fn new(
        io: TcpStream,
        remote: SocketAddr,
        slot: OwnedSemaphorePermit,
        timeouts: IoTimeouts,
        mut draining: watch::Receiver<bool>,
    ) -> Self {
        let local = io.local_addr().ok();
        Self {
            io,
            info: ConnInfo {
                state: Arc::new(ConnState::new()),
                local,
                remote,
            },
            timeouts,
            timer: Box::pin(tokio::time::sleep(timeouts.header_read)),
            draining: Box::pin(async move {
                let _ = draining.wait_for(|d| *d).await;
            }),
            drained: false,
            drain_armed: false,
            _slot: slot,
        }
    }

    /// True when the connection should close now; otherwise the timer is
    /// armed for the next check (and registered with `cx`).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let state = &self.info.state;
        if !self.drained && self.draining.as_mut().poll(cx).is_ready() {
            self.drained = true;
        }
        if self.drained && !self.drain_armed {
            // From now on check every DRAIN_GRACE: the grace lets the last
            // response reach the socket and a well-behaved client close
            // after GOAWAY.
            self.drain_armed = true;
            self.timer.as_mut().reset(Instant::now());
        }
        loop {
            let active = state.active.load(Ordering::Acquire);
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = Instant::now();
            if active > 0 {
                let next = if self.drained {
                    DRAIN_GRACE
                } else {
                    self.timeouts.idle
                };
                self.timer.as_mut().reset(now + next);
                continue;
            }
            let since = state.idle_since.lock().map(|s| *s).unwrap_or(now);
            let limit = if self.drained {
                DRAIN_GRACE
            } else if state.served.load(Ordering::Relaxed) {
                self.timeouts.idle
            } else {
                self.timeouts.header_read
            };
            if now >= since + limit {
                tracing::debug!(remote = %self.info.remote, ?limit, "closing a connection with no call in flight");
                return true;
            }
            self.timer.as_mut().reset(since + limit);
        }
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Pending if self.expired(cx) => {
                // End of stream: the HTTP/2 connection ends and the socket
                // is closed when hyper drops it.
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for LimitedIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

// ---------------------------------------------------------------------------
// Per-call transport layer

/// Marks calls in flight on their connection and bounds each request body
/// in time and size. Sits outside authentication, so it covers every call.
#[derive(Debug, Clone)]
pub struct ConnLayer {
    body_read_timeout: Duration,
    max_request_bytes: usize,
}

impl ConnLayer {
    /// The layer for these limits.
    pub fn new(limits: &Limits) -> Self {
        Self {
            body_read_timeout: limits.body_read_timeout,
            max_request_bytes: limits.max_request_bytes,
        }
    }
}

impl<S> Layer<S> for ConnLayer {
    type Service = ConnService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnService {
            layer: self.clone(),
            inner,
        }
    }
}

/// See [`ConnLayer`].
#[derive(Debug, Clone)]
pub struct ConnService<S> {
    layer: ConnLayer,
    inner: S,
}

impl<S> Service<Request<Body>> for ConnService<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let guard = match request.extensions().get::<ConnInfo>().cloned() {
            Some(info) => {
                // tonic's `Request::remote_addr` reads this.
                request.extensions_mut().insert(TcpConnectInfo {
                    local_addr: info.local,
                    remote_addr: Some(info.remote),
                });
                Some(info.state.call_started())
            }
            None => {
                // Connections not accepted by `incoming` (or wrapped so
                // that the extension type differs, e.g. tonic's
                // `TlsConnectInfo<ConnInfo>`) are not tracked per call:
                // their idle time-outs would not see calls in flight.
                static WARNED: AtomicBool = AtomicBool::new(false);
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "a call arrived without connection info; per-connection call tracking is off for it"
                    );
                }
                None
            }
        };
        let request = request.map(|body| {
            Body::new(LimitedBody {
                inner: body,
                deadline: Box::pin(tokio::time::sleep(self.layer.body_read_timeout)),
                timeout: self.layer.body_read_timeout,
                remaining: self.layer.max_request_bytes,
                limit: self.layer.max_request_bytes,
            })
        });
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(match guard {
                // The call is in flight until its response body ends.
                Some(guard) => response.map(|body| {
                    Body::new(GuardedBody {
                        inner: body,
                        _guard: guard,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A request body that fails with DEADLINE_EXCEEDED when it has not ended
/// within the body-read time-out, and with RESOURCE_EXHAUSTED past the
/// size bound.
struct LimitedBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    remaining: usize,
    limit: usize,
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if data.len() > this.remaining {
                        return Poll::Ready(Some(Err(refusal(
                            Code::ResourceExhausted,
                            format!(
                                "request body larger than {} bytes (IGNY8_MAX_REQUEST_BYTES); send a smaller request",
                                this.limit
                            ),
                            "REQUEST_TOO_LARGE",
                            None,
                        ))));
                    }
                    this.remaining -= data.len();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                ready!(this.deadline.as_mut().poll(cx));
                Poll::Ready(Some(Err(refusal(
                    Code::DeadlineExceeded,
                    format!(
                        "request body not received in full within {} s; send the whole request promptly",
                        this.timeout.as_secs_f64()
                    ),
                    "BODY_READ_TIMEOUT",
                    None,
                ))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body, holding its call's [`CallGuard`] until it ends.
struct GuardedBody {
    inner: Body,
    _guard: CallGuard,
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A refusal status with `ErrorInfo` (and `RetryInfo` when retrying later
/// helps).
fn refusal(code: Code, message: String, reason: &str, retry: Option<Duration>) -> Status {
    let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new());
    if let Some(delay) = retry {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(code, message, details)
}

// ---------------------------------------------------------------------------
// Fair sharing

/// Why [`FairShare::try_acquire`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is taken (`total` of them).
    Full {
        /// The total cap.
        total: usize,
    },
    /// This key already holds its share (`per_key` slots).
    Share {
        /// The per-key cap.
        per_key: usize,
    },
}

#[derive(Debug)]
struct ShareState<K> {
    total: usize,
    /// foldhash, not SipHash: taken and released on every authenticated
    /// call, under the one lock every call shares. Keys are principals the
    /// auth layer resolved, not raw client input.
    by_key: HashMap<K, usize, foldhash::fast::RandomState>,
}

/// A counted resource (calls in flight, queue slots) shared fairly: at most
/// `total` holders at once and at most `per_key` per key. Never waits: a
/// caller over either cap is refused at once and should answer
/// `RESOURCE_EXHAUSTED`. Keys with nothing held take no memory.
///
/// ```
/// use std::sync::Arc;
/// use service_kit::limits::{FairShare, Refused};
///
/// let share = Arc::new(FairShare::new(10, Some(2)));
/// let a1 = share.try_acquire(1u64).unwrap();
/// let _a2 = share.try_acquire(1).unwrap();
/// assert_eq!(share.try_acquire(1).unwrap_err(), Refused::Share { per_key: 2 });
/// assert!(share.try_acquire(2).is_ok(), "another key still gets in");
/// drop(a1);
/// assert!(share.try_acquire(1).is_ok(), "released on drop");
/// ```
#[derive(Debug)]
pub struct FairShare<K: Eq + Hash> {
    total: usize,
    per_key: Option<usize>,
    state: Mutex<ShareState<K>>,
}

/// One slot of a [`FairShare`], released on drop.
#[derive(Debug)]
pub struct FairPermit<K: Eq + Hash + Clone> {
    share: Arc<FairShare<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> FairShare<K> {
    /// `total` slots, `per_key` of them at most for one key (`None`: no
    /// per-key cap).
    pub fn new(total: usize, per_key: Option<usize>) -> Self {
        Self {
            total,
            per_key,
            state: Mutex::new(ShareState {
                total: 0,
                by_key: HashMap::default(),
            }),
        }
    }

    /// Takes a slot for `key`, or says which cap is reached.
    pub fn try_acquire(self: &Arc<Self>, key: K) -> Result<FairPermit<K>, Refused> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.total >= self.total {
            return Err(Refused::Full { total: self.total });
        }
        let state = &mut *state;
        let held = state.by_key.entry(key.clone()).or_insert(0);
        if let Some(per_key) = self.per_key
            && *held >= per_key
        {
            if *held == 0 {
                // A share of zero: leave no entry behind.
                state.by_key.remove(&key);
            }
            return Err(Refused::Share { per_key });
        }
        *held += 1;
        state.total += 1;
        Ok(FairPermit {
            share: self.clone(),
            key,
        })
    }

    /// Slots held now (all keys).
    pub fn in_use(&self) -> usize {
        self.state.lock().map(|s| s.total).unwrap_or(0)
    }
}

impl<K: Eq + Hash + Clone> Drop for FairPermit<K> {
    fn drop(&mut self) {
        let mut state = self.share.state.lock().unwrap_or_else(|e| e.into_inner());
        state.total -= 1;
        if let Some(n) = state.by_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                state.by_key.remove(&self.key);
            }
        }
    }
}

/// Whom a call's fair share is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// The account the call acts on (its own, or act-as).
    Account(i64),
    /// A service calling without an account.
    Service(String),
    /// A user without an account (never reaches account-scoped calls).
    User(i64),
}

impl Principal {
    /// The principal of an authenticated call.
    pub fn of(ctx: &AuthContext) -> Self {
        match (ctx.account_id, &ctx.caller) {
            (Some(account), _) => Principal::Account(account),
            (None, Caller::Service { name }) => Principal::Service(name.clone()),
            (None, Caller::User { id }) => Principal::User(*id),
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Account(id) => write!(f, "account {id}"),
            Principal::Service(name) => write!(f, "service {name}"),
            Principal::User(id) => write!(f, "user {id}"),
        }
    }
}

/// How long a refused caller is told to wait before retrying.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Admits authenticated calls within the server's in-flight cap and their
/// principal's share; refuses the rest at once with `RESOURCE_EXHAUSTED`.
/// Calls without an [`AuthContext`] (health, reflection) pass untouched.
#[derive(Debug, Clone)]
pub struct FairLayer {
    share: Arc<FairShare<Principal>>,
}

impl FairLayer {
    /// The layer for these limits.
    pub fn new(limits: &Limits) -> Self {
        Self {
            share: Arc::new(FairShare::new(limits.max_in_flight, limits.principal_cap())),
        }
    }
}

impl<S> Layer<S> for FairLayer {
    type Service = FairService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FairService {
            share: self.share.clone(),
            inner,
        }
    }
}

/// See [`FairLayer`].
#[derive(Debug, Clone)]
pub struct FairService<S> {
    share: Arc<FairShare<Principal>>,
    inner: S,
}

impl<S> Service<Request<Body>> for FairService<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(principal) = request.extensions().get::<AuthContext>().map(Principal::of) else {
            return Box::pin(self.inner.call(request));
        };
        match self.share.try_acquire(principal.clone()) {
            Ok(permit) => {
                let future = self.inner.call(request);
                Box::pin(async move {
                    let response = future.await;
                    drop(permit);
                    response
                })
            }
            Err(refused) => {
                let message = match refused {
                    Refused::Full { total } => format!(
                        "server overloaded: {total} calls already in flight; retry with backoff"
                    ),
                    Refused::Share { per_key } => format!(
                        "too many concurrent calls for {principal}: at most {per_key} in flight at once; retry when earlier calls finish"
                    ),
                };
                let reason = match refused {
                    Refused::Full { .. } => "SERVER_OVERLOADED",
                    Refused::Share { .. } => "PRINCIPAL_SHARE_EXCEEDED",
                };
                tracing::debug!(%principal, ?refused, "call refused by the in-flight limits");
                let status = refusal(Code::ResourceExhausted, message, reason, Some(RETRY_AFTER));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_and_released_keys_take_no_memory() {
        let share = Arc::new(FairShare::new(10, Some(2)));
        let permits: Vec<_> = (0..2).map(|_| share.try_acquire(7u64).unwrap()).collect();
        assert_eq!(
            share.try_acquire(7).unwrap_err(),
            Refused::Share { per_key: 2 }
        );
        drop(permits);
        assert!(share.state.lock().unwrap().by_key.is_empty());
        assert_eq!(share.in_use(), 0);
        let none = Arc::new(FairShare::new(10, Some(0)));
        assert_eq!(
            none.try_acquire(7u64).unwrap_err(),
            Refused::Share { per_key: 0 }
        );
        assert!(none.state.lock().unwrap().by_key.is_empty());
    }

    #[test]
    fn principal_cap_is_a_share_of_the_in_flight_cap() {
        let limits = Limits::default();
        assert_eq!(limits.principal_cap(), Some(256));
        let tiny = Limits {
            principal_share_percent: Some(10),
            max_in_flight: 5,
            ..Limits::default()
        };
        assert_eq!(tiny.principal_cap(), Some(1), "at least one");
        let wide = Limits {
            principal_share_percent: Some(50),
            max_in_flight: 10,
            ..Limits::default()
        };
        assert_eq!(wide.principal_cap(), Some(5));
        let off = Limits {
            principal_share_percent: None,
            ..Limits::default()
        };
        assert_eq!(off.principal_cap(), None);
    }

    #[test]
    fn connections_leave_descriptors_for_the_rest() {
        let limits = Limits::default();
        assert_eq!(limits.effective_max_connections(None, 16), 512);
        assert_eq!(limits.effective_max_connections(Some(1 << 20), 16), 512);
        assert_eq!(
            limits.effective_max_connections(Some(256), 16),
            256 - 64 - 16 - 2
        );
        assert_eq!(limits.effective_max_connections(Some(10), 16), 1);
    }

    #[test]
    fn fair_share_counts_per_key_and_in_total() {
        let share = Arc::new(FairShare::new(3, Some(2)));
        let a1 = share.try_acquire("a").unwrap();
        let a2 = share.try_acquire("a").unwrap();
        assert_eq!(
            share.try_acquire("a").unwrap_err(),
            Refused::Share { per_key: 2 }
        );
        let b1 = share.try_acquire("b").unwrap();
        assert_eq!(
            share.try_acquire("c").unwrap_err(),
            Refused::Full { total: 3 }
        );
        drop(a1);
        assert_eq!(share.in_use(), 2);
        let _c = share.try_acquire("c").unwrap();
        drop((a2, b1));
        assert_eq!(share.in_use(), 1);
        assert_eq!(
            share.state.lock().unwrap().by_key.len(),
            1,
            "empty keys are forgotten"
        );
    }

    #[tokio::test]
    async fn running_out_of_descriptors_backs_off_instead_of_spinning() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut backoff = Backoff::default();
        let counted = attempts.clone();
        let got = accept_with_backoff(&mut backoff, move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 4 {
                    Err(io::Error::from_raw_os_error(24)) // EMFILE
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got, 4);
        assert_eq!(attempts.load(Ordering::SeqCst), 5);
        // 5 + 10 + 20 + 40 ms: the loop slept between attempts rather than
        // retrying at once.
        let slept = start.elapsed();
        assert!(slept >= Duration::from_millis(75), "{slept:?}");
        assert_eq!(backoff.next, None, "reset after a success");

        // A per-connection error is retried at once.
        let start = Instant::now();
        let mut first = true;
        let got = accept_with_backoff(&mut Backoff::default(), move || {
            let fail = std::mem::replace(&mut first, false);
            async move {
                if fail {
                    Err(io::Error::from(io::ErrorKind::ConnectionAborted))
                } else {
                    Ok(1)
                }
            }
        })
        .await;
        assert_eq!(got, 1);
        assert!(start.elapsed() < Duration::from_millis(5), "no back-off");
    }
}
