#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The derive macro names `tidings::…`; inside this crate that is the crate itself.
#[allow(unused_extern_crates)]
extern crate self as tidings;

mod bus;
mod command;
mod context;
mod core;
mod dead_letter;
mod delivery;
mod durable;
mod envelope;
mod error;
mod event;
mod handler;
pub mod middleware;
mod publish;
mod runtime;
mod stats;
pub mod store;
pub mod testing;
mod topic;
mod window;

#[doc(inline)]
pub use bus::{Bus, BusBuilder, Failure, PublishOptions, Published, RestartBackoff, Subscription};
pub use command::Command;
pub use context::Context;
pub use dead_letter::{DeadLetter, DeadLetterError, DeadLetterPolicy, DeadLetters, Redelivery};
pub use delivery::DeliveryMode;
pub use envelope::{AnyEnvelope, Envelope, Headers, Metadata};
pub use error::{BuildError, PublishError, RequestError, TryPublishError};
pub use event::{AsKey, DynEvent, Event, EventInfo, Key};
pub use handler::{
    AnyHandler, CommandHandler, ErrorKind, Handler, HandlerError, HandlerResult, Panicked,
};
#[doc(inline)]
pub use middleware::{
    CircuitBreaker, Dedup, DedupStore, DedupWindow, MemoryDedupStore, Middleware, Next, Retry,
    Throttle, Timeout,
};
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
#[doc(inline)]
pub use middleware::{TowerLayer, TowerRequest};
pub use stats::{GroupStats, PartitionStats, ShutdownReport, Stats, TopicStats};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[doc(inline)]
pub use store::PostgresStore;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
#[doc(inline)]
pub use store::SqliteStore;
#[doc(inline)]
pub use store::{
    DeadLetterRecord, GroupOffset, MemoryStore, Retention, StartFrom, Store, StoreError,
    StoredEvent, TryAppend, Undecodable, UpcastError, Upcaster, DEFAULT_MAX_PAYLOAD,
};
pub use topic::{Overflow, TopicConfig, DEFAULT_CAPACITY};

/// Event, correlation and causation ids are UUIDs (v7 for ids the bus makes).
pub use uuid::Uuid;

/// Derives [`Event`] for a serde type. See [`Event`] for the attributes.
pub use tidings_macros::Event;

/// The common imports: `use tidings::prelude::*;`.
pub mod prelude {
    pub use crate::{
        AnyEnvelope, AnyHandler, Bus, BusBuilder, Command, CommandHandler, Context,
        DeadLetterPolicy, Dedup, DedupWindow, DeliveryMode, Envelope, ErrorKind, Event, Handler,
        HandlerError, HandlerResult, Headers, Middleware, Next, Overflow, PublishOptions,
        RestartBackoff, Retry, StartFrom, Subscription, Timeout, TopicConfig,
    };
}

#[doc(hidden)]
pub mod __private {
    pub use typetag;

    /// `event` serialized as a store keeps it.
    pub fn to_json<E: crate::Event>(event: &E) -> Result<Vec<u8>, String> {
        serde_json::to_vec(event).map_err(|e| e.to_string())
    }

    /// `event` in an envelope with `meta`, at attempt 1.
    pub fn into_envelope<E: crate::Event>(event: E, meta: crate::Metadata) -> crate::AnyEnvelope {
        crate::envelope::AnyEnvelope::from_parts(meta, event)
    }
}
