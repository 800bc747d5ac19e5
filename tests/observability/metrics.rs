//! The `metrics` feature: what the bus reports on the `metrics` facade agrees with `Bus::stats`,
//! under the documented OpenTelemetry names and labels, and never with an event id or key as a
//! label.
//!
//! Each test installs a recorder for its thread (and a thread-local tracing
//! subscriber, as `main.rs` asks) and runs its bus on a current-thread runtime on that thread.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use serde::{Deserialize, Serialize};
use tidings::metrics as m;
use tidings::prelude::*;
use tidings::store::MemoryStore;
use tokio::sync::{mpsc, Semaphore};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "metrics.orders", key = id, name = "metrics.Order")]
struct Order {
    id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "metrics.slow", key = id, name = "metrics.Slow")]
struct Slow {
    id: u64,
}

/// Handles everything.
struct Accept;

impl Handler<Order> for Accept {
    async fn handle(&mut self, _: &Envelope<Order>, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Fails odd ids permanently until healed.
struct Picky(Arc<AtomicBool>);

impl Handler<Order> for Picky {
    async fn handle(&mut self, e: &Envelope<Order>, _: &Context) -> Result<(), HandlerError> {
        if e.event().id % 2 == 1 && !self.0.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent("odd"));
        }
        Ok(())
    }
}

/// Says when it starts an event, then waits for a permit.
struct Gated {
    started: mpsc::UnboundedSender<u64>,
    permits: Arc<Semaphore>,
}

impl Handler<Slow> for Gated {
    async fn handle(&mut self, e: &Envelope<Slow>, _: &Context) -> Result<(), HandlerError> {
        let _ = self.started.send(e.event().id);
        self.permits.acquire().await.expect("open").forget();
        Ok(())
    }
}

/// A recorder whose values a test reads as often as it likes (metrics-util's
/// `DebuggingRecorder` resets counters and gauges on every snapshot).
#[derive(Clone)]
struct Recorded(Arc<Registry<Key, AtomicStorage>>);

impl Recorded {
    fn new() -> Self {
        Recorded(Arc::new(Registry::atomic()))
    }

    fn samples(&self) -> Vec<Sample> {
        let mut out = Vec::new();
        let mut add = |key: Key, value: Value| {
            out.push(Sample {
                name: key.name().to_owned(),
                labels: key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect(),
                value,
            })
        };
        for (key, c) in self.0.get_counter_handles() {
            add(key, Value::Counter(c.load(Ordering::SeqCst)));
        }
        for (key, g) in self.0.get_gauge_handles() {
            add(key, Value::Gauge(f64::from_bits(g.load(Ordering::SeqCst))));
        }
        for (key, h) in self.0.get_histogram_handles() {
            add(key, Value::Histogram(h.data().len()));
        }
        out
    }
}

impl Recorder for Recorded {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(Arc::clone(c)))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(Arc::clone(g)))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(Arc::clone(h)))
    }
}

#[derive(Debug)]
enum Value {
    Counter(u64),
    Gauge(f64),
    /// The number of samples.
    Histogram(usize),
}

/// One metric.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: Value,
}

/// The sample named `name` with exactly `labels` (besides those every sample of `name` has).
fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> &'a Sample {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
        })
        .filter(|s| s.labels.len() == base_labels(name) + labels.len())
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?} in {samples:#?}");
    found[0]
}

/// How many labels every sample of `name` has besides those a test names: `messaging.system`,
/// and `messaging.operation.name` on the OpenTelemetry ones.
fn base_labels(name: &str) -> usize {
    if name.starts_with("messaging.") {
        2
    } else {
        1
    }
}

