//! The partition worker: the actor loop that feeds one partition of one group to its handler.
//!
//! [`Worker`] holds what every source shares: the supervised handler, the middleware chain,
//! redelivery, dead-lettering and counting ([`process`](Worker::process)). It is generic over two
//! seams, both type parameters rather than trait objects, so that the in-memory worker compiles to
//! the loop it always was:
//!
//! - [`Source`]: where the events come from, and the loop that takes them — [`MemorySource`]
//!   (the group's partition queue), the durable layer's `LogSource` (the queue, or the store's
//!   log while catching up), later a JetStream consumer;
//! - [`Ack`]: what finishing an event does beyond counting it — nothing ([`NoAck`]), or with a
//!   store saving dead letters and effectively-once marks (the durable layer's `StoreAck`),
//!   later a JetStream ack / nak / term.
//!
//! # Performance
//!
//! The in-memory loop without middleware is written out in [`MemorySource`]'s `run` rather than
//! through [`Worker::process`]: a call to an async fn per event costs its own state machine
//! (measured: ~80 instructions an event, 6 % of the whole p2p path). Counters are bumped with a
//! plain load and store (one writer). `Ack::LOG` is a constant, so the store's steps vanish from
//! the in-memory worker at compile time.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures::FutureExt;
use uuid::Uuid;

use super::dispatch::{panic_message, Dispatch};
use super::subscription::Subscription;
use super::supervise::{bump, Supervised};
use crate::context::Context;
use crate::core::queue::{Topic, WorkerStats};
use crate::core::route::QueueId;
use crate::core::Core;
use crate::dead_letter::{DeadLetterPolicy, DeadLetterQueue, Gate};
use crate::delivery::DeliveryMode;
use crate::envelope::{AnyEnvelope, Erased, Metadata};
use crate::handler::HandlerError;
use crate::middleware::{DynMiddleware, LayerKind, Next, Track};
use crate::publish::{Cause, Failure};

/// What a worker needs to run one partition of one group.
pub(crate) struct WorkerArgs {
    pub(crate) core: Arc<Core>,
    pub(crate) topic: Arc<Topic>,
    pub(crate) slot: usize,
    pub(crate) partition: u32,
    pub(crate) options: Subscription,
    pub(crate) handler_name: &'static str,
    pub(crate) dead_letters: Arc<DeadLetterQueue>,
}

/// What finishing an event does beyond counting it and passing its offset.
pub(crate) trait Ack: Send + 'static {
    /// Whether the bus keeps a log: then a dead letter is saved before the group's offset
    /// passes it, a redriven event's saved dead letter goes once handled, effectively-once
    /// marks are kept, and an event whose retries the shutdown cut short stays in the log.
    const LOG: bool;

    /// Effectively-once: whether the group handled `id` before (a copy, or a redelivery after
    /// a restart). `false` without marks.
    fn marked(&mut self, id: Uuid) -> impl Future<Output = bool> + Send;

    /// After the event at `offset` was handled (or found marked).
    fn handled(
        &mut self,
        id: Uuid,
        offset: u64,
        dead_letters: &DeadLetterQueue,
    ) -> impl Future<Output = ()> + Send;

    /// Saves the dead letter of `env` (if it went to the queue) before the group's offset
    /// passes it; `false` if it could not be saved before the bus stopped.
    fn save_dead_letter(
        &mut self,
        env: &AnyEnvelope,
        dead_letters: &DeadLetterQueue,
    ) -> impl Future<Output = bool> + Send;
}

/// In memory: finishing an event is counting it.
pub(crate) struct NoAck;

impl Ack for NoAck {
    const LOG: bool = false;

    async fn marked(&mut self, _: Uuid) -> bool {
        false
    }

    async fn handled(&mut self, _: Uuid, _: u64, _: &DeadLetterQueue) {}

    async fn save_dead_letter(&mut self, _: &AnyEnvelope, _: &DeadLetterQueue) -> bool {
        true
    }
}

