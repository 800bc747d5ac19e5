//! Notifications: tells the customer what became of the order, and when it ships.

use std::sync::{Arc, Mutex};

use tidings::prelude::*;

use crate::orders::{OrderCancelled, OrderConfirmed};
use crate::shipping::ShipmentDispatched;

/// The module's state: the messages sent (a real shop hands them to a mail service).
#[derive(Clone, Default)]
pub struct Outbox {
    sent: Arc<Mutex<Vec<String>>>,
}

impl Outbox {
    pub fn sent(&self) -> Vec<String> {
        self.sent.lock().unwrap().clone()
    }

    fn send(&self, message: String) {
        self.sent.lock().unwrap().push(message);
    }
}

pub struct Mailer {
    outbox: Outbox,
}

impl Mailer {
    pub fn new(outbox: &Outbox) -> Self {
        Mailer {
            outbox: outbox.clone(),
        }
    }
}

impl Handler<OrderConfirmed> for Mailer {
    async fn handle(&mut self, e: &Envelope<OrderConfirmed>, _: &Context) -> HandlerResult {
        self.outbox
            .send(format!("order {} confirmed", e.event().order_id));
        Ok(())
    }
}

impl Handler<OrderCancelled> for Mailer {
    async fn handle(&mut self, e: &Envelope<OrderCancelled>, _: &Context) -> HandlerResult {
        let order = e.event();
        self.outbox.send(format!(
            "order {} cancelled: {}",
            order.order_id, order.reason
        ));
        Ok(())
    }
}

impl Handler<ShipmentDispatched> for Mailer {
    async fn handle(&mut self, e: &Envelope<ShipmentDispatched>, _: &Context) -> HandlerResult {
        let shipment = e.event();
        self.outbox.send(format!(
            "order {} shipped: {}",
            shipment.order_id, shipment.tracking
        ));
        Ok(())
    }
}

/// The whole module's wiring.
pub fn module(outbox: Outbox) -> Module<Outbox> {
    Module::with_state("notifications", outbox)
        .subscribe::<(OrderConfirmed, OrderCancelled), _>("notifications", Mailer::new)
        .subscribe::<ShipmentDispatched, _>("notifications.shipping", Mailer::new)
}
