//! One group, several event types: a handler implementing `Handler<A>` and `Handler<B>`
//! registered once with `subscribe::<(A, B), _>` gets both types of its topic in partition
//! order (per key, in publish order across types), and only those types.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::store::MemoryStore;
use tidings::BuildError;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "sets.orders", key = order, name = "event_sets.Placed")]
struct Placed {
    order: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "sets.orders", key = order, name = "event_sets.Paid")]
struct Paid {
    order: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "sets.orders", key = order, name = "event_sets.Shipped")]
struct Shipped {
    order: u32,
}

/// Same topic, not in the set.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "sets.orders", key = order, name = "event_sets.Cancelled")]
struct Cancelled {
    order: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "sets.payments", key = order, name = "event_sets.Refunded")]
struct Refunded {
    order: u32,
}

type Log = Arc<Mutex<HashMap<u32, Vec<&'static str>>>>;

/// Records what it saw per order; fails each order's first `Paid` once when `flaky`.
#[derive(Clone, Default)]
struct Lifecycle {
    log: Log,
    flaky: bool,
    failed: Arc<Mutex<std::collections::HashSet<u32>>>,
}

impl Lifecycle {
    fn saw(&self, order: u32, what: &'static str) {
        self.log
            .lock()
            .unwrap()
            .entry(order)
            .or_default()
            .push(what);
    }
}

impl Handler<Placed> for Lifecycle {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> HandlerResult {
        self.saw(e.event().order, "placed");
        Ok(())
    }
}

impl Handler<Paid> for Lifecycle {
    async fn handle(&mut self, e: &Envelope<Paid>, _: &Context) -> HandlerResult {
        let order = e.event().order;
        if self.flaky && self.failed.lock().unwrap().insert(order) {
            return Err(HandlerError::msg("payment service busy"));
        }
        self.saw(order, "paid");
        Ok(())
    }
}

impl Handler<Shipped> for Lifecycle {
    async fn handle(&mut self, e: &Envelope<Shipped>, _: &Context) -> HandlerResult {
        self.saw(e.event().order, "shipped");
        Ok(())
    }
}

