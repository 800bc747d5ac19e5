//! What the worker and the [`DeadLetters`](super::DeadLetters) handle do with a group's queue:
//! the sequenced gate (park a failed key's later events, release them in order), and taking
//! entries out for a redrive or a discard.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::queue::{seq_key, DeadLetterQueue, Gate, Releasing};
use super::{DeadLetter, DeadLetterError, DeadLetterPolicy};
use crate::envelope::AnyEnvelope;
use crate::handler::ErrorKind;

impl DeadLetterQueue {
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
        self.topic.metrics.group(self.slot).dead_lettered();
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
        self.topic.metrics.group(self.slot).redriven();
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

    pub(super) fn list(&self) -> Vec<DeadLetter> {
        self.state.lock().entries.values().cloned().collect()
    }

    pub(super) fn get(&self, seq: u64) -> Option<DeadLetter> {
        self.state.lock().entries.get(&seq).cloned()
    }

    pub(super) fn not_found(&self, seq: u64) -> DeadLetterError {
        DeadLetterError::NotFound {
            group: self.group.clone(),
            seq,
        }
    }

    /// Takes entry `seq` out for a redrive (sequenced: only a head, which stays the head of a
    /// parked key until it is handled).
    pub(super) fn take_for_redrive(
        &self,
        seq: u64,
        automatic: bool,
    ) -> Result<DeadLetter, DeadLetterError> {
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
    pub(super) fn put_back(&self, letter: DeadLetter) {
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

    pub(super) fn discard(&self, seq: u64, reason: &str) -> Result<DeadLetter, DeadLetterError> {
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

    pub(super) fn heads(&self) -> Vec<u64> {
        let state = self.state.lock();
        state
            .entries
            .values()
            .filter(|e| e.parked_behind.is_none())
            .map(|e| e.seq)
            .collect()
    }
}
