//! A worker's side of a durable bus: [`LogSource`] (the group's queue, or the store's log while
//! it catches up) and [`StoreAck`] (dead letters saved, redriven ones deleted, effectively-once
//! marks kept). They plug into the runtime's worker through its `Source` and `Ack` seams.
//!
//! A group starts from its committed offset: its dead letters come back first (so a sequenced
//! key parked before the restart stays parked), then it catches up from the log, then takes
//! committed events from its queue as they commit, and reads the log again whenever the queue
//! missed some (the protocol is `core::catch_up`'s).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::feed::{Caught, Feed};
use super::marks::MarkBook;
use super::rebuild::Target;
use super::Durable;
use crate::context::Context;
use crate::core::catch_up::NextDurable;
use crate::core::queue::{Partition, Topic, WorkerStats};
use crate::dead_letter::DeadLetterQueue;
use crate::delivery::DeliveryMode;
use crate::envelope::{AnyEnvelope, Erased};
use crate::handler::HandlerError;
use crate::runtime::dispatch::Dispatch;
use crate::runtime::worker::{advance, Ack, Source, Worker, WorkerArgs};
use crate::store::{Decoder, Store};

/// A group's partition on a durable bus: its queue of committed events, or the log.
pub(crate) struct LogSource {
    durable: Arc<Durable>,
    batch_size: usize,
    start: crate::store::StartFrom,
    reset: bool,
}

impl LogSource {
    pub(crate) fn new(durable: Arc<Durable>, args: &WorkerArgs) -> Self {
        let dedups = args.options.delivery == DeliveryMode::EffectivelyOnce
            || args.options.has(crate::middleware::LayerKind::Dedup);
        durable.rebuilds.register(
            &args.topic.groups[args.slot],
            &args.topic.name,
            args.topic.partitions.len() as u32,
            dedups,
        );
        LogSource {
            durable,
            batch_size: args.options.batch_size,
            start: args.options.start,
            reset: args.options.reset,
        }
    }
}

/// Finishing an event on a durable bus: dead letters saved before the offset passes them, a
/// redriven event's row deleted once handled, effectively-once marks noted for their commit.
pub(crate) struct StoreAck {
    store: Arc<dyn Store>,
    group: Arc<str>,
    topic: Arc<Topic>,
    slot: usize,
    partition: u32,
    /// Effectively-once: the marks waiting for their shared commit.
    pub(crate) book: Option<Box<MarkBook>>,
    /// Cancelled once the bus stopped for good: retries of the store's writes give up then.
    stop: CancellationToken,
}

impl StoreAck {
    pub(crate) fn new(durable: &Durable, args: &WorkerArgs) -> Self {
        let group: Arc<str> = Arc::from(args.topic.groups[args.slot].as_str());
        StoreAck {
            store: Arc::clone(&durable.store),
            book: (args.options.delivery == DeliveryMode::EffectivelyOnce)
                .then(|| Box::new(durable.marks.book(&group, &args.topic.name, args.partition))),
            group,
            topic: Arc::clone(&args.topic),
            slot: args.slot,
            partition: args.partition,
            stop: durable.stop.clone(),
        }
    }
}

impl Ack for StoreAck {
    const LOG: bool = true;

    /// Effectively-once: whether the group marked `id` handled (its mark pending in a commit,
    /// or durable).
    async fn marked(&mut self, id: Uuid) -> bool {
        let Some(book) = self.book.as_ref() else {
            return false; // Not effectively-once: no marks.
        };
        if let Some(known) = book.knows(id) {
            return known;
        }
        let store = &self.store;
        let mut backoff = StoreBackoff::default();
        loop {
            match store.is_marked(&self.group, id).await {
                Ok(marked) => return marked,
                Err(error) => {
                    tracing::error!(group = %self.group, %id, %error, "tidings: reading a mark from the store failed; retrying");
                    if !backoff.wait(&self.stop).await {
                        // Shutting down: handle it (at-least-once rather than lost).
                        return false;
                    }
                }
            }
        }
    }

    /// With a store, after an event was handled: its dead letter's row goes (a redriven
    /// event), and with effectively-once its mark and offset are committed.
    async fn handled(&mut self, id: Uuid, offset: u64, dead_letters: &DeadLetterQueue) {
        let stats = &self.topic.worker_stats[self.slot][self.partition as usize];
        if let Some(book) = self.book.as_mut() {
            // Effectively-once: the mark waits for the next shared commit.
            book.note(id, offset, stats);
        }
        if dead_letters.take_stored(self.partition, offset) {
            if let Some(book) = self.book.as_mut() {
                // A redriven event: its mark is durable before its dead letter's row goes.
                book.sync(true, stats).await;
            }
            let store = &self.store;
            let mut backoff = StoreBackoff::default();
            while let Err(error) = store
                .delete_dead_letter(&self.group, &self.topic.name, self.partition, offset)
                .await
            {
                tracing::error!(group = %self.group, offset, %error, "tidings: deleting a handled dead letter from the store failed; retrying");
                if !backoff.wait(&self.stop).await {
                    break;
                }
            }
        }
    }

