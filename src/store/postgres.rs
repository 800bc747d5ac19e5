//! `PostgresStore`: the PostgreSQL store, on sqlx.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, FutureExt};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use super::codec::{headers_to_json, place, placed_dead_letters, position, Columns};
use super::{
    by_partition, micros, validate_identifier, DeadLetterRecord, GroupOffset, PartitionCounts,
    Store, StoreError, StoredEvent, TryAppend,
};

/// A [`Store`] in a PostgreSQL database, in a schema of its own choosing (`public` by default).
/// Its tables (`tidings_*`) and migrations table (`_tidings_migrations`) are created on open.
///
/// Appends reserve their offsets by updating the partition's row in `tidings_heads`, which stays
/// locked until the append commits: two appends to one partition commit in offset order, so a
/// reader never sees offset `n` before `n - 1` is committed and never skips an event that
/// committed late. Appends to other partitions do not wait for each other: the bus appends with
/// [`Store::try_append`], which takes the heads with `FOR UPDATE SKIP LOCKED` in the same single
/// statement, so a head held by another transaction (an application's [`append_in`]) holds up
/// only the publishes to that partition (see [`Store`]). Needs PostgreSQL 12 or later.
///
/// [`append_in`]: PostgresStore::append_in
///
/// ```no_run
/// use tidings::{Bus, PostgresStore};
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
    /// Partition counts by topic, for [`Store::known_partitions`].
    counts: PartitionCounts,
}

