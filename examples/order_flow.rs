//! Order → payment → inventory → notification, as a choreography saga in a modular monolith.
//!
//! Four modules (`orders`, `payments`, `inventory`, `notifications`) each own their events,
//! handlers and state, and talk only through events on the bus: no module calls another.
//!
//! - `OrderCreated` → payments charges the card: `PaymentProcessed`, or `PaymentFailed` for a
//!   declined card or an amount over the limit, and orders cancels the order (compensation).
//! - `PaymentProcessed` → inventory reserves stock: `InventoryReserved` and orders confirms, or
//!   `InventoryUnavailable` → payments refunds (`PaymentRefunded`) → orders cancels.
//! - `OrderConfirmed` / `OrderCancelled` → notifications tells the customer.
//!
//! Events a handler publishes through its `Context` carry the correlation id of the
//! `OrderCreated` that started the chain and name the event they react to as their cause.
//!
//! Run with `cargo run --example order_flow`.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex, MutexGuard};

use tidings::stats::ShutdownReport;
use tidings::Uuid;
use tidings::{AnyEnvelope, Bus, BusBuilder, PublishError};

/// The orders module: the order state machine, and the only owner of order states.
pub mod orders {
    use super::inventory::InventoryReserved;
    use super::payments::{PaymentFailed, PaymentProcessed, PaymentRefunded};
    use super::*;
    use serde::{Deserialize, Serialize};
    use tidings::prelude::*;

    /// A customer placed an order: starts the saga.
    #[derive(Debug, Clone, Serialize, Deserialize, Event)]
    #[event(topic = "orders", key = order_id)]
    pub struct OrderCreated {
        /// The order.
        pub order_id: u64,
        /// What was ordered.
        pub sku: String,
        /// How many.
        pub quantity: u32,
        /// Total to charge, in cents.
        pub amount_cents: u64,
        /// Card to charge.
        pub card: String,
    }

    /// Paid and reserved: the order will ship.
    #[derive(Debug, Clone, Serialize, Deserialize, Event)]
    #[event(topic = "orders", key = order_id)]
    pub struct OrderConfirmed {
        /// The order.
        pub order_id: u64,
    }

    /// A step of the saga failed, so the order is cancelled.
    #[derive(Debug, Clone, Serialize, Deserialize, Event)]
    #[event(topic = "orders", key = order_id)]
    pub struct OrderCancelled {
        /// The order.
        pub order_id: u64,
        /// Why.
        pub reason: String,
    }

    /// Where an order is in its life.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum OrderStatus {
        /// Created, waiting for payment.
        Pending,
        /// Paid, waiting for stock.
        Paid,
        /// Paid and reserved.
        Confirmed,
        /// Cancelled, with the reason.
        Cancelled(String),
    }

    impl OrderStatus {
        /// Only forward, never out of a final state. There is no order across topics, so
        /// `InventoryReserved` may arrive before `PaymentProcessed`: that `Paid` is then ignored.
        fn can_become(&self, next: &OrderStatus) -> bool {
            use OrderStatus::*;
            matches!(
                (self, next),
                (Pending, Paid) | (Pending | Paid, Confirmed | Cancelled(_))
            )
        }
    }

    /// Order states, shared by the module's handlers (one per partition and subscription) and
    /// readable from outside. Cloning shares them.
    #[derive(Debug, Clone, Default)]
    pub struct Orders(Arc<Mutex<BTreeMap<u64, OrderStatus>>>);

    impl Orders {
        /// Records a new order and publishes its `OrderCreated`; returns the correlation id of
        /// its chain (the id of this root event).
        pub async fn place(
            &self,
            bus: &Bus,
            order: OrderCreated,
        ) -> Result<Uuid, PublishError<OrderCreated>> {
            lock(&self.0).insert(order.order_id, OrderStatus::Pending);
            Ok(bus.publish(order).await?.id)
        }

        /// A copy of every order's status.
        pub fn snapshot(&self) -> BTreeMap<u64, OrderStatus> {
            lock(&self.0).clone()
        }
    }

    /// The order state machine: follows payments and inventory, announces final states.
    pub struct Lifecycle(Orders);

    impl Lifecycle {
        /// Moves the order to `next` if allowed and publishes final states. A redelivered event
        /// (delivery is at-least-once) finds the order moved already and publishes nothing.
        /// State change and publish are not atomic: a store would need an outbox for that.
        async fn advance(&self, order_id: u64, next: OrderStatus, ctx: &Context) -> HandlerResult {
            {
                let mut states = lock(&self.0 .0);
                match states.get_mut(&order_id) {
                    Some(status) if status.can_become(&next) => *status = next.clone(),
                    _ => return Ok(()),
                }
            }
            match next {
                OrderStatus::Confirmed => ctx.publish(OrderConfirmed { order_id }).await?,
                OrderStatus::Cancelled(reason) => {
                    ctx.publish(OrderCancelled { order_id, reason }).await?
                }
                _ => return Ok(()),
            };
            Ok(())
        }
    }

    /// Every event type of the `payments` topic, in order per order id.
    impl AnyHandler for Lifecycle {
        async fn handle(&mut self, e: &AnyEnvelope, ctx: &Context) -> HandlerResult {
            let (order_id, next) = if let Some(p) = e.downcast_ref::<PaymentProcessed>() {
                (p.order_id, OrderStatus::Paid)
            } else if let Some(f) = e.downcast_ref::<PaymentFailed>() {
                let reason = format!("payment failed: {}", f.reason);
                (f.order_id, OrderStatus::Cancelled(reason))
            } else if let Some(r) = e.downcast_ref::<PaymentRefunded>() {
                let reason = format!("refunded: {}", r.reason);
                (r.order_id, OrderStatus::Cancelled(reason))
            } else {
                return Ok(());
            };
            self.advance(order_id, next, ctx).await
        }
    }

    impl Handler<InventoryReserved> for Lifecycle {
        async fn handle(
            &mut self,
            e: &Envelope<InventoryReserved>,
            ctx: &Context,
        ) -> HandlerResult {
            let order_id = e.event().order_id;
            self.advance(order_id, OrderStatus::Confirmed, ctx).await
        }
    }

    /// Subscribes the module: the whole `payments` topic, and `InventoryReserved`.
    pub fn register(builder: BusBuilder, orders: &Orders) -> BusBuilder {
        let (a, b) = (orders.clone(), orders.clone());
        builder
            .subscribe_all("payments", "orders.payments", move || Lifecycle(a.clone()))
            .subscribe::<InventoryReserved, _>("orders.inventory", move || Lifecycle(b.clone()))
    }
}

