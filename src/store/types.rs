//! The data a store keeps (events, offsets, dead letters) and the settings and errors around it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use crate::envelope::Headers;

/// Default limit of a serialized payload: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// One event as a store keeps it: its place in the log, its metadata and its serialized payload.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Topic.
    pub topic: String,
    /// Partition of the topic.
    pub partition: u32,
    /// Position in the partition's log, assigned by [`Log::append`](super::Log::append).
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
    /// The database is already open as a bus store in another process, and this store keeps to
    /// one ([`SqliteStore`](crate::store::SqliteStore): one file, one process). Stop the other
    /// process, or share the groups of several instances on PostgreSQL.
    #[error("{}", in_use(file, *holder))]
    InUse {
        /// The database file.
        file: std::path::PathBuf,
        /// The process holding it, when it could be told.
        holder: Option<u32>,
    },
}

fn in_use(file: &std::path::Path, holder: Option<u32>) -> String {
    let by = match holder {
        Some(pid) => format!("process {pid}"),
        None => "another process".to_owned(),
    };
    format!(
        "the SQLite database {} is already open as a tidings store by {by}: SQLite is one \
         process per file (stop the other one, or use PostgreSQL to share the groups of several \
         instances)",
        file.display()
    )
}

impl StoreError {
    /// A [`Backend`](StoreError::Backend) error from the database's (or driver's) own error:
    /// what a backend returns when a query fails.
    ///
    /// ```
    /// use tidings::store::StoreError;
    ///
    /// let error = StoreError::backend(std::io::Error::other("connection reset"));
    /// assert!(matches!(error, StoreError::Backend(_)));
    /// assert_eq!(error.to_string(), "store error: connection reset");
    /// ```
    pub fn backend(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Arc::new(error))
    }
}

/// What [`Log::try_append`](super::Log::try_append) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TryAppend {
    /// Every event was appended, as by [`Log::append`](super::Log::append).
    Appended,
    /// Nothing was appended: these partitions, as (topic, partition), each once, could not be
    /// taken without waiting: another transaction holds them (it appended to them and has not
    /// committed yet). A backend may also name a partition it has never written to, whose
    /// creation could wait ([`PostgresStore`](crate::store::PostgresStore) does). Never empty.
    Busy(Vec<(String, u32)>),
}

/// The head of one partition: the offset its next event will get. See [`Log::heads`](super::Log::heads).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartitionHead {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The offset the partition's next event will get (every event below it is committed).
    pub head: u64,
}

/// What a store's head watch reports (see [`Log::watch_heads`](super::Log::watch_heads)): how
/// a bus learns of events that *other* writers (other processes, the application's own
/// transactions) appended, without waiting for its next append or polling.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeadWatch {
    /// A committed append moved this partition's head: every offset below it is committed and
    /// readable. Announced after the commit, never for an append that rolled back.
    Moved(PartitionHead),
    /// Heads may have moved without an announcement (the watch just started or reconnected,
    /// or an announcement could not say which partition): the bus reads every head once
    /// ([`Log::heads`](super::Log::heads)). Announcements follow again from here.
    Resync,
    /// The announcements stopped (the connection was lost): the bus polls the heads every
    /// [poll interval](crate::BusBuilder::poll_interval) until the next `Resync`.
    Lost,
}

/// Where a consumer group starts reading a partition when it has no committed offset (or when
/// it is [reset](crate::Subscription::reset_to)).
///
/// ```
/// use tidings::store::StartFrom;
/// use tidings::Subscription;
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
/// use tidings::store::Retention;
/// use tidings::TopicConfig;
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
