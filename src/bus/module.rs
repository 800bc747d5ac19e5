//! [`Module`]: one part of a modular monolith, its consumer groups and command handlers
//! registered together and given the module's shared state.

use std::sync::Arc;

use super::handles::{EventSet, Handles};
use super::spec::{CmdSpec, SubSpec};
use super::BusBuilder;
use crate::command::Command;
use crate::handler::{AnyHandler, CommandHandler};
use crate::runtime::command_options::CommandOptions;
use crate::runtime::subscription::Subscription;
use crate::topic::TopicConfig;

/// One module of an application: its consumer groups, command handlers and topics, registered
/// together under the module's name, with the state its handlers share.
///
/// A modular monolith is built from modules that talk through events. Each module's file
/// exports one function that returns its `Module`; `main` adds them to the bus with
/// [`BusBuilder::module`]. The state (a database pool, a client, a shared read model; anything
/// `Clone`, typically a struct of `Arc`s) is given once, as axum's `Router::with_state` does,
/// and every factory receives it by reference: no clone per subscription in your code.
///
/// The module's name labels its groups and command handlers in
/// [`Bus::topology`](crate::Bus::topology); group names stay as given (and stay unique across
/// the bus, since they name offsets and dead letters).
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use std::sync::Arc;
/// use tidings::{Bus, Context, Envelope, Event, Handler, HandlerError, Module, TopicConfig};
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id)]
/// struct OrderPlaced { order_id: u64, cents: u64 }
///
/// /// What the billing module's handlers share.
/// #[derive(Clone, Default)]
/// struct Billing { invoices: Arc<std::sync::Mutex<Vec<u64>>> }
///
/// struct Invoicer { billing: Billing }
/// impl Invoicer {
///     fn new(billing: &Billing) -> Self { Invoicer { billing: billing.clone() } }
/// }
/// impl Handler<OrderPlaced> for Invoicer {
///     async fn handle(&mut self, e: &Envelope<OrderPlaced>, _: &Context) -> Result<(), HandlerError> {
///         self.billing.invoices.lock().unwrap().push(e.event().order_id);
///         Ok(())
///     }
/// }
///
/// /// In `billing.rs`: the whole module's wiring.
/// fn billing(state: Billing) -> Module<Billing> {
///     Module::with_state("billing", state)
///         .subscribe::<OrderPlaced, _>("billing.invoices", Invoicer::new)
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let state = Billing::default();
/// let bus = Bus::builder()
///     .topic(TopicConfig::new("orders").partitions(4))
///     .module(billing(state.clone()))
///     .build()?;
/// bus.publish(OrderPlaced { order_id: 1, cents: 990 }).await?;
/// bus.settled().await;
/// assert_eq!(*state.invoices.lock().unwrap(), [1]);
/// # bus.shutdown().await; Ok(()) }
/// ```
pub struct Module<S = ()> {
    pub(super) name: String,
    state: S,
    pub(super) topics: Vec<TopicConfig>,
    pub(super) subs: Vec<SubSpec>,
    pub(super) commands: Vec<CmdSpec>,
}

impl Module<()> {
    /// A module without shared state: its factories receive `&()`.
    pub fn new(name: impl Into<String>) -> Self {
        Module::with_state(name, ())
    }
}

