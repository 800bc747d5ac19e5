//! Request/reply: one handler per command, typed replies, timeouts, clear errors.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::testing::Recorder;
use tidings::{BuildError, RequestError};

struct Reserve {
    sku: &'static str,
    quantity: u32,
}

impl Command for Reserve {
    type Reply = u32;
}

/// Stock keeper with its own state.
struct Stock {
    left: u32,
}

impl CommandHandler<Reserve> for Stock {
    async fn handle(&mut self, cmd: Reserve, _: &Context) -> Result<u32, HandlerError> {
        if cmd.sku == "panic" {
            panic!("stock keeper crashed");
        }
        if cmd.quantity > self.left {
            return Err(HandlerError::msg(format!("only {} left", self.left)));
        }
        self.left -= cmd.quantity;
        Ok(self.left)
    }
}

struct Slow;
impl Command for Slow {
    type Reply = ();
}
struct Sleeper;
impl CommandHandler<Slow> for Sleeper {
    async fn handle(&mut self, _: Slow, _: &Context) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(())
    }
}

struct Unhandled;
impl Command for Unhandled {
    type Reply = ();
}

#[tokio::test]
async fn a_command_gets_its_typed_reply_from_its_one_stateful_handler() {
    let bus = Bus::builder()
        .command_handler::<Reserve, _>(|| Stock { left: 10 })
        .build()
        .unwrap();
    assert_eq!(
        bus.request(Reserve {
            sku: "a",
            quantity: 3
        })
        .await,
        Ok(7)
    );
    assert_eq!(
        bus.request(Reserve {
            sku: "a",
            quantity: 4
        })
        .await,
        Ok(3)
    );
    let err = bus
        .request(Reserve {
            sku: "a",
            quantity: 4,
        })
        .await
        .unwrap_err();
    assert!(matches!(&err, RequestError::Failed { message, .. } if message == "only 3 left"));
    bus.shutdown().await;
}

#[tokio::test]
async fn a_command_without_handler_is_an_error_not_a_hang() {
    let bus = Bus::builder().build().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), bus.request(Unhandled))
        .await
        .expect("must not hang")
        .unwrap_err();
    assert!(matches!(err, RequestError::NoHandler { command } if command.contains("Unhandled")));
}

#[tokio::test]
async fn two_handlers_for_one_command_are_a_build_error() {
    let err = Bus::builder()
        .command_handler::<Reserve, _>(|| Stock { left: 1 })
        .command_handler::<Reserve, _>(|| Stock { left: 2 })
        .build()
        .unwrap_err();
    assert!(
        matches!(err, BuildError::DuplicateCommandHandler { command } if command.contains("Reserve"))
    );
    assert!(err.to_string().contains("exactly one"));
}

#[tokio::test(start_paused = true)]
async fn a_request_times_out_with_a_clear_error() {
    let bus = Bus::builder()
        .request_timeout(Duration::from_secs(5))
        .command_handler::<Slow, _>(|| Sleeper)
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = bus.request(Slow).await.unwrap_err();
    assert!(
        matches!(err, RequestError::Timeout { timeout, .. } if timeout == Duration::from_secs(5))
    );
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    let err = bus
        .request_timeout(Slow, Duration::from_millis(10))
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Timeout { .. }));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_command_handler_answers_panicked_and_restarts_fresh() {
    let bus = Bus::builder()
        .command_handler::<Reserve, _>(|| Stock { left: 10 })
        .build()
        .unwrap();
    assert_eq!(
        bus.request(Reserve {
            sku: "a",
            quantity: 4
        })
        .await,
        Ok(6)
    );
    let err = bus
        .request(Reserve {
            sku: "panic",
            quantity: 1,
        })
        .await
        .unwrap_err();
    assert!(matches!(&err, RequestError::Panicked { message, .. } if message.contains("crashed")));
    // Fresh state from the factory.
    assert_eq!(
        bus.request(Reserve {
            sku: "a",
            quantity: 1
        })
        .await,
        Ok(9)
    );
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = id)]
struct OrderPlaced {
    id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "stock", key = id)]
struct StockReserved {
    id: u64,
    left: u32,
}

struct Checkout;
impl Handler<OrderPlaced> for Checkout {
    async fn handle(
        &mut self,
        e: &Envelope<OrderPlaced>,
        ctx: &Context,
    ) -> Result<(), HandlerError> {
        let left = ctx
            .request(Reserve {
                sku: "a",
                quantity: 1,
            })
            .await
            .map_err(HandlerError::transient)?;
        ctx.publish(StockReserved {
            id: e.event().id,
            left,
        })
        .await?;
        Ok(())
    }
}

struct CorrelationSpy(Recorder<Option<tidings::Uuid>>);
impl CommandHandler<Reserve> for CorrelationSpy {
    async fn handle(&mut self, _: Reserve, ctx: &Context) -> Result<u32, HandlerError> {
        self.0.push(ctx.correlation_id());
        Ok(1)
    }
}

