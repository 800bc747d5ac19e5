//! `MemoryStore`: the store for tests.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::{BoxFuture, FutureExt};
use parking_lot::Mutex;

use super::driver::highest_offsets;
use super::{
    DeadLetterLog, DeadLetterRecord, GroupOffset, Log, Marks, Offsets, PartitionHead, StoreError,
    StoredEvent,
};

/// A [`Store`](super::Store) in memory: it behaves like the durable ones (serialized payloads,
/// dense offsets, committed offsets, replay, retention) and lives as long as any clone of it.
///
/// Clones share the same data, so a test simulates a restart by shutting a bus down and
/// building a new one on a clone: the new bus resumes every group from its committed offset.
/// To leave things as a crash would, stop the old bus with a short
/// [`shutdown_timeout`](crate::Bus::shutdown_timeout) while its handlers are busy: what they
/// had not finished is handled again by the new bus. (Dropping a bus is not a crash: it shuts
/// down gracefully in the background.)
///
/// Several buses on clones at once are several processes on one database: they share the logs,
/// the committed offsets, the dead letters and the effectively-once marks. Each bus hands what it
/// publishes to its own groups; the others read it from the log only when they catch up (at
/// build, or on a replay). Nothing divides a group's partitions between live buses: two buses
/// with one group each handle their own publishes and commit the same offsets, so run one bus at
/// a time per group, as a restart does.
///
/// ```
/// use tidings::store::MemoryStore;
/// use tidings::Bus;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tidings::BuildError> {
/// let store = MemoryStore::new();
/// let bus = Bus::builder().store(store.clone()).build()?;
/// # bus.shutdown().await; Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    logs: HashMap<(String, u32), PartitionLog>,
    offsets: HashMap<(String, String, u32), u64>,
    dead_letters: std::collections::BTreeMap<(String, String, u32, u64), DeadLetterRecord>,
    marks: std::collections::HashSet<(String, uuid::Uuid)>,
}

#[derive(Default)]
struct PartitionLog {
    /// Offset of `events[0]`.
    base: u64,
    events: VecDeque<StoredEvent>,
}

impl PartitionLog {
    fn head(&self) -> u64 {
        self.base + self.events.len() as u64
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every event of a partition still in the log, for assertions in tests.
    pub fn events(&self, topic: &str, partition: u32) -> Vec<StoredEvent> {
        let inner = self.inner.lock();
        inner
            .logs
            .get(&(topic.to_owned(), partition))
            .map(|log| log.events.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Writes a row as it is, bypassing the bus: for tests that need a row the bus would never
    /// write (an unknown type, an old version, a corrupt payload). Its offset is assigned as by
    /// an append.
    pub fn insert_raw(&self, mut event: StoredEvent) -> u64 {
        let mut inner = self.inner.lock();
        let log = inner
            .logs
            .entry((event.topic.clone(), event.partition))
            .or_default();
        event.offset = log.head();
        log.events.push_back(event);
        log.head() - 1
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("MemoryStore")
            .field("partitions", &inner.logs.len())
            .field("offsets", &inner.offsets.len())
            .finish()
    }
}

impl MemoryStore {
    fn partition_count(&self, topic: &str) -> u32 {
        self.inner
            .lock()
            .logs
            .keys()
            .filter(|(t, _)| t == topic)
            .map(|&(_, p)| p + 1)
            .max()
            .unwrap_or(0)
    }
}

impl Log for MemoryStore {
    fn append<'a>(
        &'a self,
        events: &'a mut [StoredEvent],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut inner = self.inner.lock();
        for event in events.iter_mut() {
            let log = inner
                .logs
                .entry((event.topic.clone(), event.partition))
                .or_default();
            event.offset = log.head();
            log.events.push_back(event.clone());
        }
        futures::future::ready(Ok(())).boxed()
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        let inner = self.inner.lock();
        let out = match inner.logs.get(&(topic.to_owned(), partition)) {
            Some(log) => {
                let skip = from.saturating_sub(log.base) as usize;
                log.events.iter().skip(skip).take(limit).cloned().collect()
            }
            None => Vec::new(),
        };
        futures::future::ready(Ok(out)).boxed()
    }

    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u32, StoreError>> {
        futures::future::ready(Ok(self.partition_count(topic))).boxed()
    }

    fn known_partitions(&self, topic: &str) -> Option<u32> {
        Some(self.partition_count(topic))
    }

    fn head<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let inner = self.inner.lock();
        let head = inner
            .logs
            .get(&(topic.to_owned(), partition))
            .map_or(0, PartitionLog::head);
        futures::future::ready(Ok(head)).boxed()
    }

    fn offset_at<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        at: SystemTime,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let inner = self.inner.lock();
        let offset = match inner.logs.get(&(topic.to_owned(), partition)) {
            Some(log) => log
                .events
                .iter()
                .find(|e| e.timestamp >= at)
                .map_or(log.head(), |e| e.offset),
            None => 0,
        };
        futures::future::ready(Ok(offset)).boxed()
    }

