//! Rebuilding a consumer group on a running bus, and knowing when a worker caught up.
//!
//! The bus gives each partition worker of the group an order ([`Rebuilds::order`]) and raises
//! its reset flag (`Partition::request_reset`). The worker takes the order at its next event
//! boundary ([`Consumer::reset`]): a fresh handler from the factory, the events queued for it
//! dropped (they are in the log), its offset reset in the store (serialised with the offset
//! commits, which would otherwise move it forward again), then it catches up from there as at
//! start. A worker keeps *targets*, offsets it reports once it finished everything below them:
//! the log's head at start (for [`Bus::ready`](crate::Bus::ready)) and at a reset (for the
//! rebuild's caller).

use std::collections::HashMap;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::consume::Consumer;
use super::feed::{start_offset, Feed};
use super::Durable;
use crate::envelope::Erased;
use crate::runtime::dispatch::Dispatch;
use crate::store::StartFrom;

/// The groups that may be rebuilt and the orders not yet taken by their workers.
#[derive(Default)]
pub(crate) struct Rebuilds {
    groups: Mutex<HashMap<String, Group>>,
    /// By (group, topic, partition).
    orders: Mutex<HashMap<(String, String, u32), ResetOrder>>,
}

struct Group {
    /// Deduplicates event ids (effectively-once, or a `Dedup` layer): a replay would skip what
    /// it handled before.
    dedups: bool,
    /// The partition count of each topic the group reads (several when its event set spans
    /// topics).
    topics: Vec<(String, u32)>,
    running: Option<Arc<Progress>>,
}

/// A worker's order: where to start again, and whom to tell.
struct ResetOrder {
    start: StartFrom,
    progress: Arc<Progress>,
}

/// Why a rebuild was not started.
pub(crate) enum Refused {
    /// Not a group of this bus.
    Unknown,
    /// The group deduplicates event ids.
    Deduplicated,
    /// A rebuild of the group has not caught up yet.
    InProgress,
}

/// One rebuild of one group, shared by its workers and the caller's handle.
pub(crate) struct Progress {
    pub(crate) group: String,
    to_apply: AtomicUsize,
    /// Cancelled once every partition took its order (reset, or could not).
    pub(crate) applied: CancellationToken,
    to_catch_up: AtomicUsize,
    /// Cancelled once every partition caught up to its target (or gave up).
    pub(crate) caught_up: CancellationToken,
    /// Partitions whose factory panicked: they kept their handler and their offset.
    pub(crate) factory_panicked: AtomicUsize,
    /// Partitions that stopped before resetting or catching up (the bus shut down).
    pub(crate) abandoned: AtomicUsize,
}

impl Progress {
    fn new(group: &str, partitions: u32) -> Self {
        let n = partitions as usize;
        Progress {
            group: group.to_owned(),
            to_apply: AtomicUsize::new(n),
            applied: CancellationToken::new(),
            to_catch_up: AtomicUsize::new(n),
            caught_up: CancellationToken::new(),
            factory_panicked: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
        }
    }

    fn applied_one(&self) {
        if self.to_apply.fetch_sub(1, AcqRel) == 1 {
            self.applied.cancel();
        }
    }

    fn caught_up_one(&self) {
        if self.to_catch_up.fetch_sub(1, AcqRel) == 1 {
            self.caught_up.cancel();
        }
    }

    /// A partition that will not reset nor catch up.
    fn gave_up(&self, counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.applied_one();
        self.caught_up_one();
    }
}

impl Rebuilds {
    /// At build, for each worker: `group` reads `topic`, which has `partitions` partitions.
    pub(crate) fn register(&self, group: &str, topic: &str, partitions: u32, dedups: bool) {
        let mut groups = self.groups.lock();
        let entry = groups.entry(group.to_owned()).or_insert(Group {
            dedups,
            topics: Vec::new(),
            running: None,
        });
        if !entry.topics.iter().any(|(t, _)| t == topic) {
            entry.topics.push((topic.to_owned(), partitions));
        }
    }

    /// Orders every worker of `group` to reset to `start`; the caller then raises their flags.
    pub(crate) fn order(&self, group: &str, start: StartFrom) -> Result<Arc<Progress>, Refused> {
        let mut groups = self.groups.lock();
        let entry = groups.get_mut(group).ok_or(Refused::Unknown)?;
        if entry.dedups {
            return Err(Refused::Deduplicated);
        }
        if entry
            .running
            .as_ref()
            .is_some_and(|p| !p.caught_up.is_cancelled())
        {
            return Err(Refused::InProgress);
        }
        let partitions = entry.topics.iter().map(|(_, n)| n).sum();
        let progress = Arc::new(Progress::new(group, partitions));
        entry.running = Some(Arc::clone(&progress));
        let mut orders = self.orders.lock();
        for (topic, n) in &entry.topics {
            for partition in 0..*n {
                orders.insert(
                    (group.to_owned(), topic.clone(), partition),
                    ResetOrder {
                        start,
                        progress: Arc::clone(&progress),
                    },
                );
            }
        }
        Ok(progress)
    }

