//! A topic's configuration: [`TopicConfig`], [`Overflow`] and the defaults. The queues
//! themselves are the core's (`core::queue`).

/// Default queue capacity of a partition, per consumer group.
pub const DEFAULT_CAPACITY: usize = 1024;

/// What `publish` does when a subscriber's partition queue is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Overflow {
    /// Wait for room (`publish`), or return [`TryPublishError::Full`](crate::TryPublishError::Full)
    /// (`try_publish`). Nothing is ever dropped. The default.
    #[default]
    Block,
    /// Drop the oldest queued event of the full group's partition queue to make room. Meant for
    /// telemetry where fresh data beats complete data. Every drop is counted in
    /// [`Bus::stats`](crate::Bus::stats) and in the
    /// [`ShutdownReport`](crate::stats::ShutdownReport), and logged at `warn` level.
    DropOldest,
}

/// Settings of one topic: partition count, queue capacity, overflow policy.
///
/// Topics that are subscribed to but not configured get the defaults: one partition per CPU
/// core, capacity [`DEFAULT_CAPACITY`] and [`Overflow::Block`].
///
/// The partition count decides which partition a key maps to. Set it explicitly if events will
/// outlive the process (a store, a broker), so that it does not change with the machine.
///
/// ```
/// use tidings::{Bus, Overflow, TopicConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tidings::BuildError> {
/// let bus = Bus::builder()
///     .topic(TopicConfig::new("orders").partitions(8).capacity(256))
///     .topic(TopicConfig::new("telemetry").overflow(Overflow::DropOldest))
///     .build()?;
/// # bus.shutdown().await; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TopicConfig {
    pub(crate) name: String,
    pub(crate) partitions: Option<u32>,
    pub(crate) capacity: usize,
    pub(crate) overflow: Overflow,
    pub(crate) retention: crate::store::Retention,
}

impl TopicConfig {
    /// Default settings for the topic `name`.
    pub fn new(name: impl Into<String>) -> Self {
        TopicConfig {
            name: name.into(),
            partitions: None,
            capacity: DEFAULT_CAPACITY,
            overflow: Overflow::Block,
            retention: crate::store::Retention::KeepAll,
        }
    }

    /// With a store: how long the topic's log keeps events. Default
    /// [`Retention::KeepAll`](crate::store::Retention::KeepAll). Without a store, anything else is
    /// a build error.
    #[must_use]
    pub fn retention(mut self, retention: crate::store::Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Number of partitions (at least 1). Default: the number of CPU cores.
    ///
    /// With a store the count is part of the data: a topic configured with fewer partitions
    /// than its log already has is a build error
    /// ([`BuildError::FewerPartitionsThanStored`](crate::BuildError::FewerPartitionsThanStored)),
    /// since the events of the others would never be handled. More is allowed, with a warning
    /// in the log: keys then map to other partitions, so a key's events from before and after
    /// the change are not ordered with each other (drain the topic first if that matters).
    #[must_use]
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Capacity of each partition queue of each consumer group (at least 1). Default 1024.
    ///
    /// It bounds what waits in the queue; the worker also holds the batch it took (at most the
    /// subscription's [`batch_size`](crate::Subscription::batch_size)), so up to `capacity +
    /// batch_size` events of a group's partition are in memory at once. A handler publishing
    /// into its own queue may exceed it (see [`Context::publish`](crate::Context::publish)).
    /// Of events with no heap data (types that need no drop), up to `capacity` finished
    /// envelopes per partition are kept, also while idle, for the next publishes to reuse.
    #[must_use]
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// What to do when a queue is full. Default [`Overflow::Block`].
    #[must_use]
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }
}

pub(crate) fn default_partitions() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}
