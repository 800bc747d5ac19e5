//! For backend authors: everything a store outside this crate needs, in one import.
//!
//! A backend implements the four capabilities, [`Log`], [`Offsets`], [`DeadLetterLog`] and
//! [`Marks`] (each states its `# Contract`), and is then a [`Store`] that
//! [`BusBuilder::store`](crate::BusBuilder::store) takes. This module re-exports those traits
//! and the types they speak, and adds the helpers the backends of tidings
//! ([`MemoryStore`](crate::store::MemoryStore), [`SqliteStore`](crate::store::SqliteStore),
//! [`PostgresStore`](crate::store::PostgresStore)) are written with:
//!
//! | helper | for |
//! |---|---|
//! | [`by_partition`] | an append: the events by partition, partitions in lock order (no deadlock between two appenders) |
//! | [`highest_offsets`] | [`Marks::commit_marks`]: the one offset per group partition to commit |
//! | [`PartitionCounts`] | [`Log::known_partitions`]: the partition counts a store handle knows without I/O |
//! | [`micros`], [`checked_from_micros`] | times as integer microseconds since the Unix epoch (the SQL stores' columns) |
//! | [`headers_to_json`], [`headers_from_json`] | [`Headers`] as one JSON text column |
//! | [`UNREADABLE_ROW`], [`UNREADABLE_HEADERS`] | a row read back with a column that cannot be read: mark it, and every group reading it dead-letters it and goes on |
//! | [`validate_identifier`] | a schema or table name taken from configuration, before it goes into SQL text |
//! | [`StoreError::backend`] | a database error as a [`StoreError`] |
//!
//! Reading a row back, a backend returns [`StoreError::Corrupt`] only when the row's place in
//! the log (topic, partition, offset) cannot be read; any other column that cannot be read
//! (a value of the wrong type or out of range) gets a placeholder, and the row is marked with
//! the [`UNREADABLE_ROW`] header saying why: the bus then dead-letters it for each group
//! reading it instead of stopping the group.
//!
//! **Stability:** this module is for writing backends and follows them, not the bus: its API
//! may change between minor versions (as sqlx's `driver_prelude`). The traits and types it
//! re-exports are the ones of [`store`](super) and keep their own promises.
//!
//! # Example: a store wrapping another
//!
//! A store that counts the events it appends and keeps everything in a
//! [`MemoryStore`](crate::store::MemoryStore) (the shape of a metrics or fault-injection wrapper).
//! The provided methods it does not override ([`Log::try_append`], [`Log::heads`],
//! [`Log::watch_heads`], [`Marks::marked`], [`Marks::commit_marks`]) fall back to the required
//! ones: `try_append` calls this `append`, so the bus's appends are counted too; `heads` asks
//! `partitions` and `head`; `watch_heads` is `None`, so a bus on it polls the heads (a wrapper
//! of a store that announces its appends forwards `watch_heads` to keep them).
//!
//! # Other writers
//!
//! A bus learns of events other processes appended through [`Log::watch_heads`] (a stream of
//! [`HeadWatch`]: announcements of committed heads, and `Resync` / `Lost` when it may have
//! missed some) or, without one, by polling [`Log::heads`]. A backend with a cheap way to
//! read every head (one query) overrides `heads`; one with a notification channel implements
//! `watch_heads`. An announced head must be committed, and every committed append announced
//! or covered by a `Resync`: see their contracts.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use std::time::SystemTime;
//!
//! use tidings::store::driver::{
//!     BoxFuture, DeadLetterLog, DeadLetterRecord, GroupOffset, Log, Marks, Offsets, StoreError,
//!     StoredEvent, Uuid,
//! };
//! use tidings::store::MemoryStore;
//!
//! #[derive(Clone, Default)]
//! struct Counting {
//!     inner: MemoryStore,
//!     appended: Arc<AtomicU64>,
//! }
//!
//! impl Log for Counting {
//!     fn append<'a>(
//!         &'a self,
//!         events: &'a mut [StoredEvent],
//!     ) -> BoxFuture<'a, Result<(), StoreError>> {
//!         Box::pin(async move {
//!             self.inner.append(events).await?;
//!             self.appended.fetch_add(events.len() as u64, Ordering::Relaxed);
//!             Ok(())
//!         })
//!     }
//!     fn read<'a>(
//!         &'a self,
//!         topic: &'a str,
//!         partition: u32,
//!         from: u64,
//!         limit: usize,
//!     ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
//!         self.inner.read(topic, partition, from, limit)
//!     }
//!     fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u32, StoreError>> {
//!         self.inner.partitions(topic)
//!     }
//!     fn known_partitions(&self, topic: &str) -> Option<u32> {
//!         self.inner.known_partitions(topic)
//!     }
//!     fn head<'a>(
//!         &'a self,
//!         topic: &'a str,
//!         partition: u32,
//!     ) -> BoxFuture<'a, Result<u64, StoreError>> {
//!         self.inner.head(topic, partition)
//!     }
//!     fn offset_at<'a>(
//!         &'a self,
//!         topic: &'a str,
//!         partition: u32,
//!         at: SystemTime,
//!     ) -> BoxFuture<'a, Result<u64, StoreError>> {
//!         self.inner.offset_at(topic, partition, at)
//!     }
//!     fn trim<'a>(
//!         &'a self,
//!         topic: &'a str,
//!         partition: u32,
//!         before: u64,
//!     ) -> BoxFuture<'a, Result<u64, StoreError>> {
//!         self.inner.trim(topic, partition, before)
//!     }
//! }
//!
//! impl Offsets for Counting {
//!     fn committed<'a>(
//!         &'a self,
//!         group: &'a str,
//!         topic: &'a str,
//!         partition: u32,
//!     ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
//!         self.inner.committed(group, topic, partition)
//!     }
//!     fn commit<'a>(
//!         &'a self,
//!         offsets: &'a [GroupOffset],
//!     ) -> BoxFuture<'a, Result<(), StoreError>> {
//!         self.inner.commit(offsets)
//!     }
//!     fn reset_offset<'a>(
//!         &'a self,
//!         offset: &'a GroupOffset,
//!     ) -> BoxFuture<'a, Result<(), StoreError>> {
//!         self.inner.reset_offset(offset)
//!     }
//! }
//!
//! impl DeadLetterLog for Counting {
//!     fn save_dead_letter<'a>(
//!         &'a self,
//!         record: &'a DeadLetterRecord,
//!     ) -> BoxFuture<'a, Result<(), StoreError>> {
//!         self.inner.save_dead_letter(record)
//!     }
//!     fn delete_dead_letter<'a>(
//!         &'a self,
//!         group: &'a str,
//!         topic: &'a str,
//!         partition: u32,
//!         offset: u64,
//!     ) -> BoxFuture<'a, Result<(), StoreError>> {
//!         self.inner.delete_dead_letter(group, topic, partition, offset)
//!     }
//!     fn dead_letters<'a>(
//!         &'a self,
//!         group: &'a str,
//!     ) -> BoxFuture<'a, Result<Vec<DeadLetterRecord>, StoreError>> {
//!         self.inner.dead_letters(group)
//!     }
//! }
//!
//! impl Marks for Counting {
//!     fn is_marked<'a>(
//!         &'a self,
//!         group: &'a str,
//!         id: Uuid,
//!     ) -> BoxFuture<'a, Result<bool, StoreError>> {
//!         self.inner.is_marked(group, id)
//!     }
//!     fn commit_marked<'a>(
//!         &'a self,
//!         offset: &'a GroupOffset,
//!         id: Uuid,
//!     ) -> BoxFuture<'a, Result<(), StoreError>> {
//!         self.inner.commit_marked(offset, id)
//!     }
//! }
//!
//! # #[derive(serde::Serialize, serde::Deserialize, tidings::Event)]
//! # #[event(topic = "orders")] struct Placed;
//! # struct H;
//! # impl tidings::Handler<Placed> for H {
//! #     async fn handle(&mut self, _: &tidings::Envelope<Placed>, _: &tidings::Context) -> Result<(), tidings::HandlerError> { Ok(()) }
//! # }
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Counting is a Store now: the bus takes it.
//! let store = Counting::default();
//! let bus = tidings::Bus::builder()
//!     .store(store.clone())
//!     .topic(tidings::TopicConfig::new("orders").partitions(1))
//!     .subscribe::<Placed, _>("billing", || H)
//!     .build()?;
//! bus.publish_all([Placed, Placed, Placed]).await?;
//! bus.shutdown().await;
//! assert_eq!(store.appended.load(Ordering::Relaxed), 3);
//! assert_eq!(store.committed("billing", "orders", 0).await?, Some(3));
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub use futures::future::BoxFuture;
pub use futures::stream::BoxStream;
pub use uuid::Uuid;

