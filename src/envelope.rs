//! Envelopes: an event plus the metadata the bus gives it.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use uuid::Uuid;

use crate::event::{DynEvent, Event, Key};

/// Metadata the bus attaches to every published event.
///
/// Shared by every consumer group that receives the event.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    /// Unique id of this event (UUIDv7: time-ordered).
    pub id: Uuid,
    /// Topic the event was published on.
    pub topic: &'static str,
    /// Partition of the topic the event landed on.
    pub partition: u32,
    /// Position of the event in its partition: 0, 1, 2, … in publish order.
    pub offset: u64,
    /// Wall-clock time of publication.
    pub timestamp: SystemTime,
    /// Id shared by every event of one causal chain: the id of the first event (or request) of
    /// the chain. Handlers that publish pass it on.
    pub correlation_id: Uuid,
    /// Id of the event (or request) whose handler published this one; `None` for a root event.
    pub causation_id: Option<Uuid>,
    /// Free-form headers.
    pub headers: Headers,
}

/// Free-form string headers of an event, in insertion order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub const fn new() -> Self {
        Headers(Vec::new())
    }

    /// These headers with `name` set to `value`, for building them in one expression.
    #[must_use]
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.insert(name, value);
        self
    }

    /// Sets `name` to `value`, replacing an earlier value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// All headers in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// What [`new_id`] keeps per thread.
struct IdSource {
    /// A fast non-cryptographic generator, seeded from the OS: ids need to be unique, not
    /// unguessable.
    rng: rand::rngs::SmallRng,
    /// The millisecond since the Unix epoch of the last id, and where it starts and ends:
    /// a timestamp in it has the same millisecond (two comparisons instead of a subtraction
    /// and a division per id).
    millis: u64,
    from: SystemTime,
    until: SystemTime,
}

/// A fresh UUIDv7 for an event published at `now`: the millisecond timestamp, then 74 random
/// bits from the thread-local generator (no global lock, unlike `Uuid::now_v7`).
pub(crate) fn new_id(now: SystemTime) -> Uuid {
    thread_local! {
        static IDS: std::cell::RefCell<IdSource> = std::cell::RefCell::new(IdSource {
            rng: rand::SeedableRng::from_os_rng(),
            millis: 0,
            from: SystemTime::UNIX_EPOCH,
            until: SystemTime::UNIX_EPOCH,
        });
    }
    let (millis, high, low) = IDS.with(|ids| {
        let ids = &mut *ids.borrow_mut();
        if !(ids.from <= now && now < ids.until) {
            ids.millis = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            ids.from = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ids.millis);
            ids.until = ids.from + std::time::Duration::from_millis(1);
        }
        // Two draws for the 80 bits (74 of them used): `Rng::random::<[u8; 10]>` draws once
        // per byte, ten times the work.
        (
            ids.millis,
            rand::RngCore::next_u64(&mut ids.rng),
            rand::RngCore::next_u32(&mut ids.rng),
        )
    });
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&high.to_le_bytes());
    random[8..].copy_from_slice(&low.to_le_bytes()[..2]);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

pub(crate) struct Inner<E> {
    pub(crate) meta: Metadata,
    pub(crate) event: E,
}

/// Type-erased inner envelope: what partition queues carry.
pub(crate) trait ErasedInner: Any + Send + Sync {
    fn meta(&self) -> &Metadata;
    fn event(&self) -> &dyn DynEvent;
    /// Whether a publisher may build a new envelope in this one's allocation once nobody else
    /// holds it (see [`envelope`]).
    fn reusable(&self) -> bool;
}

impl<E: Event> ErasedInner for Inner<E> {
    fn meta(&self) -> &Metadata {
        &self.meta
    }
    fn event(&self) -> &dyn DynEvent {
        &self.event
    }
    fn reusable(&self) -> bool {
        reusable::<E>() && self.meta.headers.0.capacity() == 0
    }
}

pub(crate) type Erased = Arc<dyn ErasedInner>;

pub(crate) fn downcast<E: Event>(erased: Erased) -> Option<Arc<Inner<E>>> {
    let any: Arc<dyn Any + Send + Sync> = erased;
    any.downcast::<Inner<E>>().ok()
}

/// Whether envelopes of `E` are built in the allocation of a finished one (see [`envelope`]):
/// only when dropping the old contents frees nothing, so that the reuse, done under the
/// partition lock, never frees memory there.
pub(crate) const fn reusable<E: Event>() -> bool {
    !std::mem::needs_drop::<E>()
}

