//! The store backends the conformance suite runs on, and what its tests share.
#![allow(dead_code)]

use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::store::{MemoryStore, Store};
use tidings::BusBuilder;

/// One backend, able to open its store again (a restart).
#[derive(Clone)]
pub enum Backend {
    Memory(MemoryStore),
    #[cfg(feature = "sqlite")]
    Sqlite(Arc<tempfile::TempDir>),
    #[cfg(feature = "postgres")]
    Postgres {
        url: String,
        schema: String,
    },
}

/// The PostgreSQL server of the tests: `DATABASE_URL`, else the local one. A server that does
/// not answer fails the test: it is never skipped.
#[cfg(feature = "postgres")]
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

impl Backend {
    pub fn memory() -> Self {
        Backend::Memory(MemoryStore::new())
    }

    #[cfg(feature = "sqlite")]
    pub fn sqlite() -> Self {
        Backend::Sqlite(Arc::new(
            tempfile::tempdir().expect("a temporary directory"),
        ))
    }

    /// A fresh schema of its own, so that tests run in parallel.
    #[cfg(feature = "postgres")]
    pub async fn postgres(test: &str) -> Self {
        let url = database_url();
        // Short and unique: a hash of the test's name, and the process.
        let hash = test.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        let schema = format!("t_{hash:016x}_{}", std::process::id());
        let pool = sqlx::PgPool::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} (DATABASE_URL) must be running: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&pool)
        .await
        .expect("drop the test schema");
        pool.close().await;
        Backend::Postgres { url, schema }
    }

    /// A `PostgresStore` in a fresh schema of its own.
    #[cfg(feature = "postgres")]
    pub async fn postgres_store(test: &str) -> tidings::store::PostgresStore {
        let Backend::Postgres { url, schema } = Backend::postgres(test).await else {
            unreachable!()
        };
        tidings::store::PostgresStore::connect_in_schema(&url, &schema)
            .await
            .expect("open PostgreSQL")
    }

    /// Opens the store (again).
    pub async fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Memory(store) => Arc::new(store.clone()),
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(dir) => Arc::new(
                tidings::store::SqliteStore::open(dir.path().join("events.db"))
                    .await
                    .expect("open SQLite"),
            ),
            #[cfg(feature = "postgres")]
            Backend::Postgres { url, schema } => Arc::new(
                tidings::store::PostgresStore::connect_in_schema(url, schema)
                    .await
                    .expect("open PostgreSQL"),
            ),
        }
    }

    /// Runs `sql` straight on the backend's database (what the bus would never write), `{t}`
    /// standing for where its tables are (the schema on PostgreSQL). SQL backends only: the
    /// memory store holds typed values, it has no column to break.
    pub async fn execute(&self, sql: &str) {
        match self {
            Backend::Memory(_) => panic!("the memory store runs no SQL"),
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(dir) => {
                let store = tidings::store::SqliteStore::open(dir.path().join("events.db"))
                    .await
                    .expect("open SQLite");
                sqlx::query(sqlx::AssertSqlSafe(sql.replace("{t}", "")))
                    .execute(store.pool())
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                store.pool().close().await;
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres { url, schema } => {
                let pool = sqlx::PgPool::connect(url).await.expect("PostgreSQL");
                sqlx::query(sqlx::AssertSqlSafe(
                    sql.replace("{t}", &format!("{schema}.")),
                ))
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
                pool.close().await;
            }
        }
    }

    /// A builder on this backend's store (opened again).
    pub async fn builder(&self) -> BusBuilder {
        Bus::builder().store(self.open().await)
    }
}

/// A row of topic "orders", partition 0, written by hand (what the bus would never write, or
/// what another writer appends).
pub fn raw_row(name: &str, version: u32, payload: &str) -> tidings::store::StoredEvent {
    let id = tidings::Uuid::now_v7();
    tidings::store::StoredEvent {
        topic: "orders".into(),
        partition: 0,
        offset: 0,
        id,
        name: name.into(),
        version,
        timestamp: std::time::SystemTime::now(),
        correlation_id: id,
        causation_id: None,
        headers: Headers::new(),
        payload: payload.as_bytes().to_vec(),
    }
}

