//! Edge cases that must not hang, leak or lose: handlers that panic before returning their
//! future, factories that panic, shutdown racing with publishers and requesters, cancelled
//! publishes, deadlines during restarts, extreme timeouts.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::{BuildError, RequestError};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "robust", key = n, name = "panics_and_races.Item")]
struct Item {
    n: u64,
}

/// Panics synchronously, before making its future, on item 1.
struct EagerPanic;
impl Handler<Item> for EagerPanic {
    #[allow(clippy::manual_async_fn)]
    fn handle(
        &mut self,
        e: &Envelope<Item>,
        _: &Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        assert_ne!(e.event().n, 1, "bad item");
        async { Ok(()) }
    }
}

#[tokio::test(start_paused = true)]
async fn a_handler_panicking_before_its_future_exists_is_supervised() {
    let bus = Bus::builder()
        .record(true)
        .subscribe::<Item, _>(Subscription::new("eager").max_deliveries(2), || EagerPanic)
        .build()
        .unwrap();
    for n in 0..3 {
        bus.publish(Item { n }).await.unwrap();
    }
    let report = tokio::time::timeout(Duration::from_secs(60), bus.shutdown())
        .await
        .expect("shutdown must not hang");
    assert_eq!((report.handled, report.failed, report.panics), (2, 1, 2));
    assert!(bus.failures()[0].error.contains("bad item"));
}

struct Echo;
impl Command for Echo {
    type Reply = u64;
}
struct EagerCommandPanic(u64);
impl CommandHandler<Echo> for EagerCommandPanic {
    #[allow(clippy::manual_async_fn)]
    fn handle(
        &mut self,
        _: Echo,
        _: &Context,
    ) -> impl Future<Output = Result<u64, HandlerError>> + Send {
        self.0 += 1;
        assert_ne!(self.0, 1, "first command after a (re)start panics");
        let n = self.0;
        async move { Ok(n) }
    }
}

#[tokio::test(start_paused = true)]
async fn a_command_handler_panicking_before_its_future_exists_answers_panicked() {
    let bus = Bus::builder()
        .command_handler::<Echo, _>(|| EagerCommandPanic(0))
        .build()
        .unwrap();
    assert!(matches!(
        bus.request(Echo).await,
        Err(RequestError::Panicked { .. })
    ));
    // Restarted fresh: panics again on its first command, then answers.
    assert!(matches!(
        bus.request(Echo).await,
        Err(RequestError::Panicked { .. })
    ));
    tokio::time::timeout(Duration::from_secs(60), bus.shutdown())
        .await
        .expect("shutdown must not hang");
}

struct Flaky;
impl Command for Flaky {
    type Reply = ();
}
struct AlwaysPanics;
impl CommandHandler<Flaky> for AlwaysPanics {
    async fn handle(&mut self, _: Flaky, _: &Context) -> Result<(), HandlerError> {
        panic!("always");
    }
}

