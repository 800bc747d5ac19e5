#![cfg(all(feature = "sqlite", feature = "postgres"))]
//! Edge cases of the durable bus: other writers on the same store, retention under a catch-up,
//! unreadable rows, concurrent repeats of one id, redrives into a full queue.
//! (First written as reproductions by a review; each failed before its fix.)
use crate::support::stores;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use stores::{record, record_with, Log, Placed};
use tidings::prelude::*;
use tidings::store::{
    DeadLetterLog as _, DeadLetterRecord, GroupOffset, Log as _, MemoryStore, Offsets as _,
    Retention, StartFrom, StoreError, StoredEvent,
};
use tidings::Uuid;

fn topic(p: u32) -> TopicConfig {
    TopicConfig::new("orders").partitions(p)
}

/// An event appended to the log by someone else (a second store handle here; another process
/// or `PostgresStore::append_in` in real life) between two appends of the bus is handled, in
/// order; the group's offset never passes it unhandled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_appended_by_another_writer_are_handled_not_passed() {
    let store = MemoryStore::new();
    let log = Log::default();
    let bus = record(
        Bus::builder().store(store.clone()).topic(topic(1)),
        "g",
        &log,
    )
    .build()
    .unwrap();
    bus.publish(Placed { order: 1, seq: 0 }).await.unwrap();
    bus.settled().await;
    // Someone else appends offset 1.
    let mut rows = vec![stores::placed_row(0, 1, 1)];
    store.append(&mut rows).await.unwrap();
    assert_eq!(rows[0].offset, 1);
    // The bus appends offset 2.
    bus.publish(Placed { order: 1, seq: 2 }).await.unwrap();
    bus.settled().await;
    bus.shutdown().await;
    let committed = store.committed("g", "orders", 0).await.unwrap();
    // A restart does not bring it back either.
    let log2 = Log::default();
    let bus = record(
        Bus::builder().store(store.clone()).topic(topic(1)),
        "g",
        &log2,
    )
    .build()
    .unwrap();
    bus.settled().await;
    bus.shutdown().await;
    assert_eq!(
        log.of("g"),
        vec![(1, 0), (1, 1), (1, 2)],
        "committed {committed:?}"
    );
    assert_eq!(committed, Some(3));
    assert!(log2.of("g").is_empty(), "handled again: {:?}", log2.of("g"));
}

/// A store that counts reads.
struct Counting(MemoryStore, Arc<AtomicU64>);
impl tidings::store::Log for Counting {
    fn append<'a>(&'a self, e: &'a mut [StoredEvent]) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.append(e)
    }

    fn read<'a>(
        &'a self,
        t: &'a str,
        p: u32,
        f: u64,
        l: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.read(t, p, f, l)
    }

    fn partitions<'a>(&'a self, t: &'a str) -> BoxFuture<'a, Result<u32, StoreError>> {
        self.0.partitions(t)
    }

    fn head<'a>(&'a self, t: &'a str, p: u32) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.0.head(t, p)
    }

    fn offset_at<'a>(
        &'a self,
        t: &'a str,
        p: u32,
        a: SystemTime,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.0.offset_at(t, p, a)
    }

    fn trim<'a>(&'a self, t: &'a str, p: u32, b: u64) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.0.trim(t, p, b)
    }
}

impl tidings::store::Offsets for Counting {
    fn committed<'a>(
        &'a self,
        g: &'a str,
        t: &'a str,
        p: u32,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        self.0.committed(g, t, p)
    }

    fn commit<'a>(&'a self, o: &'a [GroupOffset]) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.commit(o)
    }

    fn reset_offset<'a>(&'a self, o: &'a GroupOffset) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.reset_offset(o)
    }
}

impl tidings::store::DeadLetterLog for Counting {
    fn save_dead_letter<'a>(
        &'a self,
        r: &'a DeadLetterRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.save_dead_letter(r)
    }

    fn delete_dead_letter<'a>(
        &'a self,
        g: &'a str,
        t: &'a str,
        p: u32,
        o: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.delete_dead_letter(g, t, p, o)
    }

    fn dead_letters<'a>(
        &'a self,
        g: &'a str,
    ) -> BoxFuture<'a, Result<Vec<DeadLetterRecord>, StoreError>> {
        self.0.dead_letters(g)
    }
}

