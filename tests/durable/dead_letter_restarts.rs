//! Dead letters across restarts whose committed offsets lag behind them: key order under the
//! sequenced policy, no event handled twice, partitions kept apart, fixed partition counts.
//! (First written as reproductions by a third review; each failed before its fix.)
use crate::support::stores;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use stores::{Log, Placed};
use tidings::dead_letter::Redelivery;
use tidings::prelude::*;
use tidings::store::{
    DeadLetterLog as _, DeadLetterRecord, GroupOffset, Log as _, MemoryStore, Offsets as _,
    StoredEvent,
};

/// A log of order 1, seq 0..n at offsets 0..n of partition 0.
async fn log_of(store: &MemoryStore, n: u64) -> Vec<StoredEvent> {
    let mut rows: Vec<StoredEvent> = (0..n).map(|s| stores::placed_row(0, 1, s)).collect();
    store.append(&mut rows).await.unwrap();
    rows
}

async fn dead_letter(store: &MemoryStore, event: &StoredEvent, attempts: u32, error: &str) {
    let now = SystemTime::now();
    store
        .save_dead_letter(&DeadLetterRecord {
            group: "g".into(),
            event: event.clone(),
            error: error.into(),
            permanent: false,
            attempts,
            first_failure: now,
            last_failure: now,
            handler: "h".into(),
            redeliveries: 0,
        })
        .await
        .unwrap();
}

async fn committed(store: &MemoryStore, next: u64) {
    store
        .reset_offset(&GroupOffset {
            group: "g".into(),
            topic: "orders".into(),
            partition: 0,
            next_offset: next,
        })
        .await
        .unwrap();
}

/// Records (order, seq); fails the seqs in `fail` while `failing`; sleeps `delay_ms` first.
#[derive(Clone)]
struct H {
    log: Log,
    fail: Vec<u64>,
    failing: Arc<AtomicBool>,
    delay_ms: u64,
}
impl H {
    fn new(log: &Log, fail: &[u64], delay_ms: u64) -> Self {
        H {
            log: log.clone(),
            fail: fail.to_vec(),
            failing: Arc::new(AtomicBool::new(true)),
            delay_ms,
        }
    }
}
impl Handler<Placed> for H {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        if self.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.delay_ms)).await;
        }
        if self.failing.load(Ordering::SeqCst) && self.fail.contains(&e.event().seq) {
            return Err(HandlerError::msg("down"));
        }
        let p = e.event();
        self.log.0.lock().push(("g".into(), p.order, p.seq));
        Ok(())
    }
}

fn bus(store: &MemoryStore, partitions: u32, sub: Subscription, h: &H) -> Bus {
    let h = h.clone();
    Bus::builder()
        .store(store.clone())
        .topic(TopicConfig::new("orders").partitions(partitions))
        .subscribe::<Placed, _>(sub.max_deliveries(1), move || h.clone())
        .build()
        .unwrap()
}

fn seqs(log: &Log) -> Vec<u64> {
    log.of("g").into_iter().map(|(_, s)| s).collect()
}

/// After a restart whose committed offset is below a sequenced head (10), an older event of the
/// key read again (8) that fails becomes the key's head, in log order: the key's later events
/// (9) wait behind it, and a redrive hands them out in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequenced_an_older_event_failing_on_the_reread_parks_its_key_in_log_order() {
    let store = MemoryStore::new();
    let rows = log_of(&store, 12).await;
    dead_letter(&store, &rows[10], 1, "down").await; // head of order 1
    dead_letter(
        &store,
        &rows[11],
        0,
        "parked behind an earlier event of the same key",
    )
    .await;
    committed(&store, 5).await; // the crash came before the periodic commit
    let log = Log::default();
    let h = H::new(&log, &[8], 0);
    let bus = bus(
        &store,
        1,
        Subscription::new("g").dead_letter(DeadLetterPolicy::Sequenced),
        &h,
    );
    bus.settled().await;
    let before = seqs(&log);
    h.failing.store(false, Ordering::SeqCst);
    bus.dead_letters("g").unwrap().redrive_all().await.unwrap();
    bus.settled().await;
    // Redrive what is left (8 may have become a head of its own in a fixed version).
    bus.dead_letters("g").unwrap().redrive_all().await.unwrap();
    bus.settled().await;
    bus.shutdown().await;
    let all = seqs(&log);
    assert_eq!(
        before,
        vec![5, 6, 7],
        "9 handled while 8 of the same key waits in the queue; after the redrives: {all:?}"
    );
    assert_eq!(
        all,
        vec![5, 6, 7, 8, 9, 10, 11],
        "key order after the redrive"
    );
}

