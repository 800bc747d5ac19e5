//! The context a handler gets: publish follow-up events, send commands, watch for shutdown.

use std::any::{Any, TypeId};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::command::Command;
use crate::core::publish::Origin;
use crate::core::route::QueueId;
use crate::core::seen::{SourceId, EXTERNAL};
use crate::core::Core;
use crate::envelope::{new_id, AnyEnvelope, Envelope, Headers, Metadata};
use crate::error::{PublishError, RequestError, TryPublishError};
use crate::event::Event;
use crate::publish::{Cause, PublishOptions, Published};

/// What a handler gets beside the event: a way to publish follow-up events and send commands
/// with correlation and causation filled in, the consumer group's name, and a signal for
/// shutdown.
///
/// Events published through the context carry the handled event's correlation id and name it
/// as their cause, so a whole causal chain can be followed in logs and traces without the
/// handler doing anything.
pub struct Context {
    pub(crate) sink: Sink,
    pub(crate) group: Arc<str>,
    pub(crate) cause: Option<Cause>,
    pub(crate) cancel: CancellationToken,
    /// The queue this context's worker drains (event handlers only).
    pub(crate) owner: Option<QueueId>,
    /// Who publishes and requests through this context, for `Bus::topology`.
    pub(crate) source: SourceId,
}

pub(crate) enum Sink {
    Core(Arc<Core>),
    Capture(Arc<Capture>),
}

/// A stubbed reply of command type `C`, for [`Capture`].
pub(crate) type Stub<C> = Box<dyn FnMut(&C) -> Result<<C as Command>::Reply, RequestError> + Send>;

/// What a test context records, and the replies stubbed for its requests.
#[derive(Default)]
pub(crate) struct Capture {
    /// What was published, in order.
    pub(crate) log: Mutex<Vec<AnyEnvelope>>,
    /// The commands requested, in order (each a `C`).
    pub(crate) requests: Mutex<Vec<Box<dyn Any + Send>>>,
    /// The stubbed replies by command type (each a [`Stub<C>`]).
    pub(crate) stubs: Mutex<Vec<(TypeId, Box<dyn Any + Send>)>>,
}

impl Capture {
    /// Answers `command` with its stub (or `NoHandler`), and records it.
    fn request<C: Command>(&self, command: C) -> Result<C::Reply, RequestError> {
        let reply = {
            let mut stubs = self.stubs.lock().unwrap_or_else(|p| p.into_inner());
            stubs
                .iter_mut()
                .find(|(type_id, _)| *type_id == TypeId::of::<C>())
                .and_then(|(_, stub)| stub.downcast_mut::<Stub<C>>())
                .map(|stub| stub(&command))
        };
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(command));
        reply.unwrap_or(Err(RequestError::NoHandler {
            command: std::any::type_name::<C>(),
        }))
    }
}

impl Context {
    pub(crate) fn for_core(core: Arc<Core>, group: Arc<str>) -> Self {
        let cancel = core.cancel.clone();
        Context {
            sink: Sink::Core(core),
            group,
            cause: None,
            cancel,
            owner: None,
            source: EXTERNAL,
        }
    }

    fn origin(&self) -> Origin {
        Origin {
            cause: self.cause,
            from_handler: true,
            headers: Headers::new(),
            id: None,
            owner: self.owner,
            source: self.source,
        }
    }

    /// Publishes a follow-up event; it carries this event's correlation id and names it as its
    /// cause. Waits while a subscriber's queue is full, like [`Bus::publish`](crate::Bus::publish).
    ///
    /// While the bus drains for shutdown, events published by handlers are still accepted, so
    /// causal chains started before shutdown complete.
    ///
    /// A handler publishing into the very queue its own worker drains (its own topic, partition
    /// and group) is never made to wait, since nobody else could make room: that queue may go
    /// past its capacity by what the handler publishes. A cycle of *different* groups, each
    /// waiting for room in the other's full queue, still waits forever: give such loops
    /// capacity to spare, or use [`try_publish`](Context::try_publish) and decide what to do
    /// when it is full.
    ///
    /// An event whose type no group subscribes to is counted and warned about as by
    /// [`Bus::publish`](crate::Bus::publish)
    /// ([`TopicStats::unrouted`](crate::stats::TopicStats::unrouted)).
    ///
    /// # Errors
    ///
    /// [`PublishError::Closed`] once the bus is shut down.
    ///
    /// # Cancel safety
    ///
    /// As [`Bus::publish`](crate::Bus::publish).
    pub async fn publish<E: Event>(&self, event: E) -> Result<Published, PublishError<E>> {
        match &self.sink {
            Sink::Core(core) => core.publish_from(event, self.origin()).await,
            Sink::Capture(c) => Ok(self.capture(&c.log, event, PublishOptions::new())),
        }
    }

