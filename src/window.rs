//! The bounded, aging id map behind producer-side deduplication and the [`Dedup`] middleware:
//! [`DedupWindow`] (its limits, public) and `Window` (the map).
//!
//! [`Dedup`]: crate::middleware::Dedup

use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

/// How long, or for how many ids, a processed id is remembered.
///
/// A duplicate is caught while its id is younger than `max_age` and fewer than `max_entries`
/// newer ids were marked after it. Past that it may be forgotten, and a duplicate that arrives
/// later handled again: memory is reclaimed a generation at a time, so an id may be remembered
/// up to about twice as long, and up to about twice `max_entries` ids are held.
/// Default: 10 minutes and 100 000 ids.
///
/// ```
/// use std::time::Duration;
/// use tidings::middleware::DedupWindow;
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
    #[must_use]
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Remember ids however old (then `max_entries` alone bounds the window).
    #[must_use]
    pub fn no_max_age(mut self) -> Self {
        self.max_age = None;
        self
    }

    /// Remember at most `n` ids.
    #[must_use]
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = Some(n);
        self
    }

    /// Remember any number of ids (then `max_age` alone bounds the window).
    #[must_use]
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

/// What [`DedupStore::claim`](crate::middleware::DedupStore::claim) found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Not seen: handle it, then [`complete`](crate::middleware::DedupStore::complete) or
    /// [`release`](crate::middleware::DedupStore::release).
    New,
    /// Already handled successfully within the window: skip it.
    Processed,
    /// Being handled right now by another delivery of the same id: skip it (that delivery
    /// retries or dead-letters it, so nothing is lost).
    InProgress,
}

/// Ids within a window: those being handled, and those done (with a value remembered with
/// them).
///
/// Built for a large window on the hot path. Done ids are kept in two generations: marks go to
/// the current one; when it holds `max_entries` ids or began `max_age` ago, it becomes the
/// previous one and the old previous one is dropped whole. Times are kept per generation (its
/// first and last mark), not per id, so an entry is just the id: forgetting costs nothing per id
/// (no per-id eviction, which in a large table means a cache miss per event), a lookup of a new
/// id reads only the tables' control bytes, and the clock is read once per batch of marks, not
/// per event. Marks are staged and moved into the table a batch at a time, so the inserts'
/// cache misses overlap. A generation is forgotten once its last mark is `max_age` old; so an
/// id is caught for at least `max_age` and at least the next `max_entries` marks, and may be
/// remembered up to about twice as long.
#[derive(Debug)]
pub(crate) struct Window<V = (), K = Uuid> {
    limits: DedupWindow,
    in_progress: rustc_hash::FxHashSet<K>,
    current: Generation<K, V>,
    previous: Generation<K, V>,
    /// The latest marks, not yet in `current`.
    staged: Vec<(K, V)>,
    /// How many marks are staged before they go into the table.
    batch: usize,
}

#[derive(Debug)]
struct Generation<K, V> {
    ids: rustc_hash::FxHashMap<K, V>,
    /// When its first and its last batch of marks went in.
    first: Option<Instant>,
    last: Option<Instant>,
}

impl<K, V> Default for Generation<K, V> {
    fn default() -> Self {
        Generation {
            ids: rustc_hash::FxHashMap::default(),
            first: None,
            last: None,
        }
    }
}

/// Marks staged before they go into the table.
const STAGED: usize = 32;

impl<V: Copy, K: std::hash::Hash + Eq + Copy> Window<V, K> {
    /// A window for a consumer group: marks are staged in batches.
    pub(crate) fn new(limits: DedupWindow) -> Self {
        Window::with_batch(limits, limits.max_entries.map_or(STAGED, |n| n.min(STAGED)))
    }

    /// A window whose marks go into the table at once (and are timed one by one): for rare
    /// marks whose age matters to the second, as producer-side deduplication.
    pub(crate) fn unbatched(limits: DedupWindow) -> Self {
        Window::with_batch(limits, 1)
    }

    fn with_batch(limits: DedupWindow, batch: usize) -> Self {
        Window {
            limits,
            in_progress: rustc_hash::FxHashSet::default(),
            current: Generation::default(),
            previous: Generation::default(),
            staged: Vec::with_capacity(batch),
            batch: batch.max(1),
        }
    }

    fn expired(&self, at: Instant, now: Instant) -> bool {
        self.limits
            .max_age
            .is_some_and(|age| now.saturating_duration_since(at) >= age)
    }

    /// The mark of `id`, if it is still within the window. Reads the clock only when the id
    /// is found in a generation.
    fn lookup(&self, id: &K) -> Option<V> {
        if let Some((_, value)) = self.staged.iter().rev().find(|(staged, _)| staged == id) {
            return Some(*value);
        }
        for generation in [&self.current, &self.previous] {
            if let Some(value) = generation.ids.get(id) {
                let forgotten = generation
                    .last
                    .is_some_and(|last| self.expired(last, Instant::now()));
                return (!forgotten).then_some(*value);
            }
        }
        None
    }

    /// Moves the staged marks into the current generation, starting a new generation first if
    /// the current one is full or old enough.
    fn flush(&mut self) {
        let now = Instant::now();
        let full = self
            .limits
            .max_entries
            .is_some_and(|n| self.current.ids.len() + self.staged.len() > n);
        let old = self
            .current
            .first
            .is_some_and(|first| self.expired(first, now));
        if full || old {
            let capacity = self.current.ids.len();
            let fresh = Generation {
                ids: rustc_hash::FxHashMap::with_capacity_and_hasher(capacity, Default::default()),
                first: None,
                last: None,
            };
            self.previous = std::mem::replace(&mut self.current, fresh);
        }
        self.current.first.get_or_insert(now);
        self.current.last = Some(now);
        for (id, value) in self.staged.drain(..) {
            self.current.ids.insert(id, value);
        }
    }

    pub(crate) fn claim(&mut self, id: K) -> Claim {
        if self.lookup(&id).is_some() {
            return Claim::Processed;
        }
        if !self.in_progress.insert(id) {
            return Claim::InProgress;
        }
        Claim::New
    }

    /// Marks a claimed `id` done (or an unclaimed one, for producer-side deduplication).
    pub(crate) fn complete_with(&mut self, id: K, value: V) {
        self.in_progress.remove(&id);
        self.staged.push((id, value));
        if self.staged.len() >= self.batch {
            self.flush();
        }
    }

    pub(crate) fn release(&mut self, id: K) {
        self.in_progress.remove(&id);
    }

    /// The value remembered with `id`, if it is within the window.
    pub(crate) fn get(&mut self, id: K) -> Option<V> {
        self.lookup(&id)
    }

    /// Ids held (some may be past their age and not reclaimed yet).
    pub(crate) fn len(&self) -> usize {
        self.staged.len() + self.current.ids.len() + self.previous.ids.len()
    }
}

impl Window<()> {
    pub(crate) fn complete(&mut self, id: Uuid) {
        self.complete_with(id, ());
    }
}
