//! Opening a store: configurations that would not be durable are refused, and a server that is
//! down is reported within a bounded time.

#[cfg(feature = "postgres")]
use std::time::{Duration, Instant};

#[cfg(any(feature = "sqlite", feature = "postgres"))]
use tidings::store::StoreError;

/// Every way of naming an in-memory (or temporary) SQLite database is refused with a
/// configuration error: such a store would lose every event with the process.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn in_memory_sqlite_databases_are_refused_in_every_form() {
    use sqlx::sqlite::SqliteConnectOptions;
    use std::str::FromStr;
    use tidings::store::SqliteStore;

    let dir = tempfile::tempdir().unwrap();
    let urls = [
        "sqlite::memory:",
        "sqlite://:memory:",
        "sqlite:file::memory:?cache=shared",
        "sqlite:file::memory:",
        "sqlite://events?mode=memory",
        "sqlite://events?mode=memory&cache=shared",
        "sqlite:",
    ];
    for url in urls {
        match SqliteStore::connect(url).await {
            Err(StoreError::Config(message)) => {
                assert!(message.contains("in-memory"), "{url}: {message}")
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    let options = [
        SqliteConnectOptions::new().filename(":memory:"),
        SqliteConnectOptions::new().in_memory(true),
        SqliteConnectOptions::new()
            .filename("events")
            .in_memory(true),
        SqliteConnectOptions::new().filename("file::memory:"),
        SqliteConnectOptions::new().filename("file:events?mode=memory&cache=shared"),
        SqliteConnectOptions::from_str("sqlite::memory:").unwrap(),
        SqliteConnectOptions::from_str("sqlite://x.db?mode=memory").unwrap(),
    ];
    for options in options {
        let shown = format!("{options:?}");
        match SqliteStore::open_with(options).await {
            Err(StoreError::Config(_)) => {}
            other => panic!("{shown}: {other:?}"),
        }
    }
    match SqliteStore::open(":memory:").await {
        Err(StoreError::Config(_)) => {}
        other => panic!(":memory: {other:?}"),
    }
    // The application's own pool on an in-memory database.
    let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
    match SqliteStore::from_pool(pool).await {
        Err(StoreError::Config(_)) => {}
        other => panic!("from_pool on memory: {other:?}"),
    }
    // A file is still a file, by path or by URL.
    let path = dir.path().join("events.db");
    SqliteStore::open(&path).await.expect("a file by path");
    let url = format!("sqlite://{}", dir.path().join("by-url.db").display());
    SqliteStore::connect(&url).await.expect("a file by URL");
    let uri = format!("sqlite:file:{}", dir.path().join("by-uri.db").display());
    SqliteStore::connect(&uri).await.expect("a file by URI");
}

/// A local port nobody listens on.
#[cfg(feature = "postgres")]
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    port
}

/// Connecting to a PostgreSQL server that is down fails within a few seconds by default (it
/// took 30 s), with an error that says what happened.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn connecting_to_a_postgres_server_that_is_down_fails_within_the_default_timeout() {
    use tidings::store::PostgresStore;

    assert_eq!(
        PostgresStore::DEFAULT_CONNECT_TIMEOUT,
        Duration::from_secs(5)
    );
    let url = format!("postgres://postgres@127.0.0.1:{}/test", closed_port());
    let started = Instant::now();
    let result = tokio::spawn(async move { PostgresStore::connect(&url).await })
        .await
        .unwrap();
    let took = started.elapsed();
    let error = result.expect_err("nobody listens there");
    assert!(matches!(error, StoreError::Backend(_)), "{error:?}");
    assert!(
        error.to_string().contains("no connection to PostgreSQL"),
        "{error}"
    );
    // Generous: the bound is 5 s; this is not a speed test.
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

/// The bound is the pool's acquire timeout, chosen with `connect_with`.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn the_postgres_connect_timeout_is_configurable() {
    use tidings::store::PostgresStore;

    let options = format!("postgres://postgres@127.0.0.1:{}/test", closed_port())
        .parse()
        .unwrap();
    let started = Instant::now();
    let error = PostgresStore::connect_with(
        options,
        PostgresStore::pool_options().acquire_timeout(Duration::from_millis(300)),
        "public",
    )
    .await
    .expect_err("nobody listens there");
    let took = started.elapsed();
    assert!(error.to_string().contains("300ms"), "{error}");
    // Well under the 5 s default: the shorter bound was honoured.
    assert!(took < Duration::from_secs(3), "took {took:?}");

    // And the same call reaches a server that is up.
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("t_connect_with_{}", std::process::id());
    let store =
        PostgresStore::connect_with(url.parse().unwrap(), PostgresStore::pool_options(), &schema)
            .await
            .expect("PostgreSQL (DATABASE_URL) must be running");
    assert_eq!(store.schema(), schema);
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(store.pool())
        .await
        .unwrap();
}

/// `store::connect` picks the backend from the URL's scheme, and the store it returns keeps a
/// bus's events (SQLite: across a reopen); an unknown scheme is a configuration error.
#[tokio::test]
async fn connect_opens_the_store_a_url_names() {
    use serde::{Deserialize, Serialize};
    use tidings::prelude::*;
    use tidings::store::{self as stores, Log};

    #[derive(Debug, Serialize, Deserialize, Event)]
    #[event(topic = "connect_url", key = n, name = "connect.Noted")]
    struct Noted {
        n: u32,
    }

    async fn publish_three(url: &str) -> u64 {
        let store = stores::connect(url).await.unwrap();
        let bus = Bus::builder()
            .store(std::sync::Arc::clone(&store))
            .topic(TopicConfig::new("connect_url").partitions(1))
            .build()
            .unwrap();
        for n in 0..3 {
            bus.publish(Noted { n }).await.unwrap();
        }
        bus.shutdown().await;
        store.head("connect_url", 0).await.unwrap()
    }

    assert_eq!(publish_three("memory:").await, 3);
    #[cfg(feature = "sqlite")]
    {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("events.db").display());
        assert_eq!(publish_three(&url).await, 3);
        assert_eq!(
            publish_three(&url).await,
            6,
            "the file kept the first three"
        );
    }
    #[cfg(feature = "postgres")]
    {
        let store = stores::connect(&crate::support::stores::database_url()).await;
        assert!(store.is_ok(), "{:?}", store.err());
    }
    for url in ["redis://127.0.0.1", "memory:x", "events.db"] {
        match stores::connect(url).await {
            Err(tidings::store::StoreError::Config(message)) => {
                assert!(message.contains("no store for"), "{url}: {message}")
            }
            other => panic!("{url}: {:?}", other.map(|_| ())),
        }
    }
}
