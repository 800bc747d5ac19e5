//! One suite, every store: memory, SQLite and PostgreSQL run the same tests.
//!
//! `TIDINGS_STRESS=N` runs every test N times over, in parallel (stress mode).

use crate::support::stores;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use stores::{publish_orders, record, record_with, Backend, Cancelled, Log, Placed};
use tidings::prelude::*;
use tidings::store::{Retention, StartFrom, StoreError, TryAppend, Undecodable, Upcaster};
use tidings::{BuildError, PublishError, Uuid};

/// One module of tests named `$name`, each running the test body of the same name on
/// `$backend` (a closure from the test's name and stress index to a backend future),
/// `TIDINGS_STRESS` times (default once), in parallel, each on a fresh backend.
macro_rules! suite {
    ($module:ident, $backend:expr, $($name:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::stress(|i| async move {
                        let b = ($backend)(stringify!($name), i).await;
                        super::$name(b).await
                    })
                    .await;
                }
            )*
        }
    };
}

async fn memory(_: &str, _: usize) -> Backend {
    Backend::memory()
}

#[cfg(feature = "sqlite")]
async fn sqlite(_: &str, _: usize) -> Backend {
    Backend::sqlite()
}

#[cfg(feature = "postgres")]
async fn postgres(test: &str, i: usize) -> Backend {
    Backend::postgres(&format!("{test}_{i}")).await
}

/// The suite every store runs: memory, SQLite and PostgreSQL.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        suite!(memory, super::memory, $($name),*);
        #[cfg(feature = "sqlite")]
        suite!(sqlite, super::sqlite, $($name),*);
        #[cfg(feature = "postgres")]
        suite!(postgres, super::postgres, $($name),*);
    };
}

conformance!(
    durable_publish_reaches_every_group_in_key_order,
    competing_partitions_handle_each_event_once,
    restart_resumes_from_committed_offsets,
    unhandled_events_are_handled_after_a_restart,
    replay_from_earliest_offset_and_timestamp,
    reset_moves_a_group_back,
    other_types_on_the_topic_are_passed_by,
    a_group_that_falls_behind_catches_up_from_the_log,
    failed_events_go_to_the_dead_letter_queue_and_the_partition_goes_on,
    unreadable_rows_go_to_the_dead_letter_queue,
    rows_no_group_of_the_topic_consumes_are_dead_letters_for_catch_all_groups,
    upcasters_read_old_versions,
    oversized_payloads_are_refused,
    retention_by_count_trims_the_log,
    producer_dedup_publishes_a_repeated_id_once,
    handler_follow_ups_are_durable_too,
    dead_letters_survive_a_restart_until_redriven_and_handled,
    discarded_dead_letters_do_not_come_back,
    effectively_once_marks_survive_a_restart,
    batched_marks_commit_with_the_highest_offsets,
    effectively_once_bursts_skip_every_copy,
    events_appended_outside_the_bus_reach_its_groups,
    try_append_appends_all_or_names_the_busy_partitions,
    retention_by_age_trims_old_events,
    a_topic_with_fewer_partitions_than_its_log_is_a_build_error,
    dead_letters_are_complete_once_the_bus_is_ready,
    payloads_that_do_not_read_back_are_refused_at_publish,
);

/// Rows broken by hand in the database (values SQL lets in and the bus never writes): on the
/// backends that have columns to break. The memory store holds typed values; it has none.
macro_rules! sql_conformance {
    ($($name:ident),* $(,)?) => {
        #[cfg(feature = "sqlite")]
        suite!(sqlite_rows, super::sqlite, $($name),*);
        #[cfg(feature = "postgres")]
        suite!(postgres_rows, super::postgres, $($name),*);
    };
}

sql_conformance!(
    rows_with_out_of_range_integers_are_dead_letters_and_the_page_goes_on,
    dead_letters_with_broken_columns_are_restored_with_the_others,
    offsets_out_of_range_are_reported_as_corrupt_not_wrapped,
);

async fn stress<F, Fut>(test: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let n: usize = std::env::var("TIDINGS_STRESS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    futures::future::join_all((0..n).map(&test)).await;
}

fn topic(partitions: u32) -> TopicConfig {
    TopicConfig::new("orders").partitions(partitions)
}

async fn durable_publish_reaches_every_group_in_key_order(b: Backend) {
    let log = Log::default();
    let builder = b.builder().await.topic(topic(4));
    let builder = record(record(record(builder, "a", &log), "b", &log), "c", &log);
    let bus = builder.build().unwrap();
    publish_orders(&bus, 20, 25).await;
    bus.settled().await;
    for g in ["a", "b", "c"] {
        assert_eq!(log.len(g), 500, "group {g}");
        log.assert_key_order(g);
    }
    let stats = bus.stats();
    assert_eq!(stats.topics[0].published, 500);
    for g in &stats.topics[0].groups {
        assert_eq!(g.lag, 0, "{g:?}");
    }
    bus.shutdown().await;
    // Every event is in the log, with dense offsets per partition.
    let store = b.open().await;
    let mut total = 0;
    for p in 0..4 {
        let rows = store.read("orders", p, 0, 10_000).await.unwrap();
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row.offset, i as u64);
            assert_eq!(row.name, "Placed");
        }
        assert_eq!(store.head("orders", p).await.unwrap(), rows.len() as u64);
        total += rows.len();
    }
    assert_eq!(total, 500);
}