/// The payments module: charges on `OrderCreated`, refunds on `InventoryUnavailable`.
pub mod payments {
    use super::inventory::InventoryUnavailable;
    use super::orders::OrderCreated;
    use super::*;
    use serde::{Deserialize, Serialize};
    use tidings::prelude::*;

    /// The test card number that is always declined.
    pub const DECLINED_CARD: &str = "4000-0000-0000-0002";
    /// Orders above this amount (in cents) are declined.
    pub const LIMIT_CENTS: u64 = 100_000;

    /// The card was charged. Carries what inventory needs, so inventory asks nobody.
    #[derive(Debug, Clone, Serialize, Deserialize, Event)]
    #[event(topic = "payments", key = order_id)]
    pub struct PaymentProcessed {
        /// The order.
        pub order_id: u64,
        /// What to reserve.
        pub sku: String,
        /// How many.
        pub quantity: u32,
    }

    /// The charge was declined.
    #[derive(Debug, Clone, Serialize, Deserialize, Event)]
    #[event(topic = "payments", key = order_id)]
    pub struct PaymentFailed {
        /// The order.
        pub order_id: u64,
        /// Why.
        pub reason: String,
    }

    /// A charge was paid back, because a later step failed.
    #[derive(Debug, Clone, Serialize, Deserialize, Event)]
    #[event(topic = "payments", key = order_id)]
    pub struct PaymentRefunded {
        /// The order.
        pub order_id: u64,
        /// Why.
        pub reason: String,
    }

    /// Amounts charged, by order: shared by both handlers of the module.
    type Ledger = Arc<Mutex<BTreeMap<u64, u64>>>;

    /// Charges the card of each new order.
    pub struct Charger(Ledger);

    impl Handler<OrderCreated> for Charger {
        async fn handle(&mut self, e: &Envelope<OrderCreated>, ctx: &Context) -> HandlerResult {
            let o = e.event();
            let order_id = o.order_id;
            let declined = if o.card == DECLINED_CARD {
                Some("card declined".to_owned())
            } else if o.amount_cents > LIMIT_CENTS {
                Some(format!("{} over the limit", money(o.amount_cents)))
            } else {
                None
            };
            if let Some(reason) = declined {
                say(
                    "payments",
                    e.correlation_id(),
                    format!("order {order_id}: {reason}"),
                );
                ctx.publish(PaymentFailed { order_id, reason }).await?;
            } else {
                lock(&self.0).insert(order_id, o.amount_cents);
                let charged = format!("order {order_id}: charged {}", money(o.amount_cents));
                say("payments", e.correlation_id(), charged);
                let (sku, quantity) = (o.sku.clone(), o.quantity);
                ctx.publish(PaymentProcessed {
                    order_id,
                    sku,
                    quantity,
                })
                .await?;
            }
            Ok(())
        }
    }

