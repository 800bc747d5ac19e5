//! Testing handlers and whole flows without a broker.
//!
//! Two levels:
//!
//! - **A handler alone**: call it with a [`TestContext`], which records what it publishes
//!   instead of routing it, and what it requests, answering its requests with the replies you
//!   [stub](TestContext::stub). No bus, no tasks. A command handler is called the same way
//!   ([`call_command`](TestContext::call_command)).
//! - **A whole bus**: build it with [`BusBuilder::record`](crate::BusBuilder::record), publish,
//!   await [`Bus::settled`](crate::Bus::settled) (every queue empty, every handler idle, follow-up events included),
//!   then assert on what handlers recorded (share a [`Recorder`] with them) and on
//!   [`Bus::published`](crate::Bus::published) / [`Bus::failures`](crate::Bus::failures). Run the test with `#[tokio::test(start_paused =
//!   true)]`: tokio's paused clock then skips over sleeps and restart backoffs, so tests of
//!   timing are fast and deterministic.
//!
//! # Examples
//!
//! ```
//! # use serde::{Deserialize, Serialize};
//! use tidings::testing::{Recorder, TestContext};
//! use tidings::{Bus, Context, Envelope, Event, Handler, HandlerError};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, Event)]
//! #[event(topic = "orders", key = order_id)]
//! struct OrderPlaced { order_id: u64 }
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, Event)]
//! #[event(topic = "mail", key = order_id)]
//! struct ConfirmationSent { order_id: u64 }
//!
//! struct Mailer { sent: Recorder<u64> }
//!
//! impl Handler<OrderPlaced> for Mailer {
//!     async fn handle(&mut self, e: &Envelope<OrderPlaced>, ctx: &Context) -> Result<(), HandlerError> {
//!         self.sent.push(e.event().order_id);
//!         ctx.publish(ConfirmationSent { order_id: e.event().order_id }).await?;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! // A handler alone.
//! let mut mailer = Mailer { sent: Recorder::new() };
//! let mut ctx = TestContext::new();
//! let placed = Envelope::new(OrderPlaced { order_id: 1 });
//! ctx.call(&mut mailer, &placed).await.unwrap();
//! let out = ctx.published_of::<ConfirmationSent>();
//! assert_eq!(out[0].event().order_id, 1);
//! assert_eq!(out[0].causation_id(), Some(placed.id()));
//!
//! // A whole bus.
//! let sent = Recorder::new();
//! let bus = Bus::builder()
//!     .record(true)
//!     .subscribe::<OrderPlaced, _>("mailer", { let sent = sent.clone(); move || Mailer { sent: sent.clone() } })
//!     .build()
//!     .unwrap();
//! bus.publish(OrderPlaced { order_id: 7 }).await.unwrap();
//! bus.settled().await;
//! assert_eq!(sent.snapshot(), vec![7]);
//! assert_eq!(tidings::testing::events_of::<ConfirmationSent>(&bus.published()).len(), 1);
//! # bus.shutdown().await; }
//! ```

use std::any::TypeId;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::command::Command;
use crate::context::{Capture, Context, Sink, Stub};
use crate::envelope::{new_id, AnyEnvelope, Envelope};
use crate::error::RequestError;
use crate::event::Event;
use crate::handler::{AnyHandler, CommandHandler, Handler, HandlerError};
use crate::publish::Cause;

