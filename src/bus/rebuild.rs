//! Rebuilding a projection on a running bus: [`Bus::rebuild`], its [`Rebuild`] handle and
//! [`RebuildError`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Bus;
use crate::durable::rebuild::{Progress, Refused};
use crate::store::StartFrom;

/// Why a [rebuild](Bus::rebuild) was refused or did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RebuildError {
    /// The bus has no store: there is no log to replay.
    #[error("the bus has no store: there is no log to replay, so a group cannot be rebuilt")]
    NoStore,
    /// No subscription has this name.
    #[error("no consumer group {group:?}")]
    UnknownGroup {
        /// The group name.
        group: String,
    },
    /// The group deduplicates event ids ([`DeliveryMode::EffectivelyOnce`](crate::DeliveryMode)
    /// or a [`Dedup`](crate::middleware::Dedup) layer): a replay would skip every event it
    /// handled before as a duplicate. Rebuild such a projection under a new group name with
    /// [`StartFrom::Earliest`], or with [`Subscription::reset_to`](crate::Subscription::reset_to)
    /// at a restart.
    #[error("consumer group {group:?} deduplicates event ids (effectively-once or a Dedup layer): a replay would skip every event it handled before; rebuild it under a new group name")]
    Deduplicated {
        /// The group name.
        group: String,
    },
    /// A rebuild of this group has not caught up yet.
    #[error(
        "consumer group {group:?} is being rebuilt already; wait until that rebuild caught up"
    )]
    InProgress {
        /// The group name.
        group: String,
    },
    /// The handler factory panicked in some partitions: they kept their handler and their
    /// offset, so the projection is not rebuilt there (the panic is logged).
    #[error("consumer group {group:?}: the handler factory panicked in {partitions} partition(s), which were not rebuilt")]
    FactoryPanicked {
        /// The group name.
        group: String,
        /// How many partitions were not rebuilt.
        partitions: usize,
    },
    /// The bus is shutting down (before the rebuild started, or before it caught up: the rest
    /// of the replay happens after the next start, from the reset offset).
    #[error("the bus is shutting down")]
    Closed,
}

/// A rebuild in progress, from [`Bus::rebuild`]: wait until it has caught up.
///
/// Dropping it does not stop the rebuild.
#[derive(Clone)]
pub struct Rebuild {
    progress: Arc<Progress>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Rebuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebuild")
            .field("group", &self.progress.group)
            .field("caught_up", &self.is_caught_up())
            .finish()
    }
}

impl Rebuild {
    /// The consumer group being rebuilt.
    pub fn group(&self) -> &str {
        &self.progress.group
    }

    /// Whether every partition of the group has caught up (see
    /// [`caught_up`](Rebuild::caught_up)), without waiting.
    pub fn is_caught_up(&self) -> bool {
        self.progress.caught_up.is_cancelled()
            && self.progress.factory_panicked.load(Ordering::SeqCst) == 0
            && self.progress.abandoned.load(Ordering::SeqCst) == 0
    }

    /// Waits until the group has caught up: every partition's fresh handler has handled (or
    /// dead-lettered) every event its log held when that partition reset. Events published
    /// since are handled too, live, but not waited for.
    ///
    /// # Errors
    ///
    /// [`RebuildError::FactoryPanicked`] if some partitions could not get a fresh handler
    /// (once the others caught up); [`RebuildError::Closed`] if the bus began shutting down
    /// first.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits.
    pub async fn caught_up(&self) -> Result<(), RebuildError> {
        tokio::select! {
            biased;
            _ = self.progress.caught_up.cancelled() => {}
            _ = self.cancel.cancelled() => {}
        }
        if !self.progress.caught_up.is_cancelled()
            || self.progress.abandoned.load(Ordering::SeqCst) > 0
        {
            return Err(RebuildError::Closed);
        }
        match self.progress.factory_panicked.load(Ordering::SeqCst) {
            0 => Ok(()),
            partitions => Err(RebuildError::FactoryPanicked {
                group: self.progress.group.clone(),
                partitions,
            }),
        }
    }
}

