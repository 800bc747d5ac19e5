//! A consumer group's settings: [`Subscription`] and the handler's [`RestartBackoff`].

use std::time::Duration;

use crate::dead_letter::{DeadLetterPolicy, Redelivery};
use crate::delivery::DeliveryMode;
use crate::error::BuildError;
use crate::middleware::{Dedup, DedupWindow, LayerKind, LayerSpec, Middleware};
use crate::store::StartFrom;

/// Settings of one subscription, that is of one consumer group.
///
/// A `&str` or `String` converts into a subscription with the defaults.
///
/// # Supervision
///
/// - A handler that returns an error gets the event again (attempt 2, 3, …) before any later event
///   of its partition, up to [`max_deliveries`](Subscription::max_deliveries) (default 3)
///   deliveries in all, at once — or as a [`Retry`](crate::middleware::Retry) layer says, with
///   backoff; a [permanent](crate::HandlerError::permanent) error is not redelivered.
/// - A handler that panics is caught; the panic is logged with the event's ids and counted, the
///   handler is replaced by a fresh instance from its factory after a
///   [restart backoff](Subscription::restart_backoff) (should the factory panic too, the old
///   instance is kept and the error logged), and the event counts as a failed attempt.
/// - After the last attempt the event is given up on: logged at `error` level, counted in
///   [`Bus::stats`](crate::Bus::stats), recorded in [`Bus::failures`](crate::Bus::failures)
///   when recording, put in the group's [dead-letter queue](crate::dead_letter::DeadLetters) (see
///   [`dead_letter`](Subscription::dead_letter); at-most-once delivery drops it instead), and
///   the partition moves on.
///
/// [Middleware](crate::middleware) wraps the handler: see [`layer`](Subscription::layer).
///
/// ```
/// use std::time::Duration;
/// use tidings::{RestartBackoff, Subscription};
///
/// let billing = Subscription::new("billing")
///     .max_deliveries(5)
///     .restart_backoff(RestartBackoff::new(Duration::from_millis(50), Duration::from_secs(5)))
///     .batch_size(64);
/// ```
#[derive(Debug, Clone)]
pub struct Subscription {
    pub(crate) group: String,
    pub(crate) max_deliveries: Option<u32>,
    pub(crate) restart_backoff: RestartBackoff,
    pub(crate) batch_size: usize,
    /// In declaration order: innermost first.
    pub(crate) layers: Vec<LayerSpec>,
    pub(crate) delivery: DeliveryMode,
    pub(crate) dead_letter: DeadLetterPolicy,
    pub(crate) redelivery: Option<Redelivery>,
    pub(crate) start: StartFrom,
    pub(crate) reset: bool,
}

impl Subscription {
    /// A subscription for the consumer group `group` with the default settings.
    pub fn new(group: impl Into<String>) -> Self {
        Subscription {
            group: group.into(),
            max_deliveries: None,
            restart_backoff: RestartBackoff::default(),
            batch_size: 128,
            layers: Vec::new(),
            delivery: DeliveryMode::default(),
            dead_letter: DeadLetterPolicy::default(),
            redelivery: None,
            start: StartFrom::Latest,
            reset: false,
        }
    }

