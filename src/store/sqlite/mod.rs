//! `SqliteStore`: the embedded durable store (one file, WAL, no server), on sqlx.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, FutureExt};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::codec::{place, position, Columns};
use super::driver::{by_partition, headers_to_json, micros, PartitionCounts};
use super::{Log, PartitionHead, StoreError, StoredEvent};

mod groups;
mod lock;

/// Rows per INSERT statement: 11 parameters each stays well under SQLite's 32 766.
const ROWS_PER_INSERT: usize = 500;

const COLUMNS: &str = "topic, partition_no, log_offset, event_id, name, version, timestamp_us, \
                       correlation_id, causation_id, headers, payload";

/// A [`Store`](super::Store) in an SQLite database file: the embedded durable default, for a
/// single binary with no server. Write-ahead logging, `synchronous = FULL` (a committed event
/// survives a power cut), one writer at a time. Its tables (`tidings_*`) are created on open.
///
/// Built on sqlx, so the file can be shared with the application's own sqlx code
/// ([`from_pool`](SqliteStore::from_pool)).
///
/// # One process per file
///
/// A bus on SQLite is one process. Opening the store takes an OS lock on a file beside the
/// database (`events.db.tidings.lock`), held until the last store of the process on that file
/// (and every clone of it) is dropped; a second process opening the file as a store gets
/// [`StoreError::InUse`] naming the file and the holder's pid, instead of dispatching the same
/// consumer groups a second time. The kernel releases the lock when the holder dies, however it
/// dies: the lock file left behind by a `kill -9` never blocks the restart. Only bus stores take
/// it: the application's own connections, and the `sqlite3` shell, read and write the file as
/// before. Several instances sharing their groups are for [`PostgresStore`](super::PostgresStore).
///
/// Inside one process the lock is shared: opening the file again (a restart in a test, a bus
/// rebuilt after a shutdown while the old handle lingers) succeeds. Two buses of one process on
/// one file (or on clones of one store) both dispatch their groups: that is the application's
/// choice, as with [`MemoryStore`](super::MemoryStore).
///
/// The lock is advisory (`flock` on Unix, `LockFileEx` on Windows) on a file of its own rather
/// than SQLite's `locking_mode = EXCLUSIVE`, which would lock out the store's own pool, every
/// reader and the application's connections. On a network file system it is only as good as the
/// file system's locks (SQLite advises against those anyway).
///
/// ```no_run
/// use tidings::store::SqliteStore;
/// use tidings::Bus;
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = SqliteStore::open("events.db").await?;
/// let bus = Bus::builder().store(store).build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection kept for writes: SQLite has one writer at a time anyway, and taking a
    /// connection from the pool for every append costs more than the append's statements.
    writer: Arc<tokio::sync::Mutex<Writer>>,
    /// Partition counts by topic, for [`Log::known_partitions`].
    counts: PartitionCounts,
    /// This process's hold on the file: no other process opens it as a store meanwhile.
    _lock: Arc<lock::ProcessLock>,
}

/// The write connection, and whether a transaction may have been left open on it (a cancelled
/// append): the next write rolls it back first.
struct Writer {
    conn: SqliteConnection,
    open_tx: bool,
}