/// Where a worker's events come from, and the loop that takes them and hands them to the
/// worker until the source is closed and drained.
pub(crate) trait Source<D: Dispatch>: Send + 'static {
    /// What finishing an event does with this source.
    type Ack: Ack;

    /// Feeds `worker` until the source is closed and drained.
    fn run(self, worker: Worker<D, Self::Ack>, ctx: Context) -> impl Future<Output = ()> + Send;
}

/// Runs one partition of one group, fed by `source`, until it is closed and drained.
pub(crate) async fn run<D: Dispatch, S: Source<D>>(
    dispatch: D,
    args: WorkerArgs,
    source: S,
    ack: S::Ack,
) {
    let (worker, ctx) = Worker::new(dispatch, args, ack);
    source.run(worker, ctx).await
}

/// The in-memory source: the group's queue of the partition.
pub(crate) struct MemorySource {
    topic: Arc<Topic>,
    slot: usize,
    partition: u32,
    batch_size: usize,
}

impl MemorySource {
    pub(crate) fn new(args: &WorkerArgs) -> Self {
        MemorySource {
            topic: Arc::clone(&args.topic),
            slot: args.slot,
            partition: args.partition,
            batch_size: args.options.batch_size,
        }
    }
}

impl<D: Dispatch> Source<D> for MemorySource {
    type Ack = NoAck;

    async fn run(self, mut worker: Worker<D, NoAck>, mut ctx: Context) {
        let topic = &*self.topic;
        let part = &topic.partitions[self.partition as usize];
        let stats = &topic.worker_stats[self.slot][self.partition as usize];
        let fast = worker.layers.is_empty() && !worker.sequenced;
        let mut batch: VecDeque<Erased> = VecDeque::with_capacity(self.batch_size);
        let mut done: Vec<Erased> = Vec::new();
        while part
            .next_batch(
                self.slot,
                &mut batch,
                &mut done,
                self.batch_size,
                topic.capacity,
            )
            .await
        {
            let n = batch.len();
            done.reserve(n);
            while let Some(item) = batch.pop_front() {
                if !fast {
                    worker.process(item, &mut ctx, &mut done, stats).await;
                    continue;
                }
                // The hot path, written out here rather than through `process`: a call to an
                // async fn per event costs its own state machine (measured: ~80 instructions
                // an event, 6 % of the whole p2p path). No middleware, no parking, no store.
                let meta = item.meta();
                let (id, offset, correlation) = (meta.id, meta.offset, meta.correlation_id);
                ctx.cause = Some(Cause { id, correlation });
                if worker.delivery == DeliveryMode::AtMostOnce {
                    advance(stats, offset);
                }
                let Some(mut typed) = D::wrap(item) else {
                    // Routing guarantees the type; reaching this is a bug in tidings.
                    tracing::error!(group = %worker.end.group, %id, "event of an unexpected type reached a worker");
                    bump(&stats.failed);
                    worker.end.metrics.failed(true);
                    continue;
                };
                match worker.deliver_typed(&mut typed, &ctx).await {
                    Outcome::Handled => worker.handled(id, offset),
                    Outcome::Failed { error, attempts } => {
                        worker.give_up(&D::erase(&typed), &error, attempts, false);
                    }
                }
                advance(stats, offset);
                done.push(D::into_item(typed));
            }
            worker.core.finish(n);
        }
    }
}

/// One partition worker: its handler, its middleware chain and what it needs to finish events.
pub(crate) struct Worker<D, A> {
    pub(crate) end: Supervised<D>,
    /// Outermost first.
    layers: Vec<Box<dyn DynMiddleware>>,
    /// The chain has a `Retry` layer: the worker does not redeliver by itself.
    retries: bool,
    max_deliveries: u32,
    delivery: DeliveryMode,
    pub(crate) track: Track,
    pub(crate) dead_letters: Arc<DeadLetterQueue>,
    pub(crate) core: Arc<Core>,
    /// What finishing an event does beyond counting it.
    pub(crate) ack: A,
    /// With a log: the shutdown cut an event's retries short and it was left in the log for
    /// the next start; the group's offset stays before it, so the worker handles nothing after
    /// it in this partition.
    pub(crate) held: bool,
    /// Dead letters are sequenced (a failed key's later events wait behind it).
    pub(crate) sequenced: bool,
}

