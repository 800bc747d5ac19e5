//! The dead-letter queue: events a consumer group gave up on, kept for inspection, redrive or
//! discard.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::{OnceLock, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use uuid::Uuid;

use crate::bus::{Bus, BusInner};
use crate::envelope::{AnyEnvelope, Erased};
use crate::handler::ErrorKind;
use crate::topic::Topic;

/// What a subscription does with events that failed their last attempt.
///
/// ```
/// use tidings::{DeadLetterPolicy, Subscription};
///
/// let ledger = Subscription::new("ledger").dead_letter(DeadLetterPolicy::Sequenced);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterPolicy {
    /// The event goes to the group's dead-letter queue and the partition moves on (default).
    /// Later events of the same key are handled meanwhile: a redriven event arrives after them.
    #[default]
    Park,
    /// As `Park`, and later events with the same key in this group are parked behind it (in
    /// the dead-letter queue, never attempted) until it is redriven or discarded, so a key's
    /// events are never handled out of order. Events without a key are parked alone. Other keys
    /// go on.
    ///
    /// Redriving the head of a parked key hands it to its worker again; once it succeeds, the
    /// events parked behind it follow in order, and then the key is free. Should one of them
    /// fail, it becomes the new head and the rest stay parked behind it. Discarding the head
    /// makes the next parked event the head (still parked, waiting for its redrive).
    Sequenced,
}

/// Delayed redelivery ("second-level retry"): an event that failed its last attempt is parked in
/// the dead-letter queue and redriven automatically after a delay, then after the next one, and
/// so on; after the last delay it stays in the queue for a person to look at.
///
/// Unlike [`Retry`](crate::Retry), which retries in place while later events of the partition
/// wait, the partition goes on meanwhile: with the default [`DeadLetterPolicy::Park`] later
/// events of the same key are handled before the redelivery; with
/// [`DeadLetterPolicy::Sequenced`] they are parked behind the failed event, so the key's order
/// holds and only that key waits (should the failed head be discarded, the next event of the
/// key is released at once). Permanent errors are not redelivered. A manual
/// [`redrive`](DeadLetters::redrive) also works meanwhile. Not available on a topic with
/// [`Overflow::DropOldest`](crate::Overflow::DropOldest), which could drop a redelivered event.
///
/// Scheduled redeliveries are not counted by [`Bus::settled`](crate::Bus::settled) (the bus is
/// idle while they wait); shutdown cancels them and the entries stay in the queue. With a
/// [store](crate::BusBuilder::store) the schedule survives the restart: the entry is read back
/// with its redelivery count and its next redelivery is due its delay after the last failure
/// (at once if that time passed while the bus was down); the rest of the schedule follows.
///
/// ```
/// use std::time::Duration;
/// use tidings::{DeadLetterPolicy, Redelivery, Retry, Subscription};
///
/// let payments = Subscription::new("payments")
///     .layer(Retry::new(3))
///     .dead_letter(DeadLetterPolicy::Sequenced)
///     .redelivery(Redelivery::after([
///         Duration::from_secs(10),
///         Duration::from_secs(60),
///         Duration::from_secs(600),
///     ]));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redelivery {
    pub(crate) delays: Arc<[Duration]>,
}

impl Redelivery {
    /// Redeliver after each of these delays in turn. At least one delay: an empty list would
    /// never redeliver, and is a [`BuildError::InvalidSetting`](crate::BuildError::InvalidSetting)
    /// from [`BusBuilder::build`](crate::BusBuilder::build) (leave redelivery unset instead).
    pub fn after(delays: impl IntoIterator<Item = Duration>) -> Self {
        Redelivery {
            delays: delays.into_iter().collect(),
        }
    }
}

