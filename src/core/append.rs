//! The `Append` seam: where a publish goes when the bus keeps a log. The core encodes the
//! events, hands them to the [`Append`] implementation (the durable layer's group-committing
//! appender) and waits for their receipts; the appender offers each committed event to the
//! groups' queues ([`Core::offer_committed`]).

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::oneshot;

use super::publish::Origin;
use super::queue::Topic;
use super::Core;
use crate::envelope::{Erased, Inner, Metadata};
use crate::event::Event;
use crate::publish::Published;
use crate::store::{StoreError, StoredEvent};
use crate::window::Claim;

/// Where a publish goes when there is a log: implemented by the durable layer (a
/// group-committing appender in front of a [`Store`](crate::store::Store)); later by other
/// transports.
pub(crate) trait Append: Send + Sync {
    /// The largest payload accepted, in bytes.
    fn max_payload(&self) -> usize;

    /// Queues `request` for appending, waiting for room; gives it back if the appender stopped.
    /// The receipts (or the error and the events) come back through `request.reply`.
    fn submit(&self, request: AppendRequest) -> BoxFuture<'_, Result<(), AppendRequest>>;
}

/// Events of one publish call waiting for their append: the rows, the events themselves (to hand
/// to the groups once committed, or back to the publisher) and where to send the receipts. They
/// are appended in one transaction.
pub(crate) struct AppendRequest {
    pub(crate) rows: Vec<StoredEvent>,
    pub(crate) events: Vec<Box<dyn PendingEvent>>,
    pub(crate) topic_name: &'static str,
    pub(crate) topic: Arc<Topic>,
    pub(crate) slots: Box<[usize]>,
    pub(crate) dedup_key: Option<(&'static str, uuid::Uuid)>,
    pub(crate) reply: oneshot::Sender<AppendResult>,
}

/// The receipts, or why not and the events back.
pub(crate) type AppendResult = Result<Vec<Published>, (AppendError, Vec<Box<dyn Any + Send>>)>;

pub(crate) enum AppendError {
    Store(StoreError),
    Closed,
}

/// A producer-side dedup claim, given up when dropped (a failed or cancelled publish) unless the
/// appender completed it.
struct ClaimGuard<'a> {
    window: &'a parking_lot::Mutex<crate::window::Window<Published, (&'static str, uuid::Uuid)>>,
    key: (&'static str, uuid::Uuid),
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        // A no-op once the appender completed it.
        self.window.lock().release(self.key);
    }
}

/// An event about to be appended, with its place.
pub(crate) struct Prepared<E> {
    pub(crate) event: E,
    pub(crate) partition: u32,
    pub(crate) id: uuid::Uuid,
    pub(crate) timestamp: SystemTime,
}

/// A typed event in a box, before it has an offset.
pub(crate) trait PendingEvent: Send {
    fn into_erased(self: Box<Self>, meta: Metadata) -> Erased;
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

struct Boxed<E>(E);

impl<E: Event> PendingEvent for Boxed<E> {
    fn into_erased(self: Box<Self>, meta: Metadata) -> Erased {
        Arc::new(Inner {
            meta,
            event: self.0,
        })
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        Box::new(self.0)
    }
}

impl Core {
    /// Publishes durably: the event is appended (group-committed with concurrent publishers),
    /// then handed to the groups, then the receipt returns.
    pub(crate) async fn publish_durable<E: Event>(
        &self,
        event: E,
        route: (Arc<Topic>, Box<[usize]>),
        partition: u32,
        id: uuid::Uuid,
        timestamp: SystemTime,
        origin: &mut Origin,
    ) -> Result<Published, crate::PublishError<E>> {
        // Producer-side deduplication: a repeat within the window publishes nothing. The id is
        // claimed before the append, so that concurrent repeats wait for the first one's
        // receipt instead of appending it twice.
        let mut claim = None;
        if let (Some(window), Some(_)) = (&self.publish_dedup, origin.id) {
            let key = (E::TOPIC, id);
            loop {
                {
                    let mut w = window.lock();
                    if let Some(first) = w.get(key) {
                        return Ok(Published {
                            duplicate: true,
                            ..first
                        });
                    }
                    if w.claim(key) == Claim::New {
                        break;
                    }
                }
                // Another publish of this id is being appended: wait for its receipt.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            claim = Some(ClaimGuard { window, key });
        }
        let prepared = vec![Prepared {
            event,
            partition,
            id,
            timestamp,
        }];
        let dedup_key = claim.as_ref().map(|c| c.key);
        let result = self
            .append_durable(prepared, route, origin, dedup_key)
            .await;
        // Appended: the appender recorded the receipt; otherwise the guard gives the id up.
        drop(claim);
        match result {
            Ok(mut receipts) => Ok(receipts.remove(0)),
            Err(e) => Err(e.map(|mut events| events.remove(0))),
        }
    }

    /// Appends `items` in one transaction and hands them to the groups; the receipts in order.
    pub(crate) async fn append_durable<E: Event>(
        &self,
        items: Vec<Prepared<E>>,
        route: (Arc<Topic>, Box<[usize]>),
        origin: &mut Origin,
        dedup_key: Option<(&'static str, uuid::Uuid)>,
    ) -> Result<Vec<Published>, crate::PublishError<Vec<E>>> {
        let append = self.append.as_ref().expect("a durable bus");
        let mut rows = Vec::with_capacity(items.len());
        let mut failed = None;
        for item in &items {
            match crate::store::encode(&item.event, append.max_payload()) {
                Ok(payload) => rows.push(StoredEvent {
                    topic: E::TOPIC.to_owned(),
                    partition: item.partition,
                    offset: 0,
                    id: item.id,
                    name: E::NAME.to_owned(),
                    version: E::VERSION,
                    timestamp: item.timestamp,
                    correlation_id: origin.cause.map_or(item.id, |c| c.correlation),
                    causation_id: origin.cause.map(|c| c.id),
                    headers: origin.headers.clone(),
                    payload,
                }),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let events: Vec<E> = items.into_iter().map(|i| i.event).collect();
        match failed {
            None => {}
            Some(crate::store::EncodeError::TooLarge { size }) => {
                return Err(crate::PublishError::TooLarge {
                    event: events,
                    size,
                    limit: append.max_payload(),
                })
            }
            Some(crate::store::EncodeError::Serialize(message)) => {
                return Err(crate::PublishError::Serialize {
                    event: events,
                    message,
                })
            }
        }
        let (tx, rx) = oneshot::channel();
        let request = AppendRequest {
            rows,
            events: events
                .into_iter()
                .map(|e| Box::new(Boxed(e)) as Box<dyn PendingEvent>)
                .collect(),
            topic_name: E::TOPIC,
            topic: route.0,
            slots: route.1,
            dedup_key,
            reply: tx,
        };
        let back = |events: Vec<Box<dyn Any + Send>>| -> Vec<E> {
            events
                .into_iter()
                .map(|e| *e.downcast::<E>().expect("its type"))
                .collect()
        };
        if let Err(refused) = append.submit(request).await {
            let events = refused.events.into_iter().map(|e| e.into_any()).collect();
            return Err(crate::PublishError::Closed(back(events)));
        }
        match rx.await {
            Ok(Ok(receipts)) => Ok(receipts),
            Ok(Err((error, events))) => {
                let event = back(events);
                Err(match error {
                    AppendError::Store(error) => crate::PublishError::Store { event, error },
                    AppendError::Closed => crate::PublishError::Closed(event),
                })
            }
            // The appender never drops a request unanswered; reaching this is a bug.
            Err(_) => panic!("tidings: the appender dropped a publish"),
        }
    }
}
