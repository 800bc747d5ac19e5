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

struct Refunds;
impl Handler<Placed> for Refunds {
    async fn handle(&mut self, _: &Envelope<Placed>, _: &Context) -> HandlerResult {
        Ok(())
    }
}
impl Handler<Refunded> for Refunds {
    async fn handle(&mut self, _: &Envelope<Refunded>, _: &Context) -> HandlerResult {
        Ok(())
    }
}

#[tokio::test]
async fn a_set_spanning_topics_or_naming_a_type_twice_is_a_build_error() {
    let err = Bus::builder()
        .subscribe::<(Placed, Refunded), _>("refunds", || Refunds)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            &err,
            BuildError::EventSetSpansTopics { group, first_topic: "sets.orders", other_topic: "sets.payments", .. }
                if group == "refunds"
        ),
        "{err}"
    );
    let err = Bus::builder()
        .subscribe::<(Paid, Paid), _>("twice", Lifecycle::default)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::InvalidSetting(m) if m.contains("named twice")),
        "{err}"
    );
}
