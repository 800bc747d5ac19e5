-- tidings: the partition logs, their heads and the consumer groups' committed offsets.
CREATE TABLE tidings_events (
    topic          TEXT    NOT NULL,
    partition_no   INTEGER NOT NULL,
    log_offset     BIGINT  NOT NULL,
    event_id       UUID    NOT NULL,
    name           TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    timestamp_us   BIGINT  NOT NULL,
    correlation_id UUID    NOT NULL,
    causation_id   UUID,
    headers        TEXT    NOT NULL,
    payload        BYTEA   NOT NULL,
    PRIMARY KEY (topic, partition_no, log_offset)
);

-- The next offset of each partition. An append reserves its offsets by updating this row, which
-- stays locked until the append commits: appends to one partition commit in offset order, so a
-- reader that sees offset n committed knows every offset below n is committed too.
CREATE TABLE tidings_heads (
    topic        TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    next_offset  BIGINT  NOT NULL,
    PRIMARY KEY (topic, partition_no)
);

CREATE TABLE tidings_offsets (
    group_name   TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    next_offset  BIGINT  NOT NULL,
    PRIMARY KEY (group_name, topic, partition_no)
);