/// The statements, with the schema in their table names.
#[derive(Debug)]
struct Sql {
    append: Arc<str>,
    try_append: Arc<str>,
    read: Arc<str>,
    head: Arc<str>,
    offset_at: Arc<str>,
    committed: Arc<str>,
    commit: Arc<str>,
    trim: Arc<str>,
    reset: Arc<str>,
    partitions: Arc<str>,
    save_dead_letter: Arc<str>,
    delete_dead_letter: Arc<str>,
    dead_letters: Arc<str>,
    is_marked: Arc<str>,
    marked: Arc<str>,
    marks: Arc<str>,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let s = schema;
        let q = |sql: String| Arc::<str>::from(sql);
        // The events, inserted at the offsets their partitions' heads (`h`) reserved.
        let insert = format!(
            "ins AS ( \
               INSERT INTO {s}.tidings_events (topic, partition_no, log_offset, event_id, name, version, \
                 timestamp_us, correlation_id, causation_id, headers, payload) \
               SELECT r.topic, r.partition_no, h.next_offset - c.n + r.idx, r.event_id, r.name, r.version, \
                 r.timestamp_us, r.correlation_id, r.causation_id, r.headers, r.payload \
               FROM UNNEST($4::text[], $5::int[], $6::bigint[], $7::uuid[], $8::text[], $9::int[], \
                 $10::bigint[], $11::uuid[], $12::uuid[], $13::text[], $14::bytea[]) \
                 AS r(topic, partition_no, idx, event_id, name, version, timestamp_us, correlation_id, \
                 causation_id, headers, payload) \
               JOIN h ON h.topic = r.topic AND h.partition_no = r.partition_no \
               JOIN counts c ON c.topic = r.topic AND c.partition_no = r.partition_no \
             )"
        );
        Sql {
            // One statement: reserve each partition's offsets by moving its head (the row stays
            // locked until the statement's transaction commits; heads are locked in (topic,
            // partition) order, so concurrent appends cannot deadlock), then insert the events
            // at their offsets.
            append: q(format!(
                "WITH counts AS ( \
                   SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[]) AS c(topic, partition_no, n) \
                 ), h AS ( \
                   INSERT INTO {s}.tidings_heads AS t (topic, partition_no, next_offset) \
                   SELECT topic, partition_no, n FROM counts ORDER BY topic, partition_no \
                   ON CONFLICT (topic, partition_no) DO UPDATE SET next_offset = t.next_offset + EXCLUDED.next_offset \
                   RETURNING t.topic, t.partition_no, t.next_offset \
                 ), {insert} \
                 SELECT topic, partition_no, next_offset FROM h"
            )),
            // The same in one statement, unless a head cannot be locked at once: `locked` takes
            // the heads that are free (never waiting), `busy` are the others (held by another
            // transaction, or not created yet: creating one could wait for another
            // transaction creating it); with any busy nothing is appended and they are returned
            // (with a NULL head).
            try_append: q(format!(
                "WITH counts AS ( \
                   SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[]) AS c(topic, partition_no, n) \
                 ), locked AS MATERIALIZED ( \
                   SELECT t.topic, t.partition_no FROM {s}.tidings_heads t \
                   JOIN counts c ON c.topic = t.topic AND c.partition_no = t.partition_no \
                   FOR UPDATE OF t SKIP LOCKED \
                 ), busy AS MATERIALIZED ( \
                   SELECT c.topic, c.partition_no FROM counts c \
                   WHERE NOT EXISTS (SELECT 1 FROM locked l \
                     WHERE l.topic = c.topic AND l.partition_no = c.partition_no) \
                 ), h AS ( \
                   UPDATE {s}.tidings_heads AS t SET next_offset = t.next_offset + c.n FROM counts c \
                   WHERE c.topic = t.topic AND c.partition_no = t.partition_no \
                     AND NOT EXISTS (SELECT 1 FROM busy) \
                   RETURNING t.topic, t.partition_no, t.next_offset \
                 ), {insert} \
                 SELECT topic, partition_no, next_offset FROM h \
                 UNION ALL SELECT topic, partition_no, NULL::bigint FROM busy"
            )),
            read: q(format!(
                "SELECT topic, partition_no, log_offset, event_id, name, version, timestamp_us, \
                 correlation_id, causation_id, headers, payload FROM {s}.tidings_events \
                 WHERE topic = $1 AND partition_no = $2 AND log_offset >= $3 ORDER BY log_offset LIMIT $4"
            )),
            head: q(format!(
                "SELECT next_offset FROM {s}.tidings_heads WHERE topic = $1 AND partition_no = $2"
            )),
            offset_at: q(format!(
                "SELECT MIN(log_offset) FROM {s}.tidings_events \
                 WHERE topic = $1 AND partition_no = $2 AND timestamp_us >= $3"
            )),
            committed: q(format!(
                "SELECT next_offset FROM {s}.tidings_offsets \
                 WHERE group_name = $1 AND topic = $2 AND partition_no = $3"
            )),
            commit: q(format!(
                "INSERT INTO {s}.tidings_offsets AS o (group_name, topic, partition_no, next_offset) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bigint[]) \
                 ON CONFLICT (group_name, topic, partition_no) \
                 DO UPDATE SET next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset)"
            )),
            trim: q(format!(
                "DELETE FROM {s}.tidings_events WHERE topic = $1 AND partition_no = $2 AND log_offset < $3"
            )),
            reset: q(format!(
                "INSERT INTO {s}.tidings_offsets (group_name, topic, partition_no, next_offset) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (group_name, topic, partition_no) \
                 DO UPDATE SET next_offset = EXCLUDED.next_offset"
            )),
            partitions: q(format!(
                "SELECT MAX(partition_no) + 1 FROM {s}.tidings_heads WHERE topic = $1"
            )),
            save_dead_letter: q(format!(
                "INSERT INTO {s}.tidings_dead_letters (group_name, topic, partition_no, log_offset, \
                 event_id, name, version, timestamp_us, correlation_id, causation_id, headers, payload, \
                 error, permanent, attempts, first_failure_us, last_failure_us, handler, redeliveries) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
                 ON CONFLICT (group_name, topic, partition_no, log_offset) DO UPDATE SET \
                 event_id = EXCLUDED.event_id, name = EXCLUDED.name, version = EXCLUDED.version, \
                 timestamp_us = EXCLUDED.timestamp_us, correlation_id = EXCLUDED.correlation_id, \
                 causation_id = EXCLUDED.causation_id, headers = EXCLUDED.headers, payload = EXCLUDED.payload, \
                 error = EXCLUDED.error, permanent = EXCLUDED.permanent, attempts = EXCLUDED.attempts, \
                 first_failure_us = EXCLUDED.first_failure_us, last_failure_us = EXCLUDED.last_failure_us, \
                 handler = EXCLUDED.handler, redeliveries = EXCLUDED.redeliveries"
            )),
            delete_dead_letter: q(format!(
                "DELETE FROM {s}.tidings_dead_letters WHERE group_name = $1 AND topic = $2 \
                 AND partition_no = $3 AND log_offset = $4"
            )),
            dead_letters: q(format!(
                "SELECT * FROM {s}.tidings_dead_letters WHERE group_name = $1 \
                 ORDER BY topic, partition_no, log_offset"
            )),
            is_marked: q(format!(
                "SELECT 1 FROM {s}.tidings_marks WHERE group_name = $1 AND event_id = $2"
            )),
            marked: q(format!(
                "SELECT event_id FROM {s}.tidings_marks WHERE group_name = $1 AND event_id = ANY($2)"
            )),
            marks: q(format!(
                "INSERT INTO {s}.tidings_marks (group_name, event_id, marked_us) \
                 SELECT g, e, $3 FROM UNNEST($1::text[], $2::uuid[]) AS m(g, e) \
                 ON CONFLICT DO NOTHING"
            )),
        }
    }
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
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_in_schema(url, "public").await
    }

    /// Connects to `url` and keeps the tables in `schema` (created if missing, then migrated).
    /// The name is validated: ASCII letters, digits and `_`.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect); [`StoreError::Config`] for an invalid schema name.
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
    /// use tidings::PostgresStore;
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
        })
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
    /// A bus on the same store hands events to its groups when its own appends commit; events
    /// appended here reach them when that bus next appends to the partition (it sees the gap
    /// and reads the log), or at the latest when it restarts. A bus's publishes to a partition
    /// whose head this transaction holds wait for it (its publishes to other partitions go
    /// on): keep the transaction short.
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

