//! The failures the middleware of this crate make themselves, as types.
//!
//! A layer that fails a call without the handler having failed it (a [`Timeout`] whose deadline
//! passed, an open [`CircuitBreaker`], a [`Retry`] cut short by the shutdown, a `TowerLayer`
//! whose service never let the handler answer) returns a [`HandlerError`] whose source is one
//! of these types, so that a layer further out (your own retry classifier, metrics, alerting)
//! can tell them apart with [`HandlerError::is`] or [`HandlerError::downcast_ref`] instead of
//! reading the message. A handler's panic is a [`Panicked`](crate::Panicked) (it belongs to the
//! handler contract, not to a layer). Their `Display` text is the text the error had before it
//! had a type.
//!
//! [`Throttle`](crate::middleware::Throttle) makes no error: it waits for a permit, it never fails
//! a call.
//!
//! Only layers see the types: the [dead-letter queue](crate::dead_letter::DeadLetters) keeps the
//! last error's text ([`DeadLetter::error`](crate::dead_letter::DeadLetter::error)), as does a
//! store.
//!
//! [`Timeout`]: crate::middleware::Timeout
//! [`CircuitBreaker`]: crate::middleware::CircuitBreaker
//! [`Retry`]: crate::middleware::Retry
//! [`HandlerError`]: crate::HandlerError
//! [`HandlerError::is`]: crate::HandlerError::is
//! [`HandlerError::downcast_ref`]: crate::HandlerError::downcast_ref

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// The rest of the chain took longer than a [`Timeout`](crate::middleware::Timeout)'s limit.
///
/// Made by `Timeout` when its deadline passes: the call is dropped and the attempt fails with
/// a transient [`HandlerError`](crate::HandlerError) whose source is an `Elapsed`. Its text is
/// `timed out after {limit:?}` (`timed out after 2s`).
///
/// # Examples
///
/// A layer between a `Timeout` and a `Retry` that gives up on a timed-out call at once (it
/// makes the error [permanent](crate::HandlerError::into_permanent)), while other failures
/// are retried:
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use std::time::Duration;
/// use tidings::middleware::Elapsed;
/// use tidings::prelude::*;
///
/// #[derive(Clone)]
/// struct TimeoutIsFinal;
///
/// impl Middleware for TimeoutIsFinal {
///     async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
///         next.run(env).await.map_err(|err| match err.downcast_ref::<Elapsed>() {
///             Some(elapsed) if elapsed.limit() >= Duration::from_secs(1) => err.into_permanent(),
///             _ => err,
///         })
///     }
/// }
///
/// # #[derive(Serialize, Deserialize, Event)]
/// # #[event(topic = "reports", key = id)]
/// # struct Report { id: u64 }
/// struct Slow;
/// impl Handler<Report> for Slow {
///     async fn handle(&mut self, _: &Envelope<Report>, _: &Context) -> HandlerResult {
///         tokio::time::sleep(Duration::from_secs(60)).await;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::builder()
///     .subscribe::<Report, _>(
///         Subscription::new("reports")
///             .layer(Timeout::new(Duration::from_secs(2)))
///             .layer(TimeoutIsFinal)
///             .layer(Retry::new(5)),
///         || Slow,
///     )
///     .build()?;
/// bus.publish(Report { id: 1 }).await?;
/// bus.settled().await;
/// let letter = &bus.dead_letters("reports").unwrap().list()[0];
/// assert_eq!(letter.attempts, 1, "not retried");
/// assert_eq!(letter.kind, ErrorKind::Permanent);
/// assert_eq!(letter.error, "timed out after 2s");
/// bus.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elapsed {
    limit: Duration,
}

impl Elapsed {
    pub(crate) fn new(limit: Duration) -> Self {
        Elapsed { limit }
    }

    /// The `Timeout`'s limit that passed.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timed out after {:?}", self.limit)
    }
}

impl StdError for Elapsed {}

/// A [`CircuitBreaker`](crate::middleware::CircuitBreaker) was open: the call was not attempted.
///
/// Made by `CircuitBreaker` for each call while it is open: the attempt fails at once, as a
/// transient [`HandlerError`](crate::HandlerError) whose source is a `CircuitOpen`, without
/// reaching the handler. Its text is `circuit breaker open: call not attempted`.
///
/// # Examples
///
/// A layer outside the breaker that counts the calls it refused (they say the outside system
/// is down, not that the event is bad):
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use tidings::middleware::{CircuitOpen, Middleware, Next};
/// use tidings::{AnyEnvelope, HandlerResult};
///
/// #[derive(Clone, Default)]
/// struct CountRefused(Arc<AtomicU64>);
///
/// impl Middleware for CountRefused {
///     async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
///         let result = next.run(env).await;
///         if result.as_ref().is_err_and(|err| err.is::<CircuitOpen>()) {
///             self.0.fetch_add(1, Ordering::Relaxed);
///         }
///         result
///     }
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitOpen(());