impl Writer {
    async fn clean(&mut self) {
        if self.open_tx {
            // Harmless if the transaction never began.
            let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
            self.open_tx = false;
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (or creates) the database file at `path` and migrates it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for `":memory:"` (see [`open_with`](Self::open_with));
    /// [`StoreError::InUse`] if another process has the file open as a store;
    /// [`StoreError::Backend`] if the file cannot be opened, locked or migrated.
    ///
    /// # Cancel safety
    ///
    /// Dropped before it completes, no store is made. Migrations that already ran are kept (sqlx
    /// runs each in its own transaction and records it), and the next open goes on from there.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        Self::open_with(options).await
    }

    /// Opens the database described by a URL such as `sqlite://events.db` (created if missing)
    /// and migrates it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for an in-memory or temporary database, in any of its forms
    /// (`sqlite::memory:`, `sqlite://:memory:`, `sqlite:file::memory:?cache=shared`,
    /// `?mode=memory`, an empty file name): it would not be durable, so use
    /// [`MemoryStore`](crate::store::MemoryStore). [`StoreError::InUse`] if another process has the
    /// file open as a store. [`StoreError::Backend`] if the URL is invalid or the database cannot
    /// be opened, locked or migrated.
    ///
    /// # Cancel safety
    ///
    /// Dropped before it completes, no store is made. Migrations that already ran are kept (sqlx
    /// runs each in its own transaction and records it), and the next open goes on from there.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::backend)?
            .create_if_missing(true);
        Self::open_with(options).await
    }

    /// Opens a database with these options (plus WAL, `synchronous = FULL` and a busy timeout)
    /// and migrates it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for an in-memory or temporary database, however the options describe
    /// it (each connection would see its own, and nothing would survive the process): use
    /// [`MemoryStore`](crate::store::MemoryStore). [`StoreError::InUse`] if another process has the
    /// file open as a store. [`StoreError::Backend`] if the database cannot be opened, locked or
    /// migrated.
    ///
    /// # Cancel safety
    ///
    /// Dropped before it completes, no store is made. Migrations that already ran are kept (sqlx
    /// runs each in its own transaction and records it), and the next open goes on from there.
    pub async fn open_with(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        if options.get_filename() == Path::new(":memory:") {
            return Err(in_memory_refused());
        }
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(StoreError::backend)?;
        Self::from_pool(pool).await
    }

    /// A store on the application's own pool; runs the migrations. Its tables are named
    /// `tidings_*`; the migrations are tracked in `_tidings_migrations`, apart from the
    /// application's own. Takes the file's [one-process lock](Self#one-process-per-file) before
    /// it migrates anything.
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for a pool on an in-memory or temporary database (as
    /// [`open_with`](Self::open_with)); [`StoreError::InUse`] if another process has the file
    /// open as a store; [`StoreError::Backend`] if it cannot be locked or the migrations fail.
    ///
    /// # Cancel safety
    ///
    /// Dropped before it completes, no store is made. Migrations that already ran are kept (sqlx
    /// runs each in its own transaction and records it), and the next open goes on from there.
    pub async fn from_pool(pool: SqlitePool) -> Result<Self, StoreError> {
        // Whatever the form (`in_memory(true)`, which `mode=memory` and `sqlite::memory:` set, a
        // `file::memory:` or `file:x?mode=memory` URI as the file name, an empty name), SQLite
        // itself says whether the main database has a file.
        let file: String =
            sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
                .fetch_one(&pool)
                .await
                .map_err(StoreError::backend)?;
        if file.is_empty() {
            return Err(in_memory_refused());
        }
        let lock = lock::ProcessLock::acquire(Path::new(&file))?;
        let mut migrator = sqlx::migrate!("src/store/migrations/sqlite");
        migrator.dangerous_set_table_name("_tidings_migrations");
        migrator.run(&pool).await.map_err(StoreError::backend)?;
        let counts: Vec<(String, i64)> =
            sqlx::query_as("SELECT topic, MAX(partition_no) + 1 FROM tidings_heads GROUP BY topic")
                .fetch_all(&pool)
                .await
                .map_err(StoreError::backend)?;
        let writer = pool.acquire().await.map_err(StoreError::backend)?.detach();
        Ok(SqliteStore {
            counts: PartitionCounts::load(counts),
            pool,
            writer: Arc::new(tokio::sync::Mutex::new(Writer {
                conn: writer,
                open_tx: false,
            })),
            _lock: lock,
        })
    }

    /// The pool, to run the application's own queries on the same database.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn append_inner(&self, events: &mut [StoredEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut writer = self.writer.lock().await;
        writer.clean().await;
        writer.open_tx = true;
        let result = self.append_on(&mut writer.conn, events).await;
        match result {
            Ok(()) => self.counts.raise(events),
            Err(_) => writer.clean().await,
        }
        writer.open_tx = false;
        result
    }

