//! What a store can do, one capability per trait: [`Log`], [`Offsets`], [`DeadLetterLog`],
//! [`Marks`]; [`Store`] is all four, the bus's one handle on its store.

use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use uuid::Uuid;

use super::types::{
    DeadLetterRecord, GroupOffset, HeadWatch, PartitionHead, StoreError, StoredEvent, TryAppend,
};

/// The partition logs of the topics: append, read back, find a place, trim.
///
/// One of the four capabilities of a [`Store`]. The bus appends every durable publish here
/// (group commit), reads the log back to catch a group up (after a restart, a replay, or a
/// queue that fell behind), and trims it for [retention](crate::store::Retention).
///
/// # Contract
///
/// - Offsets of a partition are dense: 0, 1, 2, … in append order, never reused, even after
///   [`trim`](Log::trim) deleted old events.
/// - [`append`](Log::append) is atomic: every event of the call is durable when it returns
///   `Ok`, or none is.
/// - Appends to one partition become visible in offset order: a reader that sees offset `n`
///   sees every offset below it (PostgreSQL holds the partition's head row locked until the
///   append commits; SQLite and memory have one writer at a time).
/// - [`try_append`](Log::try_append) never waits for a partition that another transaction
///   holds: it appends everything, or nothing and names the [busy](TryAppend::Busy)
///   partitions. A backend with one writer at a time (SQLite, memory) has nothing to report:
///   the default implementation is [`append`](Log::append), and the bus then behaves exactly
///   as with `append`.
///
/// # What the bus does with a busy partition
///
/// The bus appends through [`try_append`](Log::try_append), all waiting publishes in one call
/// (group commit). When partitions are busy, the publishes touching them move to a *lane*: a
/// task of their own that appends them with [`append`](Log::append) (waiting for the
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
/// ([`PostgresStore::append_in`](crate::store::PostgresStore::append_in), in its own transaction).
/// Offsets stay dense and in commit order. A bus hands its groups the events it appended
/// itself right away, from memory. Events appended by others reach them from the log, in log
/// order with the bus's own, as soon as the bus learns that the partition's head moved past
/// what it handed them:
///
/// - from the store's announcements, where it makes them ([`watch_heads`](Log::watch_heads):
///   [`PostgresStore`](crate::store::PostgresStore) uses `LISTEN`/`NOTIFY`, milliseconds);
/// - otherwise by reading every head ([`heads`](Log::heads)) each
///   [poll interval](crate::BusBuilder::poll_interval), and while announcements are down;
/// - and, at the latest, when the bus next appends to that partition (it sees the gap) or
///   restarts.
///
/// A writer holding a partition (an open transaction that appended to it) holds up only this
/// bus's publishes to that partition (see above). Consumer groups should be run by one bus at a
/// time (see [`Offsets`]): two buses running the same group both handle its events.
///
/// # Example
///
/// Reading a partition beside the bus, through a handle kept on the side (`Arc<S>` implements
/// every capability of `S`):
///
/// ```
/// use std::sync::Arc;
/// use tidings::store::{Log, MemoryStore};
/// use tidings::Bus;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let bus = Bus::builder().store(store.clone()).build()?;
/// assert_eq!(store.head("orders", 0).await?, 0);
/// assert!(store.read("orders", 0, 0, 100).await?.is_empty());
/// # bus.shutdown().await; Ok(()) }
/// ```
///
/// A backend of your own implements this trait and the three others; see
/// [`driver`](super::driver) for the helpers the backends of tidings use and a complete example.
pub trait Log: Send + Sync + 'static {
    /// Appends `events` to their partitions' logs in one transaction, writing the offset each got
    /// into its `offset` field (in slice order within a partition).
    fn append<'a>(&'a self, events: &'a mut [StoredEvent])
        -> BoxFuture<'a, Result<(), StoreError>>;

    /// Appends like [`append`](Log::append), unless another transaction holds one of the
    /// partitions (it appended to it and has not committed yet): then nothing is appended, and
    /// [`TryAppend::Busy`] names those partitions, without waiting for them. Events that are not
    /// appended keep their payloads. Like `append`, one round trip where the backend can.
    ///
    /// The default implementation is [`append`](Log::append): a backend with one writer at a
    /// time never reports a busy partition. See the trait's documentation for what the bus does
    /// with one.
    ///
    /// # Errors
    ///
    /// As [`append`](Log::append); a busy partition is not an error.
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
    /// [`partitions`](Log::partitions) again when it starts, for what other writers added
    /// since, and refuses to publish then.
    fn known_partitions(&self, topic: &str) -> Option<u32> {
        let _ = topic;
        None
    }

    /// The offset the next event of the partition will get (0 for an empty log).
    fn head<'a>(&'a self, topic: &'a str, partition: u32)
        -> BoxFuture<'a, Result<u64, StoreError>>;

    /// The offset of the first event of the partition published at or after `at` (the
    /// [head](Log::head) if there is none).
    fn offset_at<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        at: SystemTime,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Deletes the events of a partition below offset `before` (retention). Returns how many
    /// were deleted.
    fn trim<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        before: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// The [head](Log::head) of every partition of `topics` that has ever had an event, in any
    /// order. A bus on a store without [announcements](Log::watch_heads) asks it every
    /// [poll interval](crate::BusBuilder::poll_interval), to learn of events other writers
    /// appended.
    ///
    /// The default asks [`partitions`](Log::partitions) and then [`head`](Log::head) of each
    /// partition; the backends of tidings answer in one query.
    ///
    /// # Errors
    ///
    /// The store's error; the bus asks again at the next poll.
    fn heads<'a>(
        &'a self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<PartitionHead>, StoreError>> {
        Box::pin(async move {
            let mut heads = Vec::new();
            for topic in topics {
                for partition in 0..self.partitions(topic).await? {
                    heads.push(PartitionHead {
                        topic: topic.clone(),
                        partition,
                        head: self.head(topic, partition).await?,
                    });
                }
            }
            Ok(heads)
        })
    }

    /// Announcements of committed appends, by any writer of the store (this handle's included),
    /// as a stream: `None` (the default) if the store makes none, and the bus then polls
    /// [`heads`](Log::heads).
    ///
    /// Called once by each bus, which keeps the stream until it stops. The stream must announce
    /// every committed append (one [`HeadWatch::Moved`] per partition and transaction is
    /// enough, and a later one may stand for earlier ones), or say it may have missed some:
    /// [`HeadWatch::Resync`] after it (re)started listening, [`HeadWatch::Lost`] while it
    /// cannot. An announced head must be committed: a head announced too high would make the
    /// bus's groups pass offsets that have no event yet. A stream that ends leaves the bus
    /// polling.
    ///
    /// [`PostgresStore`](crate::store::PostgresStore) announces with `LISTEN`/`NOTIFY`;
    /// [`SqliteStore`](crate::store::SqliteStore) and
    /// [`MemoryStore`](crate::store::MemoryStore) make no announcements.
    fn watch_heads(&self) -> Option<BoxStream<'static, HeadWatch>> {
        None
    }
}

