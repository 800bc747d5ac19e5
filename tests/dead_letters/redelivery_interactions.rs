//! Edge cases of delayed redelivery found in review: a cancelled manual redrive keeps the
//! scheduled redelivery, copies published with one id keep their own counts, dropping every
//! handle cancels what is scheduled, a discarded sequenced head releases the next event, and a
//! DropOldest topic refuses redelivery.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tidings::dead_letter::Redelivery;
use tidings::prelude::*;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = key, name = "redelivery_interactions.Payment")]
struct Payment {
    key: u64,
    seq: u32,
}

/// (key, seq, time since start, succeeded)
type Call = (u64, u32, Duration, bool);

/// key 1 fails until `healthy_at`; key 5 holds the worker for 30 s; others succeed.
#[derive(Clone)]
struct Gw {
    start: Instant,
    healthy_at: Duration,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Handler<Payment> for Gw {
    async fn handle(&mut self, e: &Envelope<Payment>, _: &Context) -> HandlerResult {
        let Payment { key, seq } = *e.event();
        let now = Instant::now() - self.start;
        if key == 5 {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let ok = !(key == 1 && now < self.healthy_at);
        self.calls.lock().push((key, seq, now, ok));
        if ok {
            Ok(())
        } else {
            Err(HandlerError::msg("gateway down"))
        }
    }
}

fn setup(policy: DeadLetterPolicy, healthy_at: Duration, capacity: usize) -> (Bus, Gw) {
    let gw = Gw {
        start: Instant::now(),
        healthy_at,
        calls: Arc::default(),
    };
    let g = gw.clone();
    let bus = Bus::builder()
        .topic(
            TopicConfig::new("payments")
                .partitions(1)
                .capacity(capacity),
        )
        .subscribe::<Payment, _>(
            Subscription::new("payments")
                .max_deliveries(1)
                .dead_letter(policy)
                .redelivery(Redelivery::after([
                    Duration::from_secs(10),
                    Duration::from_secs(60),
                ])),
            move || g.clone(),
        )
        .build()
        .unwrap();
    (bus, gw)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn calls_of(gw: &Gw, key: u64) -> Vec<(u32, Duration, bool)> {
    gw.calls
        .lock()
        .iter()
        .filter(|c| c.0 == key)
        .map(|c| (c.1, c.2, c.3))
        .collect()
}

/// A manual redrive that waits for room and is cancelled while the scheduled redelivery fires:
/// the entry goes back, and is redelivered later all the same.
async fn cancelled_manual_redrive(policy: DeadLetterPolicy) {
    let (bus, gw) = setup(policy, secs(0) + secs(5), 1);
    bus.publish(Payment { key: 1, seq: 1 }).await.unwrap(); // fails at 0 s, redelivery due at 10 s
    bus.settled().await;
    let dlq = bus.dead_letters("payments").unwrap();
    let seq = dlq.list()[0].seq;
    tokio::time::sleep(secs(1)).await;
    bus.publish(Payment { key: 5, seq: 2 }).await.unwrap(); // holds the worker 1..31 s
    tokio::time::sleep(Duration::from_millis(10)).await;
    bus.publish(Payment { key: 6, seq: 3 }).await.unwrap(); // fills the queue (capacity 1)
    tokio::time::sleep(secs(8)).await; // 9 s
                                       // An operator redrives by hand with a 2 s timeout: waits for room, times out at 11 s.
    let r = tokio::time::timeout(secs(2), dlq.redrive(seq)).await;
    assert!(r.is_err(), "timed out waiting for room");
    assert_eq!(dlq.len(), 1, "entry put back");
    tokio::time::sleep(secs(300)).await;
    bus.settled().await;
    println!(
        "calls key1 = {:?}; dlq = {:?}",
        calls_of(&gw, 1),
        dlq.list()
            .iter()
            .map(|l| (l.seq, l.redeliveries))
            .collect::<Vec<_>>()
    );
    assert!(
        calls_of(&gw, 1).len() >= 2,
        "the failed event should still be redelivered automatically (healthy from 5 s); calls: {:?}",
        calls_of(&gw, 1)
    );
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn park_a_cancelled_manual_redrive_keeps_the_scheduled_redelivery() {
    cancelled_manual_redrive(DeadLetterPolicy::Park).await;
}

#[tokio::test(start_paused = true)]
async fn sequenced_a_cancelled_manual_redrive_keeps_the_scheduled_redelivery() {
    cancelled_manual_redrive(DeadLetterPolicy::Sequenced).await;
}

#[tokio::test(start_paused = true)]
async fn copies_with_one_id_keep_their_own_redelivery_counts() {
    let (bus, gw) = setup(DeadLetterPolicy::Park, secs(3600), 16);
    let id = tidings::Uuid::now_v7();
    bus.publish_with(Payment { key: 1, seq: 1 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    bus.publish_with(Payment { key: 1, seq: 2 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    bus.settled().await;
    tokio::time::sleep(secs(11)).await;
    bus.settled().await;
    let dlq = bus.dead_letters("payments").unwrap();
    let counts: Vec<u32> = dlq.list().iter().map(|l| l.redeliveries).collect();
    assert_eq!(counts, vec![1, 1]);
    tokio::time::sleep(secs(1000)).await;
    bus.settled().await;
    assert_eq!(
        calls_of(&gw, 1).len(),
        6,
        "each copy: first try + 2 redeliveries"
    );
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_shuts_down_with_a_redelivery_scheduled() {
    let (bus, gw) = setup(DeadLetterPolicy::Park, secs(0) + secs(5), 16);
    bus.publish(Payment { key: 1, seq: 1 }).await.unwrap();
    bus.settled().await;
    let probe = bus.dead_letters("payments").unwrap();
    drop(bus);
    tokio::time::sleep(secs(100)).await;
    assert_eq!(
        calls_of(&gw, 1).len(),
        1,
        "not redelivered after the bus closed"
    );
    assert_eq!(probe.len(), 1);
    assert!(matches!(
        probe.redrive(probe.list()[0].seq).await,
        Err(tidings::dead_letter::DeadLetterError::Closed)
    ));
}

#[tokio::test(start_paused = true)]
async fn sequenced_a_discarded_head_releases_the_next_event_of_the_key() {
    let (bus, gw) = setup(DeadLetterPolicy::Sequenced, secs(5), 16);
    bus.publish(Payment { key: 1, seq: 1 }).await.unwrap();
    bus.publish(Payment { key: 1, seq: 2 }).await.unwrap();
    bus.settled().await;
    let dlq = bus.dead_letters("payments").unwrap();
    let head = dlq.list()[0].seq;
    dlq.discard(head, "bad").unwrap();
    tokio::time::sleep(secs(1)).await;
    bus.settled().await;
    // The next event of the key was released at once (it was never attempted): it fails too
    // (healthy from 5 s) and is redelivered after its own delay, then succeeds.
    tokio::time::sleep(secs(1000)).await;
    bus.settled().await;
    let calls = calls_of(&gw, 1);
    assert_eq!(
        calls.iter().filter(|c| c.0 == 1).count(),
        1,
        "the discarded head is not run"
    );
    assert!(
        calls.iter().any(|c| c.0 == 2 && c.2),
        "the next event ran and succeeded: {calls:?}"
    );
    assert!(dlq.is_empty());
    bus.shutdown().await;
}

#[tokio::test]
async fn redelivery_is_refused_on_a_drop_oldest_topic() {
    let gw = Gw {
        start: Instant::now(),
        healthy_at: secs(5),
        calls: Arc::default(),
    };
    let result = Bus::builder()
        .topic(
            TopicConfig::new("payments")
                .partitions(1)
                .capacity(1)
                .overflow(tidings::Overflow::DropOldest),
        )
        .subscribe::<Payment, _>(
            Subscription::new("payments")
                .max_deliveries(1)
                .redelivery(Redelivery::after([secs(10)])),
            move || gw.clone(),
        )
        .build();
    assert!(matches!(
        result,
        Err(tidings::BuildError::InvalidSetting(_))
    ));
}