fn counter(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> u64 {
    match find(samples, name, labels).value {
        Value::Counter(n) => n,
        ref other => panic!("{name} is not a counter: {other:?}"),
    }
}

fn gauge(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    match find(samples, name, labels).value {
        Value::Gauge(g) => g,
        ref other => panic!("{name} is not a gauge: {other:?}"),
    }
}

fn histogram_count(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> usize {
    match find(samples, name, labels).value {
        Value::Histogram(n) => n,
        ref other => panic!("{name} is not a histogram: {other:?}"),
    }
}

fn runtime(paused: bool) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    if paused {
        builder.start_paused(true);
    }
    builder.build().unwrap()
}

const TOPIC: (&str, &str) = (m::DESTINATION_NAME, "metrics.orders");

#[test]
fn counters_agree_with_stats_under_the_documented_names_and_labels() {
    let _trace = tracing::subscriber::set_default(tracing_subscriber::registry());
    let recorder = Recorded::new();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let heal = Arc::new(AtomicBool::new(false));
    let (stats, ids) = runtime(false).block_on(async {
        let healed = Arc::clone(&heal);
        let bus = Bus::builder()
            .topic(TopicConfig::new("metrics.orders").partitions(2))
            .subscribe::<Order, _>("metrics.accept", || Accept)
            .subscribe::<Order, _>("metrics.picky", move || Picky(Arc::clone(&healed)))
            .build()
            .unwrap();
        let mut ids = Vec::new();
        for id in 0..6 {
            ids.push(bus.publish(Order { id }).await.unwrap().id);
        }
        bus.settled().await;
        let letters = bus.dead_letters("metrics.picky").unwrap();
        assert_eq!(letters.len(), 3);
        // One redriven and failing again, one redriven and handled, one left.
        let seqs: Vec<u64> = letters.list().iter().map(|l| l.seq).collect();
        letters.redrive(seqs[0]).await.unwrap();
        bus.settled().await;
        heal.store(true, Ordering::SeqCst);
        letters.redrive(seqs[1]).await.unwrap();
        bus.settled().await;
        let stats = bus.stats();
        bus.shutdown().await;
        (stats, ids)
    });
    let samples = recorder.samples();

    let topic = stats.topic("metrics.orders").unwrap();
    assert_eq!(topic.published, 6);
    assert_eq!(counter(&samples, m::SENT_MESSAGES, &[TOPIC]), 6);

    let accept = stats.group("metrics.accept").unwrap();
    let picky = stats.group("metrics.picky").unwrap();
    let group = |g: &'static str| [TOPIC, (m::CONSUMER_GROUP_NAME, g)];
    let failed =
        |g: &'static str, e: &'static str| [TOPIC, (m::CONSUMER_GROUP_NAME, g), (m::ERROR_TYPE, e)];
    assert_eq!(accept.handled, 6);
    assert_eq!(
        counter(&samples, m::CONSUMED_MESSAGES, &group("metrics.accept")),
        accept.handled
    );
    // Handled: 3 even, then the healed redrive; failed: 3 odd, then the first redrive again.
    assert_eq!((picky.handled, picky.failed), (4, 4));
    assert_eq!(
        counter(&samples, m::CONSUMED_MESSAGES, &group("metrics.picky")),
        picky.handled
    );
    assert_eq!(
        counter(
            &samples,
            m::CONSUMED_MESSAGES,
            &failed("metrics.picky", "permanent")
        ),
        picky.failed
    );
    assert_eq!(
        counter(
            &samples,
            m::CONSUMED_MESSAGES,
            &failed("metrics.picky", "transient")
        ),
        0
    );
    assert_eq!((picky.dead_lettered, picky.redriven), (4, 2));
    assert_eq!(
        counter(&samples, m::DEAD_LETTERED, &group("metrics.picky")),
        picky.dead_lettered
    );
    assert_eq!(
        counter(&samples, m::REDRIVEN, &group("metrics.picky")),
        picky.redriven
    );
    assert_eq!(
        counter(&samples, m::DEAD_LETTERED, &group("metrics.accept")),
        0
    );

    // One duration sample per handler call.
    assert_eq!(
        histogram_count(&samples, m::PROCESS_DURATION, &group("metrics.accept")),
        6
    );
    assert_eq!(
        histogram_count(&samples, m::PROCESS_DURATION, &group("metrics.picky")),
        4
    );
    assert_eq!(
        histogram_count(
            &samples,
            m::PROCESS_DURATION,
            &failed("metrics.picky", "permanent")
        ),
        4
    );

    // The gauges show the last snapshot (the shutdown's, which saw what `stats` saw).
    assert_eq!(picky.dead_letters, 2);
    assert_eq!(
        gauge(&samples, m::DEAD_LETTER_DEPTH, &group("metrics.picky")),
        2.0
    );
    for g in ["metrics.accept", "metrics.picky"] {
        for p in ["0", "1"] {
            let labels = [TOPIC, (m::CONSUMER_GROUP_NAME, g), (m::PARTITION_ID, p)];
            assert_eq!(gauge(&samples, m::CONSUMER_LAG, &labels), 0.0);
        }
    }

    // Every label is a documented one, with a bounded value: never an event id or a key.
    let documented: BTreeSet<&str> = [
        m::SYSTEM,
        m::OPERATION_NAME,
        m::DESTINATION_NAME,
        m::CONSUMER_GROUP_NAME,
        m::PARTITION_ID,
        m::ERROR_TYPE,
    ]
    .into();
    let names: BTreeSet<&str> = [
        m::SENT_MESSAGES,
        m::CONSUMED_MESSAGES,
        m::PROCESS_DURATION,
        m::DEAD_LETTERED,
        m::REDRIVEN,
        m::CONSUMER_LAG,
        m::DEAD_LETTER_DEPTH,
    ]
    .into();
    let ids: BTreeSet<String> = ids.iter().map(|id| id.to_string()).collect();
    for s in &samples {
        assert!(names.contains(s.name.as_str()), "undocumented metric {s:?}");
        assert_eq!(s.labels.get(m::SYSTEM).map(String::as_str), Some("tidings"));
        for (key, value) in &s.labels {
            assert!(
                documented.contains(key.as_str()),
                "undocumented label {s:?}"
            );
            assert!(!ids.contains(value), "an event id as a label: {s:?}");
            if key != m::PARTITION_ID {
                assert!(value.parse::<u64>().is_err(), "a key as a label: {s:?}");
            }
        }
    }
}

/// The lag gauge follows the events a group has not finished, in memory and with a store,
/// as `Bus::stats` counts them; the dead-letter depth too.
#[test]
fn lag_gauge_counts_unfinished_events_in_memory_and_with_a_store() {
    let _trace = tracing::subscriber::set_default(tracing_subscriber::registry());
    for durable in [false, true] {
        let recorder = Recorded::new();
        let _metrics = metrics::set_default_local_recorder(&recorder);
        let lag = [
            (m::DESTINATION_NAME, "metrics.slow"),
            (m::CONSUMER_GROUP_NAME, "metrics.gated"),
            (m::PARTITION_ID, "0"),
        ];
        runtime(false).block_on(async {
            let (started, mut starts) = mpsc::unbounded_channel();
            let permits = Arc::new(Semaphore::new(0));
            let handler_permits = Arc::clone(&permits);
            let mut builder = Bus::builder()
                .topic(TopicConfig::new("metrics.slow").partitions(1))
                .subscribe::<Slow, _>("metrics.gated", move || Gated {
                    started: started.clone(),
                    permits: Arc::clone(&handler_permits),
                });
            if durable {
                builder = builder.store(MemoryStore::new());
            }
            let bus = builder.build().unwrap();
            for id in 0..3 {
                bus.publish(Slow { id }).await.unwrap();
            }
            // The handler holds the first event: three unfinished.
            assert_eq!(starts.recv().await, Some(0));
            let stats = bus.stats();
            assert_eq!(
                stats.group("metrics.gated").unwrap().lag,
                3,
                "durable: {durable}"
            );
            assert_eq!(gauge(&recorder.samples(), m::CONSUMER_LAG, &lag), 3.0);

            permits.add_permits(1);
            assert_eq!(starts.recv().await, Some(1));
            bus.stats();
            assert_eq!(gauge(&recorder.samples(), m::CONSUMER_LAG, &lag), 2.0);

            permits.add_permits(2);
            bus.settled().await;
            bus.stats();
            assert_eq!(gauge(&recorder.samples(), m::CONSUMER_LAG, &lag), 0.0);
            let s = recorder.samples();
            let group = [
                (m::DESTINATION_NAME, "metrics.slow"),
                (m::CONSUMER_GROUP_NAME, "metrics.gated"),
            ];
            assert_eq!(counter(&s, m::CONSUMED_MESSAGES, &group), 3);
            assert_eq!(
                counter(
                    &s,
                    m::SENT_MESSAGES,
                    &[(m::DESTINATION_NAME, "metrics.slow")]
                ),
                3
            );
            bus.shutdown().await;
        });
    }
}

/// Without anyone calling `Bus::stats`, the bus samples its gauges by itself (here on tokio's
/// paused clock, which jumps to the next sample when the runtime is idle).
#[test]
fn the_bus_samples_its_gauges_by_itself() {
    let _trace = tracing::subscriber::set_default(tracing_subscriber::registry());
    let recorder = Recorded::new();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let depth = [TOPIC, (m::CONSUMER_GROUP_NAME, "metrics.sampled")];
    runtime(true).block_on(async {
        let bus = Bus::builder()
            .topic(TopicConfig::new("metrics.orders").partitions(1))
            .subscribe::<Order, _>("metrics.sampled", || {
                Picky(Arc::new(AtomicBool::new(false)))
            })
            .build()
            .unwrap();
        bus.publish(Order { id: 1 }).await.unwrap();
        bus.settled().await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert_eq!(
            gauge(&recorder.samples(), m::DEAD_LETTER_DEPTH, &depth),
            1.0
        );
        bus.shutdown().await;
    });
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "metrics.transfers", key = account, name = "metrics.Transfer")]
struct Transfer {
    account: u64,
    cents: i64,
}

