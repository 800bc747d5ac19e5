//! Reading the log: where a group starts ([`start_offset`]) and the rows it catches up on
//! ([`Feed`]), decoded for its handler.

use std::collections::VecDeque;
use std::sync::Arc;

use super::READ_PAGE;
use crate::envelope::Erased;
use crate::store::{Decoded, Decoder, GroupOffset, StartFrom, Store, StoreError, StoredEvent};

/// A worker's view of its partition with a store: which offset it handles next, and catching up
/// from the log.
pub(crate) struct Feed {
    pub(crate) store: Arc<dyn Store>,
    /// Reading stops here: the head when the catch-up began.
    pub(crate) until: u64,
    /// Rows read and not yet handed out.
    pub(crate) rows: VecDeque<StoredEvent>,
}

/// Where a worker starts: its committed offset, or `start` without one (or when `reset`).
pub(crate) async fn start_offset(
    store: &dyn Store,
    group: &str,
    topic: &str,
    partition: u32,
    start: StartFrom,
    reset: bool,
) -> Result<(u64, u64), StoreError> {
    let head = store.head(topic, partition).await?;
    let committed = if reset {
        None
    } else {
        store.committed(group, topic, partition).await?
    };
    let from = match committed {
        Some(c) => c,
        None => match start {
            StartFrom::Earliest => 0,
            StartFrom::Latest => head,
            StartFrom::Offset(o) => o.min(head),
            StartFrom::Timestamp(t) => store.offset_at(topic, partition, t).await?,
        },
    };
    if committed.is_none() {
        // Remember the start at once: a crash before the first commit must not move a group
        // that started at "latest" past events published meanwhile (and a reset sticks).
        store
            .reset_offset(&GroupOffset {
                group: group.to_owned(),
                topic: topic.to_owned(),
                partition,
                next_offset: from,
            })
            .await?;
    }
    Ok((from, head))
}

/// What a catch-up read gave, one row at a time.
pub(crate) enum Caught {
    /// Not for this worker's subscription (another event type).
    Skip(u64),
    /// No event below this offset is left in the log (retention): pass them.
    Gap(u64),
    Event(Erased),
    Bad(crate::AnyEnvelope, String),
}

impl Feed {
    /// The next row up to `until`, read from the log a page at a time; `None` once there.
    pub(crate) async fn next(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        accepts: impl Fn(&str) -> bool,
        decoder: &Decoder,
    ) -> Result<Option<Caught>, StoreError> {
        if self.rows.is_empty() {
            if from >= self.until {
                return Ok(None);
            }
            let limit = ((self.until - from) as usize).min(READ_PAGE);
            let rows = self.store.read(topic, partition, from, limit).await?;
            self.rows
                .extend(rows.into_iter().filter(|r| r.offset < self.until));
            match self.rows.front() {
                // Nothing left below `until`: deleted by retention.
                None => return Ok(Some(Caught::Gap(self.until))),
                Some(first) if first.offset > from => {
                    if from > 0 {
                        tracing::warn!(topic, partition, from, resumed = first.offset, "tidings: events before this offset are no longer in the log (retention); the group passes them");
                    }
                    return Ok(Some(Caught::Gap(first.offset)));
                }
                Some(_) => {}
            }
        }
        let row = self.rows.pop_front().expect("not empty");
        // A row whose type name could not be read (left empty) may be this subscription's:
        // every group reading the partition dead-letters it.
        if !row.name.is_empty() && !accepts(&row.name) {
            return Ok(Some(Caught::Skip(row.offset)));
        }
        Ok(Some(match decoder.decode(&row) {
            Decoded::Event(env) => Caught::Event(env.inner),
            Decoded::Failed(env, error) => Caught::Bad(env, error),
        }))
    }
}
