//! Bounded queues: a slow consumer throttles a fast producer, `try_publish` reports `Full`, and
//! the opt-in drop-oldest policy counts every drop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::testing::Recorder;
use tidings::{Overflow, TryPublishError};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "flow", key = n)]
struct Tick {
    n: u64,
}

/// Handles one event per permit the test hands out.
struct Gated {
    gate: Arc<Semaphore>,
    handled: Arc<AtomicU64>,
}

impl Handler<Tick> for Gated {
    async fn handle(&mut self, _: &Envelope<Tick>, _: &Context) -> Result<(), HandlerError> {
        self.gate.acquire().await.unwrap().forget();
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

const CAPACITY: usize = 16;
const BATCH: usize = 4;

fn gated_bus(gate: &Arc<Semaphore>, handled: &Arc<AtomicU64>, overflow: Overflow) -> Bus {
    let (gate, handled) = (gate.clone(), handled.clone());
    Bus::builder()
        .topic(
            TopicConfig::new("flow")
                .partitions(1)
                .capacity(CAPACITY)
                .overflow(overflow),
        )
        .subscribe::<Tick, _>(Subscription::new("slow").batch_size(BATCH), move || Gated {
            gate: gate.clone(),
            handled: handled.clone(),
        })
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_throttles_a_fast_producer_and_memory_stays_bounded() {
    let gate = Arc::new(Semaphore::new(0));
    let handled = Arc::new(AtomicU64::new(0));
    let bus = gated_bus(&gate, &handled, Overflow::Block);
    let accepted = Arc::new(AtomicU64::new(0));
    const TOTAL: u64 = 2_000;

    let producer = {
        let bus = bus.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            for n in 0..TOTAL {
                bus.publish(Tick { n }).await.unwrap();
                accepted.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    // With the consumer stopped, the producer fills the queue (plus the one batch the worker
    // holds) and then waits.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stuck_at = accepted.load(Ordering::SeqCst);
    assert!(
        stuck_at <= (CAPACITY + BATCH) as u64,
        "producer ran ahead: {stuck_at}"
    );
    assert!(
        stuck_at >= CAPACITY as u64,
        "queue should have filled: {stuck_at}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        stuck_at,
        "producer must wait, not drop"
    );

    // Release the consumer a little at a time: the producer advances with it, never more than
    // the bound ahead, and the queue depth never exceeds its capacity.
    let mut max_ahead = 0;
    let mut max_depth = 0;
    while handled.load(Ordering::SeqCst) < TOTAL {
        gate.add_permits(37);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let ahead = accepted.load(Ordering::SeqCst) - handled.load(Ordering::SeqCst);
        max_ahead = max_ahead.max(ahead);
        let depth = bus.stats().group("slow").unwrap().depth;
        max_depth = max_depth.max(depth);
    }
    producer.await.unwrap();
    assert!(
        max_depth <= CAPACITY as u64,
        "queue depth {max_depth} exceeded capacity"
    );
    // Queue + the worker's batch + the event in the handler's hands.
    assert!(
        max_ahead <= (CAPACITY + BATCH + 1) as u64,
        "producer {max_ahead} ahead"
    );
    let report = bus.shutdown().await;
    assert_eq!(report.handled, TOTAL);
    assert_eq!(report.dropped, 0);
}

#[tokio::test]
async fn try_publish_returns_full_with_the_event_and_loses_nothing() {
    let gate = Arc::new(Semaphore::new(0));
    let handled = Arc::new(AtomicU64::new(0));
    let bus = gated_bus(&gate, &handled, Overflow::Block);
    let mut accepted = Vec::new();
    let mut n = 0;
    let rejected = loop {
        match bus.try_publish(Tick { n }) {
            Ok(_) => accepted.push(n),
            Err(TryPublishError::Full(ev)) => break ev,
            Err(e) => panic!("unexpected {e:?}"),
        }
        n += 1;
        // Let the worker take its first batch.
        tokio::task::yield_now().await;
        assert!(n < 1000, "queue never filled");
    };
    assert_eq!(rejected.n, n, "the rejected event comes back");
    assert!(accepted.len() >= CAPACITY && accepted.len() <= CAPACITY + BATCH);
    gate.add_permits(10_000);
    let report = bus.shutdown().await;
    assert_eq!(report.handled, accepted.len() as u64);
}

#[tokio::test]
async fn drop_oldest_drops_only_when_full_and_counts_every_drop() {
    let seen = Recorder::new();
    struct Keep(Recorder<u64>, Arc<Semaphore>);
    impl Handler<Tick> for Keep {
        async fn handle(&mut self, e: &Envelope<Tick>, _: &Context) -> Result<(), HandlerError> {
            self.1.acquire().await.unwrap().forget();
            self.0.push(e.event().n);
            Ok(())
        }
    }
    let gate = Arc::new(Semaphore::new(0));
    let bus = Bus::builder()
        .topic(
            TopicConfig::new("flow")
                .partitions(1)
                .capacity(CAPACITY)
                .overflow(Overflow::DropOldest),
        )
        .subscribe::<Tick, _>(Subscription::new("telemetry").batch_size(1), {
            let (seen, gate) = (seen.clone(), gate.clone());
            move || Keep(seen.clone(), gate.clone())
        })
        .build()
        .unwrap();
    // The worker takes event 0 and blocks on the gate; the queue holds 16; 100 published.
    bus.publish(Tick { n: 0 }).await.unwrap();
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    for n in 1..100u64 {
        // Never waits with DropOldest, whether it is publish or try_publish.
        if n.is_multiple_of(2) {
            bus.try_publish(Tick { n }).unwrap();
        } else {
            tokio::time::timeout(Duration::from_secs(1), bus.publish(Tick { n }))
                .await
                .expect("publish must not wait with DropOldest")
                .unwrap();
        }
    }
    let stats = bus.stats();
    let group = stats.group("telemetry").unwrap();
    assert_eq!(group.depth, CAPACITY as u64);
    assert_eq!(group.dropped, 99 - CAPACITY as u64);
    gate.add_permits(1000);
    let report = bus.shutdown().await;
    assert_eq!(report.dropped, 99 - CAPACITY as u64);
    assert_eq!(report.handled, 1 + CAPACITY as u64);
    // What is kept is the newest, in order.
    let kept = seen.snapshot();
    assert_eq!(kept[0], 0);
    assert_eq!(
        kept[1..],
        (100 - CAPACITY as u64..100).collect::<Vec<_>>()[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slowest_group_sets_the_pace_and_fast_groups_lose_nothing() {
    let gate = Arc::new(Semaphore::new(0));
    let slow_handled = Arc::new(AtomicU64::new(0));
    let fast = Recorder::new();
    struct Fast(Recorder<u64>);
    impl Handler<Tick> for Fast {
        async fn handle(&mut self, e: &Envelope<Tick>, _: &Context) -> Result<(), HandlerError> {
            self.0.push(e.event().n);
            Ok(())
        }
    }
    let bus = Bus::builder()
        .topic(TopicConfig::new("flow").partitions(1).capacity(CAPACITY))
        .subscribe::<Tick, _>(Subscription::new("slow").batch_size(BATCH), {
            let (gate, handled) = (gate.clone(), slow_handled.clone());
            move || Gated {
                gate: gate.clone(),
                handled: handled.clone(),
            }
        })
        .subscribe::<Tick, _>("fast", {
            let fast = fast.clone();
            move || Fast(fast.clone())
        })
        .build()
        .unwrap();
    let producer = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for n in 0..500 {
                bus.publish(Tick { n }).await.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        fast.len() <= CAPACITY + BATCH,
        "the slow group must hold the producer back"
    );
    gate.add_permits(1_000);
    producer.await.unwrap();
    bus.shutdown().await;
    assert_eq!(fast.snapshot(), (0..500).collect::<Vec<_>>());
    assert_eq!(slow_handled.load(Ordering::SeqCst), 500);
}
