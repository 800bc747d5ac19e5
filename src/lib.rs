#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The derive macro names `tidings::…`; inside this crate that is the crate itself.
#[allow(unused_extern_crates)]
extern crate self as tidings;

mod budget;
mod bus;
mod command;
mod context;
mod core;
pub mod dead_letter;
mod delivery;
mod durable;
mod envelope;
mod error;
mod event;
mod handler;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(not(feature = "metrics"))]
mod metrics;
pub mod middleware;
mod publish;
mod runtime;
mod spans;
pub mod stats;
pub mod store;
pub mod testing;
mod topic;
pub mod topology;
mod window;

// The root: what the first examples of the README use. Extension points (middleware, stores,
// dead letters, counters, the test harness) have one path each, under their public module.
pub use bus::rebuild;
pub use bus::{
    Bus, BusBuilder, EventSet, Failure, Handles, Module, PublishOptions, Published, RestartBackoff,
    Subscription,
};
pub use command::Command;
pub use context::Context;
pub use delivery::DeliveryMode;
pub use envelope::{AnyEnvelope, Envelope, Headers, Metadata};
pub use error::{BuildError, PublishError, RequestError, TryPublishError};
pub use event::{AsKey, DynEvent, Event, EventInfo, Key};
pub use handler::{
    AnyHandler, CommandHandler, ErrorKind, Handler, HandlerError, HandlerResult, Panicked,
};
pub use runtime::command_options::CommandOptions;
pub use topic::{Overflow, TopicConfig, DEFAULT_CAPACITY};

/// Event, correlation and causation ids are UUIDs (v7 for ids the bus makes).
pub use uuid::Uuid;

/// Derives [`Event`] for a serde type. See [`Event`] for the attributes.
pub use tidings_macros::Event;

/// The common imports: `use tidings::prelude::*;`.
///
/// The prelude only re-exports: each item here has its own path, at the crate root or under its
/// module (`Retry`, `Timeout`, `Dedup`, `DedupWindow`, `Middleware` and `Next` are
/// [`tidings::middleware`](crate::middleware)'s, `DeadLetterPolicy` is
/// [`tidings::dead_letter`](crate::dead_letter)'s, `StartFrom` is
/// [`tidings::store`](crate::store)'s). It gives those items a second path so that one glob
/// import covers what a typical module of an application needs.
pub mod prelude {
    pub use crate::dead_letter::DeadLetterPolicy;
    pub use crate::middleware::{Dedup, DedupWindow, Middleware, Next, Retry, Timeout};
    pub use crate::store::StartFrom;
    pub use crate::{
        AnyEnvelope, AnyHandler, Bus, BusBuilder, Command, CommandHandler, CommandOptions, Context,
        DeliveryMode, Envelope, ErrorKind, Event, EventSet, Handler, HandlerError, HandlerResult,
        Handles, Headers, Module, Overflow, PublishOptions, RestartBackoff, Subscription,
        TopicConfig,
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
