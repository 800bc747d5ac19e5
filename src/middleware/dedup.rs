//! Deduplication: an event id is handled once per consumer group within a window.

use std::collections::VecDeque;
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
    /// The window this clone used last: a worker serves one group, so after its first event
    /// it skips the map.
    last: std::sync::OnceLock<(String, Arc<Mutex<Window>>)>,
}

impl MemoryDedupStore {
    /// An empty store with this window.
    pub fn new(window: DedupWindow) -> Self {
        MemoryDedupStore {
            window,
            groups: Arc::default(),
            last: std::sync::OnceLock::new(),
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

    /// Runs `f` on `group`'s window.
    fn with<R>(&self, group: &str, f: impl FnOnce(&mut Window) -> R) -> R {
        if let Some((name, window)) = self.last.get() {
            if name == group {
                return f(&mut window.lock());
            }
        }
        let window = Arc::clone(
            &self
                .groups
                .entry(group.to_owned())
                .or_insert_with(|| Arc::new(Mutex::new(Window::new(self.window)))),
        );
        let result = f(&mut window.lock());
        let _ = self.last.set((group.to_owned(), window));
        result
    }
}

impl DedupStore for MemoryDedupStore {
    fn check(&self) -> Result<(), String> {
        self.window.validate()
    }

    async fn claim(&self, group: &str, id: Uuid) -> Result<Claim, HandlerError> {
        Ok(self.with(group, |w| w.claim(id)))
    }

    async fn complete(&self, group: &str, id: Uuid) -> Result<(), HandlerError> {
        self.with(group, |w| w.complete(id));
        Ok(())
    }

    fn release(&self, group: &str, id: Uuid) {
        self.with(group, |w| w.release(id));
    }
}

/// Ids within a window: those being handled, and those done with the time they were claimed
/// (and a value remembered with them).
///
/// Built for a large window on the hot path: one hash map (Fx-hashed: ids are mostly random
/// bits already) holds both states, so a claim and its completion touch one bucket, and the
/// clock is read once per event, at the claim.
#[derive(Debug)]
pub(crate) struct Window<V = ()> {
    limits: DedupWindow,
    entries: rustc_hash::FxHashMap<Uuid, Entry<V>>,
    /// Done ids in the order they were marked, to forget the oldest first.
    order: VecDeque<(Instant, Uuid)>,
    /// Ids done (entries minus those in progress).
    done: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry<V> {
    /// When it was claimed (in progress) or marked done.
    at: Instant,
    state: Option<V>,
}

impl<V: Copy> Window<V> {
    pub(crate) fn new(limits: DedupWindow) -> Self {
        Window {
            limits,
            entries: rustc_hash::FxHashMap::default(),
            order: VecDeque::new(),
            done: 0,
        }
    }

    fn expired(&self, at: Instant, now: Instant) -> bool {
        self.limits
            .max_age
            .is_some_and(|age| now.saturating_duration_since(at) >= age)
    }

    fn evict(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.order.front() {
            let too_many = self
                .limits
                .max_entries
                .is_some_and(|n| self.order.len() > n);
            if !(too_many || self.expired(at, now)) {
                break;
            }
            self.order.pop_front();
            // Forget it unless it was marked again since (or is being handled again).
            if let std::collections::hash_map::Entry::Occupied(e) = self.entries.entry(id) {
                if e.get().at == at && e.get().state.is_some() {
                    e.remove();
                    self.done -= 1;
                }
            }
        }
    }

    pub(crate) fn claim(&mut self, id: Uuid) -> Claim {
        let now = Instant::now();
        let claim = match self.entries.get(&id) {
            Some(e) if e.state.is_some() && !self.expired(e.at, now) => Claim::Processed,
            Some(e) if e.state.is_none() => Claim::InProgress,
            _ => Claim::New,
        };
        if claim == Claim::New {
            if let Some(old) = self.entries.insert(
                id,
                Entry {
                    at: now,
                    state: None,
                },
            ) {
                // An expired mark: forgotten now.
                if old.state.is_some() {
                    self.done -= 1;
                }
            }
        }
        claim
    }

    /// Marks a claimed `id` done (or an unclaimed one, for producer-side deduplication).
    pub(crate) fn complete_with(&mut self, id: Uuid, value: V) {
        let at = match self.entries.get_mut(&id) {
            Some(e) if e.state.is_none() => {
                e.state = Some(value);
                e.at
            }
            _ => {
                let now = Instant::now();
                let old = self.entries.insert(
                    id,
                    Entry {
                        at: now,
                        state: Some(value),
                    },
                );
                if old.is_some_and(|e| e.state.is_some()) {
                    self.done -= 1;
                }
                now
            }
        };
        self.done += 1;
        self.order.push_back((at, id));
        self.evict(at);
    }

    pub(crate) fn release(&mut self, id: Uuid) {
        if let std::collections::hash_map::Entry::Occupied(e) = self.entries.entry(id) {
            if e.get().state.is_none() {
                e.remove();
            }
        }
    }

    /// The value remembered with `id`, if it is within the window.
    pub(crate) fn get(&mut self, id: Uuid) -> Option<V> {
        let now = Instant::now();
        self.evict(now);
        self.entries
            .get(&id)
            .and_then(|e| e.state.filter(|_| !self.expired(e.at, now)))
    }

    pub(crate) fn len(&self) -> usize {
        self.done
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
/// group. A skipped duplicate is acknowledged: it counts as handled, and as a duplicate, in
/// [`Bus::stats`](crate::Bus::stats), and is logged at `debug` level.
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
                next.note_duplicate();
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
            // Disarmed only once marked: a failed or cancelled `complete` releases the claim.
            self.store.complete(group, id).await?;
            claimed.armed = false;
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
