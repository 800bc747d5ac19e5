//! Several processes on one store: events another bus appends reach this bus's groups without
//! this bus appending anything (announcements with PostgreSQL `LISTEN`/`NOTIFY`, polling the
//! heads with the others), in per-key order, each once per group, also across a lost listener
//! connection. Two buses in one test stand for two processes: clones of one `MemoryStore`, two
//! `SqliteStore` handles on one file, two `PostgresStore`s on one schema.
use crate::support::stores::Backend;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use tidings::prelude::*;
use tidings::store::Store;
use tidings::{BusBuilder, TopicConfig};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "ow_orders", key = order, name = "other_writers.Placed")]
struct Placed {
    order: u64,
    seq: u64,
}

/// Sends each event it handles, as (group, order, seq).
struct Forward {
    group: String,
    tx: mpsc::UnboundedSender<(String, u64, u64)>,
}

impl Handler<Placed> for Forward {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        let p = e.event();
        let _ = self.tx.send((self.group.clone(), p.order, p.seq));
        Ok(())
    }
}

/// A bus on `store` with 4 partitions; `group`, if any, forwards what it handles to `tx`.
fn bus_on(
    store: Arc<dyn Store>,
    poll: Duration,
    group: Option<&str>,
    tx: &mpsc::UnboundedSender<(String, u64, u64)>,
) -> Bus {
    let mut builder: BusBuilder = Bus::builder()
        .store(store)
        .poll_interval(poll)
        .topic(TopicConfig::new("ow_orders").partitions(4));
    if let Some(group) = group {
        let (group, tx) = (group.to_owned(), tx.clone());
        builder = builder.subscribe::<Placed, _>(Subscription::new(&group), move || Forward {
            group: group.clone(),
            tx: tx.clone(),
        });
    }
    builder.build().expect("the bus builds")
}

/// Publishes orders `orders` × seq `seqs` on `bus`, seq by seq.
async fn publish(bus: &Bus, orders: std::ops::Range<u64>, seqs: std::ops::Range<u64>) {
    for seq in seqs {
        for order in orders.clone() {
            bus.publish(Placed { order, seq }).await.expect("published");
        }
    }
}

