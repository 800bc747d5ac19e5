//! `PostgresStore`: the PostgreSQL store, on sqlx.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, FutureExt};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use super::codec::{place, position, Columns};
use super::driver::{by_partition, headers_to_json, micros, validate_identifier, PartitionCounts};
use super::{HeadWatch, Log, PartitionHead, StoreError, StoredEvent, TryAppend};

mod groups;
mod sql;
mod watch;

use sql::Sql;

/// A [`Store`](super::Store) in a PostgreSQL database, in a schema of its own choosing
/// (`public` by default). Its tables (`tidings_*`) and migrations table (`_tidings_migrations`)
/// are created on open.
///
/// Appends reserve their offsets by updating the partition's row in `tidings_heads`, which stays
/// locked until the append commits: two appends to one partition commit in offset order, so a
/// reader never sees offset `n` before `n - 1` is committed and never skips an event that
/// committed late. Appends to other partitions do not wait for each other: the bus appends with
/// [`Log::try_append`], which takes the heads with `FOR UPDATE SKIP LOCKED` in the same single
/// statement, so a head held by another transaction (an application's [`append_in`]) holds up
/// only the publishes to that partition (see [`Log`]). Needs PostgreSQL 12 or later.
///
/// Each append announces the heads it moved (`NOTIFY` on the channel `tidings_<schema>`,
/// delivered at commit), and a bus on the store listens (`LISTEN`, one connection of its own
/// besides the pool): events other processes append reach its groups within milliseconds,
/// without it appending anything (see [`Log::watch_heads`]; [`listen`](Self::listen) turns the
/// listening off).
///
/// [`append_in`]: PostgresStore::append_in
///
/// ```no_run
/// use tidings::store::PostgresStore;
/// use tidings::Bus;
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/app").await?;
/// let bus = Bus::builder().store(store).build()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    schema: Arc<str>,
    sql: Arc<Sql>,
    /// Partition counts by topic, for [`Log::known_partitions`].
    counts: PartitionCounts,
    /// Whether [`Log::watch_heads`] listens (see [`listen`](Self::listen)).
    listen: bool,
}

