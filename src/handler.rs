//! Handlers: the actors that consume events, and the errors they return.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;

use crate::command::Command;
use crate::context::Context;
use crate::envelope::{AnyEnvelope, Envelope};
use crate::event::Event;

/// An actor that handles events of type `E` for one consumer group.
///
/// The handler owns its state (`&mut self`); the bus owns the tasks. Each partition of the
/// subscribed topic runs its own handler instance, created by the factory given to
/// [`BusBuilder::subscribe`](crate::BusBuilder::subscribe), and hands it one event at a time, in
/// partition order. State shared across partitions goes behind an `Arc`.
///
/// Returning an error or panicking does not take the bus down: see the
/// [supervision rules](crate::Subscription#supervision).
///
/// # Examples
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use tidings::{Context, Envelope, Event, Handler, HandlerError};
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id)]
/// struct OrderPlaced { order_id: u64, cents: u64 }
///
/// #[derive(Default)]
/// struct Revenue { total: u64 }
///
/// impl Handler<OrderPlaced> for Revenue {
///     async fn handle(&mut self, event: &Envelope<OrderPlaced>, _ctx: &Context) -> Result<(), HandlerError> {
///         self.total += event.event().cents;
///         Ok(())
///     }
/// }
/// ```
pub trait Handler<E: Event>: Send + 'static {
    /// Handles one event. `Ok` acknowledges it; `Err` asks for redelivery (unless the error is
    /// [permanent](HandlerError::permanent)).
    fn handle(
        &mut self,
        event: &Envelope<E>,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// An actor that handles every event type of one topic, in partition order.
///
/// Subscribe it with [`BusBuilder::subscribe_all`](crate::BusBuilder::subscribe_all). Use it when
/// a group needs several event types of a topic in their relative order (`OrderCreated` before
/// `OrderPaid` for the same order), or to audit a whole topic.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use tidings::{AnyEnvelope, AnyHandler, Context, Event, HandlerError};
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id)]
/// struct OrderCreated { order_id: u64 }
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id)]
/// struct OrderPaid { order_id: u64 }
///
/// struct Lifecycle;
///
/// impl AnyHandler for Lifecycle {
///     async fn handle(&mut self, event: &AnyEnvelope, _ctx: &Context) -> Result<(), HandlerError> {
///         if let Some(created) = event.downcast_ref::<OrderCreated>() {
///             println!("created {}", created.order_id);
///         } else if let Some(paid) = event.downcast_ref::<OrderPaid>() {
///             println!("paid {}", paid.order_id);
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait AnyHandler: Send + 'static {
    /// Handles one event of any type of the topic.
    fn handle(
        &mut self,
        event: &AnyEnvelope,
        ctx: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Whether a failure may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// May succeed on a later attempt (a timeout, a busy downstream): the event is redelivered.
    Transient,
    /// Will fail again (validation failed, bad payload): no redelivery.
    Permanent,
}

/// The error a handler returns.
///
/// Any `std::error::Error` converts into it with `?` (as a transient error); build one from a
/// message with [`HandlerError::msg`], or mark it permanent with [`HandlerError::permanent`].
///
/// Like `anyhow::Error`, it does not implement `std::error::Error` itself (that would clash with
/// the blanket conversion); it converts into `Box<dyn Error + Send + Sync>` with `?` instead.
///
/// ```
/// use tidings::{ErrorKind, HandlerError};
///
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     Ok(s.parse::<u32>()?)
/// }
/// let err = parse("x").unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Transient);
/// assert!(HandlerError::msg("card declined").into_permanent().is_permanent());
/// ```
pub struct HandlerError {
    kind: ErrorKind,
    source: Box<dyn StdError + Send + Sync + 'static>,
}

impl HandlerError {
    /// A transient error from any error value.
    pub fn transient(err: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        HandlerError {
            kind: ErrorKind::Transient,
            source: err.into(),
        }
    }

    /// A permanent error from any error value: it is not redelivered.
    pub fn permanent(err: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        HandlerError {
            kind: ErrorKind::Permanent,
            source: err.into(),
        }
    }

    /// A transient error with a message.
    pub fn msg(message: impl fmt::Display) -> Self {
        HandlerError::transient(message.to_string())
    }

    /// This error, marked permanent.
    pub fn into_permanent(mut self) -> Self {
        self.kind = ErrorKind::Permanent;
        self
    }

    /// Transient or permanent.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether this error is permanent.
    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for HandlerError {
    fn from(err: E) -> Self {
        HandlerError::transient(err)
    }
}

impl From<HandlerError> for Box<dyn StdError + Send + Sync + 'static> {
    /// Lets `?` turn a `HandlerError` into a boxed error outside handlers (in `main`, say).
    fn from(err: HandlerError) -> Self {
        err.source
    }
}

impl From<HandlerError> for Box<dyn StdError + 'static> {
    fn from(err: HandlerError) -> Self {
        err.source
    }
}

/// What a handler returns: `Ok(())` to acknowledge the event.
pub type HandlerResult<T = ()> = Result<T, HandlerError>;

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

/// The one actor that answers commands of type `C`.
///
/// It owns its state; commands are handled one at a time in arrival order. A panic is caught,
/// answered with [`RequestError::Panicked`](crate::RequestError::Panicked), and the handler is
/// restarted from its factory.
///
/// ```
/// use tidings::{Command, CommandHandler, Context, HandlerError};
///
/// struct Add(u64);
/// impl Command for Add { type Reply = u64; }
///
/// #[derive(Default)]
/// struct Counter { total: u64 }
///
/// impl CommandHandler<Add> for Counter {
///     async fn handle(&mut self, cmd: Add, _ctx: &Context) -> Result<u64, HandlerError> {
///         self.total += cmd.0;
///         Ok(self.total)
///     }
/// }
/// ```
pub trait CommandHandler<C: Command>: Send + 'static {
    /// Handles one command and produces its reply.
    fn handle(
        &mut self,
        command: C,
        ctx: &Context,
    ) -> impl Future<Output = Result<C::Reply, HandlerError>> + Send;
}
