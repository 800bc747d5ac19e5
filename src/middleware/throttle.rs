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
/// use tidings::middleware::Throttle;
/// use tidings::Subscription;
///
/// // At most 100 calls per second to the mail provider, in bursts of up to 100.
/// let mailer = Subscription::new("mailer").layer(Throttle::per_second(100));
/// ```
#[derive(Clone, Debug)]
pub struct Throttle {
    limiter: Arc<DefaultDirectRateLimiter>,
    /// The settings as given, checked when the bus is built.
    calls: u32,
    period: Duration,
}

impl Throttle {
    /// At most `calls` calls per second. `calls` must be at least 1: zero is a
    /// [`BuildError::InvalidSetting`](crate::BuildError::InvalidSetting) from
    /// [`BusBuilder::build`](crate::BusBuilder::build), naming the subscription.
    pub fn per_second(calls: u32) -> Self {
        Throttle::new(calls, Duration::from_secs(1))
    }

    /// At most `calls` calls per `period`. `calls` must be at least 1 and `period` above zero:
    /// otherwise [`BusBuilder::build`](crate::BusBuilder::build) fails with
    /// [`BuildError::InvalidSetting`](crate::BuildError::InvalidSetting), naming the
    /// subscription and the setting.
    pub fn new(calls: u32, period: Duration) -> Self {
        // Out-of-range settings are refused at build (see `check`); the limiter made here for
        // them is never used.
        let burst = NonZeroU32::new(calls.max(1)).unwrap_or(NonZeroU32::MIN);
        let each = (period / burst.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(each)
            .unwrap_or_else(|| Quota::per_second(burst))
            .allow_burst(burst);
        Throttle {
            limiter: Arc::new(RateLimiter::direct(quota)),
            calls,
            period,
        }
    }
}

impl Middleware for Throttle {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        self.limiter.until_ready().await;
        next.run(env).await
    }

    fn check(&self) -> Result<(), String> {
        if self.calls == 0 {
            return Err(format!(
                "Throttle: calls must be at least 1 (got 0 per {:?}); a throttle that lets nothing through would stop the group",
                self.period
            ));
        }
        if self.period.is_zero() {
            return Err("Throttle: the period must be above zero".into());
        }
        Ok(())
    }
}
