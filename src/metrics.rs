//! Metrics on the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`): what an
//! operator's dashboard and alerts read, named after the OpenTelemetry messaging semantic
//! conventions.
//!
//! Install a recorder (an exporter: Prometheus, OpenTelemetry, StatsD, …) **before**
//! [`BusBuilder::build`](crate::BusBuilder::build): the bus registers its counters, gauges and
//! histograms once, when it is built (per topic and group, never per event), with the recorder
//! in place then. Without a recorder every metric is a no-op handle.
//!
//! | name | kind | unit | labels | meaning |
//! |---|---|---|---|---|
//! | `messaging.client.sent.messages` ([`SENT_MESSAGES`]) | counter | `{message}` | system, `messaging.operation.name` = `send`, destination | events this process published and the bus accepted (with a store: committed to the log), routed or not |
//! | `messaging.client.consumed.messages` ([`CONSUMED_MESSAGES`]) | counter | `{message}` | system, `messaging.operation.name` = `process`, destination, group, and `error.type` on failures | events a group finished: without `error.type`, handled ([`GroupStats::handled`](crate::stats::GroupStats::handled), duplicates acknowledged included); with it, given up on ([`GroupStats::failed`](crate::stats::GroupStats::failed)): `error.type` is the last error's [`ErrorKind`](crate::ErrorKind) (`transient` or `permanent`), or `parked` for an event a sequenced dead-letter queue parked behind an earlier one of its key |
//! | `messaging.process.duration` ([`PROCESS_DURATION`]) | histogram | `s` | system, `messaging.operation.name` = `process`, destination, group, and `error.type` (`transient` or `permanent`) on a failed attempt | how long one handler call took (one attempt: a redelivery is another sample; middleware outside the handler is not included) |
//! | `tidings.dead_lettered` ([`DEAD_LETTERED`]) | counter | `{message}` | system, destination, group | entries added to the group's dead-letter queue ([`GroupStats::dead_lettered`](crate::stats::GroupStats::dead_lettered)) |
//! | `tidings.redriven` ([`REDRIVEN`]) | counter | `{message}` | system, destination, group | dead letters sent back to the group's queue ([`GroupStats::redriven`](crate::stats::GroupStats::redriven)) |
//! | `tidings.consumer.lag` ([`CONSUMER_LAG`]) | gauge | `{message}` | system, destination, group, partition | events of the partition the group has not finished: in memory, delivered and not yet handled, failed or dropped; with a store, the log's head minus the group's position ([`PartitionStats::lag`](crate::stats::PartitionStats::lag)) |
//! | `tidings.dead_letter.depth` ([`DEAD_LETTER_DEPTH`]) | gauge | `{message}` | system, destination, group | entries waiting in the group's dead-letter queue ([`GroupStats::dead_letters`](crate::stats::GroupStats::dead_letters)) |
//!
//! The labels: system is `messaging.system` = `tidings` ([`SYSTEM`]); destination is
//! `messaging.destination.name`, the topic ([`DESTINATION_NAME`]); group is
//! `messaging.consumer.group.name`, the consumer group ([`CONSUMER_GROUP_NAME`]); partition is
//! `messaging.destination.partition.id`, the partition number ([`PARTITION_ID`]). Every label
//! value is a name given in the code (a topic, a group), a partition number or one of the
//! constants above: never an event id, a key or anything else that grows with the traffic.
//!
//! Counters count as the events happen. The two gauges are sampled: every second by a task of
//! the bus (stopped by its shutdown, after a last sample), and by every
//! [`Bus::stats`](crate::Bus::stats) call, so they show what the last [`Stats`](crate::stats::Stats)
//! snapshot showed. Two buses in one process with the same topic and group names share their
//! series.
//!
//! # Cost
//!
//! Without the feature, nothing: the calls are to empty functions of types of no size. With it,
//! each handle is registered once; an event costs a counter increment on publish, one when it
//! is finished, and a histogram sample with two clock reads around the handler call, which are
//! skipped while no recorder is installed. `examples/perf_probe` under callgrind, 100k p2p events
//! (whole process): 116.1 M instructions without the feature, 117.9 M with it and no recorder,
//! 165.1 M with the Prometheus exporter's recorder (most of the difference is the clock reads
//! and the exporter's own bookkeeping: its histogram buckets and idle tracking).
//!
//! For a Prometheus histogram, the buckets the OpenTelemetry conventions recommend for
//! durations are [`DURATION_BUCKETS`]. `examples/metrics.rs` serves all of this on a
//! Prometheus `/metrics` endpoint.
//!
//! ```
//! # #[cfg(not(feature = "metrics"))] fn main() {}
//! # #[cfg(feature = "metrics")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tidings::BuildError> {
//! use metrics_util::debugging::DebuggingRecorder;
//!
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! // Installed before the bus is built (here for this thread only; an application installs
//! // its exporter globally).
//! let _guard = metrics::set_default_local_recorder(&recorder);
//! let bus = tidings::Bus::builder().topic(tidings::TopicConfig::new("orders")).build()?;
//! bus.stats(); // samples the gauges (a bus does it every second by itself)
//! let names: Vec<String> = snapshotter
//!     .snapshot()
//!     .into_vec()
//!     .into_iter()
//!     .map(|(key, ..)| key.key().name().to_owned())
//!     .collect();
//! assert!(names.iter().any(|n| n == tidings::metrics::SENT_MESSAGES));
//! # Ok(())
//! # }
//! ```

