//! Edge cases of the middleware chain, the dead-letter queue and the worker loop, found in
//! review: panics before a future exists, cancelled redrives, sequenced release order, lag,
//! restarts cut short by a timeout.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::dead_letter::DeadLetterError;
use tidings::prelude::*;
use tidings::testing::Recorder;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = key, name = "redrives_releases_and_panics.Order")]
struct Order {
    key: u64,
    seq: u32,
}

/// Fails while `healthy` is false (permanent errors); records the seqs it handled.
#[derive(Clone)]
struct Ship {
    healthy: Arc<AtomicBool>,
    handled: Recorder<u32>,
}

impl Handler<Order> for Ship {
    async fn handle(&mut self, e: &Envelope<Order>, _: &Context) -> HandlerResult {
        if !self.healthy.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent("offline"));
        }
        self.handled.push(e.event().seq);
        Ok(())
    }
}

fn ship() -> Ship {
    Ship {
        healthy: Arc::new(AtomicBool::new(false)),
        handled: Recorder::new(),
    }
}

/// `Ship`, but events numbered 100 and up wait for a permit of the gate first (to hold the
/// worker while a test fills the queue).
#[derive(Clone)]
struct Slow(Ship, Arc<tokio::sync::Semaphore>);

impl Handler<Order> for Slow {
    async fn handle(&mut self, e: &Envelope<Order>, ctx: &Context) -> HandlerResult {
        if e.event().seq >= 100 {
            self.1.acquire().await.unwrap().forget();
        }
        self.0.handle(e, ctx).await
    }
}

/// A bus with one group, "shipping", on the "orders" topic.
fn orders_bus<H>(handler: H, topic: TopicConfig, subscription: Subscription) -> Bus
where
    H: Handler<Order> + Clone + Sync,
{
    Bus::builder()
        .topic(topic)
        .subscribe::<Order, _>(subscription, move || handler.clone())
        .build()
        .unwrap()
}

fn sequenced_bus(s: &Ship) -> Bus {
    orders_bus(
        s.clone(),
        TopicConfig::new("orders").partitions(1),
        Subscription::new("shipping").dead_letter(DeadLetterPolicy::Sequenced),
    )
}

// ---------------------------------------------------------------------------------------------
// 1. A middleware whose `call` panics before returning its future kills the worker task.

#[derive(Clone)]
struct PanicsEagerly;

