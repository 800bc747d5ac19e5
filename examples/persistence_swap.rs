//! Swapping in persistence: the order flow on a durable SQLite store, stopped half-way and
//! restarted without losing an event.
//!
//! The modules of `order_flow` (trimmed: no stock, no refunds) run unchanged. What makes the bus
//! durable is one builder line, `.store(SqliteStore::open(path).await?)`: see `build_bus`.
//!
//! - Run 1 places four orders while the mail server hangs, then the process is stopped (a
//!   deploy) with a drain budget, `shutdown_timeout`. Payments, inventory and orders have
//!   finished, and their offsets are committed (every 100 ms); the notifications still waiting
//!   for the mail server are abandoned, their offsets left where they were.
//! - Run 2 opens the same file and builds the same bus. Every group resumes from its committed
//!   offset: the pending mails go out. It places two more orders, and deploys a new projection,
//!   `order-history`, which starts from the oldest event in the log and so sees both runs.
//!
//! What the modules did (cards charged, mails sent) is kept in a `World` that outlives both
//! buses, as their own tables and the outside world would; the end asserts it. Delivery is
//! at-least-once: an event handled after its group's last commit is handled again after a
//! restart, so the end also prints any effect done twice (none, when the commit came in time).
//!
//! Run with `cargo run --example persistence_swap [path/to/new.db]` (default: a new file in the
//! temporary directory, deleted at the end).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::stats::Stats;
use tidings::store::{SqliteStore, StartFrom, Store};
use tidings::BuildError;
use tokio::sync::watch;

type AnyError = Box<dyn std::error::Error>;

/// The test card number that is always declined.
const DECLINED: &str = "4000-0000-0000-0002";
const GOOD: &str = "4242-4242-4242-4242";

/// What the modules did, outside the bus: it outlives both buses, as a database would.
#[derive(Default)]
struct World {
    /// The orders module's table: "pending", "confirmed" or "cancelled" by order.
    orders: Mutex<BTreeMap<u64, &'static str>>,
    /// How many times each order was "charged", "reserved", "mailed".
    effects: Mutex<BTreeMap<(u64, &'static str), u32>>,
    /// Whether the mail server answers.
    mail_up: watch::Sender<bool>,
    /// The `order-history` projection: order ids, as it saw them.
    history: Mutex<Vec<u64>>,
}

impl World {
    fn did(&self, order_id: u64, effect: &'static str) {
        *lock(&self.effects).entry((order_id, effect)).or_default() += 1;
    }
}

// -- orders: places orders, and moves them to their final state ---------------------------

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order_id)]
struct OrderCreated {
    order_id: u64,
    cents: u64,
    card: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order_id)]
struct OrderConfirmed {
    order_id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order_id)]
struct OrderCancelled {
    order_id: u64,
    reason: String,
}

/// Records the orders as pending and publishes them: one transaction for the lot.
async fn place(bus: &Bus, world: &World, orders: &[(u64, u64, &str)]) -> Result<(), AnyError> {
    let orders: Vec<OrderCreated> = orders
        .iter()
        .map(|&(order_id, cents, card)| {
            lock(&world.orders).insert(order_id, "pending");
            let card = card.to_owned();
            OrderCreated {
                order_id,
                cents,
                card,
            }
        })
        .collect();
    bus.publish_all(orders).await?;
    Ok(())
}

/// The order state machine: a pending order becomes final once, and that is announced. A
/// redelivered event (delivery is at-least-once) finds the order final already.
struct Lifecycle(Arc<World>);

impl Lifecycle {
    /// Moves a pending order to `next`; false if it is final already.
    fn advance(&self, order_id: u64, next: &'static str) -> bool {
        let mut orders = lock(&self.0.orders);
        let pending = orders.get(&order_id) == Some(&"pending");
        if pending {
            orders.insert(order_id, next);
        }
        pending
    }
}

impl Handler<PaymentFailed> for Lifecycle {
    async fn handle(&mut self, e: &Envelope<PaymentFailed>, ctx: &Context) -> HandlerResult {
        let order_id = e.event().order_id;
        if self.advance(order_id, "cancelled") {
            let reason = e.event().reason.clone();
            ctx.publish(OrderCancelled { order_id, reason }).await?;
        }
        Ok(())
    }
}

