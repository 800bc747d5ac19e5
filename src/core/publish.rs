//! A publish into the partition queues of its groups (in memory), or to the log first (with a
//! store, through [`Append`](super::append::Append)); a redrive back into one group's queue.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::lock;
use super::queue::{Partition, PartitionState, Topic};
use super::route::Placement;
use super::route::QueueId;
use super::seen::SourceId;
use super::Core;
use crate::envelope::{AnyEnvelope, Erased, Headers, Metadata};
use crate::error::{PublishError, TryPublishError};
use crate::event::Event;
use crate::publish::{Cause, Published};
use crate::topic::Overflow;
use uuid::Uuid;

/// Where a publish comes from: a handler (with its cause and its own queue) or outside.
#[derive(Default)]
pub(crate) struct Origin {
    pub(crate) cause: Option<Cause>,
    pub(crate) from_handler: bool,
    pub(crate) headers: Headers,
    /// An id given by the publisher.
    pub(crate) id: Option<Uuid>,
    /// The queue the publishing handler's worker drains, if any.
    pub(crate) owner: Option<QueueId>,
    /// Who publishes (see `core::seen`); the application by default.
    pub(crate) source: SourceId,
}

enum Reject<E> {
    Full(E),
    Closed(E),
}

impl Core {
    pub(crate) async fn publish_from<E: Event>(
        &self,
        event: E,
        mut origin: Origin,
    ) -> Result<Published, PublishError<E>> {
        let inner = self;
        if !origin.from_handler && !inner.intake_open.load(Ordering::Acquire) {
            return Err(PublishError::Closed(event));
        }
        let mut place = inner.place(&event, origin.source);
        if inner.append.is_some() {
            let route = (Arc::clone(&place.route.topic), place.route.slots.clone());
            let id = origin.id.unwrap_or(place.id);
            // Boxed: the durable path's state would otherwise make every publish future, the
            // in-memory ones too, several times larger.
            return Box::pin(inner.publish_durable(
                event,
                route,
                place.partition,
                id,
                place.timestamp,
                &mut origin,
            ))
            .await;
        }
        let mut event = event;
        let mut garbage = Vec::new();
        // When a queue is full, sleep until its worker has drained half of it. (No yielding
        // first: a yielded task runs again only once its thread has nothing else to do, i.e.
        // after the worker's batch, and then leaves tokio's scheduler looking for work and
        // waking another thread for nothing, once per queue cycle.)
        let mut retry = false;
        loop {
            if retry {
                // Stamped when accepted, not when first tried: ids and times follow offsets.
                place.restamp();
            }
            retry = true;
            let part = place.partition();
            let waiting = {
                let mut state = part.lock();
                match inner.enqueue(&place, &mut state, event, &mut origin, true, &mut garbage) {
                    Ok(published) => return Ok(published),
                    Err(Reject::Closed(e)) => return Err(PublishError::Closed(e)),
                    Err(Reject::Full(e)) => {
                        event = e;
                        let mut waiting = Box::pin(part.not_full.notified());
                        waiting.as_mut().enable();
                        waiting
                    }
                }
            };
            // Free what this publisher collected before it waits, not after.
            drop(std::mem::take(&mut garbage));
            crate::budget::spend_turn().await;
            waiting.await;
        }
    }

    pub(crate) fn try_publish_from<E: Event>(
        &self,
        event: E,
        mut origin: Origin,
    ) -> Result<Published, TryPublishError<E>> {
        let inner = self;
        if !origin.from_handler && !inner.intake_open.load(Ordering::Acquire) {
            return Err(TryPublishError::Closed(event));
        }
        if inner.append.is_some() {
            return Err(TryPublishError::Durable(event));
        }
        let place = inner.place(&event, origin.source);
        let mut garbage = Vec::new();
        let mut state = place.partition().lock();
        inner
            .enqueue(&place, &mut state, event, &mut origin, false, &mut garbage)
            .map_err(|r| match r {
                Reject::Full(e) => TryPublishError::Full(e),
                Reject::Closed(e) => TryPublishError::Closed(e),
            })
    }

