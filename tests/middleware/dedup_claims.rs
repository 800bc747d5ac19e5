//! Edge cases of deduplication found in review: a repeat publish into a full queue, a cancelled
//! completion.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::middleware::{Claim, DedupStore, MemoryDedupStore};
use tidings::prelude::*;
use tidings::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = key)]
struct Order {
    key: u64,
}

#[derive(Clone)]
struct Blocked(Arc<tokio::sync::Semaphore>);
impl Handler<Order> for Blocked {
    async fn handle(&mut self, _: &Envelope<Order>, _: &Context) -> HandlerResult {
        self.0.acquire().await.unwrap().forget();
        Ok(())
    }
}

/// A repeated publish is answered with the first receipt; it should not wait for room it will
/// never use.
#[tokio::test(start_paused = true)]
async fn a_duplicate_publish_does_not_wait_for_room() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let bus = {
        let gate = gate.clone();
        Bus::builder()
            .topic(TopicConfig::new("orders").partitions(1).capacity(1))
            .dedup_publishes(DedupWindow::new())
            .subscribe::<Order, _>(Subscription::new("shipping").batch_size(1), move || {
                Blocked(gate.clone())
            })
            .build()
            .unwrap()
    };
    let id = Uuid::now_v7();
    let first = bus
        .publish_with(Order { key: 1 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    tokio::task::yield_now().await; // the worker takes it and blocks
    bus.publish(Order { key: 2 }).await.unwrap(); // the queue is full now
    let again = tokio::time::timeout(
        Duration::from_secs(5),
        bus.publish_with(Order { key: 1 }, PublishOptions::new().id(id)),
    )
    .await;
    gate.add_permits(10);
    let again = again
        .expect("the duplicate publish waited for room")
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.offset, first.offset);
    bus.shutdown().await;
}

/// A store whose `complete` awaits (a database round trip).
#[derive(Clone, Default)]
struct SlowStore(MemoryDedupStore);
impl DedupStore for SlowStore {
    async fn claim(&self, group: &str, id: Uuid) -> Result<Claim, HandlerError> {
        self.0.claim(group, id).await
    }
    async fn complete(&self, group: &str, id: Uuid) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.0.complete(group, id).await
    }
    fn release(&self, group: &str, id: Uuid) {
        self.0.release(group, id)
    }
}

/// An outer timeout that fires while the store marks the id leaves the claim in progress.
#[tokio::test(start_paused = true)]
async fn a_cancelled_complete_does_not_leak_the_claim() {
    let store = SlowStore(MemoryDedupStore::new(DedupWindow::new()));
    #[derive(Clone)]
    struct Ok_;
    impl Handler<Order> for Ok_ {
        async fn handle(&mut self, _: &Envelope<Order>, _: &Context) -> HandlerResult {
            Ok(())
        }
    }
    let bus = Bus::builder()
        .topic(TopicConfig::new("orders").partitions(1))
        .subscribe::<Order, _>(
            Subscription::new("ledger")
                .layer(Dedup::with_store(store.clone()))
                .layer(Timeout::new(Duration::from_millis(10)))
                .max_deliveries(1),
            || Ok_,
        )
        .build()
        .unwrap();
    let receipt = bus.publish(Order { key: 1 }).await.unwrap();
    bus.settled().await;
    // The event timed out in `complete`; it was dead-lettered, so its claim must be released.
    assert_eq!(bus.dead_letters("ledger").unwrap().len(), 1);
    assert_eq!(
        store.0.claim("ledger", receipt.id).await.unwrap(),
        Claim::New,
        "the id stays in progress forever"
    );
    bus.shutdown().await;
}
