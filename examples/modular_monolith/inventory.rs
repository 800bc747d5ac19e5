//! Inventory: reserves stock for each placed order, releases it when the order is cancelled,
//! and answers stock queries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;

use crate::orders::{OrderCancelled, OrderPlaced};

/// The order's items are set aside.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "inventory", key = order_id)]
pub struct StockReserved {
    pub order_id: u64,
}

/// Not enough stock for the order.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "inventory", key = order_id)]
pub struct StockUnavailable {
    pub order_id: u64,
}

/// How many units of a SKU are on the shelf (not reserved).
#[derive(Debug, Clone)]
pub struct GetStock(pub String);

impl Command for GetStock {
    type Reply = u32;
}

/// The module's state: units on the shelf per SKU, and what each order holds.
#[derive(Clone, Default)]
pub struct Warehouse {
    shelves: Arc<Mutex<Shelves>>,
}

#[derive(Default)]
struct Shelves {
    units: HashMap<String, u32>,
    held: HashMap<u64, (String, u32)>,
}

impl Warehouse {
    pub fn stocked(items: &[(&str, u32)]) -> Self {
        let warehouse = Warehouse::default();
        warehouse.shelves.lock().unwrap().units =
            items.iter().map(|(s, n)| (s.to_string(), *n)).collect();
        warehouse
    }

    pub fn units(&self, sku: &str) -> u32 {
        self.shelves
            .lock()
            .unwrap()
            .units
            .get(sku)
            .copied()
            .unwrap_or(0)
    }
}

pub struct Stockkeeper {
    warehouse: Warehouse,
}

impl Stockkeeper {
    pub fn new(warehouse: &Warehouse) -> Self {
        Stockkeeper {
            warehouse: warehouse.clone(),
        }
    }
}

impl Handler<OrderPlaced> for Stockkeeper {
    async fn handle(&mut self, e: &Envelope<OrderPlaced>, ctx: &Context) -> HandlerResult {
        let order = e.event();
        let reserved = {
            let mut shelves = self.warehouse.shelves.lock().unwrap();
            let shelves = &mut *shelves;
            if shelves.held.contains_key(&order.order_id) {
                true // a redelivery: reserved already
            } else {
                match shelves.units.get_mut(&order.sku) {
                    Some(units) if *units >= order.qty => {
                        *units -= order.qty;
                        shelves
                            .held
                            .insert(order.order_id, (order.sku.clone(), order.qty));
                        true
                    }
                    _ => false,
                }
            }
        };
        let order_id = order.order_id;
        if reserved {
            ctx.publish(StockReserved { order_id }).await?;
        } else {
            ctx.publish(StockUnavailable { order_id }).await?;
        }
        Ok(())
    }
}

impl Handler<OrderCancelled> for Stockkeeper {
    async fn handle(&mut self, e: &Envelope<OrderCancelled>, _: &Context) -> HandlerResult {
        let mut shelves = self.warehouse.shelves.lock().unwrap();
        if let Some((sku, qty)) = shelves.held.remove(&e.event().order_id) {
            *shelves.units.entry(sku).or_default() += qty;
        }
        Ok(())
    }
}

pub struct StockQuery {
    warehouse: Warehouse,
}

impl CommandHandler<GetStock> for StockQuery {
    async fn handle(&mut self, sku: GetStock, _: &Context) -> Result<u32, HandlerError> {
        Ok(self.warehouse.units(&sku.0))
    }
}

/// The whole module's wiring.
pub fn module(warehouse: Warehouse) -> Module<Warehouse> {
    Module::with_state("inventory", warehouse)
        .topic(TopicConfig::new("inventory").partitions(4))
        .subscribe::<(OrderPlaced, OrderCancelled), _>("inventory", Stockkeeper::new)
        .command_handler::<GetStock, _>(|w| StockQuery {
            warehouse: w.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings::testing::TestContext;

    fn placed(order_id: u64, qty: u32) -> Envelope<OrderPlaced> {
        Envelope::new(OrderPlaced {
            order_id,
            customer: "ada".into(),
            sku: "lamp".into(),
            qty,
            cents: 100,
        })
    }

    #[tokio::test]
    async fn reserves_what_is_there_and_releases_it_on_cancel() {
        let warehouse = Warehouse::stocked(&[("lamp", 3)]);
        let mut keeper = Stockkeeper::new(&warehouse);
        let mut ctx = TestContext::new();
        ctx.call(&mut keeper, &placed(1, 2)).await.unwrap();
        ctx.call(&mut keeper, &placed(2, 2)).await.unwrap();
        assert_eq!(ctx.published_of::<StockReserved>()[0].event().order_id, 1);
        assert_eq!(
            ctx.published_of::<StockUnavailable>()[0].event().order_id,
            2
        );
        assert_eq!(warehouse.units("lamp"), 1);
        let cancelled = Envelope::new(OrderCancelled {
            order_id: 1,
            reason: "payment declined".into(),
        });
        ctx.call(&mut keeper, &cancelled).await.unwrap();
        assert_eq!(warehouse.units("lamp"), 3);
    }

    #[tokio::test]
    async fn a_redelivered_order_is_reserved_once() {
        let warehouse = Warehouse::stocked(&[("lamp", 3)]);
        let mut keeper = Stockkeeper::new(&warehouse);
        let mut ctx = TestContext::new();
        let order = placed(1, 2);
        ctx.call(&mut keeper, &order).await.unwrap();
        ctx.call(&mut keeper, &order).await.unwrap();
        assert_eq!(warehouse.units("lamp"), 1);
    }
}
