//! The read model: a projection of every order, kept in memory and queried with `GetOrder`.
//! It replays the logs from the start at every start (`reset_to(Earliest)`), so with a store
//! it comes back whole after a restart; in memory it starts empty, as the process does.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tidings::prelude::*;
use tidings::CommandOptions;

use crate::orders::{OrderCancelled, OrderConfirmed, OrderPlaced};
use crate::shipping::ShipmentDispatched;

/// One order as the shop's pages show it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrderView {
    pub order_id: u64,
    pub customer: String,
    pub sku: String,
    pub qty: u32,
    pub cents: u64,
    pub confirmed: bool,
    pub cancelled: Option<String>,
    pub tracking: Option<String>,
}

/// Looks one order up.
#[derive(Debug, Clone)]
pub struct GetOrder(pub u64);

impl Command for GetOrder {
    type Reply = Option<OrderView>;
}

/// The module's state: the views.
#[derive(Clone, Default)]
pub struct Views {
    orders: Arc<RwLock<HashMap<u64, OrderView>>>,
}

impl Views {
    /// Forgets every view (before a rebuild from the log).
    pub fn clear(&self) {
        self.orders.write().unwrap().clear();
    }

    pub fn all(&self) -> Vec<OrderView> {
        let mut all: Vec<_> = self.orders.read().unwrap().values().cloned().collect();
        all.sort_by_key(|v| v.order_id);
        all
    }

    fn update(&self, order_id: u64, f: impl FnOnce(&mut OrderView)) {
        let mut orders = self.orders.write().unwrap();
        let view = orders.entry(order_id).or_default();
        view.order_id = order_id;
        f(view);
    }
}

pub struct Projector {
    views: Views,
}

impl Projector {
    pub fn new(views: &Views) -> Self {
        Projector {
            views: views.clone(),
        }
    }
}

impl Handler<OrderPlaced> for Projector {
    async fn handle(&mut self, e: &Envelope<OrderPlaced>, _: &Context) -> HandlerResult {
        let o = e.event();
        self.views.update(o.order_id, |v| {
            v.customer.clone_from(&o.customer);
            v.sku.clone_from(&o.sku);
            v.qty = o.qty;
            v.cents = o.cents;
        });
        Ok(())
    }
}

impl Handler<OrderConfirmed> for Projector {
    async fn handle(&mut self, e: &Envelope<OrderConfirmed>, _: &Context) -> HandlerResult {
        self.views
            .update(e.event().order_id, |v| v.confirmed = true);
        Ok(())
    }
}

impl Handler<OrderCancelled> for Projector {
    async fn handle(&mut self, e: &Envelope<OrderCancelled>, _: &Context) -> HandlerResult {
        let reason = e.event().reason.clone();
        self.views
            .update(e.event().order_id, |v| v.cancelled = Some(reason));
        Ok(())
    }
}

impl Handler<ShipmentDispatched> for Projector {
    async fn handle(&mut self, e: &Envelope<ShipmentDispatched>, _: &Context) -> HandlerResult {
        let tracking = e.event().tracking.clone();
        self.views
            .update(e.event().order_id, |v| v.tracking = Some(tracking));
        Ok(())
    }
}

pub struct Query {
    views: Views,
}

impl CommandHandler<GetOrder> for Query {
    async fn handle(
        &mut self,
        q: GetOrder,
        _: &Context,
    ) -> Result<Option<OrderView>, HandlerError> {
        Ok(self.views.orders.read().unwrap().get(&q.0).cloned())
    }
}

/// The module's groups: one per topic it reads.
pub const GROUPS: [&str; 2] = ["read_model", "read_model.shipping"];

/// The whole module's wiring.
pub fn module(views: Views) -> Module<Views> {
    let replay = |group: &str| Subscription::new(group).reset_to(StartFrom::Earliest);
    Module::with_state("read_model", views)
        .subscribe::<(OrderPlaced, OrderConfirmed, OrderCancelled), _>(
            replay(GROUPS[0]),
            Projector::new,
        )
        .subscribe::<ShipmentDispatched, _>(replay(GROUPS[1]), Projector::new)
        // Queries do not wait behind each other: four instances take them.
        .command_handler_with::<GetOrder, _>(CommandOptions::pool(4), |views| Query {
            views: views.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings::testing::TestContext;

    #[tokio::test]
    async fn the_view_merges_events_in_whatever_order_the_topics_deliver_them() {
        let views = Views::default();
        let mut projector = Projector::new(&views);
        let mut ctx = TestContext::new();
        let shipped = Envelope::new(ShipmentDispatched {
            order_id: 5,
            tracking: "TRK-5".into(),
        });
        ctx.call(&mut projector, &shipped).await.unwrap();
        let placed = Envelope::new(OrderPlaced {
            order_id: 5,
            customer: "ada".into(),
            sku: "lamp".into(),
            qty: 1,
            cents: 100,
        });
        ctx.call(&mut projector, &placed).await.unwrap();
        let view = &views.all()[0];
        assert_eq!(view.customer, "ada");
        assert_eq!(view.tracking.as_deref(), Some("TRK-5"));
    }
}
