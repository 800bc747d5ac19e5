//! One consumer group for several event types: [`EventSet`] (one event type, or a tuple of
//! them) and [`Handles`] (a handler of every type in a set).

use std::any::TypeId;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::spec::spawn_worker;
use crate::context::Context;
use crate::durable::Durable;
use crate::envelope::AnyEnvelope;
use crate::event::Event;
use crate::handler::{Handler, HandlerError};
use crate::runtime::dispatch::{Factory, Multi, Table, Typed};
use crate::runtime::worker::WorkerArgs;

/// Makes a worker of one partition of a group: in memory, or on the store's log.
pub(crate) type Spawner =
    Arc<dyn Fn(WorkerArgs, Option<&Arc<Durable>>) -> BoxFuture<'static, ()> + Send + Sync>;

/// One event type of a set: what the builder needs to route it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Member {
    pub(crate) type_id: TypeId,
    pub(crate) name: &'static str,
    pub(crate) topic: &'static str,
}

impl Member {
    fn of<E: Event>() -> Self {
        Member {
            type_id: TypeId::of::<E>(),
            name: E::NAME,
            topic: E::TOPIC,
        }
    }
}

/// The event types one consumer group handles: one [`Event`] type, or a tuple of up to 12
/// of them, of one topic or several.
///
/// It is what [`BusBuilder::subscribe`](crate::BusBuilder::subscribe) and
/// [`Module::subscribe`](crate::Module::subscribe) take as their first type parameter:
/// `subscribe::<OrderPlaced, _>` for one type, `subscribe::<(OrderPlaced, OrderPaid), _>` for
/// a handler that implements `Handler<OrderPlaced>` and `Handler<OrderPaid>`. Implemented by
/// the library only.
pub trait EventSet: Send + 'static {
    /// The types of the set (for the builder).
    #[doc(hidden)]
    #[allow(private_interfaces)]
    fn members() -> Vec<Member>;
}

/// A handler of every event type in the set `S`: implemented for any type that implements
/// [`Handler<E>`](Handler) for each `E` of `S`. Nothing to implement by hand.
///
/// A group whose handler handles a set gets every event of those types from the topic's
/// partitions **in partition order**: for one key, in the order they were published, across
/// types (an `OrderPaid` is never handled before the `OrderPlaced` of the same order published
/// before it). Each call goes to the `Handler<E>` impl of the event's type: dispatch is
/// compiled in, with no downcast in your code.
///
/// # A set spanning topics
///
/// The types of a set may come from several topics, as a Kafka consumer group may read several
/// topics. The group then reads each of its topics, each partition with its own handler
/// instance (from the same factory), and the order is **per topic**: events of one topic and
/// key come in publish order, across that topic's types of the set, but nothing orders an
/// event of one topic with an event of another (an `OrderPlaced` on `orders` and a
/// `PaymentCaptured` on `payments` of the same order may come in either order). Offsets,
/// statistics and dead-letter queues are per topic; [`Bus::dead_letters`](crate::Bus::dead_letters)
/// returns one handle over all of the group's queues, and
/// [`Bus::rebuild`](crate::Bus::rebuild) rebuilds all of its topics.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use tidings::{Bus, Context, Envelope, Event, Handler, HandlerError, TopicConfig};
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id)]
/// struct OrderPlaced { order_id: u64, cents: u64 }
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id)]
/// struct OrderPaid { order_id: u64 }
///
/// #[derive(Default)]
/// struct Orders { open: std::collections::HashMap<u64, u64> }
///
/// impl Handler<OrderPlaced> for Orders {
///     async fn handle(&mut self, e: &Envelope<OrderPlaced>, _: &Context) -> Result<(), HandlerError> {
///         self.open.insert(e.event().order_id, e.event().cents);
///         Ok(())
///     }
/// }
/// impl Handler<OrderPaid> for Orders {
///     async fn handle(&mut self, e: &Envelope<OrderPaid>, _: &Context) -> Result<(), HandlerError> {
///         // Never before its OrderPlaced: same topic, same key, one group.
///         assert!(self.open.remove(&e.event().order_id).is_some());
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::builder()
///     .topic(TopicConfig::new("orders").partitions(4))
///     .subscribe::<(OrderPlaced, OrderPaid), _>("orders", Orders::default)
///     .build()?;
/// bus.publish(OrderPlaced { order_id: 7, cents: 1200 }).await?;
/// bus.publish(OrderPaid { order_id: 7 }).await?;
/// bus.settled().await;
/// assert_eq!(bus.stats().group("orders").unwrap().handled, 2);
/// # bus.shutdown().await; Ok(()) }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not handle every event type of `{S}`",
    label = "this handler needs a `Handler<E>` impl for each event type `E` of `{S}`",
    note = "implement `tidings::Handler<E>` for `{Self}`, one impl per event type of the set"
)]
pub trait Handles<S: EventSet>: Send + 'static {
    /// What starts a worker of this handler (for the builder).
    #[doc(hidden)]
    #[allow(private_interfaces)]
    fn spawner(factory: Factory<Self>) -> Spawner
    where
        Self: Sized;
}