/// An event a consumer group gave up on, with why.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Number of this entry in its group's dead-letter queue (increasing; not reused).
    pub seq: u64,
    /// The consumer group.
    pub group: String,
    /// The event, with its original id, metadata and correlation.
    pub envelope: AnyEnvelope,
    /// The last error (or panic, or timeout), as text: its `Display`, such as
    /// `timed out after 2s`. Only the text is kept (and stored, with a store): to act on the
    /// error's [type](crate::middleware#failures-the-layers-make), match it in a middleware
    /// outermost in the chain, which sees the error that goes to the queue.
    pub error: String,
    /// Whether the last error was transient or permanent.
    pub kind: ErrorKind,
    /// Delivery attempts made before giving up (0 for an event parked behind another).
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failure: SystemTime,
    /// When the last attempt failed.
    pub last_failure: SystemTime,
    /// The handler's type name.
    pub handler: &'static str,
    /// With [`DeadLetterPolicy::Sequenced`]: the entry this one is parked behind (the head of
    /// its key; it may have left the queue for a redrive and be on its way), or `None` if this
    /// one is the head.
    pub parked_behind: Option<u64>,
    /// How many times it was redelivered automatically (see [`Redelivery`]).
    pub redeliveries: u32,
}

/// Why a dead-letter operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// No subscription has this name.
    #[error("no subscription is named {group:?}")]
    UnknownGroup {
        /// The name asked for.
        group: String,
    },
    /// No entry has this number (redriven or discarded already?).
    #[error("no dead letter #{seq} in {group:?}")]
    NotFound {
        /// The group.
        group: String,
        /// The entry asked for.
        seq: u64,
    },
    /// With [`DeadLetterPolicy::Sequenced`], only the head of a parked key can be redriven.
    #[error("dead letter #{seq} is parked behind #{head}: redrive #{head} first")]
    ParkedBehind {
        /// The entry asked for.
        seq: u64,
        /// The head of its key.
        head: u64,
    },
    /// The entry is a row that could not be read back ([`Undecodable`](crate::Undecodable)),
    /// and it still cannot (register the missing type or [`Upcaster`](crate::Upcaster), then
    /// redrive it; or discard it).
    #[error("dead letter #{seq} still cannot be read: {error}")]
    Unreadable {
        /// The entry.
        seq: u64,
        /// Why it cannot be read.
        error: String,
    },
    /// The bus is shutting down or shut down: nothing can be redriven.
    #[error("the bus is shut down; the entry stays in the dead-letter queue")]
    Closed,
    /// With a store: the group's dead letters could not be read back from it (the first
    /// redrive after a start reads them if the group's workers have not yet); try again.
    #[error("reading the group's dead letters from the store failed: {error}")]
    Store {
        /// The store's error, as text.
        error: String,
    },
}

/// The canonical bytes of a key, or the event id for an event without a key.
type SeqKey = Vec<u8>;

fn seq_key(env: &AnyEnvelope) -> SeqKey {
    match env.key() {
        Some(key) => key.canonical_bytes(),
        None => env.id().as_bytes().to_vec(),
    }
}

/// The dead-letter queue of one consumer group.
pub(crate) struct DeadLetterQueue {
    pub(crate) group: String,
    pub(crate) policy: DeadLetterPolicy,
    topic: Arc<Topic>,
    slot: usize,
    state: Mutex<State>,
    /// Keys parked (sequenced policy): read by workers on every event without the lock.
    parked_keys: AtomicUsize,
    redelivery: Option<Redelivery>,
    /// Events out on a redrive whose redelivery count is kept in `State::carried`: read by
    /// workers on every success without the lock.
    carried: AtomicUsize,
    /// The bus, to schedule redeliveries (set once the bus exists).
    pub(crate) bus: OnceLock<Weak<BusInner>>,
    /// With a store: entries whose row is in the store, by (partition, offset), including
    /// those out on a redrive (the row goes when the event is handled); and how many.
    stored: Mutex<std::collections::HashSet<(u32, u64)>>,
    stored_count: AtomicUsize,
    /// With a store: the entries were read back from it (once, by the group's first worker).
    pub(crate) restored: tokio::sync::OnceCell<()>,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<u64, DeadLetter>,
    next_seq: u64,
    total: u64,
    redriven: u64,
    discarded: u64,
    /// Sequenced: each parked key's entries, head first; and the event being released.
    keys: HashMap<SeqKey, KeyState>,
    /// Redelivery counts of events out on a redrive, back if they fail again.
    /// Keyed by (event id, offset): copies published with one id each keep their own count.
    carried: HashMap<(Uuid, u64), u32>,
}

#[derive(Default)]
struct KeyState {
    seqs: std::collections::VecDeque<u64>,
    /// The head was redriven (or a follower released) and is on its way to the worker.
    releasing: Option<Releasing>,
}

