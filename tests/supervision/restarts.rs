//! Supervision: errors and panics never take the bus down; panicked handlers restart fresh from
//! their factory after a backoff; redelivery is bounded, then the event is reported as failed.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::testing::Recorder;
use tidings::RestartBackoff;
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "jobs", key = id, name = "restarts.Job")]
struct Job {
    id: u64,
    /// How the handler should behave: "ok", "panic-once", "panic-always", "err-twice",
    /// "err-always", "permanent".
    mode: String,
}

fn job(id: u64, mode: &str) -> Job {
    Job {
        id,
        mode: mode.into(),
    }
}

/// A handler with state: counts events it handled since it was created.
struct Worker {
    instance: u32,
    handled_by_me: u32,
    log: Recorder<(u64, u32, u32, u32)>, // (id, attempt, instance, handled_by_me)
    attempts_at: Recorder<(u64, u32, Instant)>,
}

impl Handler<Job> for Worker {
    async fn handle(&mut self, e: &Envelope<Job>, _: &Context) -> Result<(), HandlerError> {
        let ev = e.event();
        self.attempts_at.push((ev.id, e.attempt(), Instant::now()));
        match ev.mode.as_str() {
            "panic-once" if e.attempt() == 1 => panic!("boom on job {}", ev.id),
            "panic-always" => panic!("always boom"),
            "err-twice" if e.attempt() <= 2 => return Err(HandlerError::msg("downstream busy")),
            "err-always" => return Err(HandlerError::msg("still busy")),
            "permanent" => return Err(HandlerError::msg("invalid job").into_permanent()),
            _ => {}
        }
        self.handled_by_me += 1;
        self.log
            .push((ev.id, e.attempt(), self.instance, self.handled_by_me));
        Ok(())
    }
}

struct Setup {
    bus: Bus,
    log: Recorder<(u64, u32, u32, u32)>,
    attempts_at: Recorder<(u64, u32, Instant)>,
    instances: Arc<AtomicU32>,
}