/// Refuses negative transfers.
struct Ledger;

impl Handler<Transfer> for Ledger {
    async fn handle(&mut self, e: &Envelope<Transfer>, _: &Context) -> Result<(), HandlerError> {
        if e.event().cents < 0 {
            return Err(HandlerError::permanent("overdrawn"));
        }
        Ok(())
    }
}

/// A sequenced dead-letter queue parks the later events of a failed key: counted failed with
/// `error.type="parked"` (and dead-lettered), apart from the failure itself.
#[test]
fn parked_events_are_failures_of_their_own_type() {
    let _trace = tracing::subscriber::set_default(tracing_subscriber::registry());
    let recorder = Recorded::new();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let stats = runtime(false).block_on(async {
        let bus = Bus::builder()
            .topic(TopicConfig::new("metrics.transfers").partitions(1))
            .subscribe::<Transfer, _>(
                Subscription::new("metrics.ledger").dead_letter(DeadLetterPolicy::Sequenced),
                || Ledger,
            )
            .build()
            .unwrap();
        for (account, cents) in [(1, -5), (1, 10), (1, 20), (2, 30)] {
            bus.publish(Transfer { account, cents }).await.unwrap();
        }
        bus.settled().await;
        let stats = bus.stats();
        bus.shutdown().await;
        stats
    });
    let ledger = stats.group("metrics.ledger").unwrap();
    assert_eq!(
        (ledger.handled, ledger.failed, ledger.dead_lettered),
        (1, 3, 3)
    );
    let s = recorder.samples();
    let topic = (m::DESTINATION_NAME, "metrics.transfers");
    let group = (m::CONSUMER_GROUP_NAME, "metrics.ledger");
    let failed = |e| {
        counter(
            &s,
            m::CONSUMED_MESSAGES,
            &[topic, group, (m::ERROR_TYPE, e)],
        )
    };
    assert_eq!((failed("permanent"), failed("parked")), (1, 2));
    assert_eq!(counter(&s, m::CONSUMED_MESSAGES, &[topic, group]), 1);
    assert_eq!(counter(&s, m::DEAD_LETTERED, &[topic, group]), 3);
    assert_eq!(gauge(&s, m::DEAD_LETTER_DEPTH, &[topic, group]), 3.0);
    // The parked events were never handed to the handler: one duration sample each for the
    // failure and the other account's transfer.
    assert_eq!(
        histogram_count(
            &s,
            m::PROCESS_DURATION,
            &[topic, group, (m::ERROR_TYPE, "permanent")]
        ),
        1
    );
    assert_eq!(histogram_count(&s, m::PROCESS_DURATION, &[topic, group]), 1);
}
