//! Effectively-once with a store: the marks of handled events, committed in shared transactions.
//!
//! A group with [`DeliveryMode::EffectivelyOnce`](crate::DeliveryMode) marks each event it
//! handled in the store, with its offset, so that a copy published again (same id, a producer
//! retrying after a crash) is never handled twice, even after a restart. One transaction per
//! event made that cost a commit (an fsync) per event. Here the workers hand their marks to one
//! committer task, which writes everything waiting in one transaction
//! ([`Store::commit_marks`](crate::store::Marks::commit_marks)), as the appender does for publishes;
//! a worker goes on handling while its marks wait for the commit.
//!
//! What keeps the promise while a mark is not yet durable:
//!
//! - Its id stays in the group's pending set ([`PendingMarks`]) until its transaction
//!   committed; a worker checks that set before the store, so a copy that arrives meanwhile (in
//!   any partition of the group) is acknowledged as a duplicate, not handled.
//! - The group's offset is not committed past the event (the partition's
//!   `WorkerStats::unmarked` holds the periodic commit back), so an offset never becomes
//!   durable ahead of a mark: after a crash, the events whose marks were lost are read again
//!   and handled again (at-least-once for those), and any copy after them meets their marks.
//! - A worker waits for all its marks before it reports its events finished with nothing left
//!   queued (so `settled()` means marked), before a redriven event's dead-letter row goes, and
//!   before it stops.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::Engine;
use crate::core::queue::WorkerStats;
use crate::store::{GroupOffset, Store};

/// Most marks in one transaction.
const MAX_MARKS: usize = 8192;
/// Least time between the starts of two commits of marks (unless many wait).
const MIN_INTERVAL: Duration = Duration::from_millis(5);
/// Times the committer yields to let other workers' marks join a transaction.
const LINGER_YIELDS: u32 = 4;
/// Marks a worker keeps unsent while its previous ones are being committed; beyond it, it
/// waits for that commit.
pub(crate) const MAX_UNSENT: usize = 1024;

/// Ids a group handled whose marks are not durable yet, shared by the group's workers.
pub(crate) type PendingMarks = Arc<Mutex<HashSet<Uuid>>>;

/// Marks for the committer, and where to say whether they are durable.
pub(crate) struct MarkFlush {
    marks: Vec<(GroupOffset, Uuid)>,
    done: oneshot::Sender<bool>,
}

/// The committer's end and the groups' pending sets.
pub(crate) struct MarkCommits {
    tx: mpsc::UnboundedSender<MarkFlush>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<MarkFlush>>>,
    pending: Mutex<HashMap<String, PendingMarks>>,
}

impl MarkCommits {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        MarkCommits {
            tx,
            rx: Mutex::new(Some(rx)),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// The committer task (spawned once, with the appender).
    pub(crate) fn task(inner: Engine) -> impl std::future::Future<Output = ()> {
        let rx = inner.d.marks.rx.lock().take().expect("started once");
        run_mark_committer(inner, rx)
    }

