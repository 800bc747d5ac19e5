//! The application: its modules' state, the bus they run on, and the checks that every order
//! ended in one correct state.

use std::collections::{HashMap, HashSet};
use std::error::Error;

use tidings::{store, Bus};

use crate::inventory::{self, Warehouse};
use crate::notifications::{self, Outbox};
use crate::orders::{self, OrderBook, PlaceOrder};
use crate::payments::{self, Ledger};
use crate::read_model::{self, Views};
use crate::shipping;

pub const SKUS: [(&str, u32); 3] = [("lamp", 700), ("desk", 500), ("chair", 900)];
pub const CARD_LIMIT_CENTS: u64 = 50_000;

/// Every module's state, kept by `main` to look at after a run.
#[derive(Clone)]
pub struct Shop {
    pub book: OrderBook,
    pub ledger: Ledger,
    pub warehouse: Warehouse,
    pub outbox: Outbox,
    pub views: Views,
}

impl Shop {
    pub fn new() -> Self {
        Shop {
            book: OrderBook::default(),
            ledger: Ledger::new(CARD_LIMIT_CENTS),
            warehouse: Warehouse::stocked(&SKUS),
            outbox: Outbox::default(),
            views: Views::default(),
        }
    }

    /// The bus, with every module. `store`: `None` runs in memory; a URL (`sqlite://shop.db`,
    /// `postgres://…`, `memory:`) keeps the events there. Nothing else changes.
    pub async fn start(&self, store: Option<&str>) -> Result<Bus, Box<dyn Error>> {
        let mut bus = Bus::builder();
        if let Some(url) = store {
            bus = bus.store(store::connect(url).await?);
        }
        let bus = bus
            .module(orders::module(self.book.clone()))
            .module(payments::module(self.ledger.clone()))
            .module(inventory::module(self.warehouse.clone()))
            .module(shipping::module())
            .module(notifications::module(self.outbox.clone()))
            .module(read_model::module(self.views.clone()))
            .build()?;
        Ok(bus)
    }
}

/// The `n`th order of a run: some over the card limit, some more than the stock.
pub fn order(n: u64) -> PlaceOrder {
    let (sku, _) = SKUS[(n % 3) as usize];
    PlaceOrder {
        customer: ["ada", "bob", "cy", "dee"][(n % 4) as usize].to_owned(),
        sku: sku.to_owned(),
        qty: 1 + (n % 4) as u32,
        cents: 1_000 + (n * 7_919) % 60_000,
    }
}

/// What a run came to.
#[derive(Debug, PartialEq)]
pub struct Summary {
    pub confirmed: usize,
    pub cancelled: usize,
}

/// Checks that each of `ids` ended in exactly one correct final state, and that stock, money
/// and messages add up.
pub fn check(shop: &Shop, ids: &[u64]) -> Result<Summary, String> {
    let placed: HashSet<u64> = ids.iter().copied().collect();
    // With a store the read model also has the orders of earlier runs, replayed.
    let views: Vec<_> = shop
        .views
        .all()
        .into_iter()
        .filter(|v| placed.contains(&v.order_id))
        .collect();
    if views.len() != ids.len() {
        return Err(format!(
            "{} orders placed, {} in the read model",
            ids.len(),
            views.len()
        ));
    }
    let (mut confirmed, mut cancelled, mut kept_cents) = (0, 0, 0);
    let mut sold: HashMap<&str, u32> = HashMap::new();
    for v in &views {
        match (v.confirmed, &v.cancelled, &v.tracking) {
            (true, None, Some(_)) => {
                confirmed += 1;
                kept_cents += v.cents;
                *sold.entry(v.sku.as_str()).or_default() += v.qty;
            }
            (false, Some(_), None) => cancelled += 1,
            _ => {
                return Err(format!(
                    "order {} ended in no correct state: {v:?}",
                    v.order_id
                ))
            }
        }
    }
    for (sku, stocked) in SKUS {
        let left = shop.warehouse.units(sku);
        let sold = sold.get(sku).copied().unwrap_or(0);
        if left + sold != stocked {
            return Err(format!(
                "{sku}: {stocked} stocked, {sold} sold, {left} left"
            ));
        }
    }
    if shop.ledger.balance() != kept_cents {
        return Err(format!(
            "the ledger keeps {} cents, confirmed orders are worth {kept_cents}",
            shop.ledger.balance()
        ));
    }
    let messages = shop.outbox.sent().len();
    if messages != ids.len() + confirmed {
        return Err(format!(
            "{messages} messages for {} orders of which {confirmed} shipped",
            ids.len()
        ));
    }
    Ok(Summary {
        confirmed,
        cancelled,
    })
}
