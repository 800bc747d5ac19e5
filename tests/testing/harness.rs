//! The test harness: handlers called directly with a `TestContext`, and whole buses settled
//! deterministically on tokio's paused clock.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::testing::{events_of, Recorder, TestContext};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = order_id)]
struct PaymentRequested {
    order_id: u64,
    cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = order_id)]
struct PaymentSettled {
    order_id: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = order_id)]
struct PaymentDeclined {
    order_id: u64,
    reason: String,
}

/// Settles after a (simulated) ten-minute bank delay; declines large amounts.
struct Bank {
    limit: u64,
    settled: Recorder<u64>,
}

impl Handler<PaymentRequested> for Bank {
    async fn handle(
        &mut self,
        e: &Envelope<PaymentRequested>,
        ctx: &Context,
    ) -> Result<(), HandlerError> {
        let ev = e.event();
        if ev.cents > self.limit {
            ctx.publish(PaymentDeclined {
                order_id: ev.order_id,
                reason: "over limit".into(),
            })
            .await?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
        self.settled.push(ev.order_id);
        ctx.publish(PaymentSettled {
            order_id: ev.order_id,
        })
        .await?;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_handler_can_be_called_directly_and_what_it_publishes_is_recorded() {
    let mut bank = Bank {
        limit: 100,
        settled: Recorder::new(),
    };
    let mut ctx = TestContext::for_group("bank");
    assert_eq!(ctx.context().group(), "bank");

    let small = Envelope::new(PaymentRequested {
        order_id: 1,
        cents: 50,
    });
    let large = Envelope::new(PaymentRequested {
        order_id: 2,
        cents: 500,
    });
    ctx.call(&mut bank, &small).await.unwrap();
    ctx.call(&mut bank, &large).await.unwrap();

    assert_eq!(ctx.published_of::<PaymentSettled>().len(), 1);
    let declined = ctx.published_of::<PaymentDeclined>();
    assert_eq!(declined[0].event().order_id, 2);
    assert_eq!(declined[0].correlation_id(), large.correlation_id());
    assert_eq!(declined[0].causation_id(), Some(large.id()));
    assert_eq!(ctx.published().len(), 2);
    ctx.clear();
    assert!(ctx.published().is_empty());
    assert_eq!(bank.settled.snapshot(), vec![1]);
}

struct Auditor(Recorder<&'static str>);
impl AnyHandler for Auditor {
    async fn handle(&mut self, e: &AnyEnvelope, ctx: &Context) -> Result<(), HandlerError> {
        self.0.push(e.name());
        if ctx.is_shutting_down() {
            self.0.push("shutting down");
        }
        Ok(())
    }
}

#[tokio::test]
async fn an_any_handler_can_be_called_directly() {
    let seen = Recorder::new();
    let mut auditor = Auditor(seen.clone());
    let mut ctx = TestContext::new();
    let env: AnyEnvelope = Envelope::new(PaymentSettled { order_id: 1 }).into();
    ctx.call_any(&mut auditor, &env).await.unwrap();
    ctx.begin_shutdown();
    ctx.call_any(&mut auditor, &env).await.unwrap();
    assert_eq!(
        seen.snapshot(),
        vec!["PaymentSettled", "PaymentSettled", "shutting down"]
    );
}

#[tokio::test(start_paused = true)]
async fn settled_waits_for_whole_causal_chains_on_the_paused_clock() {
    let settled = Recorder::new();
    let audit = Recorder::new();
    let bus = Bus::builder()
        .record(true)
        .subscribe::<PaymentRequested, _>("bank", {
            let settled = settled.clone();
            move || Bank {
                limit: 100,
                settled: settled.clone(),
            }
        })
        .subscribe_all("payments", "audit", {
            let audit = audit.clone();
            move || Auditor(audit.clone())
        })
        .build()
        .unwrap();

    let started = tokio::time::Instant::now();
    for order_id in 1..=3 {
        bus.publish(PaymentRequested {
            order_id,
            cents: order_id * 60,
        })
        .await
        .unwrap();
    }
    bus.settled().await;
    // Ten simulated minutes per settled payment passed instantly; nothing is left in flight.
    assert!(started.elapsed() >= Duration::from_secs(600));
    assert_eq!(bus.stats().pending, 0);
    assert_eq!(settled.snapshot(), vec![1]);
    let published = bus.published();
    assert_eq!(events_of::<PaymentRequested>(&published).len(), 3);
    assert_eq!(events_of::<PaymentSettled>(&published).len(), 1);
    assert_eq!(events_of::<PaymentDeclined>(&published).len(), 2);
    // The auditor saw every event of the topic, follow-ups included.
    assert_eq!(audit.len(), 6);
    bus.shutdown().await;
}
