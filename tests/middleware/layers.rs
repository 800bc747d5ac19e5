//! Middleware: a custom layer sees every attempt and result; declaration order decides the
//! nesting; timeouts per attempt or overall; circuit breaker; throttle; a panicking middleware
//! fails the event without taking the bus down.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::middleware::{CircuitBreaker, Throttle};
use tidings::prelude::*;
use tidings::testing::Recorder;
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "calls", key = n)]
struct Call {
    n: u32,
}

/// Records "<name> before/after" around the rest of the chain, with the attempt and result.
#[derive(Clone)]
struct Audit {
    name: &'static str,
    log: Recorder<String>,
}

impl Middleware for Audit {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        self.log.push(format!(
            "{} before #{} attempt {} group {}",
            self.name,
            env.downcast_ref::<Call>().unwrap().n,
            env.attempt(),
            next.context().group()
        ));
        let result = next.run(env).await;
        self.log.push(format!(
            "{} after: {}",
            self.name,
            match &result {
                Ok(()) => "ok".to_owned(),
                Err(e) => format!("err {e}"),
            }
        ));
        result
    }
}

/// Fails the first `fail` calls; optionally sleeps.
#[derive(Clone)]
struct Remote {
    log: Recorder<String>,
    fail: Arc<AtomicU32>,
    sleep: Duration,
    calls: Arc<AtomicU32>,
}

impl Handler<Call> for Remote {
    async fn handle(&mut self, e: &Envelope<Call>, _: &Context) -> HandlerResult {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.log.push(format!("handler attempt {}", e.attempt()));
        if !self.sleep.is_zero() {
            tokio::time::sleep(self.sleep).await;
        }
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(HandlerError::msg("remote error"));
        }
        Ok(())
    }
}

fn remote(log: &Recorder<String>, fail: u32, sleep: Duration) -> Remote {
    Remote {
        log: log.clone(),
        fail: Arc::new(AtomicU32::new(fail)),
        sleep,
        calls: Arc::default(),
    }
}

fn bus(sub: Subscription, handler: &Remote) -> Bus {
    let handler = handler.clone();
    Bus::builder()
        .topic(TopicConfig::new("calls").partitions(1))
        .subscribe::<Call, _>(sub, move || handler.clone())
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_custom_middleware_sees_each_attempt_and_result_and_later_layers_wrap_earlier_ones() {
    let log = Recorder::new();
    let inner = Audit {
        name: "inner",
        log: log.clone(),
    };
    let outer = Audit {
        name: "outer",
        log: log.clone(),
    };
    let handler = remote(&log, 1, Duration::ZERO);
    let bus = bus(
        Subscription::new("audited")
            .layer(inner)
            .layer(Retry::immediate(2))
            .layer(outer),
        &handler,
    );
    bus.publish(Call { n: 9 }).await.unwrap();
    bus.settled().await;
    assert_eq!(
        log.take(),
        vec![
            "outer before #9 attempt 1 group audited",
            "inner before #9 attempt 1 group audited",
            "handler attempt 1",
            "inner after: err remote error",
            "inner before #9 attempt 2 group audited",
            "handler attempt 2",
            "inner after: ok",
            "outer after: ok",
        ]
    );
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_timeout_inside_retry_limits_each_attempt() {
    let log = Recorder::new();
    let handler = remote(&log, 0, Duration::from_secs(5));
    let bus = bus(
        Subscription::new("slow")
            .layer(Timeout::new(Duration::from_secs(1)))
            .layer(
                Retry::new(3)
                    .backoff(Duration::from_secs(2), Duration::from_secs(2))
                    .jitter(0.0),
            ),
        &handler,
    );
    let start = Instant::now();
    bus.publish(Call { n: 1 }).await.unwrap();
    bus.settled().await;
    // 3 attempts of 1 s, 2 s apart.
    assert_eq!(Instant::now() - start, Duration::from_secs(7));
    assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
    let letter = &bus.dead_letters("slow").unwrap().list()[0];
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.error, "timed out after 1s");
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_timeout_outside_retry_limits_all_attempts_together() {
    let log = Recorder::new();
    let handler = remote(&log, 100, Duration::ZERO);
    let bus = bus(
        Subscription::new("bounded")
            .layer(
                Retry::new(100)
                    .backoff(Duration::from_secs(1), Duration::from_secs(1))
                    .jitter(0.0),
            )
            .layer(Timeout::new(Duration::from_millis(3500))),
        &handler,
    );
    let start = Instant::now();
    bus.publish(Call { n: 1 }).await.unwrap();
    bus.settled().await;
    assert_eq!(Instant::now() - start, Duration::from_millis(3500));
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        4,
        "at 0, 1, 2 and 3 s"
    );
    assert_eq!(
        bus.dead_letters("bounded").unwrap().list()[0].error,
        "timed out after 3.5s"
    );
    bus.shutdown().await;
}

#[tokio::test]
async fn the_circuit_breaker_opens_after_failures_fails_fast_then_recovers() {
    let log = Recorder::new();
    let handler = remote(&log, 2, Duration::ZERO);
    let breaker = CircuitBreaker::new(2, Duration::from_millis(200));
    let bus = bus(
        Subscription::new("guarded")
            .max_deliveries(1)
            .layer(breaker.clone()),
        &handler,
    );
    for n in 0..5 {
        bus.publish(Call { n }).await.unwrap();
    }
    bus.settled().await;
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        2,
        "open after 2 failures"
    );
    assert_eq!(breaker.state(), "open");
    let letters = bus.dead_letters("guarded").unwrap().list();
    assert_eq!(letters.len(), 5);
    assert!(letters[2..]
        .iter()
        .all(|l| l.error.contains("circuit breaker open")));
    // The breaker's clock is the system clock.
    tokio::time::sleep(Duration::from_millis(300)).await;
    bus.publish(Call { n: 5 }).await.unwrap();
    bus.settled().await;
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        3,
        "half-open: tried again"
    );
    assert_eq!(breaker.state(), "closed");
    bus.shutdown().await;
}

