//! SQLite's loose typing lets any value into any column: rows the bus would never write, broken
//! column by column. Each is a dead letter of every group reading it, with an error naming the
//! column; the good events around it in the same page are handled; the partition goes on. Only
//! a row with no readable place in the log is an error, and it says "corrupt", not "down".
#![cfg(feature = "sqlite")]

use crate::support::stores;

use std::time::Duration;

use stores::{record_with, Log, Placed};
use tidings::prelude::*;
use tidings::store::{
    DeadLetterLog as _, Log as _, SqliteStore, StartFrom, StoreError, Undecodable,
};

fn topic() -> TopicConfig {
    TopicConfig::new("orders").partitions(1)
}

/// Every group of the topic.
struct All(Log);
impl AnyHandler for All {
    async fn handle(&mut self, e: &AnyEnvelope, _: &Context) -> Result<(), HandlerError> {
        if let Some(p) = e.downcast_ref::<Placed>() {
            self.0 .0.lock().push(("all".into(), p.order, p.seq));
        }
        Ok(())
    }
}

/// One broken form: the update that breaks a row, and the column its error names.
struct Broken {
    set: &'static str,
    column: &'static str,
    /// More that the error must say.
    says: &'static str,
}

const FORMS: &[Broken] = &[
    Broken {
        set: "event_id = x'0102'",
        column: "event_id",
        says: "",
    },
    Broken {
        set: "event_id = '0190a5c4-1c2d-7e3f-8a9b-0c1d2e3f4a5b'",
        column: "event_id",
        says: "",
    },
    Broken {
        set: "correlation_id = 'not a uuid'",
        column: "correlation_id",
        says: "",
    },
    Broken {
        set: "causation_id = x'010203'",
        column: "causation_id",
        says: "",
    },
    Broken {
        set: "version = 'two'",
        column: "version",
        says: "",
    },
    Broken {
        set: "version = 4294967297",
        column: "version",
        says: "4294967297 is out of range",
    },
    Broken {
        set: "version = -1",
        column: "version",
        says: "-1 is out of range",
    },
    Broken {
        set: "timestamp_us = 1.5",
        column: "timestamp_us",
        says: "",
    },
    Broken {
        set: "timestamp_us = 'yesterday'",
        column: "timestamp_us",
        says: "",
    },
    Broken {
        set: "name = x'ff00'",
        column: "name",
        says: "",
    },
    Broken {
        set: "headers = x'ff00'",
        column: "headers",
        says: "",
    },
];

/// Every form at once, one page: offsets 0, 2, 4, … are good events, the odd ones broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rows_with_a_column_of_the_wrong_type_are_dead_letters_of_every_group() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .unwrap();
    let n = FORMS.len() as u64;
    let mut rows: Vec<_> = (0..=2 * n)
        .map(|seq| stores::placed_row(0, 1, seq))
        .collect();
    store.append(&mut rows).await.unwrap();
    for (i, form) in FORMS.iter().enumerate() {
        let sql = format!(
            "UPDATE tidings_events SET {} WHERE log_offset = {}",
            form.set,
            2 * i + 1
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(store.pool())
            .await
            .unwrap();
    }
    // The store reads the page: nothing there is an outage.
    let page = store
        .read("orders", 0, 0, 100)
        .await
        .expect("one broken row does not fail the read");
    assert_eq!(page.len(), rows.len());

    let log = Log::default();
    let l = log.clone();
    let builder = record_with(
        Bus::builder().store(store.clone()).topic(topic()),
        Subscription::new("typed").start_from(StartFrom::Earliest),
        &log,
    );
    let bus = builder
        .subscribe_all(
            "orders",
            Subscription::new("all").start_from(StartFrom::Earliest),
            move || All(l.clone()),
        )
        .build()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), bus.settled())
        .await
        .unwrap_or_else(|_| panic!("stalled; handled {:?}", log.of("typed")));
    let good: Vec<(u64, u64)> = (0..=n).map(|i| (1, 2 * i)).collect();
    assert_eq!(log.of("typed"), good);
    assert_eq!(log.of("all"), good);
    for group in ["typed", "all"] {
        let entries = bus.dead_letters(group).unwrap().list();
        assert_eq!(entries.len(), FORMS.len(), "{group}: {entries:?}");
        for (i, (entry, form)) in entries.iter().zip(FORMS).enumerate() {
            assert_eq!(entry.envelope.offset(), 2 * i as u64 + 1);
            assert!(
                entry.envelope.downcast_ref::<Undecodable>().is_some(),
                "{group}: {}: {entry:?}",
                form.set
            );
            let error = &entry.error;
            assert!(
                error.contains("the stored row cannot be read")
                    && error.contains(&format!("column {}", form.column))
                    && error.contains(form.says),
                "{group}: {}: {error}",
                form.set
            );
        }
    }
    let stats = bus.stats();
    assert!(
        stats.topics[0].groups.iter().all(|g| g.lag == 0),
        "{stats:?}"
    );
    bus.shutdown().await;
    // Restarted: the dead letters are back, as they were, and the group does not stall.
    let bus = record_with(
        Bus::builder().store(store.clone()).topic(topic()),
        Subscription::new("typed").start_from(StartFrom::Earliest),
        &log,
    )
    .build()
    .unwrap();
    bus.publish(Placed { order: 1, seq: 100 }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), bus.settled())
        .await
        .expect("settles");
    assert_eq!(log.of("typed").last(), Some(&(1, 100)));
    let entries = bus.dead_letters("typed").unwrap().list();
    assert_eq!(entries.len(), FORMS.len());
    assert!(entries
        .iter()
        .all(|e| e.envelope.downcast_ref::<Undecodable>().is_some()));
    bus.shutdown().await;
}