impl PostgresStore {
    /// How long [`connect`](Self::connect) and [`connect_in_schema`](Self::connect_in_schema)
    /// try to open a connection before they give up (a server that is down or unreachable):
    /// 5 s. Choose another bound with [`connect_with`](Self::connect_with).
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// The pool options [`connect`](Self::connect) uses: at most 8 connections, and
    /// [`DEFAULT_CONNECT_TIMEOUT`](Self::DEFAULT_CONNECT_TIMEOUT) as the acquire timeout.
    /// Start from them to change one setting with [`connect_with`](Self::connect_with).
    pub fn pool_options() -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Self::DEFAULT_CONNECT_TIMEOUT)
    }

    /// Connects to `url` and migrates the `public` schema.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] if the URL is invalid, if no connection could be opened within
    /// [`DEFAULT_CONNECT_TIMEOUT`](Self::DEFAULT_CONNECT_TIMEOUT) (a server that is down), or if
    /// the migrations fail.
    ///
    /// # Cancel safety
    ///
    /// Dropped before it completes, no store is made. Migrations that already ran are kept (sqlx
    /// runs each in its own transaction and records it), and the next open goes on from there.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_in_schema(url, "public").await
    }

    /// Connects to `url` and keeps the tables in `schema` (created if missing, then migrated).
    /// The name is validated: ASCII letters, digits and `_`.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect); [`StoreError::Config`] for an invalid schema name.
    ///
    /// # Cancel safety
    ///
    /// Dropped before it completes, no store is made. Migrations that already ran are kept (sqlx
    /// runs each in its own transaction and records it), and the next open goes on from there.
    pub async fn connect_in_schema(url: &str, schema: &str) -> Result<Self, StoreError> {
        validate_identifier(schema)?;
        let options: PgConnectOptions = url.parse().map_err(StoreError::backend)?;
        Self::connect_with(options, Self::pool_options(), schema).await
    }

    /// Connects with these connection and pool options and keeps the tables in `schema`
    /// (created if missing, then migrated).
    ///
    /// Opening the first connection takes at most the pool's
    /// [`acquire_timeout`](PgPoolOptions::acquire_timeout) (sqlx retries a refused connection
    /// until then, for a server that is starting); the same bound applies later whenever an
    /// operation waits for a connection of the pool. Start from
    /// [`pool_options`](Self::pool_options) to keep the other defaults:
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tidings::store::PostgresStore;
    ///
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = PostgresStore::connect_with(
    ///     "postgres://postgres@127.0.0.1:5432/app".parse()?,
    ///     PostgresStore::pool_options().acquire_timeout(Duration::from_secs(1)),
    ///     "public",
    /// )
    /// .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for an invalid schema name; [`StoreError::Backend`] if no
    /// connection could be opened in time (its message says how long it tried) or the
    /// migrations fail.
    ///
    /// # Cancel safety
    ///
    /// Dropped before it completes, no store is made. Migrations that already ran are kept (sqlx
    /// runs each in its own transaction and records it), and the next open goes on from there.
    pub async fn connect_with(
        options: PgConnectOptions,
        pool: PgPoolOptions,
        schema: &str,
    ) -> Result<Self, StoreError> {
        validate_identifier(schema)?;
        let timeout = pool.get_acquire_timeout();
        let (host, port) = (options.get_host().to_owned(), options.get_port());
        let pool = pool
            .connect_with(options)
            .await
            .map_err(|error| match error {
                sqlx::Error::PoolTimedOut => StoreError::backend(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no connection to PostgreSQL at {host}:{port} within {timeout:?} \
                         (is the server up and reachable?)"
                    ),
                )),
                other => StoreError::backend(other),
            })?;
        Self::from_pool(pool, schema).await
    }

    /// A store on the application's own pool, with its tables in `schema` (created if missing,
    /// then migrated).
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for an invalid schema name; [`StoreError::Backend`] if no
    /// connection can be had from the pool or the migrations fail.
    ///
    /// # Cancel safety
    ///
    /// Dropped before it completes, no store is made. Migrations that already ran are kept (sqlx
    /// runs each in its own transaction and records it), and the next open goes on from there.
    pub async fn from_pool(pool: PgPool, schema: &str) -> Result<Self, StoreError> {
        validate_identifier(schema)?;
        let mut conn = pool.acquire().await.map_err(StoreError::backend)?;
        migrate(&mut conn, schema).await?;
        let counts: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT topic, MAX(partition_no)::bigint + 1 FROM {schema}.tidings_heads GROUP BY topic"
        )))
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::backend)?;
        Ok(PostgresStore {
            counts: PartitionCounts::load(counts),
            pool,
            schema: Arc::from(schema),
            sql: Arc::new(Sql::new(schema)),
            listen: true,
        })
    }

    /// Whether a bus on this store listens for the announcements of appends (`LISTEN`, on a
    /// connection of its own; default `true`), to hand its groups the events of other processes
    /// within milliseconds. With `false` it reads the heads every
    /// [poll interval](crate::BusBuilder::poll_interval) instead: for a connection pooler
    /// that does not keep `LISTEN` (PgBouncer in transaction mode), or a server that limits
    /// connections. Appends are announced (`NOTIFY`) either way.
    #[must_use]
    pub fn listen(mut self, listen: bool) -> Self {
        self.listen = listen;
        self
    }

    /// The pool, to run the application's own queries on the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema the tables are in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Appends `events` inside a transaction of the caller's (the transactional outbox: events
    /// commit or roll back with the caller's own writes). Offsets are written into the events;
    /// the partitions' heads stay locked until the caller's transaction ends, so keep it short.
    ///
    /// The append is announced at commit (`NOTIFY`), like a bus's: buses on the same store
    /// read the events from the log within milliseconds of the commit, in log order with their
    /// own (see [`Log::watch_heads`]). A bus's publishes to a partition
    /// whose head this transaction holds wait for it (its publishes to other partitions go
    /// on): keep the transaction short.
    ///
    /// # Cancel safety
    ///
    /// It runs on the caller's connection: dropped half-way, the statement may or may not have run;
    /// the caller's transaction decides (roll it back, or drop it, which rolls back).
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        events: &mut [StoredEvent],
    ) -> Result<(), StoreError> {
        let statement = self.sql.append.clone();
        self.append_with(conn, events, statement).await.map(|_| ())
    }

    /// Runs one of the append statements (`append`, or `try_append` that reports busy
    /// partitions instead of waiting for them) on `conn`.
    async fn append_with(
        &self,
        conn: &mut PgConnection,
        events: &mut [StoredEvent],
        statement: Arc<str>,
    ) -> Result<TryAppend, StoreError> {
        if events.is_empty() {
            return Ok(TryAppend::Appended);
        }
        let runs = by_partition(events);
        let n = events.len();
        let mut run_topics = Vec::with_capacity(runs.len());
        let mut run_partitions = Vec::with_capacity(runs.len());
        let mut run_counts = Vec::with_capacity(runs.len());
        let mut topics = Vec::with_capacity(n);
        let mut partitions = Vec::with_capacity(n);
        let mut idx = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut names = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        let mut correlations = Vec::with_capacity(n);
        let mut causations: Vec<Option<Uuid>> = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        for run in &runs {
            let first = &events[run[0]];
            run_topics.push(first.topic.clone());
            run_partitions.push(first.partition as i32);
            run_counts.push(run.len() as i64);
            for (i, &e) in run.iter().enumerate() {
                let e = &mut events[e];
                topics.push(e.topic.clone());
                partitions.push(e.partition as i32);
                idx.push(i as i64);
                ids.push(e.id);
                names.push(e.name.clone());
                versions.push(e.version as i32);
                times.push(micros(e.timestamp));
                correlations.push(e.correlation_id);
                causations.push(e.causation_id);
                headers.push(headers_to_json(&e.headers));
                payloads.push(std::mem::take(&mut e.payload));
            }
        }
        let done = sqlx::query(AssertSqlSafe(statement))
            .bind(&run_topics)
            .bind(&run_partitions)
            .bind(&run_counts)
            .bind(&topics)
            .bind(&partitions)
            .bind(&idx)
            .bind(&ids)
            .bind(&names)
            .bind(&versions)
            .bind(&times)
            .bind(&correlations)
            .bind(&causations)
            .bind(&headers)
            .bind(&payloads)
            .bind(&*self.sql.channel)
            .fetch_all(&mut *conn)
            .await;
        // Payloads go back to their events, whatever happened.
        let mut payloads = payloads.into_iter();
        for &i in runs.iter().flatten() {
            events[i].payload = payloads.next().unwrap_or_default();
        }
        let heads = done.map_err(StoreError::backend)?;
        // A busy partition comes back with a NULL head (and then nothing was appended).
        let mut busy = Vec::new();
        for r in &heads {
            if r.try_get::<Option<i64>, _>(2)
                .map_err(StoreError::backend)?
                .is_none()
            {
                let topic: String = r.try_get(0).map_err(StoreError::backend)?;
                let partition: i32 = r.try_get(1).map_err(StoreError::backend)?;
                busy.push((topic, partition as u32));
            }
        }
        if !busy.is_empty() {
            return Ok(TryAppend::Busy(busy));
        }
        for (run, (topic, partition, count)) in runs.iter().zip(
            run_topics
                .iter()
                .zip(&run_partitions)
                .zip(&run_counts)
                .map(|((t, p), c)| (t, p, c)),
        ) {
            let next: i64 = heads
                .iter()
                .find(|r| {
                    r.try_get::<&str, _>(0).ok() == Some(topic.as_str())
                        && r.try_get::<i32, _>(1).ok() == Some(*partition)
                })
                .ok_or_else(|| StoreError::Corrupt("an append got no head back".into()))?
                .try_get(2)
                .map_err(StoreError::backend)?;
            let first = (next - count) as u64;
            for (offset, &i) in (first..).zip(run.iter()) {
                events[i].offset = offset;
            }
        }
        Ok(TryAppend::Appended)
    }

    async fn append_inner(
        &self,
        events: &mut [StoredEvent],
        statement: Arc<str>,
    ) -> Result<TryAppend, StoreError> {
        // One statement: atomic on its own, one round trip.
        let mut conn = self.pool.acquire().await.map_err(StoreError::backend)?;
        let appended = self.append_with(&mut conn, events, statement).await?;
        if matches!(appended, TryAppend::Appended) {
            self.counts.raise(events);
        }
        Ok(appended)
    }
}

