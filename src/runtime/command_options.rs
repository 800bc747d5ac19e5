//! How many instances a command handler runs as, and how requests are spread over them:
//! [`CommandOptions`]; and the making of their queues and tasks.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::commands::{run_commands, Requests};
use super::dispatch::Factory;
use super::subscription::RestartBackoff;
use crate::command::{Command, CommandMessage};
use crate::core::request::{CommandEntry, CommandQueues};
use crate::core::Core;
use crate::handler::CommandHandler;

/// How requests are spread over a command handler's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spread {
    /// One queue all instances take from.
    Pool,
    /// One queue per instance, picked by the command's key.
    Keyed,
}

/// Settings of a command handler: how many instances of it run, how requests are spread over
/// them, and how a panicked instance is restarted. Given to
/// [`BusBuilder::command_handler_with`](crate::BusBuilder::command_handler_with);
/// [`BusBuilder::command_handler`](crate::BusBuilder::command_handler) uses
/// [`CommandOptions::new`].
///
/// # Instances and order
///
/// - **One instance** ([`new`](CommandOptions::new), the default): every request of the command
///   type is handled by one task, one at a time, in the order the requests arrive.
/// - **A pool** ([`pool(n)`](CommandOptions::pool)): `n` instances take requests from one shared
///   queue; each request goes to whichever instance is free first. Up to `n` requests are
///   handled at once, and there is **no order** between requests, not even between two sent by
///   the same task one after the other without waiting for the first reply. Use it for
///   stateless handlers (or state behind an `Arc`) whose work waits on I/O.
/// - **Keyed** ([`keyed(n)`](CommandOptions::keyed)): `n` instances with a queue each; a
///   request goes to the instance its command's [`key`](Command::key) hashes to, so requests
///   with the **same key are handled one at a time, in the order they arrive**, by the same
///   instance (which may keep per-key state), while requests with different keys may run at
///   once. Commands without a key go to the instances in turn, with no order between them.
///   Keys share instances (many keys hash to each): a slow request delays the requests queued
///   behind it on its instance, whatever their keys.
///
/// Every instance is made by the factory and supervised on its own: a panic answers its
/// request with [`RequestError::Panicked`](crate::RequestError::Panicked) and replaces that
/// instance with a fresh one from the factory after the
/// [restart backoff](CommandOptions::restart_backoff), while the other instances go on. A
/// graceful shutdown lets every instance finish the requests already sent.
///
/// Timeouts are the same in every mode: a request not answered within its timeout gets
/// [`RequestError::Timeout`](crate::RequestError::Timeout), whether it waits in a queue or its
/// handler is slow.
///
/// ```
/// use tidings::{Bus, Command, CommandHandler, CommandOptions, Context, HandlerError, Key};
///
/// struct GetOrder { order_id: u64 }
///
/// impl Command for GetOrder {
///     type Reply = Option<String>;
///     fn key(&self) -> Option<Key<'_>> {
///         Some(Key::U64(self.order_id))
///     }
/// }
///
/// struct Orders;
///
/// impl CommandHandler<GetOrder> for Orders {
///     async fn handle(&mut self, cmd: GetOrder, _: &Context) -> Result<Option<String>, HandlerError> {
///         Ok(Some(format!("order {}", cmd.order_id)))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let bus = Bus::builder()
///     // Four instances; requests for one order are answered in the order they were sent.
///     .command_handler_with::<GetOrder, _>(CommandOptions::keyed(4), || Orders)
///     .build()
///     .unwrap();
/// assert_eq!(bus.request(GetOrder { order_id: 7 }).await.unwrap().as_deref(), Some("order 7"));
/// # bus.shutdown().await; }
/// ```
#[derive(Debug, Clone)]
pub struct CommandOptions {
    pub(crate) instances: usize,
    pub(crate) spread: Spread,
    pub(crate) restart_backoff: RestartBackoff,
}

impl Default for CommandOptions {
    fn default() -> Self {
        CommandOptions::new()
    }
}

impl CommandOptions {
    /// One instance: requests handled one at a time, in arrival order.
    pub fn new() -> Self {
        CommandOptions {
            instances: 1,
            spread: Spread::Pool,
            restart_backoff: RestartBackoff::default(),
        }
    }

