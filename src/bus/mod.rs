//! The bus: publishing, request/reply, settling, stats and shutdown.

mod builder;
pub(crate) mod durable;
pub(crate) mod marks;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use futures::future::{BoxFuture, FutureExt, Shared};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use builder::{BusBuilder, RestartBackoff, Subscription};

use crate::command::{Command, CommandMessage, CommandRequest};
use crate::dead_letter::{DeadLetterError, DeadLetterQueue, DeadLetters};
use crate::envelope::{new_id, AnyEnvelope, Erased, Headers, Inner, Metadata};
use crate::error::{PublishError, RequestError, TryPublishError};
use crate::event::Event;
use crate::publish::Cause;
pub use crate::publish::{Failure, PublishOptions, Published};
use crate::stats::{GroupStats, PartitionStats, ShutdownReport, Stats, TopicStats};
use crate::topic::{default_partitions, Overflow, Partition, PartitionState, Topic, TopicConfig};
use crate::window::Window;

/// Past a shutdown's deadline, how long aborted workers are given to stop.
const ABORT_GRACE: Duration = Duration::from_millis(100);

/// How many times `publish` yields to the scheduler on a full queue before it sleeps.
const FULL_QUEUE_SPINS: u32 = 8;

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
/// [`Overflow::DropOldest`], whose drops are counted. Nothing survives a crash of the process
/// without a store.
///
/// With a [store](BusBuilder::store), [`publish`](Bus::publish) returns once the event is
/// committed to its partition's log, and every committed event is handled at least once by
/// every subscribed group, across crashes and restarts: each group resumes from its committed
/// offset (see [`Store`](crate::Store) for what else changes).
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

/// Closes the bus when the last user-held handle goes away.
struct HandleGuard(Weak<BusInner>);

impl Drop for HandleGuard {
    fn drop(&mut self) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // A graceful shutdown in the background (or the one already running): queued
            // events and their follow-ups are handled, then the tasks stop.
            drop(BusInner::begin_shutdown(&inner, None));
        } else {
            // No runtime to drain on: stop intake and let the workers finish what is queued.
            inner.intake_open.store(false, Ordering::SeqCst);
            inner.cancel.cancel();
            inner.close_queues();
        }
    }
}

#[derive(Default)]
pub(crate) struct Origin {
    pub(crate) cause: Option<Cause>,
    pub(crate) from_handler: bool,
    pub(crate) headers: Headers,
    /// An id given by the publisher.
    pub(crate) id: Option<Uuid>,
    /// The queue the publishing handler's worker drains, if any.
    pub(crate) owner: Option<QueueId>,
}

/// One group's queue of one partition of one topic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct QueueId {
    /// The topic's address, only compared.
    pub(crate) topic: usize,
    pub(crate) slot: usize,
    pub(crate) partition: u32,
}

impl QueueId {
    pub(crate) fn of(topic: &Arc<Topic>, slot: usize, partition: u32) -> Self {
        QueueId {
            topic: Arc::as_ptr(topic) as usize,
            slot,
            partition,
        }
    }
}

pub(crate) struct Route {
    topic: Arc<Topic>,
    slots: Box<[usize]>,
}

enum RouteRef<'a> {
    Static(&'a Route),
    Dynamic(Arc<Route>),
}

impl std::ops::Deref for RouteRef<'_> {
    type Target = Route;
    fn deref(&self) -> &Route {
        match self {
            RouteRef::Static(r) => r,
            RouteRef::Dynamic(r) => r,
        }
    }
}

/// The route, partition, id and time of an event about to be published.
struct Placement<'a> {
    route: RouteRef<'a>,
    partition: u32,
    id: Uuid,
    timestamp: SystemTime,
}

impl Placement<'_> {
    fn partition(&self) -> &Partition {
        &self.route.topic.partitions[self.partition as usize]
    }

    fn restamp(&mut self) {
        self.timestamp = SystemTime::now();
        self.id = new_id(self.timestamp);
    }
}

enum Reject<E> {
    Full(E),
    Closed(E),
}

