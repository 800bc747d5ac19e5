//! Persistence: the [`Store`] trait the bus keeps its partition logs and consumer offsets in, and
//! its backends.
//!
//! Without a store the bus lives in memory: fast, and gone with the process. Give the builder a
//! store and the same handlers and subscriptions run durably:
//!
//! - [`publish`](crate::Bus::publish) returns once the event is committed to the topic
//!   partition's log. Concurrent publishers share one transaction (group commit), so throughput
//!   does not collapse to one fsync per event.
//! - Right after the commit the event is handed to the consumer groups from memory; the log is
//!   read back only to catch up: after a restart, for a [replay](StartFrom), or when a group fell
//!   more than its queue's capacity behind (a full queue no longer holds publishers up: the
//!   group reads what it missed from the log).
//! - Each group's offset per partition is committed after its events are handled
//!   (at-least-once), in the background every [commit interval](crate::BusBuilder::commit_interval)
//!   and at shutdown; a restarted bus resumes every group from its committed offsets.
//!
//! | backend | feature | for |
//! |---|---|---|
//! | [`MemoryStore`] | always | tests: behaves like the others, and survives a *simulated* restart (build a new bus on a clone) |
//! | [`SqliteStore`](crate::SqliteStore) | `sqlite` (default) | one binary: one file, WAL, no server |
//! | [`PostgresStore`](crate::PostgresStore) | `postgres` | services sharing a PostgreSQL server |
//!
//! Each backend is one file implementing [`Store`]; the SQL backends ship their migrations and
//! run them when opened.
//!
//! # Payloads and schema evolution
//!
//! Events are serialized once, at the store boundary, as JSON, with their type
//! [name](crate::Event::NAME) and [version](crate::Event::VERSION). Reading a row back, the bus
//! runs the [`Upcaster`]s registered for its (name, version) until it reaches the current
//! version, then turns the payload back into the Rust type through typetag's registry. A row
//! that cannot be read back (unknown type, a version without an upcaster, a payload that fails
//! to deserialize, a registered type of another topic, a column holding a value of the wrong
//! type or out of range) goes to the reading group's dead-letter queue with the error, and the
//! group goes on. Only a row whose place in the log (topic, partition, offset) cannot be read is
//! [`StoreError::Corrupt`]. A typed group (`subscribe::<E, _>`) reads only the rows named
//! `E::NAME` and passes the others by, known or not; a
//! [`subscribe_all`](crate::BusBuilder::subscribe_all) group reads every row of its topic.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use uuid::Uuid;

use crate::envelope::Headers;

mod codec;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

pub(crate) use codec::{encode, intern, stored_event_of, Decoded, Decoder, EncodeError};
pub use codec::{Undecodable, UpcastError, Upcaster};
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// Default limit of a serialized payload: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// One event as a store keeps it: its place in the log, its metadata and its serialized payload.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Topic.
    pub topic: String,
    /// Partition of the topic.
    pub partition: u32,
    /// Position in the partition's log, assigned by [`Store::append`].
    pub offset: u64,
    /// Event id.
    pub id: Uuid,
    /// Event type name ([`Event::NAME`](crate::Event::NAME)).
    pub name: String,
    /// Schema version of the payload ([`Event::VERSION`](crate::Event::VERSION) when written).
    pub version: u32,
    /// Publication time.
    pub timestamp: SystemTime,
    /// Correlation id.
    pub correlation_id: Uuid,
    /// Causation id.
    pub causation_id: Option<Uuid>,
    /// Headers.
    pub headers: Headers,
    /// The serialized event (JSON).
    pub payload: Vec<u8>,
}

impl fmt::Debug for StoredEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredEvent")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("id", &self.id)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("payload", &String::from_utf8_lossy(&self.payload))
            .finish_non_exhaustive()
    }
}

/// A consumer group's next offset in one partition: everything before it is handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOffset {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The first offset not yet handled.
    pub next_offset: u64,
}

