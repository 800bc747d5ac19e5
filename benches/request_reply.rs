//! Request/reply: sequential round trips from one client to one server task.
//!
//! Every entry of the criterion group `request_reply` makes `N` round trips one after the other
//! (each request waits for its reply before the next is sent); the server answers `x + 1`, and
//! the client checks every reply. The throughput line is in round trips per second.
//!
//! - `tokio_mpsc_oneshot`: the raw baseline, a server task reading
//!   `(u64, oneshot::Sender<u64>)` from a `tokio::sync::mpsc::channel(1024)`.
//! - `tokio_mpsc_oneshot_timeout`: the same baseline with every round trip wrapped in
//!   `tokio::time::timeout(30 s, ..)`, as `Bus::request` does; the difference to the plain
//!   baseline is the price of arming and clearing a timer per request.
//! - `tidings_request`: a bus with one `CommandHandler` for a command whose reply is `u64`;
//!   the client awaits `bus.request(command)`.
//!
//! How to read it: divide the time of `tidings_request` by the time of `tokio_mpsc_oneshot`
//! (and by `tokio_mpsc_oneshot_timeout` for the part of it that is not the timer).
//! Every entry pays two cross-task wake-ups per round trip; the ratio is what the bus adds on
//! top: the type-keyed handler lookup, a request id (UUIDv7), the request timeout,
//! `catch_unwind`, a tracing span per request and the pending-work accounting.
//!
//! Server and client live for the whole group on a multi-thread tokio runtime with 2 worker
//! threads; each iteration's client is a spawned task, so the main thread only waits.

use std::time::Duration;

mod common;

use common::runtime;
use criterion::{criterion_main, Criterion, Throughput};
use tidings::prelude::*;
use tokio::sync::{mpsc, oneshot};

/// Round trips per iteration.
const N: u64 = 2_000;
/// The per-request timeout of the `_timeout` baseline: the bus's default request timeout.
const TIMEOUT: Duration = Duration::from_secs(30);

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

type Request = (u64, oneshot::Sender<u64>);

fn request_reply(c: &mut Criterion) {
    let rt = runtime();

    // Baseline server, alive for the whole group.
    let (server_tx, mut server_rx) = mpsc::channel::<Request>(1024);
    let server = rt.spawn(async move {
        let mut answered = 0u64;
        while let Some((x, reply)) = server_rx.recv().await {
            let _ = reply.send(x + 1);
            answered += 1;
        }
        answered
    });

    let bus = {
        let _enter = rt.enter();
        Bus::builder()
            .command_handler::<Incr, _>(|| Incrementer)
            .build()
            .expect("bus")
    };

    let mut baseline_sent = 0u64;

    let mut group = c.benchmark_group("request_reply");
    group
        .throughput(Throughput::Elements(N))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20);

    group.bench_function("tokio_mpsc_oneshot", |b| {
        b.to_async(&rt).iter(|| {
            baseline_sent += N;
            let server_tx = server_tx.clone();
            async move {
                tokio::spawn(async move {
                    for x in 0..N {
                        let (tx, rx) = oneshot::channel();
                        server_tx.send((x, tx)).await.expect("server alive");
                        assert_eq!(rx.await.expect("server replied"), x + 1);
                    }
                })
                .await
                .expect("client task")
            }
        });
    });

    group.bench_function("tokio_mpsc_oneshot_timeout", |b| {
        b.to_async(&rt).iter(|| {
            let server_tx = server_tx.clone();
            baseline_sent += N;
            async move {
                tokio::spawn(async move {
                    for x in 0..N {
                        let exchange = async {
                            let (tx, rx) = oneshot::channel();
                            server_tx.send((x, tx)).await.expect("server alive");
                            rx.await.expect("server replied")
                        };
                        let reply = tokio::time::timeout(TIMEOUT, exchange).await;
                        assert_eq!(reply, Ok(x + 1));
                    }
                })
                .await
                .expect("client task")
            }
        });
    });

    group.bench_function("tidings_request", |b| {
        b.to_async(&rt).iter(|| {
            let bus = bus.clone();
            async move {
                tokio::spawn(async move {
                    for x in 0..N {
                        assert_eq!(bus.request(Incr(x)).await, Ok(x + 1));
                    }
                })
                .await
                .expect("client task")
            }
        });
    });

    group.finish();

    drop(server_tx);
    let answered = rt.block_on(server).expect("server task");
    assert_eq!(answered, baseline_sent, "baseline server miscounted");
    let report = rt.block_on(bus.shutdown());
    // Every reply was checked above; the report must show no failure either.
    assert_eq!(report.failed + report.panics + report.abandoned, 0);
}

// `criterion_group!` defines an undocumented `pub fn`; keeping it in a private module keeps it
// out of the `missing_docs` lint.
mod harness {
    criterion::criterion_group!(benches, super::request_reply);
}
criterion_main!(harness::benches);
