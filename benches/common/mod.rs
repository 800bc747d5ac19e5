//! What the benches share: the runtime, a 64-byte event, and a counting handler.
#![allow(dead_code)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tokio::runtime::Runtime;

/// The machine has 2 cores: a multi-thread runtime with 2 workers, as services run.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A 64-byte event.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Event)]
#[event(topic = "bench.events", key = key)]
pub struct Ev {
    /// Partition key.
    pub key: u64,
    /// Padding to 64 bytes.
    pub payload: [u64; 7],
}

impl Ev {
    /// Event number `i`.
    pub fn new(i: u64) -> Self {
        Ev {
            key: i,
            payload: [i; 7],
        }
    }
}

/// A counter on cache lines of its own, so that several groups' counters do not falsely share
/// a line (the mpsc baselines count in locals; this keeps the comparison about the bus).
#[derive(Default)]
#[repr(align(128))]
pub struct Counter(AtomicU64);

impl std::ops::Deref for Counter {
    type Target = AtomicU64;
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

/// Counts what it handles.
pub struct Sink {
    /// Where it counts.
    pub handled: Arc<Counter>,
}

impl Handler<Ev> for Sink {
    async fn handle(&mut self, e: &Envelope<Ev>, _: &Context) -> Result<(), HandlerError> {
        black_box(e.event().payload[0]);
        self.handled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
