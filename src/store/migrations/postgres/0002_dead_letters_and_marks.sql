-- tidings: the consumer groups' dead letters, and their deduplication marks (effectively-once).
CREATE TABLE tidings_dead_letters (
    group_name     TEXT    NOT NULL,
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
    error          TEXT    NOT NULL,
    permanent      BOOLEAN NOT NULL,
    attempts       INTEGER NOT NULL,
    first_failure_us BIGINT  NOT NULL,
    last_failure_us  BIGINT  NOT NULL,
    handler        TEXT    NOT NULL,
    redeliveries   INTEGER NOT NULL,
    PRIMARY KEY (group_name, topic, partition_no, log_offset)
);

CREATE TABLE tidings_marks (
    group_name TEXT    NOT NULL,
    event_id   UUID    NOT NULL,
    marked_us  BIGINT  NOT NULL,
    PRIMARY KEY (group_name, event_id)
);