/// Creates the schema if needed and runs the migrations in it, under an advisory lock so that
/// processes opening the store at once migrate it once.
async fn migrate(conn: &mut PgConnection, schema: &str) -> Result<(), StoreError> {
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}"
    )))
    .execute(&mut *conn)
    .await
    .map_err(StoreError::backend)?;
    sqlx::query(AssertSqlSafe(format!("SET search_path TO {schema}")))
        .execute(&mut *conn)
        .await
        .map_err(StoreError::backend)?;
    let mut migrator = sqlx::migrate!("src/store/migrations/postgres");
    migrator.dangerous_set_table_name("_tidings_migrations");
    // `run_direct` on the connection, not `run` (generic over `Acquire`): the future of `run`
    // is `Send` only for some lifetimes, which made `connect` impossible to `tokio::spawn`.
    let result = migrator
        .run_direct(None, &mut *conn, false)
        .await
        .map_err(StoreError::backend);
    sqlx::query("RESET search_path")
        .execute(&mut *conn)
        .await
        .map_err(StoreError::backend)?;
    result
}

/// A row of `tidings_events` (or the event of a `tidings_dead_letters` row) read back, column
/// by column: a value out of range (a negative version, say) marks the row unreadable (a dead
/// letter for each group reading it, which goes on) instead of failing the whole read. Only a
/// row whose place in the log cannot be read is an error ([`StoreError::Corrupt`]).
fn stored(r: &PgRow) -> Result<(StoredEvent, Columns), StoreError> {
    let (topic, partition, offset) = position(
        r.try_get("topic"),
        r.try_get::<i32, _>("partition_no").map(i64::from),
        r.try_get("log_offset"),
    )?;
    let mut c = Columns::default();
    let event = StoredEvent {
        topic,
        partition,
        offset,
        id: c.get("event_id", r.try_get("event_id")),
        name: c.get("name", r.try_get("name")),
        version: c.int("version", r.try_get::<i32, _>("version").map(i64::from)),
        timestamp: c.time("timestamp_us", r.try_get("timestamp_us")),
        correlation_id: c.get("correlation_id", r.try_get("correlation_id")),
        causation_id: c.get("causation_id", r.try_get("causation_id")),
        headers: c.headers(r.try_get::<&str, _>("headers")),
        payload: c.get("payload", r.try_get("payload")),
    };
    Ok((c.finish(event), c))
}