/// The event of a parked key that its worker may handle: the redriven head, or a follower
/// released after it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Releasing {
    id: Uuid,
    partition: u32,
    offset: u64,
    /// Its entry number while it was in the queue.
    seq: u64,
}

impl KeyState {
    /// The entry the key's parked events wait behind: the first in the queue, or the one in
    /// flight.
    fn head(&self) -> Option<u64> {
        self.releasing.map(|r| r.seq).or(self.seqs.front().copied())
    }
}

/// Counters of one group's dead-letter queue.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DeadLetterCounts {
    pub(crate) depth: u64,
    pub(crate) total: u64,
    pub(crate) redriven: u64,
    pub(crate) discarded: u64,
}

/// What a sequenced worker does with an event of a parked key.
pub(crate) enum Gate {
    /// The key is free: handle it.
    Open,
    /// The key is parked: the event was parked behind its head.
    Parked,
    /// The redriven head: handle it, then release the followers.
    Release,
}

impl DeadLetterQueue {
    pub(crate) fn new(
        group: String,
        policy: DeadLetterPolicy,
        redelivery: Option<Redelivery>,
        topic: Arc<Topic>,
        slot: usize,
    ) -> Self {
        DeadLetterQueue {
            group,
            policy,
            topic,
            slot,
            state: Mutex::new(State::default()),
            parked_keys: AtomicUsize::new(0),
            redelivery: redelivery.filter(|r| !r.delays.is_empty()),
            carried: AtomicUsize::new(0),
            bus: OnceLock::new(),
            stored: Mutex::new(Default::default()),
            stored_count: AtomicUsize::new(0),
            restored: tokio::sync::OnceCell::new(),
        }
    }

    /// The topic's name.
    pub(crate) fn topic_name(&self) -> &str {
        &self.topic.name
    }