/// The consumer groups' committed offsets: where each group resumes in each partition.
///
/// One of the four capabilities of a [`Store`]. The bus commits each group's offsets after
/// its events are handled (at-least-once), in the background every
/// [commit interval](crate::BusBuilder::commit_interval) and at shutdown, and reads them when
/// it starts.
///
/// # Contract
///
/// - [`commit`](Offsets::commit) writes all its offsets in one transaction.
/// - A committed offset never moves back through [`commit`](Offsets::commit) (nor through
///   [`Marks::commit_marks`]): a value below the one committed is ignored. Only
///   [`reset_offset`](Offsets::reset_offset) sets it lower (a replay).
///
/// Consumer groups should be run by one bus at a time: two buses running the same group would
/// both handle its events.
pub trait Offsets: Send + Sync + 'static {
    /// The committed next offset of `group` in a partition, if it ever committed one.
    fn committed<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: u32,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;

    /// Commits consumer offsets, all in one transaction. An offset never moves back: a value
    /// below the one committed is ignored (see [`reset_offset`](Offsets::reset_offset)).
    fn commit<'a>(&'a self, offsets: &'a [GroupOffset]) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Sets a group's offset in a partition, even below the committed one (a replay).
    fn reset_offset<'a>(&'a self, offset: &'a GroupOffset)
        -> BoxFuture<'a, Result<(), StoreError>>;
}

/// The consumer groups' durable dead letters: saved when a handler gives up on an event,
/// deleted when it is handled after all (a redrive) or discarded, restored when the bus starts.
///
/// One of the four capabilities of a [`Store`].
///
/// # Contract
///
/// - A group has at most one dead letter per event, keyed by the event's place in the log
///   (topic, partition, offset): [`save_dead_letter`](DeadLetterLog::save_dead_letter)
///   replaces the group's entry for the same place.
/// - [`dead_letters`](DeadLetterLog::dead_letters) returns the group's entries ordered by
///   topic, partition and offset, each as it was last saved.
/// - Deleting an entry that is not there is not an error.
///
/// An entry whose place in the log cannot be read back should not keep the group's other
/// entries from being restored: the SQL backends of tidings leave such a row in the store,
/// log an error, and return the others.
pub trait DeadLetterLog: Send + Sync + 'static {
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
}

