//! The partition worker: the actor loop that feeds one partition of one group to its handler,
//! and supervises it.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tracing::Instrument;

use futures::future::BoxFuture;
use uuid::Uuid;

use crate::bus::durable::{Caught, Feed};
use crate::bus::{
    Bus, CommandMessage, CommandRequest, Failure, QueueId, RestartBackoff, Subscription,
};
use crate::command::{Command, CommandHandler};
use crate::context::{Cause, Context};
use crate::dead_letter::{DeadLetterPolicy, DeadLetterQueue, Gate};
use crate::delivery::DeliveryMode;
use crate::envelope::Metadata;
use crate::envelope::{downcast, AnyEnvelope, Envelope, Erased};
use crate::error::RequestError;
use crate::event::Event;
use crate::handler::HandlerResult;
use crate::handler::{AnyHandler, Handler, HandlerError};
use crate::middleware::{DynMiddleware, Endpoint, LayerKind, Next, Track};
use crate::topic::{NextDurable, Topic};

pub(crate) type Factory<H> = Arc<dyn Fn() -> H + Send + Sync>;

/// How a worker turns a queued event into a handler call.
pub(crate) trait Dispatch: Send + 'static {
    type Env: Send + Sync + 'static;
    fn wrap(item: Erased) -> Option<Self::Env>;
    fn set_attempt(env: &mut Self::Env, attempt: u32);
    /// The envelope, type-erased again (to report a failure).
    fn erase(env: &Self::Env) -> AnyEnvelope;
    /// The envelope back as a queue item (to hand it to the graveyard).
    fn into_item(env: Self::Env) -> Erased;
    /// The typed envelope of an erased one (for the end of a middleware chain).
    fn from_any(env: &AnyEnvelope) -> Option<Self::Env>;
    fn attempt(env: &Self::Env) -> u32;
    fn meta(env: &Self::Env) -> &Metadata;
    fn call<'a>(
        &'a mut self,
        env: &'a Self::Env,
        ctx: &'a Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;
    /// Replaces the handler with a fresh one from the factory.
    fn restart(&mut self) -> bool;
    /// Whether a stored event of this type name is for this subscription.
    fn accepts(name: &str) -> bool;
}

pub(crate) struct Typed<E, H> {
    handler: H,
    factory: Factory<H>,
    _event: PhantomData<fn() -> E>,
}

impl<E, H> Typed<E, H> {
    pub(crate) fn new(factory: Factory<H>) -> Self {
        Typed {
            handler: factory(),
            factory,
            _event: PhantomData,
        }
    }
}

fn fresh<H>(factory: &Factory<H>) -> Option<H> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| factory())) {
        Ok(h) => Some(h),
        Err(panic) => {
            tracing::error!(
                panic = %panic_message(&*panic),
                "handler factory panicked; keeping the previous handler instance"
            );
            None
        }
    }
}

impl<E: Event, H: Handler<E>> Dispatch for Typed<E, H> {
    type Env = Envelope<E>;

    fn wrap(item: Erased) -> Option<Envelope<E>> {
        downcast::<E>(item).map(|inner| Envelope { inner, attempt: 1 })
    }

    fn set_attempt(env: &mut Envelope<E>, attempt: u32) {
        env.attempt = attempt;
    }

    fn erase(env: &Envelope<E>) -> AnyEnvelope {
        env.clone().into()
    }

    fn into_item(env: Envelope<E>) -> Erased {
        env.inner
    }

    fn from_any(env: &AnyEnvelope) -> Option<Envelope<E>> {
        env.downcast::<E>()
    }

    fn attempt(env: &Envelope<E>) -> u32 {
        env.attempt
    }

    fn meta(env: &Envelope<E>) -> &Metadata {
        env.metadata()
    }

    fn call<'a>(
        &'a mut self,
        env: &'a Envelope<E>,
        ctx: &'a Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a {
        self.handler.handle(env, ctx)
    }

    fn accepts(name: &str) -> bool {
        name == E::NAME
    }

    fn restart(&mut self) -> bool {
        fresh(&self.factory)
            .map(|h| replace_handler(&mut self.handler, h))
            .is_some()
    }
}

pub(crate) struct Untyped<H> {
    handler: H,
    factory: Factory<H>,
}

impl<H> Untyped<H> {
    pub(crate) fn new(factory: Factory<H>) -> Self {
        Untyped {
            handler: factory(),
            factory,
        }
    }
}

impl<H: AnyHandler> Dispatch for Untyped<H> {
    type Env = AnyEnvelope;

    fn wrap(item: Erased) -> Option<AnyEnvelope> {
        Some(AnyEnvelope {
            inner: item,
            attempt: 1,
        })
    }

    fn set_attempt(env: &mut AnyEnvelope, attempt: u32) {
        env.attempt = attempt;
    }