impl tidings::store::Marks for Counting {
    fn is_marked<'a>(&'a self, g: &'a str, id: Uuid) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.is_marked(g, id)
    }

    fn commit_marked<'a>(
        &'a self,
        o: &'a GroupOffset,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.commit_marked(o, id)
    }
}

/// A group whose next offsets were deleted by retention, with nothing left in the log up to the
/// head, passes them and settles (it does not read the log in a loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_over_a_trimmed_log_settles() {
    let store = MemoryStore::new();
    let bus = Bus::builder()
        .store(store.clone())
        .topic(topic(1))
        .build()
        .unwrap();
    for seq in 0..10 {
        bus.publish(Placed { order: 1, seq }).await.unwrap();
    }
    bus.shutdown().await;
    // Retention deleted everything (MaxAge after a quiet period, say).
    store.trim("orders", 0, 10).await.unwrap();

    let reads = Arc::new(AtomicU64::new(0));
    let log = Log::default();
    let bus = record_with(
        Bus::builder()
            .store(Counting(store.clone(), reads.clone()))
            .topic(topic(1)),
        Subscription::new("late").start_from(StartFrom::Earliest),
        &log,
    )
    .build()
    .unwrap();
    let settled = tokio::time::timeout(Duration::from_secs(2), bus.settled()).await;
    let n = reads.load(Ordering::Relaxed);
    let lag = bus.stats().topics[0].groups[0].lag;
    bus.shutdown().await;
    assert!(settled.is_ok(), "settled hung; {n} reads of the log in 2 s");
    assert_eq!(lag, 0);
}

/// The same with retention configured on the bus: MaxEvents(0) keeps nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_behind_retention_settles_after_a_restart() {
    let store = MemoryStore::new();
    let log = Log::default();
    let bus = record(
        Bus::builder().store(store.clone()).topic(topic(1)),
        "g",
        &log,
    )
    .build()
    .unwrap();
    bus.settled().await;
    // Simulate a crash with the group committed at 0: publish with a bus where g is not subscribed.
    drop(bus);
    let bus = Bus::builder()
        .store(store.clone())
        .topic(topic(1))
        .build()
        .unwrap();
    for seq in 0..10 {
        bus.publish(Placed { order: 1, seq }).await.unwrap();
    }
    bus.shutdown().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let log = Log::default();
    let bus = record(
        Bus::builder()
            .store(store.clone())
            .topic(topic(1).retention(Retention::MaxAge(Duration::from_millis(10)))),
        "g",
        &log,
    )
    .build()
    .unwrap();
    let settled = tokio::time::timeout(Duration::from_secs(2), bus.settled()).await;
    bus.shutdown().await;
    assert!(settled.is_ok(), "settled hung");
}

/// Two concurrent publishes of one id under producer dedup append it once; the other gets the
/// first one's receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_of_one_id_append_it_once() {
    let store = MemoryStore::new();
    let log = Log::default();
    let bus = record(
        Bus::builder()
            .store(store.clone())
            .topic(topic(1))
            .dedup_publishes(DedupWindow::new()),
        "g",
        &log,
    )
    .build()
    .unwrap();
    let id = Uuid::now_v7();
    let (a, b) = tokio::join!(
        bus.publish_with(Placed { order: 1, seq: 1 }, PublishOptions::new().id(id)),
        bus.publish_with(Placed { order: 1, seq: 1 }, PublishOptions::new().id(id)),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    bus.settled().await;
    bus.shutdown().await;
    assert!(
        a.duplicate || b.duplicate,
        "both appended: {a:?} {b:?}; log has {}",
        store.events("orders", 0).len()
    );
}