/// The envelope of `event`, for a publisher under the partition lock.
///
/// When `E` is [`reusable`], it is built in the allocation of a finished envelope of `E` from
/// `finished` (what the workers handed back) that nobody else holds and that has no headers to
/// free: no allocation here and no free later, twice the cost of the rest of the hop (measured
/// ~300 instructions an event). Envelopes popped on the way that cannot be reused go to
/// `garbage`, to be freed after the lock; the rest of `finished` stays for later publishes.
#[inline]
pub(crate) fn envelope<E: Event>(
    finished: &mut Vec<Erased>,
    garbage: &mut Vec<Erased>,
    meta: Metadata,
    event: E,
) -> Erased {
    if reusable::<E>() {
        while let Some(item) = finished.pop() {
            // Held elsewhere (another group, a recorder), or of another type: not for us.
            if Arc::strong_count(&item) != 1 || !(&*item as &dyn Any).is::<Inner<E>>() {
                garbage.push(item);
                continue;
            }
            let Some(mut inner) = downcast::<E>(item) else {
                unreachable!("checked to be an envelope of E");
            };
            match Arc::get_mut(&mut inner) {
                // Nothing to free in the old contents: `E` needs no drop, and no headers.
                Some(slot) if slot.meta.headers.0.capacity() == 0 => {
                    slot.meta = meta;
                    slot.event = event;
                    return inner;
                }
                // A weak reference, or headers to free.
                _ => garbage.push(inner),
            }
        }
    }
    Arc::new(Inner { meta, event })
}

/// Moves the envelopes of `items` that a publisher can build in again (see [`envelope`]) to
/// `kept`, while `kept` holds fewer than `max`; the rest stay in `items`.
///
/// One still held elsewhere may be kept too: it costs no memory while the other holder lives,
/// and [`envelope`] checks that it is not held any more before building in it.
pub(crate) fn keep_reusable(items: &mut Vec<Erased>, kept: &mut Vec<Erased>, max: usize) {
    let room = max.saturating_sub(kept.len());
    if room == 0 {
        return;
    }
    // The common case: all of them fit and all are reusable.
    if items.len() <= room && items.iter().all(|item| item.reusable()) {
        if kept.is_empty() {
            std::mem::swap(items, kept);
        } else {
            kept.append(items);
        }
        return;
    }
    let mut i = 0;
    while i < items.len() && kept.len() < max {
        if items[i].reusable() {
            kept.push(items.swap_remove(i));
        } else {
            i += 1;
        }
    }
}

/// An event of type `E` as a handler receives it: the event, its [`Metadata`] and the delivery
/// attempt.
///
/// Cloning is cheap (a reference count); the event itself is shared between the consumer groups
/// that receive it.
///
/// # Examples
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use tidings::{Envelope, Event};
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id)]
/// struct OrderPaid { order_id: u64 }
///
/// let env = Envelope::new(OrderPaid { order_id: 9 });
/// assert_eq!(env.event().order_id, 9);
/// assert_eq!(env.topic(), "orders");
/// assert_eq!(env.attempt(), 1);
/// assert_eq!(env.correlation_id(), env.id()); // a root event starts its own chain
/// ```
pub struct Envelope<E> {
    pub(crate) inner: Arc<Inner<E>>,
    pub(crate) attempt: u32,
}

impl<E> Clone for Envelope<E> {
    fn clone(&self) -> Self {
        Envelope {
            inner: Arc::clone(&self.inner),
            attempt: self.attempt,
        }
    }
}

impl<E: Event> Envelope<E> {
    /// Wraps `event` in a fresh root envelope (partition 0, offset 0, attempt 1), as the bus
    /// would for a first publish. Mostly useful to call a handler directly in a test.
    pub fn new(event: E) -> Self {
        let timestamp = SystemTime::now();
        let id = new_id(timestamp);
        Envelope::from_parts(
            Metadata {
                id,
                topic: E::TOPIC,
                partition: 0,
                offset: 0,
                timestamp,
                correlation_id: id,
                causation_id: None,
                headers: Headers::new(),
            },
            event,
        )
    }

    /// Builds an envelope from explicit metadata (for tests and adapters).
    pub fn from_parts(meta: Metadata, event: E) -> Self {
        Envelope {
            inner: Arc::new(Inner { meta, event }),
            attempt: 1,
        }
    }

    /// This envelope with its delivery attempt set (for tests of redelivery).
    #[must_use]
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// The event.
    pub fn event(&self) -> &E {
        &self.inner.event
    }

    /// The partition key of the event.
    pub fn key(&self) -> Option<Key<'_>> {
        self.inner.event.key()
    }

    /// Event type name ([`Event::NAME`]).
    pub fn name(&self) -> &'static str {
        E::NAME
    }

    /// Event schema version ([`Event::VERSION`]).
    pub fn version(&self) -> u32 {
        E::VERSION
    }
}

impl<E> Envelope<E> {
    /// All metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.inner.meta
    }

    /// Event id.
    pub fn id(&self) -> Uuid {
        self.inner.meta.id
    }

    /// Topic name.
    pub fn topic(&self) -> &'static str {
        self.inner.meta.topic
    }

    /// Partition number.
    pub fn partition(&self) -> u32 {
        self.inner.meta.partition
    }

    /// Offset within the partition.
    pub fn offset(&self) -> u64 {
        self.inner.meta.offset
    }

    /// Publication time.
    pub fn timestamp(&self) -> SystemTime {
        self.inner.meta.timestamp
    }

    /// Correlation id of the causal chain.
    pub fn correlation_id(&self) -> Uuid {
        self.inner.meta.correlation_id
    }

    /// Id of the event or request that caused this one.
    pub fn causation_id(&self) -> Option<Uuid> {
        self.inner.meta.causation_id
    }

    /// Headers.
    pub fn headers(&self) -> &Headers {
        &self.inner.meta.headers
    }

    /// Delivery attempt of this event to this group: 1 the first time, 2 on the first
    /// redelivery, and so on.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

