//! Delayed redelivery: a dead-lettered event is redriven automatically after each delay while
//! its partition goes on; with a sequenced queue only its key waits, in order; after the last
//! delay it stays; permanent errors are not redelivered; shutdown cancels what is scheduled.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tidings::dead_letter::Redelivery;
use tidings::prelude::*;
use tidings::testing::Recorder;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = key)]
struct Payment {
    key: u64,
    seq: u32,
}

/// Fails payments of key 1 until `healthy_at`, and every payment numbered 99 permanently.
#[derive(Clone)]
struct Gateway {
    start: Instant,
    healthy_at: Duration,
    handled: Recorder<(u64, u32, Duration)>,
    calls: Arc<Mutex<Vec<(u32, Duration)>>>,
}

impl Handler<Payment> for Gateway {
    async fn handle(&mut self, e: &Envelope<Payment>, _: &Context) -> HandlerResult {
        let Payment { key, seq } = *e.event();
        let now = Instant::now() - self.start;
        self.calls.lock().push((seq, now));
        if seq == 99 {
            return Err(HandlerError::permanent("invalid card"));
        }
        if key == 1 && now < self.healthy_at {
            return Err(HandlerError::msg("gateway down"));
        }
        self.handled.push((key, seq, now));
        Ok(())
    }
}

fn setup(policy: DeadLetterPolicy, healthy_at: Duration) -> (Bus, Gateway) {
    let gw = Gateway {
        start: Instant::now(),
        healthy_at,
        handled: Recorder::new(),
        calls: Arc::default(),
    };
    let bus = {
        let gw = gw.clone();
        Bus::builder()
            .topic(TopicConfig::new("payments").partitions(1))
            .subscribe::<Payment, _>(
                Subscription::new("payments")
                    .max_deliveries(1)
                    .dead_letter(policy)
                    .redelivery(Redelivery::after([
                        Duration::from_secs(10),
                        Duration::from_secs(60),
                    ])),
                move || gw.clone(),
            )
            .build()
            .unwrap()
    };
    (bus, gw)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_is_redelivered_after_each_delay_while_the_partition_goes_on() {
    let (bus, gw) = setup(DeadLetterPolicy::Park, secs(30));
    bus.publish(Payment { key: 1, seq: 1 }).await.unwrap();
    bus.publish(Payment { key: 2, seq: 2 }).await.unwrap();
    bus.settled().await;
    // The other key was not held up.
    assert_eq!(gw.handled.take(), vec![(2, 2, secs(0))]);
    let dlq = bus.dead_letters("payments").unwrap();
    assert_eq!(dlq.list()[0].redeliveries, 0);
    // At 10 s: redelivered, fails again (healthy from 30 s), back with one redelivery counted.
    tokio::time::sleep(secs(11)).await;
    bus.settled().await;
    let letters = dlq.list();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].redeliveries, 1);
    // At 10 + 60 s: redelivered again, succeeds.
    tokio::time::sleep(secs(60)).await;
    bus.settled().await;
    assert_eq!(gw.handled.take(), vec![(1, 1, secs(70))]);
    assert!(dlq.is_empty());
    let calls: Vec<Duration> = gw
        .calls
        .lock()
        .iter()
        .filter(|c| c.0 == 1)
        .map(|c| c.1)
        .collect();
    assert_eq!(calls, vec![secs(0), secs(10), secs(70)]);
    let stats = bus.stats();
    let group = stats.group("payments").unwrap();
    assert_eq!((group.redriven, group.dead_letters), (2, 0));
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn sequenced_only_the_failed_key_waits_and_its_events_follow_in_order() {
    let (bus, gw) = setup(DeadLetterPolicy::Sequenced, secs(5));
    bus.publish(Payment { key: 1, seq: 1 }).await.unwrap();
    bus.publish(Payment { key: 1, seq: 2 }).await.unwrap();
    bus.publish(Payment { key: 2, seq: 3 }).await.unwrap();
    bus.publish(Payment { key: 1, seq: 4 }).await.unwrap();
    bus.settled().await;
    assert_eq!(gw.handled.take(), vec![(2, 3, secs(0))]);
    tokio::time::sleep(secs(11)).await;
    bus.settled().await;
    assert_eq!(
        gw.handled.take(),
        vec![(1, 1, secs(10)), (1, 2, secs(10)), (1, 4, secs(10))]
    );
    assert!(bus.dead_letters("payments").unwrap().is_empty());
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn after_the_last_delay_it_stays_and_permanent_errors_are_not_redelivered() {
    let (bus, gw) = setup(DeadLetterPolicy::Park, secs(3600));
    bus.publish(Payment { key: 1, seq: 1 }).await.unwrap();
    bus.publish(Payment { key: 3, seq: 99 }).await.unwrap();
    bus.settled().await;
    tokio::time::sleep(secs(600)).await;
    bus.settled().await;
    let calls = gw.calls.lock().clone();
    assert_eq!(
        calls.iter().filter(|c| c.0 == 1).count(),
        3,
        "first try and two redeliveries"
    );
    assert_eq!(
        calls.iter().filter(|c| c.0 == 99).count(),
        1,
        "permanent: not redelivered"
    );
    let letters = bus.dead_letters("payments").unwrap().list();
    assert_eq!(letters.len(), 2);
    let first = letters
        .iter()
        .find(|l| l.envelope.downcast_ref::<Payment>().unwrap().seq == 1)
        .unwrap();
    assert_eq!(first.redeliveries, 2);
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_cancels_scheduled_redeliveries_and_the_entry_stays() {
    let (bus, gw) = setup(DeadLetterPolicy::Park, secs(3600));
    bus.publish(Payment { key: 1, seq: 1 }).await.unwrap();
    bus.settled().await;
    let start = Instant::now();
    let report = bus.shutdown().await;
    assert!(
        Instant::now() - start < secs(10),
        "did not wait for the redelivery"
    );
    assert_eq!(report.abandoned, 0);
    tokio::time::sleep(secs(100)).await;
    assert_eq!(gw.calls.lock().len(), 1, "never redelivered");
    assert_eq!(bus.dead_letters("payments").unwrap().len(), 1);
}

#[tokio::test]
async fn at_most_once_refuses_redelivery_at_build() {
    let result = Bus::builder()
        .subscribe::<Payment, _>(
            Subscription::new("p")
                .delivery(DeliveryMode::AtMostOnce)
                .redelivery(Redelivery::after([Duration::from_secs(1)])),
            || Gateway {
                start: Instant::now(),
                healthy_at: Duration::ZERO,
                handled: Recorder::new(),
                calls: Arc::default(),
            },
        )
        .build();
    assert!(matches!(
        result,
        Err(tidings::BuildError::InvalidSetting(_))
    ));
}
