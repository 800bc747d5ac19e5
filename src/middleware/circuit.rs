//! Circuit breaker, on the `failsafe` crate.

use std::sync::Arc;
use std::time::Duration;

use failsafe::failure_policy::{self, ConsecutiveFailures};
use failsafe::{backoff, FailurePolicy, StateMachine};

use super::{CircuitOpen, Middleware, Next};
use crate::envelope::AnyEnvelope;
use crate::handler::{HandlerError, HandlerResult};

/// Stops calling a handler whose outside system is down, and lets it recover.
///
/// After a run of failed calls the circuit **opens**: calls fail at once with a transient
/// [`CircuitOpen`](crate::middleware::CircuitOpen) error, without reaching the handler, for a while; then it lets calls through
/// again (**half-open**) and closes on the first success, or opens again on a failure. [Permanent](crate::HandlerError::permanent) errors do not count: they say the event
/// is bad, not the system. One breaker is shared by every partition of the subscription (and by
/// every subscription given a clone).
///
/// Put it inside a [`Retry`](crate::middleware::Retry) layer so that an open circuit makes the
/// retry back off, or outside it to count whole events. State changes are logged (`warn` on open).
/// Built on the [`failsafe`](https://docs.rs/failsafe) crate; any failsafe state machine can be
/// used with [`from_failsafe`](CircuitBreaker::from_failsafe) (its clock is the system clock).
///
/// ```
/// use std::time::Duration;
/// use tidings::middleware::{CircuitBreaker, Retry};
/// use tidings::Subscription;
///
/// let payments = Subscription::new("payments")
///     .layer(CircuitBreaker::new(5, Duration::from_secs(10)))
///     .layer(Retry::new(8).backoff(Duration::from_millis(200), Duration::from_secs(30)));
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    breaker: Arc<dyn Breaker>,
    /// What is wrong with the settings given to [`CircuitBreaker::new`], reported at build.
    invalid: Option<String>,
}

trait Breaker: Send + Sync {
    fn is_call_permitted(&self) -> bool;
    fn on_success(&self);
    fn on_error(&self);
    fn state(&self) -> &'static str;
}

impl<P, I> Breaker for StateMachine<P, I>
where
    P: FailurePolicy + Send + 'static,
    I: failsafe::Instrument + Send + Sync + 'static,
{
    fn is_call_permitted(&self) -> bool {
        StateMachine::is_call_permitted(self)
    }
    fn on_success(&self) {
        StateMachine::on_success(self)
    }
    fn on_error(&self) {
        StateMachine::on_error(self)
    }
    fn state(&self) -> &'static str {
        // `failsafe` shows its state only through `Debug`.
        let text = format!("{self:?}");
        if text.contains("half_open") {
            "half-open"
        } else if text.contains("\"open\"") {
            "open"
        } else {
            "closed"
        }
    }
}

/// Logs the breaker's state changes.
#[derive(Clone, Copy, Debug)]
struct Log;

impl failsafe::Instrument for Log {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        tracing::warn!("circuit breaker opened: calls fail fast for a while");
    }
    fn on_half_open(&self) {
        tracing::info!("circuit breaker half-open: trying calls again");
    }
    fn on_closed(&self) {
        tracing::info!("circuit breaker closed");
    }
}

type Consecutive = ConsecutiveFailures<backoff::Constant>;

impl CircuitBreaker {
    /// Opens after `failures` consecutive failed calls, for `open_for` each time; a success
    /// resets the count. `failures` must be at least 1 and `open_for` above zero: otherwise
    /// [`BusBuilder::build`](crate::BusBuilder::build) fails with
    /// [`BuildError::InvalidSetting`](crate::BuildError::InvalidSetting), naming the
    /// subscription and the setting. For a growing or jittered open time, or a success-rate
    /// policy, build a failsafe state machine and use [`from_failsafe`](Self::from_failsafe).
    pub fn new(failures: u32, open_for: Duration) -> Self {
        let invalid = if failures == 0 {
            Some("CircuitBreaker: failures must be at least 1 (the consecutive failed calls that open the circuit)".to_owned())
        } else if open_for.is_zero() {
            Some("CircuitBreaker: open_for must be above zero (an open circuit that closes at once breaks nothing)".to_owned())
        } else {
            None
        };
        // Refused at build when invalid; the machine made here for it is never used.
        let policy: Consecutive =
            failure_policy::consecutive_failures(failures.max(1), backoff::constant(open_for));
        CircuitBreaker {
            breaker: Arc::new(StateMachine::new(policy, Log)),
            invalid,
        }
    }

    /// A breaker from any `failsafe` state machine (another failure policy, such as a success
    /// rate over a time window, or your own instrumentation).
    pub fn from_failsafe<P, I>(machine: StateMachine<P, I>) -> Self
    where
        P: FailurePolicy + Send + 'static,
        I: failsafe::Instrument + Send + Sync + 'static,
    {
        CircuitBreaker {
            breaker: Arc::new(machine),
            invalid: None,
        }
    }

    /// `"closed"`, `"open"` or `"half-open"`.
    pub fn state(&self) -> &'static str {
        self.breaker.state()
    }
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &self.state())
            .finish()
    }
}

impl Middleware for CircuitBreaker {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        if !self.breaker.is_call_permitted() {
            return Err(HandlerError::transient(CircuitOpen::new()));
        }
        let result = next.run(env).await;
        match &result {
            Ok(()) => self.breaker.on_success(),
            // Says the event is bad, not the system: counts neither way.
            Err(err) if err.is_permanent() => {}
            Err(_) => self.breaker.on_error(),
        }
        result
    }

    fn check(&self) -> Result<(), String> {
        match &self.invalid {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }
}