struct Fails;
impl Handler<Placed> for Fails {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        if e.event().seq == 0 {
            return Err(HandlerError::permanent("no"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }
}

/// With a store, a redrive into a full queue goes through once the worker makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_into_a_full_durable_queue_goes_through() {
    let store = MemoryStore::new();
    let bus = Bus::builder()
        .store(store.clone())
        .topic(topic(1).capacity(2))
        .subscribe::<Placed, _>("g", || Fails)
        .build()
        .unwrap();
    bus.publish(Placed { order: 1, seq: 0 }).await.unwrap();
    bus.settled().await;
    assert_eq!(bus.dead_letters("g").unwrap().list().len(), 1);
    for seq in 1..4 {
        bus.publish(Placed { order: 1, seq }).await.unwrap();
    }
    // Queue: worker holds seq 1; 2 and 3 are queued: full.
    let dlq = bus.dead_letters("g").unwrap();
    let r = tokio::time::timeout(Duration::from_secs(3), dlq.redrive_all()).await;
    let ok = r.is_ok();
    bus.shutdown_timeout(Duration::from_secs(2)).await;
    assert!(ok, "redrive hung although the queue drained within 0.6 s");
}

/// Events appended with `PostgresStore::append_in` in an application's transaction reach the
/// bus's groups (when the bus next appends to that partition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_events_appended_in_an_application_transaction_are_handled() {
    let pg = stores::Backend::postgres_store("review_outbox").await;
    let log = Log::default();
    let bus = record(Bus::builder().store(pg.clone()).topic(topic(1)), "g", &log)
        .build()
        .unwrap();
    bus.publish(Placed { order: 1, seq: 0 }).await.unwrap();
    bus.settled().await;
    // The transactional outbox.
    let mut tx = pg.pool().begin().await.unwrap();
    let mut rows = vec![stores::placed_row(0, 1, 1)];
    pg.append_in(&mut tx, &mut rows).await.unwrap();
    tx.commit().await.unwrap();
    bus.publish(Placed { order: 1, seq: 2 }).await.unwrap();
    bus.settled().await;
    bus.shutdown().await;
    let log2 = Log::default();
    let bus = record(Bus::builder().store(pg.clone()).topic(topic(1)), "g", &log2)
        .build()
        .unwrap();
    bus.settled().await;
    bus.shutdown().await;
    assert_eq!(log.of("g"), vec![(1, 0), (1, 1), (1, 2)]);
    assert!(log2.of("g").is_empty(), "handled again: {:?}", log2.of("g"));
    assert_eq!(pg.committed("g", "orders", 0).await.unwrap(), Some(3));
}

/// PostgreSQL: an append transaction held open while later appends come (the late commit that
/// Marten and Axon readers skipped). Later appends to the same partition wait for it (its head
/// row is locked), appends to other partitions commit meanwhile, a reader never sees a hole,
/// and the group gets every event in offset order once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_late_commit_is_never_skipped() {
    let pg = stores::Backend::postgres_store("late_commit").await;
    let log = Log::default();
    let bus = record(Bus::builder().store(pg.clone()).topic(topic(2)), "g", &log)
        .build()
        .unwrap();
    bus.publish(Placed { order: 0, seq: 0 }).await.unwrap();
    bus.settled().await;
    let p = bus
        .publish(Placed { order: 0, seq: 1 })
        .await
        .unwrap()
        .partition;

    // The late transaction: appends to that partition and stays open.
    let mut late = pg.pool().begin().await.unwrap();
    let mut row = stores::placed_row(0, 0, 2);
    row.partition = p;
    let mut rows = vec![row];
    pg.append_in(&mut late, &mut rows).await.unwrap();
    let late_offset = rows[0].offset;
    assert_eq!(late_offset, 2);

    // Another partition commits meanwhile.
    let mut other = stores::placed_row(0, 99, 0);
    other.partition = 1 - p;
    pg.append(&mut [other]).await.unwrap();
    // A later append to the same partition waits for the late one.
    let later = tokio::spawn({
        let bus = bus.clone();
        async move { bus.publish(Placed { order: 0, seq: 3 }).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !later.is_finished(),
        "a later append committed before the open one"
    );
    // A reader sees no hole: everything committed so far, nothing past the open append.
    let seen: Vec<u64> = pg
        .read("orders", p, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.offset)
        .collect();
    assert_eq!(seen, vec![0, 1]);
    // The other partition's committed event may reach the group already (announced); the open
    // append's never does.
    let of_order_0 = |log: &Log| -> Vec<(u64, u64)> {
        log.of("g").into_iter().filter(|&(o, _)| o == 0).collect()
    };
    assert_eq!(of_order_0(&log), vec![(0, 0), (0, 1)]);

    late.commit().await.unwrap();
    let receipt = later.await.unwrap();
    assert_eq!(receipt.offset, 3);
    bus.settled().await;
    assert_eq!(
        of_order_0(&log),
        vec![(0, 0), (0, 1), (0, 2), (0, 3)],
        "the late event was skipped"
    );
    assert!(log.of("g").contains(&(99, 0)), "the other writer's event");
    bus.shutdown().await;
    assert_eq!(pg.committed("g", "orders", p).await.unwrap(), Some(4));
}

/// What a [`Seen`] handler saw: (group, partition, offset, order, seq).
type SeenLog = Arc<parking_lot::Mutex<Vec<(String, u32, u64, u64, u64)>>>;

/// Records every `Placed` with its place in the log.
struct Seen(String, SeenLog);

impl Handler<Placed> for Seen {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        let p = e.event();
        self.1
            .lock()
            .push((self.0.clone(), e.partition(), e.offset(), p.order, p.seq));
        Ok(())
    }
}

