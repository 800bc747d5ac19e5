//! The consumer groups' state in PostgreSQL: committed offsets, dead letters, effectively-once
//! marks (the capabilities [`Offsets`], [`DeadLetterLog`] and [`Marks`] of [`PostgresStore`]).

use std::time::SystemTime;

use futures::future::{BoxFuture, FutureExt};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use super::{stored, PostgresStore};
use crate::store::codec::{place, placed_dead_letters};
use crate::store::driver::{headers_to_json, highest_offsets, micros};
use crate::store::{DeadLetterLog, DeadLetterRecord, GroupOffset, Marks, Offsets, StoreError};

impl Offsets for PostgresStore {
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
}

impl DeadLetterLog for PostgresStore {
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
}

impl Marks for PostgresStore {
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
            let offsets = highest_offsets(marks);
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
