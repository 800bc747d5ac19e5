//! Building a bus: topics, subscriptions, command handlers, checked at build time.

use std::any::TypeId;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use futures::future::BoxFuture;
use rustc_hash::FxHashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Bus, BusInner, HandleGuard};
use crate::command::{Command, CommandMessage};
use crate::core::pending::Pending;
use crate::core::queue::Topic;
use crate::core::request::CommandEntry;
use crate::core::route::Route;
use crate::core::{Core, Log, Recorder};
use crate::dead_letter::{DeadLetterPolicy, DeadLetterQueue, Redelivery};
use crate::delivery::DeliveryMode;
use crate::durable::{Durable, Engine};
use crate::error::BuildError;
use crate::event::{validate_topic_name, Event};
use crate::handler::CommandHandler;
use crate::handler::{AnyHandler, Handler};
use crate::middleware::{Dedup, DedupWindow, LayerKind, LayerSpec, Middleware};
use crate::store::{Decoder, Retention, StartFrom, Store, Upcaster, DEFAULT_MAX_PAYLOAD};
use crate::topic::{default_partitions, Overflow, TopicConfig};
use crate::window::Window;
use crate::worker::{self, Factory, Typed, Untyped, WorkerArgs};

/// Settings of one subscription, that is of one consumer group.
///
/// A `&str` or `String` converts into a subscription with the defaults.
///
/// # Supervision
///
/// - A handler that returns an error gets the event again (attempt 2, 3, …) before any later
///   event of its partition, up to [`max_deliveries`](Subscription::max_deliveries) (default 3)
///   deliveries in all, at once — or as a [`Retry`](crate::Retry) layer says, with backoff; a
///   [permanent](crate::HandlerError::permanent) error is not redelivered.
/// - A handler that panics is caught; the panic is logged with the event's ids and counted, the
///   handler is replaced by a fresh instance from its factory after a
///   [restart backoff](Subscription::restart_backoff) (should the factory panic too, the old
///   instance is kept and the error logged), and the event counts as a failed attempt.
/// - After the last attempt the event is given up on: logged at `error` level, counted in
///   [`Bus::stats`](crate::Bus::stats), recorded in [`Bus::failures`](crate::Bus::failures)
///   when recording, put in the group's [dead-letter queue](crate::DeadLetters) (see
///   [`dead_letter`](Subscription::dead_letter); at-most-once delivery drops it instead), and
///   the partition moves on.
///
/// [Middleware](crate::middleware) wraps the handler: see [`layer`](Subscription::layer).
///
/// ```
/// use std::time::Duration;
/// use tidings::{RestartBackoff, Subscription};
///
/// let billing = Subscription::new("billing")
///     .max_deliveries(5)
///     .restart_backoff(RestartBackoff::new(Duration::from_millis(50), Duration::from_secs(5)))
///     .batch_size(64);
/// ```
#[derive(Debug, Clone)]
pub struct Subscription {
    pub(crate) group: String,
    pub(crate) max_deliveries: Option<u32>,
    pub(crate) restart_backoff: RestartBackoff,
    pub(crate) batch_size: usize,
    /// In declaration order: innermost first.
    pub(crate) layers: Vec<LayerSpec>,
    pub(crate) delivery: DeliveryMode,
    pub(crate) dead_letter: DeadLetterPolicy,
    pub(crate) redelivery: Option<Redelivery>,
    pub(crate) start: StartFrom,
    pub(crate) reset: bool,
}

impl Subscription {
    /// A subscription for the consumer group `group` with the default settings.
    pub fn new(group: impl Into<String>) -> Self {
        Subscription {
            group: group.into(),
            max_deliveries: None,
            restart_backoff: RestartBackoff::default(),
            batch_size: 128,
            layers: Vec::new(),
            delivery: DeliveryMode::default(),
            dead_letter: DeadLetterPolicy::default(),
            redelivery: None,
            start: StartFrom::Latest,
            reset: false,
        }
    }

    /// How many times an event is delivered at most, one right after the other, before it is
    /// dead-lettered (at least 1; default 3), when the subscription has no [`Retry`](crate::Retry) layer.
    /// With a `Retry` layer, the layer decides, and setting this is a build error.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }

