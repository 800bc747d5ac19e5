//! Building (invalid configuration is refused), shutting down (nothing accepted is lost), stats.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::testing::Recorder;
use tidings::{BuildError, PublishError};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "work", key = n)]
struct Item {
    n: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "work.done", key = n)]
struct Done {
    n: u64,
}

/// Handles one event per permit the test hands out.
struct Gated(Arc<tokio::sync::Semaphore>);
impl Handler<Item> for Gated {
    async fn handle(&mut self, _: &Envelope<Item>, _: &Context) -> Result<(), HandlerError> {
        self.0.acquire().await.unwrap().forget();
        Ok(())
    }
}

struct Nop;
impl Handler<Item> for Nop {
    async fn handle(&mut self, _: &Envelope<Item>, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[tokio::test]
async fn invalid_configuration_is_refused_at_build() {
    let zero_partitions = Bus::builder()
        .topic(TopicConfig::new("work").partitions(0))
        .build();
    assert!(
        matches!(zero_partitions, Err(BuildError::ZeroPartitions { topic }) if topic == "work")
    );

    let zero_capacity = Bus::builder()
        .topic(TopicConfig::new("work").capacity(0))
        .build();
    assert!(matches!(
        zero_capacity,
        Err(BuildError::ZeroCapacity { .. })
    ));

    let duplicate = Bus::builder()
        .subscribe::<Item, _>("billing", || Nop)
        .subscribe::<Item, _>("billing", || Nop)
        .build();
    assert!(
        matches!(duplicate, Err(BuildError::DuplicateSubscription { group }) if group == "billing")
    );

    let bad_group = Bus::builder()
        .subscribe::<Item, _>("bill ing", || Nop)
        .build();
    assert!(matches!(
        bad_group,
        Err(BuildError::InvalidSubscriptionName { .. })
    ));

    let bad_topic = Bus::builder().topic(TopicConfig::new("or*ders")).build();
    let err = bad_topic.unwrap_err();
    assert!(matches!(err, BuildError::InvalidTopicName { .. }));
    assert!(err.to_string().contains("'*'"), "{err}");

    let duplicate_topic = Bus::builder()
        .topic(TopicConfig::new("work"))
        .topic(TopicConfig::new("work"))
        .build();
    assert!(matches!(
        duplicate_topic,
        Err(BuildError::DuplicateTopic { .. })
    ));

    let zero_deliveries = Bus::builder()
        .subscribe::<Item, _>(Subscription::new("g").max_deliveries(0), || Nop)
        .build();
    assert!(matches!(
        zero_deliveries,
        Err(BuildError::InvalidSetting(_))
    ));

    let zero_batch = Bus::builder()
        .subscribe::<Item, _>(Subscription::new("g").batch_size(0), || Nop)
        .build();
    assert!(matches!(zero_batch, Err(BuildError::InvalidSetting(_))));

    let bad_all = Bus::builder().subscribe_all("", "audit", || AnyNop).build();
    assert!(matches!(bad_all, Err(BuildError::InvalidTopicName { .. })));
}

struct AnyNop;
impl AnyHandler for AnyNop {
    async fn handle(&mut self, _: &AnyEnvelope, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[test]
fn building_outside_a_runtime_is_a_clear_error() {
    let err = Bus::builder().build().unwrap_err();
    assert_eq!(err, BuildError::NoRuntime);
}

/// Slow handler that publishes a follow-up event for every item.
struct SlowForwarder {
    handled: Arc<AtomicU64>,
}
impl Handler<Item> for SlowForwarder {
    async fn handle(&mut self, e: &Envelope<Item>, ctx: &Context) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        ctx.publish(Done { n: e.event().n }).await?;
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct CollectDone(Recorder<u64>);
impl Handler<Done> for CollectDone {
    async fn handle(&mut self, e: &Envelope<Done>, _: &Context) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.0.push(e.event().n);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_everything_accepted_including_follow_up_events() {
    let handled = Arc::new(AtomicU64::new(0));
    let done = Recorder::new();
    let bus = Bus::builder()
        .topic(TopicConfig::new("work").partitions(2).capacity(8))
        .subscribe::<Item, _>("forward", {
            let handled = handled.clone();
            move || SlowForwarder {
                handled: handled.clone(),
            }
        })
        .subscribe::<Done, _>("collect", {
            let done = done.clone();
            move || CollectDone(done.clone())
        })
        .build()
        .unwrap();

    // A producer races with shutdown; every publish that returned Ok must be handled.
    let producer = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            for n in 0..10_000u64 {
                match bus.publish(Item { n }).await {
                    Ok(_) => accepted.push(n),
                    Err(PublishError::Closed(item)) => {
                        assert_eq!(item.n, n, "the refused event comes back");
                        break;
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
            accepted
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let report = bus.shutdown().await;
    let accepted = producer.await.unwrap();
    assert!(!accepted.is_empty());
    assert!(
        accepted.len() < 10_000,
        "shutdown should have stopped intake"
    );
    assert_eq!(handled.load(Ordering::SeqCst), accepted.len() as u64);
    let mut done = done.snapshot();
    done.sort_unstable();
    assert_eq!(
        done, accepted,
        "every follow-up event published during the drain was handled"
    );
    assert_eq!(report.handled, 2 * accepted.len() as u64);
    assert_eq!((report.failed, report.dropped, report.abandoned), (0, 0, 0));
    // A second shutdown, from any clone, returns the same report; publishing after it is
    // refused.
    assert_eq!(bus.shutdown().await, report);
    assert_eq!(bus.clone().shutdown().await, report);
    assert!(matches!(
        bus.publish(Item { n: 1 }).await,
        Err(PublishError::Closed(_))
    ));
    assert!(bus.try_publish(Item { n: 1 }).is_err());
}

struct Stuck;
impl Handler<Item> for Stuck {
    async fn handle(&mut self, _: &Envelope<Item>, _: &Context) -> Result<(), HandlerError> {
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_timeout_gives_up_and_counts_what_it_abandoned() {
    let bus = Bus::builder()
        .topic(TopicConfig::new("work").partitions(1))
        .subscribe::<Item, _>("stuck", || Stuck)
        .build()
        .unwrap();
    for n in 0..5 {
        bus.publish(Item { n }).await.unwrap();
    }
    let report = bus.shutdown_timeout(Duration::from_secs(1)).await;
    assert_eq!(report.abandoned, 5);
    assert_eq!(report.handled, 0);
}

struct WatchShutdown(Recorder<bool>);
impl Handler<Item> for WatchShutdown {
    async fn handle(&mut self, _: &Envelope<Item>, ctx: &Context) -> Result<(), HandlerError> {
        // A long job that finishes early when shutdown begins.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3600)) => self.0.push(false),
            _ = ctx.shutting_down() => self.0.push(true),
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn handlers_see_the_shutdown_signal() {
    let seen = Recorder::new();
    let bus = Bus::builder()
        .subscribe::<Item, _>("watch", {
            let seen = seen.clone();
            move || WatchShutdown(seen.clone())
        })
        .build()
        .unwrap();
    bus.publish(Item { n: 1 }).await.unwrap();
    tokio::task::yield_now().await;
    let report = bus.shutdown().await;
    assert_eq!(seen.snapshot(), vec![true]);
    assert_eq!(report.handled, 1);
}

#[tokio::test]
async fn dropping_the_last_handle_lets_workers_finish_and_stop() {
    let handled = Arc::new(AtomicU64::new(0));
    struct Count(Arc<AtomicU64>);
    impl Handler<Item> for Count {
        async fn handle(&mut self, _: &Envelope<Item>, _: &Context) -> Result<(), HandlerError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let bus = Bus::builder()
        .subscribe::<Item, _>("count", {
            let handled = handled.clone();
            move || Count(handled.clone())
        })
        .build()
        .unwrap();
    let weak_probe = bus.clone();
    for n in 0..100 {
        bus.publish(Item { n }).await.unwrap();
    }
    drop(bus);
    drop(weak_probe);
    for _ in 0..100 {
        if handled.load(Ordering::SeqCst) == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        handled.load(Ordering::SeqCst),
        100,
        "queued events are still handled"
    );
}

#[tokio::test]
async fn stats_report_published_handled_depth_and_lag_per_partition() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let bus = Bus::builder()
        .topic(TopicConfig::new("work").partitions(2))
        .subscribe::<Item, _>(Subscription::new("gated").batch_size(1), {
            let gate = gate.clone();
            move || Gated(gate.clone())
        })
        .build()
        .unwrap();
    for n in 0..10 {
        bus.publish(Item { n }).await.unwrap();
    }
    // Published to a topic nobody subscribes to: accepted and counted.
    bus.publish(Done { n: 1 }).await.unwrap();
    tokio::task::yield_now().await;
    let stats = bus.stats();
    let topic = stats.topic("work").unwrap();
    assert_eq!(topic.published, 10);
    assert_eq!(topic.partitions, 2);
    let group = stats.group("gated").unwrap();
    assert_eq!(group.delivered, 10);
    assert_eq!(group.handled, 0);
    assert_eq!(group.lag, 10);
    assert_eq!(group.partitions.len(), 2);
    let per_partition: u64 = group.partitions.iter().map(|p| p.delivered).sum();
    assert_eq!(per_partition, 10);
    assert_eq!(stats.topic("work.done").unwrap().published, 1);
    // Subscribed topics come first, then those published to without a subscriber.
    let names: Vec<&str> = stats.topics.iter().map(|t| t.topic.as_str()).collect();
    assert_eq!(names, vec!["work", "work.done"]);
    assert_eq!(topic.published_per_partition.iter().sum::<u64>(), 10);
    for (p, published) in topic.published_per_partition.iter().enumerate() {
        assert_eq!(*published, group.partitions[p].delivered);
    }
    assert_eq!(stats.pending, 10);

    gate.add_permits(10);
    bus.settled().await;
    let stats = bus.stats();
    let group = stats.group("gated").unwrap();
    assert_eq!((group.handled, group.lag, group.depth), (10, 0, 0));
    for p in &group.partitions {
        assert_eq!(p.committed, Some(p.published - 1));
    }
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_shutdown_future_does_not_stop_the_shutdown() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let bus = Bus::builder()
        .subscribe::<Item, _>("gated", {
            let gate = gate.clone();
            move || Gated(gate.clone())
        })
        .build()
        .unwrap();
    for n in 0..3 {
        bus.publish(Item { n }).await.unwrap();
    }
    // The first caller gives up while the drain waits on the gate.
    assert!(tokio::time::timeout(Duration::from_secs(1), bus.shutdown())
        .await
        .is_err());
    assert!(matches!(
        bus.publish(Item { n: 9 }).await,
        Err(PublishError::Closed(_))
    ));
    gate.add_permits(3);
    let report = bus.shutdown().await;
    assert_eq!((report.handled, report.abandoned), (3, 0));
}

#[tokio::test]
async fn the_record_keeps_events_in_the_order_the_bus_accepted_them() {
    let bus = Bus::builder()
        .record(true)
        .topic(TopicConfig::new("work").partitions(3))
        .build()
        .unwrap();
    let mut receipts = Vec::new();
    for n in 0..30 {
        receipts.push(bus.publish(Item { n }).await.unwrap());
    }
    let published = bus.published();
    assert_eq!(published.len(), 30);
    for (receipt, env) in receipts.iter().zip(&published) {
        assert_eq!(env.id(), receipt.id);
        assert_eq!(
            (env.partition(), env.offset()),
            (receipt.partition, receipt.offset)
        );
    }
    bus.shutdown().await;
}
