//! Commands: request/reply with exactly one handler.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::RequestError;
use crate::event::Key;
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
///
/// A handler registered with [`CommandOptions::keyed`](crate::CommandOptions::keyed) runs as
/// several instances and routes each command by its [`key`](Command::key): commands with the
/// same key go to the same instance, one at a time, in the order they arrive.
///
/// ```
/// use tidings::{Command, Key};
///
/// struct GetOrder { order_id: u64 }
///
/// impl Command for GetOrder {
///     type Reply = Option<String>;
///
///     fn key(&self) -> Option<Key<'_>> {
///         Some(Key::U64(self.order_id))
///     }
/// }
/// ```
pub trait Command: Send + 'static {
    /// What the handler answers.
    type Reply: Send + 'static;

    /// The key that picks the instance of a [keyed](crate::CommandOptions::keyed) handler
    /// (default: none). Commands without a key are spread over the instances in turn, with no
    /// order between them. Only keyed handlers read it.
    fn key(&self) -> Option<Key<'_>> {
        None
    }
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
