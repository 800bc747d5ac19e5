//! Retention: trims each topic's log as its [`Retention`](crate::store::Retention) says, on an
//! interval.

use std::time::SystemTime;

use super::Engine;
use crate::store::{Retention, StoreError};

pub(crate) async fn run_retention(inner: Engine) {
    let d = &*inner.d;
    let mut tick = tokio::time::interval(d.retention_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = d.stop.cancelled() => return,
        }
        if let Err(error) = apply_retention(&inner).await {
            tracing::warn!(%error, "tidings: applying retention failed; will try again");
        }
    }
}

/// Deletes what each topic's retention no longer keeps.
pub(crate) async fn apply_retention(inner: &Engine) -> Result<u64, StoreError> {
    let d = &*inner.d;
    let mut deleted = 0;
    for topic in &inner.core.topics {
        let retention = d.retention.get(&topic.name).copied().unwrap_or_default();
        for p in 0..topic.partitions.len() as u32 {
            let before = match retention {
                Retention::KeepAll => continue,
                Retention::MaxEvents(n) => d.store.head(&topic.name, p).await?.saturating_sub(n),
                Retention::MaxAge(age) => {
                    let cutoff = SystemTime::now()
                        .checked_sub(age)
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    d.store.offset_at(&topic.name, p, cutoff).await?
                }
            };
            if before > 0 {
                let n = d.store.trim(&topic.name, p, before).await?;
                if n > 0 {
                    tracing::debug!(topic = %topic.name, partition = p, deleted = n, "tidings: retention");
                }
                deleted += n;
            }
        }
    }
    Ok(deleted)
}
