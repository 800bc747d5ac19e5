//! Events appended by other writers (other processes, the application's own transactions):
//! the task that learns that a partition's head moved past what this bus handed its groups,
//! from the store's announcements ([`Log::watch_heads`](crate::store::Log::watch_heads)) or by
//! polling the heads ([`Log::heads`](crate::store::Log::heads)) every poll interval, and tells
//! the core ([`Core::head_moved`](crate::core::Core::head_moved)): the groups then read those
//! events from the log (the catch-up of `core::catch_up`).

use std::collections::HashMap;
use std::sync::Arc;

use futures::stream::{BoxStream, StreamExt};
use tokio::time::Instant;

use super::Engine;
use crate::core::queue::Topic;
use crate::store::{HeadWatch, PartitionHead};

/// Watches the heads of the partitions this bus's groups read, until the bus stops.
pub(crate) async fn run_head_watch(inner: Engine) {
    let d = &*inner.d;
    let topics: HashMap<String, Arc<Topic>> = inner
        .core
        .topics
        .iter()
        .filter(|t| !t.groups.is_empty())
        .map(|t| (t.name.clone(), Arc::clone(t)))
        .collect();
    if topics.is_empty() {
        return; // No group reads anything here.
    }
    let names: Vec<String> = topics.keys().cloned().collect();
    let mut watch: Option<BoxStream<'static, HeadWatch>> = d.store.watch_heads();
    // Poll until the announcements are known to flow (their first `Resync`), and whenever
    // they stop.
    let mut polling = true;
    let mut next_poll = Instant::now() + d.poll_interval;
    let mut failing = false;
    loop {
        let next = async {
            match watch.as_mut() {
                Some(w) => w.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = d.stop.cancelled() => return,
            item = next => match item {
                Some(HeadWatch::Moved(head)) => moved(&inner, &topics, &head),
                Some(HeadWatch::Resync) => {
                    polling = false;
                    poll(&inner, &topics, &names, &mut failing).await;
                }
                Some(HeadWatch::Lost) => {
                    polling = true;
                    next_poll = Instant::now();
                }
                // A stream that ends leaves the bus polling.
                None => {
                    if watch.take().is_some() {
                        tracing::warn!("tidings: the store's announcements of appends ended; polling the heads instead");
                    }
                    polling = true;
                }
            },
            _ = tokio::time::sleep_until(next_poll), if polling => {
                poll(&inner, &topics, &names, &mut failing).await;
                next_poll = Instant::now() + d.poll_interval;
            }
        }
    }
}

/// A head announced or read: to the core.
fn moved(inner: &Engine, topics: &HashMap<String, Arc<Topic>>, head: &PartitionHead) {
    if let Some(topic) = topics.get(&head.topic) {
        inner.core.head_moved(topic, head.partition, head.head);
    }
}

/// Reads every head of `names` once.
async fn poll(
    inner: &Engine,
    topics: &HashMap<String, Arc<Topic>>,
    names: &[String],
    failing: &mut bool,
) {
    match inner.d.store.heads(names).await {
        Ok(heads) => {
            *failing = false;
            for head in &heads {
                moved(inner, topics, head);
            }
        }
        Err(error) => {
            // Logged once per outage: the next poll tries again.
            if !std::mem::replace(failing, true) {
                tracing::error!(%error, "tidings: reading the partitions' heads failed (events of other writers wait until it works again); retrying at each poll");
            }
        }
    }
}
