//! The bus's metrics on a Prometheus `/metrics` endpoint (feature `metrics`).
//!
//! The example installs `metrics-exporter-prometheus` as the process's recorder, serving HTTP
//! on 127.0.0.1 (a free port), builds a bus with two groups on `orders` (`billing` handles
//! everything; `shipping` refuses order 7 with a permanent error, which dead-letters it),
//! publishes ten orders, then fetches its own `/metrics` over HTTP like a Prometheus server
//! would, prints the bus's lines and checks a few of them.
//!
//! Run with `cargo run --example metrics --features metrics`.

use std::net::{Ipv4Addr, SocketAddr};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order_id)]
struct OrderPlaced {
    order_id: u64,
    cents: u64,
}

struct Billing;

impl Handler<OrderPlaced> for Billing {
    async fn handle(&mut self, _: &Envelope<OrderPlaced>, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

struct Shipping;

impl Handler<OrderPlaced> for Shipping {
    async fn handle(&mut self, e: &Envelope<OrderPlaced>, _: &Context) -> Result<(), HandlerError> {
        if e.event().order_id == 7 {
            return Err(HandlerError::permanent("no shipping address"));
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A free port on the loopback interface.
    let addr: SocketAddr = {
        let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        probe.local_addr()?
    };
    // The recorder goes in before the bus is built: the bus registers its metrics at build.
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(tidings::metrics::PROCESS_DURATION.to_owned()),
            tidings::metrics::DURATION_BUCKETS,
        )?
        .install()?;

    let bus = Bus::builder()
        .topic(TopicConfig::new("orders").partitions(2))
        .subscribe::<OrderPlaced, _>("billing", || Billing)
        .subscribe::<OrderPlaced, _>("shipping", || Shipping)
        .build()?;
    for order_id in 1..=10 {
        bus.publish(OrderPlaced {
            order_id,
            cents: 100 * order_id,
        })
        .await?;
    }
    bus.settled().await;
    // The lag and dead-letter gauges are sampled every second; `stats` samples them now.
    let stats = bus.stats();

    let page = scrape(addr).await?;
    println!("GET http://{addr}/metrics (the bus's lines, without histogram buckets):");
    let lines: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("messaging_") || l.starts_with("tidings_"))
        .collect();
    for line in lines.iter().filter(|l| !l.contains("_bucket{")) {
        println!("  {line}");
    }

    // What Prometheus read agrees with the bus's own counters.
    let value = |name: &str, labels: &[&str]| -> Option<f64> {
        lines
            .iter()
            .find(|l| {
                l.starts_with(&format!("{name}{{"))
                    && labels.iter().all(|lb| l.contains(lb))
                    // A success has no `error_type` label.
                    && l.contains("error_type") == labels.iter().any(|lb| lb.contains("error_type"))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let shipping = stats.group("shipping").ok_or("no shipping group")?;
    let checks = [
        (
            value(
                "messaging_client_sent_messages",
                &["messaging_destination_name=\"orders\""],
            ),
            10.0,
        ),
        (
            value(
                "messaging_client_consumed_messages",
                &[
                    "messaging_consumer_group_name=\"shipping\"",
                    "error_type=\"permanent\"",
                ],
            ),
            shipping.failed as f64,
        ),
        (
            value(
                "tidings_dead_lettered",
                &["messaging_consumer_group_name=\"shipping\""],
            ),
            1.0,
        ),
        (
            value(
                "tidings_dead_letter_depth",
                &["messaging_consumer_group_name=\"shipping\""],
            ),
            1.0,
        ),
        (
            value(
                "messaging_process_duration_count",
                &["messaging_consumer_group_name=\"billing\""],
            ),
            10.0,
        ),
    ];
    for (i, (found, expected)) in checks.iter().enumerate() {
        if *found != Some(*expected) {
            return Err(format!("check {i}: expected {expected}, found {found:?}").into());
        }
    }
    let report = bus.shutdown().await;
    println!(
        "handled {}, failed {}: the endpoint agrees with Bus::stats",
        report.handled, report.failed
    );
    Ok(())
}

/// `GET /metrics` over a plain TCP connection, as a scraper does; the body.
async fn scrape(addr: SocketAddr) -> Result<String, Box<dyn std::error::Error>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("not an HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("the endpoint answered {head}").into());
    }
    Ok(body.to_owned())
}