fn setup(max_deliveries: u32) -> Setup {
    let log = Recorder::new();
    let attempts_at = Recorder::new();
    let instances = Arc::new(AtomicU32::new(0));
    let bus = Bus::builder()
        .record(true)
        .topic(TopicConfig::new("jobs").partitions(1))
        .subscribe::<Job, _>(
            Subscription::new("workers")
                .max_deliveries(max_deliveries)
                .restart_backoff(RestartBackoff::new(
                    Duration::from_millis(100),
                    Duration::from_millis(250),
                )),
            {
                let (log, attempts_at, instances) =
                    (log.clone(), attempts_at.clone(), instances.clone());
                move || Worker {
                    instance: instances.fetch_add(1, Ordering::SeqCst),
                    handled_by_me: 0,
                    log: log.clone(),
                    attempts_at: attempts_at.clone(),
                }
            },
        )
        .build()
        .unwrap();
    Setup {
        bus,
        log,
        attempts_at,
        instances,
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_caught_the_handler_restarts_fresh_and_the_event_is_redelivered() {
    let s = setup(3);
    s.bus.publish(job(1, "ok")).await.unwrap();
    s.bus.publish(job(2, "panic-once")).await.unwrap();
    s.bus.publish(job(3, "ok")).await.unwrap();
    s.bus.settled().await;

    // Job 2 panicked on attempt 1, was redelivered as attempt 2 to a fresh instance (whose
    // count starts again at 1), and job 3 came after it.
    assert_eq!(
        s.log.snapshot(),
        vec![(1, 1, 0, 1), (2, 2, 1, 1), (3, 1, 1, 2)]
    );
    assert_eq!(s.instances.load(Ordering::SeqCst), 2);
    // The restart waited for the backoff (paused clock: exact).
    let at = s.attempts_at.snapshot();
    let first = at.iter().find(|a| a.0 == 2 && a.1 == 1).unwrap().2;
    let second = at.iter().find(|a| a.0 == 2 && a.1 == 2).unwrap().2;
    assert_eq!(second - first, Duration::from_millis(100));

    let stats = s.bus.stats();
    let group = stats.group("workers").unwrap();
    assert_eq!(
        (group.handled, group.failed, group.panics, group.restarts),
        (3, 0, 1, 1)
    );
    assert!(s.bus.failures().is_empty());
    let report = s.bus.shutdown().await;
    assert_eq!((report.handled, report.failed, report.panics), (3, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn a_handler_that_always_panics_is_reported_failed_after_max_deliveries_and_the_bus_goes_on()
{
    let s = setup(3);
    s.bus.publish(job(1, "panic-always")).await.unwrap();
    s.bus.publish(job(2, "ok")).await.unwrap();
    s.bus.settled().await;

    let at = s.attempts_at.snapshot();
    let attempts: Vec<u32> = at.iter().filter(|a| a.0 == 1).map(|a| a.1).collect();
    assert_eq!(
        attempts,
        vec![1, 2, 3],
        "delivered exactly max_deliveries times"
    );
    // Backoff doubles between consecutive panics, capped: 100 ms, then 200 ms.
    let times: Vec<Instant> = at.iter().filter(|a| a.0 == 1).map(|a| a.2).collect();
    assert_eq!(times[1] - times[0], Duration::from_millis(100));
    assert_eq!(times[2] - times[1], Duration::from_millis(200));

    let failures = s.bus.failures();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].group, "workers");
    assert_eq!(failures[0].attempts, 3);
    assert!(
        failures[0].error.contains("always boom"),
        "{}",
        failures[0].error
    );
    assert_eq!(failures[0].envelope.downcast_ref::<Job>().unwrap().id, 1);
    // The next event was handled.
    assert_eq!(
        s.log.snapshot().iter().map(|l| l.0).collect::<Vec<_>>(),
        vec![2]
    );
    let report = s.bus.shutdown().await;
    assert_eq!((report.handled, report.failed, report.panics), (1, 1, 3));
}

#[tokio::test(start_paused = true)]
async fn errors_are_redelivered_to_the_same_instance_without_restart() {
    let s = setup(3);
    s.bus.publish(job(1, "err-twice")).await.unwrap();
    s.bus.publish(job(2, "err-always")).await.unwrap();
    s.bus.publish(job(3, "ok")).await.unwrap();
    s.bus.settled().await;
    // Job 1 succeeded on attempt 3 on instance 0; job 2 failed; job 3 still handled, in order.
    assert_eq!(s.log.snapshot(), vec![(1, 3, 0, 1), (3, 1, 0, 2)]);
    assert_eq!(
        s.instances.load(Ordering::SeqCst),
        1,
        "errors do not restart the handler"
    );
    let failures = s.bus.failures();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].attempts, 3);
    assert_eq!(failures[0].error, "still busy");
    s.bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_is_not_redelivered() {
    let s = setup(5);
    s.bus.publish(job(1, "permanent")).await.unwrap();
    s.bus.settled().await;
    assert_eq!(s.attempts_at.len(), 1);
    assert_eq!(s.bus.failures()[0].attempts, 1);
    assert_eq!(s.bus.stats().group("workers").unwrap().failed, 1);
    s.bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_factory_on_restart_keeps_the_bus_alive() {
    let calls = Arc::new(AtomicU32::new(0));
    struct Flaky;
    impl Handler<Job> for Flaky {
        async fn handle(&mut self, e: &Envelope<Job>, _: &Context) -> Result<(), HandlerError> {
            if e.event().mode == "panic-once" && e.attempt() == 1 {
                panic!("boom");
            }
            Ok(())
        }
    }
    let bus = Bus::builder()
        .topic(TopicConfig::new("jobs").partitions(1))
        .subscribe::<Job, _>("flaky", {
            let calls = calls.clone();
            move || {
                if calls.fetch_add(1, Ordering::SeqCst) > 0 {
                    panic!("factory cannot build a second instance");
                }
                Flaky
            }
        })
        .build()
        .unwrap();
    bus.publish(job(1, "panic-once")).await.unwrap();
    bus.publish(job(2, "ok")).await.unwrap();
    let report = bus.shutdown().await;
    assert_eq!((report.handled, report.failed, report.panics), (2, 0, 1));
}
