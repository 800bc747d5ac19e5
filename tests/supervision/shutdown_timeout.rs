//! `shutdown_timeout` keeps its deadline and its report is exact: a handler blocking its thread
//! does not hold the shutdown past the deadline, and what was not finished is counted as
//! abandoned, event by event (handled + abandoned = delivered), whatever the batch size, the
//! partitions and the groups. (Issue 9, items 13 and 14.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::store::MemoryStore;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "jobs", key = key)]
struct Job {
    key: u64,
}

/// Blocks its thread (no await) for `block` on every event.
#[derive(Clone)]
struct Blocking {
    block: Duration,
    started: Arc<AtomicU64>,
}

impl Handler<Job> for Blocking {
    async fn handle(&mut self, _: &Envelope<Job>, _: &Context) -> Result<(), HandlerError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.block);
        Ok(())
    }
}

async fn wait_for(counter: &AtomicU64, n: u64) {
    while counter.load(Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A handler blocks one of the runtime's two threads for 3 s; `shutdown_timeout(300 ms)` comes
/// back long before the handler does, and says the event was abandoned (not a full drain).
async fn a_blocked_handler_does_not_hold_the_shutdown_past_its_deadline(store: bool) {
    let started = Arc::new(AtomicU64::new(0));
    let handler = Blocking {
        block: Duration::from_secs(3),
        started: started.clone(),
    };
    let mut builder = Bus::builder().topic(TopicConfig::new("jobs").partitions(1));
    if store {
        builder = builder.store(MemoryStore::new());
    }
    let bus = builder
        .subscribe::<Job, _>("blocked", move || handler.clone())
        .build()
        .unwrap();
    bus.publish(Job { key: 1 }).await.unwrap();
    bus.publish(Job { key: 1 }).await.unwrap();
    wait_for(&started, 1).await;

    let begun = Instant::now();
    let report = bus.shutdown_timeout(Duration::from_millis(300)).await;
    let took = begun.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "shutdown_timeout(300 ms) took {took:?} (the handler blocks for 3 s)"
    );
    // The blocked event (and the one queued behind it, unless the test itself was held up
    // until the first one was done) are reported abandoned: not a full drain.
    assert!(report.abandoned >= 1, "{report:?}");
    assert_eq!(report.handled + report.abandoned, 2, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_handler_does_not_hold_the_shutdown_past_its_deadline_in_memory() {
    a_blocked_handler_does_not_hold_the_shutdown_past_its_deadline(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_handler_does_not_hold_the_shutdown_past_its_deadline_with_a_store() {
    a_blocked_handler_does_not_hold_the_shutdown_past_its_deadline(true).await;
}

/// Sleeps (awaiting) on every event.
#[derive(Clone)]
struct Slow {
    handled: Arc<AtomicU64>,
}

impl Handler<Job> for Slow {
    async fn handle(&mut self, _: &Envelope<Job>, _: &Context) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// `events` published to `partitions` partitions, `groups` groups taking `batch` events at a
/// time; the shutdown times out once some are handled: every delivery is either handled or
/// abandoned, never both, never neither.
async fn abandoned_is_exact(events: u64, partitions: u32, groups: usize, batch: usize) {
    abandoned_is_exact_on(Bus::builder(), events, partitions, groups, batch).await;
}

async fn abandoned_is_exact_on(
    builder: tidings::BusBuilder,
    events: u64,
    partitions: u32,
    groups: usize,
    batch: usize,
) {
    let handled = Arc::new(AtomicU64::new(0));
    let mut builder = builder.topic(
        TopicConfig::new("jobs")
            .partitions(partitions)
            .capacity(events as usize),
    );
    for g in 0..groups {
        let h = Slow {
            handled: handled.clone(),
        };
        builder = builder.subscribe::<Job, _>(
            Subscription::new(format!("g{g}")).batch_size(batch),
            move || h.clone(),
        );
    }
    let bus = builder.build().unwrap();
    for key in 0..events {
        bus.publish(Job { key }).await.unwrap();
    }
    wait_for(&handled, 10).await;
    let report = bus.shutdown_timeout(Duration::from_millis(50)).await;
    let stats = bus.stats();
    let delivered: u64 = stats
        .topics
        .iter()
        .flat_map(|t| &t.groups)
        .map(|g| g.delivered)
        .sum();
    assert_eq!(delivered, events * groups as u64);
    assert!(
        report.abandoned > 0 && report.handled > 0,
        "timed out mid-way: {report:?}"
    );
    assert_eq!(
        report.handled + report.abandoned,
        delivered,
        "{partitions} partition(s), {groups} group(s), batches of {batch}: {report:?}"
    );
    assert_eq!(report.handled, handled.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_counts_each_unfinished_event_once_one_partition_large_batches() {
    abandoned_is_exact(400, 1, 1, 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_counts_each_unfinished_event_once_one_event_per_batch() {
    abandoned_is_exact(400, 1, 1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_counts_each_unfinished_event_once_four_partitions() {
    abandoned_is_exact(800, 4, 1, 32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_counts_each_unfinished_event_once_fanned_out_to_two_groups() {
    abandoned_is_exact(600, 2, 2, 16).await;
}

/// With a store, every event is queued for the group as it commits (the queue has room for all):
/// the same count holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_counts_each_unfinished_event_once_with_a_store() {
    abandoned_is_exact_on(Bus::builder().store(MemoryStore::new()), 400, 2, 2, 64).await;
}