    fn trim<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        before: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let mut inner = self.inner.lock();
        let mut deleted = 0;
        if let Some(log) = inner.logs.get_mut(&(topic.to_owned(), partition)) {
            while log.base < before && !log.events.is_empty() {
                log.events.pop_front();
                log.base += 1;
                deleted += 1;
            }
        }
        futures::future::ready(Ok(deleted)).boxed()
    }

    fn heads<'a>(
        &'a self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<PartitionHead>, StoreError>> {
        let inner = self.inner.lock();
        let heads = inner
            .logs
            .iter()
            .filter(|((topic, _), _)| topics.contains(topic))
            .map(|((topic, partition), log)| PartitionHead {
                topic: topic.clone(),
                partition: *partition,
                head: log.head(),
            })
            .collect();
        futures::future::ready(Ok(heads)).boxed()
    }
}

impl Offsets for MemoryStore {
    fn committed<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: u32,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        let inner = self.inner.lock();
        let offset = inner
            .offsets
            .get(&(group.to_owned(), topic.to_owned(), partition))
            .copied();
        futures::future::ready(Ok(offset)).boxed()
    }

    fn commit<'a>(&'a self, offsets: &'a [GroupOffset]) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut inner = self.inner.lock();
        for o in offsets {
            let next = inner
                .offsets
                .entry((o.group.clone(), o.topic.clone(), o.partition))
                .or_insert(0);
            *next = (*next).max(o.next_offset);
        }
        futures::future::ready(Ok(())).boxed()
    }

    fn reset_offset<'a>(&'a self, o: &'a GroupOffset) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.lock().offsets.insert(
            (o.group.clone(), o.topic.clone(), o.partition),
            o.next_offset,
        );
        futures::future::ready(Ok(())).boxed()
    }
}

impl DeadLetterLog for MemoryStore {
    fn save_dead_letter<'a>(
        &'a self,
        record: &'a DeadLetterRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let e = &record.event;
        self.inner.lock().dead_letters.insert(
            (record.group.clone(), e.topic.clone(), e.partition, e.offset),
            record.clone(),
        );
        futures::future::ready(Ok(())).boxed()
    }

    fn delete_dead_letter<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: u32,
        offset: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.lock().dead_letters.remove(&(
            group.to_owned(),
            topic.to_owned(),
            partition,
            offset,
        ));
        futures::future::ready(Ok(())).boxed()
    }

    fn dead_letters<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<DeadLetterRecord>, StoreError>> {
        let out = self
            .inner
            .lock()
            .dead_letters
            .values()
            .filter(|r| r.group == group)
            .cloned()
            .collect();
        futures::future::ready(Ok(out)).boxed()
    }
}

impl Marks for MemoryStore {
    fn is_marked<'a>(
        &'a self,
        group: &'a str,
        id: uuid::Uuid,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let marked = self.inner.lock().marks.contains(&(group.to_owned(), id));
        futures::future::ready(Ok(marked)).boxed()
    }

    fn commit_marked<'a>(
        &'a self,
        offset: &'a GroupOffset,
        id: uuid::Uuid,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut inner = self.inner.lock();
        inner.marks.insert((offset.group.clone(), id));
        let next = inner
            .offsets
            .entry((offset.group.clone(), offset.topic.clone(), offset.partition))
            .or_insert(0);
        *next = (*next).max(offset.next_offset);
        futures::future::ready(Ok(())).boxed()
    }

    fn marked<'a>(
        &'a self,
        group: &'a str,
        ids: &'a [uuid::Uuid],
    ) -> BoxFuture<'a, Result<Vec<uuid::Uuid>, StoreError>> {
        let inner = self.inner.lock();
        let group = group.to_owned();
        let found = ids
            .iter()
            .filter(|&&id| inner.marks.contains(&(group.clone(), id)))
            .copied()
            .collect();
        futures::future::ready(Ok(found)).boxed()
    }

    fn commit_marks<'a>(
        &'a self,
        marks: &'a [(GroupOffset, uuid::Uuid)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut inner = self.inner.lock();
        for (offset, id) in marks {
            inner.marks.insert((offset.group.clone(), *id));
        }
        for o in highest_offsets(marks) {
            let next = inner
                .offsets
                .entry((o.group.clone(), o.topic.clone(), o.partition))
                .or_insert(0);
            *next = (*next).max(o.next_offset);
        }
        futures::future::ready(Ok(())).boxed()
    }
}