/// The row of a `Placed { order, seq }` in `partition`, written by hand.
pub fn placed_row(partition: u32, order: u64, seq: u64) -> tidings::store::StoredEvent {
    let mut row = raw_row("Placed", 1, &format!(r#"{{"order":{order},"seq":{seq}}}"#));
    row.partition = partition;
    row
}

/// An order event: `seq` counts the events of one order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order)]
pub struct Placed {
    pub order: u64,
    pub seq: u64,
}

/// Another type on the same topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order)]
pub struct Cancelled {
    pub order: u64,
}

/// What handlers saw: (group, order, seq, attempt).
#[derive(Clone, Default)]
pub struct Log(pub Arc<Mutex<Vec<(String, u64, u64)>>>);

impl Log {
    pub fn of(&self, group: &str) -> Vec<(u64, u64)> {
        self.0
            .lock()
            .iter()
            .filter(|(g, _, _)| g == group)
            .map(|&(_, o, s)| (o, s))
            .collect()
    }

    pub fn len(&self, group: &str) -> usize {
        self.of(group).len()
    }

    /// Every order's events reached `group` in `seq` order.
    pub fn assert_key_order(&self, group: &str) {
        let mut last: std::collections::HashMap<u64, u64> = Default::default();
        for (order, seq) in self.of(group) {
            if let Some(prev) = last.insert(order, seq) {
                assert!(
                    seq > prev,
                    "{group}: order {order} saw seq {seq} after {prev}"
                );
            }
        }
    }
}

/// Records every `Placed` it handles.
pub struct Recorder {
    pub group: String,
    pub log: Log,
}

impl Handler<Placed> for Recorder {
    async fn handle(&mut self, e: &Envelope<Placed>, _: &Context) -> Result<(), HandlerError> {
        let p = e.event();
        self.log.0.lock().push((self.group.clone(), p.order, p.seq));
        Ok(())
    }
}

/// Subscribes `group` to `Placed` with a [`Recorder`].
pub fn record(builder: BusBuilder, group: &str, log: &Log) -> BusBuilder {
    record_with(builder, Subscription::new(group), log)
}

pub fn record_with(builder: BusBuilder, sub: Subscription, log: &Log) -> BusBuilder {
    let (group, log) = (sub.group().to_owned(), log.clone());
    builder.subscribe::<Placed, _>(sub, move || Recorder {
        group: group.clone(),
        log: log.clone(),
    })
}

/// Publishes `orders` × `per_order` events, seq 0.. within each order.
pub async fn publish_orders(bus: &Bus, orders: u64, per_order: u64) {
    for seq in 0..per_order {
        for order in 0..orders {
            bus.publish(Placed { order, seq }).await.expect("published");
        }
    }
}

/// `impl Log for $wrapper`, every method passed to `self.$inner`: for test stores that hook
/// another capability (offsets, dead letters, marks) and leave the log alone.
#[allow(unused_macros)]
macro_rules! forward_log {
    ($wrapper:ty, $inner:tt) => {
        impl tidings::store::Log for $wrapper {
            fn append<'a>(
                &'a self,
                e: &'a mut [tidings::store::StoredEvent],
            ) -> futures::future::BoxFuture<'a, Result<(), tidings::store::StoreError>> {
                tidings::store::Log::append(&self.$inner, e)
            }

            fn read<'a>(
                &'a self,
                t: &'a str,
                p: u32,
                f: u64,
                l: usize,
            ) -> futures::future::BoxFuture<
                'a,
                Result<Vec<tidings::store::StoredEvent>, tidings::store::StoreError>,
            > {
                tidings::store::Log::read(&self.$inner, t, p, f, l)
            }

            fn partitions<'a>(
                &'a self,
                t: &'a str,
            ) -> futures::future::BoxFuture<'a, Result<u32, tidings::store::StoreError>> {
                tidings::store::Log::partitions(&self.$inner, t)
            }

            fn head<'a>(
                &'a self,
                t: &'a str,
                p: u32,
            ) -> futures::future::BoxFuture<'a, Result<u64, tidings::store::StoreError>> {
                tidings::store::Log::head(&self.$inner, t, p)
            }

            fn offset_at<'a>(
                &'a self,
                t: &'a str,
                p: u32,
                a: std::time::SystemTime,
            ) -> futures::future::BoxFuture<'a, Result<u64, tidings::store::StoreError>> {
                tidings::store::Log::offset_at(&self.$inner, t, p, a)
            }

            fn trim<'a>(
                &'a self,
                t: &'a str,
                p: u32,
                b: u64,
            ) -> futures::future::BoxFuture<'a, Result<u64, tidings::store::StoreError>> {
                tidings::store::Log::trim(&self.$inner, t, p, b)
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use forward_log;
