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
            for group in &mut groups {
                if let Some(dlq) = self.dead_letters.get(&group.group) {
                    let counts = dlq.counts();
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
