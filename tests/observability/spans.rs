//! A tracing span per handled event carries the event's coordinates.
//!
//! It installs a thread-local tracing subscriber, which tracing's per-callsite interest cache
//! makes unreliable while other tests run buses without a subscriber in the same process: see
//! `main.rs` for why it shares its binary with `unrouted_events` only.

use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::Layer;

use crate::support::chain::{chain_bus, A};

/// Records the fields of every `tidings.handle` span.
/// The fields of one span, as (name, value) text.
type SpanFields = Vec<(String, String)>;

#[derive(Clone, Default)]
struct SpanLog(Arc<Mutex<Vec<SpanFields>>>);

struct Fields(Vec<(String, String)>);
impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.push((field.name().to_owned(), value.to_string()));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl<S: Subscriber> Layer<S> for SpanLog {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: LayerContext<'_, S>) {
        if attrs.metadata().name() == "tidings.handle" {
            let mut fields = Fields(Vec::new());
            attrs.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }
}

#[test]
fn every_handled_event_gets_a_span_with_its_coordinates() {
    let log = SpanLog::default();
    let subscriber = tracing_subscriber::registry().with(log.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let root = rt.block_on(async {
        let bus = chain_bus();
        let root = bus.publish(A { id: 7 }).await.unwrap();
        bus.shutdown().await;
        root
    });
    let spans = log.0.lock().unwrap();
    assert_eq!(spans.len(), 3, "one span per handled event: {spans:?}");
    for fields in spans.iter() {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("span lacks {name}: {fields:?}"))
        };
        assert!(get("topic").starts_with("chain."));
        get("partition");
        get("offset");
        get("group");
        get("event_id");
        assert_eq!(get("correlation_id"), root.id.to_string());
        assert_eq!(get("attempt"), "1");
    }
    let a_span = spans
        .iter()
        .find(|f| f.iter().any(|(n, v)| n == "group" && v == "a-to-b"))
        .unwrap();
    assert!(a_span
        .iter()
        .any(|(n, v)| n == "event_id" && *v == root.id.to_string()));
}