/// A bus on `pg` with topic "orders" in 4 partitions and groups "a" and "b" recording what
/// they see; each partition has had a first event (seq 0) of the order returned for it.
async fn bus_on_four_partitions(pg: &tidings::store::PostgresStore) -> (Bus, SeenLog, [u64; 4]) {
    let seen = SeenLog::default();
    let mut builder = Bus::builder().store(pg.clone()).topic(topic(4));
    for group in ["a", "b"] {
        let seen = seen.clone();
        builder = builder.subscribe::<Placed, _>(Subscription::new(group), move || {
            Seen(group.to_owned(), seen.clone())
        });
    }
    let bus = builder.build().unwrap();
    // One order per partition (keys map to partitions by hash).
    let mut key = [None; 4];
    let mut order = 0;
    while key.iter().any(Option::is_none) {
        let r = bus.publish(Placed { order, seq: 0 }).await.unwrap();
        key[r.partition as usize].get_or_insert(order);
        order += 1;
    }
    (bus, seen, key.map(Option::unwrap))
}

/// Each group saw every event of every partition once, in offset order, with no hole. Returns
/// what they saw.
async fn every_event_once_in_offset_order(
    pg: &tidings::store::PostgresStore,
    seen: &SeenLog,
) -> Vec<(String, u32, u64, u64, u64)> {
    let seen = seen.lock().clone();
    for group in ["a", "b"] {
        for p in 0..4u32 {
            let offsets: Vec<u64> = seen
                .iter()
                .filter(|s| s.0 == group && s.1 == p)
                .map(|s| s.2)
                .collect();
            let head = pg.head("orders", p).await.unwrap();
            assert_eq!(
                offsets,
                (0..head).collect::<Vec<_>>(),
                "group {group}, partition {p}: every event once, in offset order"
            );
        }
    }
    seen
}

