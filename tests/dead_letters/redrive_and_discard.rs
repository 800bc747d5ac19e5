//! Dead-letter queue: entries with their errors, redrive to the same group with the original
//! ids and correlation, redrive all, discard, depth in stats, and the sequenced policy that
//! parks a failed key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tidings::dead_letter::DeadLetterError;
use tidings::prelude::*;
use tidings::testing::Recorder;
use tidings::{ErrorKind, Uuid};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = key)]
struct Order {
    key: u64,
    seq: u32,
}

/// Fails while `healthy` is false; records what it handled with ids.
#[derive(Clone)]
struct Shipping {
    healthy: Arc<AtomicBool>,
    permanent: bool,
    handled: Recorder<(u64, u32, Uuid, Uuid, u32)>, // key, seq, id, correlation, attempt
}

impl Handler<Order> for Shipping {
    async fn handle(&mut self, e: &Envelope<Order>, _: &Context) -> HandlerResult {
        if !self.healthy.load(Ordering::SeqCst) {
            let err = HandlerError::msg(format!("warehouse offline for order {}", e.event().seq));
            return Err(if self.permanent {
                err.into_permanent()
            } else {
                err
            });
        }
        let o = e.event();
        self.handled
            .push((o.key, o.seq, e.id(), e.correlation_id(), e.attempt()));
        Ok(())
    }
}

fn shipping(healthy: bool) -> Shipping {
    Shipping {
        healthy: Arc::new(AtomicBool::new(healthy)),
        permanent: true,
        handled: Recorder::new(),
    }
}

/// A bus with a failing "shipping" group and a healthy "audit" group on the same topic.
fn setup(policy: DeadLetterPolicy, partitions: u32) -> (Bus, Shipping, Shipping) {
    let (ship, audit) = (shipping(false), shipping(true));
    let bus = {
        let (ship, audit) = (ship.clone(), audit.clone());
        Bus::builder()
            .topic(TopicConfig::new("orders").partitions(partitions))
            .subscribe::<Order, _>(
                Subscription::new("shipping").dead_letter(policy),
                move || ship.clone(),
            )
            .subscribe::<Order, _>("audit", move || audit.clone())
            .build()
            .unwrap()
    };
    (bus, ship, audit)
}

#[tokio::test]
async fn a_redriven_event_keeps_its_ids_and_goes_to_the_failed_group_only() {
    let (bus, ship, audit) = setup(DeadLetterPolicy::Park, 2);
    let receipt = bus.publish(Order { key: 1, seq: 1 }).await.unwrap();
    bus.settled().await;

    let dlq = bus.dead_letters("shipping").unwrap();
    let letter = dlq.find(receipt.id).expect("dead-lettered");
    assert_eq!(letter.group, "shipping");
    assert_eq!(letter.kind, ErrorKind::Permanent);
    assert_eq!(letter.attempts, 1);
    assert_eq!(letter.error, "warehouse offline for order 1");
    assert_eq!(dlq.get(letter.seq).unwrap().envelope.id(), receipt.id);
    assert_eq!(bus.stats().group("shipping").unwrap().dead_letters, 1);

    ship.healthy.store(true, Ordering::SeqCst);
    dlq.redrive(letter.seq).await.unwrap();
    bus.settled().await;
    let handled = ship.handled.take();
    assert_eq!(handled.len(), 1);
    let (_, _, id, correlation, attempt) = handled[0];
    assert_eq!((id, correlation, attempt), (receipt.id, receipt.id, 1));
    assert_eq!(
        audit.handled.len(),
        1,
        "the other group did not get it again"
    );
    assert!(dlq.is_empty());
    let stats = bus.stats();
    let group = stats.group("shipping").unwrap();
    assert_eq!(
        (
            group.dead_letters,
            group.dead_lettered,
            group.redriven,
            group.handled,
            group.lag
        ),
        (0, 1, 1, 1, 0)
    );
    assert_eq!(
        dlq.redrive(letter.seq).await,
        Err(DeadLetterError::NotFound {
            group: "shipping".into(),
            seq: letter.seq
        })
    );
    bus.shutdown().await;
}

