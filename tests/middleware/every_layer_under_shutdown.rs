//! Every layer at once, under failures, slow calls and a shutdown: the drain goes through the
//! whole chain, every event ends handled or dead-lettered (none abandoned, none handled
//! twice), and each key's events are handled in order. The same load without a shutdown
//! retries what fails once.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::middleware::{CircuitBreaker, Throttle};
use tidings::prelude::*;
use tidings::testing::Recorder;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, Event)]
#[event(topic = "jobs", key = key)]
struct Job {
    key: u64,
    seq: u32,
}

#[derive(Clone)]
struct Worker {
    done: Recorder<(u64, u32)>,
}

impl Handler<Job> for Worker {
    async fn handle(&mut self, e: &Envelope<Job>, _: &Context) -> HandlerResult {
        let Job { key, seq } = *e.event();
        match seq % 10 {
            // Slow on the first attempt: the timeout cuts it, the retry succeeds.
            3 if e.attempt() == 1 => tokio::time::sleep(Duration::from_secs(10)).await,
            // Fails once.
            5 if e.attempt() == 1 => return Err(HandlerError::msg("flaky")),
            // Always fails: dead-lettered.
            7 => return Err(HandlerError::msg("broken")),
            _ => {}
        }
        self.done.push((key, seq));
        Ok(())
    }
}

/// A bus with one group, "jobs", over 3 partitions of 8 events each.
fn jobs_bus(worker: &Worker, subscription: Subscription) -> Bus {
    let worker = worker.clone();
    Bus::builder()
        .topic(TopicConfig::new("jobs").partitions(3).capacity(8))
        .subscribe::<Job, _>(subscription, move || worker.clone())
        .build()
        .unwrap()
}

/// 60 jobs over 6 keys.
async fn publish_load(bus: &Bus) {
    for seq in 0..60u32 {
        bus.publish(Job {
            key: u64::from(seq % 6),
            seq,
        })
        .await
        .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_through_every_layer_and_loses_nothing() {
    let worker = Worker {
        done: Recorder::new(),
    };
    let bus = jobs_bus(
        &worker,
        Subscription::new("jobs")
            .layer(Timeout::new(Duration::from_secs(1)))
            .layer(CircuitBreaker::new(1000, Duration::from_secs(1)))
            .layer(
                Retry::new(3)
                    .backoff(Duration::from_millis(100), Duration::from_millis(100))
                    .jitter(0.0),
            )
            .layer(Dedup::new(DedupWindow::new()))
            .layer(Throttle::per_second(100_000)),
    );
    publish_load(&bus).await;
    let total = 60;
    let report = bus.shutdown().await;
    assert_eq!(report.abandoned, 0);
    let done = worker.done.take();
    let dead = bus.dead_letters("jobs").unwrap().list();
    assert_eq!(
        done.len() + dead.len(),
        total,
        "every event handled or dead-lettered"
    );
    assert_eq!(report.handled, done.len() as u64);
    assert_eq!(report.failed, dead.len() as u64);
    // The broken ones, and those whose retry the shutdown cut short (documented: while the bus
    // drains, a delayed retry gives way to the dead-letter queue).
    for letter in &dead {
        let seq = letter.envelope.downcast_ref::<Job>().unwrap().seq;
        assert!(
            seq % 10 == 7 || letter.error.contains("retries stopped by shutdown"),
            "seq {seq}: {}",
            letter.error
        );
    }
    let broken = dead
        .iter()
        .filter(|l| l.error.starts_with("broken"))
        .count();
    assert_eq!(broken, 6, "the six always-failing events");
    let mut last: HashMap<u64, u32> = HashMap::new();
    for (key, seq) in done {
        if let Some(prev) = last.insert(key, seq) {
            assert!(prev < seq, "key {key}: {seq} after {prev}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn without_a_shutdown_the_same_load_retries_what_fails_once() {
    let worker = Worker {
        done: Recorder::new(),
    };
    let bus = jobs_bus(
        &worker,
        Subscription::new("jobs")
            .layer(Timeout::new(Duration::from_secs(1)))
            .layer(
                Retry::new(3)
                    .backoff(Duration::from_millis(100), Duration::from_millis(100))
                    .jitter(0.0),
            )
            .layer(Dedup::new(DedupWindow::new())),
    );
    publish_load(&bus).await;
    bus.settled().await;
    assert_eq!(worker.done.len(), 54);
    let dead = bus.dead_letters("jobs").unwrap().list();
    assert_eq!(dead.len(), 6);
    assert!(dead.iter().all(|l| l.attempts == 3 && l.error == "broken"));
    bus.shutdown().await;
}
