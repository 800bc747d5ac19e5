//! Building a bus: topics, subscriptions, command handlers, checked at build time.

use std::any::TypeId;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use futures::future::BoxFuture;
use rustc_hash::FxHashMap;
use tokio_util::sync::CancellationToken;

use super::handles::{EventSet, Handles};
use super::plan::Plan;
use super::spec::{CmdSpec, SubSpec};
use super::{Bus, BusInner, HandleGuard};
use crate::command::Command;
use crate::core::pending::Pending;
use crate::core::route::Route;
use crate::core::{Core, Log, Recorder};
use crate::dead_letter::DeadLetterQueue;
use crate::durable::{Durable, Engine};
use crate::error::BuildError;
use crate::handler::AnyHandler;
use crate::handler::CommandHandler;
use crate::middleware::DedupWindow;
use crate::runtime::command_options::CommandOptions;
use crate::runtime::dispatch::panic_message;
use crate::runtime::subscription::Subscription;
use crate::runtime::worker::WorkerArgs;
use crate::store::{Decoder, Store, Upcaster, DEFAULT_MAX_PAYLOAD};
use crate::topic::TopicConfig;
use crate::window::Window;

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
    pub(super) topics: Vec<TopicConfig>,
    pub(super) subs: Vec<SubSpec>,
    pub(super) commands: Vec<CmdSpec>,
    /// Names of the [`Module`](super::Module)s added.
    pub(super) modules: Vec<String>,
    pub(super) request_timeout: Duration,
    pub(super) command_capacity: usize,
    pub(super) record: bool,
    pub(super) publish_dedup: Option<DedupWindow>,
    pub(super) store: Option<Arc<dyn Store>>,
    pub(super) upcasters: Vec<Upcaster>,
    pub(super) max_payload: usize,
    pub(super) commit_interval: Duration,
    pub(super) retention_interval: Duration,
    pub(super) poll_interval: Duration,
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
            modules: Vec::new(),
            request_timeout: Duration::from_secs(30),
            command_capacity: 1024,
            record: false,
            publish_dedup: None,
            store: None,
            upcasters: Vec::new(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            commit_interval: Duration::from_millis(100),
            retention_interval: Duration::from_secs(60),
            poll_interval: Duration::from_millis(250),
        }
    }

    /// Keeps the topics' logs and the groups' offsets in `store`: the bus becomes durable.
    /// Everything else (handlers, subscriptions, middleware) stays as it is. See the
    /// [`Store`] docs for what changes.
    ///
    /// ```
    /// use tidings::store::MemoryStore;
    /// use tidings::Bus;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tidings::BuildError> {
    /// let bus = Bus::builder()
    ///     .store(MemoryStore::new()) // or SqliteStore::open("events.db").await?, PostgresStore::connect(url).await?
    ///     .build()?;
    /// # bus.shutdown().await; Ok(()) }
    /// ```
    #[must_use]
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Registers an [`Upcaster`] for rows read back from the store. Two for the same type and
    /// version are a build error.
    #[must_use]
    pub fn upcaster(mut self, upcaster: Upcaster) -> Self {
        self.upcasters.push(upcaster);
        self
    }

    /// With a store: the largest serialized event `publish` accepts, in bytes; larger ones are
    /// refused with [`PublishError::TooLarge`](crate::PublishError::TooLarge). Default
    /// [`DEFAULT_MAX_PAYLOAD`] (1 MiB).
    #[must_use]
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// With a store: how often the groups' offsets are committed (and at shutdown). After a
    /// crash a group handles again what it handled since its last commit. Default 100 ms.
    #[must_use]
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// With a store: how often topics' [retention](crate::store::Retention) is applied.
    /// Default 60 s.
    #[must_use]
    pub fn retention_interval(mut self, interval: Duration) -> Self {
        self.retention_interval = interval;
        self
    }

    /// With a store: how often the bus reads its partitions' heads (one query) to learn of
    /// events that other writers appended (other processes on the same store, the
    /// application's own transactions), when the store does not announce them. Default 250 ms.
    ///
    /// [`PostgresStore`](crate::store::PostgresStore) announces every append
    /// (`LISTEN`/`NOTIFY`): the bus polls only while its listening connection is down.
    /// [`SqliteStore`](crate::store::SqliteStore) and [`MemoryStore`](crate::store::MemoryStore)
    /// announce nothing: events of other writers reach the groups within this interval (see
    /// [`Log`](crate::store::Log), *More than one writer*). A bus without consumer groups
    /// does not poll. Zero is a build error.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Configures a topic. Topics that are only subscribed to get the defaults of
    /// [`TopicConfig::new`].
    #[must_use]
    pub fn topic(mut self, config: TopicConfig) -> Self {
        self.topics.push(config);
        self
    }

    /// Subscribes a consumer group to events of type `E`, or of each type of a tuple of them
    /// (an [`EventSet`]): `subscribe::<(OrderPlaced, OrderPaid), _>` for a handler that
    /// implements both `Handler<OrderPlaced>` and `Handler<OrderPaid>`. The group gets them in
    /// partition order, so per key in publish order across types (see [`Handles`]); a set
    /// whose types span topics reads each topic, in order per topic only.
    ///
    /// `factory` creates the handler: once per partition of the topic at build, and again
    /// whenever a handler is restarted after a panic. The group receives every event of its
    /// types published after `build` (with a store, from where
    /// [`start_from`](Subscription::start_from) says).
    ///
    /// To give handlers shared state without cloning it into each factory, register them in a
    /// [`Module`](crate::Module).
    #[must_use]
    pub fn subscribe<E, H>(
        mut self,
        subscription: impl Into<Subscription>,
        factory: impl Fn() -> H + Send + Sync + 'static,
    ) -> Self
    where
        E: EventSet,
        H: Handles<E>,
    {
        self.subs.extend(SubSpec::typed::<E, H>(
            &subscription.into(),
            Arc::new(factory),
        ));
        self
    }

    /// Subscribes a consumer group to every event type of `topic`, in partition order.
    ///
    /// With a store the group consumes every row of the topic's log: a row it cannot read back
    /// as an event of `topic` (an unknown type, a failed upcast, a registered type of another
    /// topic) goes to its dead-letter queue as an [`Undecodable`](crate::store::Undecodable).
    #[must_use]
    pub fn subscribe_all<H: AnyHandler>(
        mut self,
        topic: impl Into<String>,
        subscription: impl Into<Subscription>,
        factory: impl Fn() -> H + Send + Sync + 'static,
    ) -> Self {
        self.subs.push(SubSpec::any(
            topic.into(),
            subscription.into(),
            Arc::new(factory),
        ));
        self
    }

    /// Registers the one handler of command type `C`, as one instance: requests are handled
    /// one at a time, in arrival order. A second handler for the same type is a
    /// [`BuildError::DuplicateCommandHandler`]. After a panic it is restarted from `factory`
    /// with the default [`RestartBackoff`](crate::RestartBackoff) (10 ms doubling to 1 s).
    /// Same as [`command_handler_with`](BusBuilder::command_handler_with) with
    /// [`CommandOptions::new`].
    #[must_use]
    pub fn command_handler<C, H>(self, factory: impl Fn() -> H + Send + Sync + 'static) -> Self
    where
        C: Command,
        H: CommandHandler<C>,
    {
        self.command_handler_with::<C, H>(CommandOptions::new(), factory)
    }

    /// Registers the one handler of command type `C` with [options](CommandOptions): several
    /// instances of it, as a [pool](CommandOptions::pool) (no order between requests) or
    /// [keyed](CommandOptions::keyed) by [`Command::key`] (requests with the same key in
    /// arrival order), and its restart backoff. `factory` makes every instance, at build and
    /// after a panic. A second handler for the same type is a
    /// [`BuildError::DuplicateCommandHandler`]; zero instances a
    /// [`BuildError::InvalidSetting`].
    ///
    /// ```
    /// use tidings::{Bus, Command, CommandHandler, CommandOptions, Context, HandlerError};
    ///
    /// struct Resize { width: u32 }
    /// impl Command for Resize { type Reply = u32; }
    ///
    /// struct Resizer;
    /// impl CommandHandler<Resize> for Resizer {
    ///     async fn handle(&mut self, cmd: Resize, _: &Context) -> Result<u32, HandlerError> {
    ///         Ok(cmd.width / 2)
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let bus = Bus::builder()
    ///     .command_handler_with::<Resize, _>(CommandOptions::pool(8), || Resizer)
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(bus.request(Resize { width: 640 }).await, Ok(320));
    /// # bus.shutdown().await; }
    /// ```
    #[must_use]
    pub fn command_handler_with<C, H>(
        mut self,
        options: CommandOptions,
        factory: impl Fn() -> H + Send + Sync + 'static,
    ) -> Self
    where
        C: Command,
        H: CommandHandler<C>,
    {
        self.commands
            .push(CmdSpec::new::<C, H>(options, Arc::new(factory)));
        self
    }

    /// Default timeout of [`Bus::request`] (default 30 s). Must be above zero (checked by
    /// [`build`](BusBuilder::build)).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Capacity of each command handler's queue (default 1024). While the handler is busy, its
    /// task moves waiting requests aside to keep their deadlines, so requesters rarely wait for
    /// room; what is set aside is bounded by the deadlines (expired requests are answered and
    /// dropped).
    #[must_use]
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
    /// use tidings::middleware::DedupWindow;
    /// use tidings::{Bus, Event, PublishOptions, Uuid};
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
    #[must_use]
    pub fn dedup_publishes(mut self, window: DedupWindow) -> Self {
        self.publish_dedup = Some(window);
        self
    }

    /// Records every published event and every failure, for [`Bus::published`] and
    /// [`Bus::failures`]. Meant for tests: the record grows without bound.
    #[must_use]
    pub fn record(mut self, record: bool) -> Self {
        self.record = record;
        self
    }

    /// Checks the configuration, starts one worker task per partition of every subscription and
    /// one per command handler instance, and returns the bus.
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

        let Plan {
            configs,
            topics,
            topic_index,
            typed_slots,
            any_slots,
            placements,
        } = self.plan()?;

        let (layout, sightings) = self.layout();
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
                self.poll_interval,
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
            }),
            sightings,
        };
        if durable.is_some() {
            core.start_lagging();
        }
        // Routes of the subscribed event types, resolved once.
        let mut routes: FxHashMap<TypeId, Route> = FxHashMap::default();
        for sub in &self.subs {
            for member in sub.accepts.iter().flatten() {
                routes.insert(
                    member.type_id,
                    core.compute_route(member.topic, member.type_id),
                );
            }
        }
        core.routes = routes;
        let core = Arc::new(core);
        // A queue per group and topic: a group whose event set spans topics has several.
        let mut queues: HashMap<String, Vec<Arc<DeadLetterQueue>>> = HashMap::new();
        for &(sub_index, topic_index, slot) in &placements {
            let sub = &self.subs[sub_index];
            let options = &sub.options;
            let siblings = self
                .subs
                .iter()
                .filter(|s| s.options.group == options.group && s.topic != sub.topic)
                .map(|s| s.topic.clone())
                .collect();
            let group = queues.entry(options.group.clone()).or_default();
            let seq_base = (group.len() as u64) << crate::dead_letter::queue::SEQ_SHIFT;
            group.push(Arc::new(DeadLetterQueue::new(
                options.group.clone(),
                options.dead_letter,
                options.redelivery.clone(),
                Arc::clone(&core.topics[topic_index]),
                slot,
                seq_base,
                siblings,
            )));
        }
        let dead_letters: HashMap<String, Arc<[Arc<DeadLetterQueue>]>> = queues
            .into_iter()
            .map(|(group, queues)| (group, queues.into()))
            .collect();
        for queue in dead_letters.values().flat_map(|q| q.iter()) {
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
            layout,
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
                        topic: Arc::clone(topic),
                        slot,
                        partition,
                        options: sub.options.clone(),
                        handler_name: sub.handler_name,
                        dead_letters: inner.dead_letters[&sub.options.group]
                            .iter()
                            .find(|q| q.topic_name() == topic.name)
                            .map(Arc::clone)
                            .expect("a queue per group and topic"),
                    };
                    workers.push((sub.spawn)(args, durable.as_ref()));
                }
            }
            for (name, start) in command_starts {
                making = format!("command handler of {name}");
                workers.extend(start(Arc::clone(&core)));
            }
        }));
        if let Err(panic) = made {
            drop(workers);
            return Err(BuildError::FactoryPanicked {
                subscription: making,
                message: panic_message(&*panic),
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
        // Gauges are sampled only for a recorder installed before the build (the handles of
        // a bus built without one stay no-ops).
        #[cfg(feature = "metrics")]
        if crate::metrics::recording() {
            runtime.spawn(super::stats::sample_gauges(Arc::downgrade(&inner)));
        }
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
            _guard: Some(Arc::new(HandleGuard(Arc::clone(&inner)))),
            inner,
        })
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