    /// Wraps the handler, and every layer declared before, in `layer`: the last layer declared
    /// sees each event first. See [the middleware module](crate::middleware) for what each
    /// order means.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tidings::{Dedup, DedupWindow, Retry, Subscription, Timeout};
    ///
    /// let billing = Subscription::new("billing")
    ///     .layer(Timeout::new(Duration::from_secs(5)))   // each attempt
    ///     .layer(Retry::new(5))                         // up to 5 attempts
    ///     .layer(Dedup::new(DedupWindow::new()));       // duplicates skipped first
    /// ```
    pub fn layer<M: Middleware>(mut self, layer: M) -> Self {
        self.layers.push(LayerSpec::new(layer));
        self
    }

    /// When events are acknowledged: see [`DeliveryMode`] (default at-least-once).
    pub fn delivery(mut self, mode: DeliveryMode) -> Self {
        self.delivery = mode;
        self
    }

    /// What happens to events that failed their last attempt: see [`DeadLetterPolicy`]
    /// (default: parked in the group's dead-letter queue while the partition moves on).
    pub fn dead_letter(mut self, policy: DeadLetterPolicy) -> Self {
        self.dead_letter = policy;
        self
    }

    /// Redelivers dead-lettered events automatically after delays, while the partition goes on:
    /// see [`Redelivery`]. With [`DeadLetterPolicy::Sequenced`], only the failed key waits.
    pub fn redelivery(mut self, redelivery: Redelivery) -> Self {
        self.redelivery = Some(redelivery);
        self
    }

    /// With a store: where this group starts reading when it has no committed offset yet (a new
    /// group). Default [`StartFrom::Latest`]: only events published from now on. A projection
    /// rebuilt from scratch uses [`StartFrom::Earliest`] under a new group name (or
    /// [`reset_to`](Subscription::reset_to)). Without a store, anything but `Latest` is a build
    /// error: there is no log to read.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tidings::{StartFrom, Subscription};
    ///
    /// let audit = Subscription::new("audit").start_from(StartFrom::Earliest);
    /// let recent = Subscription::new("recent")
    ///     .start_from(StartFrom::Timestamp(SystemTime::now() - Duration::from_secs(3600)));
    /// ```
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// With a store: moves this group's offsets to `start` when the bus starts, whatever it
    /// had committed (replay from the beginning, or skip a backlog). The new position is
    /// committed at once. Remove the call after the restart that needed it, or every restart
    /// resets the group again.
    pub fn reset_to(mut self, start: StartFrom) -> Self {
        self.start = start;
        self.reset = true;
        self
    }

