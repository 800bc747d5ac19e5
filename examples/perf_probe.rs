//! Perf probe: the hot paths of the bus beside raw tokio baselines, made to be measured with
//! instruction counters (`valgrind --tool=callgrind`) and with thread-park counts, on machines
//! too noisy for wall-clock benches.
//!
//! ```text
//! cargo build --release --example perf_probe
//! target/release/examples/perf_probe <case> [--n N] [--rt mt|ct] [--work ITERS] [--recorder prometheus]
//! valgrind --tool=callgrind target/release/examples/perf_probe p2p --n 100000
//! ```
//!
//! Cases (each runs `N` events or round trips once, after building everything it needs):
//!
//! - `p2p` / `p2p-mpsc`: one publisher task, one consumer, one partition, capacity 1024, as in
//!   `benches/p2p.rs` (`tidings_publish` / `tokio_mpsc`).
//! - `fanout` / `fanout-mpsc`: as `p2p` with 4 consumer groups, as in `benches/fanout.rs`
//!   (`tidings_publish` / `tokio_mpsc_x4`); the four consumers' thread moves are summed.
//! - `rr` / `rr-mpsc`: sequential request/reply round trips, as in `benches/request_reply.rs`
//!   (`tidings_request` / `tokio_mpsc_oneshot`).
//! - `slow` / `slow-mpsc`: a slow consumer, as in `benches/slow_consumer.rs`: capacity 64, the
//!   consumer works about 1 µs per event (a fixed loop of `--work` iterations, so that
//!   instruction counts do not depend on the clock), the publisher is always ahead.
//! - `calibrate`: how long `--work` iterations take here (aim for 1 µs; on a busy machine,
//!   read the CPU time, e.g. `perf stat -e task-clock`, rather than the wall time printed).
//!
//! `--rt mt` (default) is a multi-thread runtime with 2 workers, `--rt ct` a current-thread
//! one. The probe prints the wall time per event, how often the runtime's threads parked and
//! were unparked (`on_thread_park` / `on_thread_unpark`), per 1,000 events, and how often the
//! consumer and the publisher moved to another thread (and which threads they ended on: the
//! same number means they took turns on one thread).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tokio::sync::{mpsc, oneshot};

/// Thread parks of the runtime's workers.
static PARKS: AtomicU64 = AtomicU64::new(0);
/// Thread unparks of the runtime's workers.
static UNPARKS: AtomicU64 = AtomicU64::new(0);

/// Where a task ran: how often it changed threads, and the thread it ran on last.
struct Whereabouts {
    moves: AtomicU64,
    last: AtomicU64,
}

/// The consumer (the handler, or the mpsc receiver task).
static CONSUMER: Whereabouts = Whereabouts::new();
/// The publisher task.
static PUBLISHER: Whereabouts = Whereabouts::new();

/// Numbers the threads, for [`Whereabouts`].
static NEXT_THREAD: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static THREAD: u64 = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
}

impl Whereabouts {
    const fn new() -> Self {
        Whereabouts {
            moves: AtomicU64::new(0),
            last: AtomicU64::new(0),
        }
    }

    /// Notes that the task runs now; `seen` is the task's own copy of the last thread.
    fn here(&self, seen: &mut u64) {
        let now = THREAD.with(|t| *t);
        if *seen != now {
            if *seen != 0 {
                self.moves.fetch_add(1, Ordering::Relaxed);
            }
            self.last.store(now, Ordering::Relaxed);
            *seen = now;
        }
    }
}

/// Iterations of [`work`] that take about 1 µs of CPU on the 2-vCPU bench machine (measured
/// with `perf stat -e task-clock … calibrate`: 750 take 1.04 µs).
const DEFAULT_WORK: u32 = 750;

/// A 64-byte event, as in the benches.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Event)]
#[event(topic = "probe.events", key = key)]
struct Ev {
    key: u64,
    payload: [u64; 7],
}

impl Ev {
    fn new(i: u64) -> Self {
        Ev {
            key: i,
            payload: [i; 7],
        }
    }
}

/// The consumer's work: a fixed amount of arithmetic the optimizer cannot remove.
fn work(iters: u32, seed: u64) -> u64 {
    let mut x = seed | 1;
    for i in 0..iters {
        x = black_box(x.rotate_left(5) ^ u64::from(i)).wrapping_mul(0x0100_0000_01b3);
    }
    x
}

/// Counts what it handles, working `work` iterations per event.
struct Sink {
    handled: Arc<AtomicU64>,
    work: u32,
    thread: u64,
}

