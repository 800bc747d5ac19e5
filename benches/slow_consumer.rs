//! A slow consumer: one publisher always ahead of one consumer that works about 1 µs per event,
//! through a queue of capacity 64.
//!
//! Every entry of the criterion group `slow_consumer` moves `N` events of 64 bytes from one task
//! to another and waits until the consumer has handled all of them. The consumer's work is a
//! fixed loop of arithmetic ([`WORK`] iterations, about 1 µs on the 2-vCPU bench machine), the
//! same in every entry, so the entries differ only in how the events travel and in how the
//! publisher waits for room. The throughput line is in events per second.
//!
//! - `tokio_mpsc`: the raw baseline, a `tokio::sync::mpsc::channel(64)` and a consumer task
//!   looping on `recv().await`.
//! - `tidings_publish`: a bus with one topic of one partition (capacity 64) and one consumer
//!   group; the publisher awaits `bus.publish(event)`, the iteration ends at `bus.settled()`.
//!
//! How to read it: the queue is full nearly all the time, so this measures what a publish that
//! waits for room costs (waking, parking, moving tasks between threads), not the bare hop of
//! `p2p`. Divide the time of `tidings_publish` by the time of `tokio_mpsc` (the goal is at most
//! 1.05). `examples/perf_probe.rs` (`slow`, `slow-mpsc`) runs the same case once, counting the
//! runtime's thread parks.
//!
//! All tasks run on a multi-thread tokio runtime with 2 worker threads; the publisher is a
//! spawned task too, so the main thread only waits.

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{runtime, Counter, Ev};
use criterion::{criterion_main, Criterion, Throughput};
use tidings::prelude::*;
use tokio::sync::mpsc;

/// Events per iteration.
const N: u64 = 5_000;
/// Queue capacity of the baseline channel and of the bus's partition queue.
const CAPACITY: usize = 64;
/// Iterations of [`work`] per event: about 1 µs.
const WORK: u32 = 750;

/// The consumer's work: a fixed amount of arithmetic the optimizer cannot remove.
fn work(seed: u64) -> u64 {
    let mut x = seed | 1;
    for i in 0..WORK {
        x = black_box(x.rotate_left(5) ^ u64::from(i)).wrapping_mul(0x0100_0000_01b3);
    }
    x
}

/// Works on every event, then counts it.
struct SlowSink {
    handled: Arc<Counter>,
}

impl Handler<Ev> for SlowSink {
    async fn handle(&mut self, e: &Envelope<Ev>, _: &Context) -> Result<(), HandlerError> {
        black_box(work(e.event().payload[0]));
        self.handled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// One baseline batch: a fresh channel and consumer task, `N` sends, wait for the consumer.
async fn mpsc_batch() {
    let (tx, mut rx) = mpsc::channel::<Ev>(CAPACITY);
    let consumer = tokio::spawn(async move {
        let mut received = 0u64;
        while let Some(ev) = rx.recv().await {
            black_box(work(ev.payload[0]));
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

fn slow_consumer(c: &mut Criterion) {
    let rt = runtime();
    let handled = Arc::new(Counter::default());
    let bus = {
        let _enter = rt.enter();
        let handled = Arc::clone(&handled);
        Bus::builder()
            .topic(TopicConfig::new(Ev::TOPIC).partitions(1).capacity(CAPACITY))
            .subscribe::<Ev, _>("slow", move || SlowSink {
                handled: Arc::clone(&handled),
            })
            .build()
            .expect("bus")
    };
    let mut published = 0u64;

    let mut group = c.benchmark_group("slow_consumer");
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
            let bus = bus.clone();
            let handled = Arc::clone(&handled);
            async move {
                tokio::spawn(async move {
                    let before = handled.load(Ordering::Relaxed);
                    for i in 0..N {
                        bus.publish(Ev::new(i)).await.expect("bus open");
                    }
                    bus.settled().await;
                    let got = handled.load(Ordering::Relaxed) - before;
                    assert_eq!(got, N, "tidings lost or duplicated events");
                })
                .await
                .expect("batch task")
            }
        });
    });

    group.finish();

    let report = rt.block_on(bus.shutdown());
    assert_eq!(report.handled, published, "shutdown report disagrees");
    assert_eq!(report.failed + report.dropped + report.abandoned, 0);
}

// `criterion_group!` defines an undocumented `pub fn`; keeping it in a private module keeps it
// out of the `missing_docs` lint.
mod harness {
    criterion::criterion_group!(benches, super::slow_consumer);
}
criterion_main!(harness::benches);
