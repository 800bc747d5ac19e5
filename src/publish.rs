//! What a publish returns and takes: [`Published`], [`PublishOptions`], the [`Failure`] the
//! bus records, and the cause an event or request carries on.

use uuid::Uuid;

use crate::envelope::{AnyEnvelope, Headers};

/// What [`Bus::publish`](crate::Bus::publish) returns once the bus accepted an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The id given to the event.
    pub id: Uuid,
    /// The partition it landed on.
    pub partition: u32,
    /// Its offset in that partition.
    pub offset: u64,
    /// The event's id was already published within the
    /// [deduplication window](crate::BusBuilder::dedup_publishes): nothing was published this time,
    /// and the fields above are those of the first publish.
    pub duplicate: bool,
}

/// How to publish an event: an id of your own, headers.
///
/// [`Headers`] convert into options, so `publish_with(event, headers)` works as is.
///
/// ```
/// use tidings::{Headers, PublishOptions, Uuid};
///
/// let options = PublishOptions::new()
///     .id(Uuid::now_v7())
///     .headers(Headers::new().with("tenant", "acme"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    pub(crate) id: Option<Uuid>,
    pub(crate) headers: Headers,
}

impl PublishOptions {
    /// No options: a fresh id, no headers.
    pub fn new() -> Self {
        PublishOptions::default()
    }

    /// Publishes the event with this id instead of a fresh one: an idempotency key, for
    /// [producer-side deduplication](crate::BusBuilder::dedup_publishes) of retried publishes.
    /// Without that option a second publish with the same id is accepted and delivered again (a
    /// [`Dedup`](crate::middleware::Dedup) layer then skips it per group). Ids should stay unique
    /// per event; a UUIDv7 keeps them time-ordered.
    #[must_use]
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }

    /// Attaches these headers.
    #[must_use]
    pub fn headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }
}

impl From<Headers> for PublishOptions {
    fn from(headers: Headers) -> Self {
        PublishOptions { id: None, headers }
    }
}

/// A failure the bus gave up on: the event, the group, the last error.
///
/// Recorded when the bus was built with [`BusBuilder::record`](crate::BusBuilder::record) (as the
/// [test harness](crate::testing) does), and always logged at `error` level.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The consumer group whose handler failed.
    pub group: String,
    /// The event.
    pub envelope: AnyEnvelope,
    /// The last error (or panic message), as text.
    pub error: String,
    /// How many times the event was delivered.
    pub attempts: u32,
}

/// The event (or request) being handled, which the events it leads to name as their cause.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cause {
    pub(crate) id: Uuid,
    pub(crate) correlation: Uuid,
}