#[tokio::test]
async fn redrive_all_sends_every_entry_back_oldest_first() {
    let (bus, ship, _audit) = setup(DeadLetterPolicy::Park, 1);
    for seq in 1..=5 {
        bus.publish(Order {
            key: seq.into(),
            seq,
        })
        .await
        .unwrap();
    }
    bus.settled().await;
    let dlq = bus.dead_letters("shipping").unwrap();
    let seqs: Vec<u32> = dlq
        .list()
        .iter()
        .map(|l| l.envelope.downcast_ref::<Order>().unwrap().seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    ship.healthy.store(true, Ordering::SeqCst);
    assert_eq!(dlq.redrive_all().await.unwrap(), 5);
    bus.settled().await;
    let handled: Vec<u32> = ship.handled.take().iter().map(|h| h.1).collect();
    assert_eq!(handled, vec![1, 2, 3, 4, 5]);
    assert!(dlq.is_empty());
    bus.shutdown().await;
}

#[tokio::test]
async fn redrive_where_sends_back_only_the_entries_it_picks() {
    let (bus, ship, _audit) = setup(DeadLetterPolicy::Park, 1);
    for seq in 1..=4 {
        bus.publish(Order {
            key: seq.into(),
            seq,
        })
        .await
        .unwrap();
    }
    bus.settled().await;
    ship.healthy.store(true, Ordering::SeqCst);
    let dlq = bus.dead_letters("shipping").unwrap();
    let even = |l: &tidings::dead_letter::DeadLetter| {
        l.envelope
            .downcast_ref::<Order>()
            .unwrap()
            .seq
            .is_multiple_of(2)
    };
    assert_eq!(dlq.redrive_where(even).await.unwrap(), 2);
    bus.settled().await;
    let handled: Vec<u32> = ship.handled.take().iter().map(|h| h.1).collect();
    assert_eq!(handled, vec![2, 4]);
    assert_eq!(dlq.len(), 2);
    bus.shutdown().await;
}

#[tokio::test]
async fn discard_removes_an_entry_for_good_and_is_counted() {
    let (bus, _ship, _audit) = setup(DeadLetterPolicy::Park, 1);
    bus.publish(Order { key: 1, seq: 1 }).await.unwrap();
    bus.settled().await;
    let dlq = bus.dead_letters("shipping").unwrap();
    let seq = dlq.list()[0].seq;
    let letter = dlq.discard(seq, "order cancelled by the customer").unwrap();
    assert_eq!(letter.seq, seq);
    assert!(dlq.is_empty());
    assert!(matches!(
        dlq.discard(seq, "again"),
        Err(DeadLetterError::NotFound { .. })
    ));
    let stats = bus.stats();
    let group = stats.group("shipping").unwrap();
    assert_eq!((group.dead_letters, group.discarded), (0, 1));
    bus.shutdown().await;
}

#[tokio::test]
async fn an_unknown_group_is_an_error_and_redrive_is_refused_after_shutdown() {
    let (bus, _ship, _audit) = setup(DeadLetterPolicy::Park, 1);
    assert_eq!(
        bus.dead_letters("shiping").unwrap_err(),
        DeadLetterError::UnknownGroup {
            group: "shiping".into()
        }
    );
    bus.publish(Order { key: 1, seq: 1 }).await.unwrap();
    bus.settled().await;
    bus.shutdown().await;
    let dlq = bus.dead_letters("shipping").unwrap();
    let seq = dlq.list()[0].seq;
    assert_eq!(dlq.redrive(seq).await, Err(DeadLetterError::Closed));
    assert_eq!(dlq.len(), 1, "the entry stays");
}

#[tokio::test]
async fn a_redrive_waits_for_room_in_the_group_queue() {
    let ship = shipping(false);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    #[derive(Clone)]
    struct Slow(Shipping, Arc<tokio::sync::Semaphore>);
    impl Handler<Order> for Slow {
        async fn handle(&mut self, e: &Envelope<Order>, ctx: &Context) -> HandlerResult {
            if e.event().seq >= 100 {
                self.1.acquire().await.unwrap().forget();
            }
            self.0.handle(e, ctx).await
        }
    }
    let bus = {
        let s = Slow(ship.clone(), gate.clone());
        Bus::builder()
            .topic(TopicConfig::new("orders").partitions(1).capacity(2))
            .subscribe::<Order, _>(Subscription::new("shipping").batch_size(1), move || {
                s.clone()
            })
            .build()
            .unwrap()
    };
    bus.publish(Order { key: 1, seq: 1 }).await.unwrap();
    bus.settled().await;
    ship.healthy.store(true, Ordering::SeqCst);
    // Block the worker, and fill the queue.
    for seq in 100..103 {
        bus.publish(Order { key: 1, seq }).await.unwrap();
    }
    let dlq = bus.dead_letters("shipping").unwrap();
    let seq = dlq.list()[0].seq;
    let redrive = tokio::spawn({
        let dlq = dlq.clone();
        async move { dlq.redrive(seq).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!redrive.is_finished(), "waits while the queue is full");
    assert!(bus.stats().group("shipping").unwrap().depth <= 2);
    gate.add_permits(3);
    redrive.await.unwrap().unwrap();
    bus.settled().await;
    let handled: Vec<u32> = ship.handled.take().iter().map(|h| h.1).collect();
    assert_eq!(handled, vec![100, 101, 102, 1]);
    bus.shutdown().await;
}

fn seqs(letters: &[tidings::dead_letter::DeadLetter]) -> Vec<(u32, Option<u64>, u32)> {
    letters
        .iter()
        .map(|l| {
            (
                l.envelope.downcast_ref::<Order>().unwrap().seq,
                l.parked_behind,
                l.attempts,
            )
        })
        .collect()
}

#[tokio::test]
async fn sequenced_parks_later_events_of_a_failed_key_and_releases_them_in_order() {
    let (bus, ship, _audit) = setup(DeadLetterPolicy::Sequenced, 1);
    ship.healthy.store(true, Ordering::SeqCst);
    // Key 1 fails on seq 1 only: make the handler fail just that one by toggling health.
    ship.healthy.store(false, Ordering::SeqCst);
    bus.publish(Order { key: 1, seq: 1 }).await.unwrap();
    bus.settled().await;
    ship.healthy.store(true, Ordering::SeqCst);
    bus.publish(Order { key: 1, seq: 2 }).await.unwrap();
    bus.publish(Order { key: 2, seq: 3 }).await.unwrap();
    bus.publish(Order { key: 1, seq: 4 }).await.unwrap();
    bus.settled().await;

    let dlq = bus.dead_letters("shipping").unwrap();
    let letters = dlq.list();
    let head = letters[0].seq;
    assert_eq!(
        seqs(&letters),
        vec![(1, None, 1), (2, Some(head), 0), (4, Some(head), 0)]
    );
    // Other keys go on.
    assert_eq!(
        ship.handled.take().iter().map(|h| h.1).collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(
        dlq.redrive(letters[1].seq).await,
        Err(DeadLetterError::ParkedBehind {
            seq: letters[1].seq,
            head
        })
    );
    dlq.redrive(head).await.unwrap();
    bus.settled().await;
    assert_eq!(
        ship.handled.take().iter().map(|h| h.1).collect::<Vec<_>>(),
        vec![1, 2, 4]
    );
    assert!(dlq.is_empty());
    // The key is free again.
    bus.publish(Order { key: 1, seq: 5 }).await.unwrap();
    bus.settled().await;
    assert_eq!(
        ship.handled.take().iter().map(|h| h.1).collect::<Vec<_>>(),
        vec![5]
    );
    let stats = bus.stats();
    let group = stats.group("shipping").unwrap();
    assert_eq!((group.lag, group.dead_letters), (0, 0));
    bus.shutdown().await;
}

#[tokio::test]
async fn sequenced_a_released_event_that_fails_again_becomes_the_head_and_the_rest_stay_parked() {
    let (bus, ship, _audit) = setup(DeadLetterPolicy::Sequenced, 1);
    for seq in 1..=3 {
        bus.publish(Order { key: 1, seq }).await.unwrap();
    }
    bus.settled().await;
    let dlq = bus.dead_letters("shipping").unwrap();
    let head = dlq.list()[0].seq;
    // Still failing: redriving the head puts it back at the head.
    dlq.redrive(head).await.unwrap();
    bus.settled().await;
    let letters = dlq.list();
    let new_head = letters.iter().find(|l| l.parked_behind.is_none()).unwrap();
    assert_eq!(
        new_head.envelope.downcast_ref::<Order>().unwrap().seq,
        1,
        "seq 1 is the head again"
    );
    assert_ne!(new_head.seq, head);
    let followers: Vec<(u32, Option<u64>)> = letters
        .iter()
        .filter(|l| l.parked_behind.is_some())
        .map(|l| {
            (
                l.envelope.downcast_ref::<Order>().unwrap().seq,
                l.parked_behind,
            )
        })
        .collect();
    assert_eq!(
        followers,
        vec![(2, Some(new_head.seq)), (3, Some(new_head.seq))]
    );
    assert!(ship.handled.is_empty());

    ship.healthy.store(true, Ordering::SeqCst);
    assert_eq!(
        dlq.redrive_all().await.unwrap(),
        1,
        "only the head is redriven"
    );
    bus.settled().await;
    assert_eq!(
        ship.handled.take().iter().map(|h| h.1).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(dlq.is_empty());
    bus.shutdown().await;
}

#[tokio::test]
async fn sequenced_discarding_the_head_makes_the_next_one_the_head_still_parked() {
    let (bus, ship, _audit) = setup(DeadLetterPolicy::Sequenced, 1);
    for seq in 1..=3 {
        bus.publish(Order { key: 1, seq }).await.unwrap();
    }
    bus.settled().await;
    let dlq = bus.dead_letters("shipping").unwrap();
    let letters = dlq.list();
    dlq.discard(letters[0].seq, "duplicate order").unwrap();
    let letters = dlq.list();
    assert_eq!(
        seqs(&letters),
        vec![(2, None, 0), (3, Some(letters[0].seq), 0)]
    );
    // Still parked: a new event of the key waits behind them.
    ship.healthy.store(true, Ordering::SeqCst);
    bus.publish(Order { key: 1, seq: 4 }).await.unwrap();
    bus.settled().await;
    assert!(ship.handled.is_empty());
    dlq.redrive(letters[0].seq).await.unwrap();
    bus.settled().await;
    assert_eq!(
        ship.handled.take().iter().map(|h| h.1).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    bus.shutdown().await;
}