    fn erase(env: &AnyEnvelope) -> AnyEnvelope {
        env.clone()
    }

    fn into_item(env: AnyEnvelope) -> Erased {
        env.inner
    }

    fn from_any(env: &AnyEnvelope) -> Option<AnyEnvelope> {
        Some(env.clone())
    }

    fn attempt(env: &AnyEnvelope) -> u32 {
        env.attempt
    }

    fn meta(env: &AnyEnvelope) -> &Metadata {
        env.metadata()
    }

    fn call<'a>(
        &'a mut self,
        env: &'a AnyEnvelope,
        ctx: &'a Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a {
        self.handler.handle(env, ctx)
    }

    fn accepts(_: &str) -> bool {
        true
    }

    fn restart(&mut self) -> bool {
        fresh(&self.factory)
            .map(|h| replace_handler(&mut self.handler, h))
            .is_some()
    }
}

pub(crate) struct WorkerArgs {
    pub(crate) bus: Bus,
    pub(crate) topic: Arc<Topic>,
    pub(crate) slot: usize,
    pub(crate) partition: u32,
    pub(crate) options: Subscription,
    pub(crate) handler_name: &'static str,
    pub(crate) dead_letters: Arc<DeadLetterQueue>,
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Adds one to a counter that only this worker writes: a plain load and store, no locked
/// read-modify-write on the hot path.
fn bump(counter: &std::sync::atomic::AtomicU64) {
    counter.store(counter.load(Relaxed) + 1, Relaxed);
}

/// The handler under supervision: one attempt at a time, panics caught and the handler
/// restarted. The end of every middleware chain.
struct Supervised<D> {
    dispatch: D,
    topic: Arc<Topic>,
    slot: usize,
    partition: u32,
    group: Arc<str>,
    handler_name: &'static str,
    restart_backoff: RestartBackoff,
    consecutive_panics: u32,
}

impl<D: Dispatch> Supervised<D> {
    /// Swaps in a fresh handler, then waits the restart backoff (so that a handler that keeps
    /// panicking does not spin). The swap comes first: should an outer timeout cut the wait
    /// short, the next event still meets a fresh handler.
    async fn restart(&mut self) {
        if self.dispatch.restart() {
            let stats = &self.topic.worker_stats[self.slot][self.partition as usize];
            bump(&stats.restarts);
        }
        tokio::time::sleep(self.restart_backoff.delay(self.consecutive_panics)).await;
    }

    /// One attempt: the handler's result, or its panic as a transient error (after the
    /// restart backoff and a fresh handler).
    async fn attempt(&mut self, env: &D::Env, ctx: &Context) -> HandlerResult {
        let attempt = D::attempt(env);
        let meta = D::meta(env);
        let span = tracing::info_span!(
            "tidings.handle",
            topic = %self.topic.name,
            partition = self.partition,
            offset = meta.offset,
            group = %self.group,
            event_id = %meta.id,
            correlation_id = %meta.correlation_id,
            attempt,
        );
        let dispatch = &mut self.dispatch;
        // The handler's future is made inside the unwind guard: a handler that panics before
        // returning its future is caught too.
        let call = AssertUnwindSafe(async { dispatch.call(env, ctx).await }).catch_unwind();
        // A disabled span (no subscriber interested) costs nothing to skip.
        let outcome = if span.is_disabled() {
            call.await
        } else {
            call.instrument(span.clone()).await
        };
        match outcome {
            Ok(Ok(())) => {
                self.consecutive_panics = 0;
                Ok(())
            }
            Ok(Err(err)) => Err(err),
            Err(panic) => {
                let message = panic_message(&*panic);
                let stats = &self.topic.worker_stats[self.slot][self.partition as usize];
                bump(&stats.panics);
                self.consecutive_panics += 1;
                {
                    let _enter = span.enter();
                    tracing::error!(topic = %self.topic.name, group = %self.group, partition = self.partition, offset = meta.offset, event_id = %meta.id, correlation_id = %meta.correlation_id, attempt, panic = %message, handler = self.handler_name, "handler panicked; restarting it");
                }
                // Boxed: the backoff timer's state stays out of the common path's future.
                Box::pin(self.restart()).await;
                Err(crate::handler::Panicked::handler(message).into())
            }
        }
    }
}

impl<D: Dispatch> Endpoint for Supervised<D> {
    fn call<'a>(
        &'a mut self,
        env: &'a AnyEnvelope,
        ctx: &'a Context,
    ) -> BoxFuture<'a, HandlerResult> {
        Box::pin(async move {
            match D::from_any(env) {
                Some(typed) => self.attempt(&typed, ctx).await,
                // Routing guarantees the type; reaching this is a bug in tidings.
                None => Err(HandlerError::permanent(
                    "event of an unexpected type reached a worker",
                )),
            }
        })
    }
}

