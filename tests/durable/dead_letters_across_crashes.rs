//! Durable dead letters and effectively-once marks across crashes and restarts: no entry is
//! lost or duplicated, a sequenced key keeps its order, offsets never move back.
//! (First written as reproductions by a review; each failed before its fix.)
use crate::support::stores;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;
use stores::{Log, Placed};
use tidings::dead_letter::{DeadLetterError, Redelivery};
use tidings::prelude::*;
use tidings::store::{
    DeadLetterLog as _, DeadLetterRecord, GroupOffset, Log as _, MemoryStore, Offsets as _,
    StoreError,
};
use tidings::Uuid;

fn topic(p: u32) -> TopicConfig {
    TopicConfig::new("orders").partitions(p)
}

/// A MemoryStore with faults: offset commits can be frozen (what a crash before the next
/// periodic commit looks like), dead-letter saves can fail, commits can be slow; it records the
/// committed offset of ("once", partition 0) after each write.
#[derive(Clone, Default)]
struct Hooked {
    inner: MemoryStore,
    freeze_commits: Arc<AtomicBool>,
    fail_saves: Arc<AtomicU32>,
    commit_delay_ms: Arc<AtomicU32>,
    history: Arc<Mutex<Vec<u64>>>,
}

impl Hooked {
    fn note(&self) {
        if let Some(Some(c)) = self
            .inner
            .committed("once", "orders", 0)
            .now_or_never()
            .map(|r| r.unwrap())
        {
            self.history.lock().push(c);
        }
    }
}

crate::support::stores::forward_log!(Hooked, inner);

impl tidings::store::Offsets for Hooked {
    fn committed<'a>(
        &'a self,
        g: &'a str,
        t: &'a str,
        p: u32,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        self.inner.committed(g, t, p)
    }

    fn commit<'a>(&'a self, o: &'a [GroupOffset]) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let delay = self.commit_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay as u64)).await;
            }
            if self.freeze_commits.load(Ordering::SeqCst) {
                return Ok(()); // "crashed" before this commit
            }
            self.inner.commit(o).await?;
            self.note();
            Ok(())
        }
        .boxed()
    }

    fn reset_offset<'a>(&'a self, o: &'a GroupOffset) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.reset_offset(o)
    }
}

impl tidings::store::DeadLetterLog for Hooked {
    fn save_dead_letter<'a>(
        &'a self,
        r: &'a DeadLetterRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        if self
            .fail_saves
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return futures::future::ready(Err(StoreError::Backend(Arc::new(
                std::io::Error::other("transient"),
            ))))
            .boxed();
        }
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

impl tidings::store::Marks for Hooked {
    fn is_marked<'a>(&'a self, g: &'a str, id: Uuid) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.is_marked(g, id)
    }

    fn commit_marked<'a>(
        &'a self,
        o: &'a GroupOffset,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            self.inner.commit_marked(o, id).await?;
            self.note();
            Ok(())
        }
        .boxed()
    }
}

/// Fails seq 7 while `failing`; records what it handled.
#[derive(Clone)]
struct FailSeven {
    failing: Arc<AtomicBool>,
    log: Log,
    delay_ms: u64,
}
impl FailSeven {
    fn new(failing: bool, log: &Log, delay_ms: u64) -> Self {
        FailSeven {
            failing: Arc::new(AtomicBool::new(failing)),
            log: log.clone(),
            delay_ms,
        }
    }
}

impl Handler<Placed> for FailSeven {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        if self.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.delay_ms)).await;
        }
        if e.event().seq == 7 && self.failing.load(Ordering::SeqCst) {
            return Err(HandlerError::msg("seven is down"));
        }
        self.log
            .0
            .lock()
            .push(("g".into(), e.event().order, e.event().seq));
        Ok(())
    }
}

fn bus_on(store: &Hooked, sub: Subscription, h: &FailSeven) -> Bus {
    let h = h.clone();
    Bus::builder()
        .store(store.clone())
        .topic(topic(1))
        .subscribe::<Placed, _>(sub.max_deliveries(1), move || h.clone())
        .build()
        .unwrap()
}

async fn publish(bus: &Bus, from: u64, to: u64) {
    for seq in from..to {
        bus.publish(Placed { order: 1, seq }).await.unwrap();
    }
}

