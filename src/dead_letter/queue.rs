//! One consumer group's dead-letter queue: its entries, the sequenced policy's parked keys,
//! redelivery counts, scheduled redeliveries and which entries a store holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::{OnceLock, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use uuid::Uuid;

use super::{DeadLetter, DeadLetterPolicy, DeadLetters, Redelivery};
use crate::core::queue::Topic;
use crate::core::Core;
use crate::envelope::AnyEnvelope;
use crate::handler::ErrorKind;

/// The canonical bytes of a key, or the event id for an event without a key.
pub(super) type SeqKey = Vec<u8>;

pub(super) fn seq_key(env: &AnyEnvelope) -> SeqKey {
    match env.key() {
        Some(key) => key.canonical_bytes(),
        None => env.id().as_bytes().to_vec(),
    }
}

/// How far apart the entry numbers of one group's queues are: the queue of a group's `n`th
/// topic numbers its entries from `n << SEQ_SHIFT`, so one handle tells them apart.
pub(crate) const SEQ_SHIFT: u32 = 48;

/// The dead-letter queue of one consumer group on one topic (a group whose event set spans
/// topics has one per topic, behind one [`DeadLetters`] handle).
pub(crate) struct DeadLetterQueue {
    pub(crate) group: String,
    /// The first entry number of this queue (see [`SEQ_SHIFT`]).
    pub(crate) seq_base: u64,
    /// The group's other topics: their stored dead letters belong to their own queues.
    pub(crate) sibling_topics: Vec<String>,
    pub(crate) policy: DeadLetterPolicy,
    pub(super) topic: Arc<Topic>,
    pub(super) slot: usize,
    pub(super) state: Mutex<State>,
    /// Keys parked (sequenced policy): read by workers on every event without the lock.
    pub(super) parked_keys: AtomicUsize,
    pub(super) redelivery: Option<Redelivery>,
    /// Events out on a redrive whose redelivery count is kept in `State::carried`: read by
    /// workers on every success without the lock.
    pub(super) carried: AtomicUsize,
    /// The bus, to schedule redeliveries (set once the bus exists).
    /// The core (for redeliveries) and this queue itself, set once the bus is built.
    pub(crate) bus: OnceLock<(Weak<Core>, Weak<DeadLetterQueue>)>,
    /// With a store: entries whose row is in the store, by (partition, offset), including
    /// those out on a redrive (the row goes when the event is handled); and how many.
    pub(super) stored: Mutex<std::collections::HashSet<(u32, u64)>>,
    pub(super) stored_count: AtomicUsize,
    /// With a store: the entries were read back from it (once, by the group's first worker).
    pub(crate) restored: tokio::sync::OnceCell<()>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) entries: BTreeMap<u64, DeadLetter>,
    pub(super) next_seq: u64,
    pub(super) total: u64,
    pub(super) redriven: u64,
    pub(super) discarded: u64,
    /// Sequenced: each parked key's entries, head first; and the event being released.
    pub(super) keys: HashMap<SeqKey, KeyState>,
    /// Redelivery counts of events out on a redrive, back if they fail again.
    /// Keyed by (event id, offset): copies published with one id each keep their own count.
    pub(super) carried: HashMap<(Uuid, u64), u32>,
}

#[derive(Default)]
pub(super) struct KeyState {
    pub(super) seqs: std::collections::VecDeque<u64>,
    /// The head was redriven (or a follower released) and is on its way to the worker.
    pub(super) releasing: Option<Releasing>,
}

/// The event of a parked key that its worker may handle: the redriven head, or a follower
/// released after it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Releasing {
    pub(super) id: Uuid,
    pub(super) partition: u32,
    pub(super) offset: u64,
    /// Its entry number while it was in the queue.
    pub(super) seq: u64,
}

impl KeyState {
    /// The entry the key's parked events wait behind: the first in the queue, or the one in
    /// flight.
    pub(super) fn head(&self) -> Option<u64> {
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
        seq_base: u64,
        sibling_topics: Vec<String>,
    ) -> Self {
        DeadLetterQueue {
            group,
            seq_base,
            sibling_topics,
            policy,
            topic,
            slot,
            state: Mutex::new(State {
                next_seq: seq_base,
                ..State::default()
            }),
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

    pub(super) async fn restore_from(
        &self,
        store: &dyn crate::store::Store,
        decoder: &crate::store::Decoder,
    ) -> Result<(), crate::store::StoreError> {
        let partitions = self.topic.partitions.len() as u32;
        for record in store.dead_letters(&self.group).await? {
            let e = &record.event;
            if self.sibling_topics.contains(&e.topic) {
                continue; // restored by the group's queue of that topic
            }
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
    pub(super) fn schedule(&self, seq: u64, delay: Duration, attempt: u32, automatic: bool) {
        let Some((core, queue)) = self.bus.get() else {
            return;
        };
        let (Some(inner), Some(queue)) = (core.upgrade(), queue.upgrade()) else {
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
                    let letters = DeadLetters::new(Arc::new([queue]), inner);
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
        self.topic.metrics.group(self.slot).dead_lettered();
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
    pub(super) fn push_locked(
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
}
