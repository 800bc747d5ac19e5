//! Events of a type no consumer group subscribes to (a typo in a topic name, a forgotten
//! subscription) are counted per topic and logged once per type, on every way of publishing,
//! with or without a store.
//!
//! It installs a global tracing subscriber to count the warnings (see `main.rs` for what that
//! asks of the other tests of its binary). Each test uses event types of its own, so the tests do
//! not see each other's warnings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::store::{MemoryStore, Store};
use tracing::field::{Field, Visit};
use tracing::{Event as TracingEvent, Level, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::Layer;

/// Warnings by the `event_type` field they carry.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<HashMap<String, usize>>>);

impl Warnings {
    fn about(&self, event_type: &str) -> usize {
        self.0.lock().unwrap().get(event_type).copied().unwrap_or(0)
    }
}

struct EventType(Option<String>);
impl Visit for EventType {
    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "event_type" {
            self.0 = Some(value.to_owned());
        }
    }
}

impl<S: Subscriber> Layer<S> for Warnings {
    fn on_event(&self, event: &TracingEvent<'_>, _: LayerContext<'_, S>) {
        if *event.metadata().level() != Level::WARN {
            return;
        }
        let mut visitor = EventType(None);
        event.record(&mut visitor);
        if let Some(name) = visitor.0 {
            *self.0.lock().unwrap().entry(name).or_default() += 1;
        }
    }
}

/// The process-wide warning counter.
fn warnings() -> Warnings {
    static WARNINGS: OnceLock<Warnings> = OnceLock::new();
    WARNINGS
        .get_or_init(|| {
            let warnings = Warnings::default();
            tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(warnings.clone()),
            )
            .expect("the only global subscriber of this binary");
            warnings
        })
        .clone()
}

/// The one subscribed type, on topic "work".
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "work", key = id)]
struct Job {
    id: u64,
}

/// Another type on "work": nobody subscribes to it.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "work", key = id)]
struct Stray {
    id: u64,
}

/// A topic name with a typo: no group anywhere.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "wrok", key = id)]
struct Typo {
    id: u64,
}

/// Published by the handler of `Job`, on a topic nobody subscribes to.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "follow-ups", key = id)]
struct FollowUp {
    id: u64,
}

/// Handles `Job`: publishes two `FollowUp`s (one with `publish`, one with `try_publish` when
/// the bus has no store).
struct Worker {
    durable: bool,
}

impl Handler<Job> for Worker {
    async fn handle(&mut self, e: &Envelope<Job>, ctx: &Context) -> Result<(), HandlerError> {
        let id = e.event().id;
        ctx.publish(FollowUp { id })
            .await
            .map_err(HandlerError::msg)?;
        if self.durable {
            ctx.publish(FollowUp { id })
                .await
                .map_err(HandlerError::msg)?;
        } else {
            ctx.try_publish(FollowUp { id })
                .map_err(HandlerError::msg)?;
        }
        Ok(())
    }
}

fn unrouted(bus: &Bus, topic: &str) -> u64 {
    bus.stats().topic(topic).map_or(0, |t| t.unrouted)
}

#[tokio::test]
async fn events_no_group_subscribes_to_are_counted_and_warned_about_once_per_type() {
    let warnings = warnings();
    let bus = Bus::builder()
        .subscribe::<Job, _>("workers", || Worker { durable: false })
        .build()
        .unwrap();
    for id in 0..3 {
        bus.publish(Job { id }).await.unwrap();
    }
    for id in 0..5 {
        bus.publish(Stray { id }).await.unwrap();
    }
    bus.publish_all((0..2).map(|id| Stray { id }))
        .await
        .unwrap();
    bus.try_publish(Stray { id: 9 }).unwrap();
    for id in 0..4 {
        bus.publish(Typo { id }).await.unwrap();
    }
    bus.settled().await;
    assert_eq!(unrouted(&bus, "work"), 8, "every Stray, and no Job");
    assert_eq!(unrouted(&bus, "wrok"), 4);
    assert_eq!(unrouted(&bus, "follow-ups"), 6, "2 per handled Job");
    let stats = bus.stats();
    assert_eq!(stats.unrouted(), 18);
    assert_eq!(stats.topic("work").unwrap().published, 11);
    assert_eq!(stats.group("workers").unwrap().handled, 3);
    assert_eq!(warnings.about("Stray"), 1, "once per type, not per event");
    assert_eq!(warnings.about("Typo"), 1);
    assert_eq!(warnings.about("FollowUp"), 1);
    assert_eq!(
        warnings.about("Job"),
        0,
        "a subscribed type is not warned about"
    );
    bus.shutdown().await;
}

/// With a store: the same type on every bus of this test.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "work", key = id)]
struct StoredStray {
    id: u64,
}

async fn durable_bus(store: Arc<dyn Store>) -> Bus {
    Bus::builder()
        .store(store)
        .topic(TopicConfig::new("work").partitions(1))
        .subscribe::<Job, _>("workers", || Worker { durable: true })
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_store_unrouted_events_are_appended_counted_and_warned_about() {
    let warnings = warnings();
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<Arc<dyn Store>> = vec![
        Arc::new(MemoryStore::new()),
        Arc::new(
            tidings::store::SqliteStore::open(dir.path().join("events.db"))
                .await
                .unwrap(),
        ),
    ];
    for (built, store) in stores.into_iter().enumerate() {
        let bus = durable_bus(Arc::clone(&store)).await;
        for id in 0..2 {
            bus.publish(Job { id }).await.unwrap();
        }
        for id in 0..3 {
            bus.publish(StoredStray { id }).await.unwrap();
        }
        bus.publish_all((0..4).map(|id| StoredStray { id }))
            .await
            .unwrap();
        bus.settled().await;
        assert_eq!(unrouted(&bus, "work"), 7, "every StoredStray, and no Job");
        assert_eq!(unrouted(&bus, "follow-ups"), 4, "2 per handled Job");
        assert_eq!(
            warnings.about("StoredStray"),
            built + 1,
            "once per type per bus"
        );
        bus.shutdown().await;
        let rows = store.read("work", 0, 0, 100).await.unwrap();
        assert_eq!(rows.len(), 9, "unrouted events are in the log too");
        assert_eq!(rows.iter().filter(|r| r.name == "StoredStray").count(), 7);
    }
}