/// A row of `tidings_dead_letters` read back. Its event is read as by [`stored`]; a bookkeeping
/// column that cannot be read (attempts out of range, say) gets a placeholder and the entry's
/// error says so, so that one broken row does not fail the restore of every dead letter.
fn dead_letter(r: &PgRow) -> Result<DeadLetterRecord, StoreError> {
    let (event, mut c) = stored(r)?;
    let mut record = DeadLetterRecord {
        group: c.get("group_name", r.try_get("group_name")),
        event,
        error: c.get("error", r.try_get("error")),
        permanent: c.get("permanent", r.try_get("permanent")),
        attempts: c.int("attempts", r.try_get::<i32, _>("attempts").map(i64::from)),
        first_failure: c.time("first_failure_us", r.try_get("first_failure_us")),
        last_failure: c.time("last_failure_us", r.try_get("last_failure_us")),
        handler: c.get("handler", r.try_get("handler")),
        redeliveries: c.int(
            "redeliveries",
            r.try_get::<i32, _>("redeliveries").map(i64::from),
        ),
    };
    if let Some(errors) = c.errors() {
        record.error.push_str(&format!(
            " (the stored dead letter cannot be fully read: {errors})"
        ));
    }
    Ok(record)
}

impl Store for PostgresStore {
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

