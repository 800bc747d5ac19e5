//! Deduplication: by (group, event id), marked only after success, within a window of time or
//! count; producer-side deduplication of publishes with explicit ids; effectively-once delivery.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::middleware::MemoryDedupStore;
use tidings::prelude::*;
use tidings::testing::Recorder;
use tidings::{Published, Uuid};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "ledger", key = account)]
struct Credited {
    account: u64,
    cents: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "pings")]
struct Ping {
    n: u32,
}

#[derive(Clone, Default)]
struct Book {
    handled: Recorder<(Uuid, u64)>,
    /// Fail the first `fail_first` calls.
    fail_first: Arc<AtomicU32>,
}

impl Handler<Credited> for Book {
    async fn handle(&mut self, e: &Envelope<Credited>, _: &Context) -> HandlerResult {
        if self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(HandlerError::msg("ledger locked"));
        }
        self.handled.push((e.id(), e.event().cents));
        Ok(())
    }
}

fn with_id(id: Uuid) -> PublishOptions {
    PublishOptions::new().id(id)
}

/// A bus with one group, "book", handled by `book`.
fn book_bus(book: &Book, subscription: Subscription) -> Bus {
    let book = book.clone();
    Bus::builder()
        .subscribe::<Credited, _>(subscription, move || book.clone())
        .build()
        .unwrap()
}

