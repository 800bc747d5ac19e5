//! [`DeadLetters`]: the public handle on one group's dead-letter queue.

use std::sync::Arc;

use uuid::Uuid;

use super::queue::{DeadLetterQueue, SEQ_SHIFT};
use super::{DeadLetter, DeadLetterError};
use crate::core::Core;
use crate::envelope::Erased;

/// Puts a letter taken for a redrive back if the redrive does not complete (cancelled, or the
/// bus closed).
struct Redriving<'a> {
    queue: &'a DeadLetterQueue,
    letter: Option<DeadLetter>,
}

impl Drop for Redriving<'_> {
    fn drop(&mut self) {
        if let Some(letter) = self.letter.take() {
            self.queue.put_back(letter);
        }
    }
}

/// The dead-letter queue of one consumer group: list, inspect, redrive, discard.
///
/// Get it with [`Bus::dead_letters`](crate::Bus::dead_letters). An event lands here after its last
/// failed attempt (see [`Retry`](crate::middleware::Retry)), with the error, the attempts and when
/// they failed. Without a store the queue is in memory: it lives as long as the bus (it stays
/// readable after shutdown) and is not bounded — watch its depth in
/// [`Bus::stats`](crate::Bus::stats) (`GroupStats::dead_letters`). With a
/// [store](crate::store::Store) each entry is also saved there before the group's offset passes its
/// event, comes back when the bus restarts, and is deleted once a redriven event is handled (or the
/// entry discarded). A row of the log that could not be read back is an entry too, holding an
/// [`Undecodable`](crate::store::Undecodable); redriving it reads the row again (say, after the
/// missing [`Upcaster`](crate::store::Upcaster) was registered) and is refused with
/// [`DeadLetterError::Unreadable`] if it still cannot be read.
///
/// A redrive sends the event back to the same group only, with its original id, metadata and
/// correlation id, as delivery attempt 1; it waits for room in the group's queue like a publish
/// (even on a [`DropOldest`](crate::Overflow::DropOldest) topic, where it drops nothing to make
/// room — but once queued there, a later publish may drop it like any other event). A redrive
/// cancelled while it waits leaves the entry in the queue.
/// Do not redrive from a handler of the same group into its own full queue: it would wait for
/// itself.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// use tidings::{Bus, Context, Envelope, Event, Handler, HandlerError};
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id)]
/// struct OrderPlaced { order_id: u64 }
///
/// struct Failing;
/// impl Handler<OrderPlaced> for Failing {
///     async fn handle(&mut self, _: &Envelope<OrderPlaced>, _: &Context) -> Result<(), HandlerError> {
///         Err(HandlerError::permanent("invalid order"))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bus = Bus::builder().subscribe::<OrderPlaced, _>("billing", || Failing).build()?;
/// bus.publish(OrderPlaced { order_id: 7 }).await?;
/// bus.settled().await;
///
/// let dlq = bus.dead_letters("billing")?;
/// let letter = &dlq.list()[0];
/// assert_eq!(letter.error, "invalid order");
/// dlq.discard(letter.seq, "customer cancelled")?;
/// assert!(dlq.is_empty());
/// # bus.shutdown().await; Ok(()) }
/// ```
///
/// A group whose [event set](crate::EventSet) spans topics has a queue per topic behind this one
/// handle: `list` returns the entries of all, and each entry's `seq` names its queue.
#[derive(Clone)]
pub struct DeadLetters {
    /// The group's queues, one per topic it reads.
    queues: Arc<[Arc<DeadLetterQueue>]>,
    core: Arc<Core>,
}

impl DeadLetters {
    pub(crate) fn new(queues: Arc<[Arc<DeadLetterQueue>]>, core: Arc<Core>) -> Self {
        DeadLetters { queues, core }
    }

    /// The queue that numbered entry `seq`.
    fn queue(&self, seq: u64) -> Result<&Arc<DeadLetterQueue>, DeadLetterError> {
        let base = seq >> SEQ_SHIFT << SEQ_SHIFT;
        self.queues
            .iter()
            .find(|q| q.seq_base == base)
            .ok_or_else(|| DeadLetterError::NotFound {
                group: self.queues[0].group.clone(),
                seq,
            })
    }

    /// The group's entries, oldest first (sequenced: an event parked behind another names it in
    /// [`parked_behind`](DeadLetter::parked_behind), which may be in flight for a redrive).
    pub fn list(&self) -> Vec<DeadLetter> {
        let mut all: Vec<DeadLetter> = self.queues.iter().flat_map(|q| q.list()).collect();
        if self.queues.len() > 1 {
            all.sort_by_key(|letter| letter.first_failure);
        }
        all
    }

    /// Entry `seq`, if it is still there.
    pub fn get(&self, seq: u64) -> Option<DeadLetter> {
        self.queue(seq).ok()?.get(seq)
    }

    /// The entry of the event with this id, if there is one (the oldest, should the same id
    /// have been dead-lettered twice).
    pub fn find(&self, event_id: Uuid) -> Option<DeadLetter> {
        self.queues.iter().find_map(|queue| {
            let state = queue.state.lock();
            state
                .entries
                .values()
                .find(|e| e.envelope.id() == event_id)
                .cloned()
        })
    }

    /// How many entries wait.
    pub fn len(&self) -> usize {
        self.queues
            .iter()
            .map(|q| q.state.lock().entries.len())
            .sum()
    }

    /// Whether no entry waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends entry `seq` back to its group and removes it from the queue; waits for room in the
    /// group's queue.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::NotFound`], [`DeadLetterError::ParkedBehind`] (sequenced: redrive
    /// the head), or [`DeadLetterError::Closed`] once shutdown has begun (the entry stays).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped before the event is back in its group's queue, the entry stays in the
    /// dead-letter queue (with its redelivery count).
    pub async fn redrive(&self, seq: u64) -> Result<(), DeadLetterError> {
        self.redrive_as(seq, false).await
    }