#![cfg_attr(not(feature = "metrics"), allow(dead_code, unreachable_pub))]

/// `messaging.client.sent.messages`: counter of events published.
pub const SENT_MESSAGES: &str = "messaging.client.sent.messages";
/// `messaging.client.consumed.messages`: counter of events a group finished (handled, or with
/// `error.type` given up on).
pub const CONSUMED_MESSAGES: &str = "messaging.client.consumed.messages";
/// `messaging.process.duration`: histogram of handler calls, in seconds.
pub const PROCESS_DURATION: &str = "messaging.process.duration";
/// `tidings.dead_lettered`: counter of entries added to a group's dead-letter queue.
pub const DEAD_LETTERED: &str = "tidings.dead_lettered";
/// `tidings.redriven`: counter of dead letters redriven.
pub const REDRIVEN: &str = "tidings.redriven";
/// `tidings.consumer.lag`: gauge of the events of a partition a group has not finished.
pub const CONSUMER_LAG: &str = "tidings.consumer.lag";
/// `tidings.dead_letter.depth`: gauge of the entries waiting in a group's dead-letter queue.
pub const DEAD_LETTER_DEPTH: &str = "tidings.dead_letter.depth";

/// Label `messaging.system`; its value is always `tidings`.
pub const SYSTEM: &str = "messaging.system";
/// Label `messaging.operation.name`: `send` on [`SENT_MESSAGES`], `process` on
/// [`CONSUMED_MESSAGES`] and [`PROCESS_DURATION`].
pub const OPERATION_NAME: &str = "messaging.operation.name";
/// Label `messaging.destination.name`: the topic.
pub const DESTINATION_NAME: &str = "messaging.destination.name";
/// Label `messaging.consumer.group.name`: the consumer group.
pub const CONSUMER_GROUP_NAME: &str = "messaging.consumer.group.name";
/// Label `messaging.destination.partition.id`: the partition number (on [`CONSUMER_LAG`]).
pub const PARTITION_ID: &str = "messaging.destination.partition.id";
/// Label `error.type`: `transient`, `permanent` or `parked` (see the table above).
pub const ERROR_TYPE: &str = "error.type";

/// Bucket boundaries (seconds) the OpenTelemetry conventions recommend for
/// [`PROCESS_DURATION`]: `PrometheusBuilder::set_buckets_for_metric` takes them.
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// How often a bus samples its gauges.
pub(crate) const SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(feature = "metrics")]
pub(crate) use on::{recording, GroupMetrics, TopicMetrics};

#[cfg(not(feature = "metrics"))]
pub(crate) use off::{GroupMetrics, TopicMetrics};

#[cfg(feature = "metrics")]
mod on {
    use ::metrics::{
        describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Label,
        Unit,
    };

    use super::*;

