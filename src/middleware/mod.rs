//! Middleware: what wraps a subscription's handler — retries, timeouts, deduplication, circuit
//! breaking, throttling, and your own.
//!
//! A [`Middleware`] sees each delivery of an event on its way to the handler and the result on
//! its way back, and decides what happens in between: call the rest of the chain ([`Next`])
//! once, several times, or not at all. It is the shape of tower's `Layer`/`Service` and of
//! axum's `from_fn` middleware, made for handlers that borrow their event and keep `&mut self`
//! state.
//!
//! # Order
//!
//! Layers are declared on a [`Subscription`](crate::Subscription) with
//! [`layer`](crate::Subscription::layer). **Each `layer` call wraps everything declared before
//! it**, as in axum: the first layer is the innermost (closest to the handler), the last one is
//! the outermost and sees the event first.
//!
//! ```text
//! Subscription::new("billing")
//!     .layer(Timeout::new(d))     // innermost: limits each attempt
//!     .layer(Retry::new(5))       // calls the timeout-wrapped handler up to 5 times
//!     .layer(Dedup::new(window))  // outermost: skips events already handled, before any attempt
//! ```
//!
//! What the order means for the layers of this crate:
//!
//! | inner → outer | meaning |
//! |---|---|
//! | `Timeout`, `Retry` | each attempt has its own deadline; a timed-out attempt is retried |
//! | `Retry`, `Timeout` | one deadline for all attempts together, backoff included |
//! | `Retry`, `Dedup` | a duplicate is skipped before any attempt; the id is marked once an attempt succeeded |
//! | `Dedup`, `Retry` | the duplicate check runs on every attempt (same result, more lookups) |
//! | `CircuitBreaker`, `Retry` | every attempt counts for the breaker; an open circuit fails the attempt, and the retry backs off |
//! | `Retry`, `CircuitBreaker` | the breaker counts whole events (after their retries) |
//! | `Throttle`, `Retry` | every attempt takes a permit |
//! | `Retry`, `Throttle` | an event takes one permit, however many attempts it needs |
//!
//! With no [`Retry`] layer, a subscription redelivers a failed event at once up to its
//! [`max_deliveries`](crate::Subscription::max_deliveries) (default 3), around the whole chain.
//! With one, the `Retry` layer alone decides (and `max_deliveries` must be left unset). When the
//! chain finally returns an error, the event goes to the group's
//! [dead-letter queue](crate::dead_letter::DeadLetters).
//!
//! # Writing one
//!
//! A middleware is a `Clone` value; every partition worker of the subscription gets its own
//! clone (share state between them with an `Arc`). Its [`call`](Middleware::call) gets the
//! envelope (with its [attempt](crate::AnyEnvelope::attempt) number) and [`Next`]:
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use tidings::middleware::{Middleware, Next};
//! use tidings::{AnyEnvelope, HandlerResult};
//!
//! /// Counts failed attempts per subscription.
//! #[derive(Clone, Default)]
//! struct CountFailures(Arc<AtomicU64>);
//!
//! impl Middleware for CountFailures {
//!     async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
//!         let result = next.run(env).await;
//!         if result.is_err() {
//!             self.0.fetch_add(1, Ordering::Relaxed);
//!             tracing::info!(event_id = %env.id(), attempt = env.attempt(), "attempt failed");
//!         }
//!         result
//!     }
//! }
//! ```
//!
//! A middleware must not hold on to the event past its call, and cannot replace it: the handler
//! always receives the published event (with the attempt number of the envelope passed to
//! [`Next::run`]).
//!
//! # Failures the layers make
//!
//! When a layer of this crate fails a call itself, the [`HandlerError`](crate::HandlerError)'s
//! source is a type a layer further out can match with
//! [`HandlerError::is`](crate::HandlerError::is) (the text is for people):
//!
//! | made by | error | kind |
//! |---|---|---|
//! | [`Timeout`], its deadline passed | [`Elapsed`] | transient |
//! | [`CircuitBreaker`], open | [`CircuitOpen`] | transient |
//! | [`Retry`], stopped by the shutdown | [`Interrupted`] (holds the last error) | the last error's |
//! | `TowerLayer`, its service answered without the handler | `NotHandled` (feature `tower`) | transient |
//! | the worker, a handler panicked | [`Panicked`](crate::Panicked) | transient |
//!
//! ```
//! use tidings::middleware::{CircuitOpen, Elapsed, Middleware, Next};
//! use tidings::{AnyEnvelope, HandlerResult, Panicked};
//!
//! /// Logs why attempts failed, by cause.
//! #[derive(Clone)]
//! struct WhyFailed;
//!
//! impl Middleware for WhyFailed {
//!     async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
//!         let result = next.run(env).await;
//!         if let Err(err) = &result {
//!             let cause = if err.is::<Elapsed>() {
//!                 "timeout"
//!             } else if err.is::<CircuitOpen>() {
//!                 "circuit open"
//!             } else if err.is::<Panicked>() {
//!                 "panic"
//!             } else {
//!                 "handler error"
//!             };
//!             tracing::warn!(event_id = %env.id(), cause, error = %err, "attempt failed");
//!         }
//!         result
//!     }
//! }
//! ```

