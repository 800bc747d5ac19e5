//! The consumer groups' state in SQLite: committed offsets, dead letters, effectively-once
//! marks (the capabilities [`Offsets`], [`DeadLetterLog`] and [`Marks`] of [`SqliteStore`]).

use std::time::SystemTime;

use futures::future::{BoxFuture, FutureExt};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::{stored, SqliteStore, ROWS_PER_INSERT};
use crate::store::codec::{place, placed_dead_letters};
use crate::store::driver::{headers_to_json, highest_offsets, micros};
use crate::store::{DeadLetterLog, DeadLetterRecord, GroupOffset, Marks, Offsets, StoreError};

impl Offsets for SqliteStore {
    fn committed<'a>(
        &'a self,
        group: &'a str,
        topic: &'a str,
        partition: u32,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        async move {
            let offset = sqlx::query_scalar(
                "SELECT next_offset FROM tidings_offsets \
                 WHERE group_name = ? AND topic = ? AND partition_no = ?",
            )
            .bind(group)
            .bind(topic)
            .bind(partition as i64)
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
            let mut writer = self.writer.lock().await;
            writer.clean().await;
            let mut tx = sqlx::Connection::begin_with(&mut writer.conn, "BEGIN IMMEDIATE")
                .await
                .map_err(StoreError::backend)?;
            upsert_offsets(&mut tx, offsets.iter()).await?;
            tx.commit().await.map_err(StoreError::backend)
        }
        .boxed()
    }

    fn reset_offset<'a>(&'a self, o: &'a GroupOffset) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let mut writer = self.writer.lock().await;
            writer.clean().await;
            sqlx::query(
                "INSERT INTO tidings_offsets (group_name, topic, partition_no, next_offset) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (group_name, topic, partition_no) \
                 DO UPDATE SET next_offset = excluded.next_offset",
            )
            .bind(&o.group)
            .bind(&o.topic)
            .bind(o.partition as i64)
            .bind(o.next_offset as i64)
            .execute(&mut writer.conn)
            .await
            .map_err(StoreError::backend)?;
            Ok(())
        }
        .boxed()
    }
}

impl DeadLetterLog for SqliteStore {
    fn save_dead_letter<'a>(
        &'a self,
        record: &'a DeadLetterRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            let e = &record.event;
            let mut writer = self.writer.lock().await;
            writer.clean().await;
            sqlx::query(
                "INSERT OR REPLACE INTO tidings_dead_letters (group_name, topic, partition_no, \
                 log_offset, event_id, name, version, timestamp_us, correlation_id, causation_id, \
                 headers, payload, error, permanent, attempts, first_failure_us, last_failure_us, \
                 handler, redeliveries) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&record.group)
            .bind(&e.topic)
            .bind(e.partition as i64)
            .bind(e.offset as i64)
            .bind(e.id)
            .bind(&e.name)
            .bind(e.version as i64)
            .bind(micros(e.timestamp))
            .bind(e.correlation_id)
            .bind(e.causation_id)
            .bind(headers_to_json(&e.headers))
            .bind(&e.payload)
            .bind(&record.error)
            .bind(record.permanent)
            .bind(record.attempts as i64)
            .bind(micros(record.first_failure))
            .bind(micros(record.last_failure))
            .bind(&record.handler)
            .bind(record.redeliveries as i64)
            .execute(&mut writer.conn)
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
            let mut writer = self.writer.lock().await;
            writer.clean().await;
            sqlx::query(
                "DELETE FROM tidings_dead_letters WHERE group_name = ? AND topic = ? \
                 AND partition_no = ? AND log_offset = ?",
            )
            .bind(group)
            .bind(topic)
            .bind(partition as i64)
            .bind(offset as i64)
            .execute(&mut writer.conn)
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
            let rows = sqlx::query(
                "SELECT * FROM tidings_dead_letters WHERE group_name = ? \
                 ORDER BY topic, partition_no, log_offset",
            )
            .bind(group)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::backend)?;
            Ok(placed_dead_letters(group, rows.iter().map(dead_letter)))
        }
        .boxed()
    }
}