    /// A topic's handles, registered when the topic is made (at `build`, or at the first
    /// publish to a topic nobody subscribes to).
    pub(crate) struct TopicMetrics {
        sent: Counter,
        /// By group slot.
        groups: Box<[GroupMetrics]>,
    }

    /// One group's handles on its topic; cloned into each of its workers.
    #[derive(Clone)]
    pub(crate) struct GroupMetrics {
        handled: Counter,
        failed: [Counter; 3],
        duration_ok: Histogram,
        duration_err: [Histogram; 2],
        dead_lettered: Counter,
        redriven: Counter,
        dead_letter_depth: Gauge,
        /// By partition.
        lag: Box<[Gauge]>,
        /// A recorder was installed: handler calls are timed (reading the clock twice per
        /// call is most of what the metrics cost without one).
        timed: bool,
    }

    fn label(key: &'static str, value: &str) -> Label {
        Label::new(key, value.to_owned())
    }

    const ERROR_TYPES: [&str; 3] = ["transient", "permanent", "parked"];

    fn describe() {
        describe_counter!(
            SENT_MESSAGES,
            Unit::Count,
            "Events published and accepted by the bus."
        );
        describe_counter!(
            CONSUMED_MESSAGES,
            Unit::Count,
            "Events a consumer group finished: handled, or given up on (with error.type)."
        );
        describe_histogram!(
            PROCESS_DURATION,
            Unit::Seconds,
            "Duration of one handler call."
        );
        describe_counter!(
            DEAD_LETTERED,
            Unit::Count,
            "Entries added to a group's dead-letter queue."
        );
        describe_counter!(REDRIVEN, Unit::Count, "Dead letters redriven.");
        describe_gauge!(
            CONSUMER_LAG,
            Unit::Count,
            "Events of a partition the group has not finished."
        );
        describe_gauge!(
            DEAD_LETTER_DEPTH,
            Unit::Count,
            "Entries waiting in a group's dead-letter queue."
        );
    }

    /// Whether a recorder is installed. Without one the facade hands out its `NoopRecorder`,
    /// the one recorder of no size (a real one holds its storage, or a handle to it).
    pub(crate) fn recording() -> bool {
        ::metrics::with_recorder(|r| std::mem::size_of_val(r) != 0)
    }

    impl TopicMetrics {
        pub(crate) fn new(topic: &str, groups: &[String], partitions: u32) -> Self {
            describe();
            let timed = recording();
            let system = label(SYSTEM, "tidings");
            let destination = label(DESTINATION_NAME, topic);
            let sent = ::metrics::counter!(
                SENT_MESSAGES,
                vec![
                    system.clone(),
                    label(OPERATION_NAME, "send"),
                    destination.clone(),
                ]
            );
            let groups = groups
                .iter()
                .map(|group| {
                    let base = vec![
                        system.clone(),
                        destination.clone(),
                        label(CONSUMER_GROUP_NAME, group),
                    ];
                    let process = |error: Option<&str>| {
                        let mut labels = base.clone();
                        labels.insert(1, label(OPERATION_NAME, "process"));
                        labels.extend(error.map(|e| label(ERROR_TYPE, e)));
                        labels
                    };
                    GroupMetrics {
                        handled: ::metrics::counter!(CONSUMED_MESSAGES, process(None)),
                        failed: ERROR_TYPES
                            .map(|e| ::metrics::counter!(CONSUMED_MESSAGES, process(Some(e)))),
                        duration_ok: ::metrics::histogram!(PROCESS_DURATION, process(None)),
                        duration_err: [ERROR_TYPES[0], ERROR_TYPES[1]]
                            .map(|e| ::metrics::histogram!(PROCESS_DURATION, process(Some(e)))),
                        dead_lettered: ::metrics::counter!(DEAD_LETTERED, base.clone()),
                        redriven: ::metrics::counter!(REDRIVEN, base.clone()),
                        dead_letter_depth: ::metrics::gauge!(DEAD_LETTER_DEPTH, base.clone()),
                        lag: (0..partitions)
                            .map(|p| {
                                let mut labels = base.clone();
                                labels.push(label(PARTITION_ID, &p.to_string()));
                                ::metrics::gauge!(CONSUMER_LAG, labels)
                            })
                            .collect(),
                        timed,
                    }
                })
                .collect();
            TopicMetrics { sent, groups }
        }

