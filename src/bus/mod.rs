//! The bus: publishing, request/reply, settling, stats and shutdown.
//!
//! `Bus` is the facade: its methods delegate to the core (`crate::core`), the durable layer and
//! the dead-letter queues. The file is a little over 600 lines because most of it is `Bus`'s
//! public documentation: its ordering, delivery and shutdown contracts and an example per method.

mod builder;
mod handles;
mod module;
mod plan;
mod ready;
pub mod rebuild;
mod shutdown;
mod spec;
mod stats;
mod topology;
mod validate;

use shutdown::HandleGuard;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, Shared};
use tokio::task::JoinHandle;

pub use crate::runtime::subscription::{RestartBackoff, Subscription};
pub use builder::BusBuilder;
pub use handles::{EventSet, Handles};
pub use module::Module;

use crate::command::Command;
use crate::core::publish::Origin;
use crate::core::seen::EXTERNAL;
use crate::core::{lock, Core};
use crate::dead_letter::{DeadLetterError, DeadLetterQueue, DeadLetters};
use crate::durable::{Durable, Engine};
use crate::envelope::{new_id, AnyEnvelope};
use crate::error::{PublishError, RequestError, TryPublishError};
use crate::event::Event;
pub use crate::publish::{Failure, PublishOptions, Published};
use crate::stats::{ShutdownReport, Stats};

/// Past a shutdown's deadline, how long aborted workers are given to stop.
const ABORT_GRACE: Duration = Duration::from_millis(100);

/// A handle to a running event bus. Cheap to clone; every clone is the same bus.
///
/// Build one with [`Bus::builder`]. Events are published with [`publish`](Bus::publish) or
/// [`try_publish`](Bus::try_publish), commands sent with [`request`](Bus::request).
///
/// # Ordering contract
///
/// - Events with the same [key](crate::Event::key) land on the same partition of their topic.
/// - Within a consumer group, a partition is owned by one worker at a time, which hands its
///   events to the handler one at a time, in offset order. So every group handles the events of
///   one key in the order they were published: the order in which their `publish` calls
///   returned (calls from one task are ordered; calls racing from several tasks are ordered as
///   the bus accepted them, which the offsets record).
/// - A redelivered event is handled again before any later event of its partition.
/// - There is no order across partitions, across topics, or across groups.
///
/// # Delivery
///
/// In memory, delivery is at-least-once while the process lives (unless a subscription chose
/// another [`DeliveryMode`](crate::DeliveryMode)): every accepted event is handled by every
/// subscribed group, or after its last attempt lands in the group's
/// [dead-letter queue](Bus::dead_letters), unless its topic opted into
/// [`Overflow::DropOldest`](crate::Overflow::DropOldest), whose drops are counted. Nothing survives a crash of the process
/// without a store.
///
/// With a [store](BusBuilder::store), [`publish`](Bus::publish) returns once the event is
/// committed to its partition's log, and every committed event is handled at least once by
/// every subscribed group, across crashes and restarts: each group resumes from its committed
/// offset (see [`Store`](crate::store::Store) for what else changes).
///
/// # Shutdown
///
/// Call [`shutdown`](Bus::shutdown): it stops intake, drains what is queued and in flight, and
/// reports. With a store, a group still reading the log to catch up stops reading it: what it
/// has not read yet is in the log and handled after the next start; the groups' offsets are
/// committed last. When the last user handle is dropped without it, the same graceful shutdown starts
/// in the background (outside a runtime, the queues just close: workers finish what is queued
/// and stop).
#[derive(Clone)]
pub struct Bus {
    pub(crate) inner: Arc<BusInner>,
    _guard: Option<Arc<HandleGuard>>,
}

/// The facade's state: the core every handle shares, and what only the facade reaches (the
/// dead-letter queues, the tasks, the durable layer, the shutdown in progress).
pub(crate) struct BusInner {
    pub(crate) core: Arc<Core>,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Every subscription's dead-letter queue, by group.
    /// Each group's dead-letter queues, one per topic it reads, in topic order.
    pub(crate) dead_letters: HashMap<String, Arc<[Arc<DeadLetterQueue>]>>,
    /// The shutdown in progress or done, shared by every caller.
    pub(crate) shutdown: Mutex<Option<Shared<BoxFuture<'static, ShutdownReport>>>>,
    /// The store's side of the bus and its tasks, if the bus has one.
    pub(crate) durable: Option<Arc<Durable>>,
    /// The groups and command handlers, for [`Bus::topology`].
    pub(crate) layout: topology::Layout,
}