    /// A worker's book of marks for one partition of `group`.
    pub(crate) fn book(&self, group: &str, topic: &str, partition: u32) -> MarkBook {
        let pending = Arc::clone(self.pending.lock().entry(group.to_owned()).or_default());
        MarkBook {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
            pending,
            unsent: Vec::new(),
            in_flight: None,
            lost: None,
            known: HashSet::new(),
            checked: HashSet::new(),
            tx: self.tx.clone(),
        }
    }
}

/// Marks sent to the committer, waiting for its answer.
struct InFlight {
    marks: Vec<(u64, Uuid)>,
    done: oneshot::Receiver<bool>,
}

/// One worker's marks: those not yet sent, those being committed, and what it knows of the
/// marks of the events it is about to handle.
pub(crate) struct MarkBook {
    group: String,
    topic: String,
    partition: u32,
    pending: PendingMarks,
    /// (offset, id) of events handled, not yet sent.
    unsent: Vec<(u64, Uuid)>,
    in_flight: Option<InFlight>,
    /// The lowest offset whose mark could not be committed (the bus was stopping): the offset
    /// is never committed past it by this bus.
    lost: Option<u64>,
    /// Of `checked`, the ids marked (durable or pending) when they were looked up.
    known: HashSet<Uuid>,
    /// Ids looked up ahead, in one query.
    checked: HashSet<Uuid>,
    tx: mpsc::UnboundedSender<MarkFlush>,
}

impl MarkBook {
    /// Looks up the marks of `ids` (the events about to be handled) in one query: the group's
    /// pending set first, then the store. On a store error the ids stay unchecked (each is
    /// then looked up alone).
    pub(crate) async fn look_ahead(&mut self, store: &dyn Store, ids: Vec<Uuid>) {
        self.known.clear();
        self.checked.clear();
        // Pending first: a mark that becomes durable after this look is in the store when the
        // store is read below; one read before it would miss a mark that moves meanwhile.
        {
            let pending = self.pending.lock();
            self.known
                .extend(ids.iter().filter(|id| pending.contains(id)).copied());
        }
        let rest: Vec<Uuid> = ids
            .iter()
            .filter(|id| !self.known.contains(id))
            .copied()
            .collect();
        if !rest.is_empty() {
            match store.marked(&self.group, &rest).await {
                Ok(found) => self.known.extend(found),
                Err(error) => {
                    tracing::warn!(group = %self.group, %error, "tidings: reading marks from the store failed; reading them one at a time");
                    return;
                }
            }
        }
        self.checked.extend(ids);
    }

    /// Whether `id` is marked, if that is known without the store: pending in the group, or
    /// found by the last look ahead.
    pub(crate) fn knows(&self, id: Uuid) -> Option<bool> {
        if self.pending.lock().contains(&id) {
            return Some(true);
        }
        if self.checked.contains(&id) {
            return Some(self.known.contains(&id));
        }
        None
    }

    /// Notes that the event `id` at `offset` was handled: its mark waits for the next commit,
    /// and the group's offset is held before it until then.
    pub(crate) fn note(&mut self, id: Uuid, offset: u64, stats: &WorkerStats) {
        self.pending.lock().insert(id);
        self.known.insert(id);
        self.unsent.push((offset, id));
        let held = stats.unmarked.load(Ordering::Relaxed);
        if held == 0 || offset + 1 < held {
            // Before the worker passes the offset (a release store): the periodic commit that
            // sees the new offset sees this hold.
            stats.unmarked.store(offset + 1, Ordering::Release);
        }
    }

    /// Moves the marks on: takes in a finished commit, sends what is unsent when nothing is
    /// being committed. With `wait`, returns only once every mark is committed (or could not
    /// be); without, waits only when too many are unsent.
    pub(crate) async fn sync(&mut self, wait: bool, stats: &WorkerStats) {
        loop {
            if let Some(flight) = self.in_flight.as_mut() {
                let must = wait || self.unsent.len() >= MAX_UNSENT;
                let answer = if must {
                    Some((&mut flight.done).await.unwrap_or(false))
                } else {
                    match flight.done.try_recv() {
                        Ok(durable) => Some(durable),
                        Err(oneshot::error::TryRecvError::Empty) => None,
                        Err(oneshot::error::TryRecvError::Closed) => Some(false),
                    }
                };
                match answer {
                    Some(durable) => {
                        let flight = self.in_flight.take().expect("in flight");
                        self.landed(&flight.marks, durable, stats);
                    }
                    None => return,
                }
            }
            if self.unsent.is_empty() {
                return;
            }
            self.send(stats);
            if !wait {
                return;
            }
        }
    }

    fn send(&mut self, stats: &WorkerStats) {
        let marks = std::mem::take(&mut self.unsent);
        let (done, answer) = oneshot::channel();
        let flush = MarkFlush {
            marks: marks
                .iter()
                .map(|&(offset, id)| {
                    (
                        GroupOffset {
                            group: self.group.clone(),
                            topic: self.topic.clone(),
                            partition: self.partition,
                            next_offset: offset + 1,
                        },
                        id,
                    )
                })
                .collect(),
            done,
        };
        if self.tx.send(flush).is_err() {
            // The committer is gone (the bus stopped): not durable.
            self.landed(&marks, false, stats);
            return;
        }
        self.in_flight = Some(InFlight {
            marks,
            done: answer,
        });
    }

