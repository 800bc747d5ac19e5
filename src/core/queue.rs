//! A topic's partitions and their bounded per-group queues: the data structure every publish
//! goes into and every worker drains.
//!
//! One lock per partition holds its offset counter and one queue per consumer group (a group's
//! *slot*), so offsets are given in queue order. A worker waits on its slot's `Notify` only when
//! its queue is empty (`parked`); a publisher wakes it only then. Finished envelopes go to the
//! partition's graveyard and are freed by the next publisher, on the thread that allocated them.
//! The live-or-catching-up protocol of a bus with a store lives apart, in `core::catch_up`.

use parking_lot::{Mutex, MutexGuard};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::envelope::Erased;
use crate::event::Key;
use crate::topic::{Overflow, TopicConfig};

/// Beyond this many envelopes waiting to be freed by a publisher, workers free their own.
const GRAVEYARD_LIMIT: usize = 4096;

pub(crate) struct Topic {
    pub(crate) name: String,
    pub(crate) capacity: usize,
    pub(crate) overflow: Overflow,
    pub(crate) partitions: Box<[Partition]>,
    /// Names of the consumer groups, by slot.
    pub(crate) groups: Box<[String]>,
    /// Counters of each group's worker, by slot then partition.
    pub(crate) worker_stats: Box<[Box<[WorkerStats]>]>,
    round_robin: AtomicU32,
    /// Events published on this topic that no consumer group of this bus takes (their type has
    /// no subscriber). Written only on that path.
    pub(crate) unrouted: AtomicU64,
    /// The topic's metric handles (nothing without the `metrics` feature).
    pub(crate) metrics: crate::metrics::TopicMetrics,
}

/// Counters a partition worker keeps; written by that worker only. Aligned to its own cache
/// lines so that workers of neighbouring partitions do not contend.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct WorkerStats {
    pub(crate) handled: AtomicU64,
    /// Of those handled, duplicates acknowledged without handling.
    pub(crate) duplicates: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) restarts: AtomicU64,
    /// Offset after the last finished (handled or failed) event; 0 before the first. With a
    /// store: where the group resumes, the offset the committer commits.
    pub(crate) next_offset: AtomicU64,
    /// With a store: `next_offset` holds the group's real position (read from the store).
    pub(crate) ready: std::sync::atomic::AtomicBool,
    /// Effectively-once with a store: 1 + the lowest offset whose mark is not durable yet (0:
    /// none). Offsets are committed below it (see `bus::marks`).
    pub(crate) unmarked: AtomicU64,
    /// With a store: a rebuild asks the worker to reset at its next event boundary (set by the
    /// bus, cleared by the worker: the one counter here not only the worker writes).
    pub(crate) reset: std::sync::atomic::AtomicBool,
}

impl Topic {
    pub(crate) fn new(config: &TopicConfig, partitions: u32, groups: Vec<String>) -> Self {
        let worker_stats = groups
            .iter()
            .map(|_| (0..partitions).map(|_| WorkerStats::default()).collect())
            .collect();
        let metrics = crate::metrics::TopicMetrics::new(&config.name, &groups, partitions);
        let partitions = (0..partitions)
            .map(|_| Partition::new(groups.len()))
            .collect();
        Topic {
            name: config.name.clone(),
            capacity: config.capacity,
            overflow: config.overflow,
            partitions,
            groups: groups.into_boxed_slice(),
            worker_stats,
            round_robin: AtomicU32::new(0),
            unrouted: AtomicU64::new(0),
            metrics,
        }
    }

    #[inline]
    pub(crate) fn partition_for(&self, key: Option<Key<'_>>) -> u32 {
        let n = self.partitions.len() as u32;
        if n == 1 {
            return 0;
        }
        match key {
            Some(key) => key.partition(n),
            None => self.round_robin.fetch_add(1, Ordering::Relaxed) % n,
        }
    }
}

/// One partition of a topic: the offset counter and one bounded queue per consumer group, under
/// one lock so that offsets are assigned in queue order.
pub(crate) struct Partition {
    pub(super) state: Mutex<PartitionState>,
    /// Producers waiting for room.
    pub(crate) not_full: Notify,
    /// One per group slot: wakes that group's worker.
    pub(super) wakers: Box<[Notify]>,
}

pub(crate) struct PartitionState {
    pub(crate) next_offset: u64,
    pub(crate) closed: bool,
    /// With a store: appends of this bus to the partition under way (see `core::catch_up`).
    pub(crate) appending: u32,
    /// With a store: the highest head another writer announced while this bus was appending
    /// (0: none); looked at once the appends are done.
    pub(crate) announced: u64,
    /// Envelopes the workers finished with, freed by the next publisher.
    pub(crate) graveyard: Vec<Erased>,
    pub(crate) queues: Box<[GroupQueue]>,
}

#[derive(Default)]
pub(crate) struct GroupQueue {
    pub(crate) items: VecDeque<Erased>,
    /// The worker found the queue empty and waits to be woken.
    pub(crate) parked: bool,
    /// A producer found this queue full and waits on the partition's `not_full`.
    pub(crate) producer_waiting: bool,
    /// Events ever accepted into this queue.
    pub(crate) delivered: u64,
    /// Events dropped by [`Overflow::DropOldest`].
    pub(crate) dropped: u64,
    /// With a store: the group reads from the log (after a start, or when its queue was full);
    /// committed events are not queued for it meanwhile.
    pub(crate) lagging: bool,
    /// With a store: one pending count is held for this lagging group, so that `settled` waits
    /// until it caught up.
    pub(crate) marker: bool,
    /// With a store: events up to this offset that were not for this group (other types) were
    /// committed; the worker passes them by without reading them.
    pub(crate) skipped_to: u64,
    /// With a store, while not lagging: the offset the next committed event must have to be
    /// queued. Another offset means events were appended by someone else in between (another
    /// process, a transaction of the application's): the group then reads them from the log.
    pub(crate) live_next: u64,
}