    async fn append_on(
        &self,
        conn: &mut SqliteConnection,
        events: &mut [StoredEvent],
    ) -> Result<(), StoreError> {
        // BEGIN IMMEDIATE takes the write lock at once: a deferred transaction that reads a
        // head and then writes could fail to upgrade instead of waiting.
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *conn)
            .await
            .map_err(StoreError::backend)?;
        let runs = by_partition(events);
        let mut heads = Vec::with_capacity(runs.len());
        for run in &runs {
            let (topic, partition) = (&events[run[0]].topic, events[run[0]].partition);
            // Read inside the write transaction: another writer (another store of this process,
            // the application's own connection) may have appended since.
            let head = sqlx::query_scalar(
                "SELECT next_offset FROM tidings_heads WHERE topic = ? AND partition_no = ?",
            )
            .bind(topic)
            .bind(partition as i64)
            .fetch_optional(&mut *conn)
            .await;
            let head: u64 = place(head, || {
                format!("the head of {topic:?} partition {partition}")
            })?
            .unwrap_or(0);
            heads.push((topic.clone(), partition, head + run.len() as u64));
            for (offset, &i) in (head..).zip(run.iter()) {
                events[i].offset = offset;
            }
        }
        let rows: Vec<&StoredEvent> = runs.iter().flatten().map(|&i| &events[i]).collect();
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new(format!("INSERT INTO tidings_events ({COLUMNS}) "));
            q.push_values(chunk, |mut b, e| {
                b.push_bind(&e.topic)
                    .push_bind(e.partition as i64)
                    .push_bind(e.offset as i64)
                    .push_bind(e.id)
                    .push_bind(&e.name)
                    .push_bind(e.version as i64)
                    .push_bind(micros(e.timestamp))
                    .push_bind(e.correlation_id)
                    .push_bind(e.causation_id)
                    .push_bind(headers_to_json(&e.headers))
                    .push_bind(&e.payload);
            });
            q.build()
                .execute(&mut *conn)
                .await
                .map_err(StoreError::backend)?;
        }
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO tidings_heads (topic, partition_no, next_offset) ");
        q.push_values(&heads, |mut b, (topic, partition, next)| {
            b.push_bind(topic)
                .push_bind(*partition as i64)
                .push_bind(*next as i64);
        });
        q.push(
            " ON CONFLICT (topic, partition_no) DO UPDATE SET next_offset = excluded.next_offset",
        );
        q.build()
            .execute(&mut *conn)
            .await
            .map_err(StoreError::backend)?;
        sqlx::query("COMMIT")
            .execute(&mut *conn)
            .await
            .map_err(StoreError::backend)?;
        Ok(())
    }
}

/// Why an in-memory database is refused.
fn in_memory_refused() -> StoreError {
    StoreError::Config(
        "an in-memory or temporary SQLite database is not durable (and each connection may see \
         its own); give a file, or use MemoryStore"
            .into(),
    )
}

/// A row of `tidings_events` (or the event of a `tidings_dead_letters` row) read back, column
/// by column: a column SQLite's loose typing let a wrong value into (an id of the wrong length or
/// as text, a version as text or out of range, a time as a real) marks the row unreadable (a
/// dead letter for each group reading it, which goes on) instead of failing the whole read.
/// Only a row whose place in the log cannot be read is an error ([`StoreError::Corrupt`]).
fn stored(r: &SqliteRow) -> Result<(StoredEvent, Columns), StoreError> {
    let (topic, partition, offset) = position(
        r.try_get("topic"),
        r.try_get("partition_no"),
        r.try_get("log_offset"),
    )?;
    let mut c = Columns::default();
    let event = StoredEvent {
        topic,
        partition,
        offset,
        id: c.get("event_id", r.try_get("event_id")),
        name: c.get("name", r.try_get("name")),
        version: c.int("version", r.try_get("version")),
        timestamp: c.time("timestamp_us", r.try_get("timestamp_us")),
        correlation_id: c.get("correlation_id", r.try_get("correlation_id")),
        causation_id: c.get("causation_id", r.try_get("causation_id")),
        headers: c.headers(r.try_get::<&str, _>("headers")),
        payload: c.get("payload", r.try_get("payload")),
    };
    Ok((c.finish(event), c))
}