    /// The committer's answer for `marks`.
    fn landed(&mut self, marks: &[(u64, Uuid)], durable: bool, stats: &WorkerStats) {
        if durable {
            // Durable now: copies find them in the store.
            let mut pending = self.pending.lock();
            for (_, id) in marks {
                pending.remove(id);
            }
        } else {
            // Never committed: the ids stay pending (copies are still caught by this bus) and
            // the offset stays held before them; after a restart they are handled again.
            tracing::error!(group = %self.group, topic = %self.topic, partition = self.partition, events = marks.len(), "tidings: marks could not be committed before the bus stopped; these events will be handled again after a restart");
            let lowest = marks.iter().map(|&(o, _)| o).min();
            self.lost = match (self.lost, lowest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let lowest = self
            .in_flight
            .iter()
            .flat_map(|f| f.marks.iter())
            .chain(self.unsent.iter())
            .map(|&(o, _)| o)
            .chain(self.lost)
            .min();
        stats
            .unmarked
            .store(lowest.map_or(0, |o| o + 1), Ordering::Release);
    }
}

async fn run_mark_committer(inner: Engine, mut rx: mpsc::UnboundedReceiver<MarkFlush>) {
    let d = &*inner.d;
    let mut batch: Vec<MarkFlush> = Vec::new();
    let mut last = tokio::time::Instant::now();
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = d.stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        let mut n = first.marks.len();
        batch.push(first);
        // Workers woken by the previous commit are sending their next marks right now: give
        // them a few turns of the scheduler so that they share this transaction; and commit
        // no more often than every MIN_INTERVAL (each commit is an fsync that appends wait
        // behind on SQLite), unless many marks wait.
        let until = last + MIN_INTERVAL;
        let mut lingers = 0;
        while n < MAX_MARKS {
            match rx.try_recv() {
                Ok(flush) => {
                    n += flush.marks.len();
                    batch.push(flush);
                }
                Err(_) if lingers < LINGER_YIELDS => {
                    lingers += 1;
                    tokio::task::yield_now().await;
                }
                Err(_) if tokio::time::Instant::now() >= until || n >= MAX_MARKS / 4 => break,
                Err(_) => {
                    let more = tokio::select! {
                        biased;
                        r = rx.recv() => r,
                        _ = tokio::time::sleep_until(until) => None,
                        _ = d.stop.cancelled() => None,
                    };
                    match more {
                        Some(flush) => {
                            n += flush.marks.len();
                            batch.push(flush);
                        }
                        None => break,
                    }
                }
            }
        }
        last = tokio::time::Instant::now();
        let durable = commit(&inner, &mut batch, true).await;
        for flush in batch.drain(..) {
            let _ = flush.done.send(durable);
        }
    }
    // Stopped (after the workers): one last attempt for what is still waiting.
    rx.close();
    while let Ok(flush) = rx.try_recv() {
        batch.push(flush);
    }
    if !batch.is_empty() {
        let durable = commit(&inner, &mut batch, false).await;
        for flush in batch.drain(..) {
            let _ = flush.done.send(durable);
        }
    }
}

/// Commits the marks of `batch` in one transaction; with `retry`, again after a failure until
/// the bus stops. Whether they are durable.
async fn commit(inner: &Engine, batch: &mut [MarkFlush], retry: bool) -> bool {
    let d = &*inner.d;
    let marks: Vec<(GroupOffset, Uuid)> = batch
        .iter_mut()
        .flat_map(|f| std::mem::take(&mut f.marks))
        .collect();
    let mut wait = Duration::from_millis(100);
    loop {
        match d.store.commit_marks(&marks).await {
            Ok(()) => return true,
            Err(error) => {
                if !retry {
                    tracing::error!(%error, marks = marks.len(), "tidings: committing effectively-once marks failed");
                    return false;
                }
                tracing::error!(%error, marks = marks.len(), "tidings: committing effectively-once marks failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = d.stop.cancelled() => return false,
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}
