//! Point to point: one publisher, one consumer, one partition, queue capacity 1024.
//!
//! Every entry of the criterion group `p2p` moves `N` events of 64 bytes from one task to
//! another and waits until the consumer has handled all of them (each entry checks that nothing
//! was lost). The throughput line is in events per second.
//!
//! - `tokio_mpsc`: the raw baseline, a `tokio::sync::mpsc::channel(1024)` and a consumer task
//!   looping on `recv().await`.
//! - `tidings_publish`: a bus with one topic of one partition (capacity 1024) and one consumer
//!   group; the publisher awaits `bus.publish(event)`, the iteration ends at `bus.settled()`.
//! - `tidings_try_publish`: the same bus, publishing with `try_publish` and yielding to the
//!   runtime whenever the queue is full.
//! - `tidings_publish_layered`: as `tidings_publish`, on a bus whose subscription wraps the
//!   handler in `Timeout` (5 s per attempt), `Retry` (3 attempts) and `Dedup` (in memory, the
//!   default window of 100 000 ids): the reliability middleware on, no failures. Target: at least
//!   half the throughput of `tidings_publish`.
//! - `tidings_publish_timeout_retry`: the same without `Dedup`, to show what deduplication
//!   costs apart from the chain.
//! - `tidings_publish_event_set`: as `tidings_publish`, with the group subscribed to a set of
//!   three event types of the topic, `(Opened, Closed, Ev)`, every event the set's last type:
//!   what dispatch by type costs over a single-type group.
//!
//! How to read it: divide the time of a `tidings_*` entry by the time of `tokio_mpsc` (or the
//! baseline's throughput by ours). That ratio is the price of what the bus adds over a bare
//! channel: envelopes (UUIDv7 id, timestamp, offsets, correlation), routing, the shared
//! `Arc`, supervision (`catch_unwind`), a tracing span per handled event and the idle accounting
//! behind `settled()`.
//!
//! All tasks run on a multi-thread tokio runtime with 2 worker threads; the publisher is a
//! spawned task too, so the main thread only waits.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{runtime, Counter, Ev, Sink};
use criterion::{criterion_main, Criterion, Throughput};
use tidings::prelude::*;
use tidings::TryPublishError;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// Events per iteration.
const N: u64 = 10_000;
/// Queue capacity of the baseline channel and of the bus's partition queue.
const CAPACITY: usize = 1024;

/// One baseline batch: a fresh channel and consumer task, `N` sends, wait for the consumer.
async fn mpsc_batch() {
    let (tx, mut rx) = mpsc::channel::<Ev>(CAPACITY);
    let consumer = tokio::spawn(async move {
        let mut received = 0u64;
        while let Some(ev) = rx.recv().await {
            black_box(ev.payload[0]);
            received += 1;
        }
        received
    });
    for i in 0..N {
        tx.send(Ev::new(i)).await.expect("consumer alive");
    }
    drop(tx);
    let received = consumer.await.expect("consumer task");
    assert_eq!(received, N, "tokio mpsc lost events");
}

fn build_bus(rt: &Runtime, handled: &Arc<Counter>, subscription: Subscription) -> Bus {
    let _enter = rt.enter();
    let handled = Arc::clone(handled);
    Bus::builder()
        .topic(TopicConfig::new(Ev::TOPIC).partitions(1).capacity(CAPACITY))
        .subscribe::<Ev, _>(subscription, move || Sink {
            handled: Arc::clone(&handled),
        })
        .build()
        .expect("bus")
}

/// Two more event types of the benches' topic, for the event-set entry.
#[derive(serde::Serialize, serde::Deserialize, Event)]
#[event(topic = "bench.events", key = key)]
struct Opened {
    key: u64,
}

#[derive(serde::Serialize, serde::Deserialize, Event)]
#[event(topic = "bench.events", key = key)]
struct Closed {
    key: u64,
}

impl Handler<Opened> for Sink {
    async fn handle(&mut self, _: &Envelope<Opened>, _: &Context) -> HandlerResult {
        Ok(())
    }
}

impl Handler<Closed> for Sink {
    async fn handle(&mut self, _: &Envelope<Closed>, _: &Context) -> HandlerResult {
        Ok(())
    }
}

/// The same bus, its group subscribed to a set of three types (`Ev` last).
fn build_set_bus(rt: &Runtime, handled: &Arc<Counter>) -> Bus {
    let _enter = rt.enter();
    let handled = Arc::clone(handled);
    Bus::builder()
        .topic(TopicConfig::new(Ev::TOPIC).partitions(1).capacity(CAPACITY))
        .subscribe::<(Opened, Closed, Ev), _>("sink", move || Sink {
            handled: Arc::clone(&handled),
        })
        .build()
        .expect("bus")
}

