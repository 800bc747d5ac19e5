use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, tidings::Event)]
#[event(topic = "orders", version = 0)]
struct OrderCreated {
    order_id: u64,
}

fn main() {}
