//! Quickstart: one event type, two consumer groups, a follow-up event, a command, shutdown.
//!
//! Run with `cargo run --example quickstart`.

use serde::{Deserialize, Serialize};
use tidings::prelude::*;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order_id)]
struct OrderPlaced {
    order_id: u64,
    cents: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "mail", key = order_id)]
struct ConfirmationSent {
    order_id: u64,
}

/// Keeps a running total: its own state, no locks. Each partition has its own instance.
#[derive(Default)]
struct Revenue {
    total_cents: u64,
}

impl Handler<OrderPlaced> for Revenue {
    async fn handle(&mut self, e: &Envelope<OrderPlaced>, _: &Context) -> Result<(), HandlerError> {
        self.total_cents += e.event().cents;
        println!(
            "[revenue] order {} on partition {} → this partition's total {} cents",
            e.event().order_id,
            e.partition(),
            self.total_cents
        );
        Ok(())
    }
}

/// Sends a confirmation and announces it with a follow-up event.
struct Mailer;

impl Handler<OrderPlaced> for Mailer {
    async fn handle(
        &mut self,
        e: &Envelope<OrderPlaced>,
        ctx: &Context,
    ) -> Result<(), HandlerError> {
        let order_id = e.event().order_id;
        ctx.publish(ConfirmationSent { order_id }).await?;
        Ok(())
    }
}

struct Audit;

impl Handler<ConfirmationSent> for Audit {
    async fn handle(
        &mut self,
        e: &Envelope<ConfirmationSent>,
        _: &Context,
    ) -> Result<(), HandlerError> {
        println!(
            "[audit] confirmation for order {} (correlation {}, caused by {:?})",
            e.event().order_id,
            e.correlation_id(),
            e.causation_id()
        );
        Ok(())
    }
}

/// A command with exactly one handler and a typed reply.
struct Quote {
    cents: u64,
}

impl Command for Quote {
    type Reply = u64;
}

struct TaxOffice;

impl CommandHandler<Quote> for TaxOffice {
    async fn handle(&mut self, q: Quote, _: &Context) -> Result<u64, HandlerError> {
        Ok(q.cents * 120 / 100)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = Bus::builder()
        .topic(TopicConfig::new("orders").partitions(4))
        .subscribe::<OrderPlaced, _>("revenue", Revenue::default)
        .subscribe::<OrderPlaced, _>("mailer", || Mailer)
        .subscribe::<ConfirmationSent, _>("audit", || Audit)
        .command_handler::<Quote, _>(|| TaxOffice)
        .build()?;

    for order_id in 1..=5 {
        let cents = bus
            .request(Quote {
                cents: 1000 * order_id,
            })
            .await?;
        bus.publish(OrderPlaced { order_id, cents }).await?;
    }

    let report = bus.shutdown().await;
    println!(
        "shut down: {} handled, {} failed, {} dropped",
        report.handled, report.failed, report.dropped
    );
    Ok(())
}
