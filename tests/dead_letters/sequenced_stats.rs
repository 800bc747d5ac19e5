//! Stats of a sequenced dead-letter queue: a duplicate released behind a redriven head counts
//! as a duplicate.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidings::dead_letter::DeadLetterPolicy;
use tidings::prelude::*;
use tidings::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "ledger", key = account)]
struct Credited {
    account: u64,
    cents: u64,
}

#[derive(Clone, Default)]
struct Book {
    fail_first: Arc<AtomicU32>,
    handled: Arc<AtomicU32>,
}
impl Handler<Credited> for Book {
    async fn handle(&mut self, _: &Envelope<Credited>, _: &Context) -> HandlerResult {
        if self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(HandlerError::msg("locked"));
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A duplicate among the events released behind a redriven head is acknowledged by Dedup
/// (counted in `handled`) but not counted in `duplicates`.
#[tokio::test]
async fn a_duplicate_released_behind_a_redriven_head_is_counted_as_a_duplicate() {
    let book = Book::default();
    book.fail_first.store(1, Ordering::SeqCst);
    let bus = {
        let book = book.clone();
        Bus::builder()
            .topic(TopicConfig::new("ledger").partitions(1))
            .subscribe::<Credited, _>(
                Subscription::new("book")
                    .max_deliveries(1)
                    .dead_letter(DeadLetterPolicy::Sequenced)
                    .layer(Dedup::new(DedupWindow::new())),
                move || book.clone(),
            )
            .build()
            .unwrap()
    };
    bus.publish(Credited {
        account: 1,
        cents: 1,
    })
    .await
    .unwrap(); // fails: head
    bus.settled().await;
    let b = Uuid::now_v7();
    for _ in 0..2 {
        bus.publish_with(
            Credited {
                account: 1,
                cents: 2,
            },
            PublishOptions::new().id(b),
        )
        .await
        .unwrap();
    }
    bus.settled().await; // both copies parked
    let dlq = bus.dead_letters("book").unwrap();
    let head = dlq.list()[0].seq;
    dlq.redrive(head).await.unwrap();
    bus.settled().await;
    assert_eq!(book.handled.load(Ordering::SeqCst), 2, "head + b once");
    let g = bus.stats().group("book").unwrap().clone();
    bus.shutdown().await;
    assert_eq!(g.handled, 3);
    assert_eq!(g.duplicates, 1, "the second copy of b was skipped by Dedup");
}
