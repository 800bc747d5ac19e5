//! Commands under test: a command handler called directly with a `TestContext`, and the
//! requests a handler sends answered by stubs and recorded.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::testing::TestContext;
use tidings::RequestError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "shop", key = order_id, name = "commands.OrderPlaced")]
struct OrderPlaced {
    order_id: u64,
    sku: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "shop", key = order_id, name = "commands.OrderRejected")]
struct OrderRejected {
    order_id: u64,
    reason: String,
}

/// Asks the stock keeper to hold `quantity` of `sku`; replies how many are left.
#[derive(Debug, Clone, PartialEq)]
struct Reserve {
    sku: String,
    quantity: u32,
}
impl Command for Reserve {
    type Reply = u32;
}

/// Places an order: reserves the stock (a request), then publishes what happened.
#[derive(Debug, Clone, PartialEq)]
struct PlaceOrder {
    order_id: u64,
    sku: String,
}
impl Command for PlaceOrder {
    type Reply = bool;
}

struct Orders;

impl CommandHandler<PlaceOrder> for Orders {
    async fn handle(&mut self, cmd: PlaceOrder, ctx: &Context) -> Result<bool, HandlerError> {
        if cmd.sku.is_empty() {
            return Err(HandlerError::msg("no sku").into_permanent());
        }
        let reserve = Reserve {
            sku: cmd.sku.clone(),
            quantity: 1,
        };
        match ctx.request(reserve).await {
            Ok(_left) => {
                ctx.publish(OrderPlaced {
                    order_id: cmd.order_id,
                    sku: cmd.sku,
                })
                .await?;
                Ok(true)
            }
            Err(err @ RequestError::Timeout { .. }) => {
                ctx.publish(OrderRejected {
                    order_id: cmd.order_id,
                    reason: err.to_string(),
                })
                .await?;
                Ok(false)
            }
            Err(err) => Err(err.into()),
        }
    }
}

/// An event handler that sends a command for every order placed.
struct Restocker;

impl Handler<OrderPlaced> for Restocker {
    async fn handle(
        &mut self,
        e: &Envelope<OrderPlaced>,
        ctx: &Context,
    ) -> Result<(), HandlerError> {
        ctx.request(Reserve {
            sku: e.event().sku.clone(),
            quantity: 10,
        })
        .await?;
        Ok(())
    }
}

fn place(order_id: u64, sku: &str) -> PlaceOrder {
    PlaceOrder {
        order_id,
        sku: sku.to_owned(),
    }
}

#[tokio::test]
async fn a_command_handler_is_called_directly_with_its_requests_stubbed() {
    let mut ctx = TestContext::new().stub(|r: &Reserve| Ok(100 - r.quantity));
    assert!(ctx
        .call_command(&mut Orders, place(1, "apple"))
        .await
        .unwrap());
    assert!(ctx
        .call_command(&mut Orders, place(2, "pear"))
        .await
        .unwrap());

    let placed = ctx.published_of::<OrderPlaced>();
    assert_eq!(
        placed
            .iter()
            .map(|e| e.event().order_id)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    // Each call is a request of its own: its events are correlated to it, and caused by it.
    assert_eq!(placed[0].causation_id(), Some(placed[0].correlation_id()));
    assert_ne!(placed[0].correlation_id(), placed[1].correlation_id());
    assert_eq!(
        ctx.requested_of::<Reserve>(),
        vec![
            Reserve {
                sku: "apple".into(),
                quantity: 1
            },
            Reserve {
                sku: "pear".into(),
                quantity: 1
            },
        ]
    );
}

#[tokio::test]
async fn a_command_handlers_error_comes_back_as_it_returned_it() {
    let mut ctx = TestContext::new();
    let err = ctx
        .call_command(&mut Orders, place(1, ""))
        .await
        .unwrap_err();
    assert!(err.is_permanent());
    assert!(err.to_string().contains("no sku"));
    assert!(ctx.published().is_empty());
    assert!(ctx.requested_of::<Reserve>().is_empty());
}

#[tokio::test]
async fn a_stub_can_fail_a_request_and_keep_state_between_calls() {
    // The first reservation times out, the next ones succeed.
    let mut calls = 0;
    let mut ctx = TestContext::new().stub(move |_: &Reserve| {
        calls += 1;
        if calls == 1 {
            Err(RequestError::Timeout {
                command: "Reserve",
                timeout: Duration::from_secs(30),
            })
        } else {
            Ok(5)
        }
    });
    assert!(!ctx
        .call_command(&mut Orders, place(1, "apple"))
        .await
        .unwrap());
    assert!(ctx
        .call_command(&mut Orders, place(2, "apple"))
        .await
        .unwrap());
    let rejected = ctx.published_of::<OrderRejected>();
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].event().reason.contains("no reply within 30s"));
    assert_eq!(ctx.published_of::<OrderPlaced>().len(), 1);
    assert_eq!(ctx.requested_of::<Reserve>().len(), 2);
}

#[tokio::test]
async fn an_unstubbed_request_gets_no_handler_and_a_hint_to_stub_it() {
    let mut ctx = TestContext::new();
    let placed = Envelope::new(OrderPlaced {
        order_id: 3,
        sku: "apple".into(),
    });
    let err = ctx.call(&mut Restocker, &placed).await.unwrap_err();
    let request_err = err
        .downcast_ref::<RequestError>()
        .expect("the handler passed the request's error on");
    assert!(
        matches!(request_err, RequestError::NoHandler { command } if command.ends_with("Reserve"))
    );
    assert!(request_err.to_string().contains("TestContext::stub"));
    // Refused, but recorded all the same: the handler did send it.
    assert_eq!(
        ctx.requested_of::<Reserve>(),
        vec![Reserve {
            sku: "apple".into(),
            quantity: 10
        }]
    );
}

#[tokio::test]
async fn an_event_handlers_requests_are_recorded_and_clear_forgets_them_but_not_the_stubs() {
    let mut ctx = TestContext::new()
        .stub(|_: &PlaceOrder| Ok(false))
        .stub(|_: &Reserve| Ok(0))
        // A later stub for the same command type replaces the earlier one.
        .stub(|r: &Reserve| Ok(r.quantity * 2));
    let placed = Envelope::new(OrderPlaced {
        order_id: 4,
        sku: "fig".into(),
    });
    ctx.call(&mut Restocker, &placed).await.unwrap();
    assert_eq!(ctx.requested_of::<Reserve>().len(), 1);
    assert!(ctx.requested_of::<PlaceOrder>().is_empty());

    ctx.clear();
    assert!(ctx.requested_of::<Reserve>().is_empty());
    ctx.call(&mut Restocker, &placed).await.unwrap();
    assert_eq!(
        ctx.context()
            .request(Reserve {
                sku: "fig".into(),
                quantity: 3
            })
            .await,
        Ok(6)
    );
    assert_eq!(ctx.requested_of::<Reserve>().len(), 2);
}
