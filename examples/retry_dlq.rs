//! Retries, the dead-letter queue and deduplication around a payment handler.
//!
//! - The payment gateway is flaky: for some orders it answers `503` to the first two calls.
//!   `Retry` backs off and tries again; those orders are paid on the third attempt.
//! - An order with no amount is invalid: the handler returns a permanent error, which is not
//!   retried and goes straight to the dead-letter queue.
//! - Then the gateway goes down and stops answering: `Timeout` cuts each attempt off, `Retry`
//!   gives up after the last one, and the orders wait in the dead-letter queue.
//! - A client publishes the same order twice with the same event id: `Dedup` charges it once.
//! - Once the gateway is back, `redrive_all` sends the dead letters back to the group; the
//!   invalid order fails again and is discarded by hand.
//!
//! Run with `cargo run --example retry_dlq`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tidings::dead_letter::DeadLetters;
use tidings::middleware::{Dedup, DedupWindow, Timeout};
use tidings::prelude::*;
use tidings::{ErrorKind, Uuid};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order_id)]
struct OrderPlaced {
    order_id: u64,
    cents: u64,
}

/// Orders whose first two gateway calls fail with a `503`.
const FLAKY: [u64; 2] = [2, 5];

/// A stand-in for a remote payment gateway, shared by every partition's handler.
#[derive(Default)]
struct Gateway {
    /// While true the gateway does not answer at all.
    down: AtomicBool,
    /// Calls per order, for the flaky ones.
    calls: Mutex<HashMap<u64, u32>>,
    /// Orders charged, in order.
    charged: Mutex<Vec<u64>>,
}

impl Gateway {
    async fn charge(&self, order_id: u64) -> Result<(), &'static str> {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(order_id).or_default();
            *n += 1;
            *n
        };
        if self.down.load(Ordering::SeqCst) {
            println!("[gateway] order {order_id}: call {call}, no answer");
            // The Timeout layer ends the attempt.
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        if FLAKY.contains(&order_id) && call <= 2 {
            return Err("gateway: 503 Service Unavailable");
        }
        self.charged.lock().unwrap().push(order_id);
        Ok(())
    }
}

struct Payments {
    gateway: Arc<Gateway>,
}

impl Handler<OrderPlaced> for Payments {
    async fn handle(&mut self, e: &Envelope<OrderPlaced>, _: &Context) -> Result<(), HandlerError> {
        let order = e.event();
        if order.cents == 0 {
            // Retrying will not give the order an amount.
            return Err(HandlerError::permanent(format!(
                "order {} has no amount",
                order.order_id
            )));
        }
        match self.gateway.charge(order.order_id).await {
            Ok(()) => {
                println!(
                    "[payments] order {} charged {} cents (attempt {})",
                    order.order_id,
                    order.cents,
                    e.attempt()
                );
                Ok(())
            }
            Err(err) => {
                println!(
                    "[payments] order {} attempt {}: {err}",
                    order.order_id,
                    e.attempt()
                );
                Err(HandlerError::transient(err))
            }
        }
    }
}