pub(crate) struct BusInner {
    topics: Vec<Arc<Topic>>,
    topic_index: HashMap<String, usize>,
    /// Per topic index: typed slots by event type, and the slots of `subscribe_all` groups.
    typed_slots: HashMap<(usize, TypeId), Vec<usize>>,
    any_slots: Vec<Vec<usize>>,
    /// Fx-hashed: looked up on every publish, keyed by `TypeId`, which is a hash already.
    routes: FxHashMap<TypeId, Route>,
    dynamic_routes: DashMap<TypeId, Arc<Route>>,
    /// Topics published to without any subscription or configuration.
    unsubscribed_topics: DashMap<String, Arc<Topic>>,
    commands: FxHashMap<TypeId, CommandEntry>,
    request_timeout: Duration,
    /// Deliveries and requests accepted but not yet finished.
    pending: AtomicUsize,
    /// Of those, requests (so that a shutdown report tells them from deliveries).
    requests: AtomicUsize,
    /// Callers waiting in `settled`, woken through `idle`.
    settling: AtomicUsize,
    idle: Notify,
    intake_open: AtomicBool,
    pub(crate) cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) recorder: Option<Recorder>,
    /// Every subscription's dead-letter queue, by group.
    pub(crate) dead_letters: HashMap<String, Arc<DeadLetterQueue>>,
    /// Producer-side deduplication: ids published with an explicit id, and their receipts.
    pub(crate) publish_dedup: Option<parking_lot::Mutex<Window<Published, (&'static str, Uuid)>>>,
    /// The shutdown in progress or done, shared by every caller.
    pub(crate) shutdown: Mutex<Option<Shared<BoxFuture<'static, ShutdownReport>>>>,
    /// The store and its tasks, if the bus has one.
    pub(crate) durable: Option<Box<durable::Durable>>,
}

/// Uncounts one pending request when dropped, unless disarmed.
struct PendingGuard<'a>(Option<&'a BusInner>);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Some(inner) = self.0 {
            inner.finish_requests(1);
        }
    }
}

#[derive(Default)]
pub(crate) struct Recorder {
    pub(crate) published: Mutex<Vec<AnyEnvelope>>,
    pub(crate) failures: Mutex<Vec<Failure>>,
}

/// A command handler's queue: the typed sender (`mpsc::Sender<CommandMessage<C>>`), erased, and
/// how to tell its task to stop.
pub(crate) struct CommandEntry {
    pub(crate) sender: Box<dyn Any + Send + Sync>,
    pub(crate) stop: Box<dyn Fn() + Send + Sync>,
}