/// A crash after a dead letter's row was saved but before the periodic commit passed its offset:
/// after the restart the event is read from the log again, and is not dead-lettered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_offset_commit_does_not_duplicate_a_dead_letter() {
    let store = Hooked::default();
    let log = Log::default();
    let h = FailSeven::new(true, &log, 0);
    let bus = bus_on(&store, Subscription::new("g"), &h);
    bus.settled().await;
    store.freeze_commits.store(true, Ordering::SeqCst); // the process dies before the next commit
    publish(&bus, 0, 10).await;
    bus.settled().await;
    assert_eq!(bus.dead_letters("g").unwrap().len(), 1);
    bus.shutdown().await;

    store.freeze_commits.store(false, Ordering::SeqCst);
    let bus = bus_on(&store, Subscription::new("g"), &h);
    bus.settled().await;
    let entries = bus.dead_letters("g").unwrap().list();
    let n = entries.len();
    bus.shutdown().await;
    assert_eq!(n, 1, "one event, {n} dead-letter entries: {entries:#?}");
}

/// The same crash window with the sequenced policy: the restored head parks its key; the key's
/// older events read again come before it (not parked behind it), and nothing is handled twice
/// or out of order when the head is redriven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequenced_a_crash_before_the_offset_commit_keeps_the_key_in_order() {
    let store = Hooked::default();
    let log = Log::default();
    let h = FailSeven::new(true, &log, 0);
    let sub = || Subscription::new("g").dead_letter(DeadLetterPolicy::Sequenced);
    let bus = bus_on(&store, sub(), &h);
    bus.settled().await;
    store.freeze_commits.store(true, Ordering::SeqCst);
    publish(&bus, 0, 10).await;
    bus.settled().await;
    assert_eq!(bus.dead_letters("g").unwrap().len(), 3); // 7 (head), 8, 9
    bus.shutdown().await;

    store.freeze_commits.store(false, Ordering::SeqCst);
    h.failing.store(false, Ordering::SeqCst);
    let bus = bus_on(&store, sub(), &h);
    bus.settled().await;
    let dlq = bus.dead_letters("g").unwrap();
    let depth = dlq.len();
    dlq.redrive_all().await.unwrap();
    bus.settled().await;
    bus.shutdown().await;
    let after: Vec<u64> = log
        .of("g")
        .into_iter()
        .map(|(_, s)| s)
        .skip(10 - 3 + 7)
        .collect();
    assert_eq!(depth, 3, "entries after the restart: {depth}");
    assert_eq!(
        after,
        vec![7, 8, 9],
        "handled after the redrive, in order, once"
    );
}

