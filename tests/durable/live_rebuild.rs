//! Rebuilding a projection on a running bus (`Bus::rebuild`), and readiness at start
//! (`Bus::ready` waits for the catch-up), on the memory store, SQLite and PostgreSQL.
use crate::support::stores::Backend;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::FutureExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use tidings::prelude::*;
use tidings::rebuild::RebuildError;
use tidings::{BusBuilder, DeliveryMode, TopicConfig};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "tallies", key = key, name = "live_rebuild.Counted")]
struct Counted {
    key: u64,
    seq: u64,
}

/// An event a handler saw. Handler instances are numbered from 1 in the order the factory
/// made them.
#[derive(Clone, Copy, Debug)]
struct Rec {
    instance: u64,
    key: u64,
    seq: u64,
    partition: u32,
}

/// What the handlers saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Rec>>>);

impl Seen {
    /// Per key, the seqs the instances numbered above `after` handled, in order.
    fn by_key_after(&self, after: u64) -> HashMap<u64, Vec<u64>> {
        self.group_after(after, |r| r.key)
    }

    /// Per partition, the (key, seq) the instances numbered in `instances` handled, in order.
    fn by_partition(
        &self,
        instances: std::ops::RangeInclusive<u64>,
    ) -> HashMap<u32, Vec<(u64, u64)>> {
        let mut parts: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
        for r in self.0.lock().iter() {
            if instances.contains(&r.instance) {
                parts.entry(r.partition).or_default().push((r.key, r.seq));
            }
        }
        parts
    }

    fn group_after(&self, after: u64, by: impl Fn(&Rec) -> u64) -> HashMap<u64, Vec<u64>> {
        let mut groups: HashMap<u64, Vec<u64>> = HashMap::new();
        for r in self.0.lock().iter() {
            if r.instance > after {
                groups.entry(by(r)).or_default().push(r.seq);
            }
        }
        groups
    }

    fn len(&self) -> usize {
        self.0.lock().len()
    }
}

/// The projection: counts per key what it handles (recorded in `Seen`); with a gate, each
/// event waits for a permit first.
struct Tally {
    instance: u64,
    seen: Seen,
    gate: Option<Arc<Semaphore>>,
}

impl Handler<Counted> for Tally {
    async fn handle(&mut self, e: &Envelope<Counted>, _: &Context) -> Result<(), HandlerError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        let c = e.event();
        self.seen.0.lock().push(Rec {
            instance: self.instance,
            key: c.key,
            seq: c.seq,
            partition: e.partition(),
        });
        Ok(())
    }
}

/// Subscribes `sub` to `Counted` with a `Tally`, counting the factory's calls in `made`.
fn tally(
    builder: BusBuilder,
    sub: Subscription,
    seen: &Seen,
    made: &Arc<AtomicU64>,
    gate: Option<Arc<Semaphore>>,
) -> BusBuilder {
    let (seen, made) = (seen.clone(), Arc::clone(made));
    builder
        .topic(TopicConfig::new("tallies").partitions(4))
        .subscribe::<Counted, _>(sub, move || Tally {
            instance: made.fetch_add(1, Ordering::SeqCst) + 1,
            seen: seen.clone(),
            gate: gate.clone(),
        })
}

async fn publish(bus: &Bus, keys: u64, seqs: std::ops::Range<u64>) {
    for seq in seqs {
        for key in 0..keys {
            bus.publish(Counted { key, seq }).await.expect("published");
        }
    }
}

const KEYS: u64 = 8;

