//! Commands: request/reply with exactly one handler.

use std::future::Future;

use crate::context::Context;
use crate::handler::HandlerError;

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
