//! Producer-side deduplication: concurrent publishes of one id on different partitions publish
//! once; the same id on two topics is two events.

use serde::{Deserialize, Serialize};
use tidings::middleware::DedupWindow;
use tidings::prelude::*;
use tidings::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order_id)]
struct OrderPlaced {
    order_id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = order_id)]
struct PaymentRequested {
    order_id: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_publishes_of_one_id_on_different_partitions_publish_once() {
    for _ in 0..200 {
        let bus = Bus::builder()
            .topic(TopicConfig::new("orders").partitions(8))
            .dedup_publishes(DedupWindow::new())
            .build()
            .unwrap();
        let id = Uuid::now_v7();
        let tasks: Vec<_> = (0..16u64)
            .map(|k| {
                let bus = bus.clone();
                tokio::spawn(async move {
                    bus.publish_with(OrderPlaced { order_id: k }, PublishOptions::new().id(id))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut firsts = 0;
        for t in tasks {
            if !t.await.unwrap().duplicate {
                firsts += 1;
            }
        }
        assert_eq!(firsts, 1);
        assert_eq!(bus.stats().topic("orders").unwrap().published, 1);
        bus.shutdown().await;
    }
}

/// One idempotency key (the web request's id, as the builder docs suggest) used for the two
/// events a request publishes: the second, of another topic, is dropped as a "duplicate" and its
/// receipt names the first event's partition and offset, in another topic.
#[tokio::test]
async fn the_same_id_on_two_topics_is_not_a_duplicate() {
    let bus = Bus::builder()
        .record(true)
        .dedup_publishes(DedupWindow::new())
        .build()
        .unwrap();
    let request_id = Uuid::now_v7();
    let a = bus
        .publish_with(
            OrderPlaced { order_id: 1 },
            PublishOptions::new().id(request_id),
        )
        .await
        .unwrap();
    let b = bus
        .publish_with(
            PaymentRequested { order_id: 1 },
            PublishOptions::new().id(request_id),
        )
        .await
        .unwrap();
    assert!(!a.duplicate);
    assert!(
        !b.duplicate,
        "PaymentRequested was dropped as a duplicate of OrderPlaced: {b:?}"
    );
    bus.shutdown().await;
}