    fn take(&self, group: &str, topic: &str, partition: u32) -> Option<ResetOrder> {
        self.orders
            .lock()
            .remove(&(group.to_owned(), topic.to_owned(), partition))
    }
}

/// What a worker reports once it finished every event below an offset.
pub(crate) enum Target {
    /// The log's head when the worker started: the bus is ready once every worker is there.
    Start,
    /// The log's head when the worker reset for a rebuild.
    Rebuild(Arc<Progress>),
}

impl Durable {
    /// A worker finished what the log held when it started (or gave up starting).
    pub(crate) fn worker_caught_up(&self) {
        if self.catching_up.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.caught_up.cancel();
        }
    }
}

impl<D: Dispatch> Consumer<'_, D> {
    /// Reports the targets the worker's offset reached.
    pub(super) fn check_targets(&mut self) {
        if self.targets.is_empty() {
            return;
        }
        let next = self.stats.next_offset.load(Acquire);
        let durable = &self.durable;
        self.targets.retain(|(at, target)| {
            if next < *at {
                return true;
            }
            match target {
                Target::Start => durable.worker_caught_up(),
                Target::Rebuild(progress) => progress.caught_up_one(),
            }
            false
        });
    }

    /// At an event boundary, a rebuild's order: a fresh handler, the queued events dropped
    /// (they are read from the log again, except redriven dead letters, which stay in
    /// `self.batch` for the caller to handle), the offset reset in the store, and a catch-up
    /// from there.
    pub(super) async fn reset(&mut self, feed: &mut Feed) {
        self.stats.reset.store(false, Release);
        let Some(order) = self
            .durable
            .rebuilds
            .take(&self.group, self.topic, self.partition)
        else {
            return;
        };
        let progress = order.progress;
        if self.worker.core.cancel.is_cancelled() {
            progress.gave_up(&progress.abandoned);
            return;
        }
        if !self.worker.end.dispatch.restart() {
            // Logged by the factory's guard. The partition goes on as it was.
            tracing::error!(group = %self.group, partition = self.partition, "tidings: the handler factory panicked during a rebuild; the partition keeps its handler and its offset");
            progress.gave_up(&progress.factory_panicked);
            return;
        }
        self.worker.end.consecutive_panics = 0;
        let mut queued: Vec<Erased> = self.batch.drain(..).collect();
        queued.extend(
            self.part
                .restart_catch_up(self.slot, &self.worker.core.pending),
        );
        let mut dropped = 0;
        for item in queued {
            if self
                .worker
                .dead_letters
                .holds(self.partition, item.meta().offset)
            {
                // A redriven dead letter: not in the part of the log read again.
                self.batch.push_back(item);
            } else {
                dropped += 1;
                self.done.push(item);
            }
        }
        if dropped > 0 {
            self.worker.core.finish(dropped);
        }
        feed.rows.clear();
        let durable = Arc::clone(&self.durable);
        let head = loop {
            // No offset commit in between: one that read the old offset would move the
            // store's forward again.
            let commits = durable.commits.lock().await;
            let found = start_offset(
                &*durable.store,
                &self.group,
                self.topic,
                self.partition,
                order.start,
                true,
            )
            .await;
            match found {
                Ok((from, head)) => {
                    self.stats.next_offset.store(from, Release);
                    durable.note_committed(self.topic, self.slot, self.partition, from);
                    drop(commits);
                    break head;
                }
                Err(error) => {
                    drop(commits);
                    tracing::error!(topic = %self.topic, group = %self.group, partition = self.partition, %error, "tidings: resetting the group's offset in the store failed; retrying");
                    if !self.backoff.wait(&self.worker.core.cancel).await {
                        progress.gave_up(&progress.abandoned);
                        return;
                    }
                }
            }
        };
        self.backoff = Default::default();
        self.part.raise_head(head);
        self.may_catch_up = !self.worker.held;
        tracing::info!(topic = %self.topic, group = %self.group, partition = self.partition, from = self.stats.next_offset.load(Acquire), head, "tidings: rebuilding the group: a fresh handler replays the log");
        progress.applied_one();
        self.targets.push((head, Target::Rebuild(progress)));
        self.check_targets();
    }
}
