//! Retry: exponential backoff with jitter on tokio's clock, permanent errors and panics, per-key
//! order while an event waits, other partitions going on, shutdown during a wait, settings
//! checked at build.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::testing::Recorder;
use tidings::{BuildError, ErrorKind};
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = key)]
struct Charge {
    key: u64,
    seq: u32,
    /// "ok", "fail-2" (fails the first two attempts), "fail", "permanent", "panic-once".
    mode: String,
}

fn charge(key: u64, seq: u32, mode: &str) -> Charge {
    Charge {
        key,
        seq,
        mode: mode.into(),
    }
}

#[derive(Clone)]
struct Gateway {
    /// (key, seq, attempt, when)
    calls: Recorder<(u64, u32, u32, Instant)>,
    handled: Recorder<(u64, u32)>,
}

impl Handler<Charge> for Gateway {
    async fn handle(&mut self, e: &Envelope<Charge>, _: &Context) -> HandlerResult {
        let c = e.event();
        self.calls.push((c.key, c.seq, e.attempt(), Instant::now()));
        match c.mode.as_str() {
            "fail-2" if e.attempt() <= 2 => return Err(HandlerError::msg("gateway busy")),
            "fail" => return Err(HandlerError::msg("gateway down")),
            "permanent" => return Err(HandlerError::permanent("card number invalid")),
            "panic-once" if e.attempt() == 1 => panic!("gateway client bug"),
            _ => {}
        }
        self.handled.push((c.key, c.seq));
        Ok(())
    }
}

fn gateway() -> Gateway {
    Gateway {
        calls: Recorder::new(),
        handled: Recorder::new(),
    }
}

fn bus_with(sub: Subscription, partitions: u32, gw: &Gateway) -> Bus {
    let gw = gw.clone();
    Bus::builder()
        .topic(TopicConfig::new("payments").partitions(partitions))
        .subscribe::<Charge, _>(sub, move || gw.clone())
        .build()
        .unwrap()
}

fn exact(attempts: u32) -> Retry {
    Retry::new(attempts)
        .backoff(Duration::from_millis(100), Duration::from_millis(250))
        .jitter(0.0)
}

