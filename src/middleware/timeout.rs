//! A deadline for the rest of the chain.

use std::time::Duration;

use super::{Elapsed, Middleware, Next};
use crate::envelope::AnyEnvelope;
use crate::handler::{HandlerError, HandlerResult};

/// Fails the rest of the chain with a transient error, an [`Elapsed`](crate::middleware::Elapsed),
/// when it takes longer than a duration.
///
/// The deadline counts from the moment the call first waits (its first `.await` that is not
/// ready at once): a call that completes without waiting is never timed, which keeps the layer
/// nearly free for quick handlers.
///
/// Inside a [`Retry`](crate::middleware::Retry) layer it limits each attempt (a timed-out attempt
/// is retried); outside, it limits all attempts together. At the deadline the handler's future is
/// dropped: the handler stops at the `.await` it was waiting on, and keeps whatever it had changed
/// in its own state by then (write handlers so that an interrupted call can be run again, as
/// at-least-once delivery asks anyway). A handler that blocks its thread instead of awaiting cannot
/// be interrupted.
///
/// ```
/// use std::time::Duration;
/// use tidings::middleware::{Retry, Timeout};
/// use tidings::Subscription;
///
/// let mailer = Subscription::new("mailer")
///     .layer(Timeout::new(Duration::from_secs(2)))
///     .layer(Retry::new(3));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Timeout {
    pub(crate) limit: Duration,
}

impl Timeout {
    /// A deadline `limit` after the call first waits. `limit` must be above zero: a zero
    /// deadline fails every call that waits, and is a
    /// [`BuildError::InvalidSetting`](crate::BuildError::InvalidSetting) from
    /// [`BusBuilder::build`](crate::BusBuilder::build), naming the subscription.
    pub fn new(limit: Duration) -> Self {
        Timeout { limit }
    }
}

impl Middleware for Timeout {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        let limit = self.limit;
        let mut call = std::pin::pin!(next.run(env));
        // Most handlers of an in-process bus finish without waiting: they pay for no timer
        // and no clock read. The deadline starts when the call first waits.
        if let std::task::Poll::Ready(result) = futures::poll!(call.as_mut()) {
            return result;
        }
        // Boxed: the timer's state is only carried by calls that wait.
        match Box::pin(tokio::time::timeout(limit, call)).await {
            Ok(result) => result,
            Err(_) => Err(HandlerError::transient(Elapsed::new(limit))),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.limit.is_zero() {
            return Err(
                "Timeout: the limit must be above zero (a zero deadline fails every call that waits)"
                    .into(),
            );
        }
        Ok(())
    }
}
