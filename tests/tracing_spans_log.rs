//! Without a tracing subscriber, the per-event spans still reach a `log` logger that takes INFO
//! records (tracing's `log` feature, on with the SQL stores), and only then are they built.
//!
//! In its own test binary: it installs the process's one `log` logger, and no tracing
//! subscriber may be set in this process.
#![cfg(any(feature = "sqlite", feature = "postgres"))]

use std::sync::Mutex;

#[path = "support/mod.rs"]
mod support;

use support::chain::{chain_bus, A};

/// Keeps every record's target and text.
struct Captured(Mutex<Vec<(String, String)>>);

impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let entry = (record.target().to_owned(), record.args().to_string());
        self.0.lock().unwrap().push(entry);
    }
    fn flush(&self) {}
}

static LOGGER: Captured = Captured(Mutex::new(Vec::new()));

fn handle_spans() -> usize {
    LOGGER
        .0
        .lock()
        .unwrap()
        .iter()
        // The record of a span's creation, under the span's own target (the worker's module).
        .filter(|(target, text)| {
            target == "tidings::runtime::supervise" && text.starts_with("tidings.handle; ")
        })
        .count()
}

fn run_chain() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bus = chain_bus();
        bus.publish(A { id: 7 }).await.unwrap();
        bus.shutdown().await;
    });
}

#[test]
fn spans_reach_a_log_logger_only_while_it_takes_info() {
    assert!(
        !tracing::dispatcher::has_been_set(),
        "this binary must not set a tracing subscriber"
    );
    log::set_logger(&LOGGER).unwrap();

    // The logger takes warnings only: no span is logged (and none is built).
    log::set_max_level(log::LevelFilter::Warn);
    run_chain();
    assert_eq!(handle_spans(), 0);

    // It takes INFO: one span per handled event of the chain A -> B -> C, with its fields.
    log::set_max_level(log::LevelFilter::Info);
    run_chain();
    assert_eq!(handle_spans(), 3, "{:?}", LOGGER.0.lock().unwrap());
    let logged = LOGGER.0.lock().unwrap();
    let (_, text) = logged
        .iter()
        .find(|(_, text)| text.starts_with("tidings.handle; "))
        .unwrap();
    assert!(text.contains("topic=chain."), "{text}");
    assert!(text.contains("group="), "{text}");
    assert!(text.contains("attempt=1"), "{text}");
}
