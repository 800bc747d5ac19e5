//! Delivery modes: when a consumer group acknowledges an event, and what that promises.

/// When a subscription acknowledges an event, and so what a failure or a crash does to it.
///
/// | mode | acknowledged | a handler failure | a crash of the process |
/// |---|---|---|---|
/// | [`AtMostOnce`](DeliveryMode::AtMostOnce) | on receipt, before the handler runs | no retry; logged, counted as failed, dropped (not dead-lettered) | the event in flight and those queued are lost; none is handled twice |
/// | [`AtLeastOnce`](DeliveryMode::AtLeastOnce) (default) | after the handler succeeded | redelivered (see [`Retry`](crate::middleware::Retry) and [`max_deliveries`](crate::Subscription::max_deliveries)), then dead-lettered | in memory: lost with the process. With a store: redelivered from the last committed offset, so an event may be handled twice |
/// | [`EffectivelyOnce`](DeliveryMode::EffectivelyOnce) | after the handler succeeded, with its id marked processed | as at-least-once; a failure leaves the id unmarked | in memory: lost with the process. With a store: each event's mark is committed with its group's offset, the marks of all groups sharing transactions; a copy published again is skipped; only events whose handlers finished just before the crash, their marks not yet committed, are handled again |
///
/// Effectively-once is at-least-once plus [`Dedup`](crate::middleware::Dedup): if the subscription
/// has no `Dedup` layer, one with the default [`DedupWindow`](crate::middleware::DedupWindow) is
/// added outermost. With a [store](crate::store::Store) it also costs a read of the marks before
/// the handler (one query per batch of events) and a write of the marks after it (the marks of all
/// workers share transactions, at most one every few milliseconds): in the durable bench about two
/// thirds of at-least-once throughput. Keep it for the groups that need it. A handler's side
/// effects outside the bus (an email, a payment) are still at-least-once: make them idempotent, or
/// key them by the event id.
///
/// ```
/// use tidings::{DeliveryMode, Subscription};
///
/// let metrics = Subscription::new("metrics").delivery(DeliveryMode::AtMostOnce);
/// let ledger = Subscription::new("ledger").delivery(DeliveryMode::EffectivelyOnce);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryMode {
    /// Acknowledge on receipt: never redelivered, may be lost.
    AtMostOnce,
    /// Acknowledge after success: never lost while the bus runs, may be handled twice.
    #[default]
    AtLeastOnce,
    /// At-least-once with deduplication by event id: handled once per group within the
    /// deduplication window.
    EffectivelyOnce,
}
