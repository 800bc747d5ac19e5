//! Fan-out: one publisher, four consumers that each get every event.
//!
//! Every entry of the criterion group `fanout4` publishes `N` events of 64 bytes and waits until
//! each of the four consumers is done with them. The throughput line counts the `N` published
//! events; each of them is delivered 4 times, so the deliveries per second are 4× the figure.
//!
//! - `tokio_mpsc_x4`: the lossless baseline, four `tokio::sync::mpsc::channel(1024)`s; the
//!   publisher wraps each event in an `Arc` (as the bus does) and sends a clone of it to each
//!   channel in turn, so the slowest consumer sets the pace, as with the bus.
//! - `tokio_broadcast`: `tokio::sync::broadcast::channel(1024)` with four receivers. It never
//!   makes the publisher wait: a receiver that falls more than 1024 behind loses events
//!   (`RecvError::Lagged`). The entry counts what was received and what was lost, and prints the
//!   loss once at the end; it is a bound on speed, not a like-for-like baseline.
//! - `tidings_publish`: a bus with one topic of one partition (capacity 1024) and four consumer
//!   groups subscribed to it; the publisher awaits `bus.publish(event)`, the iteration ends at
//!   `bus.settled()`.
//!
//! How to read it: divide the time of `tidings_publish` by the time of `tokio_mpsc_x4` for the
//! price of the bus over the hand-rolled lossless fan-out; compare with `tokio_broadcast` only
//! keeping in mind that it drops events.
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
use tokio::runtime::Runtime;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;

/// Events published per iteration (each delivered to `GROUPS` consumers).
const N: u64 = 10_000;
/// Consumers (consumer groups).
const GROUPS: usize = 4;
/// Queue capacity of every baseline channel and of every group's partition queue.
const CAPACITY: usize = 1024;
/// Key of the broadcast sentinel that tells receivers the batch is over.
const SENTINEL: u64 = u64::MAX;

/// One baseline batch over four mpsc channels.
async fn mpsc_batch() {
    let mut senders = Vec::with_capacity(GROUPS);
    let mut consumers = Vec::with_capacity(GROUPS);
    for _ in 0..GROUPS {
        let (tx, mut rx) = mpsc::channel::<Arc<Ev>>(CAPACITY);
        senders.push(tx);
        consumers.push(tokio::spawn(async move {
            let mut received = 0u64;
            while let Some(ev) = rx.recv().await {
                black_box(ev.payload[0]);
                received += 1;
            }
            received
        }));
    }
    for i in 0..N {
        let ev = Arc::new(Ev::new(i));
        for tx in &senders {
            tx.send(Arc::clone(&ev)).await.expect("consumer alive");
        }
    }
    drop(senders);
    for consumer in consumers {
        let received = consumer.await.expect("consumer task");
        assert_eq!(received, N, "tokio mpsc lost events");
    }
}

/// Totals of the broadcast entry over all its iterations.
#[derive(Default)]
struct BroadcastTally {
    received: AtomicU64,
    lost: AtomicU64,
}

/// One broadcast batch: `N` events and a sentinel; each receiver stops at the sentinel (or when
/// the channel closes), counting what it got and what it lost to lagging.
async fn broadcast_batch(tally: Arc<BroadcastTally>) {
    let (tx, _) = broadcast::channel::<Ev>(CAPACITY);
    let consumers: Vec<_> = (0..GROUPS)
        .map(|_| {
            let mut rx = tx.subscribe();
            tokio::spawn(async move {
                let (mut received, mut lost) = (0u64, 0u64);
                loop {
                    match rx.recv().await {
                        Ok(ev) if ev.key == SENTINEL => break,
                        Ok(ev) => {
                            black_box(ev.payload[0]);
                            received += 1;
                        }
                        Err(RecvError::Lagged(n)) => lost += n,
                        Err(RecvError::Closed) => break,
                    }
                }
                (received, lost)
            })
        })
        .collect();
    for i in 0..N {
        tx.send(Ev::new(i)).expect("receivers alive");
    }
    // The sentinel is the newest message, so a lagging receiver still finds it; dropping the
    // sender closes the channel as a second way out.
    tx.send(Ev::new(SENTINEL)).expect("receivers alive");
    drop(tx);
    for consumer in consumers {
        let (received, lost) = consumer.await.expect("consumer task");
        // Nothing is sent after the sentinel, so it is never overwritten: every receiver gets
        // it, and every event before it was either received or reported as lagged.
        assert_eq!(received + lost, N, "broadcast miscounted");
        tally.received.fetch_add(received, Ordering::Relaxed);
        tally.lost.fetch_add(lost, Ordering::Relaxed);
    }
}