/// One partition worker: its handler, its middleware chain and what it needs to finish events.
struct Worker<D> {
    end: Supervised<D>,
    /// Outermost first.
    layers: Vec<Box<dyn DynMiddleware>>,
    /// The chain has a `Retry` layer: the worker does not redeliver by itself.
    retries: bool,
    max_deliveries: u32,
    delivery: DeliveryMode,
    track: Track,
    dead_letters: Arc<DeadLetterQueue>,
    bus: Bus,
    /// With a store: the store (dead letters are saved in it), and whether this group marks
    /// events handled in it with their offset (effectively-once).
    store: Option<Arc<dyn crate::store::Store>>,
    marks: bool,
    /// With a store: the shutdown cut an event's retries short and it was left in the log for
    /// the next start; the group's offset stays before it, so the worker handles nothing after
    /// it in this partition.
    held: bool,
    /// Effectively-once with a store: the marks waiting for their shared commit.
    book: Option<Box<crate::bus::marks::MarkBook>>,
}

/// How one event ended for this group.
enum Outcome {
    Handled,
    Failed { error: HandlerError, attempts: u32 },
}

impl<D: Dispatch> Worker<D> {
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
    fn handled(&self, id: Uuid, offset: u64) {
        let stats = &self.end.topic.worker_stats[self.end.slot][self.end.partition as usize];
        bump(&stats.handled);
        if self.track.duplicate.load(Relaxed) {
            bump(&stats.duplicates);
        }
        self.dead_letters.handled(id, offset);
    }

    /// Reports an event this group gave up on: counted, logged, recorded, and dead-lettered
    /// (at-most-once: dropped).
    fn give_up(&self, env: &AnyEnvelope, error: HandlerError, attempts: u32, released: bool) {
        let end = &self.end;
        let stats = &end.topic.worker_stats[end.slot][end.partition as usize];
        bump(&stats.failed);
        let meta = env.metadata();
        let message = error.to_string();
        self.bus.inner.record_failure(|| Failure {
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
                    if self.store.is_some() {
                        self.after_handled(next.id(), next.offset()).await;
                    }
                }
                Outcome::Failed { error, attempts } => {
                    // Delivered again, failed again: it goes back to the head of its key.
                    self.give_up(&next, error, attempts, true);
                    if self.store.is_some() {
                        self.save_dead_letter(&next).await;
                    }
                    return;
                }
            }
            env = next;
        }
    }
}