/// A consumer group's dead letter as a store keeps it: the event's row and why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRecord {
    /// Consumer group.
    pub group: String,
    /// The event (its place in the log, metadata and payload).
    pub event: StoredEvent,
    /// The last error, as text.
    pub error: String,
    /// Whether the last error was permanent.
    pub permanent: bool,
    /// Delivery attempts made.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failure: SystemTime,
    /// When the last attempt failed.
    pub last_failure: SystemTime,
    /// The handler's type name.
    pub handler: String,
    /// Automatic redeliveries so far.
    pub redeliveries: u32,
}

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database (or its driver) reported an error.
    #[error("store error: {0}")]
    Backend(Arc<dyn std::error::Error + Send + Sync>),
    /// A configuration the store refuses (an invalid schema name, say).
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// Data in the store that breaks its own rules (a hole in a partition's offsets, say).
    #[error("inconsistent store data: {0}")]
    Corrupt(String),
}

impl StoreError {
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub(crate) fn backend(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Arc::new(error))
    }
}

/// What [`Store::try_append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TryAppend {
    /// Every event was appended, as by [`Store::append`].
    Appended,
    /// Nothing was appended: these partitions, as (topic, partition), each once, could not be
    /// taken without waiting: another transaction holds them (it appended to them and has not
    /// committed yet). A backend may also name a partition it has never written to, whose
    /// creation could wait ([`PostgresStore`](crate::PostgresStore) does). Never empty.
    Busy(Vec<(String, u32)>),
}