impl Marks for SqliteStore {
    fn is_marked<'a>(
        &'a self,
        group: &'a str,
        id: uuid::Uuid,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        async move {
            let found: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM tidings_marks WHERE group_name = ? AND event_id = ?",
            )
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
        id: uuid::Uuid,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move { self.commit_marks(&[(offset.clone(), id)]).await }.boxed()
    }

    fn marked<'a>(
        &'a self,
        group: &'a str,
        ids: &'a [uuid::Uuid],
    ) -> BoxFuture<'a, Result<Vec<uuid::Uuid>, StoreError>> {
        async move {
            let mut found = Vec::new();
            for chunk in ids.chunks(ROWS_PER_INSERT) {
                let mut q: QueryBuilder<Sqlite> =
                    QueryBuilder::new("SELECT event_id FROM tidings_marks WHERE group_name = ");
                q.push_bind(group).push(" AND event_id IN (");
                let mut list = q.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                q.push(")");
                let rows: Vec<uuid::Uuid> = q
                    .build_query_scalar()
                    .fetch_all(&self.pool)
                    .await
                    .map_err(StoreError::backend)?;
                found.extend(rows);
            }
            Ok(found)
        }
        .boxed()
    }

    fn commit_marks<'a>(
        &'a self,
        marks: &'a [(GroupOffset, uuid::Uuid)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            if marks.is_empty() {
                return Ok(());
            }
            let now = micros(SystemTime::now());
            let mut writer = self.writer.lock().await;
            writer.clean().await;
            writer.open_tx = true;
            let mut tx = sqlx::Connection::begin_with(&mut writer.conn, "BEGIN IMMEDIATE")
                .await
                .map_err(StoreError::backend)?;
            for chunk in marks.chunks(ROWS_PER_INSERT) {
                let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                    "INSERT OR IGNORE INTO tidings_marks (group_name, event_id, marked_us) ",
                );
                q.push_values(chunk, |mut b, (o, id)| {
                    b.push_bind(&o.group).push_bind(*id).push_bind(now);
                });
                q.build()
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::backend)?;
            }
            upsert_offsets(&mut tx, highest_offsets(marks).into_iter()).await?;
            tx.commit().await.map_err(StoreError::backend)?;
            writer.open_tx = false;
            Ok(())
        }
        .boxed()
    }
}

/// A row of `tidings_dead_letters` read back. Its event is read as by [`stored`]; a bookkeeping
/// column that cannot be read (attempts out of range, say) gets a placeholder and the entry's
/// error says so, so that one broken row does not fail the restore of every dead letter.
fn dead_letter(r: &SqliteRow) -> Result<DeadLetterRecord, StoreError> {
    let (event, mut c) = stored(r)?;
    let mut record = DeadLetterRecord {
        group: c.get("group_name", r.try_get("group_name")),
        event,
        error: c.get("error", r.try_get("error")),
        permanent: c.get("permanent", r.try_get("permanent")),
        attempts: c.int("attempts", r.try_get("attempts")),
        first_failure: c.time("first_failure_us", r.try_get("first_failure_us")),
        last_failure: c.time("last_failure_us", r.try_get("last_failure_us")),
        handler: c.get("handler", r.try_get("handler")),
        redeliveries: c.int("redeliveries", r.try_get("redeliveries")),
    };
    if let Some(errors) = c.errors() {
        record.error.push_str(&format!(
            " (the stored dead letter cannot be fully read: {errors})"
        ));
    }
    Ok(record)
}

/// Moves consumer offsets forward (never back), in the caller's transaction: one statement
/// per [`ROWS_PER_INSERT`] offsets.
async fn upsert_offsets<'o>(
    conn: &mut SqliteConnection,
    offsets: impl Iterator<Item = &'o GroupOffset>,
) -> Result<(), StoreError> {
    let offsets: Vec<&GroupOffset> = offsets.collect();
    for chunk in offsets.chunks(ROWS_PER_INSERT) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO tidings_offsets (group_name, topic, partition_no, next_offset) ",
        );
        q.push_values(chunk, |mut b, o| {
            b.push_bind(&o.group)
                .push_bind(&o.topic)
                .push_bind(o.partition as i64)
                .push_bind(o.next_offset as i64);
        });
        q.push(
            " ON CONFLICT (group_name, topic, partition_no) \
             DO UPDATE SET next_offset = MAX(next_offset, excluded.next_offset)",
        );
        q.build()
            .execute(&mut *conn)
            .await
            .map_err(StoreError::backend)?;
    }
    Ok(())
}