/// How one event ended for this group.
pub(crate) enum Outcome {
    Handled,
    Failed { error: HandlerError, attempts: u32 },
}

impl<D: Dispatch, A: Ack> Worker<D, A> {
    /// Delivers `env` (attempt 1) through the chain, redelivering as configured.
    fn max_attempts(&self) -> u32 {
        match self.delivery {
            DeliveryMode::AtMostOnce => 1,
            _ if self.retries => 1,
            _ => self.max_deliveries,
        }
    }

    /// The fast path, with no middleware: delivers the typed envelope, redelivering as
    /// configured.
    async fn deliver_typed(&mut self, env: &mut D::Env, ctx: &Context) -> Outcome {
        let max = self.max_attempts();
        let mut attempt = 1u32;
        loop {
            D::set_attempt(env, attempt);
            let error = match self.end.attempt(env, ctx).await {
                Ok(()) => return Outcome::Handled,
                Err(error) => error,
            };
            if attempt == 1 {
                self.track.reset();
            }
            self.track.note_failure();
            if error.is_permanent() || attempt >= max {
                return Outcome::Failed {
                    error,
                    attempts: attempt,
                };
            }
            self.warn_redelivery(D::meta(env), attempt, &error);
            attempt += 1;
        }
    }

    fn warn_redelivery(&self, meta: &Metadata, attempt: u32, error: &HandlerError) {
        tracing::warn!(topic = %self.end.topic.name, group = %self.end.group, partition = self.end.partition, offset = meta.offset, event_id = %meta.id, correlation_id = %meta.correlation_id, attempt, error = %error, handler = self.end.handler_name, "handler failed; redelivering");
    }

    /// Delivers `env` (attempt 1) through the middleware chain, redelivering as configured.
    async fn deliver(&mut self, env: &AnyEnvelope, ctx: &Context) -> Outcome {
        self.track.reset();
        let max = self.max_attempts();
        let mut attempt = 1u32;
        let mut redelivery: Option<AnyEnvelope> = None;
        loop {
            let result = {
                let current = redelivery.as_ref().unwrap_or(env);
                let mut next = Next {
                    rest: &mut self.layers,
                    end: &mut self.end,
                    ctx,
                    track: &self.track,
                };
                // A panic in a middleware fails the attempt; the handler is not at fault.
                // Made inside the unwind guard: a middleware that panics before returning its
                // future is caught too.
                match AssertUnwindSafe(async { next.run(current).await })
                    .catch_unwind()
                    .await
                {
                    Ok(result) => result,
                    Err(panic) => Err(HandlerError::transient(
                        crate::handler::Panicked::middleware(panic_message(&*panic)),
                    )),
                }
            };
            let error = match result {
                Ok(()) => return Outcome::Handled,
                Err(error) => error,
            };
            self.track.note_failure();
            let attempts = self.track.attempts.load(Relaxed).max(attempt);
            if error.is_permanent() || attempt >= max {
                return Outcome::Failed { error, attempts };
            }
            self.warn_redelivery(env.metadata(), attempt, &error);
            attempt += 1;
            redelivery = Some(AnyEnvelope {
                inner: Arc::clone(&env.inner),
                attempt,
            });
        }
    }

    /// Counts an event handled (and whether a layer acknowledged it as a duplicate).
    #[inline]
    pub(crate) fn handled(&self, id: Uuid, offset: u64) {
        let stats = &self.end.topic.worker_stats[self.end.slot][self.end.partition as usize];
        bump(&stats.handled);
        self.end.metrics.handled();
        if self.track.duplicate.load(Relaxed) {
            bump(&stats.duplicates);
        }
        self.dead_letters.handled(id, offset);
    }

