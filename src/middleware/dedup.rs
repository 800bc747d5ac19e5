//! Deduplication: an event id is handled once per consumer group within a window.

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
/// A duplicate is caught while its id is younger than `max_age` and fewer than `max_entries`
/// newer ids were marked after it. Past `max_age` an id is forgotten; past `max_entries` newer
/// ids it may be: memory is reclaimed a generation of `max_entries` ids at a time, so up to
/// twice that many are held, and a duplicate that arrives later may be handled again.
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

/// Ids within a window: those being handled, and those done with the time they were done (and
/// a value remembered with them).
///
/// Built for a large window on the hot path. Done ids are kept in two generations: new marks go
/// to the current one; when it holds `max_entries` ids or began `max_age` ago, it becomes the
/// previous one and the old previous one is dropped whole. So forgetting costs nothing per id
/// (no per-id eviction, which in a large table means a cache miss per event), a lookup of a new
/// id only reads the tables' control bytes, and an id is remembered for its full `max_age`
/// (checked at lookup) and for at least the next `max_entries` marks — up to twice that many
/// ids are held.
#[derive(Debug)]
pub(crate) struct Window<V = (), K = Uuid> {
    limits: DedupWindow,
    in_progress: rustc_hash::FxHashSet<K>,
    current: rustc_hash::FxHashMap<K, (Instant, V)>,
    previous: rustc_hash::FxHashMap<K, (Instant, V)>,
    /// When the current generation got its first mark.
    current_since: Option<Instant>,
    /// The latest marks, moved into `current` a batch at a time: inserting into a large table
    /// misses the cache, and a batch of inserts lets those misses overlap instead of each
    /// stalling the lock release that follows it.
    staged: Vec<(K, Instant, V)>,
}

/// Marks staged before they go into the table.
const STAGED: usize = 32;

impl<V: Copy, K: std::hash::Hash + Eq + Copy> Window<V, K> {
    pub(crate) fn new(limits: DedupWindow) -> Self {
        Window {
            limits,
            in_progress: rustc_hash::FxHashSet::default(),
            current: rustc_hash::FxHashMap::default(),
            previous: rustc_hash::FxHashMap::default(),
            current_since: None,
            staged: Vec::with_capacity(STAGED),
        }
    }

    fn expired(&self, at: Instant, now: Instant) -> bool {
        self.limits
            .max_age
            .is_some_and(|age| now.saturating_duration_since(at) >= age)
    }

    /// The mark of `id`, if it is still within the window.
    fn lookup(&self, id: &K, now: Instant) -> Option<V> {
        let (at, value) = match self.staged.iter().rev().find(|(staged, _, _)| staged == id) {
            Some((_, at, value)) => (*at, *value),
            None => *self.current.get(id).or_else(|| self.previous.get(id))?,
        };
        (!self.expired(at, now)).then_some(value)
    }

    /// Moves the staged marks into the current generation.
    fn flush(&mut self) {
        for (id, at, value) in std::mem::take(&mut self.staged) {
            self.rotate(at);
            self.current.insert(id, (at, value));
        }
        self.staged.reserve(STAGED);
    }

    /// Starts a new generation when the current one is full or old enough.
    fn rotate(&mut self, now: Instant) {
        let full = self
            .limits
            .max_entries
            .is_some_and(|n| self.current.len() >= n);
        let old = self
            .current_since
            .is_some_and(|since| self.expired(since, now));
        if full || old {
            let capacity = self.current.len();
            self.previous = std::mem::replace(
                &mut self.current,
                rustc_hash::FxHashMap::with_capacity_and_hasher(capacity, Default::default()),
            );
            self.current_since = None;
        }
        if self.current_since.is_none() {
            self.current_since = Some(now);
        }
    }

    pub(crate) fn claim(&mut self, id: K) -> Claim {
        if self.lookup(&id, Instant::now()).is_some() {
            return Claim::Processed;
        }
        if !self.in_progress.insert(id) {
            return Claim::InProgress;
        }
        Claim::New
    }

    /// Marks a claimed `id` done (or an unclaimed one, for producer-side deduplication).
    pub(crate) fn complete_with(&mut self, id: K, value: V) {
        // Stamped now, under the lock: a mark lives `max_age` from when it was made, and the
        // stamps grow in the order the marks are staged, which generations rely on.
        self.in_progress.remove(&id);
        let at = Instant::now();
        self.staged.push((id, at, value));
        if self.staged.len() >= self.limits.max_entries.map_or(STAGED, |n| n.min(STAGED)) {
            self.flush();
        }
    }

    pub(crate) fn release(&mut self, id: K) {
        self.in_progress.remove(&id);
    }

    /// The value remembered with `id`, if it is within the window.
    pub(crate) fn get(&mut self, id: K) -> Option<V> {
        self.lookup(&id, Instant::now())
    }

    /// Ids held (some may be past their age and not reclaimed yet).
    pub(crate) fn len(&self) -> usize {
        self.staged.len() + self.current.len() + self.previous.len()
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
