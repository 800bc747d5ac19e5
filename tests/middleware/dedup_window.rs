//! The dedup window remembers a mark for `max_age` from when it was marked (not claimed), and
//! never drops a generation of young ids when partitions finish out of order.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::testing::Recorder;
use tidings::Uuid;
use tokio::sync::Notify;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "ledger", key = account, name = "dedup_window.Credited")]
struct Credited {
    account: u64,
    cents: u64,
}

#[derive(Clone, Default)]
struct Book {
    handled: Recorder<Uuid>,
    started: Recorder<Uuid>,
    /// cents == 999: waits for this before succeeding.
    gate: Arc<Notify>,
    /// cents == 1: sleeps this long before succeeding.
    slow: Duration,
}

impl Handler<Credited> for Book {
    async fn handle(&mut self, e: &Envelope<Credited>, _: &Context) -> HandlerResult {
        self.started.push(e.id());
        match e.event().cents {
            999 => self.gate.notified().await,
            1 => tokio::time::sleep(self.slow).await,
            _ => {}
        }
        self.handled.push(e.id());
        Ok(())
    }
}

fn with_id(id: Uuid) -> PublishOptions {
    PublishOptions::new().id(id)
}

async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..100_000 {
        if f() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("timed out waiting for {what}");
}

/// A handler that takes longer than `max_age` (or a Retry inside Dedup whose backoff does):
/// its id is forgotten the moment it is marked, so a duplicate arriving right after the
/// success is handled again — 0 s after it was marked processed.
#[tokio::test(start_paused = true)]
async fn an_id_marked_after_a_slow_call_is_remembered_for_max_age_from_its_mark() {
    let book = Book {
        slow: Duration::from_secs(61),
        ..Book::default()
    };
    let bus = {
        let book = book.clone();
        Bus::builder()
            .topic(TopicConfig::new("ledger").partitions(1))
            .subscribe::<Credited, _>(
                Subscription::new("book").layer(Dedup::new(
                    DedupWindow::new().max_age(Duration::from_secs(60)),
                )),
                move || book.clone(),
            )
            .build()
            .unwrap()
    };
    let id = Uuid::now_v7();
    bus.publish_with(
        Credited {
            account: 1,
            cents: 1,
        },
        with_id(id),
    )
    .await
    .unwrap();
    bus.settled().await; // handled at t = 61 s, marked processed then
    assert_eq!(book.handled.len(), 1);
    // A duplicate right after the mark (age 0 s < 60 s): must be skipped.
    bus.publish_with(
        Credited {
            account: 1,
            cents: 0,
        },
        with_id(id),
    )
    .await
    .unwrap();
    bus.settled().await;
    assert_eq!(
        book.handled.len(),
        1,
        "a duplicate 0 s after the id was marked processed was handled again"
    );
    bus.shutdown().await;
}

/// Two partitions of one group share the window. A slow event's mark carries its (old) claim
/// time; flushed as the first mark of a fresh generation, it makes that generation "old" at
/// once, so the next flush drops the previous generation whole — including an id 30 s old with
/// only 32 newer marks, although the window promises max_age = 60 s and max_entries = 64.
#[tokio::test(start_paused = true)]
async fn a_young_id_with_few_newer_marks_is_not_forgotten_when_partitions_finish_out_of_order() {
    // Keys on two different partitions.
    let probe = Bus::builder()
        .topic(TopicConfig::new("ledger").partitions(2))
        .build()
        .unwrap();
    let mut on = [None, None];
    for account in 0..100u64 {
        let p = probe
            .publish(Credited { account, cents: 0 })
            .await
            .unwrap()
            .partition as usize;
        on[p].get_or_insert(account);
    }
    probe.shutdown().await;
    let (slow_key, fast_key) = (on[0].unwrap(), on[1].unwrap());

    let book = Book::default();
    let bus = {
        let book = book.clone();
        Bus::builder()
            .topic(TopicConfig::new("ledger").partitions(2))
            .subscribe::<Credited, _>(
                Subscription::new("book").layer(Dedup::new(
                    DedupWindow::new()
                        .max_age(Duration::from_secs(60))
                        .max_entries(64),
                )),
                move || book.clone(),
            )
            .build()
            .unwrap()
    };
    let send = |account: u64, cents: u64, id: Uuid| {
        let bus = bus.clone();
        async move {
            bus.publish_with(Credited { account, cents }, with_id(id))
                .await
                .unwrap();
        }
    };
    // t = 0: a slow event is claimed on one partition.
    let slow = Uuid::now_v7();
    send(slow_key, 999, slow).await;
    until("the slow event to start", || book.started.len() == 1).await;

    // t = 30 s: 64 quick events on the other partition fill a generation; X is the last.
    tokio::time::advance(Duration::from_secs(30)).await;
    let mut x = Uuid::nil();
    for _ in 0..64 {
        x = Uuid::now_v7();
        send(fast_key, 0, x).await;
    }
    until("64 quick events", || book.handled.len() == 64).await;

    // t = 60 s: the slow event finishes (marked with its claim time, t = 0), then 31 more.
    tokio::time::advance(Duration::from_secs(30)).await;
    book.gate.notify_one();
    until("the slow event", || book.handled.len() == 65).await;
    for _ in 0..31 {
        send(fast_key, 0, Uuid::now_v7()).await;
    }
    until("31 more", || book.handled.len() == 96).await;

    // X is 30 s old (< 60 s) and 32 ids were marked after it (< 64): still a duplicate.
    send(fast_key, 0, x).await;
    bus.settled().await;
    assert_eq!(
        book.handled
            .snapshot()
            .iter()
            .filter(|id| **id == x)
            .count(),
        1,
        "X was forgotten: handled twice"
    );
    bus.shutdown().await;
}