/// Rebuilt from the earliest offset while events wait in the queues and a publisher keeps
/// publishing: the fresh handlers see every key's events exactly once, in order, the ones
/// published during the rebuild included.
async fn a_projection_rebuilt_while_publishing_equals_the_log(b: Backend) {
    let (seen, made) = (Seen::default(), Arc::new(AtomicU64::new(0)));
    let gate = Arc::new(Semaphore::new(KEYS as usize * 20));
    let bus = tally(
        b.builder().await,
        "tally".into(),
        &seen,
        &made,
        Some(Arc::clone(&gate)),
    )
    .build()
    .unwrap();
    assert!(bus.ready().await);
    publish(&bus, KEYS, 0..20).await;
    bus.settled().await;
    assert_eq!(made.load(Ordering::SeqCst), 4, "one handler per partition");
    let first = made.load(Ordering::SeqCst);
    // No permits left: each partition's worker waits at the gate in its first event of these,
    // the others wait in its queue.
    publish(&bus, KEYS, 20..30).await;

    let rebuild = bus.rebuild("tally", StartFrom::Earliest);
    tokio::pin!(rebuild);
    // Polled once: the workers are told to reset at their next event boundary.
    assert!(futures::poll!(rebuild.as_mut()).is_pending());
    gate.add_permits(1 << 20);
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move { publish(&bus, KEYS, 30..60).await })
    };
    let rebuild = rebuild.await.unwrap();
    assert_eq!(rebuild.group(), "tally");
    // Reset: every partition has a fresh handler.
    assert_eq!(made.load(Ordering::SeqCst), first + 4);
    rebuild.caught_up().await.unwrap();
    assert!(rebuild.is_caught_up());
    // Caught up: at least what was published before the rebuild, every key from seq 0.
    let now = seen.by_key_after(first);
    for key in 0..KEYS {
        let seqs = now.get(&key).cloned().unwrap_or_default();
        assert!(seqs.len() >= 30, "key {key}: {seqs:?}");
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    }

    publisher.await.unwrap();
    bus.settled().await;
    let rebuilt = seen.by_key_after(first);
    for key in 0..KEYS {
        assert_eq!(
            rebuilt[&key],
            (0..60).collect::<Vec<_>>(),
            "key {key}: each event once, in order"
        );
    }
    // The old handlers never saw an event twice or out of order either.
    for events in seen.by_partition(1..=first).values() {
        let mut last: HashMap<u64, u64> = HashMap::new();
        for &(key, seq) in events {
            if let Some(prev) = last.insert(key, seq) {
                assert!(seq > prev, "key {key}: seq {seq} after {prev}");
            }
        }
    }
    assert_eq!(made.load(Ordering::SeqCst), first + 4);
    bus.shutdown().await;

    // The reset offsets were committed: a restart replays nothing more.
    let before = seen.len();
    let bus = tally(b.builder().await, "tally".into(), &seen, &made, None)
        .build()
        .unwrap();
    assert!(bus.ready().await);
    bus.settled().await;
    assert_eq!(seen.len(), before);
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_rebuilt_while_publishing_equals_the_log_in_memory() {
    a_projection_rebuilt_while_publishing_equals_the_log(Backend::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_rebuilt_while_publishing_equals_the_log_on_sqlite() {
    a_projection_rebuilt_while_publishing_equals_the_log(Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_rebuilt_while_publishing_equals_the_log_on_postgres() {
    let b = Backend::postgres("live_rebuild_while_publishing").await;
    a_projection_rebuilt_while_publishing_equals_the_log(b).await;
}

/// A rebuild from an offset in the middle of the log, held by a gate: one rebuild of a group
/// at a time, and `caught_up` waits for the replay.
#[tokio::test]
async fn a_rebuild_from_an_offset_waits_for_its_replay() {
    let (seen, made) = (Seen::default(), Arc::new(AtomicU64::new(0)));
    let gate = Arc::new(Semaphore::new(0));
    let bus = tally(
        Bus::builder().store(tidings::store::MemoryStore::new()),
        "tally".into(),
        &seen,
        &made,
        Some(Arc::clone(&gate)),
    )
    .build()
    .unwrap();
    gate.add_permits(KEYS as usize * 10);
    publish(&bus, KEYS, 0..10).await;
    bus.settled().await;

    // Offset 4 in every partition: each key's events from there on its partition.
    let rebuild = bus.rebuild("tally", StartFrom::Offset(4)).await.unwrap();
    assert!(
        rebuild.caught_up().now_or_never().is_none(),
        "the replay waits at the gate"
    );
    assert!(!rebuild.is_caught_up());
    assert_eq!(
        bus.rebuild("tally", StartFrom::Earliest).await.unwrap_err(),
        RebuildError::InProgress {
            group: "tally".into()
        }
    );
    // The bus stays ready while a group rebuilds.
    assert!(bus.is_ready());
    gate.add_permits(KEYS as usize * 10);
    rebuild.caught_up().await.unwrap();
    // Each partition's events from its offset 4 on, once, in the order the first handlers
    // saw them (offset order).
    let (old, replayed) = (seen.by_partition(1..=4), seen.by_partition(5..=8));
    assert_eq!(old.len(), 4, "every partition has events");
    for (p, events) in &old {
        assert_eq!(
            replayed.get(p).map_or(&[][..], |r| &r[..]),
            &events[4.min(events.len())..],
            "partition {p}"
        );
    }

    // Done: the group can be rebuilt again.
    let again = bus.rebuild("tally", StartFrom::Latest).await.unwrap();
    again.caught_up().await.unwrap();
    assert_eq!(made.load(Ordering::SeqCst), 12);
    bus.shutdown().await;
    assert_eq!(
        bus.rebuild("tally", StartFrom::Earliest).await.unwrap_err(),
        RebuildError::Closed
    );
}

/// What a rebuild refuses: no store, an unknown group, a group that deduplicates ids.
#[tokio::test]
async fn rebuild_refuses_what_it_cannot_replay() {
    let (seen, made) = (Seen::default(), Arc::new(AtomicU64::new(0)));
    let bus = tally(Bus::builder(), "tally".into(), &seen, &made, None)
        .build()
        .unwrap();
    assert_eq!(
        bus.rebuild("tally", StartFrom::Earliest).await.unwrap_err(),
        RebuildError::NoStore
    );
    assert_eq!(
        bus.rebuild("nobody", StartFrom::Earliest)
            .await
            .unwrap_err(),
        RebuildError::UnknownGroup {
            group: "nobody".into()
        }
    );
    bus.shutdown().await;

    let bus = tally(
        Bus::builder().store(tidings::store::MemoryStore::new()),
        Subscription::new("once").delivery(DeliveryMode::EffectivelyOnce),
        &seen,
        &made,
        None,
    )
    .build()
    .unwrap();
    assert_eq!(
        bus.rebuild("once", StartFrom::Earliest).await.unwrap_err(),
        RebuildError::Deduplicated {
            group: "once".into()
        }
    );
    assert_eq!(
        bus.rebuild("nobody", StartFrom::Earliest)
            .await
            .unwrap_err(),
        RebuildError::UnknownGroup {
            group: "nobody".into()
        }
    );
    bus.shutdown().await;
}

/// A failed event stays a dead letter through a rebuild: the replay passes it by.
#[tokio::test]
async fn a_rebuild_keeps_the_dead_letters() {
    struct FailKeyOne(Seen);
    impl Handler<Counted> for FailKeyOne {
        async fn handle(&mut self, e: &Envelope<Counted>, _: &Context) -> Result<(), HandlerError> {
            let c = e.event();
            if c.key == 1 && c.seq == 2 {
                return Err(HandlerError::permanent("refused"));
            }
            self.0 .0.lock().push(Rec {
                instance: 1,
                key: c.key,
                seq: c.seq,
                partition: e.partition(),
            });
            Ok(())
        }
    }
    let seen = Seen::default();
    let s = seen.clone();
    let bus = Bus::builder()
        .store(tidings::store::MemoryStore::new())
        .topic(TopicConfig::new("tallies").partitions(2))
        .subscribe::<Counted, _>("tally", move || FailKeyOne(s.clone()))
        .build()
        .unwrap();
    publish(&bus, 2, 0..5).await;
    bus.settled().await;
    assert_eq!(bus.dead_letters("tally").unwrap().len(), 1);
    seen.0.lock().clear();
    bus.rebuild("tally", StartFrom::Earliest)
        .await
        .unwrap()
        .caught_up()
        .await
        .unwrap();
    bus.settled().await;
    assert_eq!(bus.dead_letters("tally").unwrap().len(), 1);
    let all = seen.by_key_after(0);
    assert_eq!(all[&0], vec![0, 1, 2, 3, 4]);
    assert_eq!(
        all[&1],
        vec![0, 1, 3, 4],
        "the dead letter is not handled again"
    );
    bus.shutdown().await;
}

/// At start, `ready` waits until every group caught up with what its log held: not while a
/// slow handler is still replaying, and then with every event handled.
async fn ready_waits_for_the_catch_up_at_start(b: Backend) {
    let (seen, made) = (Seen::default(), Arc::new(AtomicU64::new(0)));
    let bus = tally(b.builder().await, "first".into(), &seen, &made, None)
        .build()
        .unwrap();
    assert!(bus.ready().await);
    publish(&bus, KEYS, 0..10).await;
    bus.shutdown().await;

    // A new group replays the 80 events from the start, each waiting for a permit.
    let gate = Arc::new(Semaphore::new(0));
    let replay = Seen::default();
    let bus = tally(
        b.builder().await,
        Subscription::new("replay").start_from(StartFrom::Earliest),
        &replay,
        &made,
        Some(Arc::clone(&gate)),
    )
    .build()
    .unwrap();
    gate.add_permits(10);
    while replay.len() < 10 {
        tokio::task::yield_now().await;
    }
    assert!(!bus.is_ready(), "70 events are still to replay");
    assert!(bus.ready().now_or_never().is_none());
    gate.add_permits(70);
    assert!(bus.ready().await);
    assert!(bus.is_ready());
    assert_eq!(replay.len(), 80, "ready means caught up");
    bus.shutdown().await;
    assert!(!bus.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_catch_up_at_start_in_memory() {
    ready_waits_for_the_catch_up_at_start(Backend::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_catch_up_at_start_on_sqlite() {
    ready_waits_for_the_catch_up_at_start(Backend::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_catch_up_at_start_on_postgres() {
    let b = Backend::postgres("live_rebuild_ready").await;
    ready_waits_for_the_catch_up_at_start(b).await;
}

/// Without a store the bus is ready once built.
#[tokio::test]
async fn in_memory_the_bus_is_ready_at_once() {
    let (seen, made) = (Seen::default(), Arc::new(AtomicU64::new(0)));
    let bus = tally(Bus::builder(), "tally".into(), &seen, &made, None)
        .build()
        .unwrap();
    assert!(bus.is_ready());
    assert!(bus.ready().await);
    bus.shutdown().await;
    assert!(!bus.is_ready());
}

/// A dead letter redriven just before a rebuild (still in the queue when the group resets):
/// handled by the fresh handler, and the replay still reads every event of the log.
#[tokio::test]
async fn a_redrive_queued_before_a_rebuild_loses_nothing() {
    struct FailOnce {
        seen: Seen,
        failing: Arc<std::sync::atomic::AtomicBool>,
        gate: Arc<Semaphore>,
        instance: u64,
    }
    impl Handler<Counted> for FailOnce {
        async fn handle(&mut self, e: &Envelope<Counted>, _: &Context) -> Result<(), HandlerError> {
            self.gate.acquire().await.expect("gate open").forget();
            let c = e.event();
            if c.seq == 2 && self.failing.load(Ordering::SeqCst) {
                return Err(HandlerError::permanent("refused"));
            }
            self.seen.0.lock().push(Rec {
                instance: self.instance,
                key: c.key,
                seq: c.seq,
                partition: e.partition(),
            });
            Ok(())
        }
    }
    let (seen, made) = (Seen::default(), Arc::new(AtomicU64::new(0)));
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let gate = Arc::new(Semaphore::new(10));
    let (s, m, f, g) = (
        seen.clone(),
        Arc::clone(&made),
        Arc::clone(&failing),
        Arc::clone(&gate),
    );
    let bus = Bus::builder()
        .store(tidings::store::MemoryStore::new())
        .topic(TopicConfig::new("tallies").partitions(1))
        .subscribe::<Counted, _>("tally", move || FailOnce {
            seen: s.clone(),
            failing: Arc::clone(&f),
            gate: Arc::clone(&g),
            instance: m.fetch_add(1, Ordering::SeqCst) + 1,
        })
        .build()
        .unwrap();
    publish(&bus, 1, 0..10).await;
    bus.settled().await;
    let dlq = bus.dead_letters("tally").unwrap();
    assert_eq!(dlq.len(), 1);
    failing.store(false, Ordering::SeqCst);
    // The handler waits at the gate in seq 10; the redrive of seq 2 waits in the queue.
    publish(&bus, 1, 10..11).await;
    dlq.redrive(dlq.list()[0].seq).await.unwrap();

    let rebuild = bus.rebuild("tally", StartFrom::Earliest);
    tokio::pin!(rebuild);
    assert!(futures::poll!(rebuild.as_mut()).is_pending());
    gate.add_permits(1 << 20);
    rebuild.await.unwrap().caught_up().await.unwrap();
    bus.settled().await;
    assert!(dlq.is_empty());
    let fresh = seen.by_key_after(1).remove(&0).unwrap();
    // The redriven event first (it was queued), then the whole log, seq 2 included (it is
    // no dead letter any more when the replay reaches it).
    assert_eq!(fresh, [2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    bus.shutdown().await;
}

/// The replay's progress is committed as it goes, from the reset offset on (not only once the
/// group passes the offset it had committed before the rebuild): a crash mid-replay resumes it.
#[tokio::test]
async fn a_rebuild_commits_its_replay_as_it_goes() {
    use tidings::store::Offsets as _;
    let store = tidings::store::MemoryStore::new();
    let committed = || async {
        store
            .committed("tally", "tallies", 0)
            .await
            .unwrap()
            .unwrap()
    };
    let (seen, made) = (Seen::default(), Arc::new(AtomicU64::new(0)));
    let gate = Arc::new(Semaphore::new(10));
    let bus = Bus::builder()
        .store(store.clone())
        .topic(TopicConfig::new("tallies").partitions(1))
        .subscribe::<Counted, _>("tally", {
            let (seen, made, gate) = (seen.clone(), Arc::clone(&made), Arc::clone(&gate));
            move || Tally {
                instance: made.fetch_add(1, Ordering::SeqCst) + 1,
                seen: seen.clone(),
                gate: Some(Arc::clone(&gate)),
            }
        })
        .build()
        .unwrap();
    publish(&bus, 1, 0..10).await;
    bus.settled().await;
    bus.commit_offsets().await.unwrap();
    assert_eq!(committed().await, 10);

    let rebuild = bus.rebuild("tally", StartFrom::Earliest).await.unwrap();
    assert_eq!(committed().await, 0, "reset in the store at once");
    gate.add_permits(4);
    while seen.by_key_after(1).get(&0).map_or(0, Vec::len) < 4 {
        tokio::task::yield_now().await;
    }
    bus.commit_offsets().await.unwrap();
    assert_eq!(committed().await, 4);
    gate.add_permits(1 << 20);
    rebuild.caught_up().await.unwrap();
    bus.commit_offsets().await.unwrap();
    assert_eq!(committed().await, 10);
    bus.shutdown().await;
}

/// A factory that panics during a rebuild: that partition keeps its handler and its offset,
/// `caught_up` says so, and the group can be rebuilt again.
#[tokio::test]
async fn a_factory_panic_during_a_rebuild_is_reported() {
    let (seen, made) = (Seen::default(), Arc::new(AtomicU64::new(0)));
    let bus = Bus::builder()
        .store(tidings::store::MemoryStore::new())
        .topic(TopicConfig::new("tallies").partitions(2))
        .subscribe::<Counted, _>("tally", {
            let (seen, made) = (seen.clone(), Arc::clone(&made));
            move || {
                let instance = made.fetch_add(1, Ordering::SeqCst) + 1;
                assert_ne!(instance, 3, "the third handler cannot be made");
                Tally {
                    instance,
                    seen: seen.clone(),
                    gate: None,
                }
            }
        })
        .build()
        .unwrap();
    publish(&bus, KEYS, 0..5).await;
    bus.settled().await;
    let rebuild = bus.rebuild("tally", StartFrom::Earliest).await.unwrap();
    assert_eq!(
        rebuild.caught_up().await,
        Err(RebuildError::FactoryPanicked {
            group: "tally".into(),
            partitions: 1
        })
    );
    assert!(!rebuild.is_caught_up());
    // One partition replayed with its fresh handler (instance 4), the other did not.
    bus.settled().await;
    let replayed = seen.by_partition(4..=4);
    assert_eq!(replayed.len(), 1);
    let again = bus.rebuild("tally", StartFrom::Earliest).await.unwrap();
    again.caught_up().await.unwrap();
    bus.settled().await;
    assert_eq!(
        seen.by_partition(5..=6)
            .values()
            .map(Vec::len)
            .sum::<usize>(),
        40
    );
    bus.shutdown().await;
}