    /// Refunds an order whose stock could not be reserved.
    pub struct Refunder(Ledger);

    impl Handler<InventoryUnavailable> for Refunder {
        async fn handle(
            &mut self,
            e: &Envelope<InventoryUnavailable>,
            ctx: &Context,
        ) -> HandlerResult {
            let order_id = e.event().order_id;
            // Refund only what is charged and not refunded yet: a redelivery refunds nothing.
            let Some(amount) = lock(&self.0).remove(&order_id) else {
                return Ok(());
            };
            let refunded = format!("order {order_id}: refunded {}", money(amount));
            say("payments", e.correlation_id(), refunded);
            let reason = format!("{} out of stock", e.event().sku);
            ctx.publish(PaymentRefunded { order_id, reason }).await?;
            Ok(())
        }
    }

    /// Subscribes the module.
    pub fn register(builder: BusBuilder) -> BusBuilder {
        let ledger = Ledger::default();
        let (a, b) = (ledger.clone(), ledger);
        builder
            .subscribe::<OrderCreated, _>("payments", move || Charger(a.clone()))
            .subscribe::<InventoryUnavailable, _>("payments.refunds", move || Refunder(b.clone()))
    }
}

/// The inventory module: reserves stock once an order is paid.
pub mod inventory {
    use super::payments::PaymentProcessed;
    use super::*;
    use serde::{Deserialize, Serialize};
    use tidings::prelude::*;

    /// Stock was set aside for the order.
    #[derive(Debug, Clone, Serialize, Deserialize, Event)]
    #[event(topic = "inventory", key = order_id)]
    pub struct InventoryReserved {
        /// The order.
        pub order_id: u64,
    }

    /// Not enough stock for the order.
    #[derive(Debug, Clone, Serialize, Deserialize, Event)]
    #[event(topic = "inventory", key = order_id)]
    pub struct InventoryUnavailable {
        /// The order.
        pub order_id: u64,
        /// The missing item.
        pub sku: String,
    }

    /// Units in stock by SKU: one warehouse for the handlers of every partition.
    type Stock = Arc<Mutex<BTreeMap<String, u32>>>;

    /// Reserves the items of each paid order.
    pub struct Reserver(Stock);

    impl Handler<PaymentProcessed> for Reserver {
        async fn handle(&mut self, e: &Envelope<PaymentProcessed>, ctx: &Context) -> HandlerResult {
            let PaymentProcessed {
                order_id,
                ref sku,
                quantity,
            } = *e.event();
            let reserved = match lock(&self.0).get_mut(sku) {
                Some(units) if *units >= quantity => {
                    *units -= quantity;
                    true
                }
                _ => false,
            };
            let verb = if reserved {
                "reserved"
            } else {
                "cannot reserve"
            };
            let line = format!("order {order_id}: {verb} {quantity} × {sku}");
            say("inventory", e.correlation_id(), line);
            if reserved {
                ctx.publish(InventoryReserved { order_id }).await?;
            } else {
                let sku = sku.clone();
                ctx.publish(InventoryUnavailable { order_id, sku }).await?;
            }
            Ok(())
        }
    }

    /// Subscribes the module with its initial stock.
    pub fn register(builder: BusBuilder, stock: &[(&str, u32)]) -> BusBuilder {
        let stock = stock.iter().map(|&(sku, n)| (sku.to_owned(), n)).collect();
        let stock: Stock = Arc::new(Mutex::new(stock));
        builder.subscribe::<PaymentProcessed, _>("inventory", move || Reserver(stock.clone()))
    }
}

/// The notifications module: tells customers how their order ended.
pub mod notifications {
    use super::orders::{OrderCancelled, OrderConfirmed};
    use super::*;
    use tidings::prelude::*;

    /// Messages sent, in sending order. Cloning shares them.
    pub type Outbox = Arc<Mutex<Vec<String>>>;

    /// Reads the whole `orders` topic, which carries several event types, and ignores the
    /// ones that are not final.
    pub struct Notifier(Outbox);

    impl AnyHandler for Notifier {
        async fn handle(&mut self, e: &AnyEnvelope, _: &Context) -> HandlerResult {
            let message = if let Some(c) = e.downcast_ref::<OrderConfirmed>() {
                format!("order {} confirmed", c.order_id)
            } else if let Some(c) = e.downcast_ref::<OrderCancelled>() {
                format!("order {} cancelled ({})", c.order_id, c.reason)
            } else {
                return Ok(());
            };
            say("notifications", e.correlation_id(), &message);
            lock(&self.0).push(message);
            Ok(())
        }
    }

