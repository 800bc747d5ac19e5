//! Tower layers as middleware (feature `tower`): tower's timeout cancels a slow handler, its
//! rate limit spaces calls out on tokio's clock, a handler's own error comes back unchanged.
#![cfg(feature = "tower")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::middleware::TowerLayer;
use tidings::prelude::*;
use tidings::testing::Recorder;
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "mails", key = n)]
struct Mail {
    n: u32,
}

/// Sleeps `sleep` for mail 0; fails permanently for mail 99; records what it finished.
#[derive(Clone)]
struct Mailer {
    sleep: Duration,
    sent: Recorder<(u32, Instant)>,
    calls: Arc<AtomicU32>,
}

impl Handler<Mail> for Mailer {
    async fn handle(&mut self, e: &Envelope<Mail>, _: &Context) -> HandlerResult {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if e.event().n == 0 {
            tokio::time::sleep(self.sleep).await;
        }
        if e.event().n == 99 {
            return Err(HandlerError::permanent("bad address"));
        }
        self.sent.push((e.event().n, Instant::now()));
        Ok(())
    }
}

fn mailer(sleep: Duration) -> Mailer {
    Mailer {
        sleep,
        sent: Recorder::new(),
        calls: Arc::default(),
    }
}

fn bus(sub: Subscription, m: &Mailer) -> Bus {
    let m = m.clone();
    Bus::builder()
        .topic(TopicConfig::new("mails").partitions(1))
        .subscribe::<Mail, _>(sub, move || m.clone())
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_tower_timeout_cancels_a_slow_handler_and_the_event_is_retried_then_dead_lettered() {
    let m = mailer(Duration::from_secs(10));
    let bus = bus(
        Subscription::new("mailer")
            .layer(TowerLayer::new(tower::timeout::TimeoutLayer::new(
                Duration::from_secs(1),
            )))
            .layer(
                Retry::new(2)
                    .backoff(Duration::from_secs(1), Duration::from_secs(1))
                    .jitter(0.0),
            ),
        &m,
    );
    let start = Instant::now();
    bus.publish(Mail { n: 0 }).await.unwrap();
    bus.publish(Mail { n: 1 }).await.unwrap();
    bus.settled().await;
    assert_eq!(
        m.calls.load(Ordering::SeqCst),
        3,
        "two attempts of mail 0, then mail 1"
    );
    assert_eq!(m.sent.take(), vec![(1, start + Duration::from_secs(3))]);
    let letter = &bus.dead_letters("mailer").unwrap().list()[0];
    assert_eq!(letter.attempts, 2);
    assert_eq!(letter.error, "request timed out");
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_tower_rate_limit_spaces_calls_on_tokios_clock() {
    let m = mailer(Duration::ZERO);
    let bus = bus(
        Subscription::new("mailer").layer(TowerLayer::new(tower::limit::RateLimitLayer::new(
            2,
            Duration::from_secs(1),
        ))),
        &m,
    );
    let start = Instant::now();
    for n in 1..=5 {
        bus.publish(Mail { n }).await.unwrap();
    }
    bus.settled().await;
    let at: Vec<u64> = m
        .sent
        .take()
        .iter()
        .map(|(_, t)| (*t - start).as_secs())
        .collect();
    assert_eq!(at, vec![0, 0, 1, 1, 2]);
    bus.shutdown().await;
}

#[tokio::test]
async fn a_handlers_own_error_comes_back_through_the_tower_service_unchanged() {
    let m = mailer(Duration::ZERO);
    let bus = bus(
        Subscription::new("mailer").layer(TowerLayer::new(tower::timeout::TimeoutLayer::new(
            Duration::from_secs(5),
        ))),
        &m,
    );
    bus.publish(Mail { n: 99 }).await.unwrap();
    bus.settled().await;
    assert_eq!(
        m.calls.load(Ordering::SeqCst),
        1,
        "permanent: not redelivered"
    );
    let letter = &bus.dead_letters("mailer").unwrap().list()[0];
    assert_eq!(
        (letter.error.as_str(), letter.kind),
        ("bad address", ErrorKind::Permanent)
    );
    bus.shutdown().await;
}

/// A layer whose first service fails its readiness check once and must then be discarded
/// (calling it again panics, as a service may after a readiness error).
#[derive(Clone, Default)]
struct FlakyReadiness {
    built: Arc<AtomicU32>,
}

struct FlakyService<S> {
    inner: S,
    first: bool,
    failed: bool,
}

impl<S> tower::Layer<S> for FlakyReadiness {
    type Service = FlakyService<S>;
    fn layer(&self, inner: S) -> FlakyService<S> {
        let first = self.built.fetch_add(1, Ordering::SeqCst) == 0;
        FlakyService {
            inner,
            first,
            failed: false,
        }
    }
}

impl<S> tower::Service<tidings::middleware::TowerRequest> for FlakyService<S>
where
    S: tower::Service<tidings::middleware::TowerRequest, Response = ()>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        assert!(
            !self.failed,
            "a service whose readiness failed was used again"
        );
        if self.first {
            self.failed = true;
            return std::task::Poll::Ready(Err("backend unavailable".into()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: tidings::middleware::TowerRequest) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move { future.await.map_err(Into::into) })
    }
}

#[tokio::test]
async fn a_service_whose_readiness_failed_is_discarded_and_rebuilt() {
    let m = mailer(Duration::ZERO);
    let layer = FlakyReadiness::default();
    let bus = bus(
        Subscription::new("mailer").layer(TowerLayer::new(layer.clone())),
        &m,
    );
    bus.publish(Mail { n: 1 }).await.unwrap();
    bus.settled().await;
    let sent: Vec<u32> = m.sent.take().iter().map(|(n, _)| *n).collect();
    assert_eq!(
        sent,
        vec![1],
        "handled on its second delivery, by a fresh service"
    );
    assert_eq!(layer.built.load(Ordering::SeqCst), 2);
    assert!(bus.dead_letters("mailer").unwrap().is_empty());
    bus.shutdown().await;
}
