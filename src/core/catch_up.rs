//! With a store, whether a group takes committed events from its queue (*live*) or reads them
//! from the log (*lagging*, catching up): the whole protocol, in one place.
//!
//! - Every queue starts lagging (the builder): a group first reads the log from its committed
//!   offset.
//! - The appender offers each committed event to the groups ([`Core::offer_committed`]): a live
//!   group whose queue has room and whose `live_next` is the event's offset gets it queued; a
//!   full queue, or a gap (events someone else appended), makes the group lag, with a *marker*:
//!   one pending count that keeps [`settled`](crate::Bus::settled) waiting until it caught up.
//! - Another writer (another process, the application's transaction) moved a partition's head
//!   past what the bus handed its groups ([`Core::head_moved`], from the store's announcements
//!   or a poll of the heads): every live group lags, with a marker, and reads the rest from the
//!   log, in log order with the bus's own events. While this bus's own appends to the
//!   partition are under way ([`Partition::begin_append`]), the head is only noted and looked
//!   at once they are offered ([`Core::end_append`]): a head that counts this bus's own events
//!   (its own announcement, often ahead of the appender) then makes no group lag.
//! - The worker asks [`Partition::next_durable`]: queued events first; else, if the log's head
//!   is past what it finished, it catches up (`CatchUp(head)`); once caught up it goes live
//!   again and the marker's count is released.
//! - At shutdown a group still catching up stops reading ([`Partition::give_up_catch_up`]):
//!   the rest waits in the log for the next start.
//! - A rebuild ([`Partition::request_reset`]) makes the worker stop at its next event boundary
//!   (`Reset`); it lags again from its new offset ([`Partition::restart_catch_up`]), as at start.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::pending::Pending;
use super::queue::{Partition, PartitionState, Topic, WorkerStats};
use super::Core;
use crate::envelope::Erased;
use std::collections::VecDeque;

/// What [`Partition::next_durable`] found.
pub(crate) enum NextDurable {
    /// Events in the batch.
    Batch,
    /// The queue is empty and the log holds events up to this offset the group has not had.
    CatchUp(u64),
    /// Closed and drained.
    Closed,
    /// A rebuild asked the worker to reset (see [`Partition::request_reset`]).
    Reset,
}

impl Partition {
    /// With a store: moves up to `max` queued events of `slot` into `out`, or says the group
    /// must catch up from the log, waiting while there is nothing to do.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn next_durable(
        &self,
        slot: usize,
        out: &mut VecDeque<Erased>,
        done: &mut Vec<Erased>,
        max: usize,
        stats: &WorkerStats,
        may_catch_up: bool,
        pending: &Pending,
    ) -> NextDurable {
        loop {
            // Finished envelopes are freed here, outside the lock.
            done.clear();
            let mut release = false;
            {
                let mut state = self.lock();
                if stats.reset.load(Ordering::Acquire) {
                    // Read under the lock: a reset asked before the worker parks wakes it.
                    return NextDurable::Reset;
                }
                let state = &mut *state;
                let head = state.next_offset;
                let q = &mut state.queues[slot];
                if !q.items.is_empty() {
                    let n = q.items.len().min(max);
                    out.extend(q.items.drain(..n));
                    // A redrive waiting for room (publishers never wait with a store).
                    if q.producer_waiting {
                        q.producer_waiting = false;
                        self.not_full.notify_waiters();
                    }
                    return NextDurable::Batch;
                }
                let expected = stats.next_offset.load(Ordering::Relaxed);
                if q.skipped_to > expected && !q.lagging {
                    stats.next_offset.store(q.skipped_to, Ordering::Release);
                }
                let expected = stats.next_offset.load(Ordering::Relaxed);
                if expected < head && may_catch_up {
                    q.lagging = true;
                    return NextDurable::CatchUp(head);
                }
                if q.lagging && expected >= head {
                    // Caught up: committed events are queued for the group again.
                    q.lagging = false;
                    q.skipped_to = head;
                    q.live_next = head;
                }
                if q.marker && (!q.lagging || !may_catch_up) {
                    q.marker = false;
                    release = true;
                }
                if state.closed {
                    if release {
                        pending.finish(1);
                    }
                    return NextDurable::Closed;
                }
                q.parked = true;
            }
            if release {
                pending.finish(1);
            }
            self.wakers[slot].notified().await;
        }
    }

    /// With a store, when the bus shuts down before the group caught up: it stops reading the
    /// log (what is left waits for the next start) and no longer holds `settled` up.
    pub(crate) fn give_up_catch_up(&self, slot: usize, pending: &Pending) {
        let mut state = self.lock();
        let q = &mut state.queues[slot];
        q.lagging = true;
        let release = std::mem::take(&mut q.marker);
        drop(state);
        if release {
            pending.finish(1);
        }
    }

    /// With a store: asks the worker of `slot` to reset at its next event boundary (it finds
    /// its order with the durable layer), waking it if it is parked.
    pub(crate) fn request_reset(&self, slot: usize, stats: &WorkerStats) {
        // Set under the lock, where the worker looks before it parks: it sees the flag, or it
        // parked before and is woken here.
        let mut state = self.lock();
        stats.reset.store(true, Ordering::Release);
        self.wake(&mut state, slot);
    }

    /// With a store, as a rebuild resets the group: it reads the log again, from the offset
    /// the worker sets next, and holds `settled` up until it caught up. The events queued for
    /// it are taken out (they are in the log); the caller finishes or handles them.
    pub(crate) fn restart_catch_up(&self, slot: usize, pending: &Pending) -> Vec<Erased> {
        let mut state = self.lock();
        let q = &mut state.queues[slot];
        q.lagging = true;
        let marker = !std::mem::replace(&mut q.marker, true);
        let queued: Vec<Erased> = q.items.drain(..).collect();
        if q.producer_waiting {
            q.producer_waiting = false;
            self.not_full.notify_waiters();
        }
        drop(state);
        if marker {
            pending.add(1);
        }
        queued
    }

    /// With a store: this bus's appender begins an append to the partition (end it with
    /// [`Core::end_append`], appended or not).
    pub(crate) fn begin_append(&self) {
        self.lock().appending += 1;
    }

    /// With a store: the log's head is at least `head`.
    pub(crate) fn raise_head(&self, head: u64) {
        let mut state = self.lock();
        if state.next_offset < head {
            state.next_offset = head;
        }
    }
}