/// A [`Context`] for calling a handler directly, without a bus. What the handler publishes is
/// recorded, with correlation and causation filled in as the bus would; partitions are all 0
/// and offsets count every event published through this context, whatever its topic.
///
/// The commands the handler sends with [`Context::request`] are recorded too
/// ([`requested_of`](TestContext::requested_of)) and answered with the reply
/// [stubbed](TestContext::stub) for their type; a command type without a stub is answered
/// [`RequestError::NoHandler`].
///
/// ```
/// use tidings::testing::TestContext;
/// use tidings::{Command, CommandHandler, Context, HandlerError, RequestError};
///
/// #[derive(Debug, Clone, PartialEq)]
/// struct ReserveStock { sku: &'static str, quantity: u32 }
/// impl Command for ReserveStock { type Reply = bool; }
///
/// struct PlaceOrder { sku: &'static str }
/// impl Command for PlaceOrder { type Reply = &'static str; }
///
/// /// Places an order if the stock can be reserved.
/// struct Orders;
/// impl CommandHandler<PlaceOrder> for Orders {
///     async fn handle(&mut self, cmd: PlaceOrder, ctx: &Context) -> Result<&'static str, HandlerError> {
///         let reserved = ctx.request(ReserveStock { sku: cmd.sku, quantity: 1 }).await?;
///         Ok(if reserved { "placed" } else { "out of stock" })
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut ctx = TestContext::new().stub(|cmd: &ReserveStock| Ok(cmd.sku == "apple"));
/// assert_eq!(ctx.call_command(&mut Orders, PlaceOrder { sku: "apple" }).await.unwrap(), "placed");
/// assert_eq!(ctx.call_command(&mut Orders, PlaceOrder { sku: "pear" }).await.unwrap(), "out of stock");
/// assert_eq!(
///     ctx.requested_of::<ReserveStock>(),
///     vec![ReserveStock { sku: "apple", quantity: 1 }, ReserveStock { sku: "pear", quantity: 1 }],
/// );
///
/// // Without a stub the request fails, as with no handler on a bus.
/// let mut bare = TestContext::new();
/// let err = bare.call_command(&mut Orders, PlaceOrder { sku: "apple" }).await.unwrap_err();
/// assert!(err.to_string().contains("stub"));
/// # }
/// ```
pub struct TestContext {
    capture: Arc<Capture>,
    ctx: Context,
}

impl std::fmt::Debug for TestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestContext")
            .field("context", &self.ctx)
            .finish_non_exhaustive()
    }
}

impl Default for TestContext {
    fn default() -> Self {
        TestContext::new()
    }
}

impl TestContext {
    /// A context for the group `"test"`.
    pub fn new() -> Self {
        TestContext::for_group("test")
    }

    /// A context for the named group.
    pub fn for_group(group: &str) -> Self {
        let capture = Arc::new(Capture::default());
        TestContext {
            ctx: Context {
                sink: Sink::Capture(Arc::clone(&capture)),
                group: Arc::from(group),
                cause: None,
                cancel: CancellationToken::new(),
                owner: None,
                source: crate::core::seen::EXTERNAL,
            },
            capture,
        }
    }

    /// Answers the requests of command type `C` sent through this context with `reply`, called
    /// with each command (after this, a later stub for `C` replaces this one). Return
    /// `Err(..)` to test how the handler copes with a failed request, e.g.
    /// [`RequestError::Timeout`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use tidings::testing::TestContext;
    /// use tidings::{Command, RequestError};
    ///
    /// struct Charge { cents: u64 }
    /// impl Command for Charge { type Reply = String; }
    ///
    /// let ctx = TestContext::new().stub(|cmd: &Charge| {
    ///     if cmd.cents > 100_00 {
    ///         Err(RequestError::Timeout { command: "Charge", timeout: Duration::from_secs(30) })
    ///     } else {
    ///         Ok(format!("receipt for {}", cmd.cents))
    ///     }
    /// });
    /// # drop(ctx);
    /// ```
    #[must_use]
    pub fn stub<C: Command>(
        self,
        reply: impl FnMut(&C) -> Result<C::Reply, RequestError> + Send + 'static,
    ) -> Self {
        let stub: Stub<C> = Box::new(reply);
        {
            let mut stubs = self.capture.stubs.lock().unwrap_or_else(|p| p.into_inner());
            stubs.retain(|(type_id, _)| *type_id != TypeId::of::<C>());
            stubs.push((TypeId::of::<C>(), Box::new(stub)));
        }
        self
    }