    /// A redrive, by hand or by a scheduled [`Redelivery`].
    pub(crate) async fn redrive_as(
        &self,
        seq: u64,
        automatic: bool,
    ) -> Result<(), DeadLetterError> {
        if !self.core.is_open() {
            return Err(DeadLetterError::Closed);
        }
        self.restored().await?;
        let queue = self.queue(seq)?;
        // A row that could not be read is read again (a type or an upcaster may have been
        // registered since); it goes to the handler only if that works now.
        let mut decoded: Option<Erased> = None;
        if let Some(letter) = queue.get(seq) {
            if letter
                .envelope
                .downcast_ref::<crate::store::Undecodable>()
                .is_some()
            {
                let unreadable = |error: String| DeadLetterError::Unreadable { seq, error };
                let durable = self.core.log.as_ref();
                let row = crate::store::stored_event_of(&letter.envelope).map_err(unreadable)?;
                match durable.map(|d| d.decoder.decode(&row)) {
                    Some(crate::store::Decoded::Event(env)) => decoded = Some(env.inner),
                    Some(crate::store::Decoded::Failed(_, error)) => return Err(unreadable(error)),
                    None => return Err(unreadable("the bus has no store".into())),
                }
            }
        }
        let letter = queue.take_for_redrive(seq, automatic)?;
        let item: Erased = decoded.unwrap_or_else(|| Arc::clone(&letter.envelope.inner));
        tracing::info!(group = %queue.group, event_id = %letter.envelope.id(), seq, "redriving dead letter");
        // Cancel safe: dropped before the event is in the queue, the entry goes back.
        let mut pending = Redriving {
            queue,
            letter: Some(letter),
        };
        match self.core.redeliver(&queue.topic, queue.slot, item).await {
            Ok(()) => {
                pending.letter = None;
                queue.topic.metrics.group(queue.slot).redriven();
                Ok(())
            }
            Err(_) => Err(DeadLetterError::Closed),
        }
    }

    /// With a store: waits until the group's entries are read back from it (reads them if the
    /// group's workers have not yet), so that what a redrive finds is complete.
    async fn restored(&self) -> Result<(), DeadLetterError> {
        let Some(d) = self.core.log.as_ref() else {
            return Ok(());
        };
        for queue in self.queues.iter() {
            queue
                .ensure_restored(&*d.store, &d.decoder)
                .await
                .map_err(|e| DeadLetterError::Store {
                    error: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Redrives every entry (sequenced: every head; the events parked behind follow it), oldest
    /// first, and returns how many were sent.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Closed`] once shutdown has begun; what was redriven before stays
    /// redriven.
    ///
    /// # Cancel safety
    ///
    /// Dropped half-way, the entries already redriven are redriven and the others stay, each whole
    /// (see [`redrive`](DeadLetters::redrive)).
    pub async fn redrive_all(&self) -> Result<usize, DeadLetterError> {
        self.redrive_where(|_| true).await
    }

    /// Redrives the entries `filter` picks (sequenced: heads only), oldest first — say, only
    /// transient failures — and returns how many were sent.
    ///
    /// ```no_run
    /// # use tidings::dead_letter::{DeadLetterError, DeadLetters};
    /// # async fn f(dlq: DeadLetters) -> Result<(), DeadLetterError> {
    /// use tidings::ErrorKind;
    /// dlq.redrive_where(|letter| letter.kind == ErrorKind::Transient).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`redrive_all`](Self::redrive_all).
    ///
    /// # Cancel safety
    ///
    /// As [`redrive_all`](DeadLetters::redrive_all).
    pub async fn redrive_where(
        &self,
        filter: impl Fn(&DeadLetter) -> bool,
    ) -> Result<usize, DeadLetterError> {
        if !self.core.is_open() {
            return Err(DeadLetterError::Closed);
        }
        self.restored().await?;
        let mut sent = 0;
        let heads: Vec<u64> = self.queues.iter().flat_map(|q| q.heads()).collect();
        for seq in heads {
            if !self.get(seq).is_some_and(|letter| filter(&letter)) {
                continue;
            }
            match self.redrive(seq).await {
                Ok(()) => sent += 1,
                Err(
                    DeadLetterError::NotFound { .. }
                    | DeadLetterError::ParkedBehind { .. }
                    | DeadLetterError::Unreadable { .. },
                ) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(sent)
    }

    /// Removes entry `seq` for good, logging `reason` (at `warn` level) with the event's ids.
    /// Returns the entry.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::NotFound`] if there is no such entry.
    ///
    /// With a store, its row is deleted in the background (should the process stop first, the
    /// entry is back after the restart).
    pub fn discard(&self, seq: u64, reason: &str) -> Result<DeadLetter, DeadLetterError> {
        let queue = self.queue(seq)?;
        let letter = queue.discard(seq, reason)?;
        let env = &letter.envelope;
        if let Some(durable) = &self.core.log {
            if queue.take_stored(env.partition(), env.offset()) {
                let store = std::sync::Arc::clone(&durable.store);
                let (group, topic) = (queue.group.clone(), queue.topic_name().to_owned());
                let (partition, offset) = (env.partition(), env.offset());
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        if let Err(error) = store
                            .delete_dead_letter(&group, &topic, partition, offset)
                            .await
                        {
                            tracing::error!(%group, %error, "tidings: deleting a discarded dead letter from the store failed; it comes back after a restart");
                        }
                    });
                }
            }
        }
        Ok(letter)
    }
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("group", &self.queues[0].group)
            .field("len", &self.len())
            .finish()
    }
}
