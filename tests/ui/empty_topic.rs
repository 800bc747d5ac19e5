use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, tidings::Event)]
#[event(topic = "")]
struct Pinged {
    n: u32,
}

fn main() {}
