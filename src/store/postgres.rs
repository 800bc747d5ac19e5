//! `PostgresStore`: the PostgreSQL store, on sqlx.

use std::sync::Arc;
use std::time::SystemTime;

use futures::future::{BoxFuture, FutureExt};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use super::codec::{headers_to_json, row};
use super::{
    by_partition, from_micros, micros, validate_identifier, DeadLetterRecord, GroupOffset, Store,
    StoreError, StoredEvent,
};

/// A [`Store`] in a PostgreSQL database, in a schema of its own choosing (`public` by default).
/// Its tables (`tidings_*`) and migrations table (`_tidings_migrations`) are created on open.
///
/// Appends reserve their offsets by updating the partition's row in `tidings_heads`, which stays
/// locked until the append commits: two appends to one partition commit in offset order, so a
/// reader never sees offset `n` before `n - 1` is committed and never skips an event that
/// committed late. Appends to other partitions do not wait for each other.
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
}

/// The statements, with the schema in their table names.
#[derive(Debug)]
struct Sql {
    append: Arc<str>,
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
    mark: Arc<str>,
    marks: Arc<str>,
    commit_one: Arc<str>,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let s = schema;
        let q = |sql: String| Arc::<str>::from(sql);
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
                 ), ins AS ( \
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
                 ) \
                 SELECT topic, partition_no, next_offset FROM h"
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
            mark: q(format!(
                "INSERT INTO {s}.tidings_marks (group_name, event_id, marked_us) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING"
            )),
            commit_one: q(format!(
                "INSERT INTO {s}.tidings_offsets AS o (group_name, topic, partition_no, next_offset) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (group_name, topic, partition_no) \
                 DO UPDATE SET next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset)"
            )),
        }
    }
}

impl PostgresStore {
    /// Connects to `url` and migrates the `public` schema.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_in_schema(url, "public").await
    }

    /// Connects to `url` and keeps the tables in `schema` (created if missing, then migrated).
    /// The name is validated: ASCII letters, digits and `_`.
    pub async fn connect_in_schema(url: &str, schema: &str) -> Result<Self, StoreError> {
        validate_identifier(schema)?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(url)
            .await
            .map_err(StoreError::backend)?;
        Self::from_pool(pool, schema).await
    }

    /// A store on the application's own pool, with its tables in `schema` (created if missing,
    /// then migrated).
    pub async fn from_pool(pool: PgPool, schema: &str) -> Result<Self, StoreError> {
        validate_identifier(schema)?;
        let mut conn = pool.acquire().await.map_err(StoreError::backend)?;
        migrate(&mut conn, schema).await?;
        Ok(PostgresStore {
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
    /// and reads the log), or at the latest when it restarts. A bus appending to a partition
    /// whose head this transaction holds waits for it: keep the transaction short.
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        events: &mut [StoredEvent],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
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
        let done = sqlx::query(AssertSqlSafe(self.sql.append.clone()))
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
        Ok(())
    }

    async fn append_inner(&self, events: &mut [StoredEvent]) -> Result<(), StoreError> {
        // One statement: atomic on its own, one round trip.
        let mut conn = self.pool.acquire().await.map_err(StoreError::backend)?;
        self.append_in(&mut conn, events).await
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
    let result = migrator.run(&mut *conn).await.map_err(StoreError::backend);
    sqlx::query("RESET search_path")
        .execute(&mut *conn)
        .await
        .map_err(StoreError::backend)?;
    result
}

fn stored(r: &PgRow) -> Result<StoredEvent, StoreError> {
    let get = |e: sqlx::Error| StoreError::backend(e);
    row(
        r.try_get("topic").map_err(get)?,
        r.try_get::<i32, _>("partition_no").map_err(get)? as i64,
        r.try_get("log_offset").map_err(get)?,
        r.try_get("event_id").map_err(get)?,
        r.try_get("name").map_err(get)?,
        r.try_get::<i32, _>("version").map_err(get)? as i64,
        r.try_get("timestamp_us").map_err(get)?,
        r.try_get("correlation_id").map_err(get)?,
        r.try_get("causation_id").map_err(get)?,
        r.try_get::<&str, _>("headers").map_err(get)?,
        r.try_get("payload").map_err(get)?,
    )
}

impl Store for PostgresStore {
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
            let rows = sqlx::query(AssertSqlSafe(self.sql.read.clone()))
                .bind(topic)
                .bind(partition as i32)
                .bind(from as i64)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            rows.iter().map(stored).collect()
        }
        .boxed()
    }

    fn head<'a>(
        &'a self,
        topic: &'a str,
        partition: u32,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        async move {
            let head: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.head.clone()))
                .bind(topic)
                .bind(partition as i32)
                .fetch_optional(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(head.unwrap_or(0) as u64)
        }
        .boxed()
    }

    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u32, StoreError>> {
        async move {
            let n: Option<i32> = sqlx::query_scalar(AssertSqlSafe(self.sql.partitions.clone()))
                .bind(topic)
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(n.unwrap_or(0) as u32)
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
            let first: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.offset_at.clone()))
                .bind(topic)
                .bind(partition as i32)
                .bind(micros(at))
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            match first {
                Some(offset) => Ok(offset as u64),
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
            let offset: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.sql.committed.clone()))
                .bind(group)
                .bind(topic)
                .bind(partition as i32)
                .fetch_optional(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(offset.map(|o| o as u64))
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
            rows.iter()
                .map(|r| {
                    let get = |e: sqlx::Error| StoreError::backend(e);
                    Ok(DeadLetterRecord {
                        group: r.try_get("group_name").map_err(get)?,
                        event: stored(r)?,
                        error: r.try_get("error").map_err(get)?,
                        permanent: r.try_get("permanent").map_err(get)?,
                        attempts: r.try_get::<i32, _>("attempts").map_err(get)? as u32,
                        first_failure: from_micros(r.try_get("first_failure_us").map_err(get)?),
                        last_failure: from_micros(r.try_get("last_failure_us").map_err(get)?),
                        handler: r.try_get("handler").map_err(get)?,
                        redeliveries: r.try_get::<i32, _>("redeliveries").map_err(get)? as u32,
                    })
                })
                .collect()
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
        async move {
            let mut tx = self.pool.begin().await.map_err(StoreError::backend)?;
            sqlx::query(AssertSqlSafe(self.sql.mark.clone()))
                .bind(&offset.group)
                .bind(id)
                .bind(micros(SystemTime::now()))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
            sqlx::query(AssertSqlSafe(self.sql.commit_one.clone()))
                .bind(&offset.group)
                .bind(&offset.topic)
                .bind(offset.partition as i32)
                .bind(offset.next_offset as i64)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
            tx.commit().await.map_err(StoreError::backend)
        }
        .boxed()
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
            sqlx::query_scalar(AssertSqlSafe(self.sql.marked.clone()))
                .bind(group)
                .bind(ids)
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