impl Log for SqliteStore {
    fn append<'a>(
        &'a self,
        events: &'a mut [StoredEvent],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.append_inner(events).boxed()
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        async move {
            let rows = sqlx::query(
                "SELECT topic, partition_no, log_offset, event_id, name, version, timestamp_us, \
                 correlation_id, causation_id, headers, payload FROM tidings_events \
                 WHERE topic = ? AND partition_no = ? AND log_offset >= ? \
                 ORDER BY log_offset LIMIT ?",
            )
            .bind(topic)
            .bind(partition as i64)
            .bind(from as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::backend)?;
            rows.iter().map(|r| stored(r).map(|(e, _)| e)).collect()
        }
        .boxed()
    }

    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u32, StoreError>> {
        async move {
            let n = sqlx::query_scalar(
                "SELECT MAX(partition_no) + 1 FROM tidings_heads WHERE topic = ?",
            )
            .bind(topic)
            .fetch_one(&self.pool)
            .await;
            Ok(place(n, || format!("the partitions of {topic:?}"))?.unwrap_or(0))
        }
        .boxed()
    }

    fn known_partitions(&self, topic: &str) -> Option<u32> {
        self.counts.get(topic)
    }

    fn head<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        async move {
            let head = sqlx::query_scalar(
                "SELECT next_offset FROM tidings_heads WHERE topic = ? AND partition_no = ?",
            )
            .bind(topic)
            .bind(partition as i64)
            .fetch_optional(&self.pool)
            .await;
            Ok(place(head, || {
                format!("the head of {topic:?} partition {partition}")
            })?
            .unwrap_or(0))
        }
        .boxed()
    }

    fn offset_at<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        at: SystemTime,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        async move {
            let first = sqlx::query_scalar(
                "SELECT MIN(log_offset) FROM tidings_events \
                 WHERE topic = ? AND partition_no = ? AND timestamp_us >= ?",
            )
            .bind(topic)
            .bind(partition as i64)
            .bind(micros(at))
            .fetch_one(&self.pool)
            .await;
            match place(first, || {
                format!("an offset of {topic:?} partition {partition}")
            })? {
                Some(offset) => Ok(offset),
                None => self.head(topic, partition).await,
            }
        }
        .boxed()
    }

    fn trim<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        before: u64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        async move {
            let done = sqlx::query(
                "DELETE FROM tidings_events WHERE topic = ? AND partition_no = ? AND log_offset < ?",
            )
            .bind(topic)
            .bind(partition as i64)
            .bind(before as i64)
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
            Ok(done.rows_affected())
        }
        .boxed()
    }

    fn heads<'a>(
        &'a self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<PartitionHead>, StoreError>> {
        async move {
            // One row per partition ever written: all of them, filtered here.
            let rows = sqlx::query("SELECT topic, partition_no, next_offset FROM tidings_heads")
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            let mut heads = Vec::new();
            for r in &rows {
                let (topic, partition, head) = position(
                    r.try_get("topic"),
                    r.try_get("partition_no"),
                    r.try_get("next_offset"),
                )?;
                if topics.contains(&topic) {
                    heads.push(PartitionHead {
                        topic,
                        partition,
                        head,
                    });
                }
            }
            Ok(heads)
        }
        .boxed()
    }
}