/// Runs one partition of one group until the partition is closed and drained.
pub(crate) async fn run<D: Dispatch>(dispatch: D, args: WorkerArgs) {
    let WorkerArgs {
        bus,
        topic,
        slot,
        partition,
        options,
        handler_name,
        dead_letters,
    } = args;
    let part = &topic.partitions[partition as usize];
    let group: Arc<str> = Arc::from(topic.groups[slot].as_str());
    let mut ctx = Context::for_bus(bus.clone(), Arc::clone(&group), bus.inner.cancel.clone());
    ctx.owner = Some(QueueId::of(&topic, slot, partition));
    let layers: Vec<Box<dyn DynMiddleware>> = options
        .layers
        .iter()
        .rev()
        .map(|layer| (layer.make)())
        .collect();
    let retries = options.layers.iter().any(|l| l.kind == LayerKind::Retry);
    let sequenced = dead_letters.policy == DeadLetterPolicy::Sequenced;
    let mut worker = Worker {
        end: Supervised {
            dispatch,
            topic: Arc::clone(&topic),
            slot,
            partition,
            group: Arc::clone(&group),
            handler_name,
            restart_backoff: options.restart_backoff,
            consecutive_panics: 0,
        },
        layers,
        retries,
        max_deliveries: options.effective_max_deliveries(),
        delivery: options.delivery,
        track: Track::default(),
        dead_letters,
        bus: bus.clone(),
        store: bus.inner.durable.as_ref().map(|d| Arc::clone(&d.store)),
        marks: bus.inner.durable.is_some() && options.delivery == DeliveryMode::EffectivelyOnce,
        held: false,
        book: match &bus.inner.durable {
            Some(d) if options.delivery == DeliveryMode::EffectivelyOnce => {
                Some(Box::new(d.marks.book(&group, &topic.name, partition)))
            }
            _ => None,
        },
    };
    let stats = &topic.worker_stats[slot][partition as usize];
    let fast = worker.layers.is_empty() && !sequenced;
    let mut batch: VecDeque<Erased> = VecDeque::with_capacity(options.batch_size);
    let mut done: Vec<Erased> = Vec::new();

    let Some(durable) = bus.inner.durable.as_ref() else {
        while part
            .next_batch(
                slot,
                &mut batch,
                &mut done,
                options.batch_size,
                topic.capacity,
            )
            .await
        {
            let n = batch.len();
            done.reserve(n);
            while let Some(item) = batch.pop_front() {
                if !fast {
                    worker
                        .process(item, &mut ctx, sequenced, &mut done, stats)
                        .await;
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
                    tracing::error!(group = %group, %id, "event of an unexpected type reached a worker");
                    bump(&stats.failed);
                    continue;
                };
                match worker.deliver_typed(&mut typed, &ctx).await {
                    Outcome::Handled => worker.handled(id, offset),
                    Outcome::Failed { error, attempts } => {
                        worker.give_up(&D::erase(&typed), error, attempts, false);
                    }
                }
                advance(stats, offset);
                done.push(D::into_item(typed));
            }
            bus.inner.finish(n);
        }
        return;
    };

    // With a store: start from the committed offset, catch up from the log, then take events
    // from the queue as they commit; read the log again whenever the queue missed some.
    let store = Arc::clone(&durable.store);
    let mut backoff = StoreBackoff::default();
    // The group's dead letters come back first (its first worker reads them), so that a
    // sequenced key parked before the restart stays parked.
    let dlq = Arc::clone(&worker.dead_letters);
    loop {
        let restored = dlq.ensure_restored(&*store, &durable.decoder).await;
        match restored {
            Ok(_) => break,
            Err(error) => {
                tracing::error!(group = %group, %error, "tidings: reading the group's dead letters from the store failed; retrying");
                if !backoff.wait(&bus.inner.cancel).await {
                    durable.worker_started();
                    part.give_up_catch_up(slot, &bus.inner);
                    part.wait_closed(slot).await;
                    return;
                }
            }
        }
    }
    let (from, head) = loop {
        match crate::bus::durable::start_offset(
            &*store,
            &group,
            &topic.name,
            partition,
            options.start,
            options.reset,
        )
        .await
        {
            Ok(found) => break found,
            Err(error) => {
                tracing::error!(topic = %topic.name, group = %group, partition, %error, "tidings: reading the group's offset from the store failed; retrying");
                if !backoff.wait(&bus.inner.cancel).await {
                    // Shutting down before the group could start: it starts next time.
                    durable.worker_started();
                    part.give_up_catch_up(slot, &bus.inner);
                    part.wait_closed(slot).await;
                    return;
                }
            }
        }
    };
    stats.next_offset.store(from, Relaxed);
    stats
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    part.raise_head(head);
    durable.worker_started();
    let mut feed = Feed {
        store,
        until: 0,
        rows: VecDeque::new(),
    };
    let mut may_catch_up = true;
    loop {
        match part
            .next_durable(
                slot,
                &mut batch,
                &mut done,
                options.batch_size,
                stats,
                may_catch_up,
                &bus.inner,
            )
            .await
        {
            NextDurable::Closed => {
                if let Some(book) = worker.book.as_mut() {
                    book.sync(true, stats).await;
                }
                break;
            }
            NextDurable::Batch => {
                let mut unfinished = batch.len();
                done.reserve(unfinished);
                if let Some(book) = worker.book.as_mut() {
                    // Effectively-once: the batch's marks in one query.
                    let ids = batch.iter().map(|item| item.meta().id).collect();
                    book.look_ahead(&*feed.store, ids).await;
                }
                while let Some(item) = batch.pop_front() {
                    if worker.held {
                        // Behind an event left in the log: read again after the next start.
                        done.push(item);
                    } else {
                        worker
                            .process(item, &mut ctx, sequenced, &mut done, stats)
                            .await;
                    }
                    if bus.inner.cancel.is_cancelled() {
                        // Shutting down: finished one by one, so that a shutdown timeout
                        // counts exactly what is left.
                        bus.inner.finish(unfinished - batch.len());
                        unfinished = batch.len();
                    }
                }
                if worker.held {
                    // Nothing more is read or queued for this group in this partition, and no
                    // event passed by moves its offset past the held one (a queue that is not
                    // lagging would: `skipped_to`), even if the catch-up was given up before.
                    may_catch_up = false;
                    part.give_up_catch_up(slot, &bus.inner);
                }
                if let Some(book) = worker.book.as_mut() {
                    // The marks go on while more events wait; with none waiting, this batch
                    // is finished once its marks are committed (`settled` means marked), or
                    // as soon as more events come (they keep the bus from settling, and the
                    // wait at their end covers these marks too): the worker does not sit
                    // idle for a commit while its queue fills.
                    if part.has_queued(slot) {
                        book.sync(false, stats).await;
                    } else {
                        tokio::select! {
                            biased;
                            _ = book.sync(true, stats) => {}
                            _ = part.changed(slot) => book.sync(false, stats).await,
                        }
                    }
                }
                if unfinished > 0 {
                    bus.inner.finish(unfinished);
                }
            }
            NextDurable::CatchUp(until) => {
                feed.until = until;
                loop {
                    if bus.inner.cancel.is_cancelled() {
                        // Shutting down: what is left in the log waits for the next start.
                        if let Some(book) = worker.book.as_mut() {
                            book.sync(true, stats).await;
                        }
                        may_catch_up = false;
                        part.give_up_catch_up(slot, &bus.inner);
                        break;
                    }
                    let next = stats.next_offset.load(Relaxed);
                    let caught = feed
                        .next(&topic.name, partition, next, D::accepts, &durable.decoder)
                        .await;
                    match caught {
                        Ok(None) => {
                            if let Some(book) = worker.book.as_mut() {
                                book.sync(true, stats).await;
                            }
                            break;
                        }
                        Ok(Some(Caught::Skip(offset))) => {
                            backoff = StoreBackoff::default();
                            advance(stats, offset);
                        }
                        Ok(Some(Caught::Gap(to))) => {
                            if to > 0 {
                                advance(stats, to - 1);
                            }
                        }
                        Ok(Some(Caught::Event(item))) => {
                            backoff = StoreBackoff::default();
                            let offset = item.meta().offset;
                            if worker.dead_letters.holds(partition, offset) {
                                // Dead-lettered before a restart that came before its offset
                                // was committed: it waits in the queue already.
                                advance(stats, offset);
                                continue;
                            }
                            if let Some(book) = worker.book.as_mut() {
                                if book.knows(item.meta().id).is_none() {
                                    // Effectively-once: the marks of the page read in one query.
                                    let ids = std::iter::once(item.meta().id)
                                        .chain(feed.rows.iter().map(|r| r.id))
                                        .collect();
                                    book.look_ahead(&*feed.store, ids).await;
                                }
                            }
                            worker
                                .process(item, &mut ctx, sequenced, &mut done, stats)
                                .await;
                            if let Some(book) = worker.book.as_mut() {
                                book.sync(false, stats).await;
                            }
                            done.clear();
                            if worker.held {
                                // Left in the log (retries stopped by shutdown): so is the rest.
                                may_catch_up = false;
                                part.give_up_catch_up(slot, &bus.inner);
                                break;
                            }
                        }
                        Ok(Some(Caught::Bad(env, error))) => {
                            if worker.dead_letters.holds(partition, env.offset())
                                || worker.unreadable(&env, error).await
                            {
                                advance(stats, env.offset());
                            }
                        }
                        Err(error @ crate::store::StoreError::Corrupt(_)) => {
                            // Not an outage: a row without a place in the log (a broken row
                            // with a readable place is a dead letter instead).
                            tracing::error!(topic = %topic.name, group = %group, partition, %error, "tidings: the log holds data the store cannot place; the partition waits until it is repaired, retrying");
                            backoff.wait(&bus.inner.cancel).await;
                        }
                        Err(error) => {
                            tracing::error!(topic = %topic.name, group = %group, partition, %error, "tidings: reading the log failed; retrying");
                            backoff.wait(&bus.inner.cancel).await;
                        }
                    }
                }
            }
        }
    }
}