impl Bus {
    /// With a store: rebuilds the projection of consumer group `group` on the running bus. Its
    /// handlers start afresh from their factory and replay the log from `from`, while the
    /// rest of the bus goes on. Returns once every partition of the group has reset; wait on
    /// the [`Rebuild`] until it has caught up.
    ///
    /// Each partition worker of the group, at its next event boundary:
    ///
    /// 1. stops: the event in hand (its retries and redeliveries included) finishes under the
    ///    old handler first; no handler is interrupted half-way;
    /// 2. drops its handler and makes a fresh one from the factory (the subscription's
    ///    middleware instances are kept);
    /// 3. resets the group's committed offset in the store to `from`
    ///    ([`Earliest`](StartFrom::Earliest), [`Offset`](StartFrom::Offset),
    ///    [`Timestamp`](StartFrom::Timestamp), or [`Latest`](StartFrom::Latest): nothing
    ///    replayed, only a fresh handler), at once: a crash from then on resumes the replay;
    /// 4. replays the log from there, as at start, then takes events live again.
    ///
    /// Events published meanwhile are neither lost nor handled out of order: a partition's
    /// events reach the fresh handler once each, in offset order (the events queued for the
    /// old handler and not yet handled are read from the log again instead). The
    /// group's dead letters stay in its queue, and the replay passes their events by: redrive
    /// them as before (one redriven before the replay reaches its offset is handled then, and
    /// again when the replay reaches it: at least once, never lost). Other groups are not
    /// affected, and the bus stays [ready](Bus::ready).
    ///
    /// The handler must start empty, or clear what it owns: the bus cannot undo what the old
    /// handler wrote elsewhere (a read model's table). The factory runs once per partition.
    ///
    /// Do not await it (or [`caught_up`](Rebuild::caught_up)) from a handler of the same
    /// group: it waits for that handler's own event to finish.
    ///
    /// # Errors
    ///
    /// - [`RebuildError::UnknownGroup`] if no subscription has that name;
    /// - [`RebuildError::NoStore`] without a store: there is no log to replay;
    /// - [`RebuildError::Deduplicated`] for a group that deduplicates event ids
    ///   (effectively-once, or a [`Dedup`](crate::middleware::Dedup) layer): a replay would
    ///   skip, as duplicates, every event it handled before;
    /// - [`RebuildError::InProgress`] while a rebuild of the group has not caught up: one
    ///   rebuild of a group at a time;
    /// - [`RebuildError::Closed`] once shutdown has begun.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    /// use tidings::store::{MemoryStore, StartFrom};
    /// use tidings::{Bus, Context, Envelope, Handler, HandlerError, Subscription};
    ///
    /// #[derive(serde::Serialize, serde::Deserialize, tidings::Event)]
    /// #[event(topic = "orders")]
    /// struct Placed;
    ///
    /// /// A projection: how many orders were placed.
    /// struct Count { seen: u64, total: Arc<AtomicU64> }
    /// impl Handler<Placed> for Count {
    ///     async fn handle(&mut self, _: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
    ///         self.seen += 1;
    ///         self.total.store(self.seen, Ordering::SeqCst);
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let total = Arc::new(AtomicU64::new(0));
    /// let shown = Arc::clone(&total);
    /// let bus = Bus::builder()
    ///     .store(MemoryStore::new())
    ///     .topic(tidings::TopicConfig::new("orders").partitions(1))
    ///     .subscribe::<Placed, _>(Subscription::new("totals"), move || Count {
    ///         seen: 0,
    ///         total: Arc::clone(&shown),
    ///     })
    ///     .build()?;
    /// for _ in 0..3 {
    ///     bus.publish(Placed).await.expect("published");
    /// }
    /// bus.settled().await;
    /// assert_eq!(total.load(Ordering::SeqCst), 3);
    ///
    /// // A fresh handler replays the log from offset 1.
    /// let rebuild = bus.rebuild("totals", StartFrom::Offset(1)).await?;
    /// rebuild.caught_up().await?;
    /// assert_eq!(total.load(Ordering::SeqCst), 2);
    /// # bus.shutdown().await; Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Once called, the rebuild is ordered: dropping the future before it returns does not
    /// stop it (the workers reset at their next event boundary), it only loses the handle.
    pub async fn rebuild(&self, group: &str, from: StartFrom) -> Result<Rebuild, RebuildError> {
        let inner = &*self.inner;
        let unknown = || RebuildError::UnknownGroup {
            group: group.to_owned(),
        };
        if !inner.dead_letters.contains_key(group) {
            return Err(unknown());
        }
        let Some(d) = inner.durable.as_ref() else {
            return Err(RebuildError::NoStore);
        };
        if !inner.is_open() || inner.cancel.is_cancelled() {
            return Err(RebuildError::Closed);
        }
        let progress = d
            .rebuilds
            .order(group, from)
            .map_err(|refused| match refused {
                Refused::Unknown => unknown(),
                Refused::Deduplicated => RebuildError::Deduplicated {
                    group: group.to_owned(),
                },
                Refused::InProgress => RebuildError::InProgress {
                    group: group.to_owned(),
                },
            })?;
        for topic in &inner.topics {
            let Some(slot) = topic.groups.iter().position(|g| g == group) else {
                continue;
            };
            for (p, part) in topic.partitions.iter().enumerate() {
                part.request_reset(slot, &topic.worker_stats[slot][p]);
            }
        }
        tracing::info!(group, ?from, "tidings: rebuilding a consumer group");
        let rebuild = Rebuild {
            progress,
            cancel: inner.cancel.clone(),
        };
        tokio::select! {
            biased;
            _ = rebuild.progress.applied.cancelled() => Ok(rebuild),
            _ = inner.cancel.cancelled() => Err(RebuildError::Closed),
        }
    }
}
