//! Delivery modes: at-most-once acknowledges on receipt and never redelivers; at-least-once
//! redelivers and dead-letters; effectively-once deduplicates.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "metrics", key = n)]
struct Sample {
    n: u32,
}

#[derive(Clone, Default)]
struct AlwaysFails(Arc<AtomicU32>);

impl Handler<Sample> for AlwaysFails {
    async fn handle(&mut self, _: &Envelope<Sample>, _: &Context) -> HandlerResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        Err(HandlerError::msg("collector down"))
    }
}

fn bus(mode: DeliveryMode, handler: &AlwaysFails) -> Bus {
    let handler = handler.clone();
    Bus::builder()
        .topic(TopicConfig::new("metrics").partitions(1))
        .subscribe::<Sample, _>(Subscription::new("collector").delivery(mode), move || {
            handler.clone()
        })
        .build()
        .unwrap()
}

#[tokio::test]
async fn at_most_once_delivers_once_and_drops_a_failure_without_dead_lettering() {
    let handler = AlwaysFails::default();
    let bus = bus(DeliveryMode::AtMostOnce, &handler);
    bus.publish(Sample { n: 1 }).await.unwrap();
    bus.publish(Sample { n: 2 }).await.unwrap();
    bus.settled().await;
    assert_eq!(handler.0.load(Ordering::SeqCst), 2, "one delivery each");
    assert!(bus.dead_letters("collector").unwrap().is_empty());
    let stats = bus.stats();
    let group = stats.group("collector").unwrap();
    assert_eq!((group.failed, group.lag), (2, 0));
    assert_eq!(group.partitions[0].committed, Some(1));
    bus.shutdown().await;
}

#[tokio::test]
async fn at_least_once_is_the_default_and_redelivers_then_dead_letters() {
    let handler = AlwaysFails::default();
    let bus = bus(DeliveryMode::default(), &handler);
    assert_eq!(DeliveryMode::default(), DeliveryMode::AtLeastOnce);
    bus.publish(Sample { n: 1 }).await.unwrap();
    bus.settled().await;
    assert_eq!(
        handler.0.load(Ordering::SeqCst),
        3,
        "max_deliveries default 3"
    );
    let letters = bus.dead_letters("collector").unwrap().list();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, 3);
    bus.shutdown().await;
}

#[tokio::test]
async fn effectively_once_skips_a_redelivered_copy_of_a_handled_event() {
    #[derive(Clone, Default)]
    struct Counts(Arc<AtomicU32>);
    impl Handler<Sample> for Counts {
        async fn handle(&mut self, _: &Envelope<Sample>, _: &Context) -> HandlerResult {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let counts = Counts::default();
    let bus = {
        let counts = counts.clone();
        Bus::builder()
            .subscribe::<Sample, _>(
                Subscription::new("collector").delivery(DeliveryMode::EffectivelyOnce),
                move || counts.clone(),
            )
            .build()
            .unwrap()
    };
    let id = Uuid::now_v7();
    bus.publish_with(Sample { n: 1 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    bus.publish_with(Sample { n: 1 }, PublishOptions::new().id(id))
        .await
        .unwrap();
    bus.settled().await;
    assert_eq!(counts.0.load(Ordering::SeqCst), 1);
    bus.shutdown().await;
}

#[tokio::test]
async fn at_most_once_refuses_retries_and_sequenced_dead_letters_at_build() {
    let build = |sub: Subscription| {
        Bus::builder()
            .subscribe::<Sample, _>(sub, AlwaysFails::default)
            .build()
            .map(|_| ())
    };
    let at_most_once = || Subscription::new("c").delivery(DeliveryMode::AtMostOnce);
    assert!(build(at_most_once().max_deliveries(2)).is_err());
    assert!(build(at_most_once().layer(Retry::new(2))).is_err());
    assert!(build(at_most_once().dead_letter(DeadLetterPolicy::Sequenced)).is_err());
    build(at_most_once()).unwrap();
}
