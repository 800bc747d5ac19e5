//! Latency between two processes on one PostgreSQL store: bus A publishes, bus B (another
//! `PostgresStore` handle, as another process would have) handles; the time from A's `publish`
//! to B's handler, one event at a time (no queueing), with `LISTEN`/`NOTIFY` or with polling.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo run --release --features postgres --example replica_latency -- notify 1000
//! cargo run --release --features postgres --example replica_latency -- poll 200 250
//! ```
//!
//! Arguments: `notify` or `poll`, the number of events (default 1000), and for `poll` the
//! [poll interval](tidings::BusBuilder::poll_interval) in milliseconds (default 250). Prints the
//! p50, p99 and max latency. Uses (and drops first) the schema `replica_latency`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::store::PostgresStore;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "pings", key = n)]
struct Ping {
    n: u64,
}

struct Pong(mpsc::UnboundedSender<u64>);

impl Handler<Ping> for Pong {
    async fn handle(&mut self, e: &Envelope<Ping>, _: &Context) -> Result<(), HandlerError> {
        let _ = self.0.send(e.event().n);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen = match args.first().map(String::as_str) {
        None | Some("notify") => true,
        Some("poll") => false,
        Some(other) => return Err(format!("notify or poll, not {other:?}").into()),
    };
    let n: usize = args.get(1).map_or(Ok(1000), |a| a.parse())?;
    let poll = Duration::from_millis(args.get(2).map_or(Ok(250), |a| a.parse())?);
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = "replica_latency";
    let pool = sqlx::PgPool::connect(&url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&pool)
    .await?;
    pool.close().await;

    // Two store handles, as two processes have.
    let a = PostgresStore::connect_in_schema(&url, schema).await?;
    let b = PostgresStore::connect_in_schema(&url, schema)
        .await?
        .listen(listen);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = Bus::builder()
        .store(b)
        .poll_interval(poll)
        .topic(TopicConfig::new("pings").partitions(1))
        .subscribe::<Ping, _>(Subscription::new("pong"), move || Pong(tx.clone()))
        .build()?;
    consumer.ready().await;
    let producer = Bus::builder()
        .store(a)
        .topic(TopicConfig::new("pings").partitions(1))
        .build()?;
    // The listener's first resync, and warm connections.
    for i in 0..10 {
        producer.publish(Ping { n: i }).await?;
        rx.recv().await.ok_or("the consumer stopped")?;
    }

    let mut latencies = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let start = Instant::now();
        producer.publish(Ping { n: 1_000 + i }).await?;
        let got = rx.recv().await.ok_or("the consumer stopped")?;
        latencies.push(start.elapsed());
        assert_eq!(got, 1_000 + i, "in order, once");
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let mode = if listen {
        "LISTEN/NOTIFY".to_owned()
    } else {
        format!("polling every {poll:?}")
    };
    println!(
        "{mode}: {n} events, publish in A -> handled in B: p50 {:?}, p99 {:?}, max {:?}",
        at(0.50),
        at(0.99),
        latencies[latencies.len() - 1]
    );
    producer.shutdown().await;
    consumer.shutdown().await;
    Ok(())
}