impl Partition {
    fn new(groups: usize) -> Self {
        Partition {
            state: Mutex::new(PartitionState {
                next_offset: 0,
                graveyard: Vec::new(),
                closed: false,
                appending: 0,
                announced: 0,
                queues: (0..groups).map(|_| GroupQueue::default()).collect(),
            }),
            not_full: Notify::new(),
            wakers: (0..groups).map(|_| Notify::new()).collect(),
        }
    }

    #[inline]
    pub(crate) fn lock(&self) -> MutexGuard<'_, PartitionState> {
        self.state.lock()
    }

    /// Wakes the worker of `slot` if it is parked. Call with the lock held.
    #[inline]
    pub(crate) fn wake(&self, state: &mut PartitionState, slot: usize) {
        let q = &mut state.queues[slot];
        if q.parked {
            q.parked = false;
            self.wakers[slot].notify_one();
        }
    }

    /// Moves up to `max` events of `slot` into `out`, waiting while the queue is empty.
    /// Returns `false` once the partition is closed and the queue is empty.
    ///
    /// `done` holds the envelopes the worker finished since its last call. They go to the
    /// partition's graveyard, where the next publisher frees them: memory is then freed by the
    /// thread that allocated it, instead of contending on the allocator across threads for
    /// every event. When the worker is about to wait (the bus is idle), it frees them itself.
    pub(crate) async fn next_batch(
        &self,
        slot: usize,
        out: &mut VecDeque<Erased>,
        done: &mut Vec<Erased>,
        max: usize,
        capacity: usize,
    ) -> bool {
        let low_water = capacity / 2;
        loop {
            // Freed after the lock is released, never under it.
            let mut garbage: (Vec<Erased>, Vec<Erased>);
            let closed;
            {
                let mut state = self.lock();
                let state = &mut *state;
                let q = &mut state.queues[slot];
                if !q.items.is_empty() {
                    let n = q.items.len().min(max);
                    out.extend(q.items.drain(..n));
                    // Wake waiting producers only once the queue is down to half its capacity:
                    // they then publish half a queue per wake-up instead of one batch.
                    if q.producer_waiting && q.items.len() <= low_water {
                        q.producer_waiting = false;
                        self.not_full.notify_waiters();
                    }
                    if state.graveyard.is_empty() {
                        std::mem::swap(&mut state.graveyard, done);
                        return true;
                    }
                    if state.graveyard.len() < GRAVEYARD_LIMIT {
                        state.graveyard.append(done);
                        return true;
                    }
                    // No publisher is collecting: free our own.
                    garbage = (Vec::new(), std::mem::take(done));
                    closed = false;
                } else {
                    // Idle (or closed): nobody may publish for a while, so free everything now.
                    garbage = (std::mem::take(&mut state.graveyard), std::mem::take(done));
                    closed = state.closed;
                    if !closed {
                        q.parked = true;
                        // Except up to a queue's worth of envelopes that the next publishes
                        // build in again (plain-data events: see `envelope::envelope`).
                        crate::envelope::keep_reusable(
                            &mut garbage.1,
                            &mut state.graveyard,
                            capacity,
                        );
                        crate::envelope::keep_reusable(
                            &mut garbage.0,
                            &mut state.graveyard,
                            capacity,
                        );
                    }
                }
            }
            drop(garbage);
            if closed {
                return false;
            }
            if !out.is_empty() {
                return true;
            }
            self.wakers[slot].notified().await;
        }
    }

    /// Waits until the partition is closed (a worker that could not start).
    pub(crate) async fn wait_closed(&self, slot: usize) {
        loop {
            {
                let mut state = self.lock();
                if state.closed {
                    return;
                }
                state.queues[slot].parked = true;
            }
            self.wakers[slot].notified().await;
        }
    }

    /// Whether events of `slot` wait in its queue.
    pub(crate) fn has_queued(&self, slot: usize) -> bool {
        !self.lock().queues[slot].items.is_empty()
    }

    /// Returns once something happens to `slot`'s queue (events queued, the group told to
    /// read the log, the partition closing), at once if events wait. Cancel safe; may return
    /// spuriously (the caller looks again).
    pub(crate) async fn changed(&self, slot: usize) {
        {
            let mut state = self.lock();
            if state.closed || !state.queues[slot].items.is_empty() {
                return;
            }
            state.queues[slot].parked = true;
        }
        self.wakers[slot].notified().await;
    }

    /// Takes the envelopes workers finished, for the caller to drop outside the lock.
    pub(crate) fn take_graveyard(state: &mut PartitionState, out: &mut Vec<Erased>) {
        if !state.graveyard.is_empty() {
            std::mem::swap(&mut state.graveyard, out);
        }
    }

    /// Closes the partition: workers finish what is queued, then stop.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        for q in state.queues.iter_mut() {
            q.parked = false;
        }
        drop(state);
        for w in self.wakers.iter() {
            w.notify_one();
        }
        self.not_full.notify_waiters();
    }
}