impl Log for PostgresStore {
    fn append<'a>(
        &'a self,
        events: &'a mut [StoredEvent],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let statement = self.sql.append.clone();
        self.append_inner(events, statement)
            .map(|r| r.map(|_| ()))
            .boxed()
    }

    fn try_append<'a>(
        &'a self,
        events: &'a mut [StoredEvent],
    ) -> BoxFuture<'a, Result<TryAppend, StoreError>> {
        let statement = self.sql.try_append.clone();
        self.append_inner(events, statement).boxed()
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        async move {
            let rows = sqlx::query(AssertSqlSafe(self.sql.read.clone()))
                .bind(topic)
                .bind(partition as i32)
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
            let n =
                sqlx::query_scalar::<_, Option<i32>>(AssertSqlSafe(self.sql.partitions.clone()))
                    .bind(topic)
                    .fetch_one(&self.pool)
                    .await
                    .map(|n| n.map(i64::from));
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
            let head = sqlx::query_scalar(AssertSqlSafe(self.sql.head.clone()))
                .bind(topic)
                .bind(partition as i32)
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
            let first = sqlx::query_scalar(AssertSqlSafe(self.sql.offset_at.clone()))
                .bind(topic)
                .bind(partition as i32)
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
            let done = sqlx::query(AssertSqlSafe(self.sql.trim.clone()))
                .bind(topic)
                .bind(partition as i32)
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
            let rows = sqlx::query(AssertSqlSafe(self.sql.heads.clone()))
                .bind(topics)
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            rows.iter()
                .map(|r| {
                    let (topic, partition, head) = position(
                        r.try_get("topic"),
                        r.try_get::<i32, _>("partition_no").map(i64::from),
                        r.try_get("next_offset"),
                    )?;
                    Ok(PartitionHead {
                        topic,
                        partition,
                        head,
                    })
                })
                .collect()
        }
        .boxed()
    }

    /// `LISTEN` on the schema's channel, on a connection of its own (not one of the pool's):
    /// every append to the schema, by any process, is announced at its commit.
    fn watch_heads(&self) -> Option<futures::stream::BoxStream<'static, HeadWatch>> {
        if !self.listen {
            return None;
        }
        let options = (*self.pool.connect_options()).clone();
        Some(watch::watch(options, self.sql.channel.to_string()))
    }
}
