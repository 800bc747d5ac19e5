//! An online shop as a modular monolith: orders, payments, inventory, shipping, notifications
//! and a read model, one file each, talking only through events and commands.
//!
//! ```text
//! cargo run --example modular_monolith                            # in memory
//! SHOP_STORE=sqlite://shop.db cargo run --example modular_monolith  # on SQLite
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
use tidings::Bus;

const ORDERS: u64 = 1_000;

/// Places `n` orders from 8 concurrent clients and waits until every module is done.
async fn run(bus: &Bus, n: u64) -> Result<Vec<u64>, Box<dyn Error>> {
    let mut clients = Vec::new();
    for client in 0..8 {
        let bus = bus.clone();
        clients.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (0..n).filter(|i| i % 8 == client) {
                ids.push(bus.request(shop::order(i)).await?);
            }
            Ok::<_, tidings::RequestError>(ids)
        }));
    }
    let mut ids = Vec::new();
    for client in clients {
        ids.extend(client.await??);
    }
    bus.settled().await;
    Ok(ids)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let store = std::env::var("SHOP_STORE").ok();
    let shop = Shop::new();
    let bus = shop.start(store.as_deref()).await?;
    println!(
        "shop running {}",
        store
            .as_deref()
            .map_or("in memory".to_owned(), |s| format!("on {s}"))
    );

    let ids = run(&bus, ORDERS).await?;
    let summary = shop::check(&shop, &ids)?;
    println!(
        "{} orders: {} confirmed and shipped, {} cancelled",
        ids.len(),
        summary.confirmed,
        summary.cancelled
    );
    let earlier = shop.views.all().len() - ids.len();
    if earlier > 0 {
        println!("the read model replayed {earlier} orders of earlier runs from the store");
    }
    if let Some(view) = bus.request(GetOrder(ids[0])).await? {
        println!("order {}: {view:?}", ids[0]);
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
        let ids = run(&bus, 400).await.unwrap();
        let summary = shop::check(&shop, &ids).unwrap();
        assert!(
            summary.confirmed > 0 && summary.cancelled > 0,
            "{summary:?}"
        );
        let view = bus.request(GetOrder(ids[0])).await.unwrap().unwrap();
        assert_eq!(view.order_id, ids[0]);
        bus.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_order_ends_in_one_correct_state_in_memory() {
        whole_flow(None).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_order_ends_in_one_correct_state_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("shop.db").display());
        whole_flow(Some(&url)).await;
    }
}
