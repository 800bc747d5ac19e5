use serde::{Deserialize, Serialize};
use tidings::{Bus, Context, Envelope, Handler, HandlerResult};

#[derive(Serialize, Deserialize, tidings::Event)]
#[event(topic = "orders", key = order)]
struct Placed {
    order: u32,
}

#[derive(Serialize, Deserialize, tidings::Event)]
#[event(topic = "orders", key = order)]
struct Paid {
    order: u32,
}

struct Orders;

impl Handler<Placed> for Orders {
    async fn handle(&mut self, _: &Envelope<Placed>, _: &Context) -> HandlerResult {
        Ok(())
    }
}

fn main() {
    // No `Handler<Paid>` for `Orders`: refused at compile time, naming the missing impl.
    let _ = Bus::builder().subscribe::<(Placed, Paid), _>("orders", || Orders);
}
