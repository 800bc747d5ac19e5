//! Ordering per key, fan-out across groups and competing consumers, under concurrent publishers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::testing::Recorder;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "ordering", key = key)]
struct Numbered {
    key: u64,
    publisher: u32,
    seq: u64,
}

/// What one handler instance saw: (group, partition, key, publisher, seq, offset).
type Seen = Recorder<(String, u32, u64, u32, u64, u64)>;

struct Track {
    seen: Seen,
}

impl Handler<Numbered> for Track {
    async fn handle(&mut self, e: &Envelope<Numbered>, ctx: &Context) -> Result<(), HandlerError> {
        let ev = e.event();
        // Yield now and then so that workers interleave.
        if ev.seq.is_multiple_of(7) {
            tokio::task::yield_now().await;
        }
        self.seen.push((
            ctx.group().to_owned(),
            e.partition(),
            ev.key,
            ev.publisher,
            ev.seq,
            e.offset(),
        ));
        Ok(())
    }
}

const GROUPS: [&str; 3] = ["billing", "shipping", "audit"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_in_every_group_under_concurrent_publishers() {
    // `TIDINGS_STRESS=N` repeats the run N times with other seeds (CI runs it once).
    let rounds: u64 = std::env::var("TIDINGS_STRESS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for round in 0..rounds {
        ordering_round(round).await;
    }
}

async fn ordering_round(round: u64) {
    let seen = Seen::new();
    let mut builder = Bus::builder().topic(TopicConfig::new("ordering").partitions(4).capacity(64));
    for group in GROUPS {
        let seen = seen.clone();
        builder = builder.subscribe::<Numbered, _>(group, move || Track { seen: seen.clone() });
    }
    let bus = builder.build().unwrap();

    const PUBLISHERS: u32 = 6;
    const PER_PUBLISHER: u64 = 2_000;
    let mut tasks = Vec::new();
    for publisher in 0..PUBLISHERS {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(round * 1000 + u64::from(publisher));
            // Per (key, publisher) sequence numbers: the order this task published in.
            let mut next: HashMap<u64, u64> = HashMap::new();
            for _ in 0..PER_PUBLISHER {
                let key = rng.random_range(0..20u64);
                let seq = next.entry(key).or_insert(0);
                bus.publish(Numbered {
                    key,
                    publisher,
                    seq: *seq,
                })
                .await
                .unwrap();
                *seq += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    bus.settled().await;
    let report = bus.shutdown().await;
    let total = u64::from(PUBLISHERS) * PER_PUBLISHER;
    assert_eq!(report.handled, total * GROUPS.len() as u64);
    assert_eq!(report.failed, 0);

    let seen = seen.snapshot();
    assert_eq!(seen.len() as u64, total * GROUPS.len() as u64);
    for group in GROUPS {
        let mut last_seq: HashMap<(u64, u32), u64> = HashMap::new();
        let mut last_offset: HashMap<u64, u64> = HashMap::new();
        let mut partition_of: HashMap<u64, u32> = HashMap::new();
        let mut count = 0;
        for (g, partition, key, publisher, seq, offset) in seen.iter().filter(|s| s.0 == group) {
            assert_eq!(g, group);
            count += 1;
            // Same key → always the same partition.
            assert_eq!(*partition_of.entry(*key).or_insert(*partition), *partition);
            // Each publisher's events of a key arrive in its publish order, none missing.
            let expected = last_seq.get(&(*key, *publisher)).map_or(0, |s| s + 1);
            assert_eq!(
                *seq, expected,
                "group {group} key {key} publisher {publisher}"
            );
            last_seq.insert((*key, *publisher), *seq);
            // And all events of a key arrive in offset (acceptance) order.
            if let Some(prev) = last_offset.insert(*key, *offset) {
                assert!(
                    prev < *offset,
                    "group {group} key {key}: offset {offset} after {prev}"
                );
            }
        }
        assert_eq!(count, total, "group {group} saw every event once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partition_is_owned_by_one_worker_and_partitions_run_concurrently() {
    // Every handler instance records which partitions it served: exactly one each, and all four
    // partitions are served by distinct instances.
    static NEXT_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let owners: Arc<Mutex<HashMap<usize, Vec<u32>>>> = Arc::default();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let max_in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    struct Owner {
        id: usize,
        owners: Arc<Mutex<HashMap<usize, Vec<u32>>>>,
        in_flight: Arc<std::sync::atomic::AtomicUsize>,
        max_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    }
    impl Handler<Numbered> for Owner {
        async fn handle(
            &mut self,
            e: &Envelope<Numbered>,
            _: &Context,
        ) -> Result<(), HandlerError> {
            use std::sync::atomic::Ordering::SeqCst;
            let now = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.max_in_flight.fetch_max(now, SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let mut owners = self.owners.lock().unwrap();
            let parts = owners.entry(self.id).or_default();
            if !parts.contains(&e.partition()) {
                parts.push(e.partition());
            }
            self.in_flight.fetch_sub(1, SeqCst);
            Ok(())
        }
    }

    let bus = Bus::builder()
        .topic(TopicConfig::new("ordering").partitions(4))
        .subscribe::<Numbered, _>("owners", {
            let (owners, in_flight, max_in_flight) =
                (owners.clone(), in_flight.clone(), max_in_flight.clone());
            move || Owner {
                id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                owners: owners.clone(),
                in_flight: in_flight.clone(),
                max_in_flight: max_in_flight.clone(),
            }
        })
        .build()
        .unwrap();
    for key in 0..200u64 {
        bus.publish(Numbered {
            key,
            publisher: 0,
            seq: 0,
        })
        .await
        .unwrap();
    }
    bus.shutdown().await;
    let owners = owners.lock().unwrap();
    assert_eq!(
        owners.len(),
        4,
        "one handler instance per partition served events"
    );
    let mut all: Vec<u32> = owners.values().flatten().copied().collect();
    assert!(
        owners.values().all(|p| p.len() == 1),
        "an instance served two partitions: {owners:?}"
    );
    all.sort_unstable();
    assert_eq!(all, vec![0, 1, 2, 3]);
    assert!(
        max_in_flight.load(std::sync::atomic::Ordering::SeqCst) > 1,
        "partitions of one group should be handled concurrently (competing consumers)"
    );
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "lifecycle", key = id)]
struct Created {
    id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "lifecycle", key = id)]
struct Paid {
    id: u64,
}

struct AllTypes {
    seen: Recorder<(u64, &'static str)>,
}

impl AnyHandler for AllTypes {
    async fn handle(&mut self, e: &AnyEnvelope, _: &Context) -> Result<(), HandlerError> {
        if let Some(c) = e.downcast_ref::<Created>() {
            self.seen.push((c.id, "created"));
        } else if let Some(p) = e.downcast_ref::<Paid>() {
            self.seen.push((p.id, "paid"));
        }
        Ok(())
    }
}

struct OnlyPaid {
    seen: Recorder<u64>,
}

impl Handler<Paid> for OnlyPaid {
    async fn handle(&mut self, e: &Envelope<Paid>, _: &Context) -> Result<(), HandlerError> {
        self.seen.push(e.event().id);
        Ok(())
    }
}

#[tokio::test]
async fn a_topic_carries_several_types_and_groups_subscribe_to_one_or_all() {
    let all = Recorder::new();
    let paid = Recorder::new();
    let bus = Bus::builder()
        .topic(TopicConfig::new("lifecycle").partitions(3))
        .subscribe_all("lifecycle", "all-types", {
            let all = all.clone();
            move || AllTypes { seen: all.clone() }
        })
        .subscribe::<Paid, _>("only-paid", {
            let paid = paid.clone();
            move || OnlyPaid { seen: paid.clone() }
        })
        .build()
        .unwrap();
    for id in 0..50 {
        bus.publish(Created { id }).await.unwrap();
        bus.publish(Paid { id }).await.unwrap();
    }
    bus.settled().await;
    let all = all.snapshot();
    assert_eq!(all.len(), 100);
    for id in 0..50 {
        let kinds: Vec<_> = all
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, k)| *k)
            .collect();
        assert_eq!(
            kinds,
            vec!["created", "paid"],
            "order {id}: types kept their relative order"
        );
    }
    let mut paid = paid.snapshot();
    paid.sort_unstable();
    assert_eq!(paid, (0..50).collect::<Vec<_>>());
    let stats = bus.stats();
    assert_eq!(
        stats.group("only-paid").unwrap().delivered,
        50,
        "typed group gets its type only"
    );
    assert_eq!(stats.group("all-types").unwrap().delivered, 100);
    bus.shutdown().await;
}

#[tokio::test]
async fn the_same_key_always_maps_to_the_same_partition() {
    // Golden values: the partition of a key must not change between releases or runs, or
    // stored logs would be split across partitions.
    let got: Vec<u32> = (0..10u64)
        .map(|k| tidings::Key::U64(k).partition(4))
        .collect();
    let again: Vec<u32> = (0..10u64)
        .map(|k| tidings::Key::U64(k).partition(4))
        .collect();
    assert_eq!(got, again);
    assert_eq!(got, GOLDEN_U64_MOD4.to_vec());
    assert_eq!(
        tidings::Key::Str("order-42").partition(16),
        GOLDEN_ORDER_42_MOD16
    );
}

const GOLDEN_U64_MOD4: [u32; 10] = [1, 2, 3, 1, 0, 0, 3, 3, 2, 3];
const GOLDEN_ORDER_42_MOD16: u32 = 12;
