//! Middleware: custom layers and their nesting, the typed failures layers make, retry, timeout,
//! circuit breaker, throttle,
//! deduplication (consumer and producer side, its window, its claims), tower layers (feature
//! `tower`), every layer at once under a shutdown, and chaos (random failures and duplicates).
//!
//! `TIDINGS_CHAOS_EVENTS=N cargo test --test middleware chaos::` changes the number of events of
//! the chaos test.

mod chaos;
mod dedup;
mod dedup_claims;
mod dedup_window;
mod every_layer_under_shutdown;
mod layers;
mod producer_dedup;
mod retry;
mod tower_acknowledgement;
mod tower_layers;
mod typed_failures;