    /// Subscribes the module.
    pub fn register(builder: BusBuilder, outbox: &Outbox) -> BusBuilder {
        let outbox = outbox.clone();
        builder.subscribe_all("orders", "notifications", move || Notifier(outbox.clone()))
    }
}

use orders::{OrderCreated, OrderStatus};

/// What a run of the flow ended with.
#[derive(Debug)]
pub struct Summary {
    /// Final status of every order.
    pub orders: BTreeMap<u64, OrderStatus>,
    /// Correlation id of every order's chain: the id of its `OrderCreated`.
    pub correlations: BTreeMap<u64, Uuid>,
    /// Messages sent to customers, in sending order.
    pub notifications: Vec<String>,
    /// Every event published, if the builder records (`Bus::builder().record(true)`).
    pub published: Vec<AnyEnvelope>,
    /// The bus's shutdown report.
    pub report: ShutdownReport,
}

/// Six orders: 1, 2 and 5 go through; 3 (declined card) and 6 (over the limit) fail payment;
/// 4 is paid, finds no stock and is refunded.
pub fn sample_orders() -> Vec<OrderCreated> {
    let good = "4242-4242-4242-4242";
    let orders = [
        (1, "keyboard", 1, 8_900, good),
        (2, "mouse", 2, 5_000, good),
        (3, "keyboard", 1, 8_900, payments::DECLINED_CARD),
        (4, "monitor", 1, 34_900, good),
        (5, "mouse", 1, 2_500, good),
        (6, "keyboard", 20, 178_000, good),
    ];
    let order = |(order_id, sku, quantity, amount_cents, card): (u64, &str, u32, u64, &str)| {
        let (sku, card) = (sku.to_owned(), card.to_owned());
        OrderCreated {
            order_id,
            sku,
            quantity,
            amount_cents,
            card,
        }
    };
    orders.into_iter().map(order).collect()
}

/// Wires the four modules onto `builder`, places `orders`, waits until every chain is done,
/// and shuts the bus down.
pub async fn run(
    builder: BusBuilder,
    orders: Vec<OrderCreated>,
) -> Result<Summary, Box<dyn std::error::Error>> {
    let book = orders::Orders::default();
    let outbox = notifications::Outbox::default();
    let builder = orders::register(builder, &book);
    let builder = payments::register(builder);
    let builder = inventory::register(builder, &[("keyboard", 50), ("mouse", 50), ("monitor", 0)]);
    let bus = notifications::register(builder, &outbox).build()?;

    let mut correlations = BTreeMap::new();
    for order in orders {
        let order_id = order.order_id;
        correlations.insert(order_id, book.place(&bus, order).await?);
    }
    bus.settled().await;
    let report = bus.shutdown().await;
    let notifications = lock(&outbox).clone();
    Ok(Summary {
        orders: book.snapshot(),
        correlations,
        notifications,
        published: bus.published(),
        report,
    })
}

/// The last hex digits of an id: enough to tell chains apart (the ids of one run share their
/// leading, time-based digits).
pub fn short(id: Uuid) -> String {
    id.simple().to_string()[24..].to_owned()
}

/// Prints a log line of `module`, with the correlation id of the chain it belongs to.
fn say(module: &str, correlation: Uuid, what: impl Display) {
    let module = format!("[{module}]");
    println!("{module:<15} corr {}  {what}", short(correlation));
}

/// Formats cents as an amount.
fn money(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// Locks a mutex, ignoring poisoning: a panicking handler is restarted by the bus.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Recording keeps every event so that the chains can be printed below; leave it off in
    // production, where the record would grow without bound.
    let summary = run(Bus::builder().record(true), sample_orders()).await?;

    println!("\nfinal order states, and each order's chain of events:");
    for (order_id, status) in &summary.orders {
        let corr = summary.correlations[order_id];
        let chain = summary
            .published
            .iter()
            .filter(|e| e.correlation_id() == corr);
        let names: Vec<&str> = chain.map(AnyEnvelope::name).collect();
        println!("  order {order_id}: {status:?}");
        println!("    corr {}: {}", short(corr), names.join(" → "));
    }
    let r = &summary.report;
    println!(
        "\nshut down: {} handled, {} failed, {} dropped, {} panics",
        r.handled, r.failed, r.dropped, r.panics
    );
    Ok(())
}