mod circuit;
mod dedup;
mod error;
mod retry;
mod throttle;
mod timeout;
#[cfg(feature = "tower")]
mod tower;

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;

use crate::context::Context;
use crate::envelope::AnyEnvelope;
use crate::handler::HandlerResult;

pub use crate::window::{Claim, DedupWindow};
pub use circuit::CircuitBreaker;
pub use dedup::{Dedup, DedupStore, MemoryDedupStore};
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub use error::NotHandled;
pub use error::{CircuitOpen, Elapsed, Interrupted};
pub use retry::Retry;
pub use throttle::Throttle;
pub use timeout::Timeout;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub use tower::{Gate, TowerLayer, TowerRequest};

/// A step around a subscription's handler: sees every delivery of an event and its result.
///
/// See the [module docs](crate::middleware) for the order of layers and an example.
pub trait Middleware: Clone + Send + 'static {
    /// Handles one delivery of `env`: usually does something, calls `next.run(env)`, and looks
    /// at the result. Returning `Ok` without calling `next` acknowledges the event without
    /// handling it (as deduplication does).
    fn call<'a>(
        &'a mut self,
        env: &'a AnyEnvelope,
        next: Next<'a>,
    ) -> impl Future<Output = HandlerResult> + Send + 'a;

    /// What the bus needs to know of this layer (whether it retries or deduplicates).
    #[doc(hidden)]
    fn kind(&self) -> LayerKind {
        LayerKind::Other
    }

    /// Checks the layer's settings when the bus is built: `Err(reason)` makes
    /// [`BusBuilder::build`](crate::BusBuilder::build) fail with
    /// [`BuildError::InvalidSetting`](crate::BuildError::InvalidSetting), naming the
    /// subscription and the reason. Constructors can stay infallible (and chain fluently in
    /// [`Subscription::layer`](crate::Subscription::layer)): a value out of range is kept and
    /// reported here instead of being accepted silently. Default: no check.
    ///
    /// # Errors
    ///
    /// A sentence saying which setting is wrong and why.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// What kind of layer a middleware is, as far as the bus cares.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Retries: the subscription does not redeliver by itself.
    Retry,
    /// Deduplicates: effectively-once delivery needs no extra one.
    Dedup,
    /// Anything else.
    Other,
}

/// The rest of the chain, up to the handler: what a [`Middleware`] calls to go on.
///
/// [`run`](Next::run) may be called more than once (a retry does) or not at all.
pub struct Next<'a> {
    pub(crate) rest: &'a mut [Box<dyn DynMiddleware>],
    pub(crate) end: &'a mut (dyn Endpoint + 'static),
    pub(crate) ctx: &'a Context,
    pub(crate) track: &'a Track,
}

impl<'a> Next<'a> {
    /// Runs the rest of the chain and the handler with `env`.
    pub fn run<'b>(
        &'b mut self,
        env: &'b AnyEnvelope,
    ) -> impl Future<Output = HandlerResult> + Send + 'b {
        match self.rest.split_first_mut() {
            Some((first, rest)) => first.call_dyn(
                env,
                Next {
                    rest,
                    end: &mut *self.end,
                    ctx: self.ctx,
                    track: self.track,
                },
            ),
            None => {
                self.track.note_attempt(env.attempt());
                self.end.call(env, self.ctx)
            }
        }
    }

    /// The handler's context: the group, correlation, the shutdown signal, publishing.
    pub fn context(&self) -> &'a Context {
        self.ctx
    }

    /// Notes a failed attempt, for the dead-letter entry's first and last failure times.
    pub(crate) fn note_failure(&self) {
        self.track.note_failure();
    }

    /// Notes that attempt `n` is about to start (for the dead-letter entry's attempt count,
    /// even if no attempt reaches the handler).
    pub(crate) fn note_attempt(&self, n: u32) {
        self.track.note_attempt(n);
    }

    /// Notes that the event was acknowledged as a duplicate (counted in the stats).
    pub(crate) fn note_duplicate(&self) {
        self.track.duplicate.store(true, Ordering::Relaxed);
    }

    /// Notes that the shutdown cut the event's retries short: with a store, the worker leaves
    /// it in the log for the next start instead of dead-lettering it.
    pub(crate) fn note_interrupted(&self) {
        self.track.interrupted.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Next<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Next")
            .field("layers_left", &self.rest.len())
            .finish_non_exhaustive()
    }
}

