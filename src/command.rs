//! Commands: request/reply with exactly one handler.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::RequestError;
use crate::publish::Cause;

/// A request for one handler to do something, answered with a typed reply.
///
/// Unlike an [`Event`](crate::Event), which any number of groups may handle, a command has
/// exactly one handler, registered with
/// [`BusBuilder::command_handler`](crate::BusBuilder::command_handler), and is sent with
/// [`Bus::request`](crate::Bus::request). Commands stay in memory: they are not serialized.
///
/// ```
/// use tidings::Command;
///
/// struct ReserveStock { sku: String, quantity: u32 }
///
/// impl Command for ReserveStock {
///     type Reply = bool;
/// }
/// ```
pub trait Command: Send + 'static {
    /// What the handler answers.
    type Reply: Send + 'static;
}

/// What a command handler's queue carries: a request, or `None` to stop once drained.
pub(crate) type CommandMessage<C> = Option<CommandRequest<C>>;

pub(crate) struct CommandRequest<C: Command> {
    pub(crate) command: C,
    pub(crate) cause: Cause,
    pub(crate) deadline: tokio::time::Instant,
    pub(crate) timeout: Duration,
    pub(crate) reply: oneshot::Sender<Result<C::Reply, RequestError>>,
}
