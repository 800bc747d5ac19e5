//! The durable layer: a log behind the bus. It implements the core's
//! [`Append`](crate::core::append::Append) seam with a group-committing appender, and runs
//! what a store needs beside the workers: offset commits, effectively-once marks, retention.
//!
//! Files: [`append`] (the appender and its lanes), [`feed`] (reading the log to catch up, where
//! a group starts), [`heads`] (events appended by other writers), [`marks`] (effectively-once marks and their shared commits), [`offsets`]
//! (the committer), [`rebuild`] (a group reset on a running bus, and when workers caught up),
//! [`retention`]. The consuming side (a worker catching up from the log,
//! saving dead letters and marks) is in `runtime::durable`.

pub(crate) mod append;
pub(crate) mod consume;
pub(crate) mod feed;
pub(crate) mod heads;
pub(crate) mod marks;
pub(crate) mod offsets;
pub(crate) mod rebuild;
pub(crate) mod retention;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::core::append::{Append, AppendRequest};
use crate::core::Core;
use crate::store::{Decoder, Retention, Store};

use append::run_appender;
use offsets::{commit_offsets, run_committer};
use retention::run_retention;

/// Room in the appender's queue; publishers wait beyond it.
const APPEND_QUEUE: usize = 8192;
/// Rows read from the log per query when catching up.
pub(crate) const READ_PAGE: usize = 500;

/// What the durable layer's tasks reach: the core (topics, queues, what is pending) and the
/// durable state.
#[derive(Clone)]
pub(crate) struct Engine {
    pub(crate) core: Arc<Core>,
    pub(crate) d: Arc<Durable>,
}

pub(crate) struct Durable {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) decoder: Arc<Decoder>,
    pub(crate) max_payload: usize,
    appends: mpsc::Sender<AppendRequest>,
    receiver: Mutex<Option<mpsc::Receiver<AppendRequest>>>,
    /// Stops the appender, the committer and retention (after the drain).
    pub(crate) stop: CancellationToken,
    pub(crate) commit_interval: Duration,
    pub(crate) retention_interval: Duration,
    /// How often the heads are read when the store makes no announcements (`heads`).
    pub(crate) poll_interval: Duration,
    /// Retention by topic name.
    pub(crate) retention: HashMap<String, Retention>,
    /// Next offsets last committed, by (topic, group slot, partition).
    committed: Mutex<HashMap<(String, usize, u32), u64>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Workers that have not yet found where they start.
    starting: std::sync::atomic::AtomicUsize,
    /// Cancelled once every worker knows where it starts: appends wait for it, so that a group
    /// starting at the latest offset starts before this bus's first event.
    pub(crate) started: CancellationToken,
    /// Effectively-once: the marks' committer and the groups' pending marks.
    pub(crate) marks: marks::MarkCommits,
    /// Workers that have not yet handled what the log held when they started.
    catching_up: std::sync::atomic::AtomicUsize,
    /// Cancelled once every worker handled what the log held when it started: the bus is
    /// ready.
    pub(crate) caught_up: CancellationToken,
    /// Held by an offset commit, and by a rebuild while it moves a group's offset back.
    pub(crate) commits: tokio::sync::Mutex<()>,
    /// The groups that may be rebuilt, and the rebuilds' orders to their workers.
    pub(crate) rebuilds: rebuild::Rebuilds,
}

impl Durable {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Arc<dyn Store>,
        decoder: Arc<Decoder>,
        max_payload: usize,
        commit_interval: Duration,
        retention_interval: Duration,
        poll_interval: Duration,
        retention: HashMap<String, Retention>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(APPEND_QUEUE);
        Durable {
            store,
            decoder,
            max_payload,
            appends: tx,
            receiver: Mutex::new(Some(rx)),
            stop: CancellationToken::new(),
            commit_interval,
            retention_interval,
            poll_interval,
            retention,
            committed: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            starting: std::sync::atomic::AtomicUsize::new(0),
            started: CancellationToken::new(),
            marks: marks::MarkCommits::new(),
            catching_up: std::sync::atomic::AtomicUsize::new(0),
            caught_up: CancellationToken::new(),
            commits: tokio::sync::Mutex::new(()),
            rebuilds: rebuild::Rebuilds::default(),
        }
    }

    /// `n` workers will report where they start.
    pub(crate) fn expect_workers(&self, n: usize) {
        self.starting.store(n, Ordering::SeqCst);
        self.catching_up.store(n, Ordering::SeqCst);
        if n == 0 {
            self.started.cancel();
            self.caught_up.cancel();
        }
    }

    /// A worker found where it starts (or gave up starting).
    pub(crate) fn worker_started(&self) {
        if self.starting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.started.cancel();
        }
    }

    /// A rebuild moved a group's offset back to `next` in the store: the committer's record
    /// of what it committed follows (or it would not commit again until the group passes the
    /// old offset). Call with `commits` held.
    pub(crate) fn note_committed(&self, topic: &str, slot: usize, partition: u32, next: u64) {
        self.committed
            .lock()
            .insert((topic.to_owned(), slot, partition), next);
    }

    /// Starts the appender, the committer and (if a topic has a retention) the retention task.
    pub(crate) fn start(inner: &Engine, runtime: &tokio::runtime::Handle) {
        let d = &*inner.d;
        let rx = d.receiver.lock().take().expect("started once");
        let mut tasks = d.tasks.lock();
        tasks.push(runtime.spawn(run_appender(inner.clone(), rx)));
        tasks.push(runtime.spawn(run_committer(inner.clone())));
        tasks.push(runtime.spawn(marks::MarkCommits::task(inner.clone())));
        tasks.push(runtime.spawn(heads::run_head_watch(inner.clone())));
        if d.retention.values().any(|r| *r != Retention::KeepAll) {
            tasks.push(runtime.spawn(run_retention(inner.clone())));
        }
    }

    /// After the drain: stops the background tasks and commits the groups' offsets one last
    /// time.
    pub(crate) async fn stop(inner: &Engine) {
        let d = &*inner.d;
        d.stop.cancel();
        let tasks = std::mem::take(&mut *d.tasks.lock());
        for task in tasks {
            let _ = task.await;
        }
        if let Err(error) = commit_offsets(inner).await {
            tracing::error!(%error, "tidings: the last offset commit failed; the groups will handle again what they handled since the previous one");
        }
    }
}

impl Append for Durable {
    fn max_payload(&self) -> usize {
        self.max_payload
    }

    fn submit(&self, request: AppendRequest) -> BoxFuture<'_, Result<(), AppendRequest>> {
        Box::pin(async move {
            self.appends
                .send(request)
                .await
                .map_err(|refused| refused.0)
        })
    }
}
