//! Typed failures: the errors the bus makes itself (a timeout, an open circuit, a handler's
//! panic, retries stopped by the shutdown, a tower service that never let the handler answer)
//! reach the layers around them as types a classifier can match, with their kind, and reach the
//! dead-letter queue as the same text as before they had types.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::dead_letter::DeadLetter;
use tidings::middleware::{CircuitBreaker, CircuitOpen, Elapsed, Interrupted};
use tidings::prelude::*;
use tidings::testing::Recorder;
use tidings::Panicked;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "jobs", key = n)]
struct Job {
    n: u32,
}

#[derive(Clone, Copy)]
enum Behaviour {
    Sleep(Duration),
    Fail,
    Panic,
}

#[derive(Clone)]
struct Worker {
    behaviour: Behaviour,
    calls: Arc<AtomicU32>,
}

impl Handler<Job> for Worker {
    async fn handle(&mut self, _: &Envelope<Job>, _: &Context) -> HandlerResult {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.behaviour {
            Behaviour::Sleep(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Behaviour::Fail => Err(HandlerError::msg("remote down")),
            Behaviour::Panic => panic!("boom"),
        }
    }
}

/// What a classifier can tell of an error by its type alone (never by its text).
fn classify(err: &HandlerError) -> String {
    let kind = err.kind();
    if let Some(elapsed) = err.downcast_ref::<Elapsed>() {
        return format!("{kind:?} Elapsed({:?})", elapsed.limit());
    }
    if err.is::<CircuitOpen>() {
        return format!("{kind:?} CircuitOpen");
    }
    if let Some(panicked) = err.downcast_ref::<Panicked>() {
        return format!(
            "{kind:?} Panicked({}, in middleware: {})",
            panicked.message(),
            panicked.in_middleware()
        );
    }
    if let Some(interrupted) = err.downcast_ref::<Interrupted>() {
        let last = interrupted
            .last_error()
            .downcast_ref::<Elapsed>()
            .map_or("untyped".to_owned(), |e| {
                format!("Elapsed({:?})", e.limit())
            });
        let in_chain = err.chain().skip(1).any(|e| e.is::<Elapsed>());
        return format!(
            "{kind:?} Interrupted(after {}, last {last}, Elapsed in chain: {in_chain})",
            interrupted.attempts()
        );
    }
    #[cfg(feature = "tower")]
    {
        if err.is::<tidings::middleware::NotHandled>() {
            return format!("{kind:?} NotHandled");
        }
        if err.is::<tower::timeout::error::Elapsed>() {
            return format!("{kind:?} tower Elapsed");
        }
    }
    format!("{kind:?} untyped")
}

/// Records `"<name>: <classification>"` of every error that comes back through it.
#[derive(Clone)]
struct Observe {
    name: &'static str,
    log: Recorder<String>,
}

impl Middleware for Observe {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        let result = next.run(env).await;
        if let Err(err) = &result {
            self.log.push(format!("{}: {}", self.name, classify(err)));
        }
        result
    }
}

fn observe(name: &'static str, log: &Recorder<String>) -> Observe {
    Observe {
        name,
        log: log.clone(),
    }
}

fn worker(behaviour: Behaviour) -> Worker {
    Worker {
        behaviour,
        calls: Arc::default(),
    }
}

fn bus(sub: Subscription, w: &Worker) -> Bus {
    let w = w.clone();
    Bus::builder()
        .topic(TopicConfig::new("jobs").partitions(1))
        .subscribe::<Job, _>(sub, move || w.clone())
        .build()
        .unwrap()
}