impl<E: Event> EventSet for E {
    #[allow(private_interfaces)]
    fn members() -> Vec<Member> {
        vec![Member::of::<E>()]
    }
}

impl<E: Event, H: Handler<E>> Handles<E> for H {
    #[allow(private_interfaces)]
    fn spawner(factory: Factory<H>) -> Spawner {
        Arc::new(move |args, durable| {
            spawn_worker(Typed::<E, H>::new(Arc::clone(&factory)), args, durable)
        })
    }
}

/// The error of an event a set's handler got but has no impl for: cannot happen, since the
/// group's slot only receives the set's types; kept as a permanent error, not a panic.
fn not_in_set(env: &AnyEnvelope) -> HandlerError {
    HandlerError::permanent(format!(
        "event type {} is not in the group's event set",
        env.name()
    ))
}

macro_rules! event_sets {
    ($($T:ident),+) => {
        impl<$($T: Event),+> EventSet for ($($T,)+) {
            #[allow(private_interfaces)]
            fn members() -> Vec<Member> {
                vec![$(Member::of::<$T>()),+]
            }
        }

        impl<H, $($T: Event),+> Handles<($($T,)+)> for H
        where
            H: Send + 'static $(+ Handler<$T>)+,
        {
            #[allow(private_interfaces)]
            fn spawner(factory: Factory<H>) -> Spawner {
                Arc::new(move |args, durable| {
                    spawn_worker(
                        Multi::<($($T,)+), H>::new(Arc::clone(&factory)),
                        args,
                        durable,
                    )
                })
            }
        }

        impl<H, $($T: Event),+> Table<H> for ($($T,)+)
        where
            H: Send + 'static $(+ Handler<$T>)+,
        {
            fn accepts(name: &str) -> bool {
                $(name == $T::NAME)||+
            }

            #[allow(clippy::manual_async_fn)]
            fn call<'a>(
                handler: &'a mut H,
                env: &'a AnyEnvelope,
                ctx: &'a Context,
            ) -> impl std::future::Future<Output = Result<(), HandlerError>> + Send + 'a {
                async move {
                    $(
                        if env.downcast_ref::<$T>().is_some() {
                            if let Some(typed) = env.downcast::<$T>() {
                                return Handler::<$T>::handle(handler, &typed, ctx).await;
                            }
                        }
                    )+
                    Err(not_in_set(env))
                }
            }
        }
    };
}

event_sets!(A);
event_sets!(A, B);
event_sets!(A, B, C);
event_sets!(A, B, C, D);
event_sets!(A, B, C, D, E);
event_sets!(A, B, C, D, E, F);
event_sets!(A, B, C, D, E, F, G);
event_sets!(A, B, C, D, E, F, G, I);
event_sets!(A, B, C, D, E, F, G, I, J);
event_sets!(A, B, C, D, E, F, G, I, J, K);
event_sets!(A, B, C, D, E, F, G, I, J, K, L);
event_sets!(A, B, C, D, E, F, G, I, J, K, L, M);
