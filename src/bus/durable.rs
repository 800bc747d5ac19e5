//! The bus with a store: group-committed appends, feeding the groups after the commit, catching
//! up from the log, committing offsets, retention.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{BusInner, Published};
use crate::envelope::{Erased, Inner, Metadata};
use crate::event::Event;
use crate::store::{
    Decoded, Decoder, GroupOffset, Retention, StartFrom, Store, StoreError, StoredEvent, TryAppend,
};
use crate::topic::{Partition, Topic};

/// Most events in one append transaction (the measured sweet spot of SQLite and PostgreSQL).
const MAX_BATCH: usize = 1000;
/// Most payload bytes in one append transaction (a batch of large events stays well below the
/// databases' statement limits).
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Times the appender yields to let concurrent publishers join a transaction.
const LINGER_YIELDS: u32 = 4;
/// Room in the appender's queue; publishers wait beyond it.
const APPEND_QUEUE: usize = 8192;
/// Rows read from the log per query when catching up.
pub(crate) const READ_PAGE: usize = 500;

pub(crate) struct Durable {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) decoder: Decoder,
    pub(crate) max_payload: usize,
    appends: mpsc::Sender<Append>,
    receiver: Mutex<Option<mpsc::Receiver<Append>>>,
    /// Stops the appender, the committer and retention (after the drain).
    pub(crate) stop: CancellationToken,
    pub(crate) commit_interval: Duration,
    pub(crate) retention_interval: Duration,
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
    pub(crate) marks: super::marks::MarkCommits,
}

/// Events of one publish call waiting for their append: the rows, the events themselves (to hand
/// to the groups once committed, or back to the publisher) and where to send the receipts. They
/// are appended in one transaction.
pub(crate) struct Append {
    rows: Vec<StoredEvent>,
    events: Vec<Box<dyn PendingEvent>>,
    topic_name: &'static str,
    topic: Arc<Topic>,
    slots: Box<[usize]>,
    dedup_key: Option<(&'static str, uuid::Uuid)>,
    reply: oneshot::Sender<AppendResult>,
}

/// The receipts, or why not and the events back.
type AppendResult = Result<Vec<Published>, (AppendError, Vec<Box<dyn Any + Send>>)>;

pub(crate) enum AppendError {
    Store(StoreError),
    Closed,
}

/// A producer-side dedup claim, given up when dropped (a failed or cancelled publish) unless the
/// appender completed it.
struct ClaimGuard<'a> {
    window: &'a parking_lot::Mutex<crate::window::Window<Published, (&'static str, uuid::Uuid)>>,
    key: (&'static str, uuid::Uuid),
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        // A no-op once the appender completed it.
        self.window.lock().release(self.key);
    }
}

/// An event about to be appended, with its place.
pub(crate) struct Prepared<E> {
    pub(crate) event: E,
    pub(crate) partition: u32,
    pub(crate) id: uuid::Uuid,
    pub(crate) timestamp: SystemTime,
}

