//! Every public async fn of the crate returns a `Send` future: each is `tokio::spawn`ed here.
//!
//! The check is made by the compiler: a future that is not `Send` (or is `Send` only for some
//! lifetimes: "implementation of `Send` is not general enough") does not build. The spawns are
//! never run; the test only has to compile.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidings::dead_letter::DeadLetters;
use tidings::prelude::*;
use tidings::testing::TestContext;
use tidings::{Command, CommandHandler};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "send.checks", key = id)]
struct Ping {
    id: u64,
}

struct Double(u64);
impl Command for Double {
    type Reply = u64;
}

struct Noop;
impl Handler<Ping> for Noop {
    async fn handle(&mut self, _: &Envelope<Ping>, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}
impl AnyHandler for Noop {
    async fn handle(&mut self, _: &AnyEnvelope, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Each public async fn of [`Bus`], [`DeadLetters`] and [`Context`], spawned.
#[allow(dead_code)]
fn bus_futures_are_send(bus: Bus, dlq: DeadLetters, ctx: Context) {
    let b = bus.clone();
    tokio::spawn(async move { b.publish(Ping { id: 1 }).await.is_ok() });
    let b = bus.clone();
    tokio::spawn(async move {
        b.publish_with(Ping { id: 1 }, PublishOptions::new())
            .await
            .is_ok()
    });
    let b = bus.clone();
    tokio::spawn(async move { b.publish_all(vec![Ping { id: 1 }]).await.is_ok() });
    let b = bus.clone();
    tokio::spawn(async move { b.request(Double(1)).await.is_ok() });
    let b = bus.clone();
    tokio::spawn(async move {
        b.request_timeout(Double(1), Duration::from_secs(1))
            .await
            .is_ok()
    });
    let b = bus.clone();
    tokio::spawn(async move { b.settled().await });
    let b = bus.clone();
    tokio::spawn(async move { b.commit_offsets().await.is_ok() });
    let b = bus.clone();
    tokio::spawn(async move { b.shutdown().await });
    tokio::spawn(async move { bus.shutdown_timeout(Duration::from_secs(1)).await });

    let d = dlq.clone();
    tokio::spawn(async move { d.redrive(0).await.is_ok() });
    let d = dlq.clone();
    tokio::spawn(async move { d.redrive_all().await.is_ok() });
    tokio::spawn(async move { dlq.redrive_where(|_| true).await.is_ok() });

    // A context is not `Clone`: its calls share one task.
    tokio::spawn(async move {
        let _ = ctx.publish(Ping { id: 1 }).await;
        let _ = ctx
            .publish_with(Ping { id: 1 }, PublishOptions::new())
            .await;
        let _ = ctx.request(Double(1)).await;
        ctx.shutting_down().await
    });
}

/// The testing harness's async fns, spawned.
#[allow(dead_code)]
fn testing_futures_are_send(mut tc: TestContext, env: Envelope<Ping>, any: AnyEnvelope) {
    tokio::spawn(async move {
        tc.call(&mut Noop, &env).await.is_ok() && tc.call_any(&mut Noop, &any).await.is_ok()
    });
}

/// The SQLite store's constructors, spawned.
#[cfg(feature = "sqlite")]
#[allow(dead_code)]
fn sqlite_futures_are_send(pool: sqlx::SqlitePool) {
    use tidings::store::SqliteStore;
    tokio::spawn(async move { SqliteStore::open("events.db").await.is_ok() });
    tokio::spawn(async move { SqliteStore::connect("sqlite://events.db").await.is_ok() });
    tokio::spawn(async move {
        SqliteStore::open_with(sqlx::sqlite::SqliteConnectOptions::new())
            .await
            .is_ok()
    });
    tokio::spawn(async move { SqliteStore::from_pool(pool).await.is_ok() });
}

/// The PostgreSQL store's constructors and `append_in`, spawned.
#[cfg(feature = "postgres")]
#[allow(dead_code)]
fn postgres_futures_are_send(pool: sqlx::PgPool, store: tidings::store::PostgresStore) {
    use tidings::store::PostgresStore;
    tokio::spawn(async move {
        PostgresStore::connect("postgres://localhost/x")
            .await
            .is_ok()
    });
    tokio::spawn(async move {
        PostgresStore::connect_in_schema("postgres://localhost/x", "s")
            .await
            .is_ok()
    });
    let p = pool.clone();
    tokio::spawn(async move { PostgresStore::from_pool(p, "s").await.is_ok() });
    tokio::spawn(async move {
        let mut conn = pool.acquire().await.unwrap();
        store.append_in(&mut conn, &mut []).await.is_ok()
    });
}

/// A command handler, so that `Double` is a command the bus can route.
struct Doubler;
impl CommandHandler<Double> for Doubler {
    async fn handle(&mut self, c: Double, _: &Context) -> Result<u64, HandlerError> {
        Ok(c.0 * 2)
    }
}

#[test]
fn every_public_async_fn_returns_a_send_future() {
    // The functions above are checked when this file compiles; naming them keeps them in the
    // build whatever the features.
    let _ = bus_futures_are_send;
    let _ = testing_futures_are_send;
    #[cfg(feature = "sqlite")]
    let _ = sqlite_futures_are_send;
    #[cfg(feature = "postgres")]
    let _ = postgres_futures_are_send;
    let _ = Bus::builder().command_handler::<Double, _>(|| Doubler);
}