/// Effectively-once: the event ids each consumer group marked handled, committed together
/// with the group's offsets.
///
/// One of the four capabilities of a [`Store`], used by subscriptions in
/// [`DeliveryMode::EffectivelyOnce`](crate::DeliveryMode::EffectivelyOnce): before handling
/// an event the bus asks whether its group marked its id; after handling it, it marks the id
/// and moves the offset in one transaction.
///
/// `Marks` extends [`Offsets`]: committing a mark commits an offset, so both must live in the
/// same store (the same database, the same transaction).
///
/// # Contract
///
/// - Each mark becomes durable together with its offset, or neither: no offset may be durable
///   past an event whose mark is not. [`commit_marked`](Marks::commit_marked) is one
///   transaction; [`commit_marks`](Marks::commit_marks) keeps the rule for every pair of the
///   call (the backends of tidings commit the whole call in one transaction).
/// - Offsets committed with marks never move back, as with [`Offsets::commit`].
/// - A mark is per group: [`is_marked`](Marks::is_marked) and [`marked`](Marks::marked) see
///   only the marks of the group they are asked about.
pub trait Marks: Offsets {
    /// Whether `group` marked event `id` handled ([`commit_marked`](Marks::commit_marked)).
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
    /// The default asks [`is_marked`](Marks::is_marked) for each id; the backends of tidings
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
    /// back, as with [`commit`](Offsets::commit)). The bus gathers the marks of all its workers
    /// into one call, as it gathers appends.
    ///
    /// Each mark must become durable together with its offset, or neither: no offset may be
    /// durable past an event whose mark is not. The backends of tidings commit the whole call
    /// in one transaction; the default calls [`commit_marked`](Marks::commit_marked) for each
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

/// What the bus keeps durably: the partition logs of its topics, the committed offsets of its
/// consumer groups, their dead letters and their effectively-once marks.
///
/// `Store` is the sum of the four capabilities, [`Log`], [`Offsets`], [`DeadLetterLog`] and
/// [`Marks`], each with its own `# Contract`; it has no methods of its own and is implemented
/// for every type that implements all four, so a backend implements those four traits and is
/// a `Store`. It is object-safe: the bus holds its store as an `Arc<dyn Store>`.
///
/// Implemented by [`MemoryStore`](crate::store::MemoryStore),
/// [`SqliteStore`](crate::store::SqliteStore) and [`PostgresStore`](crate::store::PostgresStore);
/// give one to [`BusBuilder::store`](crate::BusBuilder::store). The traits are public so that a
/// backend for another database is a little straightforward code (see [`driver`](super::driver));
/// the bus is their only caller.
///
/// `Arc<S>` implements each capability of `S`, so the application can keep a handle on the
/// store beside the bus (give the bus a clone of the `Arc`). To call the methods of a concrete
/// store, import the capability: `use tidings::store::Log;`.
///
/// ```
/// use std::sync::Arc;
/// use tidings::store::{MemoryStore, Offsets, Store};
/// use tidings::Bus;
///
/// fn takes_any_store(store: impl Store) -> Arc<dyn Store> {
///     Arc::new(store)
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = Arc::new(MemoryStore::new());
/// let shared: Arc<dyn Store> = takes_any_store(store.clone());
/// assert_eq!(shared.committed("billing", "orders", 0).await?, None);
/// let bus = Bus::builder().store(store).build()?;
/// # bus.shutdown().await; Ok(()) }
/// ```
pub trait Store: Log + Offsets + DeadLetterLog + Marks {}

impl<S: Log + Offsets + DeadLetterLog + Marks + ?Sized> Store for S {}

/// A shared log is a log: keep an `Arc` to read it beside the bus.
impl<S: Log + ?Sized> Log for Arc<S> {
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
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u32, StoreError>> {
        (**self).partitions(topic)
    }
    fn known_partitions(&self, topic: &str) -> Option<u32> {
        (**self).known_partitions(topic)
    }
    fn head<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        (**self).head(topic, partition)
    }
    fn offset_at<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        at: SystemTime,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        (**self).offset_at(topic, partition, at)
    }
    fn trim<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        before: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        (**self).trim(topic, partition, before)
    }
    fn heads<'a>(
        &'a self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<PartitionHead>, StoreError>> {
        (**self).heads(topics)
    }
    fn watch_heads(&self) -> Option<BoxStream<'static, HeadWatch>> {
        (**self).watch_heads()
    }
}

/// Shared offsets are offsets.
impl<S: Offsets + ?Sized> Offsets for Arc<S> {
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
}

/// Shared dead letters are dead letters.
impl<S: DeadLetterLog + ?Sized> DeadLetterLog for Arc<S> {
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
}

/// Shared marks are marks.
impl<S: Marks + ?Sized> Marks for Arc<S> {
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
