//! What the builder keeps of each registration: a consumer group's [`SubSpec`] (its event
//! types, handler and how to start its workers) and a command handler's [`CmdSpec`].

use std::any::TypeId;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The registration it is part of: a group whose event set spans topics is one spec per
    /// topic, all of one registration (the only specs that may share a group name).
    pub(super) registration: usize,
}

/// Numbers registrations, so that the specs of one can be told from a second group of the
/// same name.
static REGISTRATIONS: AtomicUsize = AtomicUsize::new(0);

fn next_registration() -> usize {
    REGISTRATIONS.fetch_add(1, Ordering::Relaxed)
}

impl SubSpec {
    /// A group handling the event set `S`: one spec per topic of the set, in the order the set
    /// first names each topic. Each worker runs the whole set's dispatch; only its topic's
    /// types reach it.
    pub(super) fn typed<S: EventSet, H: Handles<S>>(
        options: &Subscription,
        factory: Factory<H>,
    ) -> Vec<Self> {
        let members = S::members();
        let spawn = H::spawner(factory);
        let registration = next_registration();
        let mut topics: Vec<&'static str> = Vec::new();
        for member in &members {
            if !topics.contains(&member.topic) {
                topics.push(member.topic);
            }
        }
        topics
            .into_iter()
            .map(|topic| SubSpec {
                options: options.clone(),
                topic: topic.to_owned(),
                accepts: Some(
                    members
                        .iter()
                        .filter(|m| m.topic == topic)
                        .copied()
                        .collect(),
                ),
                handler_name: std::any::type_name::<H>(),
                spawn: Arc::clone(&spawn),
                module: None,
                registration,
            })
            .collect()
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
            registration: next_registration(),
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
