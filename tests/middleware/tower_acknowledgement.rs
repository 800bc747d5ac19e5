//! A tower service that calls its inner service but does not drive the returned future (drops
//! it, or detaches it and answers at once) must not acknowledge an event the handler never
//! handled: the answer counts as a failed attempt, and the event ends in the dead-letter queue.
#![cfg(feature = "tower")]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use serde::{Deserialize, Serialize};
use tidings::middleware::{TowerLayer, TowerRequest};
use tidings::prelude::*;
use tower::{Layer, Service};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "mails", key = n, name = "tower_acknowledgement.Mail")]
struct Mail {
    n: u32,
}

#[derive(Clone)]
struct Mailer(Arc<AtomicU32>);
impl Handler<Mail> for Mailer {
    async fn handle(&mut self, _: &Envelope<Mail>, _: &Context) -> HandlerResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Calls its inner service, then drops the response future and answers Ok
/// (as a "fire and forget" / detach-the-work service would).
#[derive(Clone)]
struct CallAndDrop<S>(S);
impl<S> Service<TowerRequest> for CallAndDrop<S>
where
    S: Service<TowerRequest, Response = ()>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = ();
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<(), Self::Error>> + Send>>;
    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }
    fn call(&mut self, req: TowerRequest) -> Self::Future {
        drop(self.0.call(req)); // called, response dropped
        Box::pin(async { Ok(()) })
    }
}
#[derive(Clone)]
struct CallAndDropLayer;
impl<S> Layer<S> for CallAndDropLayer {
    type Service = CallAndDrop<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallAndDrop(inner)
    }
}

#[tokio::test]
async fn a_tower_service_that_calls_its_inner_service_runs_the_handler() {
    let calls = Arc::new(AtomicU32::new(0));
    let bus = {
        let m = Mailer(calls.clone());
        Bus::builder()
            .topic(TopicConfig::new("mails").partitions(1))
            .subscribe::<Mail, _>(
                Subscription::new("mailer").layer(TowerLayer::new(CallAndDropLayer)),
                move || m.clone(),
            )
            .build()
            .unwrap()
    };
    bus.publish(Mail { n: 1 }).await.unwrap();
    bus.settled().await;
    let g = bus.stats().group("mailer").unwrap().clone();
    let dlq = bus.dead_letters("mailer").unwrap().len();
    bus.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!((g.handled, g.failed, dlq), (0, 1, 1));
}