    /// Accepts `event` into the partition queues of its groups, under the partition lock.
    fn enqueue<E: Event>(
        &self,
        place: &Placement<'_>,
        state: &mut PartitionState,
        event: E,
        origin: &mut Origin,
        will_wait: bool,
        garbage: &mut Vec<Erased>,
    ) -> Result<Published, Reject<E>> {
        let (route, partition, id, timestamp) =
            (&*place.route, place.partition, place.id, place.timestamp);
        if !crate::envelope::reusable::<E>() {
            Partition::take_graveyard(state, garbage);
        }
        // Checked under the partition lock: shutdown takes every partition lock once after
        // closing intake, so an event accepted here is counted before shutdown drains.
        if state.closed || (!origin.from_handler && !self.intake_open.load(Ordering::SeqCst)) {
            return Err(Reject::Closed(event));
        }
        // A repeat of an id within the producer-side window publishes nothing: answered before
        // the capacity check, so it never waits for room. The window's lock is taken inside the
        // partition lock, always in that order.
        let id = origin.id.unwrap_or(id);
        let mut dedup = None;
        if let (Some(window), Some(_)) = (&self.publish_dedup, origin.id) {
            let mut window = window.lock();
            if let Some(first) = window.get((E::TOPIC, id)) {
                return Ok(Published {
                    duplicate: true,
                    ..first
                });
            }
            dedup = Some(window);
        }
        let topic = &*route.topic;
        if topic.overflow == Overflow::Block {
            let mut full = false;
            for &slot in route.slots.iter() {
                let q = &mut state.queues[slot];
                // A handler publishing into the queue its own worker drains is never made to
                // wait: nobody else could make room, so it would wait forever. That queue may
                // go past its capacity by what the handler publishes.
                if q.items.len() >= topic.capacity
                    && origin.owner != Some(QueueId::of(&route.topic, slot, partition))
                {
                    full = true;
                    // Ask this queue's worker to wake us when it has drained.
                    q.producer_waiting |= will_wait;
                }
            }
            if full {
                return Err(Reject::Full(event));
            }
        }
        let offset = state.next_offset;
        state.next_offset += 1;
        route.topic.metrics.sent(1);
        if let Some(mut window) = dedup {
            window.complete_with(
                (E::TOPIC, id),
                Published {
                    id,
                    partition,
                    offset,
                    duplicate: false,
                },
            );
        }
        let erased: Erased = crate::envelope::envelope(
            &mut state.graveyard,
            garbage,
            Metadata {
                id,
                topic: E::TOPIC,
                partition,
                offset,
                timestamp,
                correlation_id: origin.cause.map_or(id, |c| c.correlation),
                causation_id: origin.cause.map(|c| c.id),
                headers: std::mem::take(&mut origin.headers),
            },
            event,
        );
        if !route.slots.is_empty() {
            self.pending.add(route.slots.len());
        } else {
            // No group takes this type: counted (the warning was logged with the route).
            topic.unrouted.fetch_add(1, Ordering::Relaxed);
        }
        let part = &topic.partitions[partition as usize];
        let mut dropped = 0;
        for &slot in route.slots.iter() {
            let q = &mut state.queues[slot];
            // Only possible with Overflow::DropOldest: Block refused above.
            let oldest =
                if topic.overflow == Overflow::DropOldest && q.items.len() >= topic.capacity {
                    q.dropped += 1;
                    q.items.pop_front()
                } else {
                    None
                };
            q.items.push_back(Arc::clone(&erased));
            q.delivered += 1;
            if let Some(oldest) = oldest {
                // Freed outside the lock, with the graveyard.
                state.graveyard.push(oldest);
                dropped += 1;
                tracing::warn!(
                    topic = %topic.name,
                    group = %topic.groups[slot],
                    partition,
                    "queue full: dropped the oldest event (Overflow::DropOldest)"
                );
            }
            part.wake(state, slot);
        }
        if dropped > 0 {
            self.finish(dropped);
        }
        match &self.recorder {
            Some(recorder) => lock(&recorder.published).push(AnyEnvelope {
                inner: erased,
                attempt: 1,
            }),
            // No subscriber and no record: the last reference; free it outside the lock.
            None if route.slots.is_empty() => garbage.push(erased),
            None => {}
        }
        Ok(Published {
            id,
            partition,
            offset,
            duplicate: false,
        })
    }

    /// Puts `item` back into one group's queue (a redrive), waiting for room; gives it back if
    /// the bus is closing.
    pub(crate) async fn redeliver(
        &self,
        topic: &Topic,
        slot: usize,
        item: Erased,
    ) -> Result<(), Erased> {
        let Some(part) = topic.partitions.get(item.meta().partition as usize) else {
            // Not a partition of this bus's topic (a dead letter restored from a store whose
            // topic had more partitions): nowhere to send it.
            return Err(item);
        };
        loop {
            let waiting = {
                let mut state = part.lock();
                if state.closed || !self.is_open() {
                    return Err(item);
                }
                let q = &mut state.queues[slot];
                if q.items.len() < topic.capacity {
                    self.pending.add(1);
                    q.items.push_back(item);
                    q.delivered += 1;
                    part.wake(&mut state, slot);
                    return Ok(());
                }
                q.producer_waiting = true;
                let mut waiting = Box::pin(part.not_full.notified());
                waiting.as_mut().enable();
                waiting
            };
            waiting.await;
        }
    }
}