    /// How many times an event is delivered at most, one right after the other, before it is
    /// dead-lettered (at least 1; default 3), when the subscription has no
    /// [`Retry`](crate::middleware::Retry) layer. With a `Retry` layer, the layer decides, and
    /// setting this is a build error.
    #[must_use]
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }

    /// Wraps the handler, and every layer declared before, in `layer`: the last layer declared
    /// sees each event first. See [the middleware module](crate::middleware) for what each
    /// order means.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tidings::middleware::{Dedup, DedupWindow, Retry, Timeout};
    /// use tidings::Subscription;
    ///
    /// let billing = Subscription::new("billing")
    ///     .layer(Timeout::new(Duration::from_secs(5)))   // each attempt
    ///     .layer(Retry::new(5))                         // up to 5 attempts
    ///     .layer(Dedup::new(DedupWindow::new()));       // duplicates skipped first
    /// ```
    #[must_use]
    pub fn layer<M: Middleware>(mut self, layer: M) -> Self {
        self.layers.push(LayerSpec::new(layer));
        self
    }

    /// When events are acknowledged: see [`DeliveryMode`] (default at-least-once).
    #[must_use]
    pub fn delivery(mut self, mode: DeliveryMode) -> Self {
        self.delivery = mode;
        self
    }

    /// What happens to events that failed their last attempt: see [`DeadLetterPolicy`]
    /// (default: parked in the group's dead-letter queue while the partition moves on).
    #[must_use]
    pub fn dead_letter(mut self, policy: DeadLetterPolicy) -> Self {
        self.dead_letter = policy;
        self
    }

    /// Redelivers dead-lettered events automatically after delays, while the partition goes on:
    /// see [`Redelivery`]. With [`DeadLetterPolicy::Sequenced`], only the failed key waits.
    #[must_use]
    pub fn redelivery(mut self, redelivery: Redelivery) -> Self {
        self.redelivery = Some(redelivery);
        self
    }

    /// With a store: where this group starts reading when it has no committed offset yet (a new
    /// group). Default [`StartFrom::Latest`]: only events published from now on. A projection
    /// rebuilt from scratch uses [`StartFrom::Earliest`] under a new group name (or
    /// [`reset_to`](Subscription::reset_to)).
    ///
    /// Without a store there is no log: every group gets every event published after the bus
    /// was built, so the start of the log is the start of the process and any `StartFrom` means
    /// the same. The setting is accepted, so that one module's code runs on the in-memory bus
    /// and on a store alike (a projection that replays with a store starts empty in memory).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tidings::store::StartFrom;
    /// use tidings::Subscription;
    ///
    /// let audit = Subscription::new("audit").start_from(StartFrom::Earliest);
    /// let recent = Subscription::new("recent")
    ///     .start_from(StartFrom::Timestamp(SystemTime::now() - Duration::from_secs(3600)));
    /// ```
    #[must_use]
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// With a store: moves this group's offsets to `start` when the bus starts, whatever it
    /// had committed (replay from the beginning, or skip a backlog). The new position is
    /// committed at once. Remove the call after the restart that needed it, or every restart
    /// resets the group again. Without a store it changes nothing (see
    /// [`start_from`](Subscription::start_from)). To rebuild a group without a restart, see
    /// [`Bus::rebuild`](crate::Bus::rebuild).
    #[must_use]
    pub fn reset_to(mut self, start: StartFrom) -> Self {
        self.start = start;
        self.reset = true;
        self
    }

    /// The consumer group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    pub(crate) fn effective_max_deliveries(&self) -> u32 {
        self.max_deliveries.unwrap_or(3)
    }

    pub(crate) fn has(&self, kind: LayerKind) -> bool {
        self.layers.iter().any(|l| l.kind == kind)
    }

    /// Checks the settings, and adds what the delivery mode needs.
    pub(crate) fn prepare(&mut self) -> Result<(), BuildError> {
        let group = &self.group;
        let invalid =
            |what: String| BuildError::InvalidSetting(format!("subscription {group:?}: {what}"));
        if self.max_deliveries == Some(0) {
            return Err(invalid("max_deliveries must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size must be at least 1".into()));
        }
        for layer in &self.layers {
            layer.check.clone().map_err(invalid)?;
        }
        if self
            .redelivery
            .as_ref()
            .is_some_and(|r| r.delays.is_empty())
        {
            return Err(invalid(
                "Redelivery::after got no delays, so it would never redeliver; give at least one delay, or leave redelivery unset".into(),
            ));
        }
        if self.restart_backoff.initial > self.restart_backoff.max {
            return Err(invalid(format!(
                "RestartBackoff: the initial delay ({:?}) must not exceed the maximum ({:?})",
                self.restart_backoff.initial, self.restart_backoff.max
            )));
        }
        let retries = self.has(LayerKind::Retry);
        if retries && self.max_deliveries.is_some() {
            return Err(invalid(
                "max_deliveries and a Retry layer both set the attempts; keep one (Retry::new(n) for n attempts)".into(),
            ));
        }
        if self.delivery == DeliveryMode::AtMostOnce {
            if retries || self.max_deliveries.is_some_and(|n| n > 1) {
                return Err(invalid(
                    "at-most-once delivery never redelivers; remove the Retry layer or max_deliveries".into(),
                ));
            }
            if self.dead_letter == DeadLetterPolicy::Sequenced {
                return Err(invalid(
                    "at-most-once delivery drops failed events; a sequenced dead-letter queue needs at-least-once".into(),
                ));
            }
            if self.redelivery.is_some() {
                return Err(invalid(
                    "at-most-once delivery drops failed events; redelivery needs at-least-once"
                        .into(),
                ));
            }
        }
        if self.delivery == DeliveryMode::EffectivelyOnce && !self.has(LayerKind::Dedup) {
            self.layers
                .push(LayerSpec::new(Dedup::new(DedupWindow::default())));
        }
        Ok(())
    }

    /// How long to wait before restarting a handler that panicked.
    #[must_use]
    pub fn restart_backoff(mut self, backoff: RestartBackoff) -> Self {
        self.restart_backoff = backoff;
        self
    }

    /// How many events a worker takes from its queue at once (at least 1; default 128).
    /// Larger batches mean fewer lock round trips; the queue's capacity still bounds what waits.
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }
}

impl From<&str> for Subscription {
    fn from(group: &str) -> Self {
        Subscription::new(group)
    }
}

impl From<String> for Subscription {
    fn from(group: String) -> Self {
        Subscription::new(group)
    }
}

/// Delay before restarting a panicked handler: `initial`, doubled after each consecutive panic,
/// at most `max`. Default 10 ms up to 1 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBackoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

impl RestartBackoff {
    /// A backoff from `initial` doubling up to `max`. `initial` must not exceed `max` (checked
    /// by [`BusBuilder::build`](crate::BusBuilder::build)); zero restarts at once.
    pub fn new(initial: Duration, max: Duration) -> Self {
        RestartBackoff { initial, max }
    }
}

impl Default for RestartBackoff {
    fn default() -> Self {
        RestartBackoff::new(Duration::from_millis(10), Duration::from_secs(1))
    }
}

impl RestartBackoff {
    pub(crate) fn delay(&self, consecutive: u32) -> std::time::Duration {
        let factor = 1u32 << consecutive.saturating_sub(1).min(16);
        self.initial.saturating_mul(factor).min(self.max)
    }
}