impl std::ops::Deref for BusInner {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl BusInner {
    /// The durable layer's view, if the bus has a store.
    pub(crate) fn engine(&self) -> Option<Engine> {
        self.durable.as_ref().map(|d| Engine {
            core: Arc::clone(&self.core),
            d: Arc::clone(d),
        })
    }
}

impl Bus {
    /// A handle to the same bus that does not keep it open: once every other handle is
    /// dropped, the bus shuts down as if this one did not exist. Until then it publishes like
    /// any handle; after, it still reads [`stats`](Bus::stats) and awaits the
    /// [`shutdown`](Bus::shutdown)'s report. For what watches a bus without owning it (a health
    /// check, a metrics exporter, a test probe).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tidings::BuildError> {
    /// let bus = tidings::Bus::builder().build()?;
    /// let probe = bus.observer();
    /// drop(bus); // the bus shuts down in the background
    /// let report = probe.shutdown().await; // the same shutdown's report
    /// assert_eq!(report.handled, 0);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn observer(&self) -> Bus {
        Bus {
            inner: Arc::clone(&self.inner),
            _guard: None,
        }
    }

    /// Starts building a bus.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tidings::BuildError> {
    /// let bus = tidings::Bus::builder().build()?;
    /// bus.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> BusBuilder {
        BusBuilder::new()
    }

    /// Publishes an event to every consumer group subscribed to its type or topic.
    ///
    /// Returns once the event is accepted into the partition queue of every subscribed group,
    /// with its id, partition and offset. Waits while one of those queues is full (the slowest
    /// group sets the pace), unless the topic's overflow policy is [`Overflow::DropOldest`](crate::Overflow::DropOldest).
    /// An event whose type no group subscribes to (no [`subscribe`](BusBuilder::subscribe) of
    /// its type, no [`subscribe_all`](BusBuilder::subscribe_all) of its topic: a typo in a
    /// topic name, a subscription forgotten) is accepted and numbered, and handled by nobody
    /// (with a store it is still appended to the log): it is counted in
    /// [`TopicStats::unrouted`](crate::stats::TopicStats::unrouted), and the first one of each type
    /// logs a warning. The same holds for [`publish_all`](Bus::publish_all),
    /// [`try_publish`](Bus::try_publish) and publishes from handlers.
    ///
    /// # Errors
    ///
    /// [`PublishError::Closed`], with the event, once [`shutdown`](Bus::shutdown) has begun.
    /// With a [store](BusBuilder::store), also (each with the event, nothing appended):
    /// [`PublishError::TooLarge`] over the [payload limit](BusBuilder::max_payload);
    /// [`PublishError::Serialize`] if the event does not serialize, or if what it serializes
    /// to does not deserialize back into `E` (a `NaN` or infinite float, which JSON writes as
    /// `null`): such an event could never be read back from the log, so it is refused rather
    /// than committed; [`PublishError::Store`] if the append failed.
    ///
    /// # Cancel safety
    ///
    /// In memory, cancel safe: dropped before it completes, the future publishes nothing (the event is
    /// accepted in one step, when the call returns). With a [store](crate::BusBuilder::store), once the
    /// event has been handed to the appender, dropping the future does not withdraw it: it may still be
    /// committed and handled, without a receipt. Publish it again with the same
    /// [`PublishOptions::id`](crate::PublishOptions::id) and
    /// [producer deduplication](crate::BusBuilder::dedup_publishes) to be sure it is there once.
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use tidings::{Bus, Event};
    /// #[derive(Serialize, Deserialize, Event)]
    /// #[event(topic = "orders", key = order_id)]
    /// struct OrderPlaced { order_id: u64 }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let bus = Bus::builder().build().unwrap();
    /// let receipt = bus.publish(OrderPlaced { order_id: 1 }).await.unwrap();
    /// assert_eq!(receipt.offset, 0);
    /// # bus.shutdown().await; }
    /// ```
    pub async fn publish<E: Event>(&self, event: E) -> Result<Published, PublishError<E>> {
        let core = &self.inner.core;
        // Room in every queue (and no store): accepted at once, without building the state of
        // a publish that may wait.
        match core.try_publish_from(event, Origin::default()) {
            Ok(published) => Ok(published),
            Err(TryPublishError::Closed(event)) => Err(PublishError::Closed(event)),
            Err(TryPublishError::Full(event) | TryPublishError::Durable(event)) => {
                core.publish_from(event, Origin::default()).await
            }
        }
    }

    /// Like [`publish`](Bus::publish), with [options](PublishOptions): headers attached to the
    /// event's metadata, an id of your own.
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use tidings::{Bus, Event, Headers};
    /// # #[derive(Serialize, Deserialize, Event)]
    /// # #[event(topic = "orders", key = order_id)]
    /// # struct OrderPlaced { order_id: u64 }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let bus = Bus::builder().record(true).build().unwrap();
    /// let headers = Headers::new().with("tenant", "acme").with("source", "web");
    /// bus.publish_with(OrderPlaced { order_id: 1 }, headers).await.unwrap();
    /// assert_eq!(bus.published()[0].metadata().headers.get("tenant"), Some("acme"));
    /// # bus.shutdown().await; }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`publish`](Bus::publish).
    ///
    /// # Cancel safety
    ///
    /// In memory, cancel safe: dropped before it completes, the future publishes nothing (the event is
    /// accepted in one step, when the call returns). With a [store](crate::BusBuilder::store), once the
    /// event has been handed to the appender, dropping the future does not withdraw it: it may still be
    /// committed and handled, without a receipt. Publish it again with the same
    /// [`PublishOptions::id`](crate::PublishOptions::id) and
    /// [producer deduplication](crate::BusBuilder::dedup_publishes) to be sure it is there once.
    pub async fn publish_with<E: Event>(
        &self,
        event: E,
        options: impl Into<PublishOptions>,
    ) -> Result<Published, PublishError<E>> {
        let options = options.into();
        let origin = Origin {
            headers: options.headers,
            id: options.id,
            ..Origin::default()
        };
        self.inner.core.publish_from(event, origin).await
    }

    /// Publishes several events of one type in one call, in order.
    ///
    /// With a [store](BusBuilder::store) they are appended in one transaction: all are committed,
    /// or none is (an error carries them all back). This is also the fast way to publish
    /// durably: one commit for the lot instead of one wait per event.
    ///
    /// Without a store they are published one after the other, as by [`publish`](Bus::publish);
    /// should the bus shut down meanwhile, the error carries back those not published.
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// use tidings::store::MemoryStore;
    /// use tidings::{Bus, Event};
    ///
    /// #[derive(Serialize, Deserialize, Event)]
    /// #[event(topic = "readings", key = sensor)]
    /// struct Reading { sensor: u32, value: f64 }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let bus = Bus::builder().store(MemoryStore::new()).build().unwrap();
    /// let receipts = bus
    ///     .publish_all((0..100).map(|i| Reading { sensor: i % 4, value: i as f64 }))
    ///     .await
    ///     .unwrap();
    /// assert_eq!(receipts.len(), 100);
    /// # bus.shutdown().await; }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`publish`](Bus::publish), carrying the events back.
    ///
    /// # Cancel safety
    ///
    /// In memory the events are published one by one: dropped half-way, the future has published the
    /// events before the one it was waiting to place, and none after. With a store they are appended
    /// in one transaction: dropped before it is handed to the appender nothing is published, after it
    /// all of them may be (see [`publish`](Bus::publish)).
    pub async fn publish_all<E: Event>(
        &self,
        events: impl IntoIterator<Item = E>,
    ) -> Result<Vec<Published>, PublishError<Vec<E>>> {
        let events: Vec<E> = events.into_iter().collect();
        let inner = &*self.inner;
        if !inner.intake_open.load(Ordering::Acquire) {
            return Err(PublishError::Closed(events));
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        if inner.append.is_some() {
            let route = inner.route::<E>();
            inner.saw_publish::<E>(&route, EXTERNAL);
            let topic = Arc::clone(&route.topic);
            let slots = route.slots.clone();
            drop(route);
            let items = events
                .into_iter()
                .map(|event| {
                    let timestamp = SystemTime::now();
                    crate::core::append::Prepared {
                        partition: topic.partition_for(event.key()),
                        id: new_id(timestamp),
                        timestamp,
                        event,
                    }
                })
                .collect();
            let mut origin = Origin::default();
            return inner
                .append_durable(items, (topic, slots), &mut origin, None)
                .await;
        }
        let mut receipts = Vec::with_capacity(events.len());
        let mut events = events.into_iter();
        while let Some(event) = events.next() {
            match self.publish(event).await {
                Ok(p) => receipts.push(p),
                Err(e) => {
                    let mut rest = vec![e.into_event()];
                    rest.extend(events);
                    return Err(PublishError::Closed(rest));
                }
            }
        }
        Ok(receipts)
    }

    /// Publishes an event if every subscribed queue has room, without waiting.
    ///
    /// # Errors
    ///
    /// [`TryPublishError::Full`] carries the event back when a queue is full (with
    /// [`Overflow::Block`](crate::Overflow::Block)); [`TryPublishError::Closed`] once shutdown has begun;
    /// [`TryPublishError::Durable`] always on a bus with a store (a publish there waits for its
    /// commit: use [`publish`](Bus::publish)).
    pub fn try_publish<E: Event>(&self, event: E) -> Result<Published, TryPublishError<E>> {
        self.inner.core.try_publish_from(event, Origin::default())
    }

    /// Sends a command to its one handler and waits for the reply, at most the bus's
    /// [request timeout](BusBuilder::request_timeout).
    ///
    /// # Timeouts
    ///
    /// The deadline is kept by the command's handler task: a request still queued when its
    /// deadline passes is answered [`RequestError::Timeout`] and never handled; a request whose
    /// handler is still running at its deadline is answered `Timeout` at the deadline, while
    /// the handler runs on to completion (its reply is discarded; it is not cancelled half-way).
    /// A handler that blocks its thread instead of awaiting delays the answer until it yields.
    ///
    /// # Errors
    ///
    /// - [`RequestError::NoHandler`] at once if no handler is registered for `C`;
    /// - [`RequestError::Timeout`] if no reply came in time;
    /// - [`RequestError::Failed`] / [`RequestError::Panicked`] if the handler failed;
    /// - [`RequestError::Closed`] once shutdown has begun (requests sent by handlers while the
    ///   bus drains are still answered).
    ///
    /// # Correlation
    ///
    /// A request from outside the bus starts a causal chain: events its handler publishes carry
    /// a fresh correlation id and name the request as their cause. A request sent from a handler
    /// ([`Context::request`](crate::Context::request)) continues the handled event's chain: the
    /// command handler's events carry its correlation id and name that event as their cause.
    ///
    /// # Examples
    ///
    /// ```
    /// use tidings::{Bus, Command, CommandHandler, Context, HandlerError};
    ///
    /// struct Double(u32);
    /// impl Command for Double { type Reply = u32; }
    ///
    /// struct Doubler;
    /// impl CommandHandler<Double> for Doubler {
    ///     async fn handle(&mut self, cmd: Double, _: &Context) -> Result<u32, HandlerError> {
    ///         Ok(cmd.0 * 2)
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let bus = Bus::builder().command_handler::<Double, _>(|| Doubler).build().unwrap();
    /// assert_eq!(bus.request(Double(21)).await, Ok(42));
    /// # bus.shutdown().await; }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the reply only: a request already queued is still handled (its
    /// reply is discarded); one not yet queued is not sent.
    pub async fn request<C: Command>(&self, command: C) -> Result<C::Reply, RequestError> {
        self.inner.core.saw_request::<C>(EXTERNAL);
        self.inner.core.request_from(command, None, None).await
    }

    /// Like [`request`](Bus::request) with an explicit timeout.
    ///
    /// # Errors
    ///
    /// As [`request`](Bus::request).
    ///
    /// # Cancel safety
    ///
    /// As [`request`](Bus::request).
    pub async fn request_timeout<C: Command>(
        &self,
        command: C,
        timeout: Duration,
    ) -> Result<C::Reply, RequestError> {
        self.inner.core.saw_request::<C>(EXTERNAL);
        self.inner
            .core
            .request_from(command, None, Some(timeout))
            .await
    }

    /// Waits until the bus is idle: every queue empty, every handler idle, every request
    /// answered — including the events that handlers published while the bus settled.
    ///
    /// Meant for tests (see [`testing`](crate::testing)); with tokio's paused clock, timers in
    /// handlers (restart backoff, sleeps) are skipped over while waiting. If publishers outside
    /// the bus keep publishing, it may never return: a readiness probe or an operator tool
    /// waits for [`ready`](Bus::ready) instead (started and caught up). Do not call it from inside a handler: it
    /// would wait for that handler's own event.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits.
    pub async fn settled(&self) {
        self.inner.pending.settled().await
    }

    /// Counters per topic, consumer group and partition: published, handled, failed, dropped,
    /// queue depth and lag.
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// Events published so far, in the order the bus accepted them, if the bus was built with
    /// [`BusBuilder::record`]; empty otherwise.
    pub fn published(&self) -> Vec<AnyEnvelope> {
        self.inner
            .recorder
            .as_ref()
            .map(|r| lock(&r.published).clone())
            .unwrap_or_default()
    }

    /// Events the bus gave up on, if it was built with [`BusBuilder::record`]; empty otherwise.
    pub fn failures(&self) -> Vec<Failure> {
        self.inner
            .recorder
            .as_ref()
            .map(|r| lock(&r.failures).clone())
            .unwrap_or_default()
    }

    /// Shuts the bus down gracefully and reports what it did.
    ///
    /// 1. Stops intake: `publish` and `request` from outside return `Closed`; events published by
    ///    handlers are still accepted, so causal chains complete.
    /// 2. Signals handlers ([`Context::shutting_down`](crate::Context::shutting_down)).
    /// 3. Drains: waits until every queued and in-flight event is handled (or has failed) and
    ///    every request answered.
    /// 4. Stops the workers and returns the totals.
    ///
    /// Nothing accepted before shutdown is lost. Calling it again (from any clone) returns the
    /// same report. Handlers still running for requests that timed out are waited for too.
    ///
    /// Do not call it from inside a handler: it waits for that handler's own event to finish.
    ///
    /// With a [store](BusBuilder::store): groups still reading the log stop reading it (the rest
    /// is handled after the next start), the appender stops, and every group's offset is
    /// committed. Dead letters and effectively-once marks are saved before offsets pass them,
    /// retrying while the store fails: with the store down, this waits until it answers — use
    /// [`shutdown_timeout`](Bus::shutdown_timeout) to bound it (what was not saved is handled
    /// again after the restart).
    ///
    /// # Cancel safety
    ///
    /// The shutdown runs in a task of its own: dropping this future does not stop it, and a
    /// later call waits for the same shutdown.
    pub async fn shutdown(&self) -> ShutdownReport {
        self.shutdown_inner(None).await
    }

    /// With a store: commits every consumer group's offsets now (what each has finished),
    /// instead of waiting for the next [commit interval](BusBuilder::commit_interval). Without a
    /// store, does nothing.
    ///
    /// # Errors
    ///
    /// The store's error; the offsets are committed again on the next interval.
    ///
    /// # Cancel safety
    ///
    /// Dropped half-way, some groups' offsets may be committed and others not; the next commit
    /// interval (or the shutdown) commits them all. An offset never moves back.
    pub async fn commit_offsets(&self) -> Result<(), crate::store::StoreError> {
        match self.inner.engine() {
            Some(engine) => crate::durable::offsets::commit_offsets(&engine).await,
            None => Ok(()),
        }
    }

    /// The dead-letter queue of consumer group `group`: list, inspect, redrive, discard.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::UnknownGroup`] if no subscription has that name.
    pub fn dead_letters(&self, group: &str) -> Result<DeadLetters, DeadLetterError> {
        let queues =
            self.inner
                .dead_letters
                .get(group)
                .ok_or_else(|| DeadLetterError::UnknownGroup {
                    group: group.to_owned(),
                })?;
        Ok(DeadLetters::new(
            Arc::clone(queues),
            Arc::clone(&self.inner.core),
        ))
    }

    /// Like [`shutdown`](Bus::shutdown), but gives up draining after `timeout`: workers are
    /// aborted and the events still queued or in flight are counted as
    /// [`abandoned`](ShutdownReport::abandoned) (each once per group; 0 only after a full
    /// drain), with the requests not answered.
    ///
    /// Past the deadline nothing is waited for long: aborted workers are given 100 ms to stop,
    /// then left behind; with a store, the last offset commit gets what is left of `timeout`,
    /// at least a second.
    ///
    /// # Blocking handlers
    ///
    /// An aborted worker stops at its handler's next `.await`. A handler that blocks its thread
    /// instead (`std::thread::sleep`, blocking I/O, a long computation) cannot be interrupted:
    /// no thread can be preempted. On a multi-thread runtime the report still comes back at the
    /// deadline: the blocked worker is left on its thread (it stops at its next `.await` once
    /// the call returns; an event it finishes meanwhile was already reported abandoned), and
    /// its event is counted abandoned. On a `current_thread` runtime the blocked handler holds
    /// the runtime's only thread: no timer fires and the shutdown does not run until it
    /// returns, so the report comes late. Run blocking work in
    /// [`spawn_blocking`](tokio::task::spawn_blocking) (or `block_in_place` on a multi-thread
    /// runtime) and await it.
    ///
    /// # Cancel safety
    ///
    /// As [`shutdown`](Bus::shutdown): the shutdown goes on in its own task.
    pub async fn shutdown_timeout(&self, timeout: Duration) -> ShutdownReport {
        self.shutdown_inner(Some(timeout)).await
    }

    async fn shutdown_inner(&self, timeout: Option<Duration>) -> ShutdownReport {
        // The work runs in a task of its own, shared by every caller: dropping a `shutdown`
        // future half-way does not leave the bus half shut down.
        BusInner::begin_shutdown(&self.inner, timeout).await
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("topics", &self.inner.topic_index.keys().collect::<Vec<_>>())
            .field("pending", &self.inner.pending.count())
            .finish_non_exhaustive()
    }
}
