//! Publish/subscribe: per-key ordering, fan-out and competing consumers, partitions, delivery
//! modes, bounded queues and backpressure, correlation and causation.
//!
//! `TIDINGS_STRESS=N cargo test --test pubsub ordering::` repeats the concurrency test of the
//! ordering contract N times with other seeds.

#[path = "../support/mod.rs"]
mod support;

mod backpressure;
mod correlation;
mod delivery_modes;
mod envelope_reuse;
mod event_sets;
mod ordering;
mod scheduler_cooperation;
mod start_without_store;