impl CircuitOpen {
    pub(crate) fn new() -> Self {
        CircuitOpen(())
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("circuit breaker open: call not attempted")
    }
}

impl StdError for CircuitOpen {}

/// A [`Retry`](crate::middleware::Retry) stopped retrying because the bus began to shut down.
///
/// Made by `Retry` when the shutdown ends the wait before its next attempt (or when a failed
/// attempt would have to wait while the bus drains). It keeps the last attempt's error, as its
/// [`last_error`](Interrupted::last_error) and its [`source`](StdError::source), and that
/// error's kind (the [`HandlerError`](crate::HandlerError) is transient or permanent as the
/// last error was). Its text is the last error's, followed by
/// `(retries stopped by shutdown after {attempts} attempt(s))`.
///
/// Without a store such an event goes to the dead-letter queue; with one it stays in the log
/// for the next start (see [`Retry`](crate::middleware::Retry), **Shutdown**).
///
/// # Examples
///
/// Telling a shutdown apart from a real failure, and finding the last error beneath it with
/// [`HandlerError::chain`](crate::HandlerError::chain):
///
/// ```
/// use tidings::middleware::{Elapsed, Interrupted};
/// use tidings::HandlerError;
///
/// fn describe(err: &HandlerError) -> &'static str {
///     if let Some(interrupted) = err.downcast_ref::<Interrupted>() {
///         if interrupted.last_error().is::<Elapsed>() {
///             return "timed out, then the bus shut down";
///         }
///         return "failed, then the bus shut down";
///     }
///     if err.chain().any(|e| e.is::<Elapsed>()) {
///         return "timed out";
///     }
///     "failed"
/// }
/// assert_eq!(describe(&HandlerError::msg("gateway down")), "failed");
/// ```
#[derive(Debug)]
pub struct Interrupted {
    last: Box<dyn StdError + Send + Sync + 'static>,
    attempts: u32,
}

impl Interrupted {
    pub(crate) fn new(last: Box<dyn StdError + Send + Sync + 'static>, attempts: u32) -> Self {
        Interrupted { last, attempts }
    }

    /// The error of the last attempt made.
    pub fn last_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.last
    }

    /// How many attempts were made before the shutdown stopped the retries.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (retries stopped by shutdown after {} attempt(s))",
            self.last, self.attempts
        )
    }
}

impl StdError for Interrupted {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.last)
    }
}

/// A [`TowerLayer`](crate::middleware::TowerLayer)'s service answered without the handler's result
/// (feature `tower`).
///
/// Made by `TowerLayer` when its tower service answers `Ok` though the handler did not run to
/// a success (the service dropped or detached the call to its inner service), or when the call
/// to the inner service was dropped before the handler answered. The attempt fails with a
/// transient [`HandlerError`](crate::HandlerError) whose source is a `NotHandled`. Errors that
/// the tower service makes itself (tower's `Elapsed`, an overloaded service's error) come back
/// as their own types.
///
/// # Examples
///
/// ```
/// use tidings::middleware::NotHandled;
/// use tidings::HandlerError;
///
/// fn is_misbehaving_service(err: &HandlerError) -> bool {
///     err.is::<NotHandled>()
/// }
/// assert!(!is_misbehaving_service(&HandlerError::msg("gateway down")));
/// ```
#[cfg(feature = "tower")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotHandled {
    why: Why,
}

#[cfg(feature = "tower")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// The service answered `Ok` without the handler succeeding.
    AnsweredOk,
    /// The inner service's call was dropped before it could start the handler.
    DeliveryDropped,
    /// The handler's call was dropped before it answered.
    CallDropped,
}

#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
impl NotHandled {
    pub(crate) fn answered_ok() -> Self {
        NotHandled {
            why: Why::AnsweredOk,
        }
    }

    pub(crate) fn delivery_dropped() -> Self {
        NotHandled {
            why: Why::DeliveryDropped,
        }
    }

    pub(crate) fn call_dropped() -> Self {
        NotHandled {
            why: Why::CallDropped,
        }
    }
}

#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
impl fmt::Display for NotHandled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.why {
            Why::AnsweredOk => "the tower service answered Ok without the handler succeeding",
            Why::DeliveryDropped => "the delivery was dropped",
            Why::CallDropped => "the handler's call was dropped",
        })
    }
}

#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
impl StdError for NotHandled {}
