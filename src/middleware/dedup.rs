//! Deduplication: an event id is handled once per consumer group within a window.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::time::Instant;
use uuid::Uuid;

use super::{LayerKind, Middleware, Next};
use crate::envelope::AnyEnvelope;
use crate::handler::{HandlerError, HandlerResult};

/// How long, or for how many ids, a processed id is remembered.
///
/// An id is forgotten when it is older than `max_age` or when more than `max_entries` newer ids
/// were marked after it, whichever comes first; a duplicate that arrives later is handled again.
/// Default: 10 minutes and 100 000 ids.
///
/// ```
/// use std::time::Duration;
/// use tidings::DedupWindow;
///
/// let window = DedupWindow::new().max_age(Duration::from_secs(3600)).max_entries(1_000_000);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupWindow {
    pub(crate) max_age: Option<Duration>,
    pub(crate) max_entries: Option<usize>,
}

impl Default for DedupWindow {
    fn default() -> Self {
        DedupWindow {
            max_age: Some(Duration::from_secs(600)),
            max_entries: Some(100_000),
        }
    }
}

impl DedupWindow {
    /// The default window: 10 minutes, 100 000 ids.
    pub fn new() -> Self {
        DedupWindow::default()
    }

    /// Forget ids older than `age`.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Remember ids however old (then `max_entries` alone bounds the window).
    pub fn no_max_age(mut self) -> Self {
        self.max_age = None;
        self
    }

    /// Remember at most `n` ids.
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = Some(n);
        self
    }

    /// Remember any number of ids (then `max_age` alone bounds the window).
    pub fn no_max_entries(mut self) -> Self {
        self.max_entries = None;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        match (self.max_age, self.max_entries) {
            (None, None) => Err("DedupWindow: set max_age or max_entries (or both), or the memory of processed ids grows without bound".into()),
            (_, Some(0)) => Err("DedupWindow: max_entries must be at least 1".into()),
            (Some(age), _) if age.is_zero() => Err("DedupWindow: max_age must not be zero".into()),
            _ => Ok(()),
        }
    }
}

/// What [`DedupStore::claim`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Not seen: handle it, then [`complete`](DedupStore::complete) or
    /// [`release`](DedupStore::release).
    New,
    /// Already handled successfully within the window: skip it.
    Processed,
    /// Being handled right now by another delivery of the same id: skip it (that delivery
    /// retries or dead-letters it, so nothing is lost).
    InProgress,
}

/// Where [`Dedup`] remembers the ids a group has handled.
///
/// [`MemoryDedupStore`] keeps them in memory (lost on restart). A durable store implements this
/// trait on its database, marking an id in the same transaction as the group's offset.
pub trait DedupStore: Clone + Send + Sync + 'static {
    /// Claims `id` for `group` before it is handled.
    fn claim(
        &self,
        group: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<Claim, HandlerError>> + Send;
    /// Marks a claimed `id` processed: the handler succeeded.
    fn complete(
        &self,
        group: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
    /// Checks the store's settings when the bus is built.
    #[doc(hidden)]
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    /// Gives a claim up: the handler failed (or its call was cancelled), so the id stays
    /// unprocessed. Called from a drop guard too, so it cannot wait.
    fn release(&self, group: &str, id: Uuid);
}

/// Ids remembered in memory, per group, within a [`DedupWindow`]. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct MemoryDedupStore {
    window: DedupWindow,
    groups: Arc<DashMap<String, Arc<Mutex<Window>>>>,
}

impl MemoryDedupStore {
    /// An empty store with this window.
    pub fn new(window: DedupWindow) -> Self {
        MemoryDedupStore {
            window,
            groups: Arc::default(),
        }
    }

    /// How many processed ids `group` remembers now.
    pub fn len(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, |w| w.lock().len())
    }

    /// Whether `group` remembers no id.
    pub fn is_empty(&self, group: &str) -> bool {
        self.len(group) == 0
    }

    fn group(&self, group: &str) -> Arc<Mutex<Window>> {
        if let Some(w) = self.groups.get(group) {
            return Arc::clone(&w);
        }
        Arc::clone(
            &self
                .groups
                .entry(group.to_owned())
                .or_insert_with(|| Arc::new(Mutex::new(Window::new(self.window)))),
        )
    }
}

impl DedupStore for MemoryDedupStore {
    fn check(&self) -> Result<(), String> {
        self.window.validate()
    }

    async fn claim(&self, group: &str, id: Uuid) -> Result<Claim, HandlerError> {
        Ok(self.group(group).lock().claim(id))
    }

    async fn complete(&self, group: &str, id: Uuid) -> Result<(), HandlerError> {
        self.group(group).lock().complete(id);
        Ok(())
    }

