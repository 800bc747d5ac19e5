//! An online shop as a modular monolith: orders, payments, inventory, shipping, notifications
//! and a read model, one file each, talking only through events and commands.
//!
//! ```text
//! cargo run --example modular_monolith                              # in memory
//! SHOP_STORE=sqlite://shop.db cargo run --example modular_monolith  # on SQLite
//! cargo run --example modular_monolith -- --topology                # print the Mermaid diagram
//! ```
//!
//! Each module file exports `module(state) -> Module<State>`, its whole wiring; `shop.rs` adds
//! them to one bus. Where the events are kept is one line there (`store::connect`).

mod inventory;
mod notifications;
mod orders;
mod payments;
mod read_model;
mod shipping;
mod shop;

use std::error::Error;

use read_model::GetOrder;
use shop::Shop;
use tidings::store::StartFrom;
use tidings::Bus;

const ORDERS: u64 = 1_000;

/// What the clients got back.
#[derive(Debug, Default)]
struct Placed {
    /// The ids of the orders taken.
    ids: Vec<u64>,
    /// How many were refused at once (not enough stock when placed).
    refused: usize,
}

/// Places `n` orders from 8 concurrent clients and waits until every module is done.
async fn run(bus: &Bus, n: u64) -> Result<Placed, Box<dyn Error>> {
    let mut clients = Vec::new();
    for client in 0..8 {
        let bus = bus.clone();
        clients.push(tokio::spawn(async move {
            let mut placed = Placed::default();
            for i in (0..n).filter(|i| i % 8 == client) {
                match bus.request(shop::order(i)).await? {
                    Ok(id) => placed.ids.push(id),
                    Err(_) => placed.refused += 1,
                }
            }
            Ok::<_, tidings::RequestError>(placed)
        }));
    }
    let mut placed = Placed::default();
    for client in clients {
        let client = client.await??;
        placed.ids.extend(client.ids);
        placed.refused += client.refused;
    }
    bus.settled().await;
    Ok(placed)
}

/// Rebuilds the read model from the log while the bus runs: forget the views, reset both
/// groups to the start, wait until they have caught up.
async fn rebuild_read_model(bus: &Bus, shop: &Shop) -> Result<(), Box<dyn Error>> {
    shop.views.clear();
    let mut rebuilds = Vec::new();
    for group in read_model::GROUPS {
        rebuilds.push(bus.rebuild(group, StartFrom::Earliest).await?);
    }
    for rebuild in rebuilds {
        rebuild.caught_up().await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let store = std::env::var("SHOP_STORE").ok();
    let shop = Shop::new();
    let bus = shop.start(store.as_deref()).await?;
    // Ready: dead letters restored and every group caught up with its log (a health check
    // would answer "up" from here on).
    bus.ready().await;
    println!(
        "shop running {}",
        store
            .as_deref()
            .map_or("in memory".to_owned(), |s| format!("on {s}"))
    );

    let placed = run(&bus, ORDERS).await?;
    let summary = shop::check(&shop, &placed.ids)?;
    println!(
        "{ORDERS} orders: {} refused when placed, {} confirmed and shipped, {} cancelled",
        placed.refused, summary.confirmed, summary.cancelled
    );
    let earlier = shop.views.all().len() - placed.ids.len();
    if earlier > 0 {
        println!("the read model replayed {earlier} orders of earlier runs from the store");
    }
    if store.is_some() {
        rebuild_read_model(&bus, &shop).await?;
        shop::check(&shop, &placed.ids)?;
        println!(
            "read model rebuilt from the log while running: {} orders",
            shop.views.all().len()
        );
    }
    if let Some(view) = bus.request(GetOrder(placed.ids[0])).await? {
        println!("order {}: {view:?}", placed.ids[0]);
    }
    if std::env::args().any(|a| a == "--topology") {
        println!("{}", bus.topology().to_mermaid());
    }
    bus.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole flow, as `main` runs it: every order ends in one correct state.
    async fn whole_flow(store: Option<&str>) {
        let shop = Shop::new();
        let bus = shop.start(store).await.unwrap();
        bus.ready().await;
        let placed = run(&bus, 400).await.unwrap();
        let summary = shop::check(&shop, &placed.ids).unwrap();
        assert!(
            summary.confirmed > 0 && summary.cancelled > 0,
            "{summary:?}"
        );
        let id = placed.ids[0];
        let view = bus.request(GetOrder(id)).await.unwrap().unwrap();
        assert_eq!(view.order_id, id);
        if store.is_some() {
            rebuild_read_model(&bus, &shop).await.unwrap();
            shop::check(&shop, &placed.ids).unwrap();
        }
        let topology = bus.topology();
        let payments = topology
            .groups
            .iter()
            .find(|g| g.name == "payments")
            .unwrap();
        assert_eq!(payments.module.as_deref(), Some("payments"));
        assert_eq!(payments.events, ["OrderCancelled", "OrderPlaced"]);
        let saga = topology
            .groups
            .iter()
            .find(|g| g.name == "orders.saga")
            .unwrap();
        assert_eq!(
            saga.topics,
            ["inventory", "payments"],
            "one group, two topics"
        );
        bus.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_order_ends_in_one_correct_state_in_memory() {
        whole_flow(None).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_order_ends_in_one_correct_state_on_sqlite_and_after_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("shop.db").display());
        whole_flow(Some(&url)).await;
    }
}
