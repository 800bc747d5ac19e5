//! Errors of the bus: building it, publishing, requesting.

use std::fmt;
use std::time::Duration;

/// Why [`BusBuilder::build`](crate::BusBuilder::build) refused a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A topic was configured with zero partitions.
    #[error("topic {topic:?}: partitions must be at least 1")]
    ZeroPartitions {
        /// The topic.
        topic: String,
    },
    /// A topic was configured with a queue capacity of zero.
    #[error("topic {topic:?}: queue capacity must be at least 1")]
    ZeroCapacity {
        /// The topic.
        topic: String,
    },
    /// A topic name a broker would reject.
    #[error("invalid topic name: {reason}")]
    InvalidTopicName {
        /// What is wrong with it.
        reason: String,
    },
    /// The same topic was configured twice.
    #[error("topic {topic:?} is configured twice")]
    DuplicateTopic {
        /// The topic.
        topic: String,
    },
    /// A subscription (consumer group) name was used twice.
    #[error("subscription {group:?} is declared twice; every consumer group needs its own name")]
    DuplicateSubscription {
        /// The group name.
        group: String,
    },
    /// A subscription name that is empty or has characters a broker would reject.
    #[error(
        "invalid subscription name {group:?}: use 1 to 249 ASCII letters, digits, '.', '_' or '-', with no leading, trailing or doubled '.'"
    )]
    InvalidSubscriptionName {
        /// The group name.
        group: String,
    },
    /// Two [`Module`](crate::Module)s of one name were added.
    #[error("module {module:?} is added twice; every module needs its own name")]
    DuplicateModule {
        /// The module name.
        module: String,
    },
    /// Two handlers were registered for one command type.
    #[error("command {command} has two handlers; a command needs exactly one")]
    DuplicateCommandHandler {
        /// The command type.
        command: &'static str,
    },
    /// With a store: a topic configured with fewer partitions than its log already has. The
    /// events of the other partitions would never be handled; a durable topic's partition
    /// count may grow (keys then map to other partitions) but never shrink.
    #[error(
        "topic {topic:?} is configured with {configured} partitions, but its log in the store has {stored}: the events of partitions {configured}..{stored} would never be handled; configure at least {stored}"
    )]
    FewerPartitionsThanStored {
        /// The topic.
        topic: String,
        /// Partitions configured.
        configured: u32,
        /// Partitions the topic's log has in the store.
        stored: u32,
    },
    /// A setting out of range (zero batch size, zero max deliveries, …).
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// A handler factory panicked while `build` made the first handlers.
    #[error("the handler factory of {subscription} panicked: {message}")]
    FactoryPanicked {
        /// The subscription (or command) whose factory panicked.
        subscription: String,
        /// The panic message.
        message: String,
    },
    /// `build` was called outside a tokio runtime.
    #[error("BusBuilder::build must be called from within a tokio runtime")]
    NoRuntime,
}

/// Why [`Bus::publish`](crate::Bus::publish) did not accept an event. Carries the event back.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum PublishError<E> {
    /// The bus is shutting down or shut down.
    #[error("the bus is shut down")]
    Closed(E),
    /// With a store: the serialized event is larger than the bus's
    /// [limit](crate::BusBuilder::max_payload). Nothing was published.
    #[error("the event is {size} bytes serialized, over the limit of {limit} bytes")]
    TooLarge {
        /// The event.
        event: E,
        /// Its serialized size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// With a store: the event could not be serialized, or what it serializes to does not
    /// deserialize back into its type, so no group could read it from the log (a non-finite
    /// float: JSON has no `NaN` or infinity, serde_json writes `null`). Nothing was published.
    #[error("the event could not be serialized: {message}")]
    Serialize {
        /// The event.
        event: E,
        /// serde's error.
        message: String,
    },
    /// With a store: the append failed; the event is not published (the transaction rolled
    /// back). Publishing again is safe.
    #[error("the store failed: {error}")]
    Store {
        /// The event.
        event: E,
        /// The store's error.
        error: crate::store::StoreError,
    },
}

