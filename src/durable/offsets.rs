//! The committer: every group's finished offsets, committed to the store on an interval and
//! at shutdown.

use std::sync::atomic::Ordering;

use super::Engine;
use crate::store::{GroupOffset, StoreError};

pub(crate) async fn run_committer(inner: Engine) {
    let d = &*inner.d;
    let mut tick = tokio::time::interval(d.commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = d.stop.cancelled() => return,
        }
        if let Err(error) = commit_offsets(&inner).await {
            tracing::warn!(%error, "tidings: committing offsets failed; will try again");
        }
    }
}

/// Commits the next offset of every group partition that moved since its last commit.
pub(crate) async fn commit_offsets(inner: &Engine) -> Result<(), StoreError> {
    let d = &*inner.d;
    // One at a time, and never while a rebuild moves an offset back (see `rebuild`).
    let _commits = d.commits.lock().await;
    let mut offsets = Vec::new();
    {
        let committed = d.committed.lock();
        for topic in &inner.core.topics {
            for (slot, group) in topic.groups.iter().enumerate() {
                for (p, w) in topic.worker_stats[slot].iter().enumerate() {
                    if !w.ready.load(Ordering::Acquire) {
                        continue;
                    }
                    let next = w.next_offset.load(Ordering::Acquire);
                    // Effectively-once: never past an event whose mark is not durable yet.
                    let next = match w.unmarked.load(Ordering::Acquire) {
                        0 => next,
                        held => next.min(held - 1),
                    };
                    let key = (topic.name.clone(), slot, p as u32);
                    if committed.get(&key).is_some_and(|&c| c >= next) {
                        continue;
                    }
                    offsets.push(GroupOffset {
                        group: group.clone(),
                        topic: topic.name.clone(),
                        partition: p as u32,
                        next_offset: next,
                    });
                }
            }
        }
    }
    if offsets.is_empty() {
        return Ok(());
    }
    // The order the marks committer writes offset rows in too (`highest_offsets`): two
    // transactions that lock rows in one order cannot deadlock each other.
    offsets
        .sort_by(|a, b| (&a.group, &a.topic, a.partition).cmp(&(&b.group, &b.topic, b.partition)));
    d.store.commit(&offsets).await?;
    let mut committed = d.committed.lock();
    for o in offsets {
        let slot = inner.core.topics[inner.core.topic_index[&o.topic]]
            .groups
            .iter()
            .position(|g| *g == o.group)
            .expect("a group of the topic");
        let c = committed.entry((o.topic, slot, o.partition)).or_insert(0);
        *c = (*c).max(o.next_offset);
    }
    Ok(())
}