    fn committed<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: u32,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        async move {
            let offset = sqlx::query_scalar(AssertSqlSafe(self.sql.committed.clone()))
                .bind(group)
                .bind(topic)
                .bind(partition as i32)
                .fetch_optional(&self.pool)
                .await;
            place(offset, || {
                format!("the offset of group {group:?} in {topic:?} partition {partition}")
            })
        }
        .boxed()
    }

    fn commit<'a>(&'a self, offsets: &'a [GroupOffset]) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            if offsets.is_empty() {
                return Ok(());
            }
            let groups: Vec<&str> = offsets.iter().map(|o| o.group.as_str()).collect();
            let topics: Vec<&str> = offsets.iter().map(|o| o.topic.as_str()).collect();
            let partitions: Vec<i32> = offsets.iter().map(|o| o.partition as i32).collect();
            let nexts: Vec<i64> = offsets.iter().map(|o| o.next_offset as i64).collect();
            sqlx::query(AssertSqlSafe(self.sql.commit.clone()))
                .bind(&groups)
                .bind(&topics)
                .bind(&partitions)
                .bind(&nexts)
                .execute(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(())
        }
        .boxed()
    }

    fn reset_offset<'a>(&'a self, o: &'a GroupOffset) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            sqlx::query(AssertSqlSafe(self.sql.reset.clone()))
                .bind(&o.group)
                .bind(&o.topic)
                .bind(o.partition as i32)
                .bind(o.next_offset as i64)
                .execute(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(())
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

    fn save_dead_letter<'a>(
        &'a self,
        record: &'a DeadLetterRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let e = &record.event;
            sqlx::query(AssertSqlSafe(self.sql.save_dead_letter.clone()))
                .bind(&record.group)
                .bind(&e.topic)
                .bind(e.partition as i32)
                .bind(e.offset as i64)
                .bind(e.id)
                .bind(&e.name)
                .bind(e.version as i32)
                .bind(micros(e.timestamp))
                .bind(e.correlation_id)
                .bind(e.causation_id)
                .bind(headers_to_json(&e.headers))
                .bind(&e.payload)
                .bind(&record.error)
                .bind(record.permanent)
                .bind(record.attempts as i32)
                .bind(micros(record.first_failure))
                .bind(micros(record.last_failure))
                .bind(&record.handler)
                .bind(record.redeliveries as i32)
                .execute(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(())
        }
        .boxed()
    }

    fn delete_dead_letter<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: u32,
        offset: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            sqlx::query(AssertSqlSafe(self.sql.delete_dead_letter.clone()))
                .bind(group)
                .bind(topic)
                .bind(partition as i32)
                .bind(offset as i64)
                .execute(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(())
        }
        .boxed()
    }

    fn dead_letters<'a>(
        &'a self,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Vec<DeadLetterRecord>, StoreError>> {
        async move {
            let rows = sqlx::query(AssertSqlSafe(self.sql.dead_letters.clone()))
                .bind(group)
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(placed_dead_letters(group, rows.iter().map(dead_letter)))
        }
        .boxed()
    }

    fn is_marked<'a>(
        &'a self,
        group: &'a str,
        id: Uuid,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        async move {
            let found: Option<i32> = sqlx::query_scalar(AssertSqlSafe(self.sql.is_marked.clone()))
                .bind(group)
                .bind(id)
                .persistent(false)
                .fetch_optional(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(found.is_some())
        }
        .boxed()
    }

    fn commit_marked<'a>(
        &'a self,
        offset: &'a GroupOffset,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move { self.commit_marks(&[(offset.clone(), id)]).await }.boxed()
    }

    fn marked<'a>(
        &'a self,
        group: &'a str,
        ids: &'a [Uuid],
    ) -> BoxFuture<'a, Result<Vec<Uuid>, StoreError>> {
        async move {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            // Not a prepared statement: a plan cached while the marks table was small (a
            // sequential scan) would stay in use as the table grows to millions of rows.
            sqlx::query_scalar(AssertSqlSafe(self.sql.marked.clone()))
                .bind(group)
                .bind(ids)
                .persistent(false)
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::backend)
        }
        .boxed()
    }

    fn commit_marks<'a>(
        &'a self,
        marks: &'a [(GroupOffset, Uuid)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            if marks.is_empty() {
                return Ok(());
            }
            let groups: Vec<&str> = marks.iter().map(|(o, _)| o.group.as_str()).collect();
            let ids: Vec<Uuid> = marks.iter().map(|(_, id)| *id).collect();
            let offsets = super::highest_offsets(marks);
            let o_groups: Vec<&str> = offsets.iter().map(|o| o.group.as_str()).collect();
            let topics: Vec<&str> = offsets.iter().map(|o| o.topic.as_str()).collect();
            let partitions: Vec<i32> = offsets.iter().map(|o| o.partition as i32).collect();
            let nexts: Vec<i64> = offsets.iter().map(|o| o.next_offset as i64).collect();
            let mut tx = self.pool.begin().await.map_err(StoreError::backend)?;
            sqlx::query(AssertSqlSafe(self.sql.marks.clone()))
                .bind(&groups)
                .bind(&ids)
                .bind(micros(SystemTime::now()))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
            sqlx::query(AssertSqlSafe(self.sql.commit.clone()))
                .bind(&o_groups)
                .bind(&topics)
                .bind(&partitions)
                .bind(&nexts)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
            tx.commit().await.map_err(StoreError::backend)
        }
        .boxed()
    }
}