/// PostgreSQL: a `publish_all` across a held partition (0) and a free one (2) stays one
/// transaction: it commits after the holder, with a later publish to partition 2 after it,
/// while publishes to partition 3 go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_publish_all_across_a_held_partition_stays_one_transaction() {
    let pg = stores::Backend::postgres_store("held_publish_all").await;
    let (bus, seen, key) = bus_on_four_partitions(&pg).await;
    let (zero, two) = (
        pg.head("orders", 0).await.unwrap(),
        pg.head("orders", 2).await.unwrap(),
    );
    let mut held = pg.pool().begin().await.unwrap();
    pg.append_in(&mut held, &mut [stores::placed_row(0, key[0], 1000)])
        .await
        .unwrap();

    let across = tokio::spawn({
        let bus = bus.clone();
        async move {
            bus.publish_all([
                Placed {
                    order: key[0],
                    seq: 1,
                },
                Placed {
                    order: key[2],
                    seq: 1,
                },
            ])
            .await
            .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = tokio::spawn({
        let bus = bus.clone();
        async move {
            bus.publish(Placed {
                order: key[2],
                seq: 2,
            })
            .await
            .unwrap()
        }
    });
    let free = tokio::time::timeout(Duration::from_secs(10), async {
        for seq in 1..=20 {
            bus.publish(Placed { order: key[3], seq }).await.unwrap();
        }
    })
    .await;
    let waiting = (!across.is_finished(), !after.is_finished());
    // Nothing of the publish_all is in the log yet, not even in the free partition.
    let in_two = pg.read("orders", 2, 0, 100).await.unwrap().len();
    held.commit().await.unwrap();
    assert!(free.is_ok(), "publishes to partition 3 stalled");
    assert_eq!(waiting, (true, true), "committed before the held partition");
    assert_eq!(in_two as u64, two, "half of a publish_all was committed");
    let across = tokio::time::timeout(Duration::from_secs(10), across)
        .await
        .unwrap()
        .unwrap();
    let after = tokio::time::timeout(Duration::from_secs(10), after)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        across
            .iter()
            .map(|r| (r.partition, r.offset))
            .collect::<Vec<_>>(),
        vec![(0, zero + 1), (2, two)]
    );
    assert_eq!((after.partition, after.offset), (2, two + 1));
    bus.settled().await;
    bus.shutdown().await;
    let seen = every_event_once_in_offset_order(&pg, &seen).await;
    // Beside the first events: the application's, the publish_all's two, one after, 20.
    assert_eq!(
        seen.iter().filter(|s| s.4 > 0).count(),
        2 * (1 + 2 + 1 + 20)
    );
}

/// PostgreSQL: an application transaction (`append_in`) holding partitions 0 and 1 stalls only
/// the publishes to them. Publishes to partitions 2 and 3 complete while it is open (one to
/// partition 0 is waiting all along); after its commit the held partitions' publishes complete,
/// and every group sees every event of every partition once, in offset order, with no hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_held_partition_does_not_stall_the_others() {
    let pg = stores::Backend::postgres_store("held_partitions").await;
    let (bus, seen, key) = bus_on_four_partitions(&pg).await;

    // The application's transaction holds partitions 0 and 1.
    let mut held = pg.pool().begin().await.unwrap();
    let mut rows = vec![
        stores::placed_row(0, key[0], 1000),
        stores::placed_row(1, key[1], 1000),
    ];
    pg.append_in(&mut held, &mut rows).await.unwrap();

    // Publishes to partition 0 wait for it.
    let to_held = tokio::spawn({
        let bus = bus.clone();
        async move {
            for seq in 1..=5 {
                bus.publish(Placed { order: key[0], seq }).await.unwrap();
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 200 publishes to partitions 2 and 3, from 4 publishers, complete meanwhile.
    let free: Vec<_> = [2usize, 3, 2, 3]
        .into_iter()
        .enumerate()
        .map(|(t, p)| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for i in 0..50u64 {
                    let r = bus
                        .publish(Placed {
                            order: key[p],
                            seq: 1 + t as u64 * 100 + i,
                        })
                        .await
                        .unwrap();
                    assert_eq!(r.partition as usize, p);
                }
            })
        })
        .collect();
    let done = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(free)).await;
    let completed = done.is_ok();
    let waiting = !to_held.is_finished();
    held.commit().await.unwrap();
    assert!(
        completed,
        "publishes to partitions 2 and 3 stalled behind the held partitions 0 and 1"
    );
    for r in done.unwrap() {
        r.unwrap();
    }
    assert!(
        waiting,
        "a publish to a held partition completed before its commit"
    );
    tokio::time::timeout(Duration::from_secs(10), to_held)
        .await
        .expect("publishes to partition 0 complete after the commit")
        .unwrap();
    // A last publish to partition 1 brings the application's event there to the groups.
    bus.publish(Placed {
        order: key[1],
        seq: 1001,
    })
    .await
    .unwrap();
    bus.settled().await;
    bus.shutdown().await;

    let seen = every_event_once_in_offset_order(&pg, &seen).await;
    for group in ["a", "b"] {
        // Beside the first events: the application's two, 5 + 1 to the held partitions, 200.
        let mut after_first: Vec<(u32, u64)> = seen
            .iter()
            .filter(|s| s.0 == group && s.4 > 0)
            .map(|s| (s.1, s.4))
            .collect();
        after_first.sort();
        let mut expected: Vec<(u32, u64)> = [(0, 1000), (1, 1000), (1, 1001)]
            .into_iter()
            .chain((1..=5).map(|seq| (0, seq)))
            .chain(
                (0..4u64)
                    .flat_map(|t| (0..50).map(move |i| ([2, 3][t as usize % 2], 1 + t * 100 + i))),
            )
            .collect();
        expected.sort();
        assert_eq!(after_first, expected, "group {group}");
    }
}

/// A row whose headers column does not parse is dead-lettered; the group goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_row_with_unreadable_headers_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = tidings::store::SqliteStore::open(&path).await.unwrap();
    let mut rows = vec![
        stores::placed_row(0, 1, 0),
        stores::placed_row(0, 1, 1),
        stores::placed_row(0, 1, 2),
    ];
    store.append(&mut rows).await.unwrap();
    sqlx::query("UPDATE tidings_events SET headers = 'garbage' WHERE log_offset = 1")
        .execute(store.pool())
        .await
        .unwrap();
    let log = Log::default();
    let bus = record_with(
        Bus::builder().store(store.clone()).topic(topic(1)),
        Subscription::new("g").start_from(StartFrom::Earliest),
        &log,
    )
    .build()
    .unwrap();
    let settled = tokio::time::timeout(Duration::from_secs(3), bus.settled()).await;
    bus.shutdown().await;
    assert!(
        settled.is_ok(),
        "group stuck on a bad row; handled {:?}",
        log.of("g")
    );
}