fn print_dead_letters(dlq: &DeadLetters, start: SystemTime) {
    let since = |t: SystemTime| t.duration_since(start).unwrap_or_default().as_millis();
    println!("dead letters of \"payments\": {}", dlq.len());
    for letter in dlq.list() {
        let order = letter.envelope.downcast_ref::<OrderPlaced>().unwrap();
        println!(
            "  #{} order {}: {:?} after {} attempt(s), failed at +{} ms .. +{} ms: {}",
            letter.seq,
            order.order_id,
            letter.kind,
            letter.attempts,
            since(letter.first_failure),
            since(letter.last_failure),
            letter.error
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let start = SystemTime::now();
    let gateway = Arc::new(Gateway::default());
    let payments = Subscription::new("payments")
        // Innermost: each attempt gets 50 ms.
        .layer(Timeout::new(Duration::from_millis(50)))
        // Up to 3 attempts, 10 ms then 20 ms apart, each delay cut by up to half at random.
        .layer(
            Retry::new(3)
                .backoff(Duration::from_millis(10), Duration::from_millis(100))
                .jitter(0.5),
        )
        // Outermost: an event id this group already handled is skipped before any attempt.
        .layer(Dedup::new(DedupWindow::new()));
    let bus = Bus::builder()
        .topic(TopicConfig::new("orders").partitions(4))
        .subscribe::<OrderPlaced, _>(payments, {
            let gateway = Arc::clone(&gateway);
            move || Payments {
                gateway: Arc::clone(&gateway),
            }
        })
        .build()?;
    let dlq = bus.dead_letters("payments")?;

    println!("-- the gateway is flaky; order 4 is invalid");
    let mut invalid = None;
    for order_id in 1..=6 {
        let cents = if order_id == 4 { 0 } else { 1000 * order_id };
        let receipt = bus.publish(OrderPlaced { order_id, cents }).await?;
        if cents == 0 {
            invalid = Some(receipt.id);
        }
    }
    let invalid = invalid.unwrap();
    bus.settled().await;
    print_dead_letters(&dlq, start);
    assert_eq!(dlq.len(), 1, "only the invalid order is dead-lettered");

    println!("-- a client sends order 7 twice, with the same event id");
    let request_id = Uuid::now_v7();
    for _ in 0..2 {
        let order = OrderPlaced {
            order_id: 7,
            cents: 7000,
        };
        bus.publish_with(order, PublishOptions::new().id(request_id))
            .await?;
    }
    bus.settled().await;
    let calls = gateway.calls.lock().unwrap()[&7];
    println!("order 7 reached the gateway {calls} time(s)");
    assert_eq!(calls, 1);

    println!("-- the gateway goes down");
    gateway.down.store(true, Ordering::SeqCst);
    for order_id in [8, 9] {
        bus.publish(OrderPlaced {
            order_id,
            cents: 1000 * order_id,
        })
        .await?;
    }
    bus.settled().await;
    print_dead_letters(&dlq, start);
    assert_eq!(dlq.len(), 3);
    for letter in dlq.list().iter().filter(|l| l.kind == ErrorKind::Transient) {
        assert_eq!(letter.attempts, 3);
        assert!(letter.error.starts_with("timed out"), "{}", letter.error);
    }

    println!("-- the gateway is back: redrive every dead letter");
    gateway.down.store(false, Ordering::SeqCst);
    let sent = dlq.redrive_all().await?;
    bus.settled().await;
    println!("redriven: {sent}");
    print_dead_letters(&dlq, start);
    // The invalid order failed again, permanently, and came back under a new number.
    assert_eq!(dlq.len(), 1);
    let letter = dlq
        .find(invalid)
        .expect("the invalid order is dead-lettered");
    assert_eq!((letter.kind, letter.attempts), (ErrorKind::Permanent, 1));
    dlq.discard(
        letter.seq,
        "no amount; the customer was asked to order again",
    )?;
    assert!(dlq.is_empty());

    let stats = bus.stats();
    let group = stats.group("payments").unwrap();
    println!(
        "payments: handled {}, failed {}, dead letters {} (ever {}), redriven {}, discarded {}",
        group.handled,
        group.failed,
        group.dead_letters,
        group.dead_lettered,
        group.redriven,
        group.discarded
    );
    let mut charged = gateway.charged.lock().unwrap().clone();
    charged.sort_unstable();
    println!("charged orders: {charged:?}");

    // Every valid order was charged once; order 7's duplicate was skipped (and acknowledged).
    assert_eq!(charged, [1, 2, 3, 5, 6, 7, 8, 9]);
    // 8 charges, the duplicate, and no more.
    assert_eq!(group.handled, 9);
    // Order 4 twice (first delivery and redrive), orders 8 and 9 before the redrive.
    assert_eq!(group.failed, 4);
    assert_eq!(group.dead_lettered, 4);
    assert_eq!(group.redriven, 3);
    assert_eq!(group.discarded, 1);
    assert_eq!(group.dead_letters, 0);
    // The flaky orders took three calls each.
    let calls = gateway.calls.lock().unwrap().clone();
    assert_eq!((calls[&2], calls[&5]), (3, 3));

    let report = bus.shutdown().await;
    println!(
        "shut down: {} handled, {} failed, {} dropped",
        report.handled, report.failed, report.dropped
    );
    Ok(())
}
