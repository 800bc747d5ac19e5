//! Several buses on clones of one `MemoryStore` share it as processes share a database: one log,
//! one set of committed offsets, dead letters and marks.

use tidings::prelude::*;
use tidings::store::{Log as _, MemoryStore, StartFrom};

use crate::support::stores::{self, Log, Placed};

/// A bus on one clone publishes and its group commits; a bus on another clone, built while the
/// first is still around (as a second instance would start), resumes that group where the first
/// left it, and a new group reading from the earliest offset finds the first bus's events in the
/// log. What the second publishes lands in the same log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buses_on_clones_of_a_memory_store_share_one_log_and_its_offsets() {
    let store = MemoryStore::new();
    let orders = || TopicConfig::new("orders").partitions(2);
    let first_log = Log::default();
    let first = stores::record(
        Bus::builder().store(store.clone()).topic(orders()),
        "g",
        &first_log,
    )
    .build()
    .unwrap();
    stores::publish_orders(&first, 4, 2).await;
    first.settled().await;
    first.shutdown().await;
    assert_eq!(first_log.len("g"), 8);

    let second_log = Log::default();
    let builder = stores::record(
        Bus::builder().store(store.clone()).topic(orders()),
        "g",
        &second_log,
    );
    let second = stores::record_with(
        builder,
        Subscription::new("h").start_from(StartFrom::Earliest),
        &second_log,
    )
    .build()
    .unwrap();
    second.settled().await;
    assert_eq!(
        second_log.len("g"),
        0,
        "g resumes after what the first bus handled"
    );
    let mut replayed = second_log.of("h");
    replayed.sort();
    let mut published = first_log.of("g");
    published.sort();
    assert_eq!(
        replayed, published,
        "h reads the first bus's events from the log"
    );

    second.publish(Placed { order: 9, seq: 0 }).await.unwrap();
    second.settled().await;
    second.shutdown().await;
    assert_eq!(second_log.of("g"), vec![(9, 0)]);
    let heads = store.head("orders", 0).await.unwrap() + store.head("orders", 1).await.unwrap();
    assert_eq!(
        heads, 9,
        "one log: 8 events of the first bus, 1 of the second"
    );
    drop(first);
}