/// Waits between attempts at a store that failed: 100 ms doubling to 5 s.
#[derive(Default)]
struct StoreBackoff(u32);

impl StoreBackoff {
    /// Waits; `false` if the bus began shutting down instead.
    async fn wait(&mut self, cancel: &tokio_util::sync::CancellationToken) -> bool {
        let delay =
            Duration::from_millis(100 * (1u64 << self.0.min(6))).min(Duration::from_secs(5));
        self.0 += 1;
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = cancel.cancelled() => false,
        }
    }
}

impl<D: Dispatch> Worker<D> {
    /// Hands one event to the chain and finishes it: counted, dead-lettered if it failed, its
    /// offset passed. Every path but the in-memory fast one (written out in `run`) comes here;
    /// without middleware the chain is just the handler.
    async fn process(
        &mut self,
        item: Erased,
        ctx: &mut Context,
        sequenced: bool,
        done: &mut Vec<Erased>,
        stats: &crate::topic::WorkerStats,
    ) {
        let meta = item.meta();
        let (id, offset, correlation) = (meta.id, meta.offset, meta.correlation_id);
        ctx.cause = Some(Cause { id, correlation });
        if self.delivery == DeliveryMode::AtMostOnce {
            // Acknowledged on receipt.
            advance(stats, offset);
        }
        let env = AnyEnvelope {
            inner: item,
            attempt: 1,
        };
        let mut released = false;
        if sequenced {
            match self.dead_letters.gate(&env, self.end.handler_name) {
                Gate::Open => {}
                Gate::Release => released = true,
                Gate::Parked => {
                    bump(&stats.failed);
                    if self.store.is_none() || self.save_dead_letter(&env).await {
                        advance(stats, offset);
                    }
                    done.push(env.inner);
                    return;
                }
            }
        }
        if self.marks && self.marked(id).await {
            // Effectively-once: handled before (a copy published again, or a redelivery after
            // a restart); acknowledged without handling, as a success.
            bump(&stats.handled);
            bump(&stats.duplicates);
            self.dead_letters.handled(id, offset);
            self.after_handled(id, offset).await;
            if released {
                self.release_followers(env.clone(), ctx).await;
            }
            advance(stats, offset);
            done.push(env.inner);
            return;
        }
        match self.deliver(&env, ctx).await {
            Outcome::Handled => {
                self.handled(id, offset);
                if self.store.is_some() {
                    self.after_handled(id, offset).await;
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
                self.give_up(&env, error, attempts, released);
                if self.store.is_some() && !self.save_dead_letter(&env).await {
                    // Not saved (the bus stopped): its offset is not passed.
                    done.push(env.inner);
                    return;
                }
            }
        }
        advance(stats, offset);
        done.push(env.inner);
    }

    /// With a store: whether a failed event is left in the log instead of dead-lettered. So it
    /// is when the shutdown cut its retries short (the log is the buffer: it is handled after
    /// the restart), unless it is acknowledged on receipt (at-most-once) or is a dead letter
    /// already (a redrive, whose entry stays saved), or the group's offset passed it already.
    fn leaves_in_log(&self, env: &AnyEnvelope, stats: &crate::topic::WorkerStats) -> bool {
        self.store.is_some()
            && self.track.interrupted.load(Relaxed)
            && self.delivery != DeliveryMode::AtMostOnce
            && env.offset() >= stats.next_offset.load(Relaxed)
            && !self.dead_letters.holds(env.partition(), env.offset())
    }

    /// With a store, after an event was handled: its dead letter's row goes (a redriven
    /// event), and with effectively-once its mark and offset are committed.
    async fn after_handled(&mut self, id: Uuid, offset: u64) {
        let stats = &self.end.topic.worker_stats[self.end.slot][self.end.partition as usize];
        if let Some(book) = self.book.as_mut() {
            // Effectively-once: the mark waits for the next shared commit.
            book.note(id, offset, stats);
        }
        if self.dead_letters.take_stored(self.end.partition, offset) {
            if let Some(book) = self.book.as_mut() {
                // A redriven event: its mark is durable before its dead letter's row goes.
                book.sync(true, stats).await;
            }
            let store = self.store.as_ref().expect("a store");
            let mut backoff = StoreBackoff::default();
            while let Err(error) = store
                .delete_dead_letter(
                    &self.end.group,
                    &self.end.topic.name,
                    self.end.partition,
                    offset,
                )
                .await
            {
                tracing::error!(group = %self.end.group, offset, %error, "tidings: deleting a handled dead letter from the store failed; retrying");
                if !backoff.wait(self.stopped()).await {
                    break;
                }
            }
        }
    }

    /// Effectively-once: whether the group marked `id` handled (its mark pending in a commit,
    /// or durable).
    async fn marked(&mut self, id: Uuid) -> bool {
        if let Some(known) = self.book.as_ref().and_then(|book| book.knows(id)) {
            return known;
        }
        let store = self.store.as_ref().expect("a store");
        let mut backoff = StoreBackoff::default();
        loop {
            match store.is_marked(&self.end.group, id).await {
                Ok(marked) => return marked,
                Err(error) => {
                    tracing::error!(group = %self.end.group, %id, %error, "tidings: reading a mark from the store failed; retrying");
                    if !backoff.wait(self.stopped()).await {
                        // Shutting down: handle it (at-least-once rather than lost).
                        return false;
                    }
                }
            }
        }
    }

    /// With a store: saves the dead letter of `env` (if it went to the queue), before the
    /// group's offset passes it.
    /// Returns `false` if it could not be saved before the bus stopped.
    async fn save_dead_letter(&mut self, env: &AnyEnvelope) -> bool {
        let Some(letter) = self.dead_letters.entry_for(env.id(), env.offset()) else {
            return true; // At-most-once: dropped, not dead-lettered.
        };
        let event = match crate::store::stored_event_of(&letter.envelope) {
            Ok(event) => event,
            Err(error) => {
                tracing::error!(group = %self.end.group, id = %env.id(), %error, "tidings: a dead letter could not be serialized; it stays in memory only");
                return true;
            }
        };
        let record = crate::store::DeadLetterRecord {
            group: self.end.group.to_string(),
            event,
            error: letter.error.clone(),
            permanent: letter.kind == crate::handler::ErrorKind::Permanent,
            attempts: letter.attempts,
            first_failure: letter.first_failure,
            last_failure: letter.last_failure,
            handler: letter.handler.to_owned(),
            redeliveries: letter.redeliveries,
        };
        let store = self.store.as_ref().expect("a store");
        let mut backoff = StoreBackoff::default();
        loop {
            match store.save_dead_letter(&record).await {
                Ok(()) => {
                    self.dead_letters.note_stored(env.partition(), env.offset());
                    return true;
                }
                Err(error) => {
                    tracing::error!(group = %self.end.group, id = %env.id(), %error, "tidings: saving a dead letter failed; retrying");
                    if !backoff.wait(self.stopped()).await {
                        return false;
                    }
                }
            }
        }
    }

    /// With a store: cancelled once the bus stopped for good (after its drain), which is when
    /// retries of the store's writes give up. (Not the shutdown signal: the drain needs them.)
    fn stopped(&self) -> &tokio_util::sync::CancellationToken {
        match &self.bus.inner.durable {
            Some(d) => &d.stop,
            None => &self.bus.inner.cancel,
        }
    }

    /// A row of the log that could not be read back: to the dead-letter queue with the error,
    /// never to the handler.
    async fn unreadable(&mut self, env: &AnyEnvelope, error: String) -> bool {
        self.track.reset();
        self.track.note_failure();
        self.give_up(env, HandlerError::permanent(error), 0, false);
        self.save_dead_letter(env).await
    }
}

/// Commits `offset` as finished (redriven events may be older: the mark never goes back).
fn advance(stats: &crate::topic::WorkerStats, offset: u64) {
    if stats.next_offset.load(Relaxed) <= offset {
        // Release: a committer that reads the new offset sees an effectively-once hold set
        // before it (see `bus::marks`).
        stats
            .next_offset
            .store(offset + 1, std::sync::atomic::Ordering::Release);
    }
}

impl RestartBackoff {
    pub(crate) fn delay(&self, consecutive: u32) -> std::time::Duration {
        let factor = 1u32 << consecutive.saturating_sub(1).min(16);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Keeps the deadlines of a command handler's requests while the handler is busy.
///
/// One timer, re-armed lazily: it stays at an earlier deadline until it fires, and only then
/// moves to the earliest deadline still open. Requests of one bus mostly share one timeout, so
/// their deadlines arrive in order, and a stream of quick round trips re-arms it about once per
/// timeout period instead of once per request.
struct Deadlines<C: Command> {
    name: &'static str,
    requests: tokio::sync::mpsc::Receiver<CommandMessage<C>>,
    /// Requests taken off the channel while the handler was busy, so their deadlines are kept.
    /// Bounded by the deadlines: expired ones are answered and dropped.
    backlog: VecDeque<CommandRequest<C>>,
    timer: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    /// Shutdown asked the task to stop once the backlog is done.
    stopping: bool,
    bus: Bus,
}

/// The request being handled: its reply (until answered) and deadline.
struct Current<R> {
    reply: Option<tokio::sync::oneshot::Sender<Result<R, RequestError>>>,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl<C: Command> Deadlines<C> {
    fn arm(&mut self, deadline: tokio::time::Instant) {
        if !self.armed || deadline < self.timer.deadline() {
            self.timer.as_mut().reset(deadline);
            self.armed = true;
        }
    }

    fn timed_out(&self, timeout: Duration) -> RequestError {
        RequestError::Timeout {
            command: self.name,
            timeout,
        }
    }

    /// The next request to handle, or `None` when the task should stop.
    async fn next(&mut self) -> Option<CommandRequest<C>> {
        if let Some(request) = self.backlog.pop_front() {
            return Some(request);
        }
        if self.stopping {
            return None;
        }
        match self.requests.recv().await {
            Some(Some(request)) => Some(request),
            // Shutdown drained every request and asks the task to stop.
            Some(None) | None => None,
        }
    }

    /// Drives `work` to completion while answering `Timeout` to the current request (if any)
    /// and to queued requests whose deadlines pass meanwhile.
    async fn drive<F: Future>(
        &mut self,
        work: F,
        mut current: Option<&mut Current<C::Reply>>,
    ) -> F::Output {
        if let Some(current) = current.as_deref() {
            self.arm(current.deadline);
        }
        tokio::pin!(work);
        // Most handlers answer without waiting: skip the select machinery then.
        if let std::task::Poll::Ready(output) = futures::poll!(work.as_mut()) {
            return output;
        }
        loop {
            tokio::select! {
                biased;
                output = &mut work => return output,
                () = self.timer.as_mut(), if self.armed => {
                    self.armed = false;
                    let now = tokio::time::Instant::now();
                    let mut next: Option<tokio::time::Instant> = None;
                    if let Some(current) = current.as_deref_mut() {
                        if current.reply.is_some() {
                            if now >= current.deadline {
                                let err = self.timed_out(current.timeout);
                                if let Some(reply) = current.reply.take() {
                                    let _ = reply.send(Err(err));
                                }
                            } else {
                                next = Some(current.deadline);
                            }
                        }
                    }
                    let mut kept = VecDeque::with_capacity(self.backlog.len());
                    for queued in std::mem::take(&mut self.backlog) {
                        if now >= queued.deadline {
                            let _ = queued.reply.send(Err(self.timed_out(queued.timeout)));
                            self.bus.inner.finish_requests(1);
                        } else {
                            next = Some(next.map_or(queued.deadline, |n| n.min(queued.deadline)));
                            kept.push_back(queued);
                        }
                    }
                    self.backlog = kept;
                    if let Some(next) = next {
                        self.arm(next);
                    }
                }
                message = self.requests.recv(), if !self.stopping => match message {
                    Some(Some(queued)) => {
                        self.arm(queued.deadline);
                        self.backlog.push_back(queued);
                    }
                    Some(None) | None => self.stopping = true,
                },
            }
        }
    }
}

/// Runs the one handler of command type `C`, and keeps the requests' deadlines (see
/// [`Deadlines`]).
pub(crate) async fn run_commands<C: Command, H: CommandHandler<C>>(
    mut handler: H,
    factory: Factory<H>,
    requests: tokio::sync::mpsc::Receiver<CommandMessage<C>>,
    bus: Bus,
    backoff: RestartBackoff,
) {
    let name = std::any::type_name::<C>();
    let mut ctx = Context::for_bus(bus.clone(), Arc::from(name), bus.inner.cancel.clone());
    let mut consecutive_panics = 0u32;
    let mut deadlines = Deadlines {
        name,
        requests,
        backlog: VecDeque::new(),
        timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
        armed: false,
        stopping: false,
        bus: bus.clone(),
    };

    while let Some(request) = deadlines.next().await {
        let CommandRequest {
            command,
            cause,
            deadline,
            timeout,
            reply,
        } = request;
        if tokio::time::Instant::now() >= deadline {
            let _ = reply.send(Err(deadlines.timed_out(timeout)));
            bus.inner.finish_requests(1);
            continue;
        }
        let mut current = Current {
            reply: Some(reply),
            deadline,
            timeout,
        };
        ctx.cause = Some(cause);
        let span = tracing::info_span!(
            "tidings.request",
            command = name,
            request_id = %cause.id,
            correlation_id = %cause.correlation,
        );
        // The handler's future is made inside the unwind guard: a handler that panics before
        // returning its future is caught too.
        let call = AssertUnwindSafe(async { handler.handle(command, &ctx).await }).catch_unwind();
        let outcome = if span.is_disabled() {
            deadlines.drive(call, Some(&mut current)).await
        } else {
            deadlines
                .drive(call.instrument(span), Some(&mut current))
                .await
        };
        let answer = match outcome {
            Ok(Ok(value)) => {
                consecutive_panics = 0;
                Ok(value)
            }
            Ok(Err(err)) => Err(RequestError::Failed {
                command: name,
                message: err.to_string(),
            }),
            Err(panic) => {
                let message = panic_message(&*panic);
                tracing::error!(command = name, panic = %message, "command handler panicked; restarting it");
                consecutive_panics += 1;
                Err(RequestError::Panicked {
                    command: name,
                    message,
                })
            }
        };
        let panicked = matches!(answer, Err(RequestError::Panicked { .. }));
        match current.reply.take() {
            // The requester may have gone away; that is its business.
            Some(reply) => {
                let _ = reply.send(answer);
            }
            None => tracing::debug!(command = name, "reply discarded: the request had timed out"),
        }
        bus.inner.finish_requests(1);
        if panicked {
            // Deadlines of queued requests are kept during the restart backoff too.
            deadlines
                .drive(tokio::time::sleep(backoff.delay(consecutive_panics)), None)
                .await;
            if let Some(fresh) = fresh(&factory) {
                replace_handler(&mut handler, fresh);
            }
        }
    }
    // Stopping: refuse what is still queued (requests that slipped in beside the stop
    // message), answering and uncounting each, so that nothing waits or stays counted.
    deadlines.requests.close();
    while let Ok(message) = deadlines.requests.try_recv() {
        if let Some(request) = message {
            let _ = request.reply.send(Err(RequestError::Closed));
            bus.inner.finish_requests(1);
        }
    }
    for request in deadlines.backlog.drain(..) {
        let _ = request.reply.send(Err(RequestError::Closed));
        bus.inner.finish_requests(1);
    }
}

/// Swaps in a fresh handler; a panic in the old one's `Drop` is caught and logged.
pub(crate) fn replace_handler<H>(slot: &mut H, fresh: H) {
    let old = std::mem::replace(slot, fresh);
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(move || drop(old))) {
        tracing::error!(panic = %panic_message(&*panic), "dropping a panicked handler panicked");
    }
}
