//! Dead letters: events a consumer group gave up on, kept for inspection, redrive or discard.
//!
//! An event that failed its last attempt goes to its group's dead-letter queue and the
//! partition moves on. [`Bus::dead_letters`](crate::Bus::dead_letters) hands out the queue of a
//! group as a [`DeadLetters`] handle (list, find, redrive, discard); each entry is a
//! [`DeadLetter`], and a refused operation a [`DeadLetterError`]. A subscription chooses what
//! happens to the events of a key behind a failed one with a [`DeadLetterPolicy`], and can have
//! its dead letters redriven automatically after delays with a [`Redelivery`].
//!
//! ```
//! use std::time::Duration;
//! use tidings::dead_letter::{DeadLetterPolicy, Redelivery};
//! use tidings::Subscription;
//!
//! let ledger = Subscription::new("ledger")
//!     .dead_letter(DeadLetterPolicy::Sequenced)
//!     .redelivery(Redelivery::after([Duration::from_secs(10), Duration::from_secs(60)]));
//! ```

// The public types are here; `queue` is one group's queue (entries, the sequenced policy's
// parked keys, scheduled redeliveries, what a store holds), `redrive` the operations on it (the
// sequenced gate, redrive, discard), and `handle` the public `DeadLetters` handle.

mod handle;
pub(crate) mod queue;
mod redrive;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::envelope::AnyEnvelope;
use crate::handler::ErrorKind;

pub use handle::DeadLetters;
pub(crate) use queue::{DeadLetterQueue, Gate};

/// What a subscription does with events that failed their last attempt.
///
/// ```
/// use tidings::dead_letter::DeadLetterPolicy;
/// use tidings::Subscription;
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
/// Unlike [`Retry`](crate::middleware::Retry), which retries in place while later events of the
/// partition wait, the partition goes on meanwhile: with the default [`DeadLetterPolicy::Park`]
/// later events of the same key are handled before the redelivery; with
/// [`DeadLetterPolicy::Sequenced`] they are parked behind the failed event, so the key's order
/// holds and only that key waits (should the failed head be discarded, the next event of the key is
/// released at once). Permanent errors are not redelivered. A manual
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
/// use tidings::dead_letter::{DeadLetterPolicy, Redelivery};
/// use tidings::middleware::Retry;
/// use tidings::Subscription;
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
    /// The entry is a row that could not be read back ([`Undecodable`](crate::store::Undecodable)),
    /// and it still cannot (register the missing type or [`Upcaster`](crate::store::Upcaster), then
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