    /// With a store: the entry of the event at `offset` of `partition` now has a row.
    pub(crate) fn note_stored(&self, partition: u32, offset: u64) {
        if self.stored.lock().insert((partition, offset)) {
            self.stored_count.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// With a store: whether the event at `offset` of `partition` has a row (forgetting it:
    /// the caller deletes the row). Cheap when no row is kept.
    pub(crate) fn take_stored(&self, partition: u32, offset: u64) -> bool {
        if self.stored_count.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let taken = self.stored.lock().remove(&(partition, offset));
        if taken {
            self.stored_count.fetch_sub(1, Ordering::SeqCst);
        }
        taken
    }

    /// With a store: whether the event at `offset` of `partition` waits in the queue with its
    /// row saved (read again from the log after a restart that came before its offset was
    /// committed: it is dead-lettered already).
    pub(crate) fn holds(&self, partition: u32, offset: u64) -> bool {
        self.stored_count.load(Ordering::SeqCst) != 0
            && self.stored.lock().contains(&(partition, offset))
    }

    /// The entry of the event `id` at `offset`, if it is in the queue.
    pub(crate) fn entry_for(&self, id: Uuid, offset: u64) -> Option<DeadLetter> {
        self.state
            .lock()
            .entries
            .values()
            .rev()
            .find(|e| e.envelope.id() == id && e.envelope.offset() == offset)
            .cloned()
    }

    /// With a store: reads the group's dead letters back from it, once (the group's first
    /// worker, or the first redrive, whichever comes first; the others wait for it).
    pub(crate) async fn ensure_restored(
        &self,
        store: &dyn crate::store::Store,
        decoder: &crate::store::Decoder,
    ) -> Result<(), crate::store::StoreError> {
        self.restored
            .get_or_try_init(|| self.restore_from(store, decoder))
            .await
            .map(|_| ())
    }

    async fn restore_from(
        &self,
        store: &dyn crate::store::Store,
        decoder: &crate::store::Decoder,
    ) -> Result<(), crate::store::StoreError> {
        let partitions = self.topic.partitions.len() as u32;
        for record in store.dead_letters(&self.group).await? {
            let e = &record.event;
            if e.topic != self.topic.name || e.partition >= partitions {
                // Only a topic whose partition count shrank since (build refuses that when the
                // store knows it): left in the store, to come back with the partitions.
                tracing::error!(group = %self.group, topic = %e.topic, partition = e.partition, offset = e.offset, "tidings: a stored dead letter is not of a partition this group has; it stays in the store");
                continue;
            }
            let env = match decoder.decode(e) {
                crate::store::Decoded::Event(env) | crate::store::Decoded::Failed(env, _) => env,
            };
            let kind = if record.permanent {
                ErrorKind::Permanent
            } else {
                ErrorKind::Transient
            };
            self.restore(
                env,
                record.error,
                kind,
                record.attempts,
                (record.first_failure, record.last_failure),
                crate::store::intern(&record.handler),
                record.redeliveries,
            );
        }
        Ok(())
    }

    /// With a store: puts back an entry read from it (in offset order, so that sequenced keys
    /// park as they were).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn restore(
        &self,
        envelope: AnyEnvelope,
        error: String,
        kind: ErrorKind,
        attempts: u32,
        failures: (SystemTime, SystemTime),
        handler: &'static str,
        redeliveries: u32,
    ) {
        let (partition, offset) = (envelope.partition(), envelope.offset());
        let mut state = self.state.lock();
        if redeliveries > 0
            && state
                .carried
                .insert((envelope.id(), offset), redeliveries)
                .is_none()
        {
            self.carried.fetch_add(1, Ordering::Relaxed);
        }
        // Its next redelivery is due on the schedule it was on: the delay counts from its last
        // failure, the time the bus was down included (after a long stop, at once).
        let waited = SystemTime::now()
            .duration_since(failures.1)
            .unwrap_or_default();
        let seq = self.push_locked(
            &mut state, envelope, error, kind, attempts, failures, handler, false, waited,
        );
        state.total -= 1;
        // A head never attempted (its head was discarded, or the process stopped while its
        // key was being released) is released at once, as a discard would have done.
        let release = self.policy == DeadLetterPolicy::Sequenced
            && self.redelivery.is_some()
            && attempts == 0
            && kind == ErrorKind::Transient
            && state
                .entries
                .get(&seq)
                .is_some_and(|e| e.parked_behind.is_none());
        drop(state);
        self.note_stored(partition, offset);
        if release {
            self.schedule(seq, Duration::ZERO, 0, false);
        }
    }

    /// A redriven event was handled: forget its redelivery count (cheap when none is kept).
    pub(crate) fn handled(&self, id: Uuid, offset: u64) {
        if self.carried.load(Ordering::Relaxed) == 0 {
            return;
        }
        if self.state.lock().carried.remove(&(id, offset)).is_some() {
            self.carried.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Schedules the automatic redrive of entry `seq` after `delay`.
    /// Schedules a redrive of entry `seq` after `delay`: an automatic redelivery (counted), or
    /// the release of a key's new head (not counted).
    fn schedule(&self, seq: u64, delay: Duration, attempt: u32, automatic: bool) {
        let Some(inner) = self.bus.get().and_then(Weak::upgrade) else {
            return;
        };
        let Some(queue) = inner.dead_letters.get(&self.group).map(Arc::clone) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        tracing::info!(group = %self.group, seq, ?delay, redelivery = attempt, "dead letter to be redelivered");
        let cancel = inner.cancel.clone();
        runtime.spawn(async move {
            tokio::select! {
                biased;
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(delay) => {
                    let letters = DeadLetters::new(queue, Bus::unguarded(inner));
                    // Gone already (redriven or discarded by hand), or the bus closed: nothing
                    // to do; the entry, if any, stays.
                    let _ = letters.redrive_as(seq, automatic).await;
                }
            }
        });
    }

    pub(crate) fn counts(&self) -> DeadLetterCounts {
        let state = self.state.lock();
        DeadLetterCounts {
            depth: state.entries.len() as u64,
            total: state.total,
            redriven: state.redriven,
            discarded: state.discarded,
        }
    }

    /// Adds an event that failed its last attempt (`released`: an event of a parked key that
    /// its worker was allowed to handle, and that failed again).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push(
        &self,
        envelope: AnyEnvelope,
        error: String,
        kind: ErrorKind,
        attempts: u32,
        failures: (SystemTime, SystemTime),
        handler: &'static str,
        released: bool,
    ) -> u64 {
        let mut state = self.state.lock();
        self.push_locked(
            &mut state,
            envelope,
            error,
            kind,
            attempts,
            failures,
            handler,
            released,
            Duration::ZERO,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn push_locked(
        &self,
        state: &mut State,
        envelope: AnyEnvelope,
        error: String,
        kind: ErrorKind,
        attempts: u32,
        (first_failure, last_failure): (SystemTime, SystemTime),
        handler: &'static str,
        released: bool,
        waited: Duration,
    ) -> u64 {
        let seq = state.next_seq;
        state.next_seq += 1;
        state.total += 1;
        let redeliveries = match state.carried.remove(&(envelope.id(), envelope.offset())) {
            Some(n) => {
                self.carried.fetch_sub(1, Ordering::Relaxed);
                n
            }
            None => 0,
        };
        let mut parked_behind = None;
        if self.policy == DeadLetterPolicy::Sequenced {
            let key = seq_key(&envelope);
            if !state.keys.contains_key(&key) {
                self.parked_keys.fetch_add(1, Ordering::SeqCst);
            }
            let entry = state.keys.entry(key).or_default();
            if released {
                // A released event that failed again goes back to the head of its key.
                entry.releasing = None;
                entry.seqs.push_front(seq);
                let followers: Vec<u64> = entry.seqs.iter().skip(1).copied().collect();
                for s in followers {
                    if let Some(e) = state.entries.get_mut(&s) {
                        e.parked_behind = Some(seq);
                    }
                }
            } else {
                // Kept in log order: an older event of the key (read again after a restart)
                // goes before the younger ones parked already.
                let at = entry
                    .seqs
                    .iter()
                    .position(|s| {
                        state.entries.get(s).is_some_and(|e| {
                            e.envelope.partition() == envelope.partition()
                                && e.envelope.offset() > envelope.offset()
                        })
                    })
                    .unwrap_or(entry.seqs.len());
                entry.seqs.insert(at, seq);
                if at == 0 && entry.releasing.is_none() {
                    let followers: Vec<u64> = entry.seqs.iter().skip(1).copied().collect();
                    for s in followers {
                        if let Some(e) = state.entries.get_mut(&s) {
                            e.parked_behind = Some(seq);
                        }
                    }
                } else {
                    parked_behind = entry.head();
                }
            }
        }
        tracing::error!(group = %self.group, event_id = %envelope.id(), correlation_id = %envelope.correlation_id(), seq, attempts, error = %error, "event dead-lettered");
        // A failed event (not one parked behind another) with delays left is redelivered later.
        if let Some(redelivery) = &self.redelivery {
            if kind == ErrorKind::Transient && parked_behind.is_none() && attempts > 0 {
                if let Some(&delay) = redelivery.delays.get(redeliveries as usize) {
                    self.schedule(seq, delay.saturating_sub(waited), redeliveries + 1, true);
                }
            }
        }
        state.entries.insert(
            seq,
            DeadLetter {
                seq,
                group: self.group.clone(),
                envelope,
                error,
                kind,
                attempts,
                first_failure,
                last_failure,
                handler,
                parked_behind,
                redeliveries,
            },
        );
        seq
    }

    /// Sequenced: what to do with `env` (cheap when no key is parked).
    pub(crate) fn gate(&self, env: &AnyEnvelope, handler: &'static str) -> Gate {
        if self.parked_keys.load(Ordering::SeqCst) == 0 {
            return Gate::Open;
        }
        let key = seq_key(env);
        let mut state = self.state.lock();
        let Some(entry) = state.keys.get(&key) else {
            return Gate::Open;
        };
        if entry
            .releasing
            .is_some_and(|r| (r.id, r.offset) == (env.id(), env.offset()))
        {
            return Gate::Release;
        }
        // An event older than the key's head (read again from the log after a restart, say)
        // came before it: it is not parked behind it.
        let head_at = match entry.releasing {
            Some(r) => Some((r.partition, r.offset)),
            None => entry
                .seqs
                .front()
                .and_then(|s| state.entries.get(s))
                .map(|e| (e.envelope.partition(), e.envelope.offset())),
        };
        if head_at.is_some_and(|(p, head)| p == env.partition() && env.offset() < head) {
            return Gate::Open;
        }
        let now = SystemTime::now();
        self.push_locked(
            &mut state,
            env.clone(),
            "parked behind an earlier event of the same key".into(),
            ErrorKind::Transient,
            0,
            (now, now),
            handler,
            false,
            Duration::ZERO,
        );
        Gate::Parked
    }

    /// Sequenced: after a released event succeeded, the next event parked behind it (now taken
    /// out of the queue for the worker to handle), or `None` once the key is free.
    pub(crate) fn next_released(&self, env: &AnyEnvelope) -> Option<AnyEnvelope> {
        let key = seq_key(env);
        let mut state = self.state.lock();
        let state = &mut *state;
        let entry = state.keys.get_mut(&key)?;
        entry.releasing = None;
        let Some(seq) = entry.seqs.pop_front() else {
            state.keys.remove(&key);
            self.parked_keys.fetch_sub(1, Ordering::SeqCst);
            return None;
        };
        let letter = state.entries.remove(&seq)?;
        entry.releasing = Some(Releasing {
            id: letter.envelope.id(),
            partition: letter.envelope.partition(),
            offset: letter.envelope.offset(),
            seq,
        });
        state.redriven += 1;
        Some(AnyEnvelope {
            inner: letter.envelope.inner,
            attempt: 1,
        })
    }

    /// Counts a released follower as delivered to the group's queue again (it was counted
    /// failed when parked).
    pub(crate) fn count_delivery(&self, env: &AnyEnvelope) {
        let part = &self.topic.partitions[env.partition() as usize];
        part.lock().queues[self.slot].delivered += 1;
    }

    fn list(&self) -> Vec<DeadLetter> {
        self.state.lock().entries.values().cloned().collect()
    }

    fn get(&self, seq: u64) -> Option<DeadLetter> {
        self.state.lock().entries.get(&seq).cloned()
    }

    fn not_found(&self, seq: u64) -> DeadLetterError {
        DeadLetterError::NotFound {
            group: self.group.clone(),
            seq,
        }
    }

    /// Takes entry `seq` out for a redrive (sequenced: only a head, which stays the head of a
    /// parked key until it is handled).
    fn take_for_redrive(&self, seq: u64, automatic: bool) -> Result<DeadLetter, DeadLetterError> {
        let mut state = self.state.lock();
        let state = &mut *state;
        let letter = state.entries.get(&seq).ok_or_else(|| self.not_found(seq))?;
        if self.policy == DeadLetterPolicy::Sequenced {
            let key = seq_key(&letter.envelope);
            let (id, partition, offset) = (
                letter.envelope.id(),
                letter.envelope.partition(),
                letter.envelope.offset(),
            );
            let entry = state
                .keys
                .get_mut(&key)
                .ok_or_else(|| self.not_found(seq))?;
            let head = entry.head().unwrap_or(seq);
            if head != seq {
                return Err(DeadLetterError::ParkedBehind { seq, head });
            }
            entry.seqs.pop_front();
            entry.releasing = Some(Releasing {
                id,
                partition,
                offset,
                seq,
            });
        }
        state.redriven += 1;
        let letter = state.entries.remove(&seq).expect("checked above");
        // Its redelivery count travels with it, back if it fails again.
        let count = letter.redeliveries + u32::from(automatic);
        let carried = (letter.envelope.id(), letter.envelope.offset());
        if count > 0 && state.carried.insert(carried, count).is_none() {
            self.carried.fetch_add(1, Ordering::Relaxed);
        }
        Ok(letter)
    }

    /// Puts back an entry whose redrive did not happen (the bus closed, or the redrive was
    /// cancelled).
    fn put_back(&self, letter: DeadLetter) {
        let mut state = self.state.lock();
        state.redriven -= 1;
        if state
            .carried
            .remove(&(letter.envelope.id(), letter.envelope.offset()))
            .is_some()
        {
            self.carried.fetch_sub(1, Ordering::Relaxed);
        }
        if self.policy == DeadLetterPolicy::Sequenced {
            let key = seq_key(&letter.envelope);
            if !state.keys.contains_key(&key) {
                self.parked_keys.fetch_add(1, Ordering::SeqCst);
            }
            let entry = state.keys.entry(key).or_default();
            entry.releasing = None;
            entry.seqs.push_front(letter.seq);
        }
        // Its scheduled redelivery may have fired while it was out: schedule it again (a timer
        // that finds it gone does nothing, so two are harmless).
        if let Some(redelivery) = &self.redelivery {
            if letter.kind == ErrorKind::Transient
                && letter.parked_behind.is_none()
                && letter.attempts > 0
            {
                if let Some(&delay) = redelivery.delays.get(letter.redeliveries as usize) {
                    self.schedule(letter.seq, delay, letter.redeliveries + 1, true);
                }
            }
        }
        state.entries.insert(letter.seq, letter);
    }

    fn discard(&self, seq: u64, reason: &str) -> Result<DeadLetter, DeadLetterError> {
        let mut state = self.state.lock();
        let state = &mut *state;
        let letter = state
            .entries
            .remove(&seq)
            .ok_or_else(|| self.not_found(seq))?;
        state.discarded += 1;
        if self.policy == DeadLetterPolicy::Sequenced {
            let key = seq_key(&letter.envelope);
            if let Some(entry) = state.keys.get_mut(&key) {
                entry.seqs.retain(|&s| s != seq);
                match entry.head() {
                    None => {
                        state.keys.remove(&key);
                        self.parked_keys.fetch_sub(1, Ordering::SeqCst);
                    }
                    Some(head) => {
                        // While the head is in flight, the others stay behind it.
                        let first_is_head = entry.releasing.is_none();
                        for (i, &s) in entry.seqs.iter().enumerate() {
                            if let Some(e) = state.entries.get_mut(&s) {
                                e.parked_behind = (i > 0 || !first_is_head).then_some(head);
                            }
                        }
                        // With redelivery on, nobody is expected to come back for the key: the
                        // new head (never attempted) is released at once.
                        if first_is_head && self.redelivery.is_some() {
                            self.schedule(head, Duration::ZERO, 0, false);
                        }
                    }
                }
            }
        }
        tracing::warn!(group = %self.group, event_id = %letter.envelope.id(), seq, reason, "dead letter discarded");
        Ok(letter)
    }

    fn heads(&self) -> Vec<u64> {
        let state = self.state.lock();
        state
            .entries
            .values()
            .filter(|e| e.parked_behind.is_none())
            .map(|e| e.seq)
            .collect()
    }
}

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
/// Get it with [`Bus::dead_letters`]. An event lands here after its last failed attempt (see
/// [`Retry`](crate::Retry)), with the error, the attempts and when they failed. Without a store
/// the queue is in memory: it lives as long as the bus (it stays readable after shutdown) and is
/// not bounded — watch its depth in [`Bus::stats`] (`GroupStats::dead_letters`). With a
/// [store](crate::Store) each entry is also saved there before the group's offset passes its
/// event, comes back when the bus restarts, and is deleted once a redriven event is handled (or
/// the entry discarded). A row of the log that could not be read back is an entry too, holding
/// an [`Undecodable`](crate::Undecodable); redriving it reads the row again (say, after the
/// missing [`Upcaster`](crate::Upcaster) was registered) and is refused with
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
#[derive(Clone)]
pub struct DeadLetters {
    queue: Arc<DeadLetterQueue>,
    bus: Bus,
}

impl DeadLetters {
    pub(crate) fn new(queue: Arc<DeadLetterQueue>, bus: Bus) -> Self {
        DeadLetters { queue, bus }
    }

    /// The group's entries, oldest first (sequenced: an event parked behind another names it in
    /// [`parked_behind`](DeadLetter::parked_behind), which may be in flight for a redrive).
    pub fn list(&self) -> Vec<DeadLetter> {
        self.queue.list()
    }

    /// Entry `seq`, if it is still there.
    pub fn get(&self, seq: u64) -> Option<DeadLetter> {
        self.queue.get(seq)
    }

    /// The entry of the event with this id, if there is one (the oldest, should the same id
    /// have been dead-lettered twice).
    pub fn find(&self, event_id: Uuid) -> Option<DeadLetter> {
        let state = self.queue.state.lock();
        state
            .entries
            .values()
            .find(|e| e.envelope.id() == event_id)
            .cloned()
    }

    /// How many entries wait.
    pub fn len(&self) -> usize {
        self.queue.state.lock().entries.len()
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
    pub async fn redrive(&self, seq: u64) -> Result<(), DeadLetterError> {
        self.redrive_as(seq, false).await
    }

    /// A redrive, by hand or by a scheduled [`Redelivery`].
    pub(crate) async fn redrive_as(
        &self,
        seq: u64,
        automatic: bool,
    ) -> Result<(), DeadLetterError> {
        if !self.bus.inner.is_open() {
            return Err(DeadLetterError::Closed);
        }
        self.restored().await?;
        // A row that could not be read is read again (a type or an upcaster may have been
        // registered since); it goes to the handler only if that works now.
        let mut decoded: Option<Erased> = None;
        if let Some(letter) = self.queue.get(seq) {
            if letter
                .envelope
                .downcast_ref::<crate::Undecodable>()
                .is_some()
            {
                let unreadable = |error: String| DeadLetterError::Unreadable { seq, error };
                let durable = self.bus.inner.durable.as_ref();
                let row = crate::store::stored_event_of(&letter.envelope).map_err(unreadable)?;
                match durable.map(|d| d.decoder.decode(&row)) {
                    Some(crate::store::Decoded::Event(env)) => decoded = Some(env.inner),
                    Some(crate::store::Decoded::Failed(_, error)) => return Err(unreadable(error)),
                    None => return Err(unreadable("the bus has no store".into())),
                }
            }
        }
        let letter = self.queue.take_for_redrive(seq, automatic)?;
        let item: Erased = decoded.unwrap_or_else(|| Arc::clone(&letter.envelope.inner));
        tracing::info!(group = %self.queue.group, event_id = %letter.envelope.id(), seq, "redriving dead letter");
        // Cancel safe: dropped before the event is in the queue, the entry goes back.
        let mut pending = Redriving {
            queue: &self.queue,
            letter: Some(letter),
        };
        match self
            .bus
            .inner
            .redeliver(&self.queue.topic, self.queue.slot, item)
            .await
        {
            Ok(()) => {
                pending.letter = None;
                Ok(())
            }
            Err(_) => Err(DeadLetterError::Closed),
        }
    }

    /// With a store: waits until the group's entries are read back from it (reads them if the
    /// group's workers have not yet), so that what a redrive finds is complete.
    async fn restored(&self) -> Result<(), DeadLetterError> {
        match self.bus.inner.durable.as_ref() {
            Some(d) => self
                .queue
                .ensure_restored(&*d.store, &d.decoder)
                .await
                .map_err(|e| DeadLetterError::Store {
                    error: e.to_string(),
                }),
            None => Ok(()),
        }
    }

    /// Redrives every entry (sequenced: every head; the events parked behind follow it), oldest
    /// first, and returns how many were sent.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Closed`] once shutdown has begun; what was redriven before stays
    /// redriven.
    pub async fn redrive_all(&self) -> Result<usize, DeadLetterError> {
        self.redrive_where(|_| true).await
    }

    /// Redrives the entries `filter` picks (sequenced: heads only), oldest first — say, only
    /// transient failures — and returns how many were sent.
    ///
    /// ```no_run
    /// # async fn f(dlq: tidings::DeadLetters) -> Result<(), tidings::DeadLetterError> {
    /// use tidings::ErrorKind;
    /// dlq.redrive_where(|letter| letter.kind == ErrorKind::Transient).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`redrive_all`](Self::redrive_all).
    pub async fn redrive_where(
        &self,
        filter: impl Fn(&DeadLetter) -> bool,
    ) -> Result<usize, DeadLetterError> {
        if !self.bus.inner.is_open() {
            return Err(DeadLetterError::Closed);
        }
        self.restored().await?;
        let mut sent = 0;
        for seq in self.queue.heads() {
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
        let letter = self.queue.discard(seq, reason)?;
        let env = &letter.envelope;
        if let Some(durable) = &self.bus.inner.durable {
            if self.queue.take_stored(env.partition(), env.offset()) {
                let store = std::sync::Arc::clone(&durable.store);
                let (group, topic) = (self.queue.group.clone(), self.queue.topic_name().to_owned());
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
            .field("group", &self.queue.group)
            .field("len", &self.len())
            .finish()
    }
}
