//! The SQL text of [`PostgresStore`](super::PostgresStore), with the schema in its table names:
//! built once when the store is opened.

use std::sync::Arc;

/// The statements, with the schema in their table names.
#[derive(Debug)]
pub(super) struct Sql {
    pub(super) append: Arc<str>,
    pub(super) try_append: Arc<str>,
    pub(super) read: Arc<str>,
    pub(super) head: Arc<str>,
    pub(super) offset_at: Arc<str>,
    pub(super) committed: Arc<str>,
    pub(super) commit: Arc<str>,
    pub(super) trim: Arc<str>,
    pub(super) reset: Arc<str>,
    pub(super) partitions: Arc<str>,
    pub(super) heads: Arc<str>,
    /// The channel appends are announced on (`$15` of the append statements).
    pub(super) channel: Arc<str>,
    pub(super) save_dead_letter: Arc<str>,
    pub(super) delete_dead_letter: Arc<str>,
    pub(super) dead_letters: Arc<str>,
    pub(super) is_marked: Arc<str>,
    pub(super) marked: Arc<str>,
    pub(super) marks: Arc<str>,
}

impl Sql {
    pub(super) fn new(schema: &str) -> Self {
        let s = schema;
        let q = |sql: String| Arc::<str>::from(sql);
        // Each partition an append moved is announced on the schema's channel, delivered at
        // commit (never for a rollback), payload "<partition> <head> <topic>" (empty for a
        // topic too long for a payload: the listener then reads every head).
        let notify = format!(
            "pg_notify($15, CASE WHEN octet_length(topic) <= {max} \
               THEN partition_no || ' ' || next_offset || ' ' || topic ELSE '' END) IS NULL",
            max = super::watch::MAX_ANNOUNCED_TOPIC
        );
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
                 SELECT topic, partition_no, next_offset, {notify} FROM h"
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
                 SELECT topic, partition_no, next_offset, {notify} FROM h \
                 UNION ALL SELECT topic, partition_no, NULL::bigint, NULL::boolean FROM busy"
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
            heads: q(format!(
                "SELECT topic, partition_no, next_offset FROM {s}.tidings_heads WHERE topic = ANY($1)"
            )),
            channel: Arc::from(super::watch::channel_for(schema)),
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