impl Handler<Ev> for Sink {
    async fn handle(&mut self, e: &Envelope<Ev>, _: &Context) -> Result<(), HandlerError> {
        black_box(work(self.work, e.event().payload[0]));
        CONSUMER.here(&mut self.thread);
        self.handled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Asks for its number plus one.
struct Incr(u64);

impl Command for Incr {
    type Reply = u64;
}

/// Answers `x + 1`.
struct Incrementer;

impl CommandHandler<Incr> for Incrementer {
    async fn handle(&mut self, cmd: Incr, _: &Context) -> Result<u64, HandlerError> {
        Ok(cmd.0 + 1)
    }
}

struct Args {
    case: String,
    n: u64,
    multi_thread: bool,
    work: u32,
    /// `prometheus`: the Prometheus exporter's recorder is installed before the bus is built
    /// (needs `--features metrics`); anything else: no recorder.
    recorder: String,
}

fn args() -> Args {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        case: args.next().unwrap_or_else(|| "p2p".to_owned()),
        n: 100_000,
        multi_thread: true,
        work: DEFAULT_WORK,
        recorder: String::new(),
    };
    while let Some(flag) = args.next() {
        let value = args.next().expect("a value after each flag");
        match flag.as_str() {
            "--n" => parsed.n = value.parse().expect("--n: a number"),
            "--rt" => parsed.multi_thread = value != "ct",
            "--work" => parsed.work = value.parse().expect("--work: a number"),
            "--recorder" => parsed.recorder = value,
            other => panic!("unknown flag {other}"),
        }
    }
    parsed
}

fn runtime(multi_thread: bool) -> tokio::runtime::Runtime {
    let mut builder = if multi_thread {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder
        .enable_all()
        .on_thread_park(|| {
            PARKS.fetch_add(1, Ordering::Relaxed);
        })
        .on_thread_unpark(|| {
            UNPARKS.fetch_add(1, Ordering::Relaxed);
        })
        .build()
        .expect("tokio runtime")
}

/// A bus with one topic of one partition and `groups` consumer groups of [`Sink`]s.
fn bus_with_sinks(capacity: usize, groups: u64, handled: &Arc<AtomicU64>, work: u32) -> Bus {
    let mut builder =
        Bus::builder().topic(TopicConfig::new(Ev::TOPIC).partitions(1).capacity(capacity));
    for group in 0..groups {
        let handled = Arc::clone(handled);
        builder = builder.subscribe::<Ev, _>(format!("sink{group}"), move || Sink {
            handled: Arc::clone(&handled),
            work,
            thread: 0,
        });
    }
    builder.build().expect("bus")
}

/// `n` publishes from a spawned task to `groups` groups, then waits until all are handled.
async fn publish_run(capacity: usize, groups: u64, n: u64, work: u32) -> impl FnOnce() {
    let handled = Arc::new(AtomicU64::new(0));
    let bus = bus_with_sinks(capacity, groups, &handled, work);
    let publisher = bus.clone();
    let started = start();
    tokio::spawn(async move {
        let mut thread = 0;
        for i in 0..n {
            publisher.publish(Ev::new(i)).await.expect("bus open");
            PUBLISHER.here(&mut thread);
        }
        publisher.settled().await;
    })
    .await
    .expect("publisher task");
    let report = stop(started, n);
    assert_eq!(
        handled.load(Ordering::Relaxed),
        n * groups,
        "lost or duplicated events"
    );
    let report_bus = bus.shutdown().await;
    assert_eq!(report_bus.handled, n * groups);
    report
}

/// `n` events, each sent as an `Arc` to 4 tokio mpsc channels of 1024 in turn (as
/// `benches/fanout.rs` does).
async fn fanout_mpsc_run(n: u64) -> impl FnOnce() {
    let started = start();
    let mut senders = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let (tx, mut rx) = mpsc::channel::<Arc<Ev>>(1024);
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
    tokio::spawn(async move {
        for i in 0..n {
            let ev = Arc::new(Ev::new(i));
            for tx in &senders {
                tx.send(Arc::clone(&ev)).await.expect("consumer alive");
            }
        }
    })
    .await
    .expect("publisher task");
    for consumer in consumers {
        assert_eq!(consumer.await.expect("consumer task"), n);
    }
    stop(started, n)
}

/// `n` sends over a tokio mpsc channel of `capacity` to a consumer task.
async fn mpsc_run(capacity: usize, n: u64, work_iters: u32) -> impl FnOnce() {
    let (tx, mut rx) = mpsc::channel::<Ev>(capacity);
    let started = start();
    let consumer = tokio::spawn(async move {
        let mut received = 0u64;
        let mut thread = 0;
        while let Some(ev) = rx.recv().await {
            black_box(work(work_iters, ev.payload[0]));
            CONSUMER.here(&mut thread);
            received += 1;
        }
        received
    });
    tokio::spawn(async move {
        let mut thread = 0;
        for i in 0..n {
            tx.send(Ev::new(i)).await.expect("consumer alive");
            PUBLISHER.here(&mut thread);
        }
    })
    .await
    .expect("publisher task");
    let received = consumer.await.expect("consumer task");
    let report = stop(started, n);
    assert_eq!(received, n, "tokio mpsc lost events");
    report
}

/// `n` sequential requests to the bus's command handler.
async fn request_run(n: u64) -> impl FnOnce() {
    let bus = Bus::builder()
        .command_handler::<Incr, _>(|| Incrementer)
        .build()
        .expect("bus");
    let client = bus.clone();
    let started = start();
    tokio::spawn(async move {
        for x in 0..n {
            assert_eq!(client.request(Incr(x)).await, Ok(x + 1));
        }
    })
    .await
    .expect("client task");
    let report = stop(started, n);
    bus.shutdown().await;
    report
}

/// `n` sequential round trips over tokio mpsc + oneshot.
async fn request_mpsc_run(n: u64) -> impl FnOnce() {
    let (server_tx, mut server_rx) = mpsc::channel::<(u64, oneshot::Sender<u64>)>(1024);
    let server = tokio::spawn(async move {
        while let Some((x, reply)) = server_rx.recv().await {
            let _ = reply.send(x + 1);
        }
    });
    let started = start();
    tokio::spawn(async move {
        for x in 0..n {
            let (tx, rx) = oneshot::channel();
            server_tx.send((x, tx)).await.expect("server alive");
            assert_eq!(rx.await.expect("server replied"), x + 1);
        }
    })
    .await
    .expect("client task");
    let report = stop(started, n);
    server.await.expect("server task");
    report
}

#[derive(Clone, Copy)]
struct Started {
    at: Instant,
    parks: u64,
    unparks: u64,
    moves: [u64; 2],
}

fn start() -> Started {
    Started {
        at: Instant::now(),
        parks: PARKS.load(Ordering::Relaxed),
        unparks: UNPARKS.load(Ordering::Relaxed),
        moves: [
            CONSUMER.moves.load(Ordering::Relaxed),
            PUBLISHER.moves.load(Ordering::Relaxed),
        ],
    }
}

/// Reads the counters now; returns a closure that prints them (after the shutdown).
fn stop(started: Started, n: u64) -> impl FnOnce() {
    let elapsed = started.at.elapsed();
    let parks = PARKS.load(Ordering::Relaxed) - started.parks;
    let unparks = UNPARKS.load(Ordering::Relaxed) - started.unparks;
    let consumer_moves = CONSUMER.moves.load(Ordering::Relaxed) - started.moves[0];
    let publisher_moves = PUBLISHER.moves.load(Ordering::Relaxed) - started.moves[1];
    move || {
        let per_k = |x: u64| x as f64 * 1000.0 / n as f64;
        println!(
            "n={n} ns/event={:.1} parks={parks} ({:.2}/1000) unparks={unparks} ({:.2}/1000) \
             thread changes: consumer {consumer_moves}, publisher {publisher_moves}; \
             last on threads {} and {}",
            elapsed.as_nanos() as f64 / n as f64,
            per_k(parks),
            per_k(unparks),
            CONSUMER.last.load(Ordering::Relaxed),
            PUBLISHER.last.load(Ordering::Relaxed),
        );
    }
}

/// The Prometheus exporter's recorder, without its HTTP listener: what the bus's metrics cost
/// with a real recorder behind the facade.
#[cfg(feature = "metrics")]
fn install_prometheus() {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(tidings::metrics::DURATION_BUCKETS)
        .expect("buckets")
        .install_recorder()
        .expect("the only recorder");
}

#[cfg(not(feature = "metrics"))]
fn install_prometheus() {
    panic!("--recorder prometheus needs --features metrics");
}

fn main() {
    let Args {
        case,
        n,
        multi_thread,
        work: work_iters,
        recorder,
    } = args();
    if recorder == "prometheus" {
        install_prometheus();
    }
    if case == "calibrate" {
        let started = Instant::now();
        let mut acc = 0u64;
        for i in 0..n {
            acc ^= work(work_iters, i);
        }
        black_box(acc);
        println!(
            "work({work_iters}) takes {:.1} ns",
            started.elapsed().as_nanos() as f64 / n as f64
        );
        return;
    }
    let rt = runtime(multi_thread);
    print!(
        "{case} ({}): ",
        if multi_thread {
            "2 workers"
        } else {
            "current_thread"
        }
    );
    let report: Box<dyn FnOnce()> = rt.block_on(async move {
        match case.as_str() {
            "p2p" => Box::new(publish_run(1024, 1, n, 0).await) as Box<dyn FnOnce()>,
            "p2p-mpsc" => Box::new(mpsc_run(1024, n, 0).await),
            "fanout" => Box::new(publish_run(1024, 4, n, 0).await),
            "fanout-mpsc" => Box::new(fanout_mpsc_run(n).await),
            "slow" => Box::new(publish_run(64, 1, n, work_iters).await),
            "slow-mpsc" => Box::new(mpsc_run(64, n, work_iters).await),
            "rr" => Box::new(request_run(n).await),
            "rr-mpsc" => Box::new(request_mpsc_run(n).await),
            other => panic!(
                "unknown case {other}: p2p, p2p-mpsc, fanout, fanout-mpsc, slow, slow-mpsc, rr, \
                 rr-mpsc, calibrate"
            ),
        }
    });
    report();
}