    /// `instances` instances sharing one queue: each request goes to the first free instance,
    /// with no order between requests. At least 1 (checked by
    /// [`build`](crate::BusBuilder::build)); `pool(1)` is [`new`](CommandOptions::new).
    pub fn pool(instances: usize) -> Self {
        CommandOptions {
            instances,
            ..CommandOptions::new()
        }
    }

    /// `instances` instances with a queue each, picked by the command's
    /// [`key`](Command::key): requests with the same key are handled one at a time, in arrival
    /// order. At least 1 (checked by [`build`](crate::BusBuilder::build)).
    pub fn keyed(instances: usize) -> Self {
        CommandOptions {
            instances,
            spread: Spread::Keyed,
            ..CommandOptions::new()
        }
    }

    /// How long a panicked instance waits before it is replaced (default
    /// [`RestartBackoff::default`]: 10 ms doubling to 1 s). Requests waiting meanwhile keep
    /// their deadlines.
    #[must_use]
    pub fn restart_backoff(mut self, backoff: RestartBackoff) -> Self {
        self.restart_backoff = backoff;
        self
    }
}

/// Makes the tasks of a command handler's instances (the factories run here).
pub(crate) type CommandStart = Box<dyn FnOnce(Arc<Core>) -> Vec<BoxFuture<'static, ()>> + Send>;

/// Asks an instance's queue to stop: sent once shutdown has drained every request, so there
/// is room.
fn stop_queue<C: Command>(sender: &mpsc::Sender<CommandMessage<C>>) {
    if let Err(mpsc::error::TrySendError::Full(_)) = sender.try_send(None) {
        // Only when the last handle is dropped with requests still queued: queue the stop
        // behind them.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let sender = sender.clone();
            runtime.spawn(async move {
                let _ = sender.send(None).await;
            });
        }
    }
}

/// The queues of command type `C`'s handler, as [`options`](CommandOptions) says (each of
/// `capacity`), and what starts its instances.
pub(crate) fn make_command<C: Command, H: CommandHandler<C>>(
    options: &CommandOptions,
    factory: Factory<H>,
    capacity: usize,
) -> (CommandEntry, CommandStart) {
    let backoff = options.restart_backoff;
    let instances = options.instances.max(1);
    let spawn = move |requests: Requests<C>, factory: &Factory<H>, core: &Arc<Core>| {
        let handler = factory();
        let task = run_commands::<C, H>(
            handler,
            Arc::clone(factory),
            requests,
            Arc::clone(core),
            backoff,
        );
        Box::pin(task) as BoxFuture<'static, ()>
    };
    if instances == 1 || options.spread == Spread::Pool {
        let (tx, rx) = mpsc::channel::<CommandMessage<C>>(capacity);
        let stopper = tx.clone();
        let queues = if instances == 1 {
            CommandQueues::One(tx)
        } else {
            CommandQueues::Shared(tx)
        };
        let start: CommandStart = Box::new(move |core| {
            if instances == 1 {
                return vec![spawn(Requests::Own(rx), &factory, &core)];
            }
            let shared = Arc::new(tokio::sync::Mutex::new(rx));
            (0..instances)
                .map(|_| spawn(Requests::Shared(Arc::clone(&shared)), &factory, &core))
                .collect()
        });
        let entry = CommandEntry {
            sender: Box::new(queues),
            // One stop is enough for a pool: the instance that takes it closes the shared
            // queue, and the others find it closed.
            stop: Box::new(move || stop_queue(&stopper)),
        };
        return (entry, start);
    }
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..instances)
        .map(|_| mpsc::channel::<CommandMessage<C>>(capacity))
        .unzip();
    let stoppers = senders.clone();
    let start: CommandStart = Box::new(move |core| {
        receivers
            .into_iter()
            .map(|rx| spawn(Requests::Own(rx), &factory, &core))
            .collect()
    });
    let entry = CommandEntry {
        sender: Box::new(CommandQueues::Keyed {
            queues: senders.into_boxed_slice(),
            next: AtomicU32::new(0),
        }),
        stop: Box::new(move || stoppers.iter().for_each(stop_queue)),
    };
    (entry, start)
}