pub use super::codec::{
    checked_from_micros, headers_from_json, headers_to_json, micros, UNREADABLE_HEADERS,
    UNREADABLE_ROW,
};
pub use super::traits::{DeadLetterLog, Log, Marks, Offsets, Store};
pub use super::types::{
    DeadLetterRecord, GroupOffset, HeadWatch, PartitionHead, StoreError, StoredEvent, TryAppend,
};
pub use crate::envelope::Headers;

/// Validates an SQL identifier taken from configuration (a schema name): ASCII letters, digits
/// and `_`, not starting with a digit, at most 63 bytes. What passes can go into SQL text
/// unquoted.
///
/// ```
/// use tidings::store::driver::validate_identifier;
///
/// assert!(validate_identifier("tidings_test_1").is_ok());
/// assert!(validate_identifier("a;drop table x").is_err());
/// ```
///
/// # Errors
///
/// [`StoreError::Config`] naming the identifier and the rule.
pub fn validate_identifier(name: &str) -> Result<(), StoreError> {
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
/// deadlock. Each list is one partition's run of the append: its events get consecutive
/// offsets, in slice order.
///
/// ```
/// use tidings::store::driver::{by_partition, StoredEvent};
/// # fn row(topic: &str, partition: u32) -> StoredEvent {
/// #     StoredEvent {
/// #         topic: topic.into(),
/// #         partition,
/// #         offset: 0,
/// #         id: tidings::Uuid::nil(),
/// #         name: "E".into(),
/// #         version: 1,
/// #         timestamp: std::time::SystemTime::UNIX_EPOCH,
/// #         correlation_id: tidings::Uuid::nil(),
/// #         causation_id: None,
/// #         headers: Default::default(),
/// #         payload: b"null".to_vec(),
/// #     }
/// # }
///
/// let events = [row("orders", 1), row("orders", 0), row("orders", 1), row("audit", 0)];
/// assert_eq!(by_partition(&events), vec![vec![3], vec![1], vec![0, 2]]);
/// ```
pub fn by_partition(events: &[StoredEvent]) -> Vec<Vec<usize>> {
    let mut runs: BTreeMap<(&str, u32), Vec<usize>> = Default::default();
    for (i, e) in events.iter().enumerate() {
        runs.entry((e.topic.as_str(), e.partition))
            .or_default()
            .push(i);
    }
    runs.into_values().collect()
}

/// The offsets of `marks` to commit: per (group, topic, partition) the highest, sorted by
/// (group, topic, partition), so that a statement touches each offset row once and two
/// committers lock rows in the same order.
///
/// ```
/// use tidings::store::driver::{highest_offsets, GroupOffset, Uuid};
///
/// let at = |next_offset| GroupOffset {
///     group: "billing".into(),
///     topic: "orders".into(),
///     partition: 0,
///     next_offset,
/// };
/// let marks = [(at(5), Uuid::now_v7()), (at(7), Uuid::now_v7()), (at(6), Uuid::now_v7())];
/// let offsets = highest_offsets(&marks);
/// assert_eq!(offsets.len(), 1);
/// assert_eq!(offsets[0].next_offset, 7);
/// ```
pub fn highest_offsets(marks: &[(GroupOffset, Uuid)]) -> Vec<&GroupOffset> {
    let mut highest: BTreeMap<(&str, &str, u32), &GroupOffset> = Default::default();
    for (o, _) in marks {
        let key = (o.group.as_str(), o.topic.as_str(), o.partition);
        let entry = highest.entry(key).or_insert(o);
        if o.next_offset > entry.next_offset {
            *entry = o;
        }
    }
    highest.into_values().collect()
}

/// The partition counts of the topics a store handle knows of, for
/// [`Log::known_partitions`]: loaded when the store is opened, raised by its own appends.
/// Clones share the counts.
///
/// ```
/// use tidings::store::driver::PartitionCounts;
///
/// // As read when opening: SELECT topic, MAX(partition_no) + 1 ... GROUP BY topic
/// let counts = PartitionCounts::load([("orders".to_owned(), 4)]);
/// assert_eq!(counts.get("orders"), Some(4));
/// assert_eq!(counts.get("audit"), Some(0));
/// ```
#[derive(Clone, Debug, Default)]
pub struct PartitionCounts(Arc<parking_lot::Mutex<HashMap<String, u32>>>);

impl PartitionCounts {
    /// From (topic, partition count) pairs as a store reads them. A count that is not a `u32`
    /// (negative or too large: data that breaks the store's rules) is taken as `u32::MAX`, so
    /// that [`BusBuilder::build`](crate::BusBuilder::build) refuses the topic rather than
    /// publish past partitions it cannot account for.
    pub fn load(pairs: impl IntoIterator<Item = (String, i64)>) -> Self {
        let map = pairs
            .into_iter()
            .map(|(topic, n)| (topic, u32::try_from(n).unwrap_or(u32::MAX)))
            .collect();
        PartitionCounts(Arc::new(parking_lot::Mutex::new(map)))
    }

    /// Raises the counts to cover `events` (just appended, after the append committed).
    pub fn raise(&self, events: &[StoredEvent]) {
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

    /// The count of `topic` (0 for a topic this handle never saw): what
    /// [`Log::known_partitions`] returns. Always `Some`.
    pub fn get(&self, topic: &str) -> Option<u32> {
        Some(self.0.lock().get(topic).copied().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

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
        assert_eq!(checked_from_micros(micros(t)), Some(t));
    }
}
