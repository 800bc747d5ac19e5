use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, tidings::Event)]
#[event(key = order_id)]
struct OrderCreated {
    order_id: u64,
}

fn main() {}
