//! Supervision and lifecycle: handler errors and panics (even before a future exists) never
//! take the bus down; restarts from the factory; building, shutdown (drained, timed out,
//! dropped), stats; handlers publishing into their own queue; nothing hangs, leaks or is lost
//! when shutdown races with publishers and requesters.
//!
//! `TIDINGS_STRESS=N cargo test --test supervision panics_and_races::` runs the race of
//! shutdown with publishers and requesters 40 × N times (default 40).

mod lifecycle;
mod panics_and_races;
mod restarts;
mod self_publish_and_late_shutdown;
mod shutdown_timeout;
