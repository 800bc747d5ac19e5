//! Counters: what [`Bus::stats`](crate::Bus::stats) and [`Bus::shutdown`](crate::Bus::shutdown)
//! report.
//!
//! [`Bus::stats`](crate::Bus::stats) takes a [`Stats`] snapshot of a running bus: per topic
//! ([`TopicStats`]), per consumer group ([`GroupStats`]) and per partition of a group
//! ([`PartitionStats`]). The shutdown ends with a [`ShutdownReport`]: what was handled, failed,
//! dropped or abandoned.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tidings::BuildError> {
//! use tidings::stats::ShutdownReport;
//! use tidings::Bus;
//!
//! let bus = Bus::builder().build()?;
//! assert_eq!(bus.stats().pending, 0);
//! let report: ShutdownReport = bus.shutdown().await;
//! assert_eq!(report.handled, 0);
//! # Ok(())
//! # }
//! ```

/// A snapshot of the bus's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// One entry per topic: configured and subscribed ones first, then topics published to
    /// without a subscriber.
    pub topics: Vec<TopicStats>,
    /// Deliveries and requests accepted but not finished yet, over the whole bus (a request
    /// being refused at shutdown is counted for an instant).
    pub pending: u64,
}

impl Stats {
    /// Events published, over every topic, of a type no consumer group subscribes to (the sum
    /// of [`TopicStats::unrouted`]).
    pub fn unrouted(&self) -> u64 {
        self.topics.iter().map(|t| t.unrouted).sum()
    }

    /// The counters of one topic.
    pub fn topic(&self, topic: &str) -> Option<&TopicStats> {
        self.topics.iter().find(|t| t.topic == topic)
    }

    /// The counters of one consumer group, on whichever topic it subscribes to.
    pub fn group(&self, group: &str) -> Option<&GroupStats> {
        self.topics
            .iter()
            .flat_map(|t| t.groups.iter())
            .find(|g| g.group == group)
    }
}

/// Counters of one topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicStats {
    /// Topic name.
    pub topic: String,
    /// Number of partitions.
    pub partitions: u32,
    /// Events accepted on this topic, over all partitions.
    pub published: u64,
    /// Events accepted per partition (the next offset of each partition).
    pub published_per_partition: Vec<u64>,
    /// Of `published`, events of a type no consumer group of this bus subscribes to: handled by
    /// nobody (in memory, gone; with a store, in the log). Usually a typo in a topic name or a
    /// missing subscription; the first event of each such type also logs a warning.
    pub unrouted: u64,
    /// One entry per consumer group subscribed to this topic.
    pub groups: Vec<GroupStats>,
}

/// Counters of one consumer group on its topic: totals and per partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStats {
    /// Group (subscription) name.
    pub group: String,
    /// Events delivered to the group's queues.
    pub delivered: u64,
    /// Events handled successfully (duplicates acknowledged without handling included).
    pub handled: u64,
    /// Of `handled`, duplicates a [`Dedup`](crate::middleware::Dedup) layer acknowledged without
    /// handling.
    pub duplicates: u64,
    /// Events given up on after their last delivery attempt (dead-lettered, or dropped under
    /// at-most-once delivery), and events parked behind them by a sequenced dead-letter queue.
    pub failed: u64,
    /// Events dropped by [`Overflow::DropOldest`](crate::Overflow::DropOldest).
    pub dropped: u64,
    /// Event-handler panics caught (command handlers answer `Panicked` to the caller instead).
    pub panics: u64,
    /// Handler restarts after a panic.
    pub restarts: u64,
    /// Events waiting in the queues.
    pub depth: u64,
    /// Events delivered but not finished (queued or in flight).
    pub lag: u64,
    /// Entries waiting in the group's [dead-letter queue](crate::dead_letter::DeadLetters) now.
    pub dead_letters: u64,
    /// Entries ever added to the dead-letter queue.
    pub dead_lettered: u64,
    /// Entries redriven.
    pub redriven: u64,
    /// Entries discarded.
    pub discarded: u64,
    /// Per partition.
    pub partitions: Vec<PartitionStats>,
}

impl GroupStats {
    pub(crate) fn add(&mut self, p: PartitionStats) {
        self.delivered += p.delivered;
        self.handled += p.handled;
        self.duplicates += p.duplicates;
        self.failed += p.failed;
        self.dropped += p.dropped;
        self.panics += p.panics;
        self.restarts += p.restarts;
        self.depth += p.depth;
        self.lag += p.lag;
        self.partitions.push(p);
    }
}

/// Counters of one consumer group on one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStats {
    /// Partition number.
    pub partition: u32,
    /// Events accepted on the partition (its next offset), for every group.
    pub published: u64,
    /// Events delivered to this group's queue (fewer than `published` if the group takes only
    /// some event types of the topic).
    pub delivered: u64,
    /// Events handled successfully (duplicates acknowledged without handling included).
    pub handled: u64,
    /// Of `handled`, duplicates acknowledged without handling.
    pub duplicates: u64,
    /// Events given up on.
    pub failed: u64,
    /// Events dropped by the overflow policy.
    pub dropped: u64,
    /// Handler panics caught.
    pub panics: u64,
    /// Handler restarts.
    pub restarts: u64,
    /// Events waiting in the queue.
    pub depth: u64,
    /// Events delivered but not finished: `delivered - handled - failed - dropped`.
    pub lag: u64,
    /// Offset of the last event finished, if any.
    pub committed: Option<u64>,
}

/// What [`Bus::shutdown`](crate::Bus::shutdown) reports, over all groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Events handled successfully.
    pub handled: u64,
    /// Events given up on after their last attempt.
    pub failed: u64,
    /// Events dropped by [`Overflow::DropOldest`](crate::Overflow::DropOldest).
    pub dropped: u64,
    /// Event-handler panics caught.
    pub panics: u64,
    /// Deliveries and requests not finished when a
    /// [`shutdown_timeout`](crate::Bus::shutdown_timeout) ran out (0 after a full drain):
    /// each event queued or in flight, once per group (a handler still running at the
    /// deadline, blocked on its thread, counts as not finished), and each request not answered.
    /// In memory, `handled + failed + dropped + abandoned` is what was delivered to the groups.
    /// With a store, a group still busy reading the log at the deadline counts one; what it
    /// did not read, and what was abandoned, is in the log and handled after the next start.
    pub abandoned: u64,
}
