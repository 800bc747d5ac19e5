//! What the builder keeps of each registration: a consumer group's [`SubSpec`] (its event
//! types, handler and how to start its workers) and a command handler's [`CmdSpec`].

use std::any::TypeId;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::handles::{EventSet, Handles, Member, Spawner};
use crate::command::Command;
use crate::core::request::CommandEntry;
use crate::durable::consume::{LogSource, StoreAck};
use crate::durable::Durable;
use crate::handler::{AnyHandler, CommandHandler};
use crate::runtime::command_options::{make_command, CommandOptions, CommandStart};
use crate::runtime::dispatch::{Dispatch, Factory, Untyped};
use crate::runtime::subscription::Subscription;
use crate::runtime::worker::{self, MemorySource, NoAck, WorkerArgs};

/// A worker fed by the partition's queue, or with a store by its log.
pub(super) fn spawn_worker<D: Dispatch>(
    dispatch: D,
    args: WorkerArgs,
    durable: Option<&Arc<Durable>>,
) -> BoxFuture<'static, ()> {
    match durable {
        None => {
            let source = MemorySource::new(&args);
            Box::pin(worker::run(dispatch, args, source, NoAck))
        }
        Some(d) => {
            let (source, ack) = (
                LogSource::new(Arc::clone(d), &args),
                StoreAck::new(d, &args),
            );
            Box::pin(worker::run(dispatch, args, source, ack))
        }
    }
}

pub(super) struct SubSpec {
    pub(super) options: Subscription,
    pub(super) topic: String,
    /// `None`: every type of the topic.
    pub(super) accepts: Option<Vec<Member>>,
    pub(super) handler_name: &'static str,
    pub(super) spawn: Spawner,
    /// The [`Module`](super::Module) that registered it.
    pub(super) module: Option<String>,
}

impl SubSpec {
    /// A group handling the event set `S`.
    pub(super) fn typed<S: EventSet, H: Handles<S>>(
        options: Subscription,
        factory: Factory<H>,
    ) -> Self {
        let members = S::members();
        SubSpec {
            options,
            // A set spanning topics is refused by `validate`.
            topic: members[0].topic.to_owned(),
            accepts: Some(members),
            handler_name: std::any::type_name::<H>(),
            spawn: H::spawner(factory),
            module: None,
        }
    }

    /// A group handling every type of `topic`.
    pub(super) fn any<H: AnyHandler>(
        topic: String,
        options: Subscription,
        factory: Factory<H>,
    ) -> Self {
        SubSpec {
            options,
            topic,
            accepts: None,
            handler_name: std::any::type_name::<H>(),
            spawn: Arc::new(move |args, durable| {
                spawn_worker(Untyped::new(Arc::clone(&factory)), args, durable)
            }),
            module: None,
        }
    }
}

/// Makes a command handler's queues: the type-erased senders, and what starts its tasks.
type CommandMake = Box<dyn FnOnce(usize) -> (CommandEntry, CommandStart) + Send>;

pub(super) struct CmdSpec {
    pub(super) type_id: TypeId,
    pub(super) name: &'static str,
    pub(super) instances: usize,
    pub(super) handler_name: &'static str,
    pub(super) make: CommandMake,
    /// The [`Module`](super::Module) that registered it.
    pub(super) module: Option<String>,
}

impl CmdSpec {
    /// The handler of command type `C`, with its options.
    pub(super) fn new<C: Command, H: CommandHandler<C>>(
        options: CommandOptions,
        factory: Factory<H>,
    ) -> Self {
        CmdSpec {
            type_id: TypeId::of::<C>(),
            name: std::any::type_name::<C>(),
            instances: options.instances,
            handler_name: std::any::type_name::<H>(),
            make: Box::new(move |capacity| make_command::<C, H>(&options, factory, capacity)),
            module: None,
        }
    }
}
