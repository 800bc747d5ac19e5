//! A publisher that keeps filling a slow consumer's queue cooperates with tokio's scheduler as
//! a tokio channel does: the two tasks take turns on one thread, and the runtime's other thread
//! is not woken up for nothing once per queue cycle.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, Event)]
#[event(topic = "work")]
struct Job {
    n: u64,
}

/// Works a little (about a microsecond) on every job.
struct Worker {
    done: Arc<AtomicU64>,
}

impl Handler<Job> for Worker {
    async fn handle(&mut self, e: &Envelope<Job>, _: &Context) -> Result<(), HandlerError> {
        let mut x = e.event().n | 1;
        for i in 0..300u64 {
            x = black_box(x.rotate_left(5) ^ i).wrapping_mul(0x0100_0000_01b3);
        }
        black_box(x);
        self.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn bus(capacity: usize, done: &Arc<AtomicU64>) -> Bus {
    let done = Arc::clone(done);
    Bus::builder()
        .topic(TopicConfig::new("work").partitions(1).capacity(capacity))
        .subscribe::<Job, _>("workers", move || Worker {
            done: Arc::clone(&done),
        })
        .build()
        .unwrap()
}

#[test]
fn a_publisher_ahead_of_a_slow_consumer_leaves_the_idle_thread_parked() {
    const EVENTS: u64 = 20_000;
    let parks = Arc::new(AtomicU64::new(0));
    let rt = {
        let parks = Arc::clone(&parks);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_park(move || {
                parks.fetch_add(1, Ordering::Relaxed);
            })
            .build()
            .unwrap()
    };
    let done = Arc::new(AtomicU64::new(0));
    let parked = rt.block_on(async {
        let bus = bus(64, &done);
        let publisher = bus.clone();
        let before = parks.load(Ordering::Relaxed);
        tokio::spawn(async move {
            for n in 0..EVENTS {
                publisher.publish(Job { n }).await.unwrap();
            }
            publisher.settled().await;
        })
        .await
        .unwrap();
        let parked = parks.load(Ordering::Relaxed) - before;
        bus.shutdown().await;
        parked
    });
    assert_eq!(done.load(Ordering::Relaxed), EVENTS);
    // Publisher and worker hand over about 300 times; a thread woken for nothing at each
    // hand-over parks again: that was 140 to 280 parks here.
    assert!(
        parked <= EVENTS / 1000,
        "{parked} thread parks for {EVENTS} events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_in_an_unconstrained_task_still_waits_for_room() {
    let done = Arc::new(AtomicU64::new(0));
    let bus = bus(8, &done);
    let publisher = bus.clone();
    // Outside tokio's budget (it always has some left): spending it must end anyway.
    tokio::spawn(tokio::task::unconstrained(async move {
        for n in 0..1_000 {
            publisher.publish(Job { n }).await.unwrap();
        }
    }))
    .await
    .unwrap();
    bus.settled().await;
    assert_eq!(done.load(Ordering::Relaxed), 1_000);
    bus.shutdown().await;
}
