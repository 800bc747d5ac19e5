use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, tidings::Event)]
#[event(topic = "orders", key = order)]
struct OrderCreated {
    order_id: u64,
}

fn main() {}
