//! Without a store, `start_from` and `reset_to` are accepted and mean the start of the process:
//! the same module code runs in memory and on a store, and an in-memory group so configured gets
//! every event published after the bus was built, as any group does.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "start_without_store", key = n, name = "start_without_store.Tick")]
struct Tick {
    n: u32,
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<u32>>>);

impl Handler<Tick> for Seen {
    async fn handle(&mut self, event: &Envelope<Tick>, _: &Context) -> HandlerResult {
        self.0.lock().unwrap().push(event.event().n);
        Ok(())
    }
}

#[tokio::test]
async fn start_from_and_reset_to_build_without_a_store_and_take_every_event_since_the_build() {
    let starts = [
        Subscription::new("earliest").start_from(StartFrom::Earliest),
        Subscription::new("latest").start_from(StartFrom::Latest),
        Subscription::new("an_hour_ago").start_from(StartFrom::Timestamp(
            SystemTime::now() - Duration::from_secs(3600),
        )),
        Subscription::new("reset").reset_to(StartFrom::Earliest),
    ];
    let mut seen = Vec::new();
    let mut builder = Bus::builder().topic(TopicConfig::new("start_without_store").partitions(1));
    for subscription in starts {
        let handler = Seen::default();
        seen.push(handler.clone());
        builder = builder.subscribe::<Tick, _>(subscription, move || handler.clone());
    }
    let bus = builder
        .build()
        .expect("start_from / reset_to build without a store");
    for n in 0..5 {
        bus.publish(Tick { n }).await.unwrap();
    }
    bus.settled().await;
    for handler in &seen {
        assert_eq!(*handler.0.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }
    bus.shutdown().await;
}
