//! The [`Stats`] snapshot of a bus: per topic, group and partition.

use super::BusInner;
use crate::stats::{GroupStats, PartitionStats, Stats, TopicStats};

impl BusInner {
    pub(crate) fn stats(&self) -> Stats {
        use std::sync::atomic::Ordering::Relaxed;
        let mut topics = Vec::new();
        for topic in self.all_topics() {
            let mut published = Vec::with_capacity(topic.partitions.len());
            let mut groups: Vec<GroupStats> = topic
                .groups
                .iter()
                .map(|name| GroupStats {
                    group: name.clone(),
                    ..GroupStats::default()
                })
                .collect();
            for (p, part) in topic.partitions.iter().enumerate() {
                let state = part.lock();
                published.push(state.next_offset);
                for (slot, group) in groups.iter_mut().enumerate() {
                    let q = &state.queues[slot];
                    let w = &topic.worker_stats[slot][p];
                    let handled = w.handled.load(Relaxed);
                    let failed = w.failed.load(Relaxed);
                    let mut next = w.next_offset.load(Relaxed);
                    let durable = self.durable.is_some();
                    if durable && q.items.is_empty() && !q.lagging {
                        next = next.max(q.skipped_to);
                    }
                    let lag = if durable {
                        state.next_offset.saturating_sub(next)
                    } else {
                        q.delivered.saturating_sub(handled + failed + q.dropped)
                    };
                    topic.metrics.group(slot).lag(p, lag);
                    let ps = PartitionStats {
                        partition: p as u32,
                        published: state.next_offset,
                        delivered: q.delivered,
                        handled,
                        duplicates: w.duplicates.load(Relaxed),
                        failed,
                        dropped: q.dropped,
                        panics: w.panics.load(Relaxed),
                        restarts: w.restarts.load(Relaxed),
                        depth: q.items.len() as u64,
                        lag,
                        committed: next.checked_sub(1),
                    };
                    group.add(ps);
                }
            }
            for (slot, group) in groups.iter_mut().enumerate() {
                let queue = self
                    .dead_letters
                    .get(&group.group)
                    .and_then(|queues| queues.iter().find(|q| q.topic_name() == topic.name));
                if let Some(dlq) = queue {
                    let counts = dlq.counts();
                    topic.metrics.group(slot).dead_letter_depth(counts.depth);
                    group.dead_letters = counts.depth;
                    group.dead_lettered = counts.total;
                    group.redriven = counts.redriven;
                    group.discarded = counts.discarded;
                }
            }
            topics.push(TopicStats {
                topic: topic.name.clone(),
                partitions: topic.partitions.len() as u32,
                published: published.iter().sum(),
                published_per_partition: published,
                unrouted: topic.unrouted.load(Relaxed),
                groups,
            });
        }
        Stats {
            topics,
            pending: self.pending.count() as u64,
        }
    }
}

/// Samples the metrics' gauges (lag, dead-letter depth) every
/// [`SAMPLE_INTERVAL`](crate::metrics::SAMPLE_INTERVAL), through the same snapshot as
/// [`Bus::stats`](crate::Bus::stats), until the bus shuts down (whose report takes the last
/// sample) or is gone.
#[cfg(feature = "metrics")]
pub(crate) async fn sample_gauges(inner: std::sync::Weak<BusInner>) {
    let Some(cancel) = inner.upgrade().map(|i| i.cancel.clone()) else {
        return;
    };
    let mut tick = tokio::time::interval(crate::metrics::SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match inner.upgrade() {
            Some(inner) => drop(inner.stats()),
            None => return,
        }
    }
}
