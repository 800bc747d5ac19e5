//! Orders: takes orders (the `PlaceOrder` command) and decides each one's fate from what
//! payments and inventory report: a saga by choreography, with no call to another module.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::Uuid;

use crate::inventory::{GetStock, StockReserved, StockUnavailable};
use crate::payments::{PaymentCaptured, PaymentDeclined};

/// A customer placed an order.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order_id)]
pub struct OrderPlaced {
    pub order_id: u64,
    pub customer: String,
    pub sku: String,
    pub qty: u32,
    pub cents: u64,
}

/// Paid and in stock: the order goes out.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order_id)]
pub struct OrderConfirmed {
    pub order_id: u64,
}

/// The payment was declined or the stock was short: what was done is undone.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order_id)]
pub struct OrderCancelled {
    pub order_id: u64,
    pub reason: String,
}

/// Places an order; the reply is its id, or why it was refused at once.
#[derive(Debug, Clone)]
pub struct PlaceOrder {
    pub customer: String,
    pub sku: String,
    pub qty: u32,
    pub cents: u64,
}

impl Command for PlaceOrder {
    type Reply = Result<u64, String>;
}

/// The module's state: what each open order is waiting for.
#[derive(Clone, Default)]
pub struct OrderBook {
    open: Arc<Mutex<HashMap<u64, Outcomes>>>,
}

/// What payments and inventory said about one order, in whatever order they said it.
#[derive(Default)]
struct Outcomes {
    paid: bool,
    reserved: bool,
}

/// What the saga does next for an order.
#[derive(Debug, PartialEq)]
pub enum Decision {
    Wait,
    Confirm,
    Cancel(String),
}

impl OrderBook {
    /// Records one module's answer and decides, at most once per order.
    fn answer(&self, order_id: u64, answer: Result<fn(&mut Outcomes), String>) -> Decision {
        let mut open = self.open.lock().unwrap();
        let Some(outcomes) = open.get_mut(&order_id) else {
            return Decision::Wait; // decided already (cancelled by the other answer)
        };
        match answer {
            Err(reason) => {
                open.remove(&order_id);
                Decision::Cancel(reason)
            }
            Ok(record) => {
                record(outcomes);
                if outcomes.paid && outcomes.reserved {
                    open.remove(&order_id);
                    Decision::Confirm
                } else {
                    Decision::Wait
                }
            }
        }
    }
}

/// Answers `PlaceOrder`.
pub struct Taker {
    book: OrderBook,
}

impl CommandHandler<PlaceOrder> for Taker {
    async fn handle(
        &mut self,
        cmd: PlaceOrder,
        ctx: &Context,
    ) -> Result<Result<u64, String>, HandlerError> {
        if cmd.qty == 0 {
            return Ok(Err("an order needs at least one item".into()));
        }
        // Ask inventory first (a query, not a reservation: the reservation can still fail).
        let on_shelf = ctx.request(GetStock(cmd.sku.clone())).await?;
        if on_shelf < cmd.qty {
            return Ok(Err(format!("only {on_shelf} {} left", cmd.sku)));
        }
        // Unique across runs too, as the logs of a store outlive the process.
        let order_id = Uuid::now_v7().as_u128() as u64;
        self.book
            .open
            .lock()
            .unwrap()
            .insert(order_id, Outcomes::default());
        let placed = OrderPlaced {
            order_id,
            customer: cmd.customer,
            sku: cmd.sku,
            qty: cmd.qty,
            cents: cmd.cents,
        };
        ctx.publish(placed).await?;
        Ok(Ok(order_id))
    }
}

/// The saga: one handler for the four answers, of two topics.
pub struct Saga {
    book: OrderBook,
}

impl Saga {
    pub fn new(book: &OrderBook) -> Self {
        Saga { book: book.clone() }
    }

    async fn decide(&self, order_id: u64, decision: Decision, ctx: &Context) -> HandlerResult {
        match decision {
            Decision::Wait => {}
            Decision::Confirm => {
                ctx.publish(OrderConfirmed { order_id }).await?;
            }
            Decision::Cancel(reason) => {
                ctx.publish(OrderCancelled { order_id, reason }).await?;
            }
        }
        Ok(())
    }
}

impl Handler<PaymentCaptured> for Saga {
    async fn handle(&mut self, e: &Envelope<PaymentCaptured>, ctx: &Context) -> HandlerResult {
        let id = e.event().order_id;
        let decision = self.book.answer(id, Ok(|o| o.paid = true));
        self.decide(id, decision, ctx).await
    }
}

