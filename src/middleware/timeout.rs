//! A deadline for the rest of the chain.

use std::time::Duration;

use super::{Middleware, Next};
use crate::envelope::AnyEnvelope;
use crate::handler::{HandlerError, HandlerResult};

/// Fails the rest of the chain with a transient error when it takes longer than a duration.
///
/// Inside a [`Retry`](crate::Retry) layer it limits each attempt (a timed-out attempt is
/// retried); outside, it limits all attempts together. At the deadline the handler's future is
/// dropped: the handler stops at the `.await` it was waiting on, and keeps whatever it had
/// changed in its own state by then (write handlers so that an interrupted call can be run
/// again, as at-least-once delivery asks anyway). A handler that blocks its thread instead of
/// awaiting cannot be interrupted.
///
/// ```
/// use std::time::Duration;
/// use tidings::{Retry, Subscription, Timeout};
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
    /// A deadline `limit` after the call starts.
    pub fn new(limit: Duration) -> Self {
        Timeout { limit }
    }
}

impl Middleware for Timeout {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        match tokio::time::timeout(self.limit, next.run(env)).await {
            Ok(result) => result,
            Err(_) => Err(HandlerError::msg(format!(
                "timed out after {:?}",
                self.limit
            ))),
        }
    }
}
