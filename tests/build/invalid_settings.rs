//! Settings out of range are build errors that name the subscription (or topic) and the
//! setting, never adjusted or accepted silently.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::dead_letter::Redelivery;
use tidings::middleware::{CircuitBreaker, Throttle};
use tidings::prelude::*;
use tidings::store::{MemoryStore, Retention};
use tidings::BuildError;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "jobs", key = id)]
struct Job {
    id: u64,
}

struct Nop;
impl Handler<Job> for Nop {
    async fn handle(&mut self, _: &Envelope<Job>, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// The build error of a bus with one subscription `sub` to `Job`, as text; `None` if it built.
async fn error_of(sub: Subscription) -> Option<String> {
    match Bus::builder().subscribe::<Job, _>(sub, || Nop).build() {
        Ok(bus) => {
            bus.shutdown().await;
            None
        }
        Err(e @ BuildError::InvalidSetting(_)) => Some(e.to_string()),
        Err(other) => panic!("expected InvalidSetting, got {other:?}"),
    }
}

/// Asserts that `sub` (group "workers") is refused with an error naming the group and `what`.
async fn refused(sub: Subscription, what: &str) {
    let message = error_of(sub)
        .await
        .unwrap_or_else(|| panic!("{what}: the bus was built"));
    assert!(
        message.contains("\"workers\""),
        "names the group: {message}"
    );
    assert!(message.contains(what), "names {what}: {message}");
}

fn workers() -> Subscription {
    Subscription::new("workers")
}

#[tokio::test]
async fn a_throttle_that_lets_nothing_through_is_a_build_error() {
    refused(workers().layer(Throttle::per_second(0)), "Throttle").await;
    refused(
        workers().layer(Throttle::new(0, Duration::from_secs(1))),
        "calls",
    )
    .await;
    refused(workers().layer(Throttle::new(5, Duration::ZERO)), "period").await;
    assert_eq!(
        error_of(workers().layer(Throttle::per_second(1))).await,
        None
    );
}

#[tokio::test]
async fn a_circuit_breaker_that_never_counts_or_never_stays_open_is_a_build_error() {
    refused(
        workers().layer(CircuitBreaker::new(0, Duration::from_secs(1))),
        "failures",
    )
    .await;
    refused(
        workers().layer(CircuitBreaker::new(3, Duration::ZERO)),
        "open_for",
    )
    .await;
    assert_eq!(
        error_of(workers().layer(CircuitBreaker::new(1, Duration::from_millis(1)))).await,
        None
    );
}

#[tokio::test]
async fn a_zero_timeout_is_a_build_error() {
    refused(workers().layer(Timeout::new(Duration::ZERO)), "Timeout").await;
    assert_eq!(
        error_of(workers().layer(Timeout::new(Duration::from_nanos(1)))).await,
        None
    );
}

#[tokio::test]
async fn a_layer_deep_in_the_chain_is_checked_too() {
    refused(
        workers()
            .layer(Timeout::new(Duration::ZERO))
            .layer(Retry::new(3))
            .layer(Throttle::per_second(10)),
        "Timeout",
    )
    .await;
}

#[tokio::test]
async fn retry_settings_out_of_range_are_build_errors() {
    refused(workers().layer(Retry::new(0)), "max_attempts").await;
    for m in [0.5, f64::NAN, f64::INFINITY] {
        refused(workers().layer(Retry::new(3).multiplier(m)), "multiplier").await;
    }
    for j in [-0.1, 1.5, f64::NAN] {
        refused(workers().layer(Retry::new(3).jitter(j)), "jitter").await;
    }
    assert_eq!(
        error_of(workers().layer(Retry::new(3).multiplier(1.0).jitter(1.0))).await,
        None
    );
}

#[tokio::test]
async fn a_redelivery_without_delays_is_a_build_error() {
    refused(
        workers().redelivery(Redelivery::after(Vec::new())),
        "Redelivery",
    )
    .await;
    assert_eq!(
        error_of(workers().redelivery(Redelivery::after([Duration::ZERO]))).await,
        None
    );
}

#[tokio::test]
async fn a_restart_backoff_starting_above_its_maximum_is_a_build_error() {
    refused(
        workers().restart_backoff(RestartBackoff::new(
            Duration::from_secs(2),
            Duration::from_secs(1),
        )),
        "RestartBackoff",
    )
    .await;
    assert_eq!(
        error_of(workers().restart_backoff(RestartBackoff::new(Duration::ZERO, Duration::ZERO)))
            .await,
        None
    );
}

#[tokio::test]
async fn a_zero_request_timeout_is_a_build_error() {
    let result = Bus::builder().request_timeout(Duration::ZERO).build();
    match result {
        Err(BuildError::InvalidSetting(m)) => assert!(m.contains("request_timeout"), "{m}"),
        other => panic!("expected InvalidSetting, got {other:?}"),
    }
}

#[tokio::test]
async fn a_retention_that_keeps_nothing_is_a_build_error() {
    for retention in [Retention::MaxAge(Duration::ZERO), Retention::MaxEvents(0)] {
        let result = Bus::builder()
            .store(MemoryStore::new())
            .topic(TopicConfig::new("jobs").partitions(1).retention(retention))
            .build();
        match result {
            Err(BuildError::InvalidSetting(m)) => {
                assert!(m.contains("\"jobs\"") && m.contains("Retention"), "{m}")
            }
            other => panic!("{retention:?}: expected InvalidSetting, got {other:?}"),
        }
    }
    let bus = Bus::builder()
        .store(MemoryStore::new())
        .topic(
            TopicConfig::new("jobs")
                .partitions(1)
                .retention(Retention::MaxEvents(1)),
        )
        .build()
        .unwrap();
    bus.shutdown().await;
}

#[tokio::test]
async fn topics_with_zero_partitions_or_capacity_are_build_errors() {
    let zero_partitions = Bus::builder()
        .topic(TopicConfig::new("jobs").partitions(0))
        .build();
    assert!(matches!(
        zero_partitions,
        Err(BuildError::ZeroPartitions { topic }) if topic == "jobs"
    ));
    let zero_capacity = Bus::builder()
        .topic(TopicConfig::new("jobs").capacity(0))
        .build();
    assert!(matches!(
        zero_capacity,
        Err(BuildError::ZeroCapacity { topic }) if topic == "jobs"
    ));
}

/// A middleware of your own reports its settings through `Middleware::check`.
#[derive(Clone)]
struct Sample {
    rate: f64,
}

impl Middleware for Sample {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        next.run(env).await
    }

    fn check(&self) -> Result<(), String> {
        if (0.0..=1.0).contains(&self.rate) {
            Ok(())
        } else {
            Err(format!(
                "Sample: rate must be within 0..=1, got {}",
                self.rate
            ))
        }
    }
}

#[tokio::test]
async fn a_custom_middleware_checks_its_settings_at_build() {
    refused(workers().layer(Sample { rate: 2.0 }), "Sample: rate").await;
    assert_eq!(error_of(workers().layer(Sample { rate: 0.5 })).await, None);
}
