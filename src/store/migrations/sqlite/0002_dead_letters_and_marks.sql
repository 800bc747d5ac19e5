-- tidings: the consumer groups' dead letters, and their deduplication marks (effectively-once).
CREATE TABLE tidings_dead_letters (
    group_name     TEXT    NOT NULL,
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
    error          TEXT    NOT NULL,
    permanent      INTEGER NOT NULL,
    attempts       INTEGER NOT NULL,
    first_failure_us INTEGER NOT NULL,
    last_failure_us  INTEGER NOT NULL,
    handler        TEXT    NOT NULL,
    redeliveries   INTEGER NOT NULL,
    PRIMARY KEY (group_name, topic, partition_no, log_offset)
) WITHOUT ROWID;

CREATE TABLE tidings_marks (
    group_name TEXT    NOT NULL,
    event_id   BLOB    NOT NULL,
    marked_us  INTEGER NOT NULL,
    PRIMARY KEY (group_name, event_id)
) WITHOUT ROWID;
