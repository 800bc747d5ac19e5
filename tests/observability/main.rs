//! What the bus tells `tracing`: a span per handled event with its coordinates, a warning per
//! unrouted event type; and (feature `metrics`) what it reports on the `metrics` facade.
//!
//! These tests install tracing subscribers, so they have a binary of their own. tracing caches
//! per callsite whether anyone listens; while only one subscriber is registered it asks the
//! subscriber of the thread that reaches the callsite first, so a callsite first reached on a
//! thread without a subscriber (another test's bus) stays silent for the test that installed
//! one. Here no bus runs before its test has installed a subscriber: `spans` installs a
//! thread-local one, `unrouted_events` the process-wide one, first thing in each test. Add no
//! test to this binary that runs a bus without doing the same.

#[path = "../support/mod.rs"]
mod support;

#[cfg(feature = "metrics")]
mod metrics;
mod spans;
mod topology;
mod unrouted_events;
