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
/// It keeps the error it was made from: match it with [`is`](HandlerError::is) or
/// [`downcast_ref`](HandlerError::downcast_ref). The failures the bus makes itself (a timeout, an
/// open circuit, a panic, …) have [types](crate::middleware#failures-the-layers-make) too.
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
    #[must_use]
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

    /// Whether the underlying error is a `T`: the way to tell apart the failures the bus makes
    /// itself ([`Panicked`], [`middleware::Elapsed`](crate::middleware::Elapsed),
    /// [`middleware::CircuitOpen`](crate::middleware::CircuitOpen), …; see
    /// [the table](crate::middleware#failures-the-layers-make)), or your own error types.
    ///
    /// Looks at the underlying error only, as `Box<dyn Error>::is` does; to look at what it
    /// wraps too, use [`chain`](HandlerError::chain).
    ///
    /// ```
    /// use tidings::HandlerError;
    ///
    /// #[derive(Debug)]
    /// struct Declined;
    /// impl std::fmt::Display for Declined {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         f.write_str("card declined")
    ///     }
    /// }
    /// impl std::error::Error for Declined {}
    ///
    /// let err = HandlerError::permanent(Declined);
    /// assert!(err.is::<Declined>());
    /// assert!(!HandlerError::msg("card declined").is::<Declined>());
    /// ```
    pub fn is<T: StdError + 'static>(&self) -> bool {
        self.source.is::<T>()
    }

    /// The underlying error as a `T`, if it is one (see [`is`](HandlerError::is)).
    ///
    /// ```
    /// use std::num::ParseIntError;
    /// use tidings::HandlerError;
    ///
    /// let err = HandlerError::from("x".parse::<u32>().unwrap_err());
    /// let parse: &ParseIntError = err.downcast_ref().unwrap();
    /// assert_eq!(parse.to_string(), "invalid digit found in string");
    /// ```
    pub fn downcast_ref<T: StdError + 'static>(&self) -> Option<&T> {
        self.source.downcast_ref::<T>()
    }

    /// The underlying error, then its [source](StdError::source), and so on: to find an error
    /// that another one wraps (the last attempt's error under a
    /// [`middleware::Interrupted`](crate::middleware::Interrupted), say).
    ///
    /// ```
    /// use tidings::HandlerError;
    ///
    /// let err = HandlerError::from("x".parse::<u32>().unwrap_err());
    /// assert_eq!(err.chain().count(), 1);
    /// assert!(err.chain().any(|e| e.is::<std::num::ParseIntError>()));
    /// ```
    pub fn chain(&self) -> impl Iterator<Item = &(dyn StdError + 'static)> {
        let first: &(dyn StdError + 'static) = &*self.source;
        std::iter::successors(Some(first), |&err| err.source())
    }
}

/// A handler (or a middleware) panicked: the attempt failed.
///
/// Made by the worker that runs the handler when it catches a panic: the attempt fails with a
/// transient [`HandlerError`] whose source is a `Panicked` holding the panic's message, and the
/// handler is restarted (see the [supervision rules](crate::Subscription#supervision)). A panic in
/// the handler reaches the middleware around it (a [`Retry`](crate::middleware::Retry) retries it);
/// a panic in a middleware fails the whole delivery, and no layer sees it. Either way, when the bus
/// gives up, the [dead letter](crate::dead_letter::DeadLetter)'s error is its text:
/// `panic: {message}`, or `panic in middleware: {message}`.
///
/// It lives beside [`HandlerError`] rather than with the middleware errors: it is the
/// supervision contract of every handler, with or without layers.
///
/// # Examples
///
/// A layer inside a `Retry` that does not retry a handler that panics (a bug, not a busy
/// downstream):
///
/// ```
/// use tidings::middleware::{Middleware, Next};
/// use tidings::{AnyEnvelope, HandlerResult, Panicked};
///
/// #[derive(Clone)]
/// struct PanicsAreFinal;
///
/// impl Middleware for PanicsAreFinal {
///     async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
///         next.run(env).await.map_err(|err| {
///             if let Some(panicked) = err.downcast_ref::<Panicked>() {
///                 tracing::error!(message = panicked.message(), "handler bug");
///                 return err.into_permanent();
///             }
///             err
///         })
///     }
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Panicked {
    message: String,
    in_middleware: bool,
}

impl Panicked {
    /// The handler panicked.
    pub(crate) fn handler(message: String) -> Self {
        Panicked {
            message,
            in_middleware: false,
        }
    }

    /// A middleware of the handler's chain panicked.
    pub(crate) fn middleware(message: String) -> Self {
        Panicked {
            message,
            in_middleware: true,
        }
    }

    /// The panic's message (`"non-string panic payload"` if it panicked with something other
    /// than a string).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether a middleware panicked, rather than the handler.
    pub fn in_middleware(&self) -> bool {
        self.in_middleware
    }
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.in_middleware {
            write!(f, "panic in middleware: {}", self.message)
        } else {
            write!(f, "panic: {}", self.message)
        }
    }
}

impl StdError for Panicked {}

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
/// It owns its state and handles commands one at a time. Registered with
/// [`BusBuilder::command_handler`](crate::BusBuilder::command_handler) it is the only instance,
/// so commands are handled in arrival order; [`CommandOptions`](crate::CommandOptions) runs
/// several instances (keyed, or a pool) and states their order. A panic is caught, answered
/// with [`RequestError::Panicked`](crate::RequestError::Panicked), and the instance is
/// restarted from its factory.
///
/// Test it without a bus with
/// [`TestContext::call_command`](crate::testing::TestContext::call_command).
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