/// What the chain ends in: the supervised handler.
pub(crate) trait Endpoint: Send {
    fn call<'a>(
        &'a mut self,
        env: &'a AnyEnvelope,
        ctx: &'a Context,
    ) -> BoxFuture<'a, HandlerResult>;
}

/// A middleware with its future boxed, so that a chain can hold several kinds.
pub(crate) trait DynMiddleware: Send {
    fn call_dyn<'a>(
        &'a mut self,
        env: &'a AnyEnvelope,
        next: Next<'a>,
    ) -> BoxFuture<'a, HandlerResult>;
}

impl<M: Middleware> DynMiddleware for M {
    fn call_dyn<'a>(
        &'a mut self,
        env: &'a AnyEnvelope,
        next: Next<'a>,
    ) -> BoxFuture<'a, HandlerResult> {
        Box::pin(self.call(env, next))
    }
}

/// A layer as a subscription keeps it: a way to make each worker's instance.
#[derive(Clone)]
pub(crate) struct LayerSpec {
    pub(crate) name: &'static str,
    pub(crate) kind: LayerKind,
    /// Checks the layer's settings at build.
    pub(crate) check: Result<(), String>,
    pub(crate) make: Arc<dyn Fn() -> Box<dyn DynMiddleware> + Send + Sync>,
}

impl LayerSpec {
    pub(crate) fn new<M: Middleware>(layer: M) -> Self {
        let check = layer.check();
        let kind = layer.kind();
        // Behind a lock so that a layer need not be `Sync`: each worker takes a clone once.
        let prototype = parking_lot::Mutex::new(layer);
        LayerSpec {
            name: std::any::type_name::<M>(),
            kind,
            check,
            make: Arc::new(move || Box::new(prototype.lock().clone())),
        }
    }
}

impl std::fmt::Debug for LayerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// First and last failure time of the event in flight, in microseconds since the epoch (0:
/// none yet).
#[derive(Default)]
pub(crate) struct Track {
    first_failure: AtomicU64,
    last_failure: AtomicU64,
    pub(crate) attempts: AtomicU32,
    /// A layer acknowledged the event as a duplicate without handling it.
    pub(crate) duplicate: std::sync::atomic::AtomicBool,
    /// The shutdown cut the event's retries short (see [`Retry`](crate::middleware::Retry)).
    pub(crate) interrupted: std::sync::atomic::AtomicBool,
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros().max(1) as u64)
}

fn from_micros(m: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(m)
}

impl Track {
    /// Only the worker's task writes: a load and a store, no locked instruction.
    pub(crate) fn note_attempt(&self, n: u32) {
        if self.attempts.load(Ordering::Relaxed) < n {
            self.attempts.store(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn reset(&self) {
        self.first_failure.store(0, Ordering::Relaxed);
        self.last_failure.store(0, Ordering::Relaxed);
        self.attempts.store(0, Ordering::Relaxed);
        self.duplicate.store(false, Ordering::Relaxed);
        self.interrupted.store(false, Ordering::Relaxed);
    }

    pub(crate) fn note_failure(&self) {
        let now = micros(SystemTime::now());
        if self.first_failure.load(Ordering::Relaxed) == 0 {
            self.first_failure.store(now, Ordering::Relaxed);
        }
        self.last_failure.store(now, Ordering::Relaxed);
    }

    /// First and last failure times, noting a last failure now if none was noted.
    pub(crate) fn failure_times(&self) -> (SystemTime, SystemTime) {
        let last = match self.last_failure.load(Ordering::Relaxed) {
            0 => {
                self.note_failure();
                self.last_failure.load(Ordering::Relaxed)
            }
            t => t,
        };
        let first = self.first_failure.load(Ordering::Relaxed);
        (from_micros(first), from_micros(last))
    }
}