/// After a restart whose committed offset is below a dead letter, a redrive during the catch-up
/// is handled once: the catch-up does not handle the same event from the log as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_during_the_catch_up_is_not_handled_twice() {
    let store = MemoryStore::new();
    let rows = log_of(&store, 10).await;
    dead_letter(&store, &rows[7], 1, "down").await;
    committed(&store, 5).await;
    let log = Log::default();
    let h = H::new(&log, &[], 50);
    let bus = bus(&store, 1, Subscription::new("g"), &h);
    let dlq = bus.dead_letters("g").unwrap();
    for _ in 0..200 {
        if dlq.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    dlq.redrive_all().await.unwrap(); // the catch-up is at offset 5
    bus.settled().await;
    bus.shutdown().await;
    let sevens = seqs(&log).iter().filter(|&&s| s == 7).count();
    assert_eq!(sevens, 1, "7 handled {sevens} times: {:?}", seqs(&log));
}

/// The same without anyone redriving: Sequenced + Redelivery, a restored never-attempted head (a
/// crash while its key was being released) is released at once and handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequenced_a_released_head_restored_below_the_catch_up_is_handled_once() {
    let store = MemoryStore::new();
    let rows = log_of(&store, 10).await;
    dead_letter(
        &store,
        &rows[7],
        0,
        "parked behind an earlier event of the same key",
    )
    .await;
    committed(&store, 5).await;
    let log = Log::default();
    let h = H::new(&log, &[], 20);
    let bus = bus(
        &store,
        1,
        Subscription::new("g")
            .dead_letter(DeadLetterPolicy::Sequenced)
            .redelivery(Redelivery::after([Duration::from_secs(3600)])),
        &h,
    );
    bus.settled().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    bus.settled().await;
    bus.shutdown().await;
    let sevens = seqs(&log).iter().filter(|&&s| s == 7).count();
    assert_eq!(sevens, 1, "7 handled {sevens} times: {:?}", seqs(&log));
}

/// A parked key's events on another partition (the partition count grew) are still parked:
/// offsets of different partitions are not compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequenced_a_key_on_another_partition_is_still_parked() {
    let order = (0..100)
        .find(|&o| Placed { order: o, seq: 0 }.key().unwrap().partition(2) == 1)
        .unwrap();
    let store = MemoryStore::new();
    let log = Log::default();
    let h = H::new(&log, &[100], 0);
    let sub = || Subscription::new("g").dead_letter(DeadLetterPolicy::Sequenced);
    let bus1 = bus(&store, 1, sub(), &h);
    for o in 1000..1005 {
        bus1.publish(Placed { order: o, seq: 0 }).await.unwrap();
    }
    let p = bus1.publish(Placed { order, seq: 100 }).await.unwrap(); // fails: head
    assert_eq!((p.partition, p.offset), (0, 5));
    bus1.settled().await;
    bus1.shutdown().await;

    let bus2 = bus(&store, 2, sub(), &h);
    bus2.settled().await;
    let p = bus2.publish(Placed { order, seq: 101 }).await.unwrap();
    assert_eq!((p.partition, p.offset), (1, 0));
    bus2.settled().await;
    let depth = bus2.dead_letters("g").unwrap().len();
    bus2.shutdown().await;
    assert!(
        !log.of("g").contains(&(order, 101)),
        "seq 101 handled while seq 100 of the same key is parked (depth {depth})"
    );
}

/// With a store, a topic configured without a partition count and not subscribed to (a
/// publisher-only service) gets a fixed count (1), not one per core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_but_unsubscribed_durable_topic_gets_a_fixed_partition_count() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return;
    }
    let store = MemoryStore::new();
    let publisher = Bus::builder()
        .store(store.clone())
        .topic(TopicConfig::new("orders").capacity(64))
        .build()
        .unwrap();
    let mut partitions = std::collections::BTreeSet::new();
    for order in 0..16 {
        partitions.insert(
            publisher
                .publish(Placed { order, seq: 0 })
                .await
                .unwrap()
                .partition,
        );
    }
    publisher.shutdown().await;
    let stored = store.partitions("orders").await.unwrap();
    assert_eq!(
        stored, 1,
        "the publisher-only bus spread the topic over partitions {partitions:?} (the machine's cores)"
    );
}
