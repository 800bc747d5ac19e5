//! Effectively-once with a store: the marks of many events share transactions (as publishes
//! share the appender's), and that batching never lets a copy published again be handled
//! twice, nor an offset be committed ahead of a mark.
use crate::support::stores;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use stores::{Log, Placed};
use tidings::prelude::*;
use tidings::store::{DeadLetterRecord, GroupOffset, MemoryStore, Offsets as _, StoreError};
use tidings::Uuid;

/// A MemoryStore that counts its round trips for marks, and can make mark commits slow (the
/// window in which a mark is pending) or fail (a crash before they commit).
#[derive(Clone, Default)]
struct Marks {
    inner: MemoryStore,
    /// Mark lookups and mark commits, each a round trip to the database.
    round_trips: Arc<AtomicU64>,
    commit_delay_ms: Arc<AtomicU32>,
    fail_commits: Arc<AtomicBool>,
}

impl Marks {
    async fn before_commit(&self) -> Result<(), StoreError> {
        self.round_trips.fetch_add(1, Ordering::SeqCst);
        let delay = self.commit_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        if self.fail_commits.load(Ordering::SeqCst) {
            return Err(StoreError::Backend(Arc::new(std::io::Error::other(
                "the database is gone",
            ))));
        }
        Ok(())
    }
}

crate::support::stores::forward_log!(Marks, inner);

impl tidings::store::Offsets for Marks {
    fn committed<'a>(
        &'a self,
        g: &'a str,
        t: &'a str,
        p: u32,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        self.inner.committed(g, t, p)
    }

    fn commit<'a>(&'a self, o: &'a [GroupOffset]) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.commit(o)
    }

    fn reset_offset<'a>(&'a self, o: &'a GroupOffset) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.reset_offset(o)
    }
}

impl tidings::store::DeadLetterLog for Marks {
    fn save_dead_letter<'a>(
        &'a self,
        r: &'a DeadLetterRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.save_dead_letter(r)
    }

    fn delete_dead_letter<'a>(
        &'a self,
        g: &'a str,
        t: &'a str,
        p: u32,
        o: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.delete_dead_letter(g, t, p, o)
    }

    fn dead_letters<'a>(
        &'a self,
        g: &'a str,
    ) -> BoxFuture<'a, Result<Vec<DeadLetterRecord>, StoreError>> {
        self.inner.dead_letters(g)
    }
}

impl tidings::store::Marks for Marks {
    fn is_marked<'a>(&'a self, g: &'a str, id: Uuid) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.round_trips.fetch_add(1, Ordering::SeqCst);
        self.inner.is_marked(g, id)
    }

    fn commit_marked<'a>(
        &'a self,
        o: &'a GroupOffset,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            self.before_commit().await?;
            self.inner.commit_marked(o, id).await
        }
        .boxed()
    }

    fn marked<'a>(
        &'a self,
        g: &'a str,
        ids: &'a [Uuid],
    ) -> BoxFuture<'a, Result<Vec<Uuid>, StoreError>> {
        self.round_trips.fetch_add(1, Ordering::SeqCst);
        self.inner.marked(g, ids)
    }

    fn commit_marks<'a>(
        &'a self,
        marks: &'a [(GroupOffset, Uuid)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            self.before_commit().await?;
            self.inner.commit_marks(marks).await
        }
        .boxed()
    }
}

fn once(window: usize) -> Subscription {
    // A tiny in-memory window: the store's marks (and the pending ones) must catch copies.
    Subscription::new("once")
        .delivery(DeliveryMode::EffectivelyOnce)
        .layer(Dedup::new(DedupWindow::new().max_entries(window)))
}

/// Records what it handles; the first event it sees takes `first_ms` (so that what follows
/// queues up behind it).
#[derive(Clone)]
struct Slow {
    log: Log,
    first_ms: u64,
    seen: Arc<AtomicU64>,
}

impl Handler<Placed> for Slow {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        if self.seen.fetch_add(1, Ordering::SeqCst) == 0 && self.first_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.first_ms)).await;
        }
        let p = e.event();
        self.log.0.lock().push(("once".into(), p.order, p.seq));
        Ok(())
    }
}

fn bus_on(store: &Marks, sub: Subscription, h: &Slow) -> Bus {
    let h = h.clone();
    Bus::builder()
        .store(store.clone())
        .topic(TopicConfig::new("orders").partitions(2))
        .subscribe::<Placed, _>(sub, move || h.clone())
        .build()
        .unwrap()
}