    /// Calls the command handler `handler` with `command`, as the bus would for a request sent
    /// from outside: the request gets a fresh id, which is the correlation id of what the
    /// handler publishes and the causation id of its events. Requests the handler sends are
    /// recorded and answered by the [stubs](TestContext::stub).
    ///
    /// # Errors
    ///
    /// What the handler returns (on a bus the requester would get it as
    /// [`RequestError::Failed`]). A panic is not caught.
    ///
    /// # Cancel safety
    ///
    /// As [`call`](TestContext::call).
    pub async fn call_command<C: Command, H: CommandHandler<C>>(
        &mut self,
        handler: &mut H,
        command: C,
    ) -> Result<C::Reply, HandlerError> {
        let id = new_id(SystemTime::now());
        self.ctx.cause = Some(Cause {
            id,
            correlation: id,
        });
        handler.handle(command, &self.ctx).await
    }

    /// Calls `handler` with `event`, as the bus would: the events it publishes name `event` as
    /// their cause.
    ///
    /// # Errors
    ///
    /// What the handler returns.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the handler's call where it stands, as a shutdown timeout would; what
    /// it published before is recorded.
    pub async fn call<E: Event, H: Handler<E>>(
        &mut self,
        handler: &mut H,
        event: &Envelope<E>,
    ) -> Result<(), HandlerError> {
        self.ctx.cause = Some(Cause {
            id: event.id(),
            correlation: event.correlation_id(),
        });
        handler.handle(event, &self.ctx).await
    }

    /// Calls an [`AnyHandler`] with `event`.
    ///
    /// # Errors
    ///
    /// What the handler returns.
    ///
    /// # Cancel safety
    ///
    /// As [`call`](TestContext::call).
    pub async fn call_any<H: AnyHandler>(
        &mut self,
        handler: &mut H,
        event: &AnyEnvelope,
    ) -> Result<(), HandlerError> {
        self.ctx.cause = Some(Cause {
            id: event.id(),
            correlation: event.correlation_id(),
        });
        handler.handle(event, &self.ctx).await
    }

    /// The context itself, to pass to a handler by hand.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Signals shutdown to the handler ([`Context::is_shutting_down`] becomes true).
    pub fn begin_shutdown(&self) {
        self.ctx.cancel.cancel();
    }

    /// Everything published through this context so far.
    pub fn published(&self) -> Vec<AnyEnvelope> {
        lock(&self.capture.log).clone()
    }

    /// The published events of type `E`.
    pub fn published_of<E: Event>(&self) -> Vec<Envelope<E>> {
        events_of::<E>(&self.published())
    }

    /// The commands of type `C` requested through this context so far ([`Context::request`]),
    /// in order, whether a reply was stubbed for them or not.
    pub fn requested_of<C: Command + Clone>(&self) -> Vec<C> {
        lock(&self.capture.requests)
            .iter()
            .filter_map(|command| command.downcast_ref::<C>().cloned())
            .collect()
    }

    /// Forgets what was published and requested so far (the stubs stay).
    pub fn clear(&self) {
        lock(&self.capture.log).clear();
        lock(&self.capture.requests).clear();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The envelopes of type `E` among `envelopes`, in order.
pub fn events_of<E: Event>(envelopes: &[AnyEnvelope]) -> Vec<Envelope<E>> {
    envelopes.iter().filter_map(|e| e.downcast::<E>()).collect()
}

/// A list shared between a test and the handlers it builds: handlers push, the test reads.
/// Cloning shares the list.
#[derive(Debug)]
pub struct Recorder<T>(Arc<Mutex<Vec<T>>>);

impl<T> Clone for Recorder<T> {
    fn clone(&self) -> Self {
        Recorder(Arc::clone(&self.0))
    }
}

impl<T> Default for Recorder<T> {
    fn default() -> Self {
        Recorder::new()
    }
}

impl<T> Recorder<T> {
    /// An empty recorder.
    pub fn new() -> Self {
        Recorder(Arc::new(Mutex::new(Vec::new())))
    }

    /// Appends a value.
    pub fn push(&self, value: T) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(value);
    }

    /// Number of values recorded.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every value out, leaving the recorder empty.
    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl<T: Clone> Recorder<T> {
    /// A copy of the values recorded so far.
    pub fn snapshot(&self) -> Vec<T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
