//! The bus on a store: crash recovery (a child process killed again and again), dead letters and
//! effectively-once marks across crashes and restarts, batched marks, shutdown that keeps its
//! word after a restart, other writers on the same store and retention, rebuilding a projection
//! on a running bus and readiness at start.
//!
//! `crash_recovery` starts this binary again as its child (the test `crash_recovery::child`).

#[path = "../support/mod.rs"]
mod support;

mod crash_recovery;
mod dead_letter_restarts;
mod dead_letters_across_crashes;
mod effectively_once_batching;
mod live_rebuild;
mod other_writers;
mod shutdown_keeps_its_word;
mod writers_and_retention;
