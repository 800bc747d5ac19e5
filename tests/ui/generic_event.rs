use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, tidings::Event)]
#[event(topic = "boxes")]
struct Boxed<T> {
    inner: T,
}

fn main() {}