impl<E: fmt::Debug> fmt::Debug for Envelope<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("meta", &self.inner.meta)
            .field("attempt", &self.attempt)
            .field("event", &self.inner.event)
            .finish()
    }
}

/// An event of any type of a topic, as an [`AnyHandler`](crate::AnyHandler) receives it.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use tidings::{AnyEnvelope, Envelope, Event};
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id)]
/// struct OrderPaid { order_id: u64 }
///
/// let any = AnyEnvelope::from(Envelope::new(OrderPaid { order_id: 9 }));
/// assert_eq!(any.name(), "OrderPaid");
/// assert_eq!(any.downcast_ref::<OrderPaid>().unwrap().order_id, 9);
/// ```
#[derive(Clone)]
pub struct AnyEnvelope {
    pub(crate) inner: Erased,
    pub(crate) attempt: u32,
}

impl AnyEnvelope {
    pub(crate) fn from_parts<E: Event>(meta: Metadata, event: E) -> Self {
        AnyEnvelope {
            inner: Arc::new(Inner { meta, event }),
            attempt: 1,
        }
    }

    /// The event, type-erased.
    pub fn event(&self) -> &dyn DynEvent {
        self.inner.event()
    }

    /// The event as an `E`, if it is one.
    pub fn downcast_ref<E: Event>(&self) -> Option<&E> {
        self.inner.event().downcast_ref::<E>()
    }

    /// A typed envelope, if the event is an `E`.
    pub fn downcast<E: Event>(&self) -> Option<Envelope<E>> {
        downcast::<E>(Arc::clone(&self.inner)).map(|inner| Envelope {
            inner,
            attempt: self.attempt,
        })
    }

    /// Event type name.
    pub fn name(&self) -> &'static str {
        self.inner.event().event_info().name
    }

    /// The partition key of the event.
    pub fn key(&self) -> Option<Key<'_>> {
        self.inner.event().event_info().key
    }

    /// All metadata.
    pub fn metadata(&self) -> &Metadata {
        self.inner.meta()
    }

    /// Event id.
    pub fn id(&self) -> Uuid {
        self.inner.meta().id
    }

    /// Topic name.
    pub fn topic(&self) -> &'static str {
        self.inner.meta().topic
    }

    /// Partition number.
    pub fn partition(&self) -> u32 {
        self.inner.meta().partition
    }

    /// Offset within the partition.
    pub fn offset(&self) -> u64 {
        self.inner.meta().offset
    }

    /// Correlation id of the causal chain.
    pub fn correlation_id(&self) -> Uuid {
        self.inner.meta().correlation_id
    }

    /// Id of the event or request that caused this one.
    pub fn causation_id(&self) -> Option<Uuid> {
        self.inner.meta().causation_id
    }

    /// Delivery attempt of this event to this group (1 the first time).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

impl<E: Event> From<Envelope<E>> for AnyEnvelope {
    fn from(env: Envelope<E>) -> Self {
        AnyEnvelope {
            inner: env.inner,
            attempt: env.attempt,
        }
    }
}

impl fmt::Debug for AnyEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnyEnvelope")
            .field("meta", self.inner.meta())
            .field("attempt", &self.attempt)
            .field("event", &self.inner.event())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_time_ordered_uuid_v7() {
        let now = SystemTime::now();
        let a = new_id(now);
        let b = new_id(now);
        assert_eq!(a.get_version_num(), 7);
        assert_ne!(a, b);
        let later = new_id(now + std::time::Duration::from_millis(5));
        assert!(later > a && later > b, "a later millisecond sorts after");
    }

    /// The millisecond of `id`'s timestamp, since the Unix epoch.
    fn millis_of(id: Uuid) -> u64 {
        let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
        secs * 1000 + u64::from(nanos) / 1_000_000
    }

    #[test]
    fn an_id_carries_the_millisecond_of_its_time_on_either_side_of_a_millisecond_boundary() {
        use std::time::Duration;
        let base = SystemTime::UNIX_EPOCH + Duration::from_millis(1_750_000_000_123);
        // In order, backwards, across boundaries, repeated: the thread's cached millisecond
        // must never leak into an id of another one.
        let offsets_micros = [
            0, 999, 1000, 1001, 999, 0, 5_000_500, 1, 2_000_000, 1999, 2000,
        ];
        for micros in offsets_micros {
            let at = base + Duration::from_micros(micros);
            let expected = at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis();
            assert_eq!(u128::from(millis_of(new_id(at))), expected, "{micros} µs");
        }
        // Before the epoch: millisecond 0, as before.
        let before = SystemTime::UNIX_EPOCH - Duration::from_millis(3);
        assert_eq!(millis_of(new_id(before)), 0);
        assert_eq!(millis_of(new_id(base)), 1_750_000_000_123);
    }
}