impl Handler<PaymentDeclined> for Saga {
    async fn handle(&mut self, e: &Envelope<PaymentDeclined>, ctx: &Context) -> HandlerResult {
        let id = e.event().order_id;
        let decision = self.book.answer(id, Err("payment declined".into()));
        self.decide(id, decision, ctx).await
    }
}

impl Handler<StockReserved> for Saga {
    async fn handle(&mut self, e: &Envelope<StockReserved>, ctx: &Context) -> HandlerResult {
        let id = e.event().order_id;
        let decision = self.book.answer(id, Ok(|o| o.reserved = true));
        self.decide(id, decision, ctx).await
    }
}

impl Handler<StockUnavailable> for Saga {
    async fn handle(&mut self, e: &Envelope<StockUnavailable>, ctx: &Context) -> HandlerResult {
        let id = e.event().order_id;
        let decision = self.book.answer(id, Err("out of stock".into()));
        self.decide(id, decision, ctx).await
    }
}

/// What the saga hears: the answers of payments and of inventory. One group over two topics,
/// in order per topic; the two answers of an order come in either order.
type Answers = (
    PaymentCaptured,
    PaymentDeclined,
    StockReserved,
    StockUnavailable,
);

/// The whole module's wiring.
pub fn module(book: OrderBook) -> Module<OrderBook> {
    Module::with_state("orders", book)
        .topic(TopicConfig::new("orders").partitions(4))
        .command_handler::<PlaceOrder, _>(|book| Taker { book: book.clone() })
        .subscribe::<Answers, _>("orders.saga", Saga::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings::testing::TestContext;

    fn open(book: &OrderBook, id: u64) {
        book.open.lock().unwrap().insert(id, Outcomes::default());
    }

    #[tokio::test]
    async fn an_order_is_confirmed_once_paid_and_reserved_in_either_order() {
        let book = OrderBook::default();
        let mut saga = Saga::new(&book);
        let mut ctx = TestContext::new();
        open(&book, 1);
        let reserved = Envelope::new(StockReserved { order_id: 1 });
        ctx.call(&mut saga, &reserved).await.unwrap();
        assert!(ctx.published().is_empty(), "still waiting for the payment");
        let paid = Envelope::new(PaymentCaptured {
            order_id: 1,
            cents: 500,
        });
        ctx.call(&mut saga, &paid).await.unwrap();
        let confirmed = ctx.published_of::<OrderConfirmed>();
        assert_eq!(confirmed.len(), 1);
        assert_eq!(confirmed[0].causation_id(), Some(paid.id()));
    }

    fn lamps(qty: u32) -> PlaceOrder {
        PlaceOrder {
            customer: "ada".into(),
            sku: "lamp".into(),
            qty,
            cents: 900,
        }
    }

    #[tokio::test]
    async fn an_order_is_taken_when_inventory_has_the_stock_and_refused_when_not() {
        let book = OrderBook::default();
        let mut taker = Taker { book: book.clone() };
        // Inventory's answer, stubbed: no bus, no inventory module.
        let mut ctx = TestContext::new().stub(|q: &GetStock| {
            assert_eq!(q.0, "lamp");
            Ok(2)
        });
        let id = ctx
            .call_command(&mut taker, lamps(2))
            .await
            .unwrap()
            .unwrap();
        let placed = ctx.published_of::<OrderPlaced>();
        assert_eq!(placed[0].event().order_id, id);
        let refused = ctx.call_command(&mut taker, lamps(3)).await.unwrap();
        assert_eq!(refused, Err("only 2 lamp left".to_owned()));
        assert_eq!(
            ctx.published_of::<OrderPlaced>().len(),
            1,
            "nothing published"
        );
        assert_eq!(ctx.requested_of::<GetStock>().len(), 2);
    }

    #[tokio::test]
    async fn the_first_failure_cancels_and_later_answers_change_nothing() {
        let book = OrderBook::default();
        let mut saga = Saga::new(&book);
        let mut ctx = TestContext::new();
        open(&book, 2);
        let short = Envelope::new(StockUnavailable { order_id: 2 });
        ctx.call(&mut saga, &short).await.unwrap();
        let paid = Envelope::new(PaymentCaptured {
            order_id: 2,
            cents: 500,
        });
        ctx.call(&mut saga, &paid).await.unwrap();
        let cancelled = ctx.published_of::<OrderCancelled>();
        assert_eq!(cancelled.len(), 1);
        assert_eq!(cancelled[0].event().reason, "out of stock");
        assert!(ctx.published_of::<OrderConfirmed>().is_empty());
    }
}