/// `Timeout`, `Retry`, `Dedup`, as a careful user would stack them.
fn layered() -> Subscription {
    timeout_retry().layer(Dedup::new(DedupWindow::new()))
}

/// `Timeout` and `Retry` only.
fn timeout_retry() -> Subscription {
    Subscription::new("sink")
        .layer(Timeout::new(Duration::from_secs(5)))
        .layer(Retry::new(3))
}

/// `N` publishes on `bus`, then waits until they are handled.
async fn publish_batch(bus: Bus, handled: Arc<Counter>) {
    tokio::spawn(async move {
        let before = handled.load(Ordering::Relaxed);
        for i in 0..N {
            bus.publish(Ev::new(i)).await.expect("bus open");
        }
        settle_and_check(&bus, &handled, before).await;
    })
    .await
    .expect("batch task")
}

/// Waits until the bus is idle and checks that exactly `N` more events were handled.
async fn settle_and_check(bus: &Bus, handled: &AtomicU64, before: u64) {
    bus.settled().await;
    let got = handled.load(Ordering::Relaxed) - before;
    assert_eq!(got, N, "tidings lost or duplicated events");
}

fn p2p(c: &mut Criterion) {
    let rt = runtime();
    let handled = Arc::new(Counter::default());
    let bus = build_bus(&rt, &handled, Subscription::new("sink"));
    let mut published = 0u64;
    let layered_handled = Arc::new(Counter::default());
    let layered_bus = build_bus(&rt, &layered_handled, layered());
    let mut layered_published = 0u64;
    let tr_handled = Arc::new(Counter::default());
    let tr_bus = build_bus(&rt, &tr_handled, timeout_retry());
    let mut tr_published = 0u64;
    let set_handled = Arc::new(Counter::default());
    let set_bus = build_set_bus(&rt, &set_handled);
    let mut set_published = 0u64;

    let mut group = c.benchmark_group("p2p");
    group
        .throughput(Throughput::Elements(N))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20);

    group.bench_function("tokio_mpsc", |b| {
        b.to_async(&rt)
            .iter(|| async { tokio::spawn(mpsc_batch()).await.expect("batch task") });
    });

    group.bench_function("tidings_publish", |b| {
        b.to_async(&rt).iter(|| {
            published += N;
            publish_batch(bus.clone(), Arc::clone(&handled))
        });
    });

    group.bench_function("tidings_publish_event_set", |b| {
        b.to_async(&rt).iter(|| {
            set_published += N;
            publish_batch(set_bus.clone(), Arc::clone(&set_handled))
        });
    });

    group.bench_function("tidings_publish_timeout_retry", |b| {
        b.to_async(&rt).iter(|| {
            tr_published += N;
            publish_batch(tr_bus.clone(), Arc::clone(&tr_handled))
        });
    });

    group.bench_function("tidings_publish_layered", |b| {
        b.to_async(&rt).iter(|| {
            layered_published += N;
            publish_batch(layered_bus.clone(), Arc::clone(&layered_handled))
        });
    });

    group.bench_function("tidings_try_publish", |b| {
        b.to_async(&rt).iter(|| {
            published += N;
            let bus = bus.clone();
            let handled = Arc::clone(&handled);
            async move {
                tokio::spawn(async move {
                    let before = handled.load(Ordering::Relaxed);
                    for i in 0..N {
                        let mut ev = Ev::new(i);
                        loop {
                            match bus.try_publish(ev) {
                                Ok(_) => break,
                                Err(TryPublishError::Full(back)) => {
                                    ev = back;
                                    tokio::task::yield_now().await;
                                }
                                Err(other) => panic!("try_publish failed: {other}"),
                            }
                        }
                    }
                    settle_and_check(&bus, &handled, before).await;
                })
                .await
                .expect("batch task")
            }
        });
    });

    group.finish();

    for (bus, published) in [
        (bus, published),
        (tr_bus, tr_published),
        (layered_bus, layered_published),
        (set_bus, set_published),
    ] {
        let report = rt.block_on(bus.shutdown());
        assert_eq!(report.handled, published, "shutdown report disagrees");
        assert_eq!(report.failed + report.dropped + report.abandoned, 0);
    }
}

// `criterion_group!` defines an undocumented `pub fn`; keeping it in a private module keeps it
// out of the `missing_docs` lint.
mod harness {
    criterion::criterion_group!(benches, super::p2p);
}
criterion_main!(harness::benches);
