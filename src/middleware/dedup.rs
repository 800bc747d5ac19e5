//! Deduplication: an event id is handled once per consumer group within a window.

use std::future::Future;
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;
use uuid::Uuid;

use super::{LayerKind, Middleware, Next};
use crate::envelope::AnyEnvelope;
use crate::handler::{HandlerError, HandlerResult};
use crate::window::{Claim, DedupWindow, Window};

/// Where [`Dedup`] remembers the ids a group has handled.
///
/// [`MemoryDedupStore`] keeps them in memory (lost on restart). On a bus with a
/// [`Store`](crate::store::Store), [`DeliveryMode::EffectivelyOnce`](crate::DeliveryMode) also
/// marks each handled id in the store, in the same transaction as the group's offset, and checks it
/// before handling: that is what survives a restart.
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
/// use tidings::middleware::{Dedup, DedupWindow, Retry};
/// use tidings::Subscription;
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