    /// The consumer group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    pub(crate) fn effective_max_deliveries(&self) -> u32 {
        self.max_deliveries.unwrap_or(3)
    }

    fn has(&self, kind: LayerKind) -> bool {
        self.layers.iter().any(|l| l.kind == kind)
    }

    /// Checks the settings, and adds what the delivery mode needs.
    fn prepare(&mut self) -> Result<(), BuildError> {
        let group = &self.group;
        let invalid =
            |what: String| BuildError::InvalidSetting(format!("subscription {group:?}: {what}"));
        if self.max_deliveries == Some(0) {
            return Err(invalid("max_deliveries must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size must be at least 1".into()));
        }
        for layer in &self.layers {
            layer.check.clone().map_err(invalid)?;
        }
        if self
            .redelivery
            .as_ref()
            .is_some_and(|r| r.delays.is_empty())
        {
            return Err(invalid(
                "Redelivery::after got no delays, so it would never redeliver; give at least one delay, or leave redelivery unset".into(),
            ));
        }
        if self.restart_backoff.initial > self.restart_backoff.max {
            return Err(invalid(format!(
                "RestartBackoff: the initial delay ({:?}) must not exceed the maximum ({:?})",
                self.restart_backoff.initial, self.restart_backoff.max
            )));
        }
        let retries = self.has(LayerKind::Retry);
        if retries && self.max_deliveries.is_some() {
            return Err(invalid(
                "max_deliveries and a Retry layer both set the attempts; keep one (Retry::new(n) for n attempts)".into(),
            ));
        }
        if self.delivery == DeliveryMode::AtMostOnce {
            if retries || self.max_deliveries.is_some_and(|n| n > 1) {
                return Err(invalid(
                    "at-most-once delivery never redelivers; remove the Retry layer or max_deliveries".into(),
                ));
            }
            if self.dead_letter == DeadLetterPolicy::Sequenced {
                return Err(invalid(
                    "at-most-once delivery drops failed events; a sequenced dead-letter queue needs at-least-once".into(),
                ));
            }
            if self.redelivery.is_some() {
                return Err(invalid(
                    "at-most-once delivery drops failed events; redelivery needs at-least-once"
                        .into(),
                ));
            }
        }
        if self.delivery == DeliveryMode::EffectivelyOnce && !self.has(LayerKind::Dedup) {
            self.layers
                .push(LayerSpec::new(Dedup::new(DedupWindow::default())));
        }
        Ok(())
    }

    /// How long to wait before restarting a handler that panicked.
    pub fn restart_backoff(mut self, backoff: RestartBackoff) -> Self {
        self.restart_backoff = backoff;
        self
    }

    /// How many events a worker takes from its queue at once (at least 1; default 128).
    /// Larger batches mean fewer lock round trips; the queue's capacity still bounds what waits.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }
}

impl From<&str> for Subscription {
    fn from(group: &str) -> Self {
        Subscription::new(group)
    }
}

impl From<String> for Subscription {
    fn from(group: String) -> Self {
        Subscription::new(group)
    }
}

/// Delay before restarting a panicked handler: `initial`, doubled after each consecutive panic,
/// at most `max`. Default 10 ms up to 1 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBackoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

impl RestartBackoff {
    /// A backoff from `initial` doubling up to `max`. `initial` must not exceed `max` (checked
    /// by [`BusBuilder::build`]); zero restarts at once.
    pub fn new(initial: Duration, max: Duration) -> Self {
        RestartBackoff { initial, max }
    }
}

impl Default for RestartBackoff {
    fn default() -> Self {
        RestartBackoff::new(Duration::from_millis(10), Duration::from_secs(1))
    }
}

type Spawner = Arc<dyn Fn(WorkerArgs) -> BoxFuture<'static, ()> + Send + Sync>;

struct SubSpec {
    options: Subscription,
    topic: String,
    /// `None`: every type of the topic.
    accepts: Option<TypeId>,
    handler_name: &'static str,
    spawn: Spawner,
}

type CommandStart = Box<dyn FnOnce(Arc<Core>) -> BoxFuture<'static, ()> + Send>;
/// Makes a command handler's queue: the type-erased sender, and what starts its task.
type CommandMake = Box<dyn FnOnce(usize) -> (CommandEntry, CommandStart) + Send>;

struct CmdSpec {
    type_id: TypeId,
    name: &'static str,
    make: CommandMake,
}