async fn competing_partitions_handle_each_event_once(b: Backend) {
    let log = Log::default();
    let bus = record(b.builder().await.topic(topic(4)), "workers", &log)
        .build()
        .unwrap();
    // Concurrent publishers: their appends share transactions.
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let bus = bus.clone();
            tokio::spawn(async move {
                for seq in 0..50 {
                    bus.publish(Placed { order: t, seq }).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    bus.settled().await;
    let mut seen = log.of("workers");
    assert_eq!(seen.len(), 400);
    log.assert_key_order("workers");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 400, "an event was handled twice");
    bus.shutdown().await;
}

async fn restart_resumes_from_committed_offsets(b: Backend) {
    let log = Log::default();
    let bus = record(b.builder().await.topic(topic(2)), "g", &log)
        .build()
        .unwrap();
    publish_orders(&bus, 5, 20).await;
    bus.settled().await;
    bus.shutdown().await;
    assert_eq!(log.len("g"), 100);

    // Restarted: nothing is handled again; new events are.
    let log2 = Log::default();
    let bus = record(b.builder().await.topic(topic(2)), "g", &log2)
        .build()
        .unwrap();
    bus.settled().await;
    assert_eq!(log2.len("g"), 0, "handled again after a clean restart");
    for order in 0..5 {
        bus.publish(Placed { order, seq: 100 }).await.unwrap();
    }
    bus.settled().await;
    assert_eq!(log2.len("g"), 5);
    bus.shutdown().await;
}

/// A handler that holds every event until released.
struct Gate {
    open: Arc<tokio::sync::Semaphore>,
    handled: Arc<AtomicU32>,
}

impl Handler<Placed> for Gate {
    async fn handle(&mut self, _: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        self.open.acquire().await.unwrap().forget();
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

async fn unhandled_events_are_handled_after_a_restart(b: Backend) {
    // The group handles 3 of 10 events, then the bus is stopped without draining (as a crash
    // would stop it): the 7 others are handled after the restart, the 3 not again.
    let open = Arc::new(tokio::sync::Semaphore::new(3));
    let handled = Arc::new(AtomicU32::new(0));
    let (o, h) = (open.clone(), handled.clone());
    let bus = b
        .builder()
        .await
        .topic(topic(1))
        .subscribe::<Placed, _>("g", move || Gate {
            open: o.clone(),
            handled: h.clone(),
        })
        .build()
        .unwrap();
    publish_orders(&bus, 1, 10).await;
    while handled.load(Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = bus.shutdown_timeout(Duration::from_millis(300)).await;
    assert_eq!(report.handled, 3);

    let log = Log::default();
    let bus = record(b.builder().await.topic(topic(1)), "g", &log)
        .build()
        .unwrap();
    bus.settled().await;
    assert_eq!(log.of("g"), (3..10).map(|s| (0, s)).collect::<Vec<_>>());
    bus.shutdown().await;
}

async fn replay_from_earliest_offset_and_timestamp(b: Backend) {
    let bus = b.builder().await.topic(topic(1)).build().unwrap();
    publish_orders(&bus, 1, 10).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let middle = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for seq in 10..15 {
        bus.publish(Placed { order: 0, seq }).await.unwrap();
    }
    bus.shutdown().await;

    let log = Log::default();
    let builder = b.builder().await.topic(topic(1));
    let builder = record_with(
        builder,
        Subscription::new("earliest").start_from(StartFrom::Earliest),
        &log,
    );
    let builder = record_with(
        builder,
        Subscription::new("latest").start_from(StartFrom::Latest),
        &log,
    );
    let builder = record_with(
        builder,
        Subscription::new("offset").start_from(StartFrom::Offset(12)),
        &log,
    );
    let builder = record_with(
        builder,
        Subscription::new("time").start_from(StartFrom::Timestamp(middle)),
        &log,
    );
    let bus = builder.build().unwrap();
    bus.settled().await;
    let seqs = |g| log.of(g).into_iter().map(|(_, s)| s).collect::<Vec<_>>();
    assert_eq!(seqs("earliest"), (0..15).collect::<Vec<_>>());
    assert_eq!(seqs("latest"), Vec::<u64>::new());
    assert_eq!(seqs("offset"), vec![12, 13, 14]);
    assert_eq!(seqs("time"), (10..15).collect::<Vec<_>>());
    // "Latest" was remembered: events published now reach it, and after a restart it does
    // not jump past them.
    bus.publish(Placed { order: 0, seq: 15 }).await.unwrap();
    bus.settled().await;
    assert_eq!(seqs("latest"), vec![15]);
    bus.shutdown().await;
}

async fn reset_moves_a_group_back(b: Backend) {
    let log = Log::default();
    let bus = record(b.builder().await.topic(topic(2)), "proj", &log)
        .build()
        .unwrap();
    publish_orders(&bus, 4, 5).await;
    bus.settled().await;
    bus.shutdown().await;
    assert_eq!(log.len("proj"), 20);

    // Rebuild the projection from scratch.
    let log = Log::default();
    let bus = record_with(
        b.builder().await.topic(topic(2)),
        Subscription::new("proj").reset_to(StartFrom::Earliest),
        &log,
    )
    .build()
    .unwrap();
    bus.settled().await;
    assert_eq!(log.len("proj"), 20);
    log.assert_key_order("proj");
    bus.shutdown().await;
}

async fn other_types_on_the_topic_are_passed_by(b: Backend) {
    let log = Log::default();
    let bus = record(b.builder().await.topic(topic(1)), "placed-only", &log)
        .build()
        .unwrap();
    for order in 0..10 {
        bus.publish(Placed { order, seq: 0 }).await.unwrap();
        bus.publish(Cancelled { order }).await.unwrap();
    }
    bus.settled().await;
    assert_eq!(log.len("placed-only"), 10);
    let stats = bus.stats();
    assert_eq!(stats.topics[0].published, 20);
    assert_eq!(stats.topics[0].groups[0].lag, 0);
    bus.shutdown().await;
    // Its committed offset passed the other type's events too.
    let store = b.open().await;
    assert_eq!(
        store.committed("placed-only", "orders", 0).await.unwrap(),
        Some(20)
    );
}

/// Slow enough that the queue fills.
struct Slow(Log);
impl Handler<Placed> for Slow {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        if e.event().seq.is_multiple_of(50) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let p = e.event();
        self.0 .0.lock().push(("slow".into(), p.order, p.seq));
        Ok(())
    }
}

async fn a_group_that_falls_behind_catches_up_from_the_log(b: Backend) {
    // Capacity 4: the slow group's queue is full at once; publishers do not wait for it, and it
    // reads what it missed from the log, in order.
    let log = Log::default();
    let l = log.clone();
    let bus = record(
        b.builder()
            .await
            .topic(TopicConfig::new("orders").partitions(2).capacity(4)),
        "fast",
        &log,
    )
    .subscribe::<Placed, _>("slow", move || Slow(l.clone()))
    .build()
    .unwrap();
    publish_orders(&bus, 3, 300).await;
    bus.settled().await;
    assert_eq!(log.len("slow"), 900);
    assert_eq!(log.len("fast"), 900);
    log.assert_key_order("slow");
    log.assert_key_order("fast");
    let mut seen = log.of("slow");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 900, "an event was handled twice");
    bus.shutdown().await;
}

struct FailSeven;
impl Handler<Placed> for FailSeven {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        if e.event().seq == 7 {
            return Err(HandlerError::permanent("seven is refused"));
        }
        Ok(())
    }
}

async fn failed_events_go_to_the_dead_letter_queue_and_the_partition_goes_on(b: Backend) {
    let bus = b
        .builder()
        .await
        .topic(topic(1))
        .subscribe::<Placed, _>("g", || FailSeven)
        .build()
        .unwrap();
    publish_orders(&bus, 1, 10).await;
    bus.settled().await;
    let dlq = bus.dead_letters("g").unwrap();
    assert_eq!(dlq.len(), 1);
    let entry = &dlq.list()[0];
    assert_eq!(entry.envelope.downcast_ref::<Placed>().unwrap().seq, 7);
    assert!(entry.error.contains("seven"));
    let g = &bus.stats().topics[0].groups[0];
    assert_eq!((g.handled, g.failed, g.lag), (9, 1, 0));
    bus.shutdown().await;
}

/// Takes every event of the topic.
struct All(Log);
impl AnyHandler for All {
    async fn handle(&mut self, e: &AnyEnvelope, _: &Context) -> Result<(), HandlerError> {
        if let Some(p) = e.downcast_ref::<Placed>() {
            self.0 .0.lock().push(("all".into(), p.order, p.seq));
        }
        Ok(())
    }
}

async fn unreadable_rows_go_to_the_dead_letter_queue(b: Backend) {
    // Rows the bus would never write, written straight into the store.
    let store = b.open().await;
    let mut rows = vec![
        stores::raw_row("Placed", 1, r#"{"order":1,"seq":0}"#),
        stores::raw_row("NoSuchType", 1, r#"{"x":1}"#),
        stores::raw_row("Placed", 1, r#"{"order":"not a number","seq":1}"#),
        stores::raw_row("Placed", 1, "not json at all"),
        stores::raw_row("Placed", 9, r#"{"order":1,"seq":2}"#),
        stores::raw_row("Placed", 1, r#"{"order":1,"seq":3}"#),
    ];
    store.append(&mut rows).await.unwrap();

    let log = Log::default();
    let l = log.clone();
    let builder = b.builder().await.topic(topic(1));
    let builder = record_with(
        builder,
        Subscription::new("typed").start_from(StartFrom::Earliest),
        &log,
    );
    let bus = builder
        .subscribe_all(
            "orders",
            Subscription::new("all").start_from(StartFrom::Earliest),
            move || All(l.clone()),
        )
        .build()
        .unwrap();
    bus.settled().await;
    // Both groups went on past the bad rows.
    assert_eq!(log.of("typed"), vec![(1, 0), (1, 3)]);
    assert_eq!(log.of("all"), vec![(1, 0), (1, 3)]);
    // The typed group never sees the unknown type (not its type); the others are dead letters.
    let typed = bus.dead_letters("typed").unwrap().list();
    assert_eq!(typed.len(), 3, "{typed:?}");
    let all = bus.dead_letters("all").unwrap().list();
    assert_eq!(all.len(), 4, "{all:?}");
    let errors: Vec<&str> = all.iter().map(|d| d.error.as_str()).collect();
    assert!(
        errors[0].contains("unknown event type \"NoSuchType\""),
        "{errors:?}"
    );
    assert!(errors[1].contains("does not deserialize"), "{errors:?}");
    assert!(
        errors[2].contains("not JSON") || errors[2].contains("does not deserialize"),
        "{errors:?}"
    );
    assert!(errors[3].contains("no upcaster"), "{errors:?}");
    let raw_entry = all[0].envelope.downcast_ref::<Undecodable>().unwrap();
    assert_eq!(raw_entry.name, "NoSuchType");
    assert_eq!(raw_entry.payload, r#"{"x":1}"#);
    assert_eq!(all[0].envelope.offset(), 1);
    let g = &bus.stats().topics[0].groups;
    assert!(g.iter().all(|g| g.lag == 0), "{g:?}");
    bus.shutdown().await;
}

/// Records the type name of every event it is handed.
struct Names(Arc<parking_lot::Mutex<Vec<String>>>);
impl AnyHandler for Names {
    async fn handle(&mut self, e: &AnyEnvelope, _: &Context) -> Result<(), HandlerError> {
        self.0.lock().push(e.event().event_info().name.to_owned());
        Ok(())
    }
}

async fn rows_no_group_of_the_topic_consumes_are_dead_letters_for_catch_all_groups(b: Backend) {
    // Rows that decode into a registered Rust type, but not into an event of this topic: the
    // bus's own placeholder for unreadable rows, and an event type of another topic.
    let store = b.open().await;
    let placeholder = serde_json::json!({"name": "Placed", "version": 1, "payload": "{}"});
    let mut rows = vec![
        stores::raw_row("Placed", 1, r#"{"order":1,"seq":0}"#),
        stores::raw_row("tidings.Undecodable", 1, &placeholder.to_string()),
        stores::raw_row(
            "OrderCreated",
            2,
            r#"{"order":1,"total":5,"currency":"EUR"}"#,
        ),
        stores::raw_row("Placed", 1, r#"{"order":1,"seq":1}"#),
    ];
    store.append(&mut rows).await.unwrap();

    let names = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let n = Arc::clone(&names);
    let log = Log::default();
    let builder = b.builder().await.topic(topic(1));
    let builder = record_with(
        builder,
        Subscription::new("typed").start_from(StartFrom::Earliest),
        &log,
    );
    let bus = builder
        .subscribe_all(
            "orders",
            Subscription::new("all").start_from(StartFrom::Earliest),
            move || Names(Arc::clone(&n)),
        )
        .build()
        .unwrap();
    bus.settled().await;
    // The catch-all group is handed only the topic's own events.
    assert_eq!(*names.lock(), vec!["Placed", "Placed"]);
    let all = bus.dead_letters("all").unwrap().list();
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all[0].error.contains("placeholder"), "{:?}", all[0].error);
    assert_eq!(all[0].envelope.offset(), 1);
    assert!(
        all[1].error.contains("of topic \"orders.v\""),
        "{:?}",
        all[1].error
    );
    assert_eq!(all[1].envelope.offset(), 2);
    let raw = all[1].envelope.downcast_ref::<Undecodable>().unwrap();
    assert_eq!(raw.name, "OrderCreated");
    // A typed group passes rows of other types by, known or not: it is not their consumer.
    assert_eq!(log.of("typed"), vec![(1, 0), (1, 1)]);
    assert!(bus.dead_letters("typed").unwrap().is_empty());
    let g = &bus.stats().topics[0].groups;
    assert!(g.iter().all(|g| g.lag == 0), "{g:?}");
    bus.shutdown().await;
}

/// Version 2 of an event whose version 1 had no currency.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Event)]
#[event(topic = "orders.v", key = order, version = 2, name = "OrderCreated")]
struct OrderCreated {
    order: u64,
    total: u64,
    currency: String,
}

#[derive(serde::Deserialize)]
struct OrderCreatedV1 {
    order: u64,
    total: u64,
}

struct Totals(Arc<parking_lot::Mutex<Vec<(u64, u64, String)>>>);
impl Handler<OrderCreated> for Totals {
    async fn handle(
        &mut self,
        e: &Envelope<OrderCreated>,
        _: &Context,
    ) -> Result<(), HandlerError> {
        let o = e.event();
        self.0.lock().push((o.order, o.total, o.currency.clone()));
        Ok(())
    }
}

async fn upcasters_read_old_versions(b: Backend) {
    let store = b.open().await;
    let mut old = stores::raw_row("OrderCreated", 1, r#"{"order":1,"total":500}"#);
    old.topic = "orders.v".into();
    store.append(&mut [old]).await.unwrap();

    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let s = seen.clone();
    let bus = b
        .builder()
        .await
        .topic(TopicConfig::new("orders.v").partitions(1))
        .upcaster(Upcaster::typed("OrderCreated", 1, |v1: OrderCreatedV1| {
            OrderCreated {
                order: v1.order,
                total: v1.total,
                currency: "EUR".into(),
            }
        }))
        .subscribe::<OrderCreated, _>(
            Subscription::new("totals").start_from(StartFrom::Earliest),
            move || Totals(s.clone()),
        )
        .build()
        .unwrap();
    bus.publish(OrderCreated {
        order: 2,
        total: 700,
        currency: "USD".into(),
    })
    .await
    .unwrap();
    bus.settled().await;
    assert_eq!(
        *seen.lock(),
        vec![(1, 500, "EUR".to_owned()), (2, 700, "USD".to_owned())]
    );
    assert!(bus.dead_letters("totals").unwrap().is_empty());
    bus.shutdown().await;

    // Two upcasters for one version are a build error.
    let twice = b
        .builder()
        .await
        .upcaster(Upcaster::new("OrderCreated", 1, Ok))
        .upcaster(Upcaster::new("OrderCreated", 1, Ok))
        .build();
    assert!(twice.is_err());
}

async fn oversized_payloads_are_refused(b: Backend) {
    let bus = b
        .builder()
        .await
        .topic(topic(1))
        .max_payload(20)
        .build()
        .unwrap();
    bus.publish(Placed { order: 1, seq: 1 }).await.unwrap();
    match bus
        .publish(Placed {
            order: 123_456_789,
            seq: 123_456_789,
        })
        .await
    {
        Err(PublishError::TooLarge { event, size, limit }) => {
            assert_eq!(event.order, 123_456_789);
            assert_eq!(limit, 20);
            assert!(size > 20);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    bus.shutdown().await;
    let store = b.open().await;
    assert_eq!(
        store.head("orders", 0).await.unwrap(),
        1,
        "nothing was appended"
    );
}

async fn retention_by_count_trims_the_log(b: Backend) {
    let bus = b
        .builder()
        .await
        .topic(topic(1).retention(Retention::MaxEvents(5)))
        .retention_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    publish_orders(&bus, 1, 12).await;
    let store = b.open().await;
    let mut kept = usize::MAX;
    for _ in 0..200 {
        kept = store.read("orders", 0, 0, 100).await.unwrap().len();
        if kept == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(kept, 5);
    let rows = store.read("orders", 0, 0, 100).await.unwrap();
    assert_eq!(rows[0].offset, 7);
    bus.shutdown().await;
    // A new group from the earliest event starts at the oldest one kept; offsets go on.
    let log = Log::default();
    let bus = record_with(
        b.builder().await.topic(topic(1)),
        Subscription::new("late").start_from(StartFrom::Earliest),
        &log,
    )
    .build()
    .unwrap();
    bus.settled().await;
    assert_eq!(log.of("late"), (7..12).map(|s| (0, s)).collect::<Vec<_>>());
    let p = bus.publish(Placed { order: 0, seq: 12 }).await.unwrap();
    assert_eq!(p.offset, 12);
    bus.shutdown().await;
}

async fn producer_dedup_publishes_a_repeated_id_once(b: Backend) {
    let log = Log::default();
    let bus = record(
        b.builder()
            .await
            .topic(topic(1))
            .dedup_publishes(DedupWindow::new()),
        "g",
        &log,
    )
    .build()
    .unwrap();
    let id = Uuid::now_v7();
    let first = bus
        .publish_with(Placed { order: 1, seq: 1 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    let again = bus
        .publish_with(Placed { order: 1, seq: 1 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.offset, first.offset);
    bus.settled().await;
    assert_eq!(log.len("g"), 1);
    bus.shutdown().await;
    let store = b.open().await;
    assert_eq!(store.head("orders", 0).await.unwrap(), 1);
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Event)]
#[event(topic = "receipts", key = order)]
struct Receipt {
    order: u64,
}

struct Issue;
impl Handler<Placed> for Issue {
    async fn handle(&mut self, e: &Envelope<Placed>, ctx: &Context) -> Result<(), HandlerError> {
        ctx.publish(Receipt {
            order: e.event().order,
        })
        .await?;
        Ok(())
    }
}

struct Count(Arc<AtomicU32>);
impl Handler<Receipt> for Count {
    async fn handle(&mut self, _: &Envelope<Receipt>, _: &Context) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

async fn handler_follow_ups_are_durable_too(b: Backend) {
    let receipts = Arc::new(AtomicU32::new(0));
    let r = receipts.clone();
    let bus = b
        .builder()
        .await
        .topic(topic(2))
        .topic(TopicConfig::new("receipts").partitions(2))
        .subscribe::<Placed, _>("issuer", || Issue)
        .subscribe::<Receipt, _>("counter", move || Count(r.clone()))
        .build()
        .unwrap();
    publish_orders(&bus, 10, 3).await;
    // Shutdown drains the follow-ups too.
    bus.shutdown().await;
    assert_eq!(receipts.load(Ordering::SeqCst), 30);
    let store = b.open().await;
    let mut stored = 0;
    for p in 0..2 {
        let rows = store.read("receipts", p, 0, 1000).await.unwrap();
        for row in &rows {
            assert!(row.causation_id.is_some(), "a follow-up names its cause");
        }
        stored += rows.len();
    }
    assert_eq!(stored, 30);
}

/// Fails seven until told otherwise.
struct FailSevenWhile(Arc<std::sync::atomic::AtomicBool>, Log);
impl Handler<Placed> for FailSevenWhile {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        if e.event().seq == 7 && self.0.load(Ordering::SeqCst) {
            return Err(HandlerError::msg("seven is down"));
        }
        self.1
             .0
            .lock()
            .push(("g".into(), e.event().order, e.event().seq));
        Ok(())
    }
}

fn failing_bus(builder: tidings::BusBuilder, failing: bool, log: &Log) -> Bus {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(failing));
    let log = log.clone();
    builder
        .topic(topic(1))
        .subscribe::<Placed, _>(Subscription::new("g").max_deliveries(2), move || {
            FailSevenWhile(flag.clone(), log.clone())
        })
        .build()
        .unwrap()
}

async fn dead_letters_survive_a_restart_until_redriven_and_handled(b: Backend) {
    let log = Log::default();
    let bus = failing_bus(b.builder().await, true, &log);
    publish_orders(&bus, 1, 10).await;
    bus.settled().await;
    assert_eq!(bus.dead_letters("g").unwrap().len(), 1);
    bus.shutdown().await;

    // Restarted, the handler healthy: the entry is back, with what it had.
    let bus = failing_bus(b.builder().await, false, &log);
    bus.settled().await;
    let dlq = bus.dead_letters("g").unwrap();
    let entries = dlq.list();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    assert_eq!(entry.envelope.downcast_ref::<Placed>().unwrap().seq, 7);
    assert_eq!(entry.envelope.offset(), 7);
    assert_eq!(entry.attempts, 2);
    assert!(entry.error.contains("seven is down"));
    assert_eq!(log.len("g"), 9, "nothing was handled again");
    dlq.redrive(entry.seq).await.unwrap();
    bus.settled().await;
    assert_eq!(log.len("g"), 10);
    bus.shutdown().await;

    // Handled after its redrive: gone for good.
    let bus = failing_bus(b.builder().await, false, &log);
    bus.settled().await;
    assert!(bus.dead_letters("g").unwrap().is_empty());
    assert_eq!(log.len("g"), 10);
    bus.shutdown().await;
    assert!(b.open().await.dead_letters("g").await.unwrap().is_empty());
}

async fn discarded_dead_letters_do_not_come_back(b: Backend) {
    let log = Log::default();
    let bus = failing_bus(b.builder().await, true, &log);
    publish_orders(&bus, 1, 10).await;
    bus.settled().await;
    let dlq = bus.dead_letters("g").unwrap();
    let seq = dlq.list()[0].seq;
    dlq.discard(seq, "not needed").unwrap();
    // The row is deleted in the background.
    let store = b.open().await;
    for _ in 0..200 {
        if store.dead_letters("g").await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(store.dead_letters("g").await.unwrap().is_empty());
    bus.shutdown().await;
    let bus = failing_bus(b.builder().await, false, &log);
    bus.settled().await;
    assert!(bus.dead_letters("g").unwrap().is_empty());
    bus.shutdown().await;
}

async fn effectively_once_marks_survive_a_restart(b: Backend) {
    let log = Log::default();
    let build = |builder: tidings::BusBuilder| {
        record_with(
            builder.topic(topic(2)),
            Subscription::new("once").delivery(DeliveryMode::EffectivelyOnce),
            &log,
        )
        .build()
        .unwrap()
    };
    let id = Uuid::now_v7();
    let bus = build(b.builder().await);
    bus.publish_with(Placed { order: 1, seq: 1 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    bus.publish(Placed { order: 2, seq: 1 }).await.unwrap();
    bus.settled().await;
    assert_eq!(log.len("once"), 2);
    // The mark and the offset were committed with the event, not on the next tick.
    let store = b.open().await;
    let mut committed = 0;
    for p in 0..2 {
        committed += store
            .committed("once", "orders", p)
            .await
            .unwrap()
            .unwrap_or(0);
    }
    assert_eq!(committed, 2);
    bus.shutdown().await;

    // After a restart the producer's window is gone; the consumer's mark is not.
    let bus = build(b.builder().await);
    bus.publish_with(Placed { order: 1, seq: 1 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    bus.publish(Placed { order: 3, seq: 1 }).await.unwrap();
    bus.settled().await;
    let mut seen = log.of("once");
    seen.sort();
    assert_eq!(
        seen,
        vec![(1, 1), (2, 1), (3, 1)],
        "the copy was handled again"
    );
    let g = &bus.stats().topics[0].groups[0];
    assert_eq!(g.duplicates, 1);
    bus.shutdown().await;
}

async fn batched_marks_commit_with_the_highest_offsets(b: Backend) {
    use tidings::store::GroupOffset;
    let store = b.open().await;
    let at = |group: &str, partition: u32, next_offset: u64| GroupOffset {
        group: group.to_owned(),
        topic: "orders".to_owned(),
        partition,
        next_offset,
    };
    let ids: Vec<Uuid> = (0..600).map(|_| Uuid::now_v7()).collect();
    store.commit_marks(&[]).await.unwrap();
    // Many marks of two groups in one call, offsets out of order, an id twice.
    let mut marks: Vec<(GroupOffset, Uuid)> = ids[..550]
        .iter()
        .enumerate()
        .map(|(i, &id)| (at("a", (i % 2) as u32, 1000 - i as u64), id))
        .collect();
    marks.push((at("a", 0, 3), ids[0]));
    marks.push((at("b", 1, 7), ids[599]));
    store.commit_marks(&marks).await.unwrap();
    assert_eq!(store.committed("a", "orders", 0).await.unwrap(), Some(1000));
    assert_eq!(store.committed("a", "orders", 1).await.unwrap(), Some(999));
    assert_eq!(store.committed("b", "orders", 1).await.unwrap(), Some(7));
    // An offset never moves back.
    store
        .commit_marks(&[(at("a", 0, 5), ids[550])])
        .await
        .unwrap();
    assert_eq!(store.committed("a", "orders", 0).await.unwrap(), Some(1000));

    // Marks are per group; more ids than one statement takes on SQLite.
    let mut found = store.marked("a", &ids).await.unwrap();
    found.sort();
    let mut expected = ids[..551].to_vec();
    expected.sort();
    assert_eq!(found, expected);
    assert_eq!(store.marked("b", &ids).await.unwrap(), vec![ids[599]]);
    assert!(store.marked("a", &[]).await.unwrap().is_empty());
    assert!(store.is_marked("a", ids[550]).await.unwrap());
    assert!(!store.is_marked("a", ids[551]).await.unwrap());
    assert!(!store.is_marked("b", ids[0]).await.unwrap());
}

async fn effectively_once_bursts_skip_every_copy(b: Backend) {
    // Many events at once (their marks share commits), then copies of some published again
    // while the group is busy: each is handled once, and `settled` means committed.
    let log = Log::default();
    let bus = record_with(
        b.builder().await.topic(topic(2)),
        Subscription::new("once").delivery(DeliveryMode::EffectivelyOnce),
        &log,
    )
    .build()
    .unwrap();
    let receipts = bus
        .publish_all((0..300).map(|seq| Placed {
            order: seq % 7,
            seq,
        }))
        .await
        .unwrap();
    for r in receipts.iter().step_by(30) {
        let seq = r.offset; // any payload: the id makes it a copy
        bus.publish_with(Placed { order: 0, seq }, PublishOptions::new().id(r.id))
            .await
            .unwrap();
    }
    bus.settled().await;
    assert_eq!(log.len("once"), 300, "a copy was handled");
    let g = &bus.stats().topics[0].groups[0];
    assert_eq!(g.duplicates, 10);
    let store = b.open().await;
    let mut committed = 0;
    for p in 0..2 {
        committed += store
            .committed("once", "orders", p)
            .await
            .unwrap()
            .unwrap_or(0);
    }
    assert_eq!(committed, 310);
    bus.shutdown().await;
}

async fn events_appended_outside_the_bus_reach_its_groups(b: Backend) {
    // Another writer (another process, the application's own transaction) appends to a
    // partition the bus also appends to: the bus's groups get those events too, in offset
    // order, when the bus next appends there (or at the latest after a restart).
    let log = Log::default();
    let bus = record(b.builder().await.topic(topic(1)), "g", &log)
        .build()
        .unwrap();
    bus.publish(Placed { order: 1, seq: 0 }).await.unwrap();
    bus.settled().await;
    let other = b.open().await;
    let mut rows = vec![
        stores::raw_row("Placed", 1, r#"{"order":1,"seq":1}"#),
        stores::raw_row("Placed", 1, r#"{"order":1,"seq":2}"#),
    ];
    other.append(&mut rows).await.unwrap();
    assert_eq!((rows[0].offset, rows[1].offset), (1, 2));
    let p = bus.publish(Placed { order: 1, seq: 3 }).await.unwrap();
    assert_eq!(p.offset, 3);
    bus.settled().await;
    assert_eq!(log.of("g"), (0..4).map(|s| (1, s)).collect::<Vec<_>>());
    bus.shutdown().await;
}

async fn try_append_appends_all_or_names_the_busy_partitions(b: Backend) {
    // With no other transaction, `try_append` appends like `append` (dense offsets after the
    // other writer's); a partition never written to may be named busy (PostgreSQL: creating
    // its head could wait), and then nothing of the call is appended.
    let store = b.open().await;
    store
        .append(&mut [stores::placed_row(0, 1, 0), stores::placed_row(0, 1, 1)])
        .await
        .unwrap();
    let mut rows = vec![stores::placed_row(0, 1, 2), stores::placed_row(0, 1, 3)];
    assert_eq!(
        store.try_append(&mut rows).await.unwrap(),
        TryAppend::Appended
    );
    assert_eq!((rows[0].offset, rows[1].offset), (2, 3));
    let mut rows = vec![stores::placed_row(0, 1, 4), stores::placed_row(1, 2, 0)];
    match store.try_append(&mut rows).await.unwrap() {
        TryAppend::Appended => assert_eq!((rows[0].offset, rows[1].offset), (4, 0)),
        TryAppend::Busy(busy) => {
            assert_eq!(busy, vec![("orders".to_owned(), 1)]);
            assert_eq!(
                store.head("orders", 0).await.unwrap(),
                4,
                "appended in part"
            );
            assert_eq!(
                store.head("orders", 1).await.unwrap(),
                0,
                "appended in part"
            );
            assert!(rows.iter().all(|r| !r.payload.is_empty()), "payloads kept");
            store.append(&mut rows).await.unwrap();
        }
        other => panic!("{other:?}"),
    }
    let offsets =
        |rows: Vec<tidings::store::StoredEvent>| rows.iter().map(|r| r.offset).collect::<Vec<_>>();
    assert_eq!(
        offsets(store.read("orders", 0, 0, 10).await.unwrap()),
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(
        offsets(store.read("orders", 1, 0, 10).await.unwrap()),
        vec![0]
    );
}

async fn retention_by_age_trims_old_events(b: Backend) {
    let bus = b
        .builder()
        .await
        .topic(topic(1).retention(Retention::MaxAge(Duration::from_millis(2500))))
        .retention_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    publish_orders(&bus, 1, 5).await;
    tokio::time::sleep(Duration::from_millis(2700)).await;
    publish_orders(&bus, 1, 3).await;
    let store = b.open().await;
    // Wait until the five old ones are gone (the task runs every 20 ms; a loaded machine may
    // be late), then the young ones are what is left, offsets unchanged.
    let mut kept = Vec::new();
    for _ in 0..500 {
        kept = store.read("orders", 0, 0, 100).await.unwrap();
        if kept.first().is_some_and(|r| r.offset >= 5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let offsets: Vec<u64> = kept.iter().map(|r| r.offset).collect();
    assert!(
        !offsets.is_empty()
            && offsets.iter().all(|o| (5..8).contains(o))
            && offsets.ends_with(&[7]),
        "{offsets:?}"
    );
    bus.shutdown().await;
}

async fn a_topic_with_fewer_partitions_than_its_log_is_a_build_error(b: Backend) {
    let log = Log::default();
    let bus = record(b.builder().await.topic(topic(8)), "g", &log)
        .build()
        .unwrap();
    publish_orders(&bus, 64, 1).await;
    bus.settled().await;
    bus.shutdown().await;
    assert_eq!(b.open().await.partitions("orders").await.unwrap(), 8);

    // Fewer partitions: the events of partitions 4..8 would never be handled.
    let refused = record(b.builder().await.topic(topic(4)), "g", &log).build();
    match refused {
        Err(BuildError::FewerPartitionsThanStored {
            topic,
            configured,
            stored,
        }) => assert_eq!((topic.as_str(), configured, stored), ("orders", 4, 8)),
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("a topic with 4 of its log's 8 partitions was accepted"),
    }
    // A publisher's topic configured without a partition count gets 1 with a store: refused
    // too (its publishes would all go to partition 0).
    let refused = b.builder().await.topic(TopicConfig::new("orders")).build();
    assert!(
        matches!(refused, Err(BuildError::FewerPartitionsThanStored { .. })),
        "{:?}",
        refused.err()
    );
    // As many, or more (keys then map to other partitions: documented), build.
    for partitions in [8, 12] {
        let bus = record(b.builder().await.topic(topic(partitions)), "g", &log)
            .build()
            .unwrap();
        bus.settled().await;
        bus.shutdown().await;
    }
    assert_eq!(log.len("g"), 64, "nothing handled twice, nothing lost");
}

/// Fails every odd `seq`.
struct FailOdd;
impl Handler<Placed> for FailOdd {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        if e.event().seq % 2 == 1 {
            return Err(HandlerError::permanent("odd"));
        }
        Ok(())
    }
}

async fn dead_letters_are_complete_once_the_bus_is_ready(b: Backend) {
    let bus = b
        .builder()
        .await
        .topic(topic(2))
        .subscribe::<Placed, _>("g", || FailOdd)
        .build()
        .unwrap();
    publish_orders(&bus, 4, 2).await;
    bus.settled().await;
    assert_eq!(bus.dead_letters("g").unwrap().len(), 4);
    bus.shutdown().await;

    // Restarted: once ready, an operator tool reads every entry, before anything settled.
    let bus = b
        .builder()
        .await
        .topic(topic(2))
        .subscribe::<Placed, _>("g", || FailOdd)
        .build()
        .unwrap();
    assert!(bus.ready().await);
    assert!(bus.is_ready());
    assert_eq!(bus.dead_letters("g").unwrap().len(), 4);
    bus.shutdown().await;
    assert!(!bus.is_ready());

    // Restarted again: a redrive right after build finds every entry without waiting for
    // anything (it waits for the group's entries itself).
    let log = Log::default();
    let bus = record(b.builder().await.topic(topic(2)), "g", &log)
        .build()
        .unwrap();
    assert_eq!(
        bus.dead_letters("g").unwrap().redrive_all().await.unwrap(),
        4
    );
    bus.settled().await;
    let mut handled = log.of("g");
    handled.sort();
    assert_eq!(handled, vec![(0, 1), (1, 1), (2, 1), (3, 1)]);
    assert!(bus.dead_letters("g").unwrap().is_empty());
    bus.shutdown().await;
}

/// An event with a float: JSON has no NaN or infinity.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Event)]
#[event(topic = "orders", key = order)]
struct Priced {
    order: u64,
    price: f64,
}

/// Records the prices it handles.
#[derive(Clone, Default)]
struct Prices(Arc<parking_lot::Mutex<Vec<f64>>>);

impl Handler<Priced> for Prices {
    async fn handle(&mut self, e: &Envelope<Priced>, _: &Context) -> Result<(), HandlerError> {
        self.0.lock().push(e.event().price);
        Ok(())
    }
}

async fn payloads_that_do_not_read_back_are_refused_at_publish(b: Backend) {
    let prices = Prices::default();
    let seen = prices.clone();
    let bus = b
        .builder()
        .await
        .topic(topic(1))
        .subscribe::<Priced, _>("prices", move || seen.clone())
        .build()
        .unwrap();
    bus.publish(Priced {
        order: 1,
        price: 1.5,
    })
    .await
    .expect("a finite float publishes");
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        match bus
            .publish(Priced {
                order: 2,
                price: bad,
            })
            .await
        {
            Err(PublishError::Serialize { event, message }) => {
                assert_eq!(event.order, 2, "the event is handed back");
                assert_eq!(event.price.to_bits(), bad.to_bits());
                assert!(message.contains("Priced"), "{message}");
            }
            other => panic!("{bad}: expected Serialize, got {other:?}"),
        }
    }
    // One bad event in a batch refuses the batch: all are handed back, none appended.
    let batch = vec![
        Priced {
            order: 3,
            price: 2.0,
        },
        Priced {
            order: 4,
            price: f64::NAN,
        },
        Priced {
            order: 5,
            price: 3.0,
        },
    ];
    match bus.publish_all(batch).await {
        Err(PublishError::Serialize { event, .. }) => {
            let orders: Vec<u64> = event.iter().map(|e| e.order).collect();
            assert_eq!(orders, [3, 4, 5]);
        }
        other => panic!("expected Serialize, got {other:?}"),
    }
    bus.publish(Priced {
        order: 6,
        price: -0.25,
    })
    .await
    .expect("publishing goes on");
    bus.settled().await;
    assert_eq!(
        *prices.0.lock(),
        [1.5, -0.25],
        "only readable events were published"
    );
    bus.shutdown().await;
    let store = b.open().await;
    let rows = store.read("orders", 0, 0, 100).await.unwrap();
    assert_eq!(rows.len(), 2, "nothing else was appended");
    // What was committed reads back: a new group replaying the log gets both, no dead letter.
    let replayed = Prices::default();
    let seen = replayed.clone();
    let bus = b
        .builder()
        .await
        .topic(topic(1))
        .subscribe::<Priced, _>(
            Subscription::new("replay").start_from(StartFrom::Earliest),
            move || seen.clone(),
        )
        .build()
        .unwrap();
    bus.settled().await;
    assert_eq!(*replayed.0.lock(), [1.5, -0.25]);
    assert!(bus.dead_letters("replay").unwrap().is_empty());
    bus.shutdown().await;
}

/// Settles, or fails the test if the bus does not get there (a partition stalled on a row).
async fn settle(bus: &Bus) {
    tokio::time::timeout(Duration::from_secs(10), bus.settled())
        .await
        .expect("the bus settles: no partition is stalled");
}

async fn rows_with_out_of_range_integers_are_dead_letters_and_the_page_goes_on(b: Backend) {
    let store = b.open().await;
    let mut rows: Vec<_> = (0..6).map(|seq| stores::placed_row(0, 1, seq)).collect();
    store.append(&mut rows).await.unwrap();
    drop(store);
    // Versions no u32 holds (they were truncated and read as another version).
    b.execute("UPDATE {t}tidings_events SET version = -1 WHERE log_offset = 1")
        .await;
    b.execute("UPDATE {t}tidings_events SET version = -2147483648 WHERE log_offset = 4")
        .await;

    let log = Log::default();
    let l = log.clone();
    let builder = b.builder().await.topic(topic(1));
    let builder = record_with(
        builder,
        Subscription::new("typed").start_from(StartFrom::Earliest),
        &log,
    );
    let bus = builder
        .subscribe_all(
            "orders",
            Subscription::new("all").start_from(StartFrom::Earliest),
            move || All(l.clone()),
        )
        .build()
        .unwrap();
    settle(&bus).await;
    // The good events of the same page, before and after the broken rows, are handled.
    let good = vec![(1, 0), (1, 2), (1, 3), (1, 5)];
    assert_eq!(log.of("typed"), good);
    assert_eq!(log.of("all"), good);
    for group in ["typed", "all"] {
        let entries = bus.dead_letters(group).unwrap().list();
        let offsets: Vec<u64> = entries.iter().map(|e| e.envelope.offset()).collect();
        assert_eq!(offsets, vec![1, 4], "{group}: {entries:?}");
        for (entry, (seq, value)) in entries.iter().zip([(1, "-1"), (4, "-2147483648")]) {
            let raw = entry.envelope.downcast_ref::<Undecodable>().unwrap();
            assert_eq!(raw.name, "Placed");
            assert_eq!(raw.payload, format!(r#"{{"order":1,"seq":{seq}}}"#));
            assert!(
                entry.error.contains("version")
                    && entry.error.contains(&format!("{value} is out of range")),
                "{group}: {}",
                entry.error
            );
        }
    }
    let g = &bus.stats().topics[0].groups;
    assert!(g.iter().all(|g| g.lag == 0), "{g:?}");
    bus.shutdown().await;
}

/// Fails seq 1 to 4 while the flag is up.
struct FailFourWhile(Arc<std::sync::atomic::AtomicBool>, Log);
impl Handler<Placed> for FailFourWhile {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        let seq = e.event().seq;
        if self.0.load(Ordering::SeqCst) && (1..=4).contains(&seq) {
            return Err(HandlerError::permanent("down"));
        }
        self.1 .0.lock().push(("g".into(), e.event().order, seq));
        Ok(())
    }
}

async fn dead_letters_with_broken_columns_are_restored_with_the_others(b: Backend) {
    let log = Log::default();
    let build = |builder: tidings::BusBuilder, failing: bool| {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(failing));
        let log = log.clone();
        builder
            .topic(topic(1))
            .subscribe::<Placed, _>(Subscription::new("g").max_deliveries(1), move || {
                FailFourWhile(flag.clone(), log.clone())
            })
            .build()
            .unwrap()
    };
    let bus = build(b.builder().await, true);
    publish_orders(&bus, 1, 6).await;
    settle(&bus).await;
    assert_eq!(bus.dead_letters("g").unwrap().len(), 4);
    bus.shutdown().await;
    // A count out of range, an event's version out of range, and a dead letter that has no
    // place in the log any more.
    b.execute("UPDATE {t}tidings_dead_letters SET attempts = -1 WHERE log_offset = 1")
        .await;
    b.execute("UPDATE {t}tidings_dead_letters SET version = -1 WHERE log_offset = 2")
        .await;
    b.execute("UPDATE {t}tidings_dead_letters SET partition_no = -1 WHERE log_offset = 3")
        .await;

    let bus = build(b.builder().await, false);
    bus.publish(Placed { order: 0, seq: 6 }).await.unwrap();
    settle(&bus).await;
    // The group started and goes on.
    assert_eq!(log.of("g"), vec![(0, 0), (0, 5), (0, 6)]);
    let dlq = bus.dead_letters("g").unwrap();
    let entries = dlq.list();
    let offsets: Vec<u64> = entries.iter().map(|e| e.envelope.offset()).collect();
    // The one that cannot be placed stays in the store (logged), the others are back.
    assert_eq!(offsets, vec![1, 2, 4], "{entries:?}");
    // Its event is intact: the error says what could not be read, and it can be redriven.
    assert!(
        entries[0].error.contains("down")
            && entries[0].error.contains("attempts")
            && entries[0].error.contains("-1 is out of range"),
        "{}",
        entries[0].error
    );
    assert_eq!(entries[0].envelope.downcast_ref::<Placed>().unwrap().seq, 1);
    // Its event cannot be read back: an `Undecodable`, with why.
    let raw = entries[1].envelope.downcast_ref::<Undecodable>().unwrap();
    assert_eq!(raw.name, "Placed");
    assert!(
        entries[1].error.contains("version") && entries[1].error.contains("-1 is out of range"),
        "{}",
        entries[1].error
    );
    assert!(dlq.redrive(entries[1].seq).await.is_err());
    // Untouched.
    assert_eq!(entries[2].envelope.downcast_ref::<Placed>().unwrap().seq, 4);
    assert_eq!(
        (entries[2].attempts, entries[2].error.as_str()),
        (1, "down")
    );
    dlq.redrive(entries[0].seq).await.unwrap();
    dlq.redrive(entries[2].seq).await.unwrap();
    settle(&bus).await;
    assert_eq!(log.of("g"), vec![(0, 0), (0, 5), (0, 6), (0, 1), (0, 4)]);
    bus.shutdown().await;
}

async fn offsets_out_of_range_are_reported_as_corrupt_not_wrapped(b: Backend) {
    // A negative head or committed offset was read as a huge one: a group would have passed
    // every event, an append would have written at a wrapped offset.
    let store = b.open().await;
    let mut rows = vec![stores::placed_row(0, 1, 0)];
    store.append(&mut rows).await.unwrap();
    store
        .commit(&[tidings::store::GroupOffset {
            group: "g".into(),
            topic: "orders".into(),
            partition: 0,
            next_offset: 1,
        }])
        .await
        .unwrap();
    drop(store);
    b.execute("UPDATE {t}tidings_heads SET next_offset = -5")
        .await;
    b.execute("UPDATE {t}tidings_offsets SET next_offset = -1")
        .await;
    let store = b.open().await;
    let corrupt = |r: Result<String, StoreError>, what: &str| match r {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("out of range"), "{what}: {m}"),
        other => panic!("{what}: {other:?}"),
    };
    corrupt(store.head("orders", 0).await.map(|h| h.to_string()), "head");
    corrupt(
        store
            .committed("g", "orders", 0)
            .await
            .map(|c| format!("{c:?}")),
        "committed",
    );
    corrupt(
        store
            .offset_at("orders", 0, SystemTime::now() + Duration::from_secs(60))
            .await
            .map(|o| o.to_string()),
        "offset_at past the last event (the head)",
    );
}
