//! Durable end to end: 16 concurrent publishers → append (group commit) → handle → offset commit.
//!
//! Every entry of the criterion group `durable16` publishes `N` events of 64 bytes from 16 tasks
//! at once (each awaits its `publish`, so each has one event in flight) and ends when the one
//! consumer group has handled them all (`bus.settled()`). Offsets are committed in the
//! background every 100 ms (the default), as in production.
//!
//! - `tokio_mpsc`: the raw in-memory baseline, 16 producers into one `mpsc::channel(1024)`.
//! - `<store>/publish`: each publisher awaits one `publish` at a time, so at most 16 events
//!   share a transaction.
//! - `<store>/publish_all_64`: each publisher awaits `publish_all` of 64 events (one commit for
//!   the 64), so up to 1024 events share a transaction.
//! - `<store>/effectively_once/…`: the same, with the group's delivery
//!   `DeliveryMode::EffectivelyOnce`: with a store, each handled event's id is also marked in the
//!   store with the group's offset (the marks of all workers share commits).
//!
//! Stores:
//! - `no_store`: the bus in memory (no durability), same shape.
//! - `memory_store`: the bus on `MemoryStore` (serialization, batching, no disk).
//! - `sqlite`: the bus on `SqliteStore` (WAL, synchronous = FULL) in a temporary directory.
//! - `postgres`: the bus on `PostgresStore` at `DATABASE_URL` (default: the local server), in a
//!   schema of its own; skipped with a message when no server answers.
//!
//! After criterion's figures, each entry's publish latency (p50 / p99 over every publish it
//! timed) is printed: `publish().await` returns once the event is committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{runtime, Counter, Ev, Sink};
use criterion::{criterion_main, Criterion, Throughput};
use parking_lot::Mutex;
use tidings::prelude::*;
use tidings::store::{MemoryStore, Store};

/// Events per iteration.
const N: u64 = 20_000;
/// Concurrent publishers.
const PUBLISHERS: u64 = 16;

type Latencies = Arc<Mutex<Vec<Duration>>>;

/// Events per `publish_all` call in the batched entries.
const BATCH: u64 = 64;

/// Publishes `N` events from `PUBLISHERS` tasks and waits until they are handled: one
/// `publish` at a time per task (`batch == 1`), or `publish_all` of `batch` events.
async fn batch(bus: &Bus, handled: &Counter, latencies: &Latencies, batch: u64) {
    let before = handled.load(std::sync::atomic::Ordering::Relaxed);
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|t| {
            let bus = bus.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity((N / PUBLISHERS) as usize);
                let mut i = 0;
                while i < N / PUBLISHERS {
                    let start = Instant::now();
                    if batch == 1 {
                        bus.publish(Ev::new(t * 1_000_000 + i))
                            .await
                            .expect("published");
                    } else {
                        let n = batch.min(N / PUBLISHERS - i);
                        bus.publish_all((i..i + n).map(|i| Ev::new(t * 1_000_000 + i)))
                            .await
                            .expect("published");
                    }
                    lat.push(start.elapsed());
                    i += batch;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(N as usize);
    for t in tasks {
        all.extend(t.await.expect("publisher"));
    }
    bus.settled().await;
    assert_eq!(
        handled.load(std::sync::atomic::Ordering::Relaxed) - before,
        N,
        "every event handled"
    );
    latencies.lock().extend(all);
}

fn build(store: Option<Arc<dyn Store>>, handled: &Arc<Counter>, delivery: DeliveryMode) -> Bus {
    let h = Arc::clone(handled);
    let mut builder = Bus::builder().topic(
        TopicConfig::new("bench.events")
            .partitions(2)
            .capacity(4096),
    );
    if let Some(store) = store {
        builder = builder.store(store);
    }
    builder
        .subscribe::<Ev, _>(
            Subscription::new(match delivery {
                DeliveryMode::EffectivelyOnce => "sink-effectively-once",
                _ => "sink",
            })
            .delivery(delivery),
            move || Sink {
                handled: Arc::clone(&h),
            },
        )
        .build()
        .expect("bus")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[cfg(feature = "postgres")]
async fn postgres_store() -> Option<Arc<dyn Store>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("bench_{}", std::process::id());
    match tidings::store::PostgresStore::connect_in_schema(&url, &schema).await {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            eprintln!("postgres entry skipped: {e}");
            None
        }
    }
}

#[cfg(not(feature = "postgres"))]
async fn postgres_store() -> Option<Arc<dyn Store>> {
    eprintln!("postgres entry skipped: build with --features postgres");
    None
}

fn durable(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("durable16");
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    let mut report: Vec<(String, Vec<Duration>)> = Vec::new();

    group.bench_function("tokio_mpsc", |b| {
        b.to_async(&rt).iter(|| async {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Arc<Ev>>(1024);
            let consumer = tokio::spawn(async move {
                let mut n = 0;
                while rx.recv().await.is_some() {
                    n += 1;
                }
                n
            });
            let tasks: Vec<_> = (0..PUBLISHERS)
                .map(|t| {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        for i in 0..N / PUBLISHERS {
                            tx.send(Arc::new(Ev::new(t * 1_000_000 + i))).await.unwrap();
                        }
                    })
                })
                .collect();
            drop(tx);
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(consumer.await.unwrap(), N);
        })
    });

    let dir = tempfile::tempdir().expect("temporary directory");
    let stores: Vec<(&str, Option<Arc<dyn Store>>)> = rt.block_on(async {
        let mut stores: Vec<(&str, Option<Arc<dyn Store>>)> = vec![
            ("no_store", None),
            ("memory_store", Some(Arc::new(MemoryStore::new()))),
        ];
        #[cfg(feature = "sqlite")]
        stores.push((
            "sqlite",
            Some(Arc::new(
                tidings::store::SqliteStore::open(dir.path().join("bench.db"))
                    .await
                    .expect("SQLite"),
            )),
        ));
        if let Some(pg) = postgres_store().await {
            stores.push(("postgres", Some(pg)));
        }
        stores
    });
    let modes = [DeliveryMode::AtLeastOnce, DeliveryMode::EffectivelyOnce];
    for ((name, store), delivery) in stores
        .into_iter()
        .flat_map(|s| modes.map(|m| (s.clone(), m)))
    {
        if store.is_none() && delivery == DeliveryMode::EffectivelyOnce {
            continue; // Without a store there are no marks to commit.
        }
        let mode = match delivery {
            DeliveryMode::EffectivelyOnce => "effectively_once/",
            _ => "",
        };
        let handled = Arc::new(Counter::default());
        let bus = rt.block_on(async { build(store, &handled, delivery) });
        for size in [1, BATCH] {
            let entry = if size == 1 {
                format!("{name}/{mode}publish")
            } else {
                format!("{name}/{mode}publish_all_{size}")
            };
            let latencies: Latencies = Arc::default();
            group.bench_function(&entry, |b| {
                b.to_async(&rt)
                    .iter(|| batch(&bus, &handled, &latencies, size));
            });
            let mut lat = std::mem::take(&mut *latencies.lock());
            lat.sort();
            report.push((entry, lat));
        }
        rt.block_on(bus.shutdown());
    }
    group.finish();
    drop(dir);

    println!("\nlatency of one publish (or publish_all) call, 16 concurrent publishers; it returns once committed:");
    for (name, lat) in report {
        println!(
            "  {name:<46} p50 {:>9.1?}  p99 {:>9.1?}  ({} calls)",
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            lat.len()
        );
    }
}

fn benches() {
    let mut c = Criterion::default().configure_from_args();
    durable(&mut c);
}

criterion_main!(benches);