impl Core {
    /// With a store, at build: every group starts lagging, reading the log from its committed
    /// offset, with a marker each so that `settled` waits for it to catch up.
    pub(crate) fn start_lagging(&self) {
        let mut markers = 0;
        for topic in &self.topics {
            for part in topic.partitions.iter() {
                let mut state = part.lock();
                for q in state.queues.iter_mut() {
                    q.lagging = true;
                    q.marker = true;
                    markers += 1;
                }
            }
        }
        self.pending.add(markers);
    }

    /// With a store: the log of `partition` reaches `head`, by an announcement or a poll (it
    /// may count this bus's own events). If that is past what the bus handed its groups, events
    /// of other writers are in the log: every live group reads them from there (a lagging one
    /// goes on to the new head).
    pub(crate) fn head_moved(&self, topic: &Topic, partition: u32, head: u64) {
        let Some(part) = topic.partitions.get(partition as usize) else {
            return;
        };
        let mut state = part.lock();
        if state.next_offset >= head {
            return;
        }
        if state.appending > 0 {
            // Perhaps this bus's own events, not offered yet: decided once they are.
            state.announced = state.announced.max(head);
            return;
        }
        self.fall_behind(part, &mut state, head);
    }

    /// With a store: the appender is done with an append to `partition` of `topic` (begun with
    /// [`Partition::begin_append`]): its committed events were offered, or it failed. A head
    /// announced meanwhile beyond them is looked at now.
    pub(crate) fn end_append(&self, topic: &Topic, partition: u32) {
        let part = &topic.partitions[partition as usize];
        let mut state = part.lock();
        state.appending -= 1;
        if state.appending == 0 && state.announced != 0 {
            let head = std::mem::take(&mut state.announced);
            if head > state.next_offset {
                self.fall_behind(part, &mut state, head);
            }
        }
    }

    /// The log of `part` reaches `head`, past what the groups were handed: each live group
    /// lags (with a marker, as for a gap), and each worker is woken to read the log.
    fn fall_behind(&self, part: &Partition, state: &mut PartitionState, head: u64) {
        state.next_offset = head;
        if state.closed {
            return;
        }
        let mut markers = 0;
        for slot in 0..state.queues.len() {
            let q = &mut state.queues[slot];
            if !q.lagging {
                q.lagging = true;
                q.marker = true;
                markers += 1;
            }
            part.wake(state, slot);
        }
        if markers > 0 {
            self.pending.add(markers);
        }
    }

    /// Hands a committed event to the groups of its route: into each group's queue, unless
    /// that group is catching up from the log or its queue is full (then it will read the event
    /// from the log).
    pub(crate) fn offer_committed(&self, topic: &Topic, slots: &[usize], item: &Erased) {
        let meta = item.meta();
        let part: &Partition = &topic.partitions[meta.partition as usize];
        let mut state = part.lock();
        if state.next_offset <= meta.offset {
            state.next_offset = meta.offset + 1;
        }
        if state.closed {
            // Committed as the bus stopped (its workers are gone): the groups read it from the
            // log when the bus starts again.
            return;
        }
        let mut pushed = 0;
        let mut markers = 0;
        for slot in 0..state.queues.len() {
            let q = &mut state.queues[slot];
            if q.lagging {
                continue;
            }
            if q.live_next != meta.offset {
                // Events this bus did not append came first: read them, and this one, from
                // the log.
                q.lagging = true;
                q.marker = true;
                markers += 1;
                part.wake(&mut state, slot);
                continue;
            }
            q.live_next = meta.offset + 1;
            if !slots.contains(&slot) {
                // Not for this group: its worker passes the offset by.
                q.skipped_to = meta.offset + 1;
                continue;
            }
            if q.items.len() >= topic.capacity {
                // The group reads this one and what follows from the log, then joins again.
                q.lagging = true;
                q.marker = true;
                markers += 1;
                part.wake(&mut state, slot);
                continue;
            }
            q.items.push_back(Arc::clone(item));
            q.delivered += 1;
            pushed += 1;
            part.wake(&mut state, slot);
        }
        if pushed + markers > 0 {
            self.pending.add(pushed + markers);
        }
    }
}