/// What the bus keeps durably: the partition logs of its topics and the committed offsets of its
/// consumer groups.
///
/// Implemented by [`MemoryStore`], [`SqliteStore`](crate::SqliteStore) and
/// [`PostgresStore`](crate::PostgresStore); give one to
/// [`BusBuilder::store`](crate::BusBuilder::store). The trait is public so that a backend for
/// another database is one file of straightforward code; the bus is its only caller.
///
/// # Contract
///
/// - Offsets of a partition are dense: 0, 1, 2, … in append order, never reused, even after
///   [`trim`](Store::trim) deleted old events.
/// - [`append`](Store::append) is atomic: every event of the call is durable when it returns
///   `Ok`, or none is.
/// - Appends to one partition become visible in offset order: a reader that sees offset `n`
///   sees every offset below it (PostgreSQL holds the partition's head row locked until the
///   append commits; SQLite and memory have one writer at a time).
/// - [`try_append`](Store::try_append) never waits for a partition that another transaction
///   holds: it appends everything, or nothing and names the [busy](TryAppend::Busy)
///   partitions. A backend with one writer at a time (SQLite, memory) has nothing to report:
///   the default implementation is [`append`](Store::append), and the bus then behaves exactly
///   as with `append`.
///
/// # What the bus does with a busy partition
///
/// The bus appends through [`try_append`](Store::try_append), all waiting publishes in one call
/// (group commit). When partitions are busy, the publishes touching them move to a *lane*: a
/// task of their own that appends them with [`append`](Store::append) (waiting for the
/// partition) and hands them to the groups once committed. The other publishes are appended
/// again at once, and later publishes keep being group-committed, so one held partition stalls
/// only the publishes to it. Until a lane has drained, every publish touching one of its
/// partitions goes to it, after the ones already there: a partition is never appended by two
/// tasks of the bus at once, its offsets are handed to the groups in commit order, and a
/// `publish_all` stays one transaction across its partitions.
///
/// # More than one writer
///
/// Several buses (processes) may append to one store, and so may the application
/// ([`PostgresStore::append_in`](crate::PostgresStore::append_in), in its own transaction).
/// Offsets stay dense and in commit order. A bus hands its groups the events it appended
/// itself right away; events appended by others reach them when the bus next appends to that
/// partition (it sees the gap and reads the log), or at the latest when it restarts. A writer
/// holding a partition (an open transaction that appended to it) holds up only this bus's
/// publishes to that partition (see above). Consumer groups should be run by one bus at a time:
/// two buses running the same group would both handle its events.
pub trait Store: Send + Sync + 'static {
    /// Appends `events` to their partitions' logs in one transaction, writing the offset each got
    /// into its `offset` field (in slice order within a partition).
    fn append<'a>(&'a self, events: &'a mut [StoredEvent])
        -> BoxFuture<'a, Result<(), StoreError>>;

    /// Appends like [`append`](Store::append), unless another transaction holds one of the
    /// partitions (it appended to it and has not committed yet): then nothing is appended, and
    /// [`TryAppend::Busy`] names those partitions, without waiting for them. Events that are not
    /// appended keep their payloads. Like `append`, one round trip where the backend can.
    ///
    /// The default implementation is [`append`](Store::append): a backend with one writer at a
    /// time never reports a busy partition. See the trait's documentation for what the bus does
    /// with one.
    ///
    /// # Errors
    ///
    /// As [`append`](Store::append); a busy partition is not an error.
    fn try_append<'a>(
        &'a self,
        events: &'a mut [StoredEvent],
    ) -> BoxFuture<'a, Result<TryAppend, StoreError>> {
        Box::pin(async move { self.append(events).await.map(|()| TryAppend::Appended) })
    }

    /// Up to `limit` events of a partition from offset `from` on, in offset order.
    fn read<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>>;

    /// How many partitions of `topic` have ever had an event (the highest partition number
    /// plus one; 0 for a topic never written to). The bus refuses to publish to a topic
    /// configured with fewer partitions than its log has: events of the others would never be
    /// read.
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u32, StoreError>>;

    /// How many partitions of `topic` this store handle knows of without I/O: read when it was
    /// opened and raised by its own appends; `None` if the backend keeps no such snapshot.
    ///
    /// [`BusBuilder::build`](crate::BusBuilder::build) refuses a topic configured with fewer
    /// partitions than this (`build` cannot wait for I/O). The bus asks
    /// [`partitions`](Store::partitions) again when it starts, for what other writers added
    /// since, and refuses to publish then.
    fn known_partitions(&self, topic: &str) -> Option<u32> {
        let _ = topic;
        None
    }

    /// The offset the next event of the partition will get (0 for an empty log).
    fn head<'a>(&'a self, topic: &'a str, partition: u32)
        -> BoxFuture<'a, Result<u64, StoreError>>;

    /// The offset of the first event of the partition published at or after `at` (the
    /// [head](Store::head) if there is none).
    fn offset_at<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        at: SystemTime,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// The committed next offset of `group` in a partition, if it ever committed one.
    fn committed<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: u32,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;

    /// Commits consumer offsets, all in one transaction. An offset never moves back: a value
    /// below the one committed is ignored (see [`reset_offset`](Store::reset_offset)).
    fn commit<'a>(&'a self, offsets: &'a [GroupOffset]) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Sets a group's offset in a partition, even below the committed one (a replay).
    fn reset_offset<'a>(&'a self, offset: &'a GroupOffset)
        -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes the events of a partition below offset `before` (retention). Returns how many
    /// were deleted.
    fn trim<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        before: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Saves a dead letter, replacing the group's entry for the same event (topic, partition,
    /// offset) if there is one.
    fn save_dead_letter<'a>(
        &'a self,
        record: &'a DeadLetterRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes the group's dead letter of the event at (topic, partition, offset), if any.
    fn delete_dead_letter<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: u32,
        offset: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The group's dead letters, by topic, partition and offset.
    fn dead_letters<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<DeadLetterRecord>, StoreError>>;

    /// Whether `group` marked event `id` handled ([`commit_marked`](Store::commit_marked)).
    fn is_marked<'a>(&'a self, group: &'a str, id: Uuid)
        -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Effectively-once: marks event `id` handled by the offset's group and commits the offset,
    /// in one transaction.
    fn commit_marked<'a>(
        &'a self,
        offset: &'a GroupOffset,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Effectively-once, for many events at once: which of `ids` `group` marked handled, in any
    /// order. The bus asks once per batch of events instead of once per event.
    ///
    /// The default asks [`is_marked`](Store::is_marked) for each id; the backends of tidings
    /// answer in one query.
    ///
    /// # Errors
    ///
    /// The store's error; the bus then asks again later.
    fn marked<'a>(
        &'a self,
        group: &'a str,
        ids: &'a [Uuid],
    ) -> BoxFuture<'a, Result<Vec<Uuid>, StoreError>> {
        Box::pin(async move {
            let mut found = Vec::new();
            for &id in ids {
                if self.is_marked(group, id).await? {
                    found.push(id);
                }
            }
            Ok(found)
        })
    }

    /// Effectively-once, for many events at once: marks each event id handled by its offset's
    /// group and commits the offsets (per group partition the highest; an offset never moves
    /// back, as with [`commit`](Store::commit)). The bus gathers the marks of all its workers
    /// into one call, as it gathers appends.
    ///
    /// Each mark must become durable together with its offset, or neither: no offset may be
    /// durable past an event whose mark is not. The backends of tidings commit the whole call
    /// in one transaction; the default calls [`commit_marked`](Store::commit_marked) for each
    /// pair, in order (each pair atomic), which keeps that rule too.
    ///
    /// # Errors
    ///
    /// The store's error: then none of the call's marks may be relied on, and the bus does not
    /// let the groups' offsets pass their events.
    fn commit_marks<'a>(
        &'a self,
        marks: &'a [(GroupOffset, Uuid)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            for (offset, id) in marks {
                self.commit_marked(offset, *id).await?;
            }
            Ok(())
        })
    }
}