impl Bus {
    /// A handle that does not keep the bus open (for the bus's own tasks).
    pub(crate) fn unguarded(inner: Arc<BusInner>) -> Bus {
        Bus {
            inner,
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
    /// group sets the pace), unless the topic's overflow policy is [`Overflow::DropOldest`].
    /// An event whose type no group subscribes to (no [`subscribe`](BusBuilder::subscribe) of
    /// its type, no [`subscribe_all`](BusBuilder::subscribe_all) of its topic: a typo in a
    /// topic name, a subscription forgotten) is accepted and numbered, and handled by nobody
    /// (with a store it is still appended to the log): it is counted in
    /// [`TopicStats::unrouted`](crate::TopicStats::unrouted), and the first one of each type
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
    /// Cancel safe: if the future is dropped before it completes, the event was not published
    /// to any group.
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
        self.publish_from(event, Origin::default()).await
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
        self.publish_from(event, origin).await
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
    /// use tidings::{Bus, Event, MemoryStore};
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
        if inner.durable.is_some() {
            let route = inner.route::<E>();
            let topic = Arc::clone(&route.topic);
            let slots = route.slots.clone();
            drop(route);
            let items = events
                .into_iter()
                .map(|event| {
                    let timestamp = SystemTime::now();
                    durable::Prepared {
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
    /// [`Overflow::Block`]); [`TryPublishError::Closed`] once shutdown has begun;
    /// [`TryPublishError::Durable`] always on a bus with a store (a publish there waits for its
    /// commit: use [`publish`](Bus::publish)).
    pub fn try_publish<E: Event>(&self, event: E) -> Result<Published, TryPublishError<E>> {
        self.try_publish_from(event, Origin::default())
    }

    pub(crate) async fn publish_from<E: Event>(
        &self,
        event: E,
        mut origin: Origin,
    ) -> Result<Published, PublishError<E>> {
        let inner = &*self.inner;
        if !origin.from_handler && !inner.intake_open.load(Ordering::Acquire) {
            return Err(PublishError::Closed(event));
        }
        let mut place = inner.place(&event);
        if inner.durable.is_some() {
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
        // When a queue is full, first yield to the scheduler a few times (the worker is likely
        // draining right now), then sleep until the worker has drained half the queue.
        let mut spins = 0;
        let mut retry = false;
        loop {
            if retry {
                // Stamped when accepted, not when first tried: ids and times follow offsets.
                place.restamp();
            }
            retry = true;
            let part = place.partition();
            let will_wait = spins >= FULL_QUEUE_SPINS;
            let waiting = {
                let mut state = part.lock();
                match inner.enqueue(
                    &place,
                    &mut state,
                    event,
                    &mut origin,
                    will_wait,
                    &mut garbage,
                ) {
                    Ok(published) => return Ok(published),
                    Err(Reject::Closed(e)) => return Err(PublishError::Closed(e)),
                    Err(Reject::Full(e)) => {
                        event = e;
                        will_wait.then(|| {
                            let mut waiting = Box::pin(part.not_full.notified());
                            waiting.as_mut().enable();
                            waiting
                        })
                    }
                }
            };
            // Free what this publisher collected before it waits, not after.
            drop(std::mem::take(&mut garbage));
            match waiting {
                Some(waiting) => waiting.await,
                None => {
                    spins += 1;
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    pub(crate) fn try_publish_from<E: Event>(
        &self,
        event: E,
        mut origin: Origin,
    ) -> Result<Published, TryPublishError<E>> {
        let inner = &*self.inner;
        if !origin.from_handler && !inner.intake_open.load(Ordering::Acquire) {
            return Err(TryPublishError::Closed(event));
        }
        if inner.durable.is_some() {
            return Err(TryPublishError::Durable(event));
        }
        let place = inner.place(&event);
        let mut garbage = Vec::new();
        let mut state = place.partition().lock();
        inner
            .enqueue(&place, &mut state, event, &mut origin, false, &mut garbage)
            .map_err(|r| match r {
                Reject::Full(e) => TryPublishError::Full(e),
                Reject::Closed(e) => TryPublishError::Closed(e),
            })
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
    pub async fn request<C: Command>(&self, command: C) -> Result<C::Reply, RequestError> {
        self.request_from(command, None, None).await
    }

    /// Like [`request`](Bus::request) with an explicit timeout.
    ///
    /// # Errors
    ///
    /// As [`request`](Bus::request).
    pub async fn request_timeout<C: Command>(
        &self,
        command: C,
        timeout: Duration,
    ) -> Result<C::Reply, RequestError> {
        self.request_from(command, None, Some(timeout)).await
    }

    pub(crate) async fn request_from<C: Command>(
        &self,
        command: C,
        cause: Option<Cause>,
        timeout: Option<Duration>,
    ) -> Result<C::Reply, RequestError> {
        let inner = &*self.inner;
        let name = std::any::type_name::<C>();
        let Some(sender) = inner
            .commands
            .get(&TypeId::of::<C>())
            .and_then(|e| e.sender.downcast_ref::<mpsc::Sender<CommandMessage<C>>>())
        else {
            return Err(RequestError::NoHandler { command: name });
        };
        // Counted as pending before intake is checked, so that shutdown either sees this
        // request and waits for it, or this request sees shutdown and backs off; the guard
        // uncounts it on every way out until the handler task owns it.
        inner.requests.fetch_add(1, Ordering::SeqCst);
        inner.pending.fetch_add(1, Ordering::SeqCst);
        let mut counted = PendingGuard(Some(inner));
        if cause.is_none() && !inner.intake_open.load(Ordering::SeqCst) {
            return Err(RequestError::Closed);
        }
        let timeout = timeout.unwrap_or(inner.request_timeout);
        // From a handler, the request carries the handled event's cause on, so events its
        // command handler publishes name that event; from outside, the request starts a chain.
        let cause = cause.unwrap_or_else(|| {
            let id = new_id(SystemTime::now());
            Cause {
                id,
                correlation: id,
            }
        });
        let now = tokio::time::Instant::now();
        // A timeout too large to add is as good as none (about 30 years).
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600));
        let (tx, rx) = oneshot::channel();
        let request = CommandRequest {
            command,
            cause,
            deadline,
            timeout,
            reply: tx,
        };
        // Fast path: room in the handler's queue. Only a full queue needs a timer here; the
        // handler task enforces the deadline once the request is queued (see `run_commands`),
        // so a round trip costs no timer registration.
        let permit = match sender.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Closed(())) => return Err(RequestError::Closed),
            Err(mpsc::error::TrySendError::Full(())) => {
                match tokio::time::timeout_at(deadline, sender.reserve()).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(RequestError::Closed),
                    Err(_) => {
                        return Err(RequestError::Timeout {
                            command: name,
                            timeout,
                        })
                    }
                }
            }
        };
        permit.send(Some(request));
        // From here the handler task finishes the request, answered or not.
        counted.0 = None;
        rx.await.unwrap_or(Err(RequestError::Closed))
    }

    /// Waits until the bus has started: with a store, every consumer group's dead letters are
    /// read back from it and every worker knows where it starts (its committed offset, or its
    /// [`StartFrom`](crate::StartFrom)); without a store, at once. Returns
    /// [`is_ready`](Bus::is_ready): `false` if shutdown began first.
    ///
    /// [`build`](BusBuilder::build) cannot wait for the store, so right after it the
    /// dead-letter queues of a restarted bus may still be empty: an operator tool or a health
    /// check reads them after `ready()`. (Redrives wait for their group's entries on their
    /// own.) Unlike [`settled`](Bus::settled), this does not wait for the groups to catch up or
    /// go idle: it returns even while events keep coming.
    ///
    /// ```
    /// use tidings::{Bus, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # #[derive(serde::Serialize, serde::Deserialize, tidings::Event)]
    /// # #[event(topic = "orders")] struct Placed;
    /// # struct H;
    /// # impl tidings::Handler<Placed> for H {
    /// #     async fn handle(&mut self, _: &tidings::Envelope<Placed>, _: &tidings::Context) -> Result<(), tidings::HandlerError> { Ok(()) }
    /// # }
    /// let bus = Bus::builder()
    ///     .store(MemoryStore::new())
    ///     .topic(tidings::TopicConfig::new("orders").partitions(2))
    ///     .subscribe::<Placed, _>("billing", || H)
    ///     .build()?;
    /// assert!(bus.ready().await);
    /// // Complete, whatever the store held before this start.
    /// let waiting = bus.dead_letters("billing")?.len();
    /// # assert_eq!(waiting, 0);
    /// # bus.shutdown().await; Ok(()) }
    /// ```
    pub async fn ready(&self) -> bool {
        if let Some(d) = self.inner.durable.as_ref() {
            tokio::select! {
                _ = d.started.cancelled() => {}
                _ = self.inner.cancel.cancelled() => {}
            }
        }
        self.is_ready()
    }

    /// Whether the bus has started ([`ready`](Bus::ready)) and is not shutting down: what a
    /// readiness probe asks.
    pub fn is_ready(&self) -> bool {
        self.inner.is_open()
            && !self.inner.cancel.is_cancelled()
            && self
                .inner
                .durable
                .as_ref()
                .is_none_or(|d| d.started.is_cancelled())
    }

    /// Waits until the bus is idle: every queue empty, every handler idle, every request
    /// answered — including the events that handlers published while the bus settled.
    ///
    /// Meant for tests (see [`testing`](crate::testing)); with tokio's paused clock, timers in
    /// handlers (restart backoff, sleeps) are skipped over while waiting. If publishers outside
    /// the bus keep publishing, it may never return. Do not call it from inside a handler: it
    /// would wait for that handler's own event.
    pub async fn settled(&self) {
        self.inner.settled().await
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
    pub async fn commit_offsets(&self) -> Result<(), crate::StoreError> {
        match &self.inner.durable {
            Some(_) => durable::commit_offsets(&self.inner).await,
            None => Ok(()),
        }
    }

    /// The dead-letter queue of consumer group `group`: list, inspect, redrive, discard.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::UnknownGroup`] if no subscription has that name.
    pub fn dead_letters(&self, group: &str) -> Result<DeadLetters, DeadLetterError> {
        let queue =
            self.inner
                .dead_letters
                .get(group)
                .ok_or_else(|| DeadLetterError::UnknownGroup {
                    group: group.to_owned(),
                })?;
        Ok(DeadLetters::new(
            Arc::clone(queue),
            Bus {
                inner: Arc::clone(&self.inner),
                _guard: None,
            },
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
            .field("pending", &self.inner.pending.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusInner {
    /// Starts the shutdown (once) in a task of its own and returns a future of its report.
    fn begin_shutdown(
        this: &Arc<BusInner>,
        timeout: Option<Duration>,
    ) -> Shared<BoxFuture<'static, ShutdownReport>> {
        lock(&this.shutdown)
            .get_or_insert_with(|| {
                let inner = Arc::clone(this);
                let task = tokio::spawn(async move { inner.run_shutdown(timeout).await });
                async move { task.await.unwrap_or_default() }
                    .boxed()
                    .shared()
            })
            .clone()
    }

    async fn run_shutdown(&self, timeout: Option<Duration>) -> ShutdownReport {
        let started = tokio::time::Instant::now();
        self.intake_open.store(false, Ordering::SeqCst);
        // Barrier: a publisher that found intake open under a partition lock has counted its
        // event by the time this takes that lock, so the drain below waits for it.
        for topic in self.all_topics() {
            for part in topic.partitions.iter() {
                drop(part.lock());
            }
        }
        self.cancel.cancel();
        let mut drained = match timeout {
            None => {
                self.settled().await;
                true
            }
            Some(t) => tokio::time::timeout(t, self.settled()).await.is_ok(),
        };
        self.close_queues();
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        match timeout {
            None => {
                for task in tasks {
                    let _ = task.await;
                }
            }
            Some(t) => {
                // Past the deadline nothing is waited for long. An aborted task stops at its
                // next await; a handler blocking its thread cannot be stopped (a thread cannot
                // be preempted): it is left running, and its event is reported abandoned.
                if !drained {
                    for task in &tasks {
                        task.abort();
                    }
                }
                let left = t.saturating_sub(started.elapsed()).max(ABORT_GRACE);
                let joined =
                    tokio::time::timeout(left, futures::future::join_all(tasks.iter_mut())).await;
                if joined.is_err() {
                    drained = false;
                    let running = tasks.iter().filter(|task| !task.is_finished()).count();
                    for task in &tasks {
                        task.abort();
                    }
                    tracing::warn!(
                        running,
                        "tidings: shutdown timeout: workers still running were abandoned (a handler blocking its thread cannot be stopped)"
                    );
                }
            }
        }
        if let Some(d) = &self.durable {
            // Publishing is over: stop the appender and commit the groups' offsets (within what
            // is left of the timeout; a commit cut short means a group handles again what it
            // handled since the last periodic commit).
            d.stop.cancel();
            match timeout {
                None => durable::Durable::stop(self).await,
                Some(t) => {
                    // At least a second for the last commit, even when the drain used it all.
                    let left = t
                        .saturating_sub(started.elapsed())
                        .max(Duration::from_secs(1));
                    if tokio::time::timeout(left, durable::Durable::stop(self))
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            "tidings: shutdown timeout: the last offset commit was cut short"
                        );
                    }
                }
            }
        }
        let stats = self.stats();
        let mut report = ShutdownReport::default();
        let mut unfinished = 0;
        for topic in &stats.topics {
            for group in &topic.groups {
                report.handled += group.handled;
                report.failed += group.failed;
                report.dropped += group.dropped;
                report.panics += group.panics;
                // In memory: delivered, and neither handled, failed nor dropped (read in the
                // same snapshot as those counts, so that they add up exactly).
                unfinished += group.lag;
            }
        }
        // After a full drain nothing was abandoned (a request refused at this moment may be
        // counted for an instant, so do not read the counters). Otherwise, what was never
        // finished: events queued or in flight (in memory, counted per event above; with a
        // store, what is still counted pending: workers release their events one by one once
        // shutdown began, and a group still busy reading the log counts one), and requests not
        // answered.
        report.abandoned = if drained {
            0
        } else if self.durable.is_some() {
            self.pending.load(Ordering::SeqCst) as u64
        } else {
            unfinished + self.requests.load(Ordering::SeqCst) as u64
        };
        tracing::info!(
            handled = report.handled,
            failed = report.failed,
            dropped = report.dropped,
            abandoned = report.abandoned,
            "tidings bus shut down"
        );
        report
    }

    fn route<E: Event>(&self) -> RouteRef<'_> {
        let type_id = TypeId::of::<E>();
        if let Some(route) = self.routes.get(&type_id) {
            return RouteRef::Static(route);
        }
        if let Some(route) = self.dynamic_routes.get(&type_id) {
            return RouteRef::Dynamic(Arc::clone(&route));
        }
        self.new_route::<E>(type_id)
    }

    /// The route of a type first published since the bus was built: computed and kept once per
    /// type (under the map's entry lock, so two first publishers agree). A type no group takes
    /// is logged here, so once per type per bus, whatever the number of its events.
    #[cold]
    fn new_route<E: Event>(&self, type_id: TypeId) -> RouteRef<'_> {
        let entry = self.dynamic_routes.entry(type_id).or_insert_with(|| {
                let route = self.compute_route(E::TOPIC, type_id);
                if route.slots.is_empty() {
                    let kept = if self.durable.is_some() {
                        "appended to the store's log, but no group of this bus handles them"
                    } else {
                        "accepted and numbered, but no group handles them: they are dropped"
                    };
                    tracing::warn!(
                        topic = E::TOPIC,
                        event_type = E::NAME,
                        "tidings: {} is published on topic {:?}, where no consumer group subscribes to it: its events are {kept} (counted in TopicStats::unrouted; a typo in a topic name?). Logged once per type.",
                        E::NAME,
                        E::TOPIC,
                    );
                }
                Arc::new(route)
            });
        RouteRef::Dynamic(Arc::clone(entry.value()))
    }

    pub(crate) fn compute_route(&self, topic: &str, type_id: TypeId) -> Route {
        match self.topic_index.get(topic) {
            Some(&index) => {
                let mut slots: Vec<usize> = self
                    .typed_slots
                    .get(&(index, type_id))
                    .cloned()
                    .unwrap_or_default();
                slots.extend(&self.any_slots[index]);
                slots.sort_unstable();
                Route {
                    topic: Arc::clone(&self.topics[index]),
                    slots: slots.into_boxed_slice(),
                }
            }
            None => {
                let topic = self
                    .unsubscribed_topics
                    .entry(topic.to_owned())
                    .or_insert_with(|| {
                        let config = TopicConfig::new(topic);
                        // With a store, a fixed count: it must not change between runs.
                        let partitions = if self.durable.is_some() {
                            1
                        } else {
                            default_partitions()
                        };
                        Arc::new(Topic::new(&config, partitions, Vec::new()))
                    })
                    .clone();
                Route {
                    topic,
                    slots: Box::new([]),
                }
            }
        }
    }

    /// Where an event goes and what it is called: computed before the partition lock.
    fn place<E: Event>(&self, event: &E) -> Placement<'_> {
        let route = self.route::<E>();
        let partition = route.topic.partition_for(event.key());
        let timestamp = SystemTime::now();
        Placement {
            route,
            partition,
            id: new_id(timestamp),
            timestamp,
        }
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
        Partition::take_graveyard(state, garbage);
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
        let erased: Erased = Arc::new(Inner {
            meta: Metadata {
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
        });
        if !route.slots.is_empty() {
            self.pending.fetch_add(route.slots.len(), Ordering::SeqCst);
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

    /// Whether the bus still takes events from outside.
    pub(crate) fn is_open(&self) -> bool {
        self.intake_open.load(Ordering::SeqCst)
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
                    self.pending.fetch_add(1, Ordering::SeqCst);
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

    /// Marks `n` deliveries or requests as finished.
    pub(crate) fn finish(&self, n: usize) {
        // Wake `settled` callers only if there are any: the bus goes idle after every request
        // of a sequential round trip, and a notification costs a lock.
        if self.pending.fetch_sub(n, Ordering::SeqCst) == n
            && self.settling.load(Ordering::SeqCst) > 0
        {
            self.idle.notify_waiters();
        }
    }

    /// Marks `n` requests as finished (answered, or refused).
    pub(crate) fn finish_requests(&self, n: usize) {
        self.requests.fetch_sub(n, Ordering::SeqCst);
        self.finish(n);
    }

    pub(crate) fn record_failure(&self, failure: impl FnOnce() -> Failure) {
        if let Some(recorder) = &self.recorder {
            lock(&recorder.failures).push(failure());
        }
    }

    async fn settled(&self) {
        struct Settling<'a>(&'a AtomicUsize);
        impl Drop for Settling<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.settling.fetch_add(1, Ordering::SeqCst);
        let _settling = Settling(&self.settling);
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    fn all_topics(&self) -> Vec<Arc<Topic>> {
        let mut topics: Vec<Arc<Topic>> = self.topics.clone();
        let mut extra: Vec<Arc<Topic>> = self
            .unsubscribed_topics
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        extra.sort_by(|a, b| a.name.cmp(&b.name));
        topics.extend(extra);
        topics
    }

    fn close_queues(&self) {
        for entry in self.commands.values() {
            (entry.stop)();
        }
        for topic in self.all_topics() {
            for part in topic.partitions.iter() {
                part.close();
            }
        }
    }

    fn stats(&self) -> Stats {
        use std::sync::atomic::Ordering::Relaxed;
        let mut topics = Vec::new();
        for topic in self.all_topics() {
            let mut published = Vec::with_capacity(topic.partitions.len());
            let mut groups: Vec<GroupStats> = topic
                .groups
                .iter()
                .map(|name| GroupStats {
                    group: name.clone(),
                    ..GroupStats::default()
                })
                .collect();
            for (p, part) in topic.partitions.iter().enumerate() {
                let state = part.lock();
                published.push(state.next_offset);
                for (slot, group) in groups.iter_mut().enumerate() {
                    let q = &state.queues[slot];
                    let w = &topic.worker_stats[slot][p];
                    let handled = w.handled.load(Relaxed);
                    let failed = w.failed.load(Relaxed);
                    let mut next = w.next_offset.load(Relaxed);
                    let durable = self.durable.is_some();
                    if durable && q.items.is_empty() && !q.lagging {
                        next = next.max(q.skipped_to);
                    }
                    let lag = if durable {
                        state.next_offset.saturating_sub(next)
                    } else {
                        q.delivered.saturating_sub(handled + failed + q.dropped)
                    };
                    let ps = PartitionStats {
                        partition: p as u32,
                        published: state.next_offset,
                        delivered: q.delivered,
                        handled,
                        duplicates: w.duplicates.load(Relaxed),
                        failed,
                        dropped: q.dropped,
                        panics: w.panics.load(Relaxed),
                        restarts: w.restarts.load(Relaxed),
                        depth: q.items.len() as u64,
                        lag,
                        committed: next.checked_sub(1),
                    };
                    group.add(ps);
                }
            }
            for group in &mut groups {
                if let Some(dlq) = self.dead_letters.get(&group.group) {
                    let counts = dlq.counts();
                    group.dead_letters = counts.depth;
                    group.dead_lettered = counts.total;
                    group.redriven = counts.redriven;
                    group.discarded = counts.discarded;
                }
            }
            topics.push(TopicStats {
                topic: topic.name.clone(),
                partitions: topic.partitions.len() as u32,
                published: published.iter().sum(),
                published_per_partition: published,
                unrouted: topic.unrouted.load(Relaxed),
                groups,
            });
        }
        Stats {
            topics,
            pending: self.pending.load(Relaxed) as u64,
        }
    }
}
