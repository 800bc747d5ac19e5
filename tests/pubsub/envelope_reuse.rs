//! A publisher builds the envelope of a plain-data event in the allocation of one its groups
//! finished with: never in one that a handler, another group or the recorder still holds, and
//! always with the new event's own metadata.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::{Headers, Published};

/// Plain data: no heap, no drop, so its envelopes are reused.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "readings")]
struct Reading {
    n: u64,
    value: [u64; 4],
}

impl Reading {
    fn new(n: u64) -> Self {
        Reading {
            n,
            value: [n * 3; 4],
        }
    }
}

const CAPACITY: usize = 32;

/// What a handler saw of one envelope, copied out.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    n: u64,
    value: [u64; 4],
    offset: u64,
    id: uuid::Uuid,
    correlation: uuid::Uuid,
    causation: Option<uuid::Uuid>,
    tenant: Option<String>,
    attempt: u32,
}

fn seen(e: &Envelope<Reading>) -> Seen {
    Seen {
        n: e.event().n,
        value: e.event().value,
        offset: e.offset(),
        id: e.id(),
        correlation: e.correlation_id(),
        causation: e.causation_id(),
        tenant: e.metadata().headers.get("tenant").map(str::to_owned),
        attempt: e.attempt(),
    }
}

/// Copies out what it sees, and keeps a clone of every third envelope.
#[derive(Clone, Default)]
struct Keeper {
    seen: Arc<Mutex<Vec<Seen>>>,
    kept: Arc<Mutex<Vec<Envelope<Reading>>>>,
}

impl Handler<Reading> for Keeper {
    async fn handle(&mut self, e: &Envelope<Reading>, _: &Context) -> Result<(), HandlerError> {
        self.seen.lock().unwrap().push(seen(e));
        if e.event().n.is_multiple_of(3) {
            self.kept.lock().unwrap().push(e.clone());
        }
        Ok(())
    }
}

fn bus(groups: &[(&str, Keeper)], record: bool) -> Bus {
    let mut builder = Bus::builder().record(record).topic(
        TopicConfig::new("readings")
            .partitions(1)
            .capacity(CAPACITY),
    );
    for (group, keeper) in groups {
        let keeper = keeper.clone();
        builder = builder.subscribe::<Reading, _>(*group, move || keeper.clone());
    }
    builder.build().unwrap()
}

/// Publishes `bursts` bursts of three queues' worth, settling in between (an idle worker keeps
/// finished envelopes for the next burst); every fourth event carries a header.
async fn publish_bursts(bus: &Bus, bursts: u64) -> Vec<Published> {
    let mut receipts = Vec::new();
    let per_burst = 3 * CAPACITY as u64;
    for burst in 0..bursts {
        for i in 0..per_burst {
            let n = burst * per_burst + i;
            let receipt = if n % 4 == 1 {
                let headers = Headers::new().with("tenant", format!("t{n}"));
                bus.publish_with(Reading::new(n), headers).await.unwrap()
            } else {
                bus.publish(Reading::new(n)).await.unwrap()
            };
            receipts.push(receipt);
        }
        bus.settled().await;
    }
    receipts
}

/// Every event was seen once, in order, with its own data and metadata.
fn check_seen(seen: &[Seen], receipts: &[Published]) {
    assert_eq!(seen.len(), receipts.len());
    let mut ids = HashSet::new();
    for (n, (s, receipt)) in seen.iter().zip(receipts).enumerate() {
        let n = n as u64;
        let expected = Reading::new(n);
        assert_eq!((s.n, s.value), (expected.n, expected.value), "event {n}");
        assert_eq!(s.offset, n, "event {n}");
        assert_eq!(s.id, receipt.id, "event {n}");
        assert_eq!(s.correlation, s.id, "a root event starts its own chain");
        assert_eq!(s.causation, None);
        assert_eq!(s.attempt, 1);
        let tenant = (n % 4 == 1).then(|| format!("t{n}"));
        assert_eq!(s.tenant, tenant, "event {n}");
        assert!(ids.insert(s.id), "id {} given twice", s.id);
    }
}

/// The envelopes a handler kept still hold what they held when handled.
fn check_kept(kept: &[Envelope<Reading>], handled: &[Seen]) {
    assert_eq!(kept.len(), handled.len().div_ceil(3));
    for e in kept {
        let n = e.event().n;
        assert!(n.is_multiple_of(3));
        assert_eq!(
            seen(e),
            handled[n as usize],
            "kept envelope {n} was built over"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_a_handler_keeps_is_never_built_over() {
    let keeper = Keeper::default();
    let bus = bus(&[("keeper", keeper.clone())], false);
    let receipts = publish_bursts(&bus, 4).await;
    bus.shutdown().await;
    let seen = keeper.seen.lock().unwrap();
    check_seen(&seen, &receipts);
    check_kept(&keeper.kept.lock().unwrap(), &seen);
}

#[tokio::test(flavor = "current_thread")]
async fn every_group_sees_each_event_as_published_while_another_still_holds_it() {
    let (first, second) = (Keeper::default(), Keeper::default());
    let bus = bus(
        &[("first", first.clone()), ("second", second.clone())],
        false,
    );
    let receipts = publish_bursts(&bus, 3).await;
    bus.shutdown().await;
    for keeper in [&first, &second] {
        let seen = keeper.seen.lock().unwrap();
        check_seen(&seen, &receipts);
        check_kept(&keeper.kept.lock().unwrap(), &seen);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_recorder_keeps_every_envelope_as_published() {
    let keeper = Keeper::default();
    let bus = bus(&[("keeper", keeper.clone())], true);
    let receipts = publish_bursts(&bus, 3).await;
    bus.settled().await;
    let published = bus.published();
    assert_eq!(published.len(), receipts.len());
    for (n, (env, receipt)) in published.iter().zip(&receipts).enumerate() {
        assert_eq!(env.id(), receipt.id);
        assert_eq!(env.offset(), n as u64);
        let event = env.downcast::<Reading>().unwrap();
        assert_eq!(*event.event(), Reading::new(n as u64));
    }
    bus.shutdown().await;
    check_seen(&keeper.seen.lock().unwrap(), &receipts);
}