#[tokio::test(start_paused = true)]
async fn retry_waits_exact_exponential_delays_capped_at_max_then_dead_letters() {
    let gw = gateway();
    let bus = bus_with(Subscription::new("billing").layer(exact(5)), 1, &gw);
    let start = Instant::now();
    bus.publish(charge(1, 1, "fail")).await.unwrap();
    bus.settled().await;

    let calls = gw.calls.take();
    let offsets: Vec<(u32, Duration)> = calls.iter().map(|c| (c.2, c.3 - start)).collect();
    let ms = Duration::from_millis;
    // 100, 200, then 400 and 800 capped at 250.
    assert_eq!(
        offsets,
        vec![
            (1, ms(0)),
            (2, ms(100)),
            (3, ms(300)),
            (4, ms(550)),
            (5, ms(800))
        ]
    );
    let dlq = bus.dead_letters("billing").unwrap();
    let letters = dlq.list();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.attempts, 5);
    assert_eq!(letter.error, "gateway down");
    assert_eq!(letter.kind, ErrorKind::Transient);
    assert!(letter.handler.contains("Gateway"), "{}", letter.handler);
    assert!(letter.first_failure <= letter.last_failure);
    assert_eq!(letter.envelope.downcast_ref::<Charge>().unwrap().seq, 1);
    let stats = bus.stats();
    let group = stats.group("billing").unwrap();
    assert_eq!(
        (group.failed, group.dead_letters, group.dead_lettered),
        (1, 1, 1)
    );
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_succeeds_on_a_later_attempt_with_the_attempt_number() {
    let gw = gateway();
    let bus = bus_with(Subscription::new("billing").layer(exact(5)), 1, &gw);
    bus.publish(charge(1, 1, "fail-2")).await.unwrap();
    bus.settled().await;
    let attempts: Vec<u32> = gw.calls.take().iter().map(|c| c.2).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    assert_eq!(gw.handled.take(), vec![(1, 1)]);
    assert!(bus.dead_letters("billing").unwrap().is_empty());
    assert_eq!(bus.stats().group("billing").unwrap().handled, 1);
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_skips_the_retries_and_goes_straight_to_the_dead_letter_queue() {
    let gw = gateway();
    let bus = bus_with(Subscription::new("billing").layer(exact(5)), 1, &gw);
    let start = Instant::now();
    bus.publish(charge(1, 1, "permanent")).await.unwrap();
    bus.settled().await;
    assert_eq!(gw.calls.len(), 1);
    assert_eq!(Instant::now(), start, "no backoff was waited");
    let letter = &bus.dead_letters("billing").unwrap().list()[0];
    assert_eq!((letter.attempts, letter.kind), (1, ErrorKind::Permanent));
    assert_eq!(letter.error, "card number invalid");
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_panic_counts_as_a_failed_attempt_and_the_retry_gets_a_fresh_handler() {
    let gw = gateway();
    let instances = Arc::new(AtomicU32::new(0));
    let bus = {
        let (gw, instances) = (gw.clone(), instances.clone());
        Bus::builder()
            .topic(TopicConfig::new("payments").partitions(1))
            .subscribe::<Charge, _>(Subscription::new("billing").layer(exact(3)), move || {
                instances.fetch_add(1, Ordering::SeqCst);
                gw.clone()
            })
            .build()
            .unwrap()
    };
    bus.publish(charge(1, 1, "panic-once")).await.unwrap();
    bus.settled().await;
    assert_eq!(gw.handled.take(), vec![(1, 1)]);
    let attempts: Vec<u32> = gw.calls.take().iter().map(|c| c.2).collect();
    assert_eq!(attempts, vec![1, 2]);
    assert_eq!(instances.load(Ordering::SeqCst), 2, "restarted once");
    let stats = bus.stats();
    let group = stats.group("billing").unwrap();
    assert_eq!((group.panics, group.restarts, group.handled), (1, 1, 1));
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn later_events_of_a_key_wait_for_its_retries_in_that_group() {
    let gw = gateway();
    let bus = bus_with(Subscription::new("billing").layer(exact(5)), 1, &gw);
    bus.publish(charge(7, 1, "fail-2")).await.unwrap();
    bus.publish(charge(7, 2, "ok")).await.unwrap();
    bus.publish(charge(7, 3, "ok")).await.unwrap();
    bus.settled().await;
    assert_eq!(gw.handled.take(), vec![(7, 1), (7, 2), (7, 3)]);
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn other_partitions_go_on_while_one_event_waits_for_its_retry() {
    let gw = gateway();
    let bus = bus_with(
        Subscription::new("billing").layer(
            Retry::new(2)
                .backoff(Duration::from_secs(60), Duration::from_secs(60))
                .jitter(0.0),
        ),
        2,
        &gw,
    );
    // Two keys on different partitions.
    let slow = (0u64..)
        .find(|k| tidings::Key::U64(*k).partition(2) == 0)
        .unwrap();
    let fast = (0u64..)
        .find(|k| tidings::Key::U64(*k).partition(2) == 1)
        .unwrap();
    let start = Instant::now();
    bus.publish(charge(slow, 1, "fail-2")).await.unwrap();
    for seq in 1..=3 {
        bus.publish(charge(fast, seq, "ok")).await.unwrap();
    }
    bus.settled().await;
    let calls = gw.calls.take();
    for c in calls.iter().filter(|c| c.0 == fast) {
        assert_eq!(c.3, start, "the other partition did not wait for the retry");
    }
    // The slow key's event went to the DLQ after its 2 attempts, a minute apart.
    let slow_calls: Vec<Duration> = calls
        .iter()
        .filter(|c| c.0 == slow)
        .map(|c| c.3 - start)
        .collect();
    assert_eq!(slow_calls, vec![Duration::ZERO, Duration::from_secs(60)]);
    assert_eq!(bus.dead_letters("billing").unwrap().len(), 1);
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn jitter_shortens_delays_within_its_share_and_a_seed_makes_them_reproducible() {
    async fn delays(seed: u64) -> Vec<Duration> {
        let gw = gateway();
        let retry = Retry::new(6)
            .backoff(Duration::from_millis(100), Duration::from_secs(10))
            .jitter(0.5)
            .seed(seed);
        let bus = bus_with(Subscription::new("billing").layer(retry), 1, &gw);
        bus.publish(charge(1, 1, "fail")).await.unwrap();
        bus.settled().await;
        bus.shutdown().await;
        let at: Vec<Instant> = gw.calls.take().iter().map(|c| c.3).collect();
        at.windows(2).map(|w| w[1] - w[0]).collect()
    }
    let first = delays(42).await;
    assert_eq!(first.len(), 5);
    for (i, d) in first.iter().enumerate() {
        let base = Duration::from_millis(100 * (1 << i));
        assert!(
            *d <= base && *d >= base / 2,
            "delay {i} = {d:?} not within [{:?}, {base:?}]",
            base / 2
        );
    }
    assert_eq!(first, delays(42).await, "same seed, same delays");
    assert_ne!(first, delays(43).await, "another seed, other delays");
}

#[tokio::test(start_paused = true)]
async fn shutdown_while_an_event_waits_for_its_retry_dead_letters_it_without_handling_it_again() {
    let gw = gateway();
    let bus = bus_with(
        Subscription::new("billing").layer(
            Retry::new(5)
                .backoff(Duration::from_secs(3600), Duration::from_secs(3600))
                .jitter(0.0),
        ),
        1,
        &gw,
    );
    bus.publish(charge(1, 1, "fail")).await.unwrap();
    while gw.calls.is_empty() {
        tokio::task::yield_now().await;
    }
    let start = Instant::now();
    let report = bus.shutdown().await;
    assert!(
        Instant::now() - start < Duration::from_secs(3600),
        "did not wait out the backoff"
    );
    assert_eq!(gw.calls.len(), 1, "not handled again");
    assert_eq!(report.failed, 1);
    assert_eq!(report.abandoned, 0);
    let letters = bus.dead_letters("billing").unwrap().list();
    assert_eq!(
        letters.len(),
        1,
        "kept in the dead-letter queue, readable after shutdown"
    );
    assert_eq!(letters[0].attempts, 1);
    assert!(
        letters[0].error.contains("shutdown"),
        "{}",
        letters[0].error
    );
}

#[tokio::test]
async fn retry_settings_are_checked_at_build() {
    let gw = gateway();
    let build = |sub: Subscription| {
        let gw = gw.clone();
        Bus::builder()
            .subscribe::<Charge, _>(sub, move || gw.clone())
            .build()
            .map(|_| ())
    };
    let invalid = |r: Result<(), BuildError>| matches!(r, Err(BuildError::InvalidSetting(_)));
    assert!(invalid(build(Subscription::new("a").layer(Retry::new(0)))));
    assert!(invalid(build(
        Subscription::new("a").layer(Retry::new(3).jitter(1.5))
    )));
    assert!(invalid(build(
        Subscription::new("a").layer(Retry::new(3).multiplier(0.5))
    )));
    assert!(invalid(build(Subscription::new("a").layer(
        Retry::new(3).backoff(Duration::from_secs(2), Duration::from_secs(1))
    ))));
    assert!(invalid(build(
        Subscription::new("a")
            .max_deliveries(2)
            .layer(Retry::new(3))
    )));
    assert!(invalid(build(
        Subscription::new("a")
            .delivery(DeliveryMode::AtMostOnce)
            .layer(Retry::new(3))
    )));
    build(Subscription::new("a").layer(Retry::new(3))).unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_a_retry_layer_max_deliveries_redelivers_at_once_around_the_chain() {
    let gw = gateway();
    let bus = bus_with(
        Subscription::new("billing")
            .max_deliveries(3)
            .layer(Timeout::new(Duration::from_secs(1))),
        1,
        &gw,
    );
    let start = Instant::now();
    bus.publish(charge(1, 1, "fail-2")).await.unwrap();
    bus.settled().await;
    let attempts: Vec<(u32, Instant)> = gw.calls.take().iter().map(|c| (c.2, c.3)).collect();
    assert_eq!(attempts, vec![(1, start), (2, start), (3, start)]);
    assert_eq!(gw.handled.take(), vec![(1, 1)]);
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "receipts", key = key)]
struct Receipt {
    key: u64,
}

#[tokio::test(start_paused = true)]
async fn a_retried_attempt_keeps_the_events_correlation_for_what_it_publishes() {
    #[derive(Clone)]
    struct Publishing;
    impl Handler<Charge> for Publishing {
        async fn handle(&mut self, e: &Envelope<Charge>, ctx: &Context) -> HandlerResult {
            if e.attempt() == 1 {
                return Err(HandlerError::msg("gateway busy"));
            }
            ctx.publish(Receipt { key: e.event().key }).await?;
            Ok(())
        }
    }
    let bus = Bus::builder()
        .record(true)
        .subscribe::<Charge, _>(Subscription::new("billing").layer(exact(3)), || Publishing)
        .build()
        .unwrap();
    let charge_id = bus.publish(charge(1, 1, "ok")).await.unwrap().id;
    bus.settled().await;
    let receipts = tidings::testing::events_of::<Receipt>(&bus.published());
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].correlation_id(), charge_id);
    assert_eq!(receipts[0].causation_id(), Some(charge_id));
    bus.shutdown().await;
}