/// Receives `n` events (30 s at most: a lost event fails the test instead of hanging it).
async fn receive(
    rx: &mut mpsc::UnboundedReceiver<(String, u64, u64)>,
    n: usize,
) -> Vec<(String, u64, u64)> {
    let mut got = Vec::with_capacity(n);
    let all = async {
        while got.len() < n {
            got.push(rx.recv().await.expect("the handlers live"));
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .is_err()
    {
        panic!("only {} of {n} events arrived: {got:?}", got.len());
    }
    got
}

/// Per group: each order's seqs, in the order handled.
fn by_key(got: &[(String, u64, u64)]) -> HashMap<(String, u64), Vec<u64>> {
    let mut seen: HashMap<(String, u64), Vec<u64>> = HashMap::new();
    for (group, order, seq) in got {
        seen.entry((group.clone(), *order)).or_default().push(*seq);
    }
    seen
}

/// Bus A only publishes, bus B only consumes: B handles every event of A, each once, per key
/// in order, though it never appends anything itself.
async fn consumer_only(a: Arc<dyn Store>, b: Arc<dyn Store>, poll: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = bus_on(b, poll, Some("billing"), &tx);
    consumer.ready().await;
    let producer = bus_on(a, poll, None, &tx);
    publish(&producer, 0..8, 0..25).await;
    let got = receive(&mut rx, 200).await;
    let seen = by_key(&got);
    for order in 0..8 {
        assert_eq!(
            seen[&("billing".to_owned(), order)],
            (0..25).collect::<Vec<_>>(),
            "order {order}"
        );
    }
    // Nothing more: every event once.
    consumer.settled().await;
    producer.shutdown().await;
    consumer.shutdown().await;
    assert!(rx.try_recv().is_err(), "an event was handled twice");
}

/// Both buses publish (different orders) and consume (different groups): every group gets every
/// event of both, each once, per key in order, its own and the other's interleaved in log order.
async fn both_ways(a: Arc<dyn Store>, b: Arc<dyn Store>, poll: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let bus_a = bus_on(a, poll, Some("a"), &tx);
    let bus_b = bus_on(b, poll, Some("b"), &tx);
    bus_a.ready().await;
    bus_b.ready().await;
    tokio::join!(publish(&bus_a, 0..5, 0..20), publish(&bus_b, 5..10, 0..20));
    let got = receive(&mut rx, 400).await;
    let seen = by_key(&got);
    for group in ["a", "b"] {
        for order in 0..10 {
            assert_eq!(
                seen[&(group.to_owned(), order)],
                (0..20).collect::<Vec<_>>(),
                "group {group}, order {order}"
            );
        }
    }
    bus_a.settled().await;
    bus_b.settled().await;
    bus_a.shutdown().await;
    bus_b.shutdown().await;
    assert!(rx.try_recv().is_err(), "an event was handled twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_only_bus_handles_what_another_bus_publishes_memory_polling() {
    let store = tidings::store::MemoryStore::new();
    consumer_only(
        Arc::new(store.clone()),
        Arc::new(store),
        Duration::from_millis(20),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buses_publishing_and_consuming_on_one_store_see_each_other_memory_polling() {
    let store = tidings::store::MemoryStore::new();
    both_ways(
        Arc::new(store.clone()),
        Arc::new(store),
        Duration::from_millis(20),
    )
    .await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_only_bus_handles_what_another_bus_publishes_sqlite_polling() {
    let backend = Backend::sqlite();
    consumer_only(
        backend.open().await,
        backend.open().await,
        Duration::from_millis(20),
    )
    .await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buses_publishing_and_consuming_on_one_store_see_each_other_sqlite_polling() {
    let backend = Backend::sqlite();
    both_ways(
        backend.open().await,
        backend.open().await,
        Duration::from_millis(20),
    )
    .await;
}

/// No polling to speak of (an hour): only the announcements can bring A's events to B.
#[cfg(feature = "postgres")]
const NO_POLL: Duration = Duration::from_secs(3600);

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_only_bus_handles_what_another_bus_publishes_postgres_notify() {
    let backend = Backend::postgres("other_writers_consumer_only").await;
    consumer_only(backend.open().await, backend.open().await, NO_POLL).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buses_publishing_and_consuming_on_one_store_see_each_other_postgres_notify() {
    let backend = Backend::postgres("other_writers_both_ways").await;
    both_ways(backend.open().await, backend.open().await, NO_POLL).await;
}

/// The listening connection is killed (`pg_terminate_backend`): the events published while it
/// was down, and after it is back, still reach the consumer, without polling.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_connection_loses_no_event_postgres() {
    let backend = Backend::postgres("other_writers_killed_listener").await;
    let Backend::Postgres { schema, .. } = &backend else {
        unreachable!()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = bus_on(backend.open().await, NO_POLL, Some("billing"), &tx);
    consumer.ready().await;
    let producer = bus_on(backend.open().await, NO_POLL, None, &tx);
    // Announcements work (nothing else brings events here).
    publish(&producer, 0..4, 0..5).await;
    let mut got = receive(&mut rx, 20).await;
    let killed = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE query = 'LISTEN \"tidings_{schema}\"'"
    );
    let pool = sqlx::PgPool::connect(&crate::support::stores::database_url())
        .await
        .expect("PostgreSQL");
    let n = sqlx::query(sqlx::AssertSqlSafe(killed))
        .execute(&pool)
        .await
        .expect("terminate the listener")
        .rows_affected();
    assert_eq!(n, 1, "the consumer's listening connection was found");
    pool.close().await;
    // Published right after the kill: their announcements are likely lost.
    publish(&producer, 0..4, 5..10).await;
    got.extend(receive(&mut rx, 20).await);
    // And later ones too (the listener is back, or its resync reads them).
    publish(&producer, 0..4, 10..15).await;
    got.extend(receive(&mut rx, 20).await);
    let seen = by_key(&got);
    for order in 0..4 {
        assert_eq!(
            seen[&("billing".to_owned(), order)],
            (0..15).collect::<Vec<_>>(),
            "order {order}"
        );
    }
    consumer.settled().await;
    producer.shutdown().await;
    consumer.shutdown().await;
    assert!(rx.try_recv().is_err(), "an event was handled twice");
}
