//! Persistence: the [`Store`] the bus keeps its partition logs and consumer offsets in, its
//! capabilities, and its backends.
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
//! | [`SqliteStore`] | `sqlite` (default) | one binary: one file, WAL, no server; one process per file |
//! | [`PostgresStore`] | `postgres` | services sharing a PostgreSQL server |
//!
//! The SQL backends ship their migrations and run them when opened.
//!
//! # Capabilities
//!
//! A store is four capabilities, each a trait with its own `# Contract`; [`Store`] is their
//! sum, implemented for every type that has all four (the bus holds an `Arc<dyn Store>`):
//!
//! | trait | keeps | the bus uses it to |
//! |---|---|---|
//! | [`Log`] | the partition logs: append, read, head, offset at a time, trim | commit publishes (group commit), catch groups up, replay, retention |
//! | [`Offsets`] | the consumer groups' committed offsets | resume every group where it stopped; reset it (replay) |
//! | [`DeadLetterLog`] | the groups' dead letters | keep a group's dead letters across restarts |
//! | [`Marks`] | the event ids each group handled, with its offsets | effectively-once delivery |
//!
//! `Arc<S>` has every capability of `S`, so the application can keep a handle beside the bus;
//! import the trait whose methods it calls (`use tidings::store::Log;`). A backend of your own
//! implements the four traits; [`driver`] has the helpers the backends of tidings use and an
//! example.
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

mod codec;
mod connect;
pub mod driver;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;
mod traits;
mod types;

pub(crate) use codec::{encode, intern, stored_event_of, Decoded, Decoder, EncodeError};
pub use codec::{Undecodable, UpcastError, Upcaster};
pub use connect::connect;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::SqliteStore;
pub use traits::{DeadLetterLog, Log, Marks, Offsets, Store};
pub use types::{
    DeadLetterRecord, GroupOffset, HeadWatch, PartitionHead, Retention, StartFrom, StoreError,
    StoredEvent, TryAppend, DEFAULT_MAX_PAYLOAD,
};