fn build_bus(rt: &Runtime, counters: &[Arc<Counter>]) -> Bus {
    let _enter = rt.enter();
    let mut builder =
        Bus::builder().topic(TopicConfig::new(Ev::TOPIC).partitions(1).capacity(CAPACITY));
    for (g, counter) in counters.iter().enumerate() {
        let counter = Arc::clone(counter);
        builder = builder.subscribe::<Ev, _>(format!("sink-{g}"), move || Sink {
            handled: Arc::clone(&counter),
        });
    }
    builder.build().expect("bus")
}

fn fanout(c: &mut Criterion) {
    let rt = runtime();
    let counters: Arc<Vec<Arc<Counter>>> =
        Arc::new((0..GROUPS).map(|_| Arc::new(Counter::default())).collect());
    let bus = build_bus(&rt, &counters);
    let tally = Arc::new(BroadcastTally::default());
    let mut published = 0u64;

    let mut group = c.benchmark_group("fanout4");
    // N events published per iteration; each is delivered to all 4 consumers.
    group
        .throughput(Throughput::Elements(N))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20);

    group.bench_function("tokio_mpsc_x4", |b| {
        b.to_async(&rt)
            .iter(|| async { tokio::spawn(mpsc_batch()).await.expect("batch task") });
    });

    group.bench_function("tokio_broadcast", |b| {
        b.to_async(&rt).iter(|| {
            let tally = Arc::clone(&tally);
            async move {
                tokio::spawn(broadcast_batch(tally))
                    .await
                    .expect("batch task")
            }
        });
    });

    group.bench_function("tidings_publish", |b| {
        b.to_async(&rt).iter(|| {
            published += N;
            let bus = bus.clone();
            let counters = Arc::clone(&counters);
            async move {
                tokio::spawn(async move {
                    let before: Vec<u64> =
                        counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
                    for i in 0..N {
                        bus.publish(Ev::new(i)).await.expect("bus open");
                    }
                    bus.settled().await;
                    for (counter, before) in counters.iter().zip(before) {
                        let got = counter.load(Ordering::Relaxed) - before;
                        assert_eq!(got, N, "tidings lost or duplicated events");
                    }
                })
                .await
                .expect("batch task")
            }
        });
    });

    group.finish();

    let received = tally.received.load(Ordering::Relaxed);
    let lost = tally.lost.load(Ordering::Relaxed);
    let total = received + lost;
    if total > 0 {
        eprintln!(
            "fanout4/tokio_broadcast: receivers got {received} of {total} deliveries, \
             lost {lost} to lagging ({:.2}%)",
            100.0 * lost as f64 / total as f64
        );
    }

    let report = rt.block_on(bus.shutdown());
    assert_eq!(
        report.handled,
        published * GROUPS as u64,
        "shutdown report disagrees"
    );
    assert_eq!(report.failed + report.dropped + report.abandoned, 0);
}

// `criterion_group!` defines an undocumented `pub fn`; keeping it in a private module keeps it
// out of the `missing_docs` lint.
mod harness {
    criterion::criterion_group!(benches, super::fanout);
}
criterion_main!(harness::benches);