    /// With a store: saves the dead letter of `env` (if it went to the queue), before the
    /// group's offset passes it.
    /// Returns `false` if it could not be saved before the bus stopped.
    async fn save_dead_letter(
        &mut self,
        env: &AnyEnvelope,
        dead_letters: &DeadLetterQueue,
    ) -> bool {
        let Some(letter) = dead_letters.entry_for(env.id(), env.offset()) else {
            return true; // At-most-once: dropped, not dead-lettered.
        };
        let event = match crate::store::stored_event_of(&letter.envelope) {
            Ok(event) => event,
            Err(error) => {
                tracing::error!(group = %self.group, id = %env.id(), %error, "tidings: a dead letter could not be serialized; it stays in memory only");
                return true;
            }
        };
        let record = crate::store::DeadLetterRecord {
            group: self.group.to_string(),
            event,
            error: letter.error.clone(),
            permanent: letter.kind == crate::handler::ErrorKind::Permanent,
            attempts: letter.attempts,
            first_failure: letter.first_failure,
            last_failure: letter.last_failure,
            handler: letter.handler.to_owned(),
            redeliveries: letter.redeliveries,
        };
        let store = &self.store;
        let mut backoff = StoreBackoff::default();
        loop {
            match store.save_dead_letter(&record).await {
                Ok(()) => {
                    dead_letters.note_stored(env.partition(), env.offset());
                    return true;
                }
                Err(error) => {
                    tracing::error!(group = %self.group, id = %env.id(), %error, "tidings: saving a dead letter failed; retrying");
                    if !backoff.wait(&self.stop).await {
                        return false;
                    }
                }
            }
        }
    }
}

impl<D: Dispatch> Source<D> for LogSource {
    type Ack = StoreAck;

    async fn run(self, worker: Worker<D, StoreAck>, ctx: Context) {
        let topic = Arc::clone(&worker.end.topic);
        let (slot, partition) = (worker.end.slot, worker.end.partition);
        let mut consumer = Consumer {
            part: &topic.partitions[partition as usize],
            stats: &topic.worker_stats[slot][partition as usize],
            topic: &topic.name,
            group: Arc::clone(&worker.end.group),
            slot,
            partition,
            worker,
            ctx,
            batch: VecDeque::with_capacity(self.batch_size),
            done: Vec::new(),
            may_catch_up: true,
            backoff: StoreBackoff::default(),
            durable: Arc::clone(&self.durable),
            targets: Vec::new(),
        };
        let Some(mut feed) = consumer.start(&self).await else {
            return;
        };
        loop {
            consumer.check_targets();
            let next = consumer
                .part
                .next_durable(
                    slot,
                    &mut consumer.batch,
                    &mut consumer.done,
                    self.batch_size,
                    consumer.stats,
                    consumer.may_catch_up,
                    &consumer.worker.core.pending,
                )
                .await;
            match next {
                NextDurable::Batch => consumer.queued(&feed).await,
                NextDurable::CatchUp(until) => {
                    feed.until = until;
                    consumer.catch_up(&mut feed, &self.durable.decoder).await;
                }
                NextDurable::Reset => {
                    consumer.reset(&mut feed).await;
                    if !consumer.batch.is_empty() {
                        // Redriven dead letters that were queued: handled first.
                        consumer.queued(&feed).await;
                    }
                }
                NextDurable::Closed => {
                    if let Some(book) = consumer.worker.ack.book.as_mut() {
                        book.sync(true, consumer.stats).await;
                    }
                    return;
                }
            }
        }
    }
}

/// A [`LogSource`] at work on one partition of one group: the worker and what its loop keeps
/// between steps.
pub(super) struct Consumer<'a, D> {
    pub(super) part: &'a Partition,
    pub(super) stats: &'a WorkerStats,
    pub(super) topic: &'a str,
    pub(super) group: Arc<str>,
    pub(super) slot: usize,
    pub(super) partition: u32,
    pub(super) worker: Worker<D, StoreAck>,
    ctx: Context,
    pub(super) batch: VecDeque<Erased>,
    pub(super) done: Vec<Erased>,
    /// Cleared once the group must not read the log any more in this run (shutdown, or an
    /// event left in the log).
    pub(super) may_catch_up: bool,
    pub(super) backoff: StoreBackoff,
    pub(super) durable: Arc<Durable>,
    /// Offsets to report once every event below them is finished (see `rebuild`).
    pub(super) targets: Vec<(u64, Target)>,
}