    fn release(&self, group: &str, id: Uuid) {
        self.group(group).lock().release(id);
    }
}

/// Ids within a window: those being handled, and those done with the time they were done (and
/// a value remembered with them).
#[derive(Debug)]
pub(crate) struct Window<V = ()> {
    limits: DedupWindow,
    in_progress: HashMap<Uuid, ()>,
    done: HashMap<Uuid, (Instant, V)>,
    /// Done ids in the order they were marked, to forget the oldest first.
    order: VecDeque<(Instant, Uuid)>,
}

impl<V: Copy> Window<V> {
    pub(crate) fn new(limits: DedupWindow) -> Self {
        Window {
            limits,
            in_progress: HashMap::new(),
            done: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn evict(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.order.front() {
            let too_many = self
                .limits
                .max_entries
                .is_some_and(|n| self.order.len() > n);
            let too_old = self
                .limits
                .max_age
                .is_some_and(|age| now.duration_since(at) >= age);
            if !(too_many || too_old) {
                break;
            }
            self.order.pop_front();
            // Forget it unless it was marked again since.
            if self.done.get(&id).is_some_and(|(t, _)| *t == at) {
                self.done.remove(&id);
            }
        }
    }

    pub(crate) fn claim(&mut self, id: Uuid) -> Claim {
        self.evict(Instant::now());
        if self.done.contains_key(&id) {
            Claim::Processed
        } else if self.in_progress.insert(id, ()).is_some() {
            Claim::InProgress
        } else {
            Claim::New
        }
    }

    pub(crate) fn complete_with(&mut self, id: Uuid, value: V) {
        let now = Instant::now();
        self.in_progress.remove(&id);
        self.done.insert(id, (now, value));
        self.order.push_back((now, id));
        self.evict(now);
    }

    pub(crate) fn release(&mut self, id: Uuid) {
        self.in_progress.remove(&id);
    }

    /// The value remembered with `id`, if it is within the window.
    pub(crate) fn get(&mut self, id: Uuid) -> Option<V> {
        self.evict(Instant::now());
        self.done.get(&id).map(|(_, v)| *v)
    }

    pub(crate) fn len(&self) -> usize {
        self.done.len()
    }
}

impl Window<()> {
    pub(crate) fn complete(&mut self, id: Uuid) {
        self.complete_with(id, ());
    }
}

struct Claimed<'a, S: DedupStore> {
    store: &'a S,
    group: &'a str,
    id: Uuid,
    armed: bool,
}

impl<S: DedupStore> Drop for Claimed<'_, S> {
    fn drop(&mut self) {
        if self.armed {
            self.store.release(self.group, self.id);
        }
    }
}

/// Skips events whose id this group has already handled successfully within a window; marks an
/// id only once the rest of the chain succeeded (a failure leaves it unmarked, so a redelivery
/// or a redrive handles it).
///
/// Keyed by (group, event id): an event fanned out to several groups is handled once per
/// group. A skipped duplicate counts as handled (acknowledged) and is logged at `debug` level.
///
/// ```
/// use std::time::Duration;
/// use tidings::{Dedup, DedupWindow, Retry, Subscription};
///
/// let ledger = Subscription::new("ledger")
///     .layer(Retry::new(5))
///     .layer(Dedup::new(DedupWindow::new().max_age(Duration::from_secs(3600))));
/// ```
#[derive(Clone, Debug)]
pub struct Dedup<S = MemoryDedupStore> {
    store: S,
}

impl Dedup<MemoryDedupStore> {
    /// Deduplication in memory within `window`.
    pub fn new(window: DedupWindow) -> Self {
        Dedup {
            store: MemoryDedupStore::new(window),
        }
    }
}

impl<S: DedupStore> Dedup<S> {
    /// Deduplication with your own store (a shared or durable one).
    pub fn with_store(store: S) -> Self {
        Dedup { store }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }
}

impl<S: DedupStore> Middleware for Dedup<S> {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        let group = next.context().group();
        let id = env.id();
        match self.store.claim(group, id).await? {
            Claim::New => {}
            claim => {
                tracing::debug!(group, event_id = %id, ?claim, "duplicate skipped");
                return Ok(());
            }
        }
        // Released if the call fails, and also if it is cancelled (an outer timeout).
        let mut claimed = Claimed {
            store: &self.store,
            group,
            id,
            armed: true,
        };
        let result = next.run(env).await;
        if result.is_ok() {
            claimed.armed = false;
            if let Err(err) = self.store.complete(group, id).await {
                self.store.release(group, id);
                return Err(err);
            }
        }
        result
    }

    fn kind(&self) -> LayerKind {
        LayerKind::Dedup
    }

    fn check(&self) -> Result<(), String> {
        self.store.check()
    }
}