impl Handler<InventoryReserved> for Lifecycle {
    async fn handle(&mut self, e: &Envelope<InventoryReserved>, ctx: &Context) -> HandlerResult {
        let order_id = e.event().order_id;
        if self.advance(order_id, "confirmed") {
            ctx.publish(OrderConfirmed { order_id }).await?;
        }
        Ok(())
    }
}

// -- payments: charges the card of each new order -----------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = order_id)]
struct PaymentProcessed {
    order_id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "payments", key = order_id)]
struct PaymentFailed {
    order_id: u64,
    reason: String,
}

struct Charger(Arc<World>);

impl Handler<OrderCreated> for Charger {
    async fn handle(&mut self, e: &Envelope<OrderCreated>, ctx: &Context) -> HandlerResult {
        let (order_id, cents) = (e.event().order_id, e.event().cents);
        if e.event().card == DECLINED {
            say("payments", order_id, "card declined");
            let reason = "card declined".to_owned();
            ctx.publish(PaymentFailed { order_id, reason }).await?;
        } else {
            self.0.did(order_id, "charged");
            say("payments", order_id, format!("charged {cents} cents"));
            ctx.publish(PaymentProcessed { order_id }).await?;
        }
        Ok(())
    }
}

// -- inventory: reserves stock for each paid order -----------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "inventory", key = order_id)]
struct InventoryReserved {
    order_id: u64,
}

struct Reserver(Arc<World>);

impl Handler<PaymentProcessed> for Reserver {
    async fn handle(&mut self, e: &Envelope<PaymentProcessed>, ctx: &Context) -> HandlerResult {
        let order_id = e.event().order_id;
        self.0.did(order_id, "reserved");
        say("inventory", order_id, "stock reserved");
        ctx.publish(InventoryReserved { order_id }).await?;
        Ok(())
    }
}

// -- notifications: mails the customer how the order ended ---------------------------------

struct Notifier(Arc<World>);

impl AnyHandler for Notifier {
    async fn handle(&mut self, e: &AnyEnvelope, _: &Context) -> HandlerResult {
        let (order_id, text) = if let Some(c) = e.downcast_ref::<OrderConfirmed>() {
            (c.order_id, "confirmed".to_owned())
        } else if let Some(c) = e.downcast_ref::<OrderCancelled>() {
            (c.order_id, format!("cancelled, {}", c.reason))
        } else {
            return Ok(()); // OrderCreated
        };
        // While the mail server hangs, so does the handler (the World keeps the sender).
        let _ = self.0.mail_up.subscribe().wait_for(|up| *up).await;
        self.0.did(order_id, "mailed");
        say("notifications", order_id, format!("mailed \"{text}\""));
        Ok(())
    }
}

// -- order-history: a read model, deployed with run 2 --------------------------------------

struct History(Arc<World>);

impl Handler<OrderCreated> for History {
    async fn handle(&mut self, e: &Envelope<OrderCreated>, _: &Context) -> HandlerResult {
        lock(&self.0.history).push(e.event().order_id);
        Ok(())
    }
}

/// The application: every module subscribes its handlers; `history` adds the projection.
fn build_bus(store: impl Store, world: &Arc<World>, history: bool) -> Result<Bus, BuildError> {
    // The one line that swaps in persistence: `store` is `SqliteStore::open(path).await?` here;
    // `MemoryStore::new()` or `PostgresStore::connect(url).await?` would go in the same place.
    let mut builder = Bus::builder().store(store);
    // A log outlives the process, so pin the partition counts (the default follows the CPUs).
    for topic in ["orders", "payments", "inventory"] {
        builder = builder.topic(TopicConfig::new(topic).partitions(4));
    }
    builder = builder
        .subscribe::<PaymentFailed, _>("orders.payments", with(world, Lifecycle))
        .subscribe::<InventoryReserved, _>("orders.inventory", with(world, Lifecycle))
        .subscribe::<OrderCreated, _>("payments", with(world, Charger))
        .subscribe::<PaymentProcessed, _>("inventory", with(world, Reserver))
        .subscribe_all("orders", "notifications", with(world, Notifier));
    if history {
        // A new group has no committed offset: it starts where it is told, at the oldest event.
        let sub = Subscription::new("order-history").start_from(StartFrom::Earliest);
        builder = builder.subscribe::<OrderCreated, _>(sub, with(world, History));
    }
    builder.build()
}

