//! The core: moves a publish into partition queues and a request to its handler's queue. It
//! knows no handler, no middleware and no store I/O; the layers above plug in through
//! [`Append`](append::Append) (where a publish goes when the bus keeps a log) and through the
//! queues they drain.
//!
//! Files, in the order a publish meets them: [`route`] (which topic, partition and groups),
//! [`publish`] (into the queues, or to the log through [`append`]), [`queue`] (the partition
//! queues), [`catch_up`] (with a log: live or catching up), [`pending`] (what is not finished),
//! [`request`] (request/reply).
//!
//! # Performance
//!
//! The publish path crosses several files; the small functions it calls in another module
//! (`Core::route`, `Core::place`, `Topic::partition_for`, `Partition::lock` / `wake`) are
//! `#[inline]`, so that splitting the code did not cost cross-unit calls: callgrind, 100k p2p
//! events, 120.4 M instructions without them, 111.4 M with (118.4 M for the same optimizations
//! in the single-file layout before this one).

pub(crate) mod append;
pub(crate) mod catch_up;
pub(crate) mod pending;
pub(crate) mod publish;
pub(crate) mod queue;
pub(crate) mod request;
pub(crate) mod route;
pub(crate) mod seen;

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use rustc_hash::FxHashMap;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::envelope::AnyEnvelope;
use crate::publish::{Failure, Published};
use crate::store::{Decoder, Store};
use crate::window::Window;

use append::Append;
use pending::Pending;
use queue::Topic;
use request::CommandEntry;
use route::Route;
use seen::Sightings;

/// The shared state every handle of a bus reaches: topics and their queues, routes, command
/// queues, what is pending, intake and the shutdown signal. Workers, [`Context`](crate::Context)
/// and [`DeadLetters`](crate::dead_letter::DeadLetters) hold an `Arc<Core>`; only the facade
/// (`Bus`) holds the rest (dead-letter queues, tasks, the durable layer).
pub(crate) struct Core {
    pub(crate) topics: Vec<Arc<Topic>>,
    pub(crate) topic_index: HashMap<String, usize>,
    /// Per topic index: typed slots by event type, and the slots of `subscribe_all` groups.
    pub(crate) typed_slots: HashMap<(usize, TypeId), Vec<usize>>,
    pub(crate) any_slots: Vec<Vec<usize>>,
    /// Fx-hashed: looked up on every publish, keyed by `TypeId`, which is a hash already.
    pub(crate) routes: FxHashMap<TypeId, Route>,
    pub(crate) dynamic_routes: DashMap<TypeId, Arc<Route>>,
    /// Topics published to without any subscription or configuration.
    pub(crate) unsubscribed_topics: DashMap<String, Arc<Topic>>,
    pub(crate) commands: FxHashMap<TypeId, CommandEntry>,
    pub(crate) request_timeout: Duration,
    /// Deliveries and requests accepted but not yet finished.
    pub(crate) pending: Pending,
    pub(crate) intake_open: AtomicBool,
    pub(crate) cancel: CancellationToken,
    pub(crate) recorder: Option<Recorder>,
    /// Producer-side deduplication: ids published with an explicit id, and their receipts.
    pub(crate) publish_dedup: Option<parking_lot::Mutex<Window<Published, (&'static str, Uuid)>>>,
    /// With a store: where publishes go (the durable layer's appender).
    pub(crate) append: Option<Arc<dyn Append>>,
    /// With a store: the store and how its rows are read back (dead letters are saved in it and
    /// redriven from it).
    pub(crate) log: Option<Log>,
    /// Who published what and sent which command, for `Bus::topology`.
    pub(crate) sightings: Sightings,
}

/// The store behind a durable bus, as the layers above the core reach it.
#[derive(Clone)]
pub(crate) struct Log {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) decoder: Arc<Decoder>,
}

/// What a bus built with [`BusBuilder::record`](crate::BusBuilder::record) keeps.
#[derive(Default)]
pub(crate) struct Recorder {
    pub(crate) published: Mutex<Vec<AnyEnvelope>>,
    pub(crate) failures: Mutex<Vec<Failure>>,
}

/// A poisoned lock is still used: what it guards stays consistent (pushes only).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Core {
    /// Whether the bus still takes events from outside.
    pub(crate) fn is_open(&self) -> bool {
        self.intake_open.load(Ordering::SeqCst)
    }

    /// Marks `n` deliveries or requests as finished.
    pub(crate) fn finish(&self, n: usize) {
        self.pending.finish(n);
    }

    pub(crate) fn record_failure(&self, failure: impl FnOnce() -> Failure) {
        if let Some(recorder) = &self.recorder {
            lock(&recorder.failures).push(failure());
        }
    }

    pub(crate) fn all_topics(&self) -> Vec<Arc<Topic>> {
        let mut topics: Vec<Arc<Topic>> = self.topics.clone();
        let mut extra: Vec<Arc<Topic>> = self
            .unsubscribed_topics
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        extra.sort_by(|a, b| a.name.cmp(&b.name));
        topics.extend(extra);
        topics
    }

    pub(crate) fn close_queues(&self) {
        for entry in self.commands.values() {
            (entry.stop)();
        }
        for topic in self.all_topics() {
            for part in topic.partitions.iter() {
                part.close();
            }
        }
    }
}