/// Builds a [`Bus`]: topics, subscriptions and command handlers, all checked by
/// [`build`](BusBuilder::build).
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use tidings::{Bus, Context, Envelope, Event, Handler, HandlerError, TopicConfig};
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id)]
/// struct OrderPlaced { order_id: u64 }
///
/// #[derive(Default)]
/// struct Mailer;
/// impl Handler<OrderPlaced> for Mailer {
///     async fn handle(&mut self, _: &Envelope<OrderPlaced>, _: &Context) -> Result<(), HandlerError> {
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tidings::BuildError> {
/// let bus = Bus::builder()
///     .topic(TopicConfig::new("orders").partitions(4))
///     .subscribe::<OrderPlaced, _>("mailer", Mailer::default)
///     .build()?;
/// # bus.shutdown().await; Ok(()) }
/// ```
pub struct BusBuilder {
    topics: Vec<TopicConfig>,
    subs: Vec<SubSpec>,
    commands: Vec<CmdSpec>,
    request_timeout: Duration,
    command_capacity: usize,
    record: bool,
    publish_dedup: Option<DedupWindow>,
    store: Option<Arc<dyn Store>>,
    upcasters: Vec<Upcaster>,
    max_payload: usize,
    commit_interval: Duration,
    retention_interval: Duration,
}

impl Default for BusBuilder {
    fn default() -> Self {
        BusBuilder::new()
    }
}

impl BusBuilder {
    /// An empty builder; same as [`Bus::builder`].
    pub fn new() -> Self {
        BusBuilder {
            topics: Vec::new(),
            subs: Vec::new(),
            commands: Vec::new(),
            request_timeout: Duration::from_secs(30),
            command_capacity: 1024,
            record: false,
            publish_dedup: None,
            store: None,
            upcasters: Vec::new(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            commit_interval: Duration::from_millis(100),
            retention_interval: Duration::from_secs(60),
        }
    }

    /// Keeps the topics' logs and the groups' offsets in `store`: the bus becomes durable.
    /// Everything else (handlers, subscriptions, middleware) stays as it is. See the
    /// [`Store`] docs for what changes.
    ///
    /// ```
    /// use tidings::{Bus, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tidings::BuildError> {
    /// let bus = Bus::builder()
    ///     .store(MemoryStore::new()) // or SqliteStore::open("events.db").await?, PostgresStore::connect(url).await?
    ///     .build()?;
    /// # bus.shutdown().await; Ok(()) }
    /// ```
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Registers an [`Upcaster`] for rows read back from the store. Two for the same type and
    /// version are a build error.
    pub fn upcaster(mut self, upcaster: Upcaster) -> Self {
        self.upcasters.push(upcaster);
        self
    }

    /// With a store: the largest serialized event `publish` accepts, in bytes; larger ones are
    /// refused with [`PublishError::TooLarge`](crate::PublishError::TooLarge). Default
    /// [`DEFAULT_MAX_PAYLOAD`] (1 MiB).
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// With a store: how often the groups' offsets are committed (and at shutdown). After a
    /// crash a group handles again what it handled since its last commit. Default 100 ms.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// With a store: how often topics' [retention](crate::Retention) is applied. Default 60 s.
    pub fn retention_interval(mut self, interval: Duration) -> Self {
        self.retention_interval = interval;
        self
    }

    /// Configures a topic. Topics that are only subscribed to get the defaults of
    /// [`TopicConfig::new`].
    pub fn topic(mut self, config: TopicConfig) -> Self {
        self.topics.push(config);
        self
    }

    /// Subscribes a consumer group to events of type `E`.
    ///
    /// `factory` creates the handler: once per partition of `E`'s topic at build, and again
    /// whenever a handler is restarted after a panic. The group receives every `E` published
    /// after `build`.
    pub fn subscribe<E, H>(
        mut self,
        subscription: impl Into<Subscription>,
        factory: impl Fn() -> H + Send + Sync + 'static,
    ) -> Self
    where
        E: Event,
        H: Handler<E>,
    {
        let factory: Factory<H> = Arc::new(factory);
        self.subs.push(SubSpec {
            options: subscription.into(),
            topic: E::TOPIC.to_owned(),
            accepts: Some(TypeId::of::<E>()),
            handler_name: std::any::type_name::<H>(),
            spawn: Arc::new(move |args| {
                Box::pin(worker::run(Typed::<E, H>::new(Arc::clone(&factory)), args))
            }),
        });
        self
    }

    /// Subscribes a consumer group to every event type of `topic`, in partition order.
    ///
    /// With a store the group consumes every row of the topic's log: a row it cannot read back
    /// as an event of `topic` (an unknown type, a failed upcast, a registered type of another
    /// topic) goes to its dead-letter queue as an [`Undecodable`](crate::Undecodable).
    pub fn subscribe_all<H: AnyHandler>(
        mut self,
        topic: impl Into<String>,
        subscription: impl Into<Subscription>,
        factory: impl Fn() -> H + Send + Sync + 'static,
    ) -> Self {
        let factory: Factory<H> = Arc::new(factory);
        self.subs.push(SubSpec {
            options: subscription.into(),
            topic: topic.into(),
            accepts: None,
            handler_name: std::any::type_name::<H>(),
            spawn: Arc::new(move |args| {
                Box::pin(worker::run(Untyped::new(Arc::clone(&factory)), args))
            }),
        });
        self
    }

    /// Registers the one handler of command type `C`. A second handler for the same type is a
    /// [`BuildError::DuplicateCommandHandler`]. After a panic it is restarted from `factory`
    /// with the default [`RestartBackoff`] (10 ms doubling to 1 s).
    pub fn command_handler<C, H>(mut self, factory: impl Fn() -> H + Send + Sync + 'static) -> Self
    where
        C: Command,
        H: CommandHandler<C>,
    {
        let factory: Factory<H> = Arc::new(factory);
        self.commands.push(CmdSpec {
            type_id: TypeId::of::<C>(),
            name: std::any::type_name::<C>(),
            make: Box::new(move |capacity| {
                let (tx, rx) = mpsc::channel::<CommandMessage<C>>(capacity);
                let start: CommandStart = Box::new(move |bus| {
                    let handler = factory();
                    Box::pin(worker::run_commands::<C, H>(
                        handler,
                        factory,
                        rx,
                        bus,
                        super::RestartBackoff::default(),
                    ))
                });
                let stopper = tx.clone();
                let entry = CommandEntry {
                    sender: Box::new(tx),
                    // Sent once shutdown has drained every request, so there is room.
                    stop: Box::new(move || {
                        if let Err(mpsc::error::TrySendError::Full(_)) = stopper.try_send(None) {
                            // Only when the last handle is dropped with requests still queued:
                            // queue the stop behind them.
                            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                                let stopper = stopper.clone();
                                runtime.spawn(async move {
                                    let _ = stopper.send(None).await;
                                });
                            }
                        }
                    }),
                };
                (entry, start)
            }),
        });
        self
    }

    /// Default timeout of [`Bus::request`] (default 30 s). Must be above zero (checked by
    /// [`build`](BusBuilder::build)).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Capacity of each command handler's queue (default 1024). While the handler is busy, its
    /// task moves waiting requests aside to keep their deadlines, so requesters rarely wait for
    /// room; what is set aside is bounded by the deadlines (expired requests are answered and
    /// dropped).
    pub fn command_capacity(mut self, capacity: usize) -> Self {
        self.command_capacity = capacity;
        self
    }

    /// Producer-side deduplication: a publish that gives an event id
    /// ([`PublishOptions::id`](crate::PublishOptions::id)) already published on the same topic
    /// within `window` is accepted once; the repeat returns the first one's receipt, marked
    /// [`duplicate`](crate::Published::duplicate), and publishes nothing. Publishes without an
    /// explicit id are never duplicates (the bus makes a fresh id).
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// use tidings::{Bus, DedupWindow, Event, PublishOptions, Uuid};
    /// # #[derive(Serialize, Deserialize, Event)]
    /// # #[event(topic = "orders", key = order_id)]
    /// # struct OrderPlaced { order_id: u64 }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let bus = Bus::builder().dedup_publishes(DedupWindow::new()).build().unwrap();
    /// let id = Uuid::now_v7(); // e.g. the id of the web request that places the order
    /// let first = bus.publish_with(OrderPlaced { order_id: 1 }, PublishOptions::new().id(id)).await.unwrap();
    /// let again = bus.publish_with(OrderPlaced { order_id: 1 }, PublishOptions::new().id(id)).await.unwrap();
    /// assert!(!first.duplicate && again.duplicate);
    /// assert_eq!(again.offset, first.offset);
    /// # bus.shutdown().await; }
    /// ```
    pub fn dedup_publishes(mut self, window: DedupWindow) -> Self {
        self.publish_dedup = Some(window);
        self
    }

    /// Records every published event and every failure, for [`Bus::published`] and
    /// [`Bus::failures`]. Meant for tests: the record grows without bound.
    pub fn record(mut self, record: bool) -> Self {
        self.record = record;
        self
    }

    /// Checks the configuration, starts one worker task per partition of every subscription and
    /// one per command handler, and returns the bus.
    ///
    /// # Errors
    ///
    /// A [`BuildError`] for zero partitions or capacity, invalid or duplicate topic and group
    /// names, duplicate command handlers, settings out of range, a handler factory that
    /// panicked, or no tokio runtime.
    pub fn build(mut self) -> Result<Bus, BuildError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        self.validate()?;
        for sub in &mut self.subs {
            sub.options.prepare()?;
        }
        if let Some(window) = &self.publish_dedup {
            window.validate().map_err(BuildError::InvalidSetting)?;
        }
        self.validate_store()?;
        let decoder = Decoder::new(std::mem::take(&mut self.upcasters))
            .map_err(BuildError::InvalidSetting)?;

        // Topics: configured ones first, then those only subscribed to, in declaration order.
        let mut configs: Vec<TopicConfig> = self.topics.clone();
        for sub in &self.subs {
            if !configs.iter().any(|c| c.name == sub.topic) {
                configs.push(TopicConfig::new(sub.topic.clone()));
            }
        }
        let mut topics = Vec::with_capacity(configs.len());
        let mut topic_index = HashMap::new();
        let mut typed_slots: HashMap<(usize, TypeId), Vec<usize>> = HashMap::new();
        let mut any_slots = Vec::with_capacity(configs.len());
        let mut placements = Vec::with_capacity(self.subs.len());
        for (index, config) in configs.iter().enumerate() {
            let mut groups = Vec::new();
            let mut anys = Vec::new();
            for (sub_index, sub) in self.subs.iter().enumerate() {
                if sub.topic != config.name {
                    continue;
                }
                if sub.options.redelivery.is_some() && config.overflow == Overflow::DropOldest {
                    return Err(BuildError::InvalidSetting(format!(
                        "subscription {:?}: redelivery on topic {:?}, whose Overflow::DropOldest could drop a redelivered event",
                        sub.options.group, config.name
                    )));
                }
                let slot = groups.len();
                groups.push(sub.options.group.clone());
                match sub.accepts {
                    Some(type_id) => typed_slots.entry((index, type_id)).or_default().push(slot),
                    None => anys.push(slot),
                }
                placements.push((sub_index, index, slot));
            }
            let partitions = config.partitions.unwrap_or_else(|| {
                if self.store.is_some() {
                    1
                } else {
                    default_partitions()
                }
            });
            if let Some(stored) = self
                .store
                .as_ref()
                .and_then(|s| s.known_partitions(&config.name))
            {
                if stored > partitions {
                    return Err(BuildError::FewerPartitionsThanStored {
                        topic: config.name.clone(),
                        configured: partitions,
                        stored,
                    });
                }
            }
            topics.push(Arc::new(Topic::new(config, partitions, groups)));
            topic_index.insert(config.name.clone(), index);
            any_slots.push(anys);
        }

        let mut commands = FxHashMap::default();
        let mut command_starts = Vec::new();
        for spec in self.commands {
            let (entry, start) = (spec.make)(self.command_capacity);
            commands.insert(spec.type_id, entry);
            command_starts.push((spec.name, start));
        }

        let durable = self.store.take().map(|store| {
            let retention = configs
                .iter()
                .map(|c| (c.name.clone(), c.retention))
                .collect();
            Arc::new(Durable::new(
                store,
                Arc::new(decoder),
                self.max_payload,
                self.commit_interval,
                self.retention_interval,
                retention,
            ))
        });
        let mut core = Core {
            topics,
            topic_index,
            typed_slots,
            any_slots,
            routes: FxHashMap::default(),
            dynamic_routes: DashMap::new(),
            unsubscribed_topics: DashMap::new(),
            commands,
            request_timeout: self.request_timeout,
            pending: Pending::default(),
            intake_open: AtomicBool::new(true),
            cancel: CancellationToken::new(),
            recorder: self.record.then(Recorder::default),
            publish_dedup: self
                .publish_dedup
                .map(|w| parking_lot::Mutex::new(Window::unbatched(w))),
            append: durable
                .as_ref()
                .map(|d| Arc::clone(d) as Arc<dyn crate::core::append::Append>),
            log: durable.as_ref().map(|d| Log {
                store: Arc::clone(&d.store),
                decoder: Arc::clone(&d.decoder),
                stop: d.stop.clone(),
            }),
        };
        if durable.is_some() {
            // Every group starts by reading the log from its committed offset; `settled` waits
            // for it to catch up.
            let mut markers = 0;
            for topic in &core.topics {
                for part in topic.partitions.iter() {
                    let mut state = part.lock();
                    for q in state.queues.iter_mut() {
                        q.lagging = true;
                        q.marker = true;
                        markers += 1;
                    }
                }
            }
            core.pending.add(markers);
        }
        // Routes of the subscribed event types, resolved once.
        let mut routes: FxHashMap<TypeId, Route> = FxHashMap::default();
        for sub in &self.subs {
            if let Some(type_id) = sub.accepts {
                routes.insert(type_id, core.compute_route(&sub.topic, type_id));
            }
        }
        core.routes = routes;
        let core = Arc::new(core);
        let mut dead_letters = HashMap::new();
        for &(sub_index, topic_index, slot) in &placements {
            let options = &self.subs[sub_index].options;
            dead_letters.insert(
                options.group.clone(),
                Arc::new(DeadLetterQueue::new(
                    options.group.clone(),
                    options.dead_letter,
                    options.redelivery.clone(),
                    Arc::clone(&core.topics[topic_index]),
                    slot,
                )),
            );
        }
        for queue in dead_letters.values() {
            let _ = queue
                .bus
                .set((Arc::downgrade(&core), Arc::downgrade(queue)));
        }
        let inner = Arc::new(BusInner {
            core: Arc::clone(&core),
            tasks: Mutex::new(Vec::new()),
            dead_letters,
            shutdown: Mutex::new(None),
            durable: durable.clone(),
        });
        // Make every handler first (the factories run here), and spawn only when all are
        // made: a factory that panics is a build error, with no task left behind.
        let mut workers: Vec<BoxFuture<'static, ()>> = Vec::new();
        let mut making = String::new();
        let made = std::panic::catch_unwind(AssertUnwindSafe(|| {
            for (sub_index, topic_index, slot) in placements {
                let sub = &self.subs[sub_index];
                let topic = &core.topics[topic_index];
                making.clone_from(&sub.options.group);
                for partition in 0..topic.partitions.len() as u32 {
                    let args = WorkerArgs {
                        core: Arc::clone(&core),
                        durable: durable.clone(),
                        topic: Arc::clone(topic),
                        slot,
                        partition,
                        options: sub.options.clone(),
                        handler_name: sub.handler_name,
                        dead_letters: Arc::clone(&inner.dead_letters[&sub.options.group]),
                    };
                    workers.push((sub.spawn)(args));
                }
            }
            for (name, start) in command_starts {
                making = format!("command handler of {name}");
                workers.push(start(Arc::clone(&core)));
            }
        }));
        if let Err(panic) = made {
            drop(workers);
            return Err(BuildError::FactoryPanicked {
                subscription: making,
                message: worker::panic_message(&*panic),
            });
        }
        if let Some(durable) = &durable {
            let n = core
                .topics
                .iter()
                .map(|t| t.groups.len() * t.partitions.len())
                .sum();
            durable.expect_workers(n);
        }
        let tasks = workers.into_iter().map(|w| runtime.spawn(w)).collect();
        *crate::core::lock(&inner.tasks) = tasks;
        if let Some(d) = durable {
            Durable::start(
                &Engine {
                    core: Arc::clone(&core),
                    d,
                },
                &runtime,
            );
        }
        Ok(Bus {
            _guard: Some(Arc::new(HandleGuard(Arc::downgrade(&inner)))),
            inner,
        })
    }

    /// Settings that need a store, and settings a store rules out.
    fn validate_store(&self) -> Result<(), BuildError> {
        let durable = self.store.is_some();
        for sub in &self.subs {
            let o = &sub.options;
            if !durable && (o.start != StartFrom::Latest || o.reset) {
                return Err(BuildError::InvalidSetting(format!(
                    "subscription {:?}: start_from / reset_to need a store (BusBuilder::store): without one there is no log to read",
                    o.group
                )));
            }
        }
        if durable {
            for sub in &self.subs {
                let pinned = self
                    .topics
                    .iter()
                    .any(|c| c.name == sub.topic && c.partitions.is_some());
                if !pinned {
                    return Err(BuildError::InvalidSetting(format!(
                        "topic {:?}: with a store, give it a partition count (BusBuilder::topic(TopicConfig::new({:?}).partitions(n))): the default follows the machine's cores, and a durable topic's partitions must not change between runs",
                        sub.topic, sub.topic
                    )));
                }
            }
        }
        for config in &self.topics {
            if !durable && config.retention != Retention::KeepAll {
                return Err(BuildError::InvalidSetting(format!(
                    "topic {:?}: retention needs a store (BusBuilder::store)",
                    config.name
                )));
            }
            if durable && config.overflow == Overflow::DropOldest {
                return Err(BuildError::InvalidSetting(format!(
                    "topic {:?}: Overflow::DropOldest has no use with a store: a group whose queue is full reads what it missed from the log, nothing is dropped",
                    config.name
                )));
            }
        }
        if durable {
            if self.max_payload == 0 {
                return Err(BuildError::InvalidSetting(
                    "max_payload must be at least 1 byte".into(),
                ));
            }
            if self.commit_interval.is_zero() || self.retention_interval.is_zero() {
                return Err(BuildError::InvalidSetting(
                    "commit_interval and retention_interval must be above zero".into(),
                ));
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), BuildError> {
        let mut seen = HashSet::new();
        for config in &self.topics {
            validate_topic_name(&config.name)
                .map_err(|reason| BuildError::InvalidTopicName { reason })?;
            if config.partitions == Some(0) {
                return Err(BuildError::ZeroPartitions {
                    topic: config.name.clone(),
                });
            }
            if config.capacity == 0 {
                return Err(BuildError::ZeroCapacity {
                    topic: config.name.clone(),
                });
            }
            match config.retention {
                Retention::MaxAge(age) if age.is_zero() => {
                    return Err(BuildError::InvalidSetting(format!(
                        "topic {:?}: Retention::MaxAge must be above zero (zero deletes every event as soon as it is written)",
                        config.name
                    )))
                }
                Retention::MaxEvents(0) => {
                    return Err(BuildError::InvalidSetting(format!(
                        "topic {:?}: Retention::MaxEvents must be at least 1 (zero deletes every event as soon as it is written)",
                        config.name
                    )))
                }
                _ => {}
            }
            if !seen.insert(config.name.as_str()) {
                return Err(BuildError::DuplicateTopic {
                    topic: config.name.clone(),
                });
            }
        }
        let mut groups = HashSet::new();
        for sub in &self.subs {
            let group = &sub.options.group;
            if validate_topic_name(group).is_err() {
                return Err(BuildError::InvalidSubscriptionName {
                    group: group.clone(),
                });
            }
            validate_topic_name(&sub.topic)
                .map_err(|reason| BuildError::InvalidTopicName { reason })?;
            if !groups.insert(group.as_str()) {
                return Err(BuildError::DuplicateSubscription {
                    group: group.clone(),
                });
            }
        }
        let mut commands = HashSet::new();
        for cmd in &self.commands {
            if !commands.insert(cmd.type_id) {
                return Err(BuildError::DuplicateCommandHandler { command: cmd.name });
            }
        }
        if self.request_timeout.is_zero() {
            return Err(BuildError::InvalidSetting(
                "request_timeout must be above zero (every request would time out)".into(),
            ));
        }
        if self.command_capacity == 0 {
            return Err(BuildError::InvalidSetting(
                "command_capacity must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for BusBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusBuilder")
            .field("topics", &self.topics)
            .field(
                "subscriptions",
                &self
                    .subs
                    .iter()
                    .map(|s| &s.options.group)
                    .collect::<Vec<_>>(),
            )
            .field(
                "commands",
                &self.commands.iter().map(|c| c.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}