#[tokio::test(start_paused = true)]
async fn request_deadlines_hold_during_a_restart_backoff() {
    let bus = Bus::builder()
        .command_handler::<Flaky, _>(|| AlwaysPanics)
        .build()
        .unwrap();
    // Six panics in a row push the restart backoff to 320 ms and more.
    for _ in 0..6 {
        let _ = bus.request(Flaky).await;
    }
    let started = tokio::time::Instant::now();
    let r = bus.request_timeout(Flaky, Duration::from_millis(100)).await;
    assert!(matches!(r, Err(RequestError::Timeout { .. })), "{r:?}");
    assert_eq!(started.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn a_huge_timeout_does_not_overflow() {
    struct Quick;
    impl CommandHandler<Echo> for Quick {
        async fn handle(&mut self, _: Echo, _: &Context) -> Result<u64, HandlerError> {
            Ok(7)
        }
    }
    let bus = Bus::builder()
        .request_timeout(Duration::MAX)
        .command_handler::<Echo, _>(|| Quick)
        .build()
        .unwrap();
    assert_eq!(bus.request(Echo).await, Ok(7));
    assert_eq!(bus.request_timeout(Echo, Duration::MAX).await, Ok(7));
}

#[tokio::test]
async fn a_factory_that_panics_at_build_is_a_build_error() {
    struct Nop;
    impl Handler<Item> for Nop {
        async fn handle(&mut self, _: &Envelope<Item>, _: &Context) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    let err = Bus::builder()
        .subscribe::<Item, _>("ok", || Nop)
        .subscribe::<Item, _>("broken", || -> Nop { panic!("no config") })
        .build()
        .unwrap_err();
    match err {
        BuildError::FactoryPanicked {
            subscription,
            message,
        } => {
            assert_eq!(subscription, "broken");
            assert!(message.contains("no config"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Sleeps per command and says when it is dropped (its task ended).
struct Sleeper(Arc<AtomicBool>);
impl Drop for Sleeper {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
impl CommandHandler<Echo> for Sleeper {
    async fn handle(&mut self, _: Echo, _: &Context) -> Result<u64, HandlerError> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(1)
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_handle_while_a_command_runs_stops_its_task() {
    let dropped = Arc::new(AtomicBool::new(false));
    let bus = Bus::builder()
        .command_handler::<Echo, _>({
            let dropped = dropped.clone();
            move || Sleeper(dropped.clone())
        })
        .build()
        .unwrap();
    let r = bus.request_timeout(Echo, Duration::from_millis(10)).await;
    assert!(matches!(r, Err(RequestError::Timeout { .. })));
    drop(bus); // the handler is still running
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(dropped.load(Ordering::SeqCst), "the command task must stop");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_publish_publishes_nothing() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handled = Arc::new(AtomicU64::new(0));
    struct Gated(Arc<tokio::sync::Semaphore>, Arc<AtomicU64>);
    impl Handler<Item> for Gated {
        async fn handle(&mut self, _: &Envelope<Item>, _: &Context) -> Result<(), HandlerError> {
            self.0.acquire().await.unwrap().forget();
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let bus = Bus::builder()
        .topic(TopicConfig::new("robust").partitions(1).capacity(2))
        .subscribe::<Item, _>(Subscription::new("gated").batch_size(1), {
            let (gate, handled) = (gate.clone(), handled.clone());
            move || Gated(gate.clone(), handled.clone())
        })
        .build()
        .unwrap();
    let mut accepted = 0;
    // Fill: one in the handler, two queued; the next publish waits and is cancelled.
    for n in 0..10 {
        match tokio::time::timeout(Duration::from_millis(10), bus.publish(Item { n })).await {
            Ok(Ok(_)) => accepted += 1,
            Ok(Err(e)) => panic!("{e:?}"),
            Err(_) => break,
        }
    }
    assert_eq!(accepted, 3);
    gate.add_permits(100);
    let report = bus.shutdown().await;
    assert_eq!(
        report.handled, 3,
        "the cancelled publish must not be delivered"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 3);
    assert_eq!(bus.stats().topic("robust").unwrap().published, 3);
}

struct Ping;
impl Command for Ping {
    type Reply = ();
}
struct Pong;
impl CommandHandler<Ping> for Pong {
    async fn handle(&mut self, _: Ping, _: &Context) -> Result<(), HandlerError> {
        tokio::task::yield_now().await;
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "robust.done", key = n, name = "panics_and_races.Done")]
struct Done {
    n: u64,
}

struct Forward;
impl Handler<Item> for Forward {
    async fn handle(&mut self, e: &Envelope<Item>, ctx: &Context) -> Result<(), HandlerError> {
        tokio::task::yield_now().await;
        // A follow-up: must be accepted even while shutdown drains.
        ctx.publish(Done { n: e.event().n }).await?;
        Ok(())
    }
}

struct Sink;
impl Handler<Done> for Sink {
    async fn handle(&mut self, _: &Envelope<Done>, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[test]
fn shutdown_racing_with_publishers_and_requesters_neither_hangs_nor_loses() {
    let rounds: u64 = std::env::var("TIDINGS_STRESS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(40, |n: u64| n * 40);
    for round in 0..rounds {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let bus = Bus::builder()
                .topic(TopicConfig::new("robust").partitions(2).capacity(4))
                .topic(TopicConfig::new("robust.done").partitions(2).capacity(4))
                .subscribe::<Item, _>("forward", || Forward)
                .subscribe::<Done, _>("sink", || Sink)
                .command_handler::<Ping, _>(|| Pong)
                .command_capacity(1)
                .build()
                .unwrap();
            let accepted = Arc::new(AtomicU64::new(0));
            let mut clients = Vec::new();
            for c in 0..6u64 {
                let bus = bus.clone();
                let accepted = accepted.clone();
                clients.push(tokio::spawn(async move {
                    for i in 0.. {
                        if c < 4 {
                            if bus.request(Ping).await == Err(RequestError::Closed) {
                                break;
                            }
                        } else if bus.publish(Item { n: c * 100_000 + i }).await.is_ok() {
                            accepted.fetch_add(1, Ordering::SeqCst);
                        } else {
                            break;
                        }
                    }
                }));
            }
            tokio::time::sleep(Duration::from_micros(200 + round * 37 % 500)).await;
            let report = tokio::time::timeout(Duration::from_secs(10), bus.shutdown())
                .await
                .unwrap_or_else(|_| panic!("round {round}: shutdown hung"));
            for c in clients {
                c.await.unwrap();
            }
            let accepted = accepted.load(Ordering::SeqCst);
            assert_eq!(report.abandoned, 0, "round {round}");
            assert_eq!(report.failed, 0, "round {round}: a follow-up was refused");
            // Every accepted event and its follow-up were handled.
            assert_eq!(report.handled, 2 * accepted, "round {round}");
            assert_eq!(bus.stats().pending, 0, "round {round}");
        });
    }
}

#[test]
fn shutdown_racing_with_requesters_on_a_full_command_queue_neither_hangs_nor_leaks() {
    // The shape that once hung: four requesters looping on a command queue of one slot while
    // shutdown begins (a request could slip in after the drain and lose the stop message).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..300 {
        rt.block_on(async {
            let bus = Bus::builder()
                .command_capacity(1)
                .command_handler::<Ping, _>(|| Pong)
                .build()
                .unwrap();
            let mut requesters = Vec::new();
            for _ in 0..4 {
                let bus = bus.clone();
                requesters.push(tokio::spawn(async move {
                    while bus.request(Ping).await != Err(RequestError::Closed) {}
                }));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
            tokio::time::timeout(Duration::from_secs(5), bus.shutdown())
                .await
                .unwrap_or_else(|_| panic!("round {round}: shutdown hung"));
            for r in requesters {
                tokio::time::timeout(Duration::from_secs(5), r)
                    .await
                    .expect("requesters see Closed")
                    .unwrap();
            }
            // Checked once the requesters stopped: a refused request is counted for a moment.
            assert_eq!(bus.stats().pending, 0, "round {round}: pending leaked");
        });
    }
}