/// A handler factory: each handler the bus makes gets the shared `World`.
fn with<H>(world: &Arc<World>, make: fn(Arc<World>) -> H) -> impl Fn() -> H + Send + Sync {
    let world = Arc::clone(world);
    move || make(Arc::clone(&world))
}

/// Events handled by each group, as `group n, …`.
fn handled(stats: &Stats) -> String {
    let groups = stats.topics.iter().flat_map(|t| &t.groups);
    let counts: Vec<String> = groups
        .map(|g| format!("{} {}", g.group, g.handled))
        .collect();
    counts.join(", ")
}

fn say(module: &str, order_id: u64, what: impl Display) {
    println!("  {:<16}order {order_id}: {what}", format!("[{module}]"));
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[tokio::main]
async fn main() -> Result<(), AnyError> {
    let (path, temporary) = match std::env::args_os().nth(1) {
        Some(path) => (PathBuf::from(path), false),
        None => {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
            let name = format!("tidings-persistence-swap-{}-{nanos}.db", std::process::id());
            (std::env::temp_dir().join(name), true)
        }
    };
    if path.exists() {
        return Err(format!("{} exists: give a new file", path.display()).into());
    }
    let world = Arc::new(World::default());

    println!("== run 1, on {}; the mail server hangs", path.display());
    let bus = build_bus(SqliteStore::open(&path).await?, &world, false)?;
    let run1 = [
        (1, 8_900, GOOD),
        (2, 5_000, GOOD),
        (3, 8_900, DECLINED),
        (4, 34_900, GOOD),
    ];
    place(&bus, &world, &run1).await?;
    // The process runs until every order has its final event and only notifications is busy.
    let others_done = |s: &Stats| {
        let finals = s.topic("orders").is_some_and(|t| t.published == 8);
        let mut groups = s.topics.iter().flat_map(|t| &t.groups);
        finals && groups.all(|g| g.group == "notifications" || g.lag == 0)
    };
    let running = async {
        while !others_done(&bus.stats()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), running).await?;
    // The drain cannot finish; the offsets of the groups that are done are committed meanwhile.
    println!("-- stopped for a deploy, with 500 ms to drain");
    let report = bus.shutdown_timeout(Duration::from_millis(500)).await;
    println!("   handled: {}", handled(&bus.stats()));
    println!("   abandoned: {} (mails)", report.abandoned);
    assert!(report.abandoned > 0);
    assert!(!lock(&world.effects).keys().any(|k| k.1 == "mailed"));
    drop(bus);

    println!("\n== run 2, on the same file; the mail server is back, order-history deployed");
    world.mail_up.send_replace(true);
    let bus = build_bus(SqliteStore::open(&path).await?, &world, true)?;
    // Every group catches up from its committed offset: the pending mails go out.
    bus.settled().await;
    println!("-- caught up; two more orders");
    place(&bus, &world, &[(5, 2_500, GOOD), (6, 8_900, DECLINED)]).await?;
    bus.settled().await;
    let stats = bus.stats();
    let report = bus.shutdown().await;
    println!("-- shut down, {} abandoned", report.abandoned);
    println!("   handled: {}", handled(&stats));

    // Nothing lost: over the two runs, each paid order was charged, reserved and confirmed,
    // each declined one cancelled, and every customer mailed.
    let effects = lock(&world.effects).clone();
    let twice: Vec<_> = effects.iter().filter(|(_, &n)| n > 1).collect();
    println!("\norders: {:?}", lock(&world.orders));
    println!("effects done more than once (redelivered after the restart): {twice:?}");
    for id in 1..=6 {
        let paid = [1, 2, 4, 5].contains(&id);
        let status = if paid { "confirmed" } else { "cancelled" };
        assert_eq!(lock(&world.orders)[&id], status, "order {id}");
        for effect in ["charged", "reserved", "mailed"] {
            let done = effects.contains_key(&(id, effect));
            assert_eq!(done, paid || effect == "mailed", "order {id}: {effect}");
        }
        // Mailed exactly once: run 1 mailed nothing, and run 2 shut down cleanly.
        assert_eq!(effects[&(id, "mailed")], 1, "order {id}");
    }
    // The projection, new in run 2, read the whole log: the orders of both runs.
    let history = lock(&world.history).clone();
    println!("order-history, rebuilt from the log: {history:?}");
    assert_eq!(history.len(), 6);
    assert!((1..=6).all(|id| history.contains(&id)));

    if temporary {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    Ok(())
}
