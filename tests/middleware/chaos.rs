//! Chaos, in the spirit of Watermill's RandomFail and Duplicator middleware: 100 000 events,
//! 10 % of attempts failing at random, copies of events published again and deliveries
//! duplicated, over two groups, with a fixed seed. Every event is handled successfully exactly
//! once per group, or sits in the group's dead-letter queue; per-key order holds.
//!
//! `TIDINGS_CHAOS_EVENTS=N` changes the number of events.

use std::collections::{HashMap, HashSet};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::testing::Recorder;
use tidings::Uuid;

const SEED: u64 = 0x7d1d_1265;
const KEYS: u64 = 1000;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "chaos", key = key)]
struct Tx {
    key: u64,
    seq: u32,
}

/// Fails a share of attempts before the handler runs.
#[derive(Clone)]
struct RandomFail {
    rate: f64,
    rng: SmallRng,
}

impl Middleware for RandomFail {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        if self.rng.random_bool(self.rate) {
            return Err(HandlerError::msg("injected failure"));
        }
        next.run(env).await
    }
}

/// Delivers a share of events twice.
#[derive(Clone)]
struct Duplicator {
    rate: f64,
    rng: SmallRng,
}

impl Middleware for Duplicator {
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        let twice = self.rng.random_bool(self.rate);
        let first = next.run(env).await;
        if twice {
            next.run(env).await?;
        }
        first
    }
}

#[derive(Clone)]
struct Ledger {
    handled: Recorder<(Uuid, u64, u32)>,
}

impl Handler<Tx> for Ledger {
    async fn handle(&mut self, e: &Envelope<Tx>, _: &Context) -> HandlerResult {
        self.handled.push((e.id(), e.event().key, e.event().seq));
        Ok(())
    }
}

fn subscription(group: &str, seed: u64) -> Subscription {
    Subscription::new(group)
        .layer(RandomFail {
            rate: 0.10,
            rng: SmallRng::seed_from_u64(seed),
        })
        .layer(Retry::immediate(4))
        .layer(Dedup::new(DedupWindow::new().max_entries(1_000_000)))
        .layer(Duplicator {
            rate: 0.05,
            rng: SmallRng::seed_from_u64(seed + 1),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_failures_and_duplicates_lose_nothing_handle_nothing_twice_and_keep_key_order() {
    let events: u32 = std::env::var("TIDINGS_CHAOS_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let groups = ["ledger", "analytics"];
    let ledgers: Vec<Ledger> = groups
        .iter()
        .map(|_| Ledger {
            handled: Recorder::new(),
        })
        .collect();
    let mut builder = Bus::builder().topic(TopicConfig::new("chaos").partitions(4));
    for (i, group) in groups.iter().enumerate() {
        let ledger = ledgers[i].clone();
        builder = builder
            .subscribe::<Tx, _>(subscription(group, SEED + 10 * i as u64), move || {
                ledger.clone()
            });
    }
    let bus = builder.build().unwrap();

    let mut rng = SmallRng::seed_from_u64(SEED);
    let mut next_seq: HashMap<u64, u32> = HashMap::new();
    let mut published: Vec<Uuid> = Vec::with_capacity(events as usize);
    // Copies to publish again a little later: (id, event).
    let mut copies: Vec<(Uuid, Tx)> = Vec::new();
    for _ in 0..events {
        let key = rng.random_range(0..KEYS);
        let seq = next_seq.entry(key).or_insert(0);
        *seq += 1;
        let tx = Tx { key, seq: *seq };
        let id = Uuid::from_u128(rng.random());
        if rng.random_bool(0.10) {
            copies.push((id, tx.clone()));
        }
        bus.publish_with(tx, PublishOptions::new().id(id))
            .await
            .unwrap();
        published.push(id);
        if copies.len() >= 64 {
            for (id, tx) in copies.drain(..) {
                bus.publish_with(tx, PublishOptions::new().id(id))
                    .await
                    .unwrap();
            }
        }
    }
    for (id, tx) in copies.drain(..) {
        bus.publish_with(tx, PublishOptions::new().id(id))
            .await
            .unwrap();
    }
    bus.settled().await;

    let stats = bus.stats();
    for (i, group) in groups.iter().enumerate() {
        let handled = ledgers[i].handled.take();
        let dead: HashSet<Uuid> = bus
            .dead_letters(group)
            .unwrap()
            .list()
            .iter()
            .map(|l| l.envelope.id())
            .collect();
        let mut times: HashMap<Uuid, u32> = HashMap::new();
        for (id, _, _) in &handled {
            *times.entry(*id).or_default() += 1;
        }
        let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{group}: handled more than once: {twice:?}"
        );
        let lost: Vec<_> = published
            .iter()
            .filter(|id| !times.contains_key(id) && !dead.contains(id))
            .collect();
        assert!(lost.is_empty(), "{group}: {} events lost", lost.len());
        // Per-key order, leaving out events that went through the dead-letter queue (a copy
        // of one of them may be handled later, out of order, by design).
        let mut last: HashMap<u64, u32> = HashMap::new();
        for (id, key, seq) in &handled {
            if dead.contains(id) {
                continue;
            }
            let prev = last.insert(*key, *seq).unwrap_or(0);
            assert!(prev < *seq, "{group}: key {key}: seq {seq} after {prev}");
        }
        let g = stats.group(group).unwrap();
        assert_eq!(g.dead_letters, dead.len() as u64);
        assert_eq!(g.lag, 0);
        println!(
            "{group}: {} handled, {} dead-lettered, {} deliveries acknowledged",
            handled.len(),
            dead.len(),
            g.handled
        );
    }
    bus.shutdown().await;
}