impl<D: Dispatch> Consumer<'_, D> {
    /// Where the group starts: its dead letters come back first (its first worker reads them),
    /// so that a sequenced key parked before the restart stays parked; then its committed offset
    /// (or [`StartFrom`](crate::store::StartFrom)). `None` if the bus shut down first: the group
    /// starts next time.
    async fn start(&mut self, source: &LogSource) -> Option<Feed> {
        let durable = &source.durable;
        let store = Arc::clone(&durable.store);
        let dlq = Arc::clone(&self.worker.dead_letters);
        while let Err(error) = dlq.ensure_restored(&*store, &durable.decoder).await {
            tracing::error!(group = %self.group, %error, "tidings: reading the group's dead letters from the store failed; retrying");
            if !self.backoff.wait(&self.worker.core.cancel).await {
                self.give_up_starting(durable).await;
                return None;
            }
        }
        let (from, head) = loop {
            let found = super::feed::start_offset(
                &*store,
                &self.group,
                self.topic,
                self.partition,
                source.start,
                source.reset,
            )
            .await;
            match found {
                Ok(found) => break found,
                Err(error) => {
                    tracing::error!(topic = %self.topic, group = %self.group, partition = self.partition, %error, "tidings: reading the group's offset from the store failed; retrying");
                    if !self.backoff.wait(&self.worker.core.cancel).await {
                        self.give_up_starting(durable).await;
                        return None;
                    }
                }
            }
        };
        self.stats.next_offset.store(from, Relaxed);
        self.stats
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        self.part.raise_head(head);
        durable.worker_started();
        self.targets.push((head, Target::Start));
        Some(Feed {
            store,
            until: 0,
            rows: VecDeque::new(),
        })
    }

    /// Shutting down before the group could start: it starts next time.
    async fn give_up_starting(&mut self, durable: &Durable) {
        durable.worker_started();
        durable.worker_caught_up();
        self.part
            .give_up_catch_up(self.slot, &self.worker.core.pending);
        self.part.wait_closed(self.slot).await;
    }

    /// Events of the queue (committed while the group was live), in `self.batch`.
    pub(super) async fn queued(&mut self, feed: &Feed) {
        let stats = self.stats;
        let mut unfinished = self.batch.len();
        self.done.reserve(unfinished);
        if let Some(book) = self.worker.ack.book.as_mut() {
            // Effectively-once: the batch's marks in one query.
            let ids = self.batch.iter().map(|item| item.meta().id).collect();
            book.look_ahead(&*feed.store, ids).await;
        }
        while let Some(item) = self.batch.pop_front() {
            if self.stats.reset.load(Relaxed) {
                // A rebuild: the worker resets at this event boundary; the rest of the batch
                // is its to finish.
                self.batch.push_front(item);
                unfinished -= self.batch.len();
                break;
            }
            if self.worker.held {
                // Behind an event left in the log: read again after the next start.
                self.done.push(item);
            } else {
                self.worker
                    .process(item, &mut self.ctx, &mut self.done, stats)
                    .await;
            }
            if self.worker.core.cancel.is_cancelled() {
                // Shutting down: finished one by one, so that a shutdown timeout counts
                // exactly what is left.
                self.worker.core.finish(unfinished - self.batch.len());
                unfinished = self.batch.len();
            }
        }
        if self.worker.held {
            // Nothing more is read or queued for this group in this partition, and no event
            // passed by moves its offset past the held one (a queue that is not lagging would:
            // `skipped_to`), even if the catch-up was given up before.
            self.stop_catching_up();
        }
        if let Some(book) = self.worker.ack.book.as_mut() {
            // The marks go on while more events wait; with none waiting, this batch is
            // finished once its marks are committed (`settled` means marked), or as soon as
            // more events come (they keep the bus from settling, and the wait at their end
            // covers these marks too): the worker does not sit idle for a commit while its
            // queue fills.
            if self.part.has_queued(self.slot) {
                book.sync(false, stats).await;
            } else {
                tokio::select! {
                    biased;
                    _ = book.sync(true, stats) => {}
                    _ = self.part.changed(self.slot) => book.sync(false, stats).await,
                }
            }
        }
        if unfinished > 0 {
            self.worker.core.finish(unfinished);
        }
    }

    /// Reads the log up to `feed.until` (the head when the group fell behind), handing its
    /// events to the worker, until caught up, shut down, or an event is left in the log.
    async fn catch_up(&mut self, feed: &mut Feed, decoder: &Decoder) {
        let stats = self.stats;
        loop {
            if stats.reset.load(Relaxed) {
                // A rebuild: the worker resets at this event boundary.
                return;
            }
            if self.worker.core.cancel.is_cancelled() {
                // Shutting down: what is left in the log waits for the next start.
                if let Some(book) = self.worker.ack.book.as_mut() {
                    book.sync(true, stats).await;
                }
                self.stop_catching_up();
                return;
            }
            let next = stats.next_offset.load(Relaxed);
            let caught = feed
                .next(self.topic, self.partition, next, D::accepts, decoder)
                .await;
            match caught {
                Ok(None) => {
                    if let Some(book) = self.worker.ack.book.as_mut() {
                        book.sync(true, stats).await;
                    }
                    return;
                }
                Ok(Some(Caught::Skip(offset))) => {
                    self.backoff = StoreBackoff::default();
                    advance(stats, offset);
                }
                Ok(Some(Caught::Gap(to))) => {
                    if to > 0 {
                        advance(stats, to - 1);
                    }
                }
                Ok(Some(Caught::Event(item))) => {
                    self.backoff = StoreBackoff::default();
                    self.caught(item, feed).await;
                    if self.worker.held {
                        // Left in the log (retries stopped by shutdown): so is the rest.
                        self.stop_catching_up();
                        return;
                    }
                }
                Ok(Some(Caught::Bad(env, error))) => {
                    if self.worker.dead_letters.holds(self.partition, env.offset())
                        || unreadable(&mut self.worker, &env, error).await
                    {
                        advance(stats, env.offset());
                    }
                }
                Err(error @ crate::store::StoreError::Corrupt(_)) => {
                    // Not an outage: a row without a place in the log (a broken row with a
                    // readable place is a dead letter instead).
                    tracing::error!(topic = %self.topic, group = %self.group, partition = self.partition, %error, "tidings: the log holds data the store cannot place; the partition waits until it is repaired, retrying");
                    self.backoff.wait(&self.worker.core.cancel).await;
                }
                Err(error) => {
                    tracing::error!(topic = %self.topic, group = %self.group, partition = self.partition, %error, "tidings: reading the log failed; retrying");
                    self.backoff.wait(&self.worker.core.cancel).await;
                }
            }
        }
    }

    /// One event read from the log, to the worker.
    async fn caught(&mut self, item: Erased, feed: &Feed) {
        let stats = self.stats;
        let offset = item.meta().offset;
        if self.worker.dead_letters.holds(self.partition, offset) {
            // Dead-lettered before a restart that came before its offset was committed: it
            // waits in the queue already.
            advance(stats, offset);
            return;
        }
        if let Some(book) = self.worker.ack.book.as_mut() {
            if book.knows(item.meta().id).is_none() {
                // Effectively-once: the marks of the page read in one query.
                let ids = std::iter::once(item.meta().id)
                    .chain(feed.rows.iter().map(|r| r.id))
                    .collect();
                book.look_ahead(&*feed.store, ids).await;
            }
        }
        self.worker
            .process(item, &mut self.ctx, &mut self.done, stats)
            .await;
        if let Some(book) = self.worker.ack.book.as_mut() {
            book.sync(false, stats).await;
        }
        self.done.clear();
    }

    /// The group reads the log no more in this run (what is left waits for the next start),
    /// and no longer holds `settled` up.
    fn stop_catching_up(&mut self) {
        self.may_catch_up = false;
        self.part
            .give_up_catch_up(self.slot, &self.worker.core.pending);
    }
}

/// A row of the log that could not be read back: to the dead-letter queue with the error,
/// never to the handler.
async fn unreadable<D: Dispatch>(
    worker: &mut Worker<D, StoreAck>,
    env: &AnyEnvelope,
    error: String,
) -> bool {
    worker.track.reset();
    worker.track.note_failure();
    worker.give_up(env, &HandlerError::permanent(error), 0, false);
    worker.ack.save_dead_letter(env, &worker.dead_letters).await
}

/// Waits between attempts at a store that failed: 100 ms doubling to 5 s.
#[derive(Default)]
pub(super) struct StoreBackoff(u32);

impl StoreBackoff {
    /// Waits; `false` if the bus began shutting down instead.
    pub(super) async fn wait(&mut self, cancel: &tokio_util::sync::CancellationToken) -> bool {
        let delay =
            Duration::from_millis(100 * (1u64 << self.0.min(6))).min(Duration::from_secs(5));
        self.0 += 1;
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = cancel.cancelled() => false,
        }
    }
}