    /// Reports an event this group gave up on: counted, logged, recorded, and dead-lettered
    /// (at-most-once: dropped).
    pub(crate) fn give_up(
        &self,
        env: &AnyEnvelope,
        error: &HandlerError,
        attempts: u32,
        released: bool,
    ) {
        let end = &self.end;
        let stats = &end.topic.worker_stats[end.slot][end.partition as usize];
        bump(&stats.failed);
        end.metrics.failed(error.is_permanent());
        let meta = env.metadata();
        let message = error.to_string();
        self.core.record_failure(|| Failure {
            group: end.group.to_string(),
            envelope: env.clone(),
            error: message.clone(),
            attempts,
        });
        if self.delivery == DeliveryMode::AtMostOnce {
            tracing::error!(topic = %end.topic.name, group = %end.group, partition = end.partition, offset = meta.offset, event_id = %meta.id, correlation_id = %meta.correlation_id, error = %message, handler = end.handler_name, "handler failed; event dropped (at-most-once)");
            return;
        }
        tracing::error!(topic = %end.topic.name, group = %end.group, partition = end.partition, offset = meta.offset, event_id = %meta.id, correlation_id = %meta.correlation_id, attempts, error = %message, permanent = error.is_permanent(), handler = end.handler_name, "handler failed; giving up on the event");
        self.dead_letters.push(
            env.clone(),
            message,
            error.kind(),
            attempts,
            self.track.failure_times(),
            end.handler_name,
            released,
        );
    }

    /// Sequenced dead letters: after a released event succeeded, handles the events parked
    /// behind it, in order, until the key is free or one fails.
    async fn release_followers(&mut self, mut env: AnyEnvelope, ctx: &mut Context) {
        while let Some(next) = self.dead_letters.next_released(&env) {
            // Parked, it was counted failed; released, it is delivered again.
            self.dead_letters.count_delivery(&next);
            let meta = next.metadata();
            ctx.cause = Some(Cause {
                id: meta.id,
                correlation: meta.correlation_id,
            });
            match self.deliver(&next, ctx).await {
                Outcome::Handled => {
                    self.handled(next.id(), next.offset());
                    if A::LOG {
                        self.ack
                            .handled(next.id(), next.offset(), &self.dead_letters)
                            .await;
                    }
                }
                Outcome::Failed { error, attempts } => {
                    // Delivered again, failed again: it goes back to the head of its key.
                    self.give_up(&next, &error, attempts, true);
                    if A::LOG {
                        self.ack.save_dead_letter(&next, &self.dead_letters).await;
                    }
                    return;
                }
            }
            env = next;
        }
    }
}

impl<D: Dispatch, A: Ack> Worker<D, A> {
    /// A worker for one partition of one group, and its handler's context.
    fn new(dispatch: D, args: WorkerArgs, ack: A) -> (Self, Context) {
        let WorkerArgs {
            core,
            topic,
            slot,
            partition,
            options,
            handler_name,
            dead_letters,
        } = args;
        let group: Arc<str> = Arc::from(topic.groups[slot].as_str());
        let metrics = topic.metrics.group(slot).clone();
        let mut ctx = Context::for_core(Arc::clone(&core), Arc::clone(&group));
        ctx.owner = Some(QueueId::of(&topic, slot, partition));
        ctx.source = core.sightings.group(&group);
        let layers: Vec<Box<dyn DynMiddleware>> = options
            .layers
            .iter()
            .rev()
            .map(|layer| (layer.make)())
            .collect();
        let retries = options.layers.iter().any(|l| l.kind == LayerKind::Retry);
        let sequenced = dead_letters.policy == DeadLetterPolicy::Sequenced;
        let worker = Worker {
            end: Supervised {
                dispatch,
                topic,
                slot,
                partition,
                group,
                handler_name,
                restart_backoff: options.restart_backoff,
                consecutive_panics: 0,
                metrics,
            },
            layers,
            retries,
            max_deliveries: options.effective_max_deliveries(),
            delivery: options.delivery,
            track: Track::default(),
            dead_letters,
            core,
            ack,
            held: false,
            sequenced,
        };
        (worker, ctx)
    }
}