impl<S: Clone + Send + Sync + 'static> Module<S> {
    /// A module whose handler factories receive `&state`.
    pub fn with_state(name: impl Into<String>, state: S) -> Self {
        Module {
            name: name.into(),
            state,
            topics: Vec::new(),
            subs: Vec::new(),
            commands: Vec::new(),
        }
    }

    /// The module's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The module's state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// Configures a topic, as [`BusBuilder::topic`] does: typically one the module publishes
    /// (it owns its events' topic). A topic configured twice across modules is a
    /// [`BuildError::DuplicateTopic`](crate::BuildError::DuplicateTopic).
    #[must_use]
    pub fn topic(mut self, config: TopicConfig) -> Self {
        self.topics.push(config);
        self
    }

    /// Subscribes a consumer group to an event type or a tuple of them, as
    /// [`BusBuilder::subscribe`] does; `factory` gets the module's state.
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use tidings::{Context, Envelope, Event, Handler, HandlerError, Module};
    /// # #[derive(Serialize, Deserialize, Event)]
    /// # #[event(topic = "orders", key = order_id)]
    /// # struct OrderPlaced { order_id: u64 }
    /// # #[derive(Serialize, Deserialize, Event)]
    /// # #[event(topic = "orders", key = order_id)]
    /// # struct OrderPaid { order_id: u64 }
    /// # #[derive(Clone)] struct Db;
    /// struct Orders { db: Db }
    /// # impl Handler<OrderPlaced> for Orders {
    /// #     async fn handle(&mut self, _: &Envelope<OrderPlaced>, _: &Context) -> Result<(), HandlerError> { Ok(()) }
    /// # }
    /// # impl Handler<OrderPaid> for Orders {
    /// #     async fn handle(&mut self, _: &Envelope<OrderPaid>, _: &Context) -> Result<(), HandlerError> { Ok(()) }
    /// # }
    /// let orders = Module::with_state("orders", Db)
    ///     .subscribe::<(OrderPlaced, OrderPaid), _>("orders", |db| Orders { db: db.clone() });
    /// ```
    #[must_use]
    pub fn subscribe<E, H>(
        mut self,
        subscription: impl Into<Subscription>,
        factory: impl Fn(&S) -> H + Send + Sync + 'static,
    ) -> Self
    where
        E: EventSet,
        H: Handles<E>,
    {
        let state = self.state.clone();
        let specs = SubSpec::typed::<E, H>(&subscription.into(), Arc::new(move || factory(&state)));
        for mut spec in specs {
            spec.module = Some(self.name.clone());
            self.subs.push(spec);
        }
        self
    }

    /// Subscribes a consumer group to every event type of `topic`, as
    /// [`BusBuilder::subscribe_all`] does; `factory` gets the module's state.
    #[must_use]
    pub fn subscribe_all<H: AnyHandler>(
        mut self,
        topic: impl Into<String>,
        subscription: impl Into<Subscription>,
        factory: impl Fn(&S) -> H + Send + Sync + 'static,
    ) -> Self {
        let state = self.state.clone();
        let mut spec = SubSpec::any(
            topic.into(),
            subscription.into(),
            Arc::new(move || factory(&state)),
        );
        spec.module = Some(self.name.clone());
        self.subs.push(spec);
        self
    }

    /// Registers the one handler of command type `C`, as [`BusBuilder::command_handler`]
    /// does; `factory` gets the module's state.
    #[must_use]
    pub fn command_handler<C, H>(self, factory: impl Fn(&S) -> H + Send + Sync + 'static) -> Self
    where
        C: Command,
        H: CommandHandler<C>,
    {
        self.command_handler_with::<C, H>(CommandOptions::new(), factory)
    }

    /// Registers the handler of command type `C` with [options](CommandOptions) (several
    /// instances, keyed or a pool), as [`BusBuilder::command_handler_with`] does; `factory`
    /// gets the module's state.
    #[must_use]
    pub fn command_handler_with<C, H>(
        mut self,
        options: CommandOptions,
        factory: impl Fn(&S) -> H + Send + Sync + 'static,
    ) -> Self
    where
        C: Command,
        H: CommandHandler<C>,
    {
        let state = self.state.clone();
        let mut spec = CmdSpec::new::<C, H>(options, Arc::new(move || factory(&state)));
        spec.module = Some(self.name.clone());
        self.commands.push(spec);
        self
    }
}

impl<S> std::fmt::Debug for Module<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.name)
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

impl BusBuilder {
    /// Adds a [`Module`]: its topics, consumer groups and command handlers. Two modules of
    /// one name are a [`BuildError::DuplicateModule`](crate::BuildError::DuplicateModule).
    #[must_use]
    pub fn module<S>(mut self, module: Module<S>) -> Self {
        self.modules.push(module.name);
        self.topics.extend(module.topics);
        self.subs.extend(module.subs);
        self.commands.extend(module.commands);
        self
    }
}
