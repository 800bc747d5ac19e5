//! Handlers that publish into their own queue never deadlock; a shutdown whose future was
//! dropped, followed by dropping the last handle, still drains follow-ups; a request that slips
//! in beside the stop message is answered and uncounted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = id)]
struct Placed {
    id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = id)]
struct Confirmed {
    id: u64,
}

/// A process manager on the whole topic that answers each `Placed` with two `Confirmed` on the
/// same topic and key: into the queue its own worker drains.
struct Twice(Arc<AtomicU64>);
impl AnyHandler for Twice {
    async fn handle(&mut self, e: &AnyEnvelope, ctx: &Context) -> Result<(), HandlerError> {
        if let Some(p) = e.downcast_ref::<Placed>() {
            ctx.publish(Confirmed { id: p.id }).await?;
            ctx.publish(Confirmed { id: p.id }).await?;
        } else {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_handler_publishing_into_its_own_full_queue_does_not_deadlock() {
    let confirmed = Arc::new(AtomicU64::new(0));
    let bus = Bus::builder()
        .topic(TopicConfig::new("orders").partitions(1).capacity(1))
        .subscribe_all("orders", "process", {
            let c = confirmed.clone();
            move || Twice(c.clone())
        })
        .build()
        .unwrap();
    bus.publish(Placed { id: 1 }).await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(3600), bus.shutdown())
        .await
        .expect("the handler must not wait for room only its own worker can make");
    assert_eq!(report.handled, 3);
    assert_eq!(confirmed.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_publishing_under_an_outside_producer_completes() {
    let confirmed = Arc::new(AtomicU64::new(0));
    let bus = Bus::builder()
        .topic(TopicConfig::new("orders").partitions(1).capacity(16))
        .subscribe_all("orders", "process", {
            let c = confirmed.clone();
            move || Twice(c.clone())
        })
        .build()
        .unwrap();
    let producer = tokio::spawn({
        let bus = bus.clone();
        async move {
            for id in 0..1000 {
                bus.publish(Placed { id }).await.unwrap();
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), producer)
        .await
        .expect("the outside producer must not hang")
        .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), bus.shutdown())
        .await
        .expect("shutdown must not hang");
    assert_eq!(report.handled, 3000);
    assert_eq!(confirmed.load(Ordering::SeqCst), 2000);
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "a", key = id)]
struct A {
    id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "b", key = id)]
struct B {
    id: u64,
}

type Stash = Arc<Mutex<Option<Bus>>>;

struct AtoB(#[allow(dead_code)] Stash);
impl Handler<A> for AtoB {
    async fn handle(&mut self, e: &Envelope<A>, ctx: &Context) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        ctx.publish(B { id: e.event().id }).await?;
        Ok(())
    }
}

struct CountB(Arc<AtomicU64>);
impl Handler<B> for CountB {
    async fn handle(&mut self, _: &Envelope<B>, _: &Context) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn giving_up_on_shutdown_then_dropping_the_bus_still_drains_follow_ups() {
    let stash: Stash = Arc::default();
    let handled_b = Arc::new(AtomicU64::new(0));
    let bus = Bus::builder()
        .subscribe::<A, _>("a-to-b", {
            let s = stash.clone();
            move || AtoB(s.clone())
        })
        .subscribe::<B, _>("count-b", {
            let c = handled_b.clone();
            move || CountB(c.clone())
        })
        .build()
        .unwrap();
    // A handle that does not keep the bus open (the test drops the bus).
    *stash.lock().unwrap() = Some(bus.observer());
    bus.publish(A { id: 1 }).await.unwrap();
    tokio::task::yield_now().await;
    // "Give it a moment, then exit": the shutdown goes on in its own task.
    let _ = tokio::time::timeout(Duration::from_millis(1), bus.shutdown()).await;
    drop(bus);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let probe = stash.lock().unwrap().take().unwrap();
    let report = tokio::time::timeout(Duration::from_secs(5), probe.shutdown())
        .await
        .unwrap();
    assert_eq!(
        handled_b.load(Ordering::SeqCst),
        1,
        "the follow-up was handled"
    );
    assert_eq!((report.handled, report.failed), (2, 0));
}

struct Cmd(bool);
impl Command for Cmd {
    type Reply = ();
}
struct CmdHandler;
impl CommandHandler<Cmd> for CmdHandler {
    async fn handle(&mut self, slow: Cmd, _: &Context) -> Result<(), HandlerError> {
        if slow.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

struct SlowRequester;
impl Handler<A> for SlowRequester {
    async fn handle(&mut self, _: &Envelope<A>, ctx: &Context) -> Result<(), HandlerError> {
        let _ = ctx.request(Cmd(true)).await;
        Ok(())
    }
}

struct LateRequester(#[allow(dead_code)] Stash);
impl Handler<A> for LateRequester {
    async fn handle(&mut self, _: &Envelope<A>, ctx: &Context) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = ctx.request(Cmd(false)).await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_beside_the_stop_message_is_answered_and_uncounted() {
    let stash: Stash = Arc::default();
    let bus = Bus::builder()
        .topic(TopicConfig::new("a").partitions(1))
        .subscribe::<A, _>("slow", || SlowRequester)
        .subscribe::<A, _>("late", {
            let s = stash.clone();
            move || LateRequester(s.clone())
        })
        .command_handler::<Cmd, _>(|| CmdHandler)
        .build()
        .unwrap();
    // A handle that does not keep the bus open (the test drops the bus).
    *stash.lock().unwrap() = Some(bus.observer());
    bus.publish(A { id: 1 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let _ = tokio::time::timeout(Duration::from_millis(1), bus.shutdown()).await;
    drop(bus);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let probe = stash.lock().unwrap().take().unwrap();
    tokio::time::timeout(Duration::from_secs(60), probe.shutdown())
        .await
        .expect("no pending count may leak");
    assert_eq!(probe.stats().pending, 0);
}
