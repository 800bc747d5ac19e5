//! With a store, shutdown keeps its word: an event whose `Retry` was cut short by the shutdown
//! stays in the log and is handled after the restart (not a dead letter, not lost), and
//! redeliveries scheduled by a `Redelivery` go on after the restart on the rest of their
//! schedule. Run on every backend; a restart is a new bus on the same store.
//! (Issue 9, item 12. Without a store the old behaviour stays: see `tests/middleware/retry.rs`
//! and `tests/dead_letters/redelivery.rs`.)
use crate::support::stores;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stores::{Backend, Cancelled, Log, Placed};
use tidings::dead_letter::Redelivery;
use tidings::middleware::Retry;
use tidings::prelude::*;

macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::memory()).await;
                }
            )*
        }
        #[cfg(feature = "sqlite")]
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::sqlite()).await;
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let b = super::Backend::postgres(concat!("shutdown_", stringify!($name))).await;
                    super::$name(b).await;
                }
            )*
        }
    };
}

on_every_store!(
    an_event_waiting_for_its_retry_at_shutdown_is_handled_after_the_restart,
    a_redelivery_scheduled_at_shutdown_happens_after_the_restart,
);

/// Records what it handles; fails every call while `failing`; counts the calls.
#[derive(Clone)]
struct Flaky {
    log: Log,
    failing: Arc<AtomicBool>,
    calls: Arc<AtomicU32>,
}

impl Flaky {
    fn new(failing: bool) -> Self {
        Flaky {
            log: Log::default(),
            failing: Arc::new(AtomicBool::new(failing)),
            calls: Arc::default(),
        }
    }
}

impl Handler<Placed> for Flaky {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(HandlerError::msg("gateway down"));
        }
        let p = e.event();
        self.log.0.lock().push(("g".into(), p.order, p.seq));
        Ok(())
    }
}

async fn build(b: &Backend, sub: Subscription, handler: &Flaky) -> Bus {
    let h = handler.clone();
    b.builder()
        .await
        .topic(TopicConfig::new("orders").partitions(1))
        .subscribe::<Placed, _>(sub, move || h.clone())
        .build()
        .unwrap()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The first event fails and waits an hour for its next attempt when the bus shuts down; two
/// more of its key wait behind it, and an event of a type the group does not take. The shutdown ends the wait without dead-lettering it, and
/// the group's offset stays before it: after the restart all three are handled, in order, once,
/// and the dead-letter queue (in memory and in the store) is empty.
async fn an_event_waiting_for_its_retry_at_shutdown_is_handled_after_the_restart(b: Backend) {
    let retry = || {
        Retry::new(5)
            .backoff(Duration::from_secs(3600), Duration::from_secs(3600))
            .jitter(0.0)
    };
    let first = Flaky::new(true);
    let bus = build(&b, Subscription::new("g").layer(retry()), &first).await;
    for seq in 0..3 {
        bus.publish(Placed { order: 1, seq }).await.unwrap();
    }
    wait_until("the first attempt", || {
        first.calls.load(Ordering::SeqCst) == 1
    })
    .await;
    // An event of another type after them, which the group passes by: its offset is not
    // passed either.
    bus.publish(Cancelled { order: 1 }).await.unwrap();
    let report = bus.shutdown().await;
    assert_eq!(report.failed, 0, "not given up on: {report:?}");
    assert_eq!(report.abandoned, 0, "{report:?}");
    assert_eq!(first.calls.load(Ordering::SeqCst), 1, "not attempted again");
    assert!(
        bus.dead_letters("g").unwrap().is_empty(),
        "not dead-lettered"
    );
    let store = b.open().await;
    assert!(store.dead_letters("g").await.unwrap().is_empty());
    assert_eq!(
        store.committed("g", "orders", 0).await.unwrap(),
        Some(0),
        "the group's offset did not pass the event"
    );
    drop(store);

    let second = Flaky::new(false);
    let bus = build(&b, Subscription::new("g").layer(retry()), &second).await;
    bus.settled().await;
    assert_eq!(second.log.of("g"), vec![(1, 0), (1, 1), (1, 2)]);
    assert!(bus.dead_letters("g").unwrap().is_empty());
    let report = bus.shutdown().await;
    assert_eq!((report.handled, report.failed), (3, 0));
    let store = b.open().await;
    assert!(store.dead_letters("g").await.unwrap().is_empty());
    assert_eq!(store.committed("g", "orders", 0).await.unwrap(), Some(4));
}

/// An event fails and is dead-lettered with redeliveries after an hour and after another hour;
/// the bus shuts down while the first one is scheduled. The bus stays down for that hour (the
/// test moves the stored failure time an hour back instead of waiting): after the restart the
/// event is redelivered at once, on the rest of its schedule, and handled; the entry is gone
/// from the queue and from the store.
async fn a_redelivery_scheduled_at_shutdown_happens_after_the_restart(b: Backend) {
    let hour = Duration::from_secs(3600);
    let sub = || {
        Subscription::new("g")
            .max_deliveries(1)
            .redelivery(Redelivery::after([hour, hour]))
    };
    let first = Flaky::new(true);
    let bus = build(&b, sub(), &first).await;
    bus.publish(Placed { order: 1, seq: 0 }).await.unwrap();
    bus.settled().await;
    let dlq = bus.dead_letters("g").unwrap();
    wait_until("the dead letter", || dlq.len() == 1).await;
    bus.shutdown().await;
    assert_eq!(first.calls.load(Ordering::SeqCst), 1);

    // An hour later.
    let store = b.open().await;
    let mut records = store.dead_letters("g").await.unwrap();
    assert_eq!(records.len(), 1);
    let mut record = records.remove(0);
    assert_eq!(record.redeliveries, 0);
    record.first_failure -= hour;
    record.last_failure -= hour;
    store.save_dead_letter(&record).await.unwrap();
    drop(store);

    let second = Flaky::new(false);
    let bus = build(&b, sub(), &second).await;
    wait_until("the redelivery after the restart", || {
        second.log.len("g") == 1
    })
    .await;
    bus.settled().await;
    assert_eq!(second.log.of("g"), vec![(1, 0)]);
    let dlq = bus.dead_letters("g").unwrap();
    wait_until("the entry to leave the queue", || dlq.is_empty()).await;
    bus.shutdown().await;
    let store = b.open().await;
    assert!(
        store.dead_letters("g").await.unwrap().is_empty(),
        "the handled dead letter's row is deleted"
    );
}
