//! Shutting the bus down: when the last handle goes, or on [`Bus::shutdown`](crate::Bus::shutdown)
//! — stop intake, drain, close the queues, stop the tasks (and with a store the durable layer's,
//! with a last offset commit), report.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};

use super::{BusInner, ABORT_GRACE};
use crate::core::lock;
use crate::durable::Durable;
use crate::stats::ShutdownReport;

/// Closes the bus when the last user-held handle goes away. It holds the facade's state itself
/// (the workers hold only the core): the last handle may be dropped before its guard.
pub(crate) struct HandleGuard(pub(crate) Arc<BusInner>);

impl Drop for HandleGuard {
    fn drop(&mut self) {
        let inner = &self.0;
        if tokio::runtime::Handle::try_current().is_ok() {
            // A graceful shutdown in the background (or the one already running): queued
            // events and their follow-ups are handled, then the tasks stop.
            drop(BusInner::begin_shutdown(inner, None));
        } else {
            // No runtime to drain on: stop intake and let the workers finish what is queued.
            inner.intake_open.store(false, Ordering::SeqCst);
            inner.cancel.cancel();
            inner.close_queues();
        }
    }
}

impl BusInner {
    /// Starts the shutdown (once) in a task of its own and returns a future of its report.
    pub(super) fn begin_shutdown(
        this: &Arc<BusInner>,
        timeout: Option<Duration>,
    ) -> Shared<BoxFuture<'static, ShutdownReport>> {
        lock(&this.shutdown)
            .get_or_insert_with(|| {
                let inner = Arc::clone(this);
                let task = tokio::spawn(async move { inner.run_shutdown(timeout).await });
                async move { task.await.unwrap_or_default() }
                    .boxed()
                    .shared()
            })
            .clone()
    }

    async fn run_shutdown(&self, timeout: Option<Duration>) -> ShutdownReport {
        let started = tokio::time::Instant::now();
        self.intake_open.store(false, Ordering::SeqCst);
        // Barrier: a publisher that found intake open under a partition lock has counted its
        // event by the time this takes that lock, so the drain below waits for it.
        for topic in self.all_topics() {
            for part in topic.partitions.iter() {
                drop(part.lock());
            }
        }
        self.cancel.cancel();
        let mut drained = match timeout {
            None => {
                self.pending.settled().await;
                true
            }
            Some(t) => tokio::time::timeout(t, self.pending.settled())
                .await
                .is_ok(),
        };
        self.close_queues();
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        match timeout {
            None => {
                for task in tasks {
                    let _ = task.await;
                }
            }
            Some(t) => {
                // Past the deadline nothing is waited for long. An aborted task stops at its
                // next await; a handler blocking its thread cannot be stopped (a thread cannot
                // be preempted): it is left running, and its event is reported abandoned.
                if !drained {
                    for task in &tasks {
                        task.abort();
                    }
                }
                let left = t.saturating_sub(started.elapsed()).max(ABORT_GRACE);
                let joined =
                    tokio::time::timeout(left, futures::future::join_all(tasks.iter_mut())).await;
                if joined.is_err() {
                    drained = false;
                    let running = tasks.iter().filter(|task| !task.is_finished()).count();
                    for task in &tasks {
                        task.abort();
                    }
                    tracing::warn!(
                        running,
                        "tidings: shutdown timeout: workers still running were abandoned (a handler blocking its thread cannot be stopped)"
                    );
                }
            }
        }
        if let (Some(d), Some(engine)) = (&self.durable, self.engine()) {
            // Publishing is over: stop the appender and commit the groups' offsets (within what
            // is left of the timeout; a commit cut short means a group handles again what it
            // handled since the last periodic commit).
            d.stop.cancel();
            match timeout {
                None => Durable::stop(&engine).await,
                Some(t) => {
                    // At least a second for the last commit, even when the drain used it all.
                    let left = t
                        .saturating_sub(started.elapsed())
                        .max(Duration::from_secs(1));
                    if tokio::time::timeout(left, Durable::stop(&engine))
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            "tidings: shutdown timeout: the last offset commit was cut short"
                        );
                    }
                }
            }
        }
        let stats = self.stats();
        let mut report = ShutdownReport::default();
        let mut unfinished = 0;
        for topic in &stats.topics {
            for group in &topic.groups {
                report.handled += group.handled;
                report.failed += group.failed;
                report.dropped += group.dropped;
                report.panics += group.panics;
                // In memory: delivered, and neither handled, failed nor dropped (read in the
                // same snapshot as those counts, so that they add up exactly).
                unfinished += group.lag;
            }
        }
        // After a full drain nothing was abandoned (a request refused at this moment may be
        // counted for an instant, so do not read the counters). Otherwise, what was never
        // finished: events queued or in flight (in memory, counted per event above; with a
        // store, what is still counted pending: workers release their events one by one once
        // shutdown began, and a group still busy reading the log counts one), and requests not
        // answered.
        report.abandoned = if drained {
            0
        } else if self.durable.is_some() {
            self.pending.count() as u64
        } else {
            unfinished + self.pending.requests() as u64
        };
        tracing::info!(
            handled = report.handled,
            failed = report.failed,
            dropped = report.dropped,
            abandoned = report.abandoned,
            "tidings bus shut down"
        );
        report
    }
}