/// A shared store is a store: keep an `Arc` to read the log or offsets beside the bus.
impl<S: Store + ?Sized> Store for Arc<S> {
    fn append<'a>(
        &'a self,
        events: &'a mut [StoredEvent],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).append(events)
    }
    fn try_append<'a>(
        &'a self,
        events: &'a mut [StoredEvent],
    ) -> BoxFuture<'a, Result<TryAppend, StoreError>> {
        (**self).try_append(events)
    }
    fn read<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        (**self).read(topic, partition, from, limit)
    }
    fn head<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        (**self).head(topic, partition)
    }
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u32, StoreError>> {
        (**self).partitions(topic)
    }
    fn known_partitions(&self, topic: &str) -> Option<u32> {
        (**self).known_partitions(topic)
    }
    fn offset_at<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        at: SystemTime,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        (**self).offset_at(topic, partition, at)
    }
    fn committed<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: u32,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        (**self).committed(group, topic, partition)
    }
    fn commit<'a>(&'a self, offsets: &'a [GroupOffset]) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).commit(offsets)
    }
    fn reset_offset<'a>(
        &'a self,
        offset: &'a GroupOffset,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).reset_offset(offset)
    }
    fn trim<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        before: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        (**self).trim(topic, partition, before)
    }
    fn save_dead_letter<'a>(
        &'a self,
        record: &'a DeadLetterRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).save_dead_letter(record)
    }
    fn delete_dead_letter<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: u32,
        offset: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).delete_dead_letter(group, topic, partition, offset)
    }
    fn dead_letters<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<DeadLetterRecord>, StoreError>> {
        (**self).dead_letters(group)
    }
    fn is_marked<'a>(
        &'a self,
        group: &'a str,
        id: Uuid,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        (**self).is_marked(group, id)
    }
    fn commit_marked<'a>(
        &'a self,
        offset: &'a GroupOffset,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).commit_marked(offset, id)
    }
    fn marked<'a>(
        &'a self,
        group: &'a str,
        ids: &'a [Uuid],
    ) -> BoxFuture<'a, Result<Vec<Uuid>, StoreError>> {
        (**self).marked(group, ids)
    }
    fn commit_marks<'a>(
        &'a self,
        marks: &'a [(GroupOffset, Uuid)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        (**self).commit_marks(marks)
    }
}

/// Where a consumer group starts reading a partition when it has no committed offset (or when
/// it is [reset](crate::Subscription::reset_to)).
///
/// ```
/// use tidings::{StartFrom, Subscription};
///
/// // A projection rebuilt from scratch reads the whole log.
/// let projection = Subscription::new("order-totals").start_from(StartFrom::Earliest);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartFrom {
    /// The oldest event still in the log.
    Earliest,
    /// Only events published after the group started (the default, as without a store).
    #[default]
    Latest,
    /// This offset, in every partition.
    Offset(u64),
    /// The first event published at or after this time, in every partition.
    Timestamp(SystemTime),
}

