-- tidings: the partition logs, their heads and the consumer groups' committed offsets.
CREATE TABLE tidings_events (
    topic          TEXT    NOT NULL,
    partition_no   INTEGER NOT NULL,
    log_offset     INTEGER NOT NULL,
    event_id       BLOB    NOT NULL,
    name           TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    timestamp_us   INTEGER NOT NULL,
    correlation_id BLOB    NOT NULL,
    causation_id   BLOB,
    headers        TEXT    NOT NULL,
    payload        BLOB    NOT NULL,
    PRIMARY KEY (topic, partition_no, log_offset)
) WITHOUT ROWID;

-- The next offset of each partition: kept apart from the log so that retention may delete
-- every row of a partition without its offsets starting again from 0.
CREATE TABLE tidings_heads (
    topic        TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    next_offset  INTEGER NOT NULL,
    PRIMARY KEY (topic, partition_no)
) WITHOUT ROWID;

CREATE TABLE tidings_offsets (
    group_name   TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    next_offset  INTEGER NOT NULL,
    PRIMARY KEY (group_name, topic, partition_no)
) WITHOUT ROWID;
