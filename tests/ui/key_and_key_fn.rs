use serde::{Deserialize, Serialize};

fn order_key(e: &OrderCreated) -> tidings::Key<'_> {
    tidings::Key::U64(e.order_id)
}

#[derive(Serialize, Deserialize, tidings::Event)]
#[event(topic = "orders", key = order_id, key_fn = order_key)]
struct OrderCreated {
    order_id: u64,
}

fn main() {}