/// How long a topic's log keeps events (with a store). Honoured by a background task every
/// [retention interval](crate::BusBuilder::retention_interval).
///
/// Retention deletes events whatever the groups' offsets: a group that is further behind than
/// the retention loses the deleted events (it resumes at the oldest one kept), as in Kafka.
///
/// ```
/// use std::time::Duration;
/// use tidings::{Retention, TopicConfig};
///
/// let telemetry = TopicConfig::new("telemetry").retention(Retention::MaxAge(Duration::from_secs(3600)));
/// let orders = TopicConfig::new("orders").retention(Retention::MaxEvents(1_000_000));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Retention {
    /// Keep every event (the default).
    #[default]
    KeepAll,
    /// Delete events older than this (above zero: zero is a build error).
    MaxAge(Duration),
    /// Keep at most this many of the newest events of each partition (at least 1: zero is a
    /// build error).
    MaxEvents(u64),
}

/// Validates an SQL identifier taken from configuration (a schema name): ASCII letters, digits
/// and `_`, not starting with a digit, at most 63 bytes.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn validate_identifier(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(StoreError::Config(format!(
            "{name:?} is not a valid identifier: use 1 to 63 ASCII letters, digits or '_', not starting with a digit"
        )))
    }
}

/// The indices of `events` by partition, each list in slice order, the partitions sorted by
/// (topic, partition): backends lock partition heads in that order, so two appenders never
/// deadlock.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn by_partition(events: &[StoredEvent]) -> Vec<Vec<usize>> {
    let mut runs: std::collections::BTreeMap<(&str, u32), Vec<usize>> = Default::default();
    for (i, e) in events.iter().enumerate() {
        runs.entry((e.topic.as_str(), e.partition))
            .or_default()
            .push(i);
    }
    runs.into_values().collect()
}

/// The partition counts of the topics a SQL store handle knows of: loaded when it is opened,
/// raised by its appends ([`Store::known_partitions`]).
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
#[derive(Clone, Debug, Default)]
pub(crate) struct PartitionCounts(Arc<parking_lot::Mutex<std::collections::HashMap<String, u32>>>);

#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
impl PartitionCounts {
    /// From (topic, partition count) pairs as a store reads them.
    pub(crate) fn load(pairs: impl IntoIterator<Item = (String, i64)>) -> Self {
        let map = pairs
            .into_iter()
            .map(|(topic, n)| (topic, u32::try_from(n).unwrap_or(u32::MAX)))
            .collect();
        PartitionCounts(Arc::new(parking_lot::Mutex::new(map)))
    }

    /// Raises the counts to cover `events` (just appended).
    pub(crate) fn raise(&self, events: &[StoredEvent]) {
        let mut map = self.0.lock();
        for e in events {
            let n = e.partition.saturating_add(1);
            match map.get_mut(e.topic.as_str()) {
                Some(known) if *known >= n => {}
                Some(known) => *known = n,
                None => {
                    map.insert(e.topic.clone(), n);
                }
            }
        }
    }

    pub(crate) fn get(&self, topic: &str) -> Option<u32> {
        Some(self.0.lock().get(topic).copied().unwrap_or(0))
    }
}

/// The offsets of `marks` to commit: per (group, topic, partition) the highest, in a fixed
/// order (a statement may touch each offset row once).
pub(crate) fn highest_offsets(marks: &[(GroupOffset, Uuid)]) -> Vec<&GroupOffset> {
    let mut highest: std::collections::BTreeMap<(&str, &str, u32), &GroupOffset> =
        Default::default();
    for (o, _) in marks {
        let key = (o.group.as_str(), o.topic.as_str(), o.partition);
        let entry = highest.entry(key).or_insert(o);
        if o.next_offset > entry.next_offset {
            *entry = o;
        }
    }
    highest.into_values().collect()
}

#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn micros(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_from_configuration_are_validated() {
        assert!(validate_identifier("tidings_test_1").is_ok());
        for bad in [
            "",
            "1abc",
            "a-b",
            "a;drop table x",
            "a b",
            "\"x\"",
            &"x".repeat(64),
        ] {
            assert!(validate_identifier(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn times_round_trip_through_micros() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(codec::checked_from_micros(micros(t)), Some(t));
    }
}