/// A typed event in a box, before it has an offset.
pub(crate) trait PendingEvent: Send {
    fn into_erased(self: Box<Self>, meta: Metadata) -> Erased;
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

struct Pending<E>(E);

impl<E: Event> PendingEvent for Pending<E> {
    fn into_erased(self: Box<Self>, meta: Metadata) -> Erased {
        Arc::new(Inner {
            meta,
            event: self.0,
        })
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        Box::new(self.0)
    }
}

impl Durable {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Arc<dyn Store>,
        decoder: Decoder,
        max_payload: usize,
        commit_interval: Duration,
        retention_interval: Duration,
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
            retention,
            committed: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            starting: std::sync::atomic::AtomicUsize::new(0),
            started: CancellationToken::new(),
            marks: super::marks::MarkCommits::new(),
        }
    }

    /// `n` workers will report where they start.
    pub(crate) fn expect_workers(&self, n: usize) {
        self.starting.store(n, Ordering::SeqCst);
        if n == 0 {
            self.started.cancel();
        }
    }

    /// A worker found where it starts (or gave up starting).
    pub(crate) fn worker_started(&self) {
        if self.starting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.started.cancel();
        }
    }

    /// Starts the appender, the committer and (if a topic has a retention) the retention task.
    pub(crate) fn start(inner: &Arc<BusInner>, runtime: &tokio::runtime::Handle) {
        let d = inner.durable.as_ref().expect("a durable bus");
        let rx = d.receiver.lock().take().expect("started once");
        let mut tasks = d.tasks.lock();
        tasks.push(runtime.spawn(run_appender(Arc::clone(inner), rx)));
        tasks.push(runtime.spawn(run_committer(Arc::clone(inner))));
        tasks.push(runtime.spawn(super::marks::MarkCommits::task(Arc::clone(inner))));
        if d.retention.values().any(|r| *r != Retention::KeepAll) {
            tasks.push(runtime.spawn(run_retention(Arc::clone(inner))));
        }
    }

    /// After the drain: stops the background tasks and commits the groups' offsets one last
    /// time.
    pub(crate) async fn stop(inner: &BusInner) {
        let d = inner.durable.as_ref().expect("a durable bus");
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

impl BusInner {
    /// Publishes durably: the event is appended (group-committed with concurrent publishers),
    /// then handed to the groups, then the receipt returns.
    pub(crate) async fn publish_durable<E: Event>(
        &self,
        event: E,
        route: (Arc<Topic>, Box<[usize]>),
        partition: u32,
        id: uuid::Uuid,
        timestamp: SystemTime,
        origin: &mut super::Origin,
    ) -> Result<Published, crate::PublishError<E>> {
        // Producer-side deduplication: a repeat within the window publishes nothing. The id is
        // claimed before the append, so that concurrent repeats wait for the first one's
        // receipt instead of appending it twice.
        let mut claim = None;
        if let (Some(window), Some(_)) = (&self.publish_dedup, origin.id) {
            let key = (E::TOPIC, id);
            loop {
                {
                    let mut w = window.lock();
                    if let Some(first) = w.get(key) {
                        return Ok(Published {
                            duplicate: true,
                            ..first
                        });
                    }
                    if w.claim(key) == crate::window::Claim::New {
                        break;
                    }
                }
                // Another publish of this id is being appended: wait for its receipt.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            claim = Some(ClaimGuard { window, key });
        }
        let prepared = vec![Prepared {
            event,
            partition,
            id,
            timestamp,
        }];
        let dedup_key = claim.as_ref().map(|c| c.key);
        let result = self
            .append_durable(prepared, route, origin, dedup_key)
            .await;
        // Appended: the appender recorded the receipt; otherwise the guard gives the id up.
        drop(claim);
        match result {
            Ok(mut receipts) => Ok(receipts.remove(0)),
            Err(e) => Err(e.map(|mut events| events.remove(0))),
        }
    }

    /// Appends `items` in one transaction and hands them to the groups; the receipts in order.
    pub(crate) async fn append_durable<E: Event>(
        &self,
        items: Vec<Prepared<E>>,
        route: (Arc<Topic>, Box<[usize]>),
        origin: &mut super::Origin,
        dedup_key: Option<(&'static str, uuid::Uuid)>,
    ) -> Result<Vec<Published>, crate::PublishError<Vec<E>>> {
        let d = self.durable.as_ref().expect("a durable bus");
        let mut rows = Vec::with_capacity(items.len());
        let mut failed = None;
        for item in &items {
            match crate::store::encode(&item.event, d.max_payload) {
                Ok(payload) => rows.push(StoredEvent {
                    topic: E::TOPIC.to_owned(),
                    partition: item.partition,
                    offset: 0,
                    id: item.id,
                    name: E::NAME.to_owned(),
                    version: E::VERSION,
                    timestamp: item.timestamp,
                    correlation_id: origin.cause.map_or(item.id, |c| c.correlation),
                    causation_id: origin.cause.map(|c| c.id),
                    headers: origin.headers.clone(),
                    payload,
                }),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let events: Vec<E> = items.into_iter().map(|i| i.event).collect();
        match failed {
            None => {}
            Some(crate::store::EncodeError::TooLarge { size }) => {
                return Err(crate::PublishError::TooLarge {
                    event: events,
                    size,
                    limit: d.max_payload,
                })
            }
            Some(crate::store::EncodeError::Serialize(message)) => {
                return Err(crate::PublishError::Serialize {
                    event: events,
                    message,
                })
            }
        }
        let (tx, rx) = oneshot::channel();
        let append = Append {
            rows,
            events: events
                .into_iter()
                .map(|e| Box::new(Pending(e)) as Box<dyn PendingEvent>)
                .collect(),
            topic_name: E::TOPIC,
            topic: route.0,
            slots: route.1,
            dedup_key,
            reply: tx,
        };
        let back = |events: Vec<Box<dyn Any + Send>>| -> Vec<E> {
            events
                .into_iter()
                .map(|e| *e.downcast::<E>().expect("its type"))
                .collect()
        };
        if let Err(refused) = d.appends.send(append).await {
            let events = refused.0.events.into_iter().map(|e| e.into_any()).collect();
            return Err(crate::PublishError::Closed(back(events)));
        }
        match rx.await {
            Ok(Ok(receipts)) => Ok(receipts),
            Ok(Err((error, events))) => {
                let event = back(events);
                Err(match error {
                    AppendError::Store(error) => crate::PublishError::Store { event, error },
                    AppendError::Closed => crate::PublishError::Closed(event),
                })
            }
            // The appender never drops a request unanswered; reaching this is a bug.
            Err(_) => panic!("tidings: the appender dropped a publish"),
        }
    }

    /// Hands a committed event to the groups of its route: into each group's queue, unless
    /// that group is catching up from the log or its queue is full (then it will read the event
    /// from the log).
    fn deliver_committed(&self, topic: &Topic, slots: &[usize], item: &Erased) {
        let meta = item.meta();
        let part: &Partition = &topic.partitions[meta.partition as usize];
        let mut state = part.lock();
        if state.next_offset <= meta.offset {
            state.next_offset = meta.offset + 1;
        }
        if state.closed {
            // Committed as the bus stopped (its workers are gone): the groups read it from the
            // log when the bus starts again.
            return;
        }
        let mut pushed = 0;
        let mut markers = 0;
        for slot in 0..state.queues.len() {
            let q = &mut state.queues[slot];
            if q.lagging {
                continue;
            }
            if q.live_next != meta.offset {
                // Events this bus did not append came first: read them, and this one, from
                // the log.
                q.lagging = true;
                q.marker = true;
                markers += 1;
                part.wake(&mut state, slot);
                continue;
            }
            q.live_next = meta.offset + 1;
            if !slots.contains(&slot) {
                // Not for this group: its worker passes the offset by.
                q.skipped_to = meta.offset + 1;
                continue;
            }
            if q.items.len() >= topic.capacity {
                // The group reads this one and what follows from the log, then joins again.
                q.lagging = true;
                q.marker = true;
                markers += 1;
                part.wake(&mut state, slot);
                continue;
            }
            q.items.push_back(Arc::clone(item));
            q.delivered += 1;
            pushed += 1;
            part.wake(&mut state, slot);
        }
        if pushed + markers > 0 {
            self.pending.fetch_add(pushed + markers, Ordering::SeqCst);
        }
    }
}

async fn run_appender(inner: Arc<BusInner>, mut rx: mpsc::Receiver<Append>) {
    let d = inner.durable.as_ref().expect("a durable bus");
    let mut batch: Vec<Append> = Vec::new();
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
        let size = |a: &Append| a.rows.iter().map(|r| r.payload.len()).sum::<usize>();
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
            let mut rows = Vec::with_capacity(n);
            for a in &mut batch {
                rows.append(&mut a.rows);
            }
            match d.store.try_append(&mut rows).await {
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
    queue: VecDeque<Append>,
    /// Empty and finished: takes nothing more (set with its last delivery done).
    closed: bool,
}

/// The partitions an append touches, each once.
fn parts_of(a: &Append) -> Vec<PartKey> {
    let mut parts: Vec<PartKey> = a.rows.iter().map(|r| (a.topic_name, r.partition)).collect();
    parts.sort_unstable();
    parts.dedup();
    parts
}

/// Moves the publishes of `batch` that touch a `busy` partition, or one a lane holds, to lanes,
/// until none left in `batch` touches a partition a lane holds (a publish moved makes its other
/// partitions the lane's too).
fn to_lanes(
    inner: &Arc<BusInner>,
    lanes: &mut HashMap<PartKey, Arc<Lane>>,
    batch: &mut Vec<Append>,
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
fn enqueue(inner: &Arc<BusInner>, lanes: &mut HashMap<PartKey, Arc<Lane>>, a: Append) {
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
            tokio::spawn(run_lane(Arc::clone(inner), Arc::clone(&lane), after));
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
async fn run_lane(inner: Arc<BusInner>, lane: Arc<Lane>, after: Vec<CancellationToken>) {
    let d = inner.durable.as_ref().expect("a durable bus");
    let _finish = Finish(Arc::clone(&lane));
    for done in after {
        done.cancelled().await;
    }
    loop {
        let mut batch: Vec<Append> = {
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

/// The publishes of `batch` are committed (`rows` in their order, with their offsets): hands
/// each event to the groups and its receipt to its publisher.
fn complete(inner: &BusInner, batch: Vec<Append>, rows: Vec<StoredEvent>) {
    let mut rows = rows.into_iter();
    for a in batch {
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
            inner.deliver_committed(&a.topic, &a.slots, &item);
            if let Some(recorder) = &inner.recorder {
                super::lock(&recorder.published).push(crate::AnyEnvelope {
                    inner: item,
                    attempt: 1,
                });
            }
            receipts.push(published);
        }
        if let (Some(window), Some(key)) = (&inner.publish_dedup, a.dedup_key) {
            window.lock().complete_with(key, receipts[0]);
        }
        let _ = a.reply.send(Ok(receipts));
    }
}

/// The publishes of `batch` were not appended: their events go back with `error`.
fn fail(batch: Vec<Append>, error: &AppendError) {
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
async fn check_partitions(inner: &BusInner) -> Result<Option<StoreError>, StoreError> {
    let d = inner.durable.as_ref().expect("a durable bus");
    for topic in &inner.topics {
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

async fn run_committer(inner: Arc<BusInner>) {
    let d = inner.durable.as_ref().expect("a durable bus");
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
pub(crate) async fn commit_offsets(inner: &BusInner) -> Result<(), StoreError> {
    let d = inner.durable.as_ref().expect("a durable bus");
    let mut offsets = Vec::new();
    {
        let committed = d.committed.lock();
        for topic in &inner.topics {
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
        let slot = inner.topics[inner.topic_index[&o.topic]]
            .groups
            .iter()
            .position(|g| *g == o.group)
            .expect("a group of the topic");
        let c = committed.entry((o.topic, slot, o.partition)).or_insert(0);
        *c = (*c).max(o.next_offset);
    }
    Ok(())
}

async fn run_retention(inner: Arc<BusInner>) {
    let d = inner.durable.as_ref().expect("a durable bus");
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
pub(crate) async fn apply_retention(inner: &BusInner) -> Result<u64, StoreError> {
    let d = inner.durable.as_ref().expect("a durable bus");
    let mut deleted = 0;
    for topic in &inner.topics {
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

/// A worker's view of its partition with a store: which offset it handles next, and catching up
/// from the log.
pub(crate) struct Feed {
    pub(crate) store: Arc<dyn Store>,
    /// Reading stops here: the head when the catch-up began.
    pub(crate) until: u64,
    /// Rows read and not yet handed out.
    pub(crate) rows: VecDeque<StoredEvent>,
}

/// Where a worker starts: its committed offset, or `start` without one (or when `reset`).
pub(crate) async fn start_offset(
    store: &dyn Store,
    group: &str,
    topic: &str,
    partition: u32,
    start: StartFrom,
    reset: bool,
) -> Result<(u64, u64), StoreError> {
    let head = store.head(topic, partition).await?;
    let committed = if reset {
        None
    } else {
        store.committed(group, topic, partition).await?
    };
    let from = match committed {
        Some(c) => c,
        None => match start {
            StartFrom::Earliest => 0,
            StartFrom::Latest => head,
            StartFrom::Offset(o) => o.min(head),
            StartFrom::Timestamp(t) => store.offset_at(topic, partition, t).await?,
        },
    };
    if committed.is_none() {
        // Remember the start at once: a crash before the first commit must not move a group
        // that started at "latest" past events published meanwhile (and a reset sticks).
        store
            .reset_offset(&GroupOffset {
                group: group.to_owned(),
                topic: topic.to_owned(),
                partition,
                next_offset: from,
            })
            .await?;
    }
    Ok((from, head))
}

/// What a catch-up read gave, one row at a time.
pub(crate) enum Caught {
    /// Not for this worker's subscription (another event type).
    Skip(u64),
    /// No event below this offset is left in the log (retention): pass them.
    Gap(u64),
    Event(Erased),
    Bad(crate::AnyEnvelope, String),
}

impl Feed {
    /// The next row up to `until`, read from the log a page at a time; `None` once there.
    pub(crate) async fn next(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        accepts: impl Fn(&str) -> bool,
        decoder: &Decoder,
    ) -> Result<Option<Caught>, StoreError> {
        if self.rows.is_empty() {
            if from >= self.until {
                return Ok(None);
            }
            let limit = ((self.until - from) as usize).min(READ_PAGE);
            let rows = self.store.read(topic, partition, from, limit).await?;
            self.rows
                .extend(rows.into_iter().filter(|r| r.offset < self.until));
            match self.rows.front() {
                // Nothing left below `until`: deleted by retention.
                None => return Ok(Some(Caught::Gap(self.until))),
                Some(first) if first.offset > from => {
                    if from > 0 {
                        tracing::warn!(topic, partition, from, resumed = first.offset, "tidings: events before this offset are no longer in the log (retention); the group passes them");
                    }
                    return Ok(Some(Caught::Gap(first.offset)));
                }
                Some(_) => {}
            }
        }
        let row = self.rows.pop_front().expect("not empty");
        // A row whose type name could not be read (left empty) may be this subscription's:
        // every group reading the partition dead-letters it.
        if !row.name.is_empty() && !accepts(&row.name) {
            return Ok(Some(Caught::Skip(row.offset)));
        }
        Ok(Some(match decoder.decode(&row) {
            Decoded::Event(env) => Caught::Event(env.inner),
            Decoded::Failed(env, error) => Caught::Bad(env, error),
        }))
    }
}
