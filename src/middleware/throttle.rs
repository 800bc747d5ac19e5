//! Throttle (rate limit), on the `governor` crate.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::{Middleware, Next};
use crate::envelope::AnyEnvelope;
use crate::handler::HandlerResult;

/// Limits how many calls per period reach the handler, waiting for a permit (never failing), to
/// spare an outside system with a rate limit. One limiter is shared by every partition of the
/// subscription (and by every subscription given a clone).
///
/// A generic cell rate algorithm from the [`governor`](https://docs.rs/governor) crate: `burst`
/// calls may go at once, then one every `period / burst`. While a worker waits for a permit its
/// partition waits too, and the queue fills: backpressure reaches the publishers. The wait is on
/// governor's own (system) clock, not tokio's.
///
/// ```
/// use std::time::Duration;
/// use tidings::{Subscription, Throttle};
///
/// // At most 100 calls per second to the mail provider, in bursts of up to 100.
/// let mailer = Subscription::new("mailer").layer(Throttle::per_second(100));
/// ```
#[derive(Clone, Debug)]
pub struct Throttle {
    limiter: Arc<DefaultDirectRateLimiter>,
}

impl Throttle {
    /// At most `calls` calls per second (at least 1).
    pub fn per_second(calls: u32) -> Self {
        Throttle::new(calls, Duration::from_secs(1))
    }

    /// At most `calls` calls per `period` (at least one call; a zero period is taken as one
    /// nanosecond).
    pub fn new(calls: u32, period: Duration) -> Self {
        let burst = NonZeroU32::new(calls.max(1)).unwrap_or(NonZeroU32::MIN);
        let each = (period / burst.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(each)
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst);
        Throttle {
            limiter: Arc::new(RateLimiter::direct(quota)),
        }
    }
}

impl Middleware for Throttle {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        self.limiter.until_ready().await;
        next.run(env).await
    }
}