impl Middleware for PanicsEagerly {
    #[allow(clippy::manual_async_fn)]
    fn call<'a>(
        &'a mut self,
        _env: &'a AnyEnvelope,
        _next: Next<'a>,
    ) -> impl Future<Output = HandlerResult> + Send + 'a {
        panic!("middleware broke before returning its future");
        #[allow(unreachable_code)]
        async {
            Ok(())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_middleware_panicking_before_its_future_is_supervised() {
    let s = ship();
    s.healthy.store(true, Ordering::SeqCst);
    let bus = orders_bus(
        s.clone(),
        TopicConfig::new("orders").partitions(1),
        Subscription::new("shipping").layer(PanicsEagerly),
    );
    bus.publish(Order { key: 1, seq: 1 }).await.unwrap();
    // Expected: the panic fails the event (dead-lettered) and the bus settles.
    let settled = tokio::time::timeout(Duration::from_secs(60), bus.settled()).await;
    assert!(
        settled.is_ok(),
        "the bus never settles: the worker task died"
    );
    assert_eq!(bus.dead_letters("shipping").unwrap().len(), 1);
    bus.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 2. A redrive that is cancelled while it waits for room loses the event.

#[tokio::test(start_paused = true)]
async fn a_cancelled_redrive_does_not_lose_the_event() {
    let s = ship();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let bus = orders_bus(
        Slow(s.clone(), gate.clone()),
        TopicConfig::new("orders").partitions(1).capacity(1),
        Subscription::new("shipping").batch_size(1),
    );
    bus.publish(Order { key: 1, seq: 1 }).await.unwrap();
    bus.settled().await;
    s.healthy.store(true, Ordering::SeqCst);
    // One event in the handler (blocked), one in the queue: the queue is full.
    bus.publish(Order { key: 2, seq: 100 }).await.unwrap();
    bus.publish(Order { key: 2, seq: 101 }).await.unwrap();
    let dlq = bus.dead_letters("shipping").unwrap();
    let seq = dlq.list()[0].seq;
    let attempt = tokio::time::timeout(Duration::from_millis(10), dlq.redrive(seq)).await;
    assert!(
        attempt.is_err(),
        "the redrive waited for room and was given up"
    );
    gate.add_permits(2);
    bus.settled().await;
    // Expected: the entry is still in the DLQ (or was delivered); observed: it is gone.
    let handled = s.handled.take();
    assert!(
        dlq.len() == 1 || handled.contains(&1),
        "event lost: dlq len {}, handled {:?}",
        dlq.len(),
        handled
    );
    bus.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Sequenced: while a head is being released, a follower can be redriven and overtakes it.

#[tokio::test]
async fn sequenced_a_follower_cannot_be_redriven_while_its_head_is_released() {
    let s = ship();
    let bus = sequenced_bus(&s);
    for seq in 1..=3 {
        bus.publish(Order { key: 1, seq }).await.unwrap();
    }
    bus.settled().await;
    let dlq = bus.dead_letters("shipping").unwrap();
    let letters = dlq.list();
    let (head, follower) = (letters[0].seq, letters[1].seq);
    s.healthy.store(true, Ordering::SeqCst);
    dlq.redrive(head).await.unwrap();
    // The head is on its way back; its follower is still parked behind it.
    let second = dlq.redrive(follower).await;
    bus.settled().await;
    assert_eq!(
        s.handled.take(),
        vec![1, 2, 3],
        "key order broken (second redrive returned {second:?})"
    );
    assert!(matches!(second, Err(DeadLetterError::ParkedBehind { .. })));
    bus.shutdown().await;
}

#[tokio::test]
async fn sequenced_discard_then_redrive_all_while_releasing_keeps_key_order() {
    let s = ship();
    let bus = sequenced_bus(&s);
    for seq in 1..=4 {
        bus.publish(Order { key: 1, seq }).await.unwrap();
    }
    bus.settled().await;
    let dlq = bus.dead_letters("shipping").unwrap();
    let letters = dlq.list();
    s.healthy.store(true, Ordering::SeqCst);
    dlq.redrive(letters[0].seq).await.unwrap(); // seq 1 on its way
    dlq.discard(letters[1].seq, "cancelled").unwrap(); // seq 2 dropped
                                                       // Only heads are redriven; seq 3 is not one (it waits behind seq 1, in flight).
    let sent = dlq.redrive_all().await.unwrap();
    bus.settled().await;
    assert_eq!(s.handled.take(), vec![1, 3, 4], "redrive_all sent {sent}");
    bus.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Sequenced: released followers count as handled without being delivered: lag under-reads.

#[tokio::test]
async fn sequenced_released_followers_keep_the_lag_right() {
    let s = ship();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let bus = orders_bus(
        Slow(s.clone(), gate.clone()),
        TopicConfig::new("orders").partitions(1),
        Subscription::new("shipping").dead_letter(DeadLetterPolicy::Sequenced),
    );
    for seq in 1..=3 {
        bus.publish(Order { key: 1, seq }).await.unwrap();
    }
    bus.settled().await;
    s.healthy.store(true, Ordering::SeqCst);
    let dlq = bus.dead_letters("shipping").unwrap();
    dlq.redrive(dlq.list()[0].seq).await.unwrap();
    bus.settled().await;
    assert_eq!(s.handled.take(), vec![1, 2, 3]);
    // Two events of another key: one in the handler, one queued.
    bus.publish(Order { key: 2, seq: 100 }).await.unwrap();
    bus.publish(Order { key: 2, seq: 101 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stats = bus.stats();
    let g = stats.group("shipping").unwrap();
    assert_eq!(
        g.lag, 2,
        "delivered {} handled {} failed {}",
        g.delivered, g.handled, g.failed
    );
    gate.add_permits(2);
    bus.settled().await;
    bus.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 5. A Timeout that fires during the restart backoff after a panic: the panicked handler is kept.

#[tokio::test(start_paused = true)]
async fn a_panicked_handler_is_restarted_even_when_a_timeout_fires_in_the_backoff() {
    #[derive(Clone)]
    struct Fragile {
        poisoned: bool,
        log: Recorder<(u32, bool)>,
    }
    impl Handler<Order> for Fragile {
        async fn handle(&mut self, e: &Envelope<Order>, _: &Context) -> HandlerResult {
            self.log.push((e.event().seq, self.poisoned));
            if e.event().seq == 1 {
                self.poisoned = true;
                panic!("boom");
            }
            Ok(())
        }
    }
    let made = Arc::new(AtomicU32::new(0));
    let log = Recorder::new();
    let bus = {
        let (made, log) = (made.clone(), log.clone());
        Bus::builder()
            .topic(TopicConfig::new("orders").partitions(1))
            .subscribe::<Order, _>(
                Subscription::new("shipping")
                    .restart_backoff(RestartBackoff::new(
                        Duration::from_millis(100),
                        Duration::from_secs(1),
                    ))
                    .layer(Timeout::new(Duration::from_millis(10)))
                    .max_deliveries(1),
                move || {
                    made.fetch_add(1, Ordering::SeqCst);
                    Fragile {
                        poisoned: false,
                        log: log.clone(),
                    }
                },
            )
            .build()
            .unwrap()
    };
    bus.publish(Order { key: 1, seq: 1 }).await.unwrap();
    bus.publish(Order { key: 1, seq: 2 }).await.unwrap();
    bus.settled().await;
    let stats = bus.stats();
    let g = stats.group("shipping").unwrap();
    assert_eq!(g.panics, 1);
    assert_eq!(
        log.take(),
        vec![(1, false), (2, false)],
        "seq 2 went to the panicked instance (restarts {}, factory calls {})",
        g.restarts,
        made.load(Ordering::SeqCst)
    );
    bus.shutdown().await;
}

// 2b. Sequenced: a cancelled redrive also leaves the key "releasing" forever.
#[tokio::test(start_paused = true)]
async fn sequenced_a_cancelled_redrive_does_not_park_the_key_forever() {
    let s = ship();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let bus = orders_bus(
        Slow(s.clone(), gate.clone()),
        TopicConfig::new("orders").partitions(1).capacity(1),
        Subscription::new("shipping")
            .batch_size(1)
            .dead_letter(DeadLetterPolicy::Sequenced),
    );
    bus.publish(Order { key: 1, seq: 1 }).await.unwrap();
    bus.settled().await;
    s.healthy.store(true, Ordering::SeqCst);
    bus.publish(Order { key: 2, seq: 100 }).await.unwrap();
    bus.publish(Order { key: 2, seq: 101 }).await.unwrap();
    let dlq = bus.dead_letters("shipping").unwrap();
    let seq = dlq.list()[0].seq;
    let _ = tokio::time::timeout(Duration::from_millis(10), dlq.redrive(seq)).await;
    gate.add_permits(2);
    bus.settled().await;
    bus.publish(Order { key: 1, seq: 2 }).await.unwrap();
    bus.settled().await;
    // The cancelled redrive left the head in the queue: the key stays parked behind it (not
    // behind a lost event), and redriving it releases both in order.
    let letters = dlq.list();
    let shape: Vec<(u32, bool)> = letters
        .iter()
        .map(|l| {
            (
                l.envelope.downcast_ref::<Order>().unwrap().seq,
                l.parked_behind.is_none(),
            )
        })
        .collect();
    assert_eq!(shape, vec![(1, true), (2, false)]);
    assert_eq!(s.handled.take(), vec![100, 101]);
    dlq.redrive(letters[0].seq).await.unwrap();
    bus.settled().await;
    assert_eq!(s.handled.take(), vec![1, 2]);
    bus.shutdown().await;
}