/// A dead letter whose columns SQLite let a wrong value into is restored with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_dead_letters_with_a_column_of_the_wrong_type_are_restored() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .unwrap();
    let failing = |store: SqliteStore| {
        Bus::builder()
            .store(store)
            .topic(topic())
            .subscribe_all("orders", Subscription::new("g").max_deliveries(1), || {
                Failing
            })
            .build()
            .unwrap()
    };
    let bus = failing(store.clone());
    for seq in 0..4 {
        bus.publish(Placed { order: 1, seq }).await.unwrap();
    }
    bus.settled().await;
    bus.shutdown().await;
    for (offset, set) in [
        (0, "event_id = x'01'"),
        (1, "attempts = 'many'"),
        (2, "first_failure_us = 2.5, redeliveries = 99999999999"),
    ] {
        let sql = format!("UPDATE tidings_dead_letters SET {set} WHERE log_offset = {offset}");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(store.pool())
            .await
            .unwrap();
    }
    let records = store
        .dead_letters("g")
        .await
        .expect("one broken row does not fail them all");
    assert_eq!(records.len(), 4);

    let bus = failing(store.clone());
    tokio::time::timeout(Duration::from_secs(10), bus.settled())
        .await
        .expect("settles");
    let entries = bus.dead_letters("g").unwrap().list();
    assert_eq!(entries.len(), 4, "{entries:?}");
    assert!(entries[0].envelope.downcast_ref::<Undecodable>().is_some());
    assert!(
        entries[0].error.contains("column event_id"),
        "{}",
        entries[0].error
    );
    assert!(
        entries[1].error.contains("column attempts"),
        "{}",
        entries[1].error
    );
    assert_eq!(entries[1].envelope.downcast_ref::<Placed>().unwrap().seq, 1);
    let e = &entries[2].error;
    assert!(
        e.contains("column first_failure_us") && e.contains("column redeliveries"),
        "{e}"
    );
    assert!(e.contains("99999999999 is out of range"), "{e}");
    assert!(entries[3].error.ends_with("down"), "{}", entries[3].error);
    bus.shutdown().await;
}

/// Fails every event.
struct Failing;
impl AnyHandler for Failing {
    async fn handle(&mut self, _: &AnyEnvelope, _: &Context) -> Result<(), HandlerError> {
        Err(HandlerError::permanent("down"))
    }
}

/// A row whose offset is not an integer has no place in the log: the read says the data is
/// corrupt (not that the store is down).
#[tokio::test]
async fn sqlite_a_row_without_a_readable_offset_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("events.db"))
        .await
        .unwrap();
    let mut rows: Vec<_> = (0..3).map(|seq| stores::placed_row(0, 1, seq)).collect();
    store.append(&mut rows).await.unwrap();
    sqlx::query("UPDATE tidings_events SET log_offset = 'two' WHERE log_offset = 2")
        .execute(store.pool())
        .await
        .unwrap();
    match store.read("orders", 0, 0, 100).await {
        Err(StoreError::Corrupt(message)) => {
            assert!(message.contains("offset"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}
