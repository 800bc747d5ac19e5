//! Retry with exponential backoff and jitter.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Interrupted, LayerKind, Middleware, Next};
use crate::envelope::AnyEnvelope;
use crate::handler::{HandlerError, HandlerResult};

/// Retries a failed attempt after an exponential backoff with jitter, up to a number of
/// attempts; then the error goes on (to the dead-letter queue, unless an outer layer decides
/// otherwise).
///
/// - Attempt `n + 1` starts `initial × multiplierⁿ⁻¹` after attempt `n` failed, at most
///   `max_delay`, minus a random share of up to `jitter` of it (so that many failing workers do
///   not retry in lockstep). [`Retry::new(n)`](Retry::new) sets the attempts (`n`, the first
///   one included); the rest default to a 100 ms initial delay, multiplier 2, 30 s at most,
///   jitter 0.2.
/// - A [permanent](crate::HandlerError::permanent) error is not retried. A panic counts as a
///   failed attempt (the handler is restarted before the next one), and so does a
///   [`Timeout`](crate::middleware::Timeout) inside this layer.
/// - **Ordering**: the event is retried in place. Later events of the same partition (and so of
///   the same key) wait for it in this group; other partitions and other groups go on. The wait
///   is bounded by the attempts and delays; what still fails goes to the
///   [dead-letter queue](crate::dead_letter::DeadLetters) and the partition moves on. To keep
///   other keys of the partition moving instead ("park and continue"), use few attempts with
///   short delays, a [sequenced](crate::dead_letter::DeadLetterPolicy::Sequenced) dead-letter
///   queue, which parks the failed key (and only it), and
///   [`Redelivery`](crate::dead_letter::Redelivery), which redrives it after delays.
/// - **Shutdown**: when the bus begins to shut down while an event waits for its next attempt,
///   the wait ends; while the bus drains, a failed event is not retried after a delay either
///   (immediate retries still happen). What becomes of such an event:
///   - without a store, it goes to the dead-letter queue with its last error, in an
///     [`Interrupted`](crate::middleware::Interrupted) (it is neither lost nor handled twice); the entries stay readable through
///     [`Bus::dead_letters`](crate::Bus::dead_letters) after shutdown;
///   - with a [store](crate::BusBuilder::store), the log is the buffer: the event is not
///     dead-lettered, and the group's offset stays before it, so it is read again and handled
///     after the next start (at-least-once: its attempts start over). The events of its
///     partition after it are not handled by this group during the drain either (they too
///     wait in the log). An event redriven from the dead-letter queue stays a dead letter.
///
/// ```
/// use std::time::Duration;
/// use tidings::middleware::Retry;
/// use tidings::Subscription;
///
/// let billing = Subscription::new("billing").layer(
///     Retry::new(6)
///         .backoff(Duration::from_millis(50), Duration::from_secs(10))
///         .jitter(0.1),
/// );
/// ```
#[derive(Clone, Debug)]
pub struct Retry {
    pub(crate) max_attempts: u32,
    initial: Duration,
    max_delay: Duration,
    multiplier: f64,
    jitter: f64,
    rng: SmallRng,
}

impl Retry {
    /// At most `max_attempts` attempts in all (the first one included), with the default
    /// backoff. `max_attempts` must be at least 1 (checked at build).
    pub fn new(max_attempts: u32) -> Self {
        Retry {
            max_attempts,
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
            rng: SmallRng::from_os_rng(),
        }
    }

    /// At most `max_attempts` attempts, one right after the other.
    pub fn immediate(max_attempts: u32) -> Self {
        Retry::new(max_attempts).backoff(Duration::ZERO, Duration::ZERO)
    }

    /// The first delay and the largest one.
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max_delay: Duration) -> Self {
        self.initial = initial;
        self.max_delay = max_delay;
        self
    }

    /// How much each delay grows over the previous one (default 2; 1 keeps it constant).
    #[must_use]
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// The share of each delay that is random, from 0 (exact delays) to 1 ("full jitter": any
    /// delay from zero up to the computed one). Default 0.2.
    #[must_use]
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Seeds the jitter's random generator, for reproducible delays (every worker's clone
    /// starts from the same seed).
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.rng = SmallRng::seed_from_u64(seed);
        self
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("Retry: max_attempts must be at least 1".into());
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err("Retry: multiplier must be a finite number of at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err("Retry: jitter must be between 0 and 1".into());
        }
        if self.initial > self.max_delay {
            return Err("Retry: the initial delay must not exceed the maximum delay".into());
        }
        Ok(())
    }

    /// The delay before retry number `retry` (1: before the second attempt), without jitter.
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = self
            .multiplier
            .powi(retry.saturating_sub(1).min(1024) as i32);
        let secs = self.initial.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max_delay.as_secs_f64() {
            self.max_delay
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    fn jittered(&mut self, retry: u32) -> Duration {
        let delay = self.delay(retry);
        if self.jitter == 0.0 || delay.is_zero() {
            return delay;
        }
        let cut: f64 = self.rng.random::<f64>() * self.jitter;
        delay.mul_f64(1.0 - cut)
    }
}

impl Retry {
    /// After the first attempt failed: backs off and tries again. Kept out of `call` and boxed
    /// when needed, so that the common path (success at once) carries a small future.
    async fn retry(
        &mut self,
        env: &AnyEnvelope,
        mut next: Next<'_>,
        err: HandlerError,
    ) -> HandlerResult {
        let first = env.attempt();
        let mut err = err;
        let mut tries = 1u32;
        loop {
            next.note_failure();
            if err.is_permanent() || tries >= self.max_attempts {
                return Err(err);
            }
            let delay = self.jittered(tries);
            let ctx = next.context();
            if ctx.is_shutting_down() && !delay.is_zero() {
                next.note_interrupted();
                return Err(interrupted(err, tries));
            }
            tracing::debug!(event_id = %env.id(), attempt = first + tries - 1, ?delay, error = %err, "retrying after backoff");
            tokio::select! {
                biased;
                () = ctx.shutting_down() => {
                    next.note_interrupted();
                    return Err(interrupted(err, tries));
                }
                () = tokio::time::sleep(delay) => {}
            }
            tries += 1;
            next.note_attempt(first + tries - 1);
            let current = AnyEnvelope {
                inner: std::sync::Arc::clone(&env.inner),
                attempt: first + tries - 1,
            };
            err = match next.run(&current).await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
        }
    }
}

impl Middleware for Retry {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        match next.run(env).await {
            Ok(()) => Ok(()),
            Err(err) => Box::pin(self.retry(env, next, err)).await,
        }
    }

    fn kind(&self) -> LayerKind {
        LayerKind::Retry
    }

    fn check(&self) -> Result<(), String> {
        self.validate()
    }
}

fn interrupted(err: HandlerError, attempts: u32) -> HandlerError {
    let kind = err.kind();
    let err = Interrupted::new(err.into(), attempts);
    match kind {
        crate::ErrorKind::Permanent => HandlerError::permanent(err),
        crate::ErrorKind::Transient => HandlerError::transient(err),
    }
}