impl<E> PublishError<E> {
    /// The same error with the event (or events) mapped.
    pub(crate) fn map<F>(self, f: impl FnOnce(E) -> F) -> PublishError<F> {
        match self {
            PublishError::Closed(e) => PublishError::Closed(f(e)),
            PublishError::TooLarge { event, size, limit } => PublishError::TooLarge {
                event: f(event),
                size,
                limit,
            },
            PublishError::Serialize { event, message } => PublishError::Serialize {
                event: f(event),
                message,
            },
            PublishError::Store { event, error } => PublishError::Store {
                event: f(event),
                error,
            },
        }
    }

    /// The event that was not published.
    pub fn into_event(self) -> E {
        match self {
            PublishError::Closed(e)
            | PublishError::TooLarge { event: e, .. }
            | PublishError::Serialize { event: e, .. }
            | PublishError::Store { event: e, .. } => e,
        }
    }
}

impl<E> fmt::Debug for PublishError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Closed(_) => f.write_str("Closed(..)"),
            PublishError::TooLarge { size, limit, .. } => f
                .debug_struct("TooLarge")
                .field("size", size)
                .field("limit", limit)
                .finish_non_exhaustive(),
            PublishError::Serialize { message, .. } => f
                .debug_struct("Serialize")
                .field("message", message)
                .finish_non_exhaustive(),
            PublishError::Store { error, .. } => f
                .debug_struct("Store")
                .field("error", error)
                .finish_non_exhaustive(),
        }
    }
}

/// Why [`Bus::try_publish`](crate::Bus::try_publish) did not accept an event. Carries the event
/// back.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum TryPublishError<E> {
    /// A partition queue of a subscribed group is full (and the topic's overflow policy is
    /// [`Overflow::Block`](crate::Overflow::Block)).
    #[error("a subscriber's partition queue is full")]
    Full(E),
    /// The bus is shutting down or shut down.
    #[error("the bus is shut down")]
    Closed(E),
    /// The bus has a store: an event is published once committed, which `try_publish` cannot
    /// wait for. Use `publish`.
    #[error("the bus has a store: publishing waits for the commit; use publish")]
    Durable(E),
}

impl<E> TryPublishError<E> {
    /// The event that was not published.
    pub fn into_event(self) -> E {
        match self {
            TryPublishError::Full(e) | TryPublishError::Closed(e) | TryPublishError::Durable(e) => {
                e
            }
        }
    }

    /// Whether the queue was full.
    pub fn is_full(&self) -> bool {
        matches!(self, TryPublishError::Full(_))
    }
}

impl<E> fmt::Debug for TryPublishError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryPublishError::Full(_) => f.write_str("Full(..)"),
            TryPublishError::Closed(_) => f.write_str("Closed(..)"),
            TryPublishError::Durable(_) => f.write_str("Durable(..)"),
        }
    }
}

/// Why [`Bus::request`](crate::Bus::request) got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No handler is registered for the command type (in a
    /// [`TestContext`](crate::testing::TestContext): no reply was
    /// [stubbed](crate::testing::TestContext::stub) for it).
    #[error("no handler is registered for command {command} (register one with BusBuilder::command_handler; in a TestContext, stub its reply with TestContext::stub)")]
    NoHandler {
        /// The command type.
        command: &'static str,
    },
    /// The handler did not reply in time.
    #[error("command {command} got no reply within {timeout:?}")]
    Timeout {
        /// The command type.
        command: &'static str,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The handler returned an error.
    #[error("command {command} failed: {message}")]
    Failed {
        /// The command type.
        command: &'static str,
        /// The handler's error, as text.
        message: String,
    },
    /// The handler panicked; it was restarted.
    #[error("the handler of command {command} panicked: {message}")]
    Panicked {
        /// The command type.
        command: &'static str,
        /// The panic message.
        message: String,
    },
    /// The bus is shutting down or shut down.
    #[error("the bus is shut down")]
    Closed,
}
