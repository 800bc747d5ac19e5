//! The appender: publishes of concurrent publishers appended in one transaction (group
//! commit), then offered to the groups' queues; partitions held by another transaction wait in
//! lanes of their own, so one slow partition stalls only its own publishes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::core::append::{AppendError, AppendRequest};
use crate::core::queue::Topic;
use crate::envelope::Metadata;
use crate::publish::Published;
use crate::store::{StoreError, StoredEvent, TryAppend};

/// Most events in one append transaction (the measured sweet spot of SQLite and PostgreSQL).
const MAX_BATCH: usize = 1000;
/// Most payload bytes in one append transaction (a batch of large events stays well below the
/// databases' statement limits).
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Times the appender yields to let concurrent publishers join a transaction.
const LINGER_YIELDS: u32 = 4;

pub(crate) async fn run_appender(inner: Engine, mut rx: mpsc::Receiver<AppendRequest>) {
    let d = &*inner.d;
    let mut batch: Vec<AppendRequest> = Vec::new();
    // Partitions held by another transaction, and the lanes their publishes wait in.
    let mut lanes: HashMap<PartKey, Arc<Lane>> = HashMap::new();
    // A topic configured with fewer partitions than its log has would strand the events of the
    // others: refuse to publish at all, loudly.
    let mut refused: Option<StoreError> = None;
    let mut wait = Duration::from_millis(100);
    loop {
        match check_partitions(&inner).await {
            Ok(found) => {
                refused = found;
                break;
            }
            Err(error) => {
                tracing::error!(%error, "tidings: reading the topics' partitions from the store failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = d.stop.cancelled() => break,
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    if let Some(error) = &refused {
        tracing::error!(%error, "tidings: this bus publishes nothing");
    }
    tokio::select! {
        _ = d.started.cancelled() => {}
        _ = d.stop.cancelled() => {}
    }
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = d.stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        // Group commit: everything waiting goes into one transaction, up to MAX_BATCH events
        // (a single publish_all call may be larger; it stays whole).
        let size = |a: &AppendRequest| a.rows.iter().map(|r| r.payload.len()).sum::<usize>();
        let mut n = first.rows.len();
        let mut bytes = size(&first);
        batch.push(first);
        // Publishers woken by the previous commit are sending their next events right now: give
        // them a few turns of the scheduler (no timer) so that they share this transaction.
        let mut lingers = 0;
        while n < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(a) => {
                    n += a.rows.len();
                    bytes += size(&a);
                    batch.push(a);
                }
                Err(_) if lingers < LINGER_YIELDS => {
                    lingers += 1;
                    tokio::task::yield_now().await;
                }
                Err(_) => break,
            }
        }
        if let Some(error) = &refused {
            fail(
                std::mem::take(&mut batch),
                &AppendError::Store(error.clone()),
            );
            continue;
        }
        // Publishes touching a partition that a lane still holds go after the lane's.
        lanes.retain(|_, lane| !lane.state.lock().closed);
        if !lanes.is_empty() {
            to_lanes(&inner, &mut lanes, &mut batch, &[]);
        }
        // Group commit of the rest. A partition that another transaction holds is not waited
        // for: the publishes touching it move to a lane, and the others are appended again.
        while !batch.is_empty() {
            // Before the rows move out of their publishes.
            let parts = touched(&batch);
            let mut rows = Vec::with_capacity(n);
            for a in &mut batch {
                rows.append(&mut a.rows);
            }
            let appended = d.store.try_append(&mut rows).await;
            match appended {
                Ok(TryAppend::Appended) => complete(&inner, std::mem::take(&mut batch), rows),
                Ok(TryAppend::Busy(busy)) => {
                    // Nothing was appended: the rows go back to their publishes.
                    for a in batch.iter_mut().rev() {
                        a.rows = rows.split_off(rows.len() - a.events.len());
                    }
                    tracing::debug!(?busy, "tidings: partitions held by another transaction: their publishes wait in a lane");
                    let before = batch.len();
                    to_lanes(&inner, &mut lanes, &mut batch, &busy);
                    if batch.len() == before {
                        // Busy partitions that no publish touches (a store breaking the
                        // contract): wait in lanes rather than ask again and again.
                        for a in std::mem::take(&mut batch) {
                            enqueue(&inner, &mut lanes, a);
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(%error, events = rows.len(), "tidings: appending to the store failed");
                    fail(std::mem::take(&mut batch), &AppendError::Store(error));
                }
            }
            parts.end(&inner);
        }
    }
    // Stopped: what is still queued was never appended; give it back.
    rx.close();
    while let Some(a) = rx.recv().await {
        fail(vec![a], &AppendError::Closed);
    }
    // Lanes give back what they have not begun to append, and finish the append under way.
    let lanes: Vec<Arc<Lane>> = lanes.into_values().collect();
    for lane in lanes {
        lane.done.cancelled().await;
    }
}

/// A partition, as the appender routes publishes: (topic, partition).
type PartKey = (&'static str, u32);

/// Publishes waiting for partitions that another transaction holds, appended by a task of
/// their own (so that they stall no other partition), in the order they came.
struct Lane {
    state: Mutex<LaneState>,
    /// Cancelled once the lane has appended and handed on everything it took.
    done: CancellationToken,
}

struct LaneState {
    queue: VecDeque<AppendRequest>,
    /// Empty and finished: takes nothing more (set with its last delivery done).
    closed: bool,
}

/// The partitions an append touches, each once.
fn parts_of(a: &AppendRequest) -> Vec<PartKey> {
    let mut parts: Vec<PartKey> = a.rows.iter().map(|r| (a.topic_name, r.partition)).collect();
    parts.sort_unstable();
    parts.dedup();
    parts
}

/// Moves the publishes of `batch` that touch a `busy` partition, or one a lane holds, to lanes,
/// until none left in `batch` touches a partition a lane holds (a publish moved makes its other
/// partitions the lane's too).
fn to_lanes(
    inner: &Engine,
    lanes: &mut HashMap<PartKey, Arc<Lane>>,
    batch: &mut Vec<AppendRequest>,
    busy: &[(String, u32)],
) {
    loop {
        let mut moved = false;
        let mut i = 0;
        while i < batch.len() {
            let a = &batch[i];
            let held = a.rows.iter().any(|r| {
                lanes.contains_key(&(a.topic_name, r.partition))
                    || busy
                        .iter()
                        .any(|(t, p)| *p == r.partition && t == a.topic_name)
            });
            if held {
                let a = batch.remove(i);
                enqueue(inner, lanes, a);
                moved = true;
            } else {
                i += 1;
            }
        }
        if !moved {
            return;
        }
    }
}

/// Puts `a` in a lane: the one holding its partitions, or a new one that starts once the
/// lanes holding any of them have finished. Its partitions are that lane's until it drains.
fn enqueue(inner: &Engine, lanes: &mut HashMap<PartKey, Arc<Lane>>, a: AppendRequest) {
    let parts = parts_of(&a);
    let mut holding: Vec<Arc<Lane>> = Vec::new();
    for p in &parts {
        if let Some(lane) = lanes.get(p) {
            if !holding.iter().any(|l| Arc::ptr_eq(l, lane)) {
                holding.push(Arc::clone(lane));
            }
        }
    }
    let mut a = Some(a);
    if let [lane] = holding.as_slice() {
        let mut state = lane.state.lock();
        if !state.closed {
            state.queue.push_back(a.take().expect("not yet queued"));
        }
    }
    let lane = match a {
        None => Arc::clone(&holding[0]),
        Some(a) => {
            let lane = Arc::new(Lane {
                state: Mutex::new(LaneState {
                    queue: VecDeque::from([a]),
                    closed: false,
                }),
                done: CancellationToken::new(),
            });
            let after: Vec<CancellationToken> = holding.iter().map(|l| l.done.clone()).collect();
            tokio::spawn(run_lane(inner.clone(), Arc::clone(&lane), after));
            // The lanes it comes after take nothing more: their partitions are this lane's
            // too, so they drain and finish (a lane that kept taking publishes to its other
            // partitions could hold this one back for as long as they keep coming).
            for held in lanes.values_mut() {
                if holding.iter().any(|l| Arc::ptr_eq(l, held)) {
                    *held = Arc::clone(&lane);
                }
            }
            lane
        }
    };
    for p in parts {
        lanes.insert(p, Arc::clone(&lane));
    }
}

/// A lane's task: once the lanes it comes after have finished, appends what it holds (waiting
/// for the held partitions), everything waiting in one transaction, until it is empty.
async fn run_lane(inner: Engine, lane: Arc<Lane>, after: Vec<CancellationToken>) {
    let d = &*inner.d;
    let _finish = Finish(Arc::clone(&lane));
    for done in after {
        done.cancelled().await;
    }
    loop {
        let mut batch: Vec<AppendRequest> = {
            let mut state = lane.state.lock();
            if state.queue.is_empty() {
                state.closed = true;
                break;
            }
            let mut n = 0;
            let mut bytes = 0;
            let mut batch = Vec::new();
            while let Some(a) = state.queue.front() {
                if !batch.is_empty() && (n >= MAX_BATCH || bytes >= MAX_BATCH_BYTES) {
                    break;
                }
                n += a.rows.len();
                bytes += a.rows.iter().map(|r| r.payload.len()).sum::<usize>();
                batch.push(state.queue.pop_front().expect("a front"));
            }
            batch
        };
        if d.stop.is_cancelled() {
            fail(batch, &AppendError::Closed);
            continue;
        }
        let parts = touched(&batch);
        let mut rows: Vec<StoredEvent> = Vec::new();
        for a in &mut batch {
            rows.append(&mut a.rows);
        }
        match d.store.append(&mut rows).await {
            Ok(()) => complete(&inner, batch, rows),
            Err(error) => {
                tracing::error!(%error, events = rows.len(), "tidings: appending to the store failed");
                fail(std::mem::take(&mut batch), &AppendError::Store(error));
            }
        }
        parts.end(&inner);
    }
}

/// Marks its lane done when its task ends; if the task ended early (a panic), what the lane
/// still holds goes back to its publishers, and the lane takes nothing more.
struct Finish(Arc<Lane>);

impl Drop for Finish {
    fn drop(&mut self) {
        let left = {
            let mut state = self.0.state.lock();
            state.closed = true;
            std::mem::take(&mut state.queue)
        };
        fail(left.into(), &AppendError::Closed);
        self.0.done.cancel();
    }
}

/// The partitions an append of the appender touches, each once, with the append begun on
/// them ([`Partition::begin_append`](crate::core::queue::Partition::begin_append)): announced
/// heads wait until its events are offered.
struct Touched(Vec<(Arc<Topic>, u32)>);

fn touched(batch: &[AppendRequest]) -> Touched {
    let mut parts: Vec<(Arc<Topic>, u32)> = Vec::new();
    for a in batch {
        for r in &a.rows {
            let seen = |(t, p): &(Arc<Topic>, u32)| *p == r.partition && Arc::ptr_eq(t, &a.topic);
            if !parts.last().is_some_and(seen) && !parts.iter().any(seen) {
                parts.push((Arc::clone(&a.topic), r.partition));
            }
        }
    }
    for (topic, partition) in &parts {
        topic.partitions[*partition as usize].begin_append();
    }
    Touched(parts)
}

impl Touched {
    /// The append is done: its events were offered, or it failed.
    fn end(self, inner: &Engine) {
        for (topic, partition) in &self.0 {
            inner.core.end_append(topic, *partition);
        }
    }
}

/// The publishes of `batch` are committed (`rows` in their order, with their offsets): hands
/// each event to the groups and its receipt to its publisher.
fn complete(inner: &Engine, batch: Vec<AppendRequest>, rows: Vec<StoredEvent>) {
    let mut rows = rows.into_iter();
    for a in batch {
        a.topic.metrics.sent(a.events.len() as u64);
        if a.slots.is_empty() {
            // In the log, but no group of this bus takes the type: counted (the warning was
            // logged with the route).
            a.topic
                .unrouted
                .fetch_add(a.events.len() as u64, Ordering::Relaxed);
        }
        let mut receipts = Vec::with_capacity(a.events.len());
        for event in a.events {
            let row = rows.next().expect("one row per event");
            let published = Published {
                id: row.id,
                partition: row.partition,
                offset: row.offset,
                duplicate: false,
            };
            let meta = Metadata {
                id: row.id,
                topic: a.topic_name,
                partition: row.partition,
                offset: row.offset,
                timestamp: row.timestamp,
                correlation_id: row.correlation_id,
                causation_id: row.causation_id,
                headers: row.headers,
            };
            let item = event.into_erased(meta);
            inner.core.offer_committed(&a.topic, &a.slots, &item);
            if let Some(recorder) = &inner.core.recorder {
                crate::core::lock(&recorder.published).push(crate::AnyEnvelope {
                    inner: item,
                    attempt: 1,
                });
            }
            receipts.push(published);
        }
        if let (Some(window), Some(key)) = (&inner.core.publish_dedup, a.dedup_key) {
            window.lock().complete_with(key, receipts[0]);
        }
        let _ = a.reply.send(Ok(receipts));
    }
}

/// The publishes of `batch` were not appended: their events go back with `error`.
fn fail(batch: Vec<AppendRequest>, error: &AppendError) {
    for a in batch {
        let events = a.events.into_iter().map(|e| e.into_any()).collect();
        let error = match error {
            AppendError::Store(e) => AppendError::Store(e.clone()),
            AppendError::Closed => AppendError::Closed,
        };
        let _ = a.reply.send(Err((error, events)));
    }
}

/// A configuration error if a topic has fewer partitions than its log.
async fn check_partitions(inner: &Engine) -> Result<Option<StoreError>, StoreError> {
    let d = &*inner.d;
    for topic in &inner.core.topics {
        let stored = d.store.partitions(&topic.name).await?;
        let configured = topic.partitions.len() as u32;
        if stored > configured {
            return Ok(Some(StoreError::Config(format!(
                "topic {:?} has events in {stored} partitions in the store but is configured with {configured}: the events of the others would never be read; configure {stored} partitions (a durable topic's partition count must not shrink)",
                topic.name
            ))));
        }
        if stored != 0 && stored < configured {
            tracing::warn!(topic = %topic.name, stored, configured, "tidings: the topic has more partitions than before: keys now map to other partitions, so a key's old and new events are not ordered with each other");
        }
    }
    Ok(None)
}