impl<D: Dispatch, A: Ack> Worker<D, A> {
    /// Hands one event to the chain and finishes it: counted, dead-lettered if it failed, its
    /// offset passed. Every path but the in-memory fast one (written out in `run`) comes here;
    /// without middleware the chain is just the handler.
    pub(crate) async fn process(
        &mut self,
        item: Erased,
        ctx: &mut Context,
        done: &mut Vec<Erased>,
        stats: &WorkerStats,
    ) {
        let meta = item.meta();
        let (id, offset, correlation) = (meta.id, meta.offset, meta.correlation_id);
        ctx.cause = Some(Cause { id, correlation });
        // With a log: a redriven dead letter ahead of the group's offset (the group reads the
        // log again, after a restart or a rebuild) does not move the offset, or the events
        // before it would never be read. The group may meet it again in the log: handled
        // twice then, never lost.
        let ahead = A::LOG
            && offset >= stats.next_offset.load(Relaxed)
            && self.dead_letters.holds(meta.partition, offset);
        if self.delivery == DeliveryMode::AtMostOnce && !ahead {
            // Acknowledged on receipt.
            advance(stats, offset);
        }
        let env = AnyEnvelope {
            inner: item,
            attempt: 1,
        };
        let mut released = false;
        if self.sequenced {
            match self.dead_letters.gate(&env, self.end.handler_name) {
                Gate::Open => {}
                Gate::Release => released = true,
                Gate::Parked => {
                    bump(&stats.failed);
                    self.end.metrics.parked();
                    if (!A::LOG || self.ack.save_dead_letter(&env, &self.dead_letters).await)
                        && !ahead
                    {
                        advance(stats, offset);
                    }
                    done.push(env.inner);
                    return;
                }
            }
        }
        if A::LOG && self.ack.marked(id).await {
            // Effectively-once: handled before (a copy published again, or a redelivery after
            // a restart); acknowledged without handling, as a success.
            bump(&stats.handled);
            bump(&stats.duplicates);
            self.end.metrics.handled();
            self.dead_letters.handled(id, offset);
            self.ack.handled(id, offset, &self.dead_letters).await;
            if released {
                self.release_followers(env.clone(), ctx).await;
            }
            if !ahead {
                advance(stats, offset);
            }
            done.push(env.inner);
            return;
        }
        match self.deliver(&env, ctx).await {
            Outcome::Handled => {
                self.handled(id, offset);
                if A::LOG {
                    self.ack.handled(id, offset, &self.dead_letters).await;
                }
                if released {
                    self.release_followers(env.clone(), ctx).await;
                }
            }
            Outcome::Failed { error, attempts } => {
                if self.leaves_in_log(&env, stats) {
                    // Its offset is not passed: the event is read again after the restart.
                    self.held = true;
                    tracing::info!(topic = %self.end.topic.name, group = %self.end.group, partition = self.end.partition, offset, event_id = %id, error = %error, "tidings: retries stopped by shutdown; the event stays in the log and is handled after the next start");
                    done.push(env.inner);
                    return;
                }
                self.give_up(&env, &error, attempts, released);
                if A::LOG && !self.ack.save_dead_letter(&env, &self.dead_letters).await {
                    // Not saved (the bus stopped): its offset is not passed.
                    done.push(env.inner);
                    return;
                }
            }
        }
        if !ahead {
            advance(stats, offset);
        }
        done.push(env.inner);
    }

    /// With a log: whether a failed event is left in the log instead of dead-lettered. So it
    /// is when the shutdown cut its retries short (the log is the buffer: it is handled after
    /// the restart), unless it is acknowledged on receipt (at-most-once) or is a dead letter
    /// already (a redrive, whose entry stays saved), or the group's offset passed it already.
    fn leaves_in_log(&self, env: &AnyEnvelope, stats: &WorkerStats) -> bool {
        A::LOG
            && self.track.interrupted.load(Relaxed)
            && self.delivery != DeliveryMode::AtMostOnce
            && env.offset() >= stats.next_offset.load(Relaxed)
            && !self.dead_letters.holds(env.partition(), env.offset())
    }
}

/// Commits `offset` as finished (redriven events may be older: the mark never goes back).
pub(crate) fn advance(stats: &WorkerStats, offset: u64) {
    if stats.next_offset.load(Relaxed) <= offset {
        // Release: a committer that reads the new offset sees an effectively-once hold set
        // before it (see `bus::marks`).
        stats
            .next_offset
            .store(offset + 1, std::sync::atomic::Ordering::Release);
    }
}