    /// Like [`publish`](Context::publish), with [options](PublishOptions): headers, an id of
    /// your own.
    ///
    /// # Errors
    ///
    /// As [`publish`](Context::publish).
    ///
    /// # Cancel safety
    ///
    /// As [`Bus::publish`](crate::Bus::publish).
    pub async fn publish_with<E: Event>(
        &self,
        event: E,
        options: impl Into<PublishOptions>,
    ) -> Result<Published, PublishError<E>> {
        let options = options.into();
        match &self.sink {
            Sink::Core(core) => {
                let origin = Origin {
                    headers: options.headers,
                    id: options.id,
                    ..self.origin()
                };
                core.publish_from(event, origin).await
            }
            Sink::Capture(c) => Ok(self.capture(&c.log, event, options)),
        }
    }

    /// Publishes a follow-up event without waiting; see [`Bus::try_publish`](crate::Bus::try_publish).
    ///
    /// # Errors
    ///
    /// [`TryPublishError::Full`] when a subscriber's queue is full, [`TryPublishError::Closed`]
    /// once the bus is shut down.
    pub fn try_publish<E: Event>(&self, event: E) -> Result<Published, TryPublishError<E>> {
        match &self.sink {
            Sink::Core(core) => core.try_publish_from(event, self.origin()),
            Sink::Capture(c) => Ok(self.capture(&c.log, event, PublishOptions::new())),
        }
    }

    /// Sends a command and waits for its reply; the request carries this event's correlation id.
    ///
    /// # Errors
    ///
    /// See [`Bus::request`](crate::Bus::request). A context made by [`TestContext`](crate::testing::TestContext)
    /// has no command handlers: it records the command and answers with the reply
    /// [stubbed](crate::testing::TestContext::stub) for its type, or [`RequestError::NoHandler`].
    ///
    /// # Cancel safety
    ///
    /// As [`Bus::request`](crate::Bus::request).
    pub async fn request<C: Command>(&self, command: C) -> Result<C::Reply, RequestError> {
        match &self.sink {
            Sink::Core(core) => {
                core.saw_request::<C>(self.source);
                core.request_from(command, self.cause, None).await
            }
            Sink::Capture(capture) => capture.request(command),
        }
    }

    /// The consumer group (subscription) this handler runs for.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Correlation id of the event or command being handled.
    pub fn correlation_id(&self) -> Option<Uuid> {
        self.cause.map(|c| c.correlation)
    }

    /// Whether the bus has begun to shut down. Long-running handlers may check it to finish
    /// early; the bus still drains queued events.
    pub fn is_shutting_down(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Completes when the bus begins to shut down.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits.
    pub async fn shutting_down(&self) {
        self.cancel.cancelled().await
    }

    fn capture<E: Event>(
        &self,
        log: &Mutex<Vec<AnyEnvelope>>,
        event: E,
        options: PublishOptions,
    ) -> Published {
        let timestamp = SystemTime::now();
        let id = options.id.unwrap_or_else(|| new_id(timestamp));
        let headers = options.headers;
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        let offset = log.len() as u64;
        let env = Envelope::from_parts(
            Metadata {
                id,
                topic: E::TOPIC,
                partition: 0,
                offset,
                timestamp,
                correlation_id: self.cause.map_or(id, |c| c.correlation),
                causation_id: self.cause.map(|c| c.id),
                headers,
            },
            event,
        );
        log.push(env.into());
        Published {
            id,
            partition: 0,
            offset,
            duplicate: false,
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("group", &self.group)
            .field("cause", &self.cause)
            .finish_non_exhaustive()
    }
}
