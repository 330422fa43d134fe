//! Server-streaming "watch" calls, written once for both services: the
//! current state first, then the state again after every change, until the
//! server drains (UNAVAILABLE) or the caller loses access
//! (PERMISSION_DENIED / UNAUTHENTICATED, decided again by the auth crate's
//! one [`Resolver`](auth_interceptor::Resolver) every
//! `IGNY8_STREAM_RECHECK_SECS`).
//!
//! A stream holds one [`Subscription`] (a generation counter), the last
//! state it sent and a few timers: O(1) memory whatever the rate of
//! changes. It is pull-based: a state is read from the database only when
//! the transport asks for the next message, so a reader that stops reading
//! costs nothing more than HTTP/2 flow control already bounds, and writers
//! never wait for it (a notification is a counter bump).

use std::{future::Future, pin::Pin, time::Duration};

use auth_interceptor::Recheck;
use futures::Stream;
use tokio::time::Instant;
use tonic::Status;

use crate::{changes::Subscription, server::Drain};

/// What streaming handlers need from the server: the drain signal and the
/// access re-check interval.
#[derive(Debug, Clone)]
pub struct StreamEnv {
    /// Fires when the server starts draining.
    pub drain: Drain,
    /// How often an open stream re-checks the caller's access.
    pub recheck_every: Duration,
}

impl StreamEnv {
    /// For services built outside a [`crate::Server`] (unit tests): never
    /// drains, re-checks at the default interval.
    pub fn detached() -> Self {
        Self {
            drain: Drain::never(),
            recheck_every: crate::config::DEFAULT_STREAM_RECHECK,
        }
    }
}

/// One read of the watched state.
#[derive(Debug)]
pub struct Read<T> {
    /// The message to send, or `None` when nothing the caller can see
    /// changed since the last message.
    pub message: Option<T>,
    /// Read again at this time even without a notification (a change that
    /// happens by the clock, such as a hold expiring).
    pub wake_at: Option<Instant>,
}

/// The state a stream watches.
pub trait Watched: Send + 'static {
    /// What the stream sends.
    type Message: Send + 'static;

    /// Reads the current state. The first call must return a message.
    fn read(&mut self) -> impl Future<Output = Result<Read<Self::Message>, Status>> + Send;
}

/// A boxed response stream, the type tonic's generated traits want.
pub type WatchStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The status a stream ends with when the server drains.
pub fn draining_status() -> Status {
    Status::unavailable(
        "the server is shutting down; reopen the stream (another replica will serve it)",
    )
}

/// Streams `watched`: its first read, then a read after every change
/// `subscription` reports (or at the read's `wake_at`), sending each message
/// the read produces. Ends with UNAVAILABLE on drain, with the auth error
/// when `recheck` refuses, and with a read's error.
///
/// Subscribe before calling, so nothing between subscribing and the first
/// read is missed.
pub fn watch<W: Watched>(
    env: StreamEnv,
    subscription: Subscription,
    recheck: Recheck,
    watched: W,
) -> WatchStream<W::Message> {
    let state = State {
        next_recheck: Instant::now() + env.recheck_every,
        env,
        subscription,
        recheck,
        watched,
        wake_at: None,
        started: false,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let item = state.next().await;
        if let Err(status) = &item {
            tracing::debug!(code = ?status.code(), message = status.message(), "stream ended");
            state.done = true;
        }
        Some((item, state))
    }))
}

struct State<W> {
    env: StreamEnv,
    subscription: Subscription,
    recheck: Recheck,
    watched: W,
    next_recheck: Instant,
    wake_at: Option<Instant>,
    started: bool,
    done: bool,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl<W: Watched> State<W> {
    async fn next(&mut self) -> Result<W::Message, Status> {
        let mut must_read = !self.started;
        self.started = true;
        loop {
            if self.env.drain.is_draining() {
                return Err(draining_status());
            }
            if must_read {
                // Changes from here on wake us again, so one that lands
                // during the read is never lost.
                self.subscription.mark_seen();
                let read = self.watched.read().await?;
                self.wake_at = read.wake_at;
                if let Some(message) = read.message {
                    return Ok(message);
                }
            }
            tokio::select! {
                biased;
                () = self.env.drain.wait() => return Err(draining_status()),
                () = tokio::time::sleep_until(self.next_recheck) => {
                    self.next_recheck = Instant::now() + self.env.recheck_every;
                    self.recheck.run().await.map_err(Status::from)?;
                    must_read = false;
                }
                () = self.subscription.changed() => must_read = true,
                () = sleep_until(self.wake_at) => {
                    self.wake_at = None;
                    must_read = true;
                }
            }
        }
    }
}
