//! Payments: captures the amount of each placed order (declines above a limit) and refunds it
//! if the order is cancelled. One group handles both event types of the `orders` topic, so a
//! refund never comes before its capture.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;

use crate::orders::{OrderCancelled, OrderPlaced};

/// The amount was captured.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = order_id)]
pub struct PaymentCaptured {
    pub order_id: u64,
    pub cents: u64,
}

/// The card was declined.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = order_id)]
pub struct PaymentDeclined {
    pub order_id: u64,
}

/// A captured amount was given back.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = order_id)]
pub struct PaymentRefunded {
    pub order_id: u64,
    pub cents: u64,
}

/// The module's state: the ledger of captured amounts, and the card limit.
#[derive(Clone)]
pub struct Ledger {
    pub limit_cents: u64,
    captured: Arc<Mutex<HashMap<u64, u64>>>,
}

impl Ledger {
    pub fn new(limit_cents: u64) -> Self {
        Ledger {
            limit_cents,
            captured: Arc::default(),
        }
    }

    /// What is kept: the sum of captured amounts not refunded.
    pub fn balance(&self) -> u64 {
        self.captured.lock().unwrap().values().sum()
    }
}

pub struct Cashier {
    ledger: Ledger,
}

impl Cashier {
    pub fn new(ledger: &Ledger) -> Self {
        Cashier {
            ledger: ledger.clone(),
        }
    }
}

impl Handler<OrderPlaced> for Cashier {
    async fn handle(&mut self, e: &Envelope<OrderPlaced>, ctx: &Context) -> HandlerResult {
        let order = e.event();
        if order.cents > self.ledger.limit_cents {
            ctx.publish(PaymentDeclined {
                order_id: order.order_id,
            })
            .await?;
            return Ok(());
        }
        // Idempotent: a redelivered OrderPlaced captures once.
        self.ledger
            .captured
            .lock()
            .unwrap()
            .insert(order.order_id, order.cents);
        let captured = PaymentCaptured {
            order_id: order.order_id,
            cents: order.cents,
        };
        ctx.publish(captured).await?;
        Ok(())
    }
}

impl Handler<OrderCancelled> for Cashier {
    async fn handle(&mut self, e: &Envelope<OrderCancelled>, ctx: &Context) -> HandlerResult {
        let order_id = e.event().order_id;
        let refunded = self.ledger.captured.lock().unwrap().remove(&order_id);
        if let Some(cents) = refunded {
            ctx.publish(PaymentRefunded { order_id, cents }).await?;
        }
        Ok(())
    }
}

/// The whole module's wiring.
pub fn module(ledger: Ledger) -> Module<Ledger> {
    Module::with_state("payments", ledger)
        .topic(TopicConfig::new("payments").partitions(4))
        .subscribe::<(OrderPlaced, OrderCancelled), _>("payments", Cashier::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings::testing::TestContext;

    fn placed(order_id: u64, cents: u64) -> Envelope<OrderPlaced> {
        Envelope::new(OrderPlaced {
            order_id,
            customer: "ada".into(),
            sku: "book".into(),
            qty: 1,
            cents,
        })
    }

    #[tokio::test]
    async fn captures_under_the_limit_and_declines_above_it() {
        let ledger = Ledger::new(1_000);
        let mut cashier = Cashier::new(&ledger);
        let mut ctx = TestContext::new();
        ctx.call(&mut cashier, &placed(1, 999)).await.unwrap();
        ctx.call(&mut cashier, &placed(2, 1_001)).await.unwrap();
        assert_eq!(ctx.published_of::<PaymentCaptured>()[0].event().order_id, 1);
        assert_eq!(ctx.published_of::<PaymentDeclined>()[0].event().order_id, 2);
        assert_eq!(ledger.balance(), 999);
    }

    #[tokio::test]
    async fn a_cancelled_order_is_refunded_once() {
        let ledger = Ledger::new(1_000);
        let mut cashier = Cashier::new(&ledger);
        let mut ctx = TestContext::new();
        ctx.call(&mut cashier, &placed(1, 300)).await.unwrap();
        let cancelled = Envelope::new(OrderCancelled {
            order_id: 1,
            reason: "out of stock".into(),
        });
        ctx.call(&mut cashier, &cancelled).await.unwrap();
        ctx.call(&mut cashier, &cancelled).await.unwrap();
        assert_eq!(ctx.published_of::<PaymentRefunded>().len(), 1);
        assert_eq!(ledger.balance(), 0);
    }
}