fn slow(first_ms: u64, log: &Log) -> Slow {
    Slow {
        log: log.clone(),
        first_ms,
        seen: Arc::default(),
    }
}

/// The marks (and the offsets) of many events share transactions, and the marks of a batch of
/// events are looked up in one query: not a round trip to the database per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effectively_once_marks_share_commits() {
    let store = Marks::default();
    let log = Log::default();
    let bus = bus_on(&store, once(100_000), &slow(0, &log));
    bus.settled().await;
    let before = store.round_trips.load(Ordering::SeqCst);
    bus.publish_all((0..400).map(|seq| Placed {
        order: seq % 8,
        seq,
    }))
    .await
    .unwrap();
    bus.settled().await;
    let trips = store.round_trips.load(Ordering::SeqCst) - before;
    assert_eq!(log.len("once"), 400);
    assert!(
        trips <= 40,
        "{trips} round trips to the store for the marks of 400 events"
    );
    // `settled` means marked: every mark and offset is committed.
    let mut committed = 0;
    for p in 0..2 {
        committed += store
            .committed("once", "orders", p)
            .await
            .unwrap()
            .unwrap_or(0);
    }
    assert_eq!(committed, 400);
    bus.shutdown().await;
}

/// A copy published again while the original's mark waits in a slow commit (not yet in the
/// store, forgotten by a tiny in-memory window) is acknowledged as a duplicate, not handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_arriving_while_its_mark_is_pending_is_not_handled() {
    let store = Marks::default();
    store.commit_delay_ms.store(400, Ordering::SeqCst);
    let log = Log::default();
    // The first event is slow: the others queue behind it, so its mark is still being
    // committed when they (and the copy) are handled.
    let bus = bus_on(&store, once(1), &slow(100, &log));
    bus.settled().await;
    let id = Uuid::now_v7();
    bus.publish_with(Placed { order: 1, seq: 0 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    for seq in 1..20 {
        bus.publish(Placed { order: 1, seq }).await.unwrap();
    }
    bus.publish_with(Placed { order: 1, seq: 0 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    bus.settled().await;
    let seen: Vec<u64> = log.of("once").into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        seen,
        (0..20).collect::<Vec<_>>(),
        "the copy was handled again"
    );
    assert_eq!(bus.stats().topics[0].groups[0].duplicates, 1);
    bus.shutdown().await;

    // After a restart the copy meets the mark in the store.
    store.commit_delay_ms.store(0, Ordering::SeqCst);
    let bus = bus_on(&store, once(1), &slow(0, &log));
    bus.settled().await;
    bus.publish_with(Placed { order: 1, seq: 0 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    bus.settled().await;
    assert_eq!(log.len("once"), 20, "the copy was handled after a restart");
    bus.shutdown().await;
}

/// Marks that never commit (the database went away, then the process stopped): the group's
/// offset is not committed past their events, which are handled again after the restart
/// (at-least-once for those), and a copy published again is still handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_never_committed_ahead_of_their_marks() {
    let store = Marks::default();
    let log = Log::default();
    let bus = bus_on(&store, once(1), &slow(0, &log));
    bus.settled().await;
    bus.publish(Placed { order: 1, seq: 0 }).await.unwrap();
    bus.settled().await;
    store.fail_commits.store(true, Ordering::SeqCst);
    let id = Uuid::now_v7();
    bus.publish_with(Placed { order: 1, seq: 1 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    // The mark of seq 1 cannot commit: the drain cannot finish.
    bus.shutdown_timeout(Duration::from_millis(500)).await;
    assert_eq!(log.len("once"), 2);
    // Order 1's partition holds offsets 0 and 1; the other is empty.
    let mut committed = 0;
    for p in 0..2 {
        committed += store
            .committed("once", "orders", p)
            .await
            .unwrap()
            .unwrap_or(0);
    }
    assert_eq!(
        committed, 1,
        "the offset passed events whose marks are not durable"
    );

    store.fail_commits.store(false, Ordering::SeqCst);
    let bus = bus_on(&store, once(1), &slow(0, &log));
    bus.settled().await;
    // Handled again: its mark was lost with the process.
    assert_eq!(log.len("once"), 3);
    bus.publish_with(Placed { order: 1, seq: 1 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    bus.settled().await;
    assert_eq!(log.len("once"), 3, "the copy was handled");
    bus.shutdown().await;
}