/// Effectively-once: a redriven entry whose id was marked meanwhile (a copy published again was
/// handled) is acknowledged, and its row is deleted: it does not come back after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effectively_once_a_redriven_duplicate_removes_its_row() {
    let store = Hooked::default();
    let log = Log::default();
    let h = FailSeven::new(true, &log, 0);
    let sub = || Subscription::new("g").delivery(DeliveryMode::EffectivelyOnce);
    let id = Uuid::now_v7();
    let bus = bus_on(&store, sub(), &h);
    bus.publish_with(Placed { order: 1, seq: 7 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    bus.settled().await;
    assert_eq!(bus.dead_letters("g").unwrap().len(), 1);
    bus.shutdown().await;

    // Healthy again; the producer publishes its copy again (its window is gone): handled, marked.
    h.failing.store(false, Ordering::SeqCst);
    let bus = bus_on(&store, sub(), &h);
    bus.settled().await;
    bus.publish_with(Placed { order: 1, seq: 7 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    bus.settled().await;
    assert_eq!(log.len("g"), 1);
    let dlq = bus.dead_letters("g").unwrap();
    dlq.redrive_all().await.unwrap();
    bus.settled().await;
    assert!(dlq.is_empty());
    assert_eq!(log.len("g"), 1, "not handled twice (good)");
    bus.shutdown().await;

    let rows = store.dead_letters("g").await.unwrap();
    assert!(
        rows.is_empty(),
        "the acknowledged entry's row is still there: {} row(s)",
        rows.len()
    );
}

/// A transient store error while saving a dead letter during the shutdown drain is retried: the
/// entry is saved before the offset passes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_save_failing_during_the_drain_is_retried() {
    let store = Hooked::default();
    let log = Log::default();
    let h = FailSeven::new(true, &log, 200);
    let bus = bus_on(&store, Subscription::new("g"), &h);
    bus.settled().await;
    store.fail_saves.store(1, Ordering::SeqCst);
    bus.publish(Placed { order: 1, seq: 7 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await; // being handled
    bus.shutdown().await;

    h.failing.store(false, Ordering::SeqCst);
    let h2 = FailSeven {
        delay_ms: 0,
        ..h.clone()
    };
    let bus = bus_on(&store, Subscription::new("g"), &h2);
    bus.settled().await;
    let depth = bus.dead_letters("g").unwrap().len();
    bus.shutdown().await;
    assert!(
        depth == 1 || log.len("g") == 1,
        "the failed event is gone: no entry, never handled (committed {:?})",
        store.committed("g", "orders", 0).await.unwrap()
    );
}

/// Effectively-once: the background committer never writes an offset below the one a worker
/// committed with a mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_never_move_back() {
    let store = Hooked::default();
    let log = Log::default();
    let log2 = log.clone();
    let bus = Bus::builder()
        .store(store.clone())
        .topic(topic(1))
        .commit_interval(Duration::from_millis(10))
        .subscribe::<Placed, _>(
            Subscription::new("once").delivery(DeliveryMode::EffectivelyOnce),
            move || FailSeven {
                failing: Arc::new(AtomicBool::new(false)),
                log: log2.clone(),
                delay_ms: 0,
            },
        )
        .build()
        .unwrap();
    bus.settled().await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    store.commit_delay_ms.store(150, Ordering::SeqCst);
    publish(&bus, 0, 1).await; // marked: 1; the committer reads next = 1 and sleeps in commit
    bus.settled().await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    publish(&bus, 1, 2).await; // marked: 2, then the committer's late write of 1 lands
    bus.settled().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    bus.shutdown().await;
    let history = store.history.lock().clone();
    assert!(
        history.windows(2).all(|w| w[0] <= w[1]),
        "committed offsets went back: {history:?}"
    );
}

/// Redriving an `Undecodable` entry that still cannot be read is refused; the entry stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_entry_that_still_cannot_be_read_is_not_redriven() {
    let store = Hooked::default();
    let mut rows = vec![stores::raw_row("Placed", 1, r#"{"order":"not a number"}"#)];
    store.append(&mut rows).await.unwrap();
    let log = Log::default();
    let h = FailSeven::new(false, &log, 0);
    let bus = Bus::builder()
        .store(store.clone())
        .topic(topic(1))
        .subscribe::<Placed, _>(
            Subscription::new("g").start_from(tidings::store::StartFrom::Earliest),
            move || h.clone(),
        )
        .build()
        .unwrap();
    bus.settled().await;
    let dlq = bus.dead_letters("g").unwrap();
    assert_eq!(dlq.len(), 1);
    let seq = dlq.list()[0].seq;
    let refused = dlq.redrive(seq).await.unwrap_err();
    assert!(
        matches!(refused, DeadLetterError::Unreadable { .. }),
        "{refused:?}"
    );
    bus.settled().await;
    let depth = dlq.len();
    bus.shutdown().await;
    assert_eq!(depth, 1, "the unreadable row left the queue on a redrive");
}

/// Sequenced + Redelivery: a restored head that was never attempted (its old head discarded, or
/// a crash while followers were released) is released at once, as in the process that parked it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequenced_redelivery_releases_a_never_attempted_head_after_a_restart() {
    let store = Hooked::default();
    let log = Log::default();
    let h = FailSeven::new(true, &log, 0);
    let sub = || {
        Subscription::new("g")
            .dead_letter(DeadLetterPolicy::Sequenced)
            .redelivery(Redelivery::after([Duration::from_secs(3600)]))
    };
    let bus = bus_on(&store, sub(), &h);
    publish(&bus, 7, 9).await; // 7 fails (head), 8 parked behind it
    bus.settled().await;
    bus.shutdown().await;
    // The operator drops 7 (after the shutdown here, to be deterministic; a crash while 8 was
    // being released leaves the same rows).
    let dlq = bus.dead_letters("g").unwrap();
    let head = dlq.list()[0].seq;
    dlq.discard(head, "bad").unwrap();
    for _ in 0..100 {
        if store.dead_letters("g").await.unwrap().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    h.failing.store(false, Ordering::SeqCst);
    let bus = bus_on(&store, sub(), &h);
    bus.settled().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    bus.settled().await;
    let depth = bus.dead_letters("g").unwrap().len();
    bus.shutdown().await;
    assert_eq!(
        (depth, log.of("g")),
        (0, vec![(1, 8)]),
        "8 was never released"
    );
}