struct PaidCounter(Arc<AtomicU32>);
impl Handler<Paid> for PaidCounter {
    async fn handle(&mut self, _: &Envelope<Paid>, _: &Context) -> HandlerResult {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

const ORDERS: u32 = 300;

async fn publish_lifecycles(bus: &Bus) {
    // Four publishers, each the whole life of its orders, interleaved with the others.
    let mut tasks = Vec::new();
    for lane in 0..4u32 {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            for order in (0..ORDERS).filter(|o| o % 4 == lane) {
                bus.publish(Placed { order }).await.unwrap();
                bus.publish(Cancelled { order }).await.unwrap();
                bus.publish(Paid { order }).await.unwrap();
                tokio::task::yield_now().await;
                bus.publish(Shipped { order }).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

fn assert_lifecycles(log: &Log, orders: u32) {
    let log = log.lock().unwrap();
    assert_eq!(log.len(), orders as usize, "every order reached the group");
    for (order, seen) in log.iter() {
        assert_eq!(
            seen,
            &["placed", "paid", "shipped"],
            "order {order}: the set's types in publish order, nothing else"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_of_several_types_gets_them_in_publish_order_per_key_and_nothing_else() {
    let lifecycle = Lifecycle::default();
    let paid_only = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&paid_only);
    let handler = lifecycle.clone();
    let bus = Bus::builder()
        .topic(TopicConfig::new("sets.orders").partitions(4))
        .subscribe::<(Placed, Paid, Shipped), _>("lifecycle", move || handler.clone())
        .subscribe::<Paid, _>("payments-audit", move || PaidCounter(Arc::clone(&counter)))
        .build()
        .unwrap();
    publish_lifecycles(&bus).await;
    bus.settled().await;
    assert_lifecycles(&lifecycle.log, ORDERS);
    assert_eq!(
        paid_only.load(Ordering::Relaxed),
        ORDERS,
        "a single-type group of the same topic still gets its type"
    );
    let stats = bus.stats();
    let group = stats.group("lifecycle").unwrap();
    assert_eq!(group.handled, u64::from(ORDERS) * 3);
    assert_eq!(
        bus.dead_letters("lifecycle").unwrap().len(),
        0,
        "no event of another type reached the group"
    );
    bus.shutdown().await;
}

#[tokio::test]
async fn a_failed_event_of_a_set_is_redelivered_before_the_next_type_of_its_key() {
    let lifecycle = Lifecycle {
        flaky: true,
        ..Lifecycle::default()
    };
    let handler = lifecycle.clone();
    let bus = Bus::builder()
        .topic(TopicConfig::new("sets.orders").partitions(2))
        .subscribe::<(Placed, Paid, Shipped), _>("lifecycle", move || handler.clone())
        .build()
        .unwrap();
    publish_lifecycles(&bus).await;
    bus.settled().await;
    assert_lifecycles(&lifecycle.log, ORDERS);
    assert_eq!(lifecycle.failed.lock().unwrap().len(), ORDERS as usize);
    bus.shutdown().await;
}

#[tokio::test]
async fn with_a_store_a_set_replays_only_its_types_in_log_order() {
    let store = MemoryStore::new();
    let topic = || TopicConfig::new("sets.orders").partitions(3);
    let bus = Bus::builder()
        .store(store.clone())
        .topic(topic())
        .build()
        .unwrap();
    publish_lifecycles(&bus).await;
    bus.shutdown().await;

    let lifecycle = Lifecycle::default();
    let handler = lifecycle.clone();
    let bus = Bus::builder()
        .store(store)
        .topic(topic())
        .subscribe::<(Placed, Paid, Shipped), _>(
            Subscription::new("lifecycle").start_from(StartFrom::Earliest),
            move || handler.clone(),
        )
        .build()
        .unwrap();
    bus.settled().await;
    assert_lifecycles(&lifecycle.log, ORDERS);
    assert_eq!(
        bus.dead_letters("lifecycle").unwrap().len(),
        0,
        "rows of other types are skipped, not dead-lettered"
    );
    bus.shutdown().await;
}

/// One group over two topics: records per topic what it saw; fails the first refund of order 7.
#[derive(Clone, Default)]
struct Refunds {
    seen: Arc<Mutex<Vec<(&'static str, u32)>>>,
    failed_once: Arc<std::sync::atomic::AtomicBool>,
}

impl Handler<Placed> for Refunds {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> HandlerResult {
        self.seen.lock().unwrap().push(("placed", e.event().order));
        Ok(())
    }
}

impl Handler<Refunded> for Refunds {
    async fn handle(&mut self, e: &Envelope<Refunded>, _: &Context) -> HandlerResult {
        if e.event().order == 7 && !self.failed_once.swap(true, Ordering::SeqCst) {
            return Err(HandlerError::permanent("refund service down"));
        }
        self.seen
            .lock()
            .unwrap()
            .push(("refunded", e.event().order));
        Ok(())
    }
}

async fn publish_both_topics(bus: &Bus) {
    for order in 0..50 {
        bus.publish(Placed { order }).await.unwrap();
        bus.publish(Refunded { order }).await.unwrap();
        bus.publish(Paid { order }).await.unwrap(); // not in the set
    }
}

#[tokio::test]
async fn a_set_spanning_topics_is_one_group_that_reads_each_topic_in_order() {
    let refunds = Refunds::default();
    let handler = refunds.clone();
    let bus = Bus::builder()
        .topic(TopicConfig::new("sets.orders").partitions(3))
        .topic(TopicConfig::new("sets.payments").partitions(2))
        .subscribe::<(Placed, Refunded), _>(
            Subscription::new("refunds").max_deliveries(1),
            move || handler.clone(),
        )
        .build()
        .unwrap();
    publish_both_topics(&bus).await;
    bus.settled().await;
    {
        let seen = refunds.seen.lock().unwrap();
        for kind in ["placed", "refunded"] {
            let mut orders: Vec<u32> = seen.iter().filter(|s| s.0 == kind).map(|s| s.1).collect();
            let expected: Vec<u32> = (0..50).filter(|o| kind == "placed" || *o != 7).collect();
            orders.sort_unstable();
            assert_eq!(orders, expected, "{kind}: every event of the topic, once");
        }
    }
    // Statistics per topic: the group is under both.
    let stats = bus.stats();
    for (topic, handled) in [("sets.orders", 50), ("sets.payments", 49)] {
        let group = stats
            .topic(topic)
            .unwrap()
            .groups
            .iter()
            .find(|g| g.group == "refunds");
        assert_eq!(group.unwrap().handled, handled, "{topic}");
    }
    // One dead-letter handle over both topics' queues; the entry of the second topic redrives.
    let dlq = bus.dead_letters("refunds").unwrap();
    let letters = dlq.list();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].envelope.topic(), "sets.payments");
    assert_eq!(
        dlq.find(letters[0].envelope.id()).unwrap().seq,
        letters[0].seq
    );
    dlq.redrive(letters[0].seq).await.unwrap();
    bus.settled().await;
    assert!(dlq.is_empty());
    assert!(refunds.seen.lock().unwrap().contains(&("refunded", 7)));
    bus.shutdown().await;
}

#[tokio::test]
async fn with_a_store_a_set_spanning_topics_replays_and_rebuilds_every_topic() {
    let store = MemoryStore::new();
    let topics = |b: tidings::BusBuilder| {
        b.topic(TopicConfig::new("sets.orders").partitions(3))
            .topic(TopicConfig::new("sets.payments").partitions(2))
    };
    let bus = topics(Bus::builder().store(store.clone())).build().unwrap();
    publish_both_topics(&bus).await;
    bus.shutdown().await;

    let refunds = Refunds::default();
    let handler = refunds.clone();
    let bus = topics(Bus::builder().store(store.clone()))
        .subscribe::<(Placed, Refunded), _>(
            Subscription::new("refunds")
                .start_from(StartFrom::Earliest)
                .max_deliveries(1),
            move || handler.clone(),
        )
        .build()
        .unwrap();
    assert!(bus.ready().await);
    bus.settled().await;
    assert_eq!(refunds.seen.lock().unwrap().len(), 99, "both logs replayed");
    assert_eq!(bus.dead_letters("refunds").unwrap().len(), 1);

    refunds.seen.lock().unwrap().clear();
    let rebuild = bus.rebuild("refunds", StartFrom::Earliest).await.unwrap();
    rebuild.caught_up().await.unwrap();
    bus.settled().await;
    let seen = refunds.seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|s| s.0 == "placed").count(),
        50,
        "the rebuild replayed the first topic"
    );
    assert!(
        seen.iter().filter(|s| s.0 == "refunded").count() >= 49,
        "and the second"
    );
    bus.shutdown().await;

    // After a restart the dead letter of the second topic comes back, in its own queue.
    let bus = topics(Bus::builder().store(store))
        .subscribe::<(Placed, Refunded), _>("refunds", Refunds::default)
        .build()
        .unwrap();
    assert!(bus.ready().await);
    let letters = bus.dead_letters("refunds").unwrap().list();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].envelope.topic(), "sets.payments");
    assert_eq!(
        letters[0].envelope.event().event_info().name,
        "event_sets.Refunded"
    );
    bus.shutdown().await;
}

#[tokio::test]
async fn naming_a_type_twice_in_a_set_is_a_build_error() {
    let err = Bus::builder()
        .subscribe::<(Paid, Paid), _>("twice", Lifecycle::default)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::InvalidSetting(m) if m.contains("named twice")),
        "{err}"
    );
}