fn dead_letter(bus: &Bus, group: &str) -> DeadLetter {
    let letters = bus.dead_letters(group).unwrap().list();
    assert_eq!(letters.len(), 1, "{letters:?}");
    letters.into_iter().next().unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_timeout_reaches_every_layer_as_elapsed_with_its_limit_and_the_queue_as_its_text() {
    let log = Recorder::new();
    let w = worker(Behaviour::Sleep(Duration::from_secs(5)));
    let bus = bus(
        Subscription::new("slow")
            .layer(Timeout::new(Duration::from_secs(1)))
            .layer(observe("attempt", &log))
            .layer(Retry::immediate(2))
            .layer(observe("final", &log)),
        &w,
    );
    bus.publish(Job { n: 1 }).await.unwrap();
    bus.settled().await;
    assert_eq!(
        log.take(),
        vec![
            "attempt: Transient Elapsed(1s)",
            "attempt: Transient Elapsed(1s)",
            "final: Transient Elapsed(1s)",
        ]
    );
    let letter = dead_letter(&bus, "slow");
    assert_eq!(letter.error, "timed out after 1s");
    assert_eq!(letter.kind, ErrorKind::Transient);
    assert_eq!(letter.attempts, 2);
    bus.shutdown().await;
}

/// Makes a timed-out attempt permanent, by the error's type: the `Retry` outside gives up.
#[derive(Clone)]
struct TimeoutIsFinal;

impl Middleware for TimeoutIsFinal {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        next.run(env).await.map_err(|err| {
            if err.is::<Elapsed>() {
                err.into_permanent()
            } else {
                err
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_classifier_stops_retrying_a_timeout_by_its_type_and_leaves_other_errors_retried() {
    let slow = worker(Behaviour::Sleep(Duration::from_secs(5)));
    let sub = |name| {
        Subscription::new(name)
            .layer(Timeout::new(Duration::from_secs(1)))
            .layer(TimeoutIsFinal)
            .layer(Retry::immediate(4))
    };
    let bus_slow = bus(sub("slow"), &slow);
    bus_slow.publish(Job { n: 1 }).await.unwrap();
    bus_slow.settled().await;
    assert_eq!(slow.calls.load(Ordering::SeqCst), 1, "not retried");
    let letter = dead_letter(&bus_slow, "slow");
    assert_eq!(letter.kind, ErrorKind::Permanent);
    assert_eq!(letter.error, "timed out after 1s");
    bus_slow.shutdown().await;

    let failing = worker(Behaviour::Fail);
    let bus_failing = bus(sub("failing"), &failing);
    bus_failing.publish(Job { n: 1 }).await.unwrap();
    bus_failing.settled().await;
    assert_eq!(failing.calls.load(Ordering::SeqCst), 4, "retried");
    let letter = dead_letter(&bus_failing, "failing");
    assert_eq!(letter.kind, ErrorKind::Transient);
    assert_eq!(letter.error, "remote down");
    bus_failing.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_reaches_every_layer_as_circuit_open_and_the_queue_as_its_text() {
    let log = Recorder::new();
    let w = worker(Behaviour::Fail);
    let breaker = CircuitBreaker::new(1, Duration::from_secs(60));
    let bus = bus(
        Subscription::new("guarded")
            .layer(breaker.clone())
            .layer(observe("attempt", &log))
            .layer(Retry::immediate(3))
            .layer(observe("final", &log)),
        &w,
    );
    bus.publish(Job { n: 1 }).await.unwrap();
    bus.settled().await;
    assert_eq!(w.calls.load(Ordering::SeqCst), 1, "then the circuit opened");
    assert_eq!(breaker.state(), "open");
    assert_eq!(
        log.take(),
        vec![
            "attempt: Transient untyped",
            "attempt: Transient CircuitOpen",
            "attempt: Transient CircuitOpen",
            "final: Transient CircuitOpen",
        ]
    );
    let letter = dead_letter(&bus, "guarded");
    assert_eq!(letter.error, "circuit breaker open: call not attempted");
    assert_eq!(letter.kind, ErrorKind::Transient);
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_handlers_panic_reaches_every_layer_as_panicked_with_its_message_and_the_queue_as_its_text(
) {
    let log = Recorder::new();
    let w = worker(Behaviour::Panic);
    let bus = bus(
        Subscription::new("buggy")
            .layer(observe("attempt", &log))
            .layer(Retry::immediate(2))
            .layer(observe("final", &log)),
        &w,
    );
    bus.publish(Job { n: 1 }).await.unwrap();
    bus.settled().await;
    assert_eq!(
        log.take(),
        vec![
            "attempt: Transient Panicked(boom, in middleware: false)",
            "attempt: Transient Panicked(boom, in middleware: false)",
            "final: Transient Panicked(boom, in middleware: false)",
        ]
    );
    let letter = dead_letter(&bus, "buggy");
    assert_eq!(letter.error, "panic: boom");
    assert_eq!(letter.kind, ErrorKind::Transient);
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn retries_stopped_by_the_shutdown_reach_the_outer_layer_as_interrupted_holding_the_last_error(
) {
    let log = Recorder::new();
    let w = worker(Behaviour::Sleep(Duration::from_secs(5)));
    let bus = bus(
        Subscription::new("slow")
            .layer(Timeout::new(Duration::from_secs(1)))
            .layer(observe("attempt", &log))
            .layer(
                Retry::new(3)
                    .backoff(Duration::from_secs(10), Duration::from_secs(10))
                    .jitter(0.0),
            )
            .layer(observe("final", &log)),
        &w,
    );
    bus.publish(Job { n: 1 }).await.unwrap();
    // The first attempt times out; the retry waits 10 s for the next one.
    while log.is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bus.shutdown().await;
    assert_eq!(w.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        log.take(),
        vec![
            "attempt: Transient Elapsed(1s)",
            "final: Transient Interrupted(after 1, last Elapsed(1s), Elapsed in chain: true)",
        ]
    );
    // Without a store the event is dead-lettered, with the text it always had.
    let letter = dead_letter(&bus, "slow");
    assert_eq!(
        letter.error,
        "timed out after 1s (retries stopped by shutdown after 1 attempt(s))"
    );
    assert_eq!(letter.kind, ErrorKind::Transient);
}

#[cfg(feature = "tower")]
mod tower_layer {
    use super::*;
    use tidings::middleware::{TowerLayer, TowerRequest};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    #[tokio::test(start_paused = true)]
    async fn a_tower_service_answering_ok_without_the_handler_is_not_handled() {
        let log = Recorder::new();
        let w = worker(Behaviour::Fail);
        // Answers Ok at once, never calling its inner service.
        let skip = tower::layer::layer_fn(|_inner: tidings::middleware::Gate| {
            tower::service_fn(|_: TowerRequest| async { Ok::<(), BoxError>(()) })
        });
        let bus = bus(
            Subscription::new("skipped")
                .max_deliveries(1)
                .layer(TowerLayer::new(skip))
                .layer(observe("final", &log)),
            &w,
        );
        bus.publish(Job { n: 1 }).await.unwrap();
        bus.settled().await;
        assert_eq!(w.calls.load(Ordering::SeqCst), 0);
        assert_eq!(log.take(), vec!["final: Transient NotHandled"]);
        let letter = dead_letter(&bus, "skipped");
        assert_eq!(
            letter.error,
            "the tower service answered Ok without the handler succeeding"
        );
        bus.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_tower_services_own_error_keeps_its_type() {
        let log = Recorder::new();
        let w = worker(Behaviour::Sleep(Duration::from_secs(5)));
        let bus = bus(
            Subscription::new("slow")
                .max_deliveries(1)
                .layer(TowerLayer::new(tower::timeout::TimeoutLayer::new(
                    Duration::from_secs(1),
                )))
                .layer(observe("final", &log)),
            &w,
        );
        bus.publish(Job { n: 1 }).await.unwrap();
        bus.settled().await;
        assert_eq!(log.take(), vec!["final: Transient tower Elapsed"]);
        assert_eq!(dead_letter(&bus, "slow").error, "request timed out");
        bus.shutdown().await;
    }
}
