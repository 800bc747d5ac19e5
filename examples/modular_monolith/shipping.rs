//! Shipping: dispatches every confirmed order.

use serde::{Deserialize, Serialize};
use tidings::prelude::*;

use crate::orders::OrderConfirmed;

/// The parcel left the warehouse.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "shipping", key = order_id)]
pub struct ShipmentDispatched {
    pub order_id: u64,
    pub tracking: String,
}

#[derive(Default)]
pub struct Dispatcher;

impl Handler<OrderConfirmed> for Dispatcher {
    async fn handle(&mut self, e: &Envelope<OrderConfirmed>, ctx: &Context) -> HandlerResult {
        let order_id = e.event().order_id;
        let tracking = format!("TRK-{order_id:06}");
        ctx.publish(ShipmentDispatched { order_id, tracking })
            .await?;
        Ok(())
    }
}

/// The whole module's wiring.
pub fn module() -> Module {
    Module::new("shipping")
        .topic(TopicConfig::new("shipping").partitions(4))
        .subscribe::<OrderConfirmed, _>("shipping", |_| Dispatcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings::testing::TestContext;

    #[tokio::test]
    async fn a_confirmed_order_is_dispatched_with_a_tracking_number() {
        let mut ctx = TestContext::new();
        let confirmed = Envelope::new(OrderConfirmed { order_id: 42 });
        ctx.call(&mut Dispatcher, &confirmed).await.unwrap();
        let out = ctx.published_of::<ShipmentDispatched>();
        assert_eq!(out[0].event().tracking, "TRK-000042");
        assert_eq!(out[0].correlation_id(), confirmed.correlation_id());
    }
}