/// Publishes a credit of `cents` to account 1 with the event id `id`.
async fn credit(bus: &Bus, id: Uuid, cents: u64) -> Published {
    bus.publish_with(Credited { account: 1, cents }, with_id(id))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_duplicate_id_is_handled_once_per_group_with_dedup_and_twice_without() {
    let (a, b, plain) = (Book::default(), Book::default(), Book::default());
    let bus = {
        let (a, b, plain) = (a.clone(), b.clone(), plain.clone());
        Bus::builder()
            .subscribe::<Credited, _>(
                Subscription::new("a").layer(Dedup::new(DedupWindow::new())),
                move || a.clone(),
            )
            .subscribe::<Credited, _>(
                Subscription::new("b").layer(Dedup::new(DedupWindow::new())),
                move || b.clone(),
            )
            .subscribe::<Credited, _>("plain", move || plain.clone())
            .build()
            .unwrap()
    };
    let id = Uuid::now_v7();
    for _ in 0..3 {
        credit(&bus, id, 5).await;
    }
    bus.settled().await;
    assert_eq!(a.handled.take(), vec![(id, 5)], "once in group a");
    assert_eq!(b.handled.take(), vec![(id, 5)], "once in group b too");
    assert_eq!(plain.handled.len(), 3, "no dedup: every delivery");
    let stats = bus.stats();
    assert_eq!(
        stats.group("a").unwrap().handled,
        3,
        "skipped duplicates are acknowledged"
    );
    assert_eq!(stats.group("a").unwrap().duplicates, 2);
    assert_eq!(stats.group("plain").unwrap().duplicates, 0);
    bus.shutdown().await;
}

#[tokio::test]
async fn a_failed_event_is_not_marked_so_its_redelivery_is_handled() {
    let book = Book::default();
    book.fail_first.store(1, Ordering::SeqCst);
    let bus = book_bus(
        &book,
        Subscription::new("book")
            .max_deliveries(1)
            .layer(Dedup::new(DedupWindow::new())),
    );
    let id = Uuid::now_v7();
    credit(&bus, id, 5).await;
    bus.settled().await;
    assert!(book.handled.is_empty());
    assert_eq!(bus.dead_letters("book").unwrap().len(), 1);
    // The same event again (a redelivery from upstream): not skipped.
    credit(&bus, id, 5).await;
    bus.settled().await;
    assert_eq!(book.handled.take(), vec![(id, 5)]);
    // And the redrive of the dead letter is now a duplicate: skipped.
    let dlq = bus.dead_letters("book").unwrap();
    dlq.redrive_all().await.unwrap();
    bus.settled().await;
    assert!(book.handled.is_empty());
    bus.shutdown().await;
}

#[tokio::test]
async fn retries_inside_dedup_mark_the_id_once_after_the_successful_attempt() {
    let book = Book::default();
    book.fail_first.store(2, Ordering::SeqCst);
    let store = MemoryDedupStore::new(DedupWindow::new());
    let bus = book_bus(
        &book,
        Subscription::new("book")
            .layer(Retry::immediate(3))
            .layer(Dedup::with_store(store.clone())),
    );
    let id = Uuid::now_v7();
    credit(&bus, id, 5).await;
    bus.settled().await;
    assert_eq!(book.handled.take(), vec![(id, 5)]);
    assert_eq!(store.len("book"), 1);
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_window_forgets_ids_by_age_and_by_count() {
    let book = Book::default();
    let window = DedupWindow::new()
        .max_age(Duration::from_secs(60))
        .max_entries(2);
    let bus = book_bus(&book, Subscription::new("book").layer(Dedup::new(window)));
    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    let send = |id: Uuid, cents: u64| {
        let bus = bus.clone();
        async move {
            credit(&bus, id, cents).await;
            bus.settled().await;
        }
    };
    send(ids[0], 0).await;
    send(ids[1], 1).await;
    send(ids[0], 0).await; // one newer id (fewer than 2): caught
    send(ids[1], 1).await;
    assert_eq!(book.handled.len(), 2);
    for (n, id) in ids.iter().enumerate().skip(2) {
        send(*id, n as u64).await;
    }
    // Four newer ids (twice max_entries): surely forgotten.
    send(ids[0], 0).await;
    assert_eq!(book.handled.len(), 7, "forgotten by count: handled again");
    send(ids[5], 5).await;
    assert_eq!(book.handled.len(), 7, "the newest is still remembered");
    tokio::time::advance(Duration::from_secs(61)).await;
    send(ids[5], 5).await;
    assert_eq!(book.handled.len(), 8, "forgotten by age: handled again");
    bus.shutdown().await;
}

#[tokio::test]
async fn a_window_without_bounds_is_a_build_error() {
    let result = Bus::builder()
        .subscribe::<Credited, _>(
            Subscription::new("book")
                .layer(Dedup::new(DedupWindow::new().no_max_age().no_max_entries())),
            Book::default,
        )
        .build();
    assert!(matches!(
        result,
        Err(tidings::BuildError::InvalidSetting(_))
    ));
    let result = Bus::builder()
        .dedup_publishes(DedupWindow::new().max_entries(0))
        .build();
    assert!(matches!(
        result,
        Err(tidings::BuildError::InvalidSetting(_))
    ));
}

#[tokio::test]
async fn concurrent_duplicates_on_different_partitions_are_handled_once() {
    // Keyless events spread over partitions round-robin: copies of one id land on different
    // partitions, handled by different workers at the same time.
    #[derive(Clone, Default)]
    struct Slow(Recorder<u32>);
    impl Handler<Ping> for Slow {
        async fn handle(&mut self, e: &Envelope<Ping>, _: &Context) -> HandlerResult {
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.0.push(e.event().n);
            Ok(())
        }
    }
    let slow = Slow::default();
    let bus = {
        let slow = slow.clone();
        Bus::builder()
            .topic(TopicConfig::new("pings").partitions(4))
            .subscribe::<Ping, _>(
                Subscription::new("pings").layer(Dedup::new(DedupWindow::new())),
                move || slow.clone(),
            )
            .build()
            .unwrap()
    };
    let id = Uuid::now_v7();
    for _ in 0..4 {
        bus.publish_with(Ping { n: 1 }, with_id(id)).await.unwrap();
    }
    bus.settled().await;
    assert_eq!(slow.0.take(), vec![1]);
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn producer_side_dedup_accepts_an_id_once_within_the_window() {
    let book = Book::default();
    let bus = {
        let book = book.clone();
        Bus::builder()
            .dedup_publishes(DedupWindow::new().max_age(Duration::from_secs(60)))
            .subscribe::<Credited, _>("book", move || book.clone())
            .build()
            .unwrap()
    };
    let id = Uuid::now_v7();
    let first = credit(&bus, id, 5).await;
    let again = credit(&bus, id, 5).await;
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(
        (again.id, again.partition, again.offset),
        (first.id, first.partition, first.offset)
    );
    // Without an explicit id, never a duplicate.
    let other = bus
        .publish(Credited {
            account: 1,
            cents: 5,
        })
        .await
        .unwrap();
    assert!(!other.duplicate);
    bus.settled().await;
    assert_eq!(book.handled.len(), 2);
    assert_eq!(bus.stats().topic("ledger").unwrap().published, 2);

    tokio::time::advance(Duration::from_secs(61)).await;
    let later = credit(&bus, id, 5).await;
    assert!(!later.duplicate, "outside the window: accepted again");
    bus.shutdown().await;
}

#[tokio::test]
async fn effectively_once_delivery_adds_deduplication() {
    let book = Book::default();
    let bus = book_bus(
        &book,
        Subscription::new("book").delivery(DeliveryMode::EffectivelyOnce),
    );
    let id = Uuid::now_v7();
    for _ in 0..3 {
        credit(&bus, id, 5).await;
    }
    bus.settled().await;
    assert_eq!(book.handled.take(), vec![(id, 5)]);
    bus.shutdown().await;
}