/// Two writers on one SQLite file (two `SqliteStore`s of one process: another process is
/// refused, see `tests/store/sqlite_one_process.rs`), with retention:
/// offsets are never reused and the head never moves back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_offsets_are_never_reused_by_two_writers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let a = tidings::store::SqliteStore::open(&path).await.unwrap();
    let b = tidings::store::SqliteStore::open(&path).await.unwrap();
    let mut r = vec![stores::placed_row(0, 1, 0)];
    a.append(&mut r).await.unwrap(); // offset 0
    let mut r = vec![stores::placed_row(0, 1, 1), stores::placed_row(0, 1, 2)];
    b.append(&mut r).await.unwrap(); // offsets 1, 2; head 3
    assert_eq!(r[1].offset, 2);
    b.trim("orders", 0, 3).await.unwrap(); // retention: everything gone
    let mut r = vec![stores::placed_row(0, 1, 3)];
    a.append(&mut r).await.unwrap();
    let head = a.head("orders", 0).await.unwrap();
    assert!(
        r[0].offset >= 3 && head >= 4,
        "offset {} reused, head went back to {head}",
        r[0].offset
    );
}

/// A second writer on the file does not make the bus's next publish fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_second_writer_does_not_fail_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let a = tidings::store::SqliteStore::open(&path).await.unwrap();
    let b = tidings::store::SqliteStore::open(&path).await.unwrap();
    let bus = Bus::builder().store(a).topic(topic(1)).build().unwrap();
    bus.publish(Placed { order: 1, seq: 0 }).await.unwrap();
    let mut r = vec![stores::placed_row(0, 1, 1)];
    b.append(&mut r).await.unwrap();
    let res = bus.publish(Placed { order: 1, seq: 2 }).await;
    bus.shutdown().await;
    assert!(res.is_ok());
}

/// Refuses every event.
struct RefuseAll;
impl Handler<Placed> for RefuseAll {
    async fn handle(&mut self, _: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        Err(HandlerError::permanent("refused"))
    }
}

/// A topic that shrank, on a store that cannot tell its partition counts without I/O (so
/// `build` cannot refuse it): the bus refuses to publish, restores only the dead letters of
/// the partitions it has (the others stay in the store), and a redrive does not panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrunk_topic_on_a_store_without_a_snapshot_strands_nothing_and_redrives() {
    let store = MemoryStore::new();
    let counting = || Counting(store.clone(), Arc::new(AtomicU64::new(0)));
    assert_eq!(counting().known_partitions("orders"), None);
    let bus = Bus::builder()
        .store(counting())
        .topic(topic(8))
        .subscribe::<Placed, _>("g", || RefuseAll)
        .build()
        .unwrap();
    stores::publish_orders(&bus, 64, 1).await;
    bus.settled().await;
    assert_eq!(bus.dead_letters("g").unwrap().len(), 64);
    bus.shutdown().await;
    let in_low_partitions = store
        .dead_letters("g")
        .await
        .unwrap()
        .iter()
        .filter(|r| r.event.partition < 4)
        .count();
    assert!(in_low_partitions > 0 && in_low_partitions < 64);

    let bus = Bus::builder()
        .store(counting())
        .topic(topic(4))
        .subscribe::<Placed, _>("g", || RefuseAll)
        .build()
        .unwrap();
    assert!(bus.ready().await);
    let dlq = bus.dead_letters("g").unwrap();
    assert_eq!(dlq.len(), in_low_partitions);
    assert_eq!(dlq.redrive_all().await.unwrap(), in_low_partitions);
    bus.settled().await;
    let refused = bus.publish(Placed { order: 1, seq: 1 }).await;
    assert!(
        matches!(refused, Err(tidings::PublishError::Store { .. })),
        "{refused:?}"
    );
    bus.shutdown().await;
    // The other partitions' dead letters are still in the store.
    assert_eq!(store.dead_letters("g").await.unwrap().len(), 64);
}