        /// `n` events accepted on the topic.
        #[inline]
        pub(crate) fn sent(&self, n: u64) {
            self.sent.increment(n);
        }

        /// The handles of the group in `slot`.
        #[inline]
        pub(crate) fn group(&self, slot: usize) -> &GroupMetrics {
            &self.groups[slot]
        }
    }

    impl GroupMetrics {
        /// An event handled (or acknowledged as a duplicate).
        #[inline]
        pub(crate) fn handled(&self) {
            self.handled.increment(1);
        }

        /// An event given up on, its last error permanent or not.
        pub(crate) fn failed(&self, permanent: bool) {
            self.failed[usize::from(permanent)].increment(1);
        }

        /// An event parked behind an earlier one of its key (counted failed).
        pub(crate) fn parked(&self) {
            self.failed[2].increment(1);
        }

        /// A handler call starts.
        #[inline]
        pub(crate) fn start(&self) -> Timer {
            Timer(self.timed.then(std::time::Instant::now))
        }

        /// One handler call, started at `timer`: it succeeded (`None`) or failed with a
        /// permanent error or not.
        #[inline]
        pub(crate) fn processed(&self, timer: Timer, failed: Option<bool>) {
            let Some(started) = timer.0 else {
                return;
            };
            let seconds = started.elapsed().as_secs_f64();
            match failed {
                None => self.duration_ok.record(seconds),
                Some(permanent) => self.duration_err[usize::from(permanent)].record(seconds),
            }
        }

        /// An entry added to the group's dead-letter queue.
        pub(crate) fn dead_lettered(&self) {
            self.dead_lettered.increment(1);
        }

        /// A dead letter redriven.
        pub(crate) fn redriven(&self) {
            self.redriven.increment(1);
        }

        /// The sampled gauges: `depth` dead letters waiting.
        pub(crate) fn dead_letter_depth(&self, depth: u64) {
            self.dead_letter_depth.set(depth as f64);
        }

        /// The sampled gauges: the group's lag on `partition`.
        pub(crate) fn lag(&self, partition: usize, lag: u64) {
            if let Some(gauge) = self.lag.get(partition) {
                gauge.set(lag as f64);
            }
        }
    }

    /// When a handler call started (if it is timed).
    #[derive(Clone, Copy)]
    pub(crate) struct Timer(Option<std::time::Instant>);
}

/// Without the feature: the same calls, on types of no size that do nothing.
#[cfg(not(feature = "metrics"))]
#[allow(clippy::unused_self)]
mod off {
    pub(crate) struct TopicMetrics;

    #[derive(Clone)]
    pub(crate) struct GroupMetrics;

    #[derive(Clone, Copy)]
    pub(crate) struct Timer;

    impl TopicMetrics {
        pub(crate) fn new(_: &str, _: &[String], _: u32) -> Self {
            TopicMetrics
        }
        #[inline(always)]
        pub(crate) fn sent(&self, _: u64) {}
        #[inline(always)]
        pub(crate) fn group(&self, _: usize) -> &GroupMetrics {
            &GroupMetrics
        }
    }

    impl GroupMetrics {
        #[inline(always)]
        pub(crate) fn handled(&self) {}
        #[inline(always)]
        pub(crate) fn failed(&self, _: bool) {}
        #[inline(always)]
        pub(crate) fn parked(&self) {}
        #[inline(always)]
        pub(crate) fn start(&self) -> Timer {
            Timer
        }
        #[inline(always)]
        pub(crate) fn processed(&self, _: Timer, _: Option<bool>) {}
        #[inline(always)]
        pub(crate) fn dead_lettered(&self) {}
        #[inline(always)]
        pub(crate) fn redriven(&self) {}
        #[inline(always)]
        pub(crate) fn dead_letter_depth(&self, _: u64) {}
        #[inline(always)]
        pub(crate) fn lag(&self, _: usize, _: u64) {}
    }
}