#[tokio::test]
async fn handlers_can_send_commands_and_the_correlation_id_flows_through() {
    let spy = Recorder::new();
    let bus = Bus::builder()
        .record(true)
        .subscribe::<OrderPlaced, _>("checkout", || Checkout)
        .command_handler::<Reserve, _>({
            let spy = spy.clone();
            move || CorrelationSpy(spy.clone())
        })
        .build()
        .unwrap();
    let placed = bus.publish(OrderPlaced { id: 1 }).await.unwrap();
    bus.settled().await;
    assert_eq!(spy.snapshot(), vec![Some(placed.id)]);
    let reserved = tidings::testing::events_of::<StockReserved>(&bus.published());
    assert_eq!(reserved.len(), 1);
    assert_eq!(reserved[0].correlation_id(), placed.id);
    assert_eq!(reserved[0].causation_id(), Some(placed.id));
    bus.shutdown().await;
}

#[tokio::test]
async fn requests_after_shutdown_are_refused() {
    let bus = Bus::builder()
        .command_handler::<Reserve, _>(|| Stock { left: 10 })
        .build()
        .unwrap();
    bus.shutdown().await;
    assert_eq!(
        bus.request(Reserve {
            sku: "a",
            quantity: 1
        })
        .await,
        Err(RequestError::Closed)
    );
}

struct Tracked(u32);
impl Command for Tracked {
    type Reply = u32;
}

/// Takes 10 s per command and records which commands it finished.
struct SlowRecorder(Recorder<u32>);
impl CommandHandler<Tracked> for SlowRecorder {
    async fn handle(&mut self, cmd: Tracked, _: &Context) -> Result<u32, HandlerError> {
        tokio::time::sleep(Duration::from_secs(10)).await;
        self.0.push(cmd.0);
        Ok(cmd.0)
    }
}

#[tokio::test(start_paused = true)]
async fn deadlines_hold_for_running_and_queued_requests() {
    let finished = Recorder::new();
    let bus = Bus::builder()
        .request_timeout(Duration::from_secs(3))
        .command_handler::<Tracked, _>({
            let finished = finished.clone();
            move || SlowRecorder(finished.clone())
        })
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let first = tokio::spawn({
        let bus = bus.clone();
        async move { (bus.request(Tracked(1)).await, start.elapsed()) }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Queued behind the running one, with a shorter deadline of its own.
    let second = tokio::spawn({
        let bus = bus.clone();
        async move {
            let r = bus
                .request_timeout(Tracked(2), Duration::from_secs(1))
                .await;
            (r, start.elapsed())
        }
    });
    let (r1, t1) = first.await.unwrap();
    let (r2, t2) = second.await.unwrap();
    assert!(
        matches!(r1, Err(RequestError::Timeout { timeout, .. }) if timeout == Duration::from_secs(3))
    );
    assert_eq!(
        t1,
        Duration::from_secs(3),
        "answered at its deadline, not when the handler ended"
    );
    assert!(matches!(r2, Err(RequestError::Timeout { .. })));
    assert_eq!(
        t2,
        Duration::from_secs(2),
        "a queued request times out at its own deadline"
    );
    bus.settled().await;
    // The running handler was not cancelled half-way; the expired queued one never ran.
    assert_eq!(finished.snapshot(), vec![1]);
    // And the handler answers again once free.
    assert_eq!(
        bus.request_timeout(Tracked(3), Duration::from_secs(60))
            .await,
        Ok(3)
    );
    bus.shutdown().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "stock.audit", key = sku)]
struct StockAudited {
    sku: String,
}

/// A command handler that publishes an event while handling.
struct AuditingStock;
impl CommandHandler<Reserve> for AuditingStock {
    async fn handle(&mut self, cmd: Reserve, ctx: &Context) -> Result<u32, HandlerError> {
        ctx.publish(StockAudited {
            sku: cmd.sku.to_owned(),
        })
        .await?;
        Ok(0)
    }
}

#[tokio::test]
async fn events_a_command_handler_publishes_name_the_event_that_sent_the_command() {
    let bus = Bus::builder()
        .record(true)
        .subscribe::<OrderPlaced, _>("checkout", || Checkout)
        .command_handler::<Reserve, _>(|| AuditingStock)
        .build()
        .unwrap();
    let placed = bus.publish(OrderPlaced { id: 9 }).await.unwrap();
    // And a request from outside starts its own chain.
    bus.request(Reserve {
        sku: "outside",
        quantity: 1,
    })
    .await
    .unwrap();
    bus.settled().await;
    let audited = tidings::testing::events_of::<StockAudited>(&bus.published());
    let inside = audited.iter().find(|e| e.event().sku == "a").unwrap();
    assert_eq!(inside.correlation_id(), placed.id);
    assert_eq!(inside.causation_id(), Some(placed.id));
    let outside = audited.iter().find(|e| e.event().sku == "outside").unwrap();
    assert_ne!(outside.correlation_id(), placed.id);
    assert_eq!(outside.causation_id(), Some(outside.correlation_id()));
    bus.shutdown().await;
}