#[tokio::test]
async fn permanent_errors_do_not_open_the_circuit() {
    #[derive(Clone)]
    struct Invalid(Arc<AtomicU32>);
    impl Handler<Call> for Invalid {
        async fn handle(&mut self, _: &Envelope<Call>, _: &Context) -> HandlerResult {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(HandlerError::permanent("bad call"))
        }
    }
    let calls = Arc::new(AtomicU32::new(0));
    let breaker = CircuitBreaker::new(2, Duration::from_secs(60));
    let bus = {
        let calls = calls.clone();
        Bus::builder()
            .subscribe::<Call, _>(
                Subscription::new("guarded").layer(breaker.clone()),
                move || Invalid(calls.clone()),
            )
            .build()
            .unwrap()
    };
    for n in 0..5 {
        bus.publish(Call { n }).await.unwrap();
    }
    bus.settled().await;
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert_eq!(breaker.state(), "closed");
    bus.shutdown().await;
}

#[tokio::test]
async fn the_throttle_spaces_calls_out_across_partitions() {
    let log = Recorder::new();
    let handler = remote(&log, 0, Duration::ZERO);
    let bus = {
        let handler = handler.clone();
        Bus::builder()
            .topic(TopicConfig::new("calls").partitions(3))
            .subscribe::<Call, _>(
                // Bursts of 2, then one every 100 ms.
                Subscription::new("throttled").layer(Throttle::new(2, Duration::from_millis(200))),
                move || handler.clone(),
            )
            .build()
            .unwrap()
    };
    let start = std::time::Instant::now();
    for n in 0..6 {
        bus.publish(Call { n }).await.unwrap();
    }
    bus.settled().await;
    assert_eq!(handler.calls.load(Ordering::SeqCst), 6);
    // 2 at once, then 4 more at 100 ms intervals: at least 400 ms (a lower bound only).
    assert!(
        start.elapsed() >= Duration::from_millis(350),
        "{:?}",
        start.elapsed()
    );
    bus.shutdown().await;
}

#[tokio::test]
async fn a_panicking_middleware_fails_the_event_and_the_bus_goes_on() {
    #[derive(Clone)]
    struct Buggy(Arc<AtomicBool>);
    impl Middleware for Buggy {
        async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
            if self.0.swap(false, Ordering::SeqCst) {
                panic!("metrics exporter bug");
            }
            next.run(env).await
        }
    }
    let log = Recorder::new();
    let handler = remote(&log, 0, Duration::ZERO);
    let bus = bus(
        Subscription::new("buggy")
            .max_deliveries(1)
            .layer(Buggy(Arc::new(AtomicBool::new(true)))),
        &handler,
    );
    bus.publish(Call { n: 1 }).await.unwrap();
    bus.publish(Call { n: 2 }).await.unwrap();
    bus.settled().await;
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        1,
        "the second event was handled"
    );
    let letters = bus.dead_letters("buggy").unwrap().list();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].error,
        "panic in middleware: metrics exporter bug"
    );
    bus.shutdown().await;
}
