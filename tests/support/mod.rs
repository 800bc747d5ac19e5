//! What the integration test binaries share. A binary that needs it declares
//! `#[path = "../support/mod.rs"] mod support;` in its `main.rs`; its modules then
//! `use crate::support::...`.
//!
//! Every binary registers the event types of all its modules (and of this module) with typetag,
//! process-wide, by their `NAME`. A name registered twice cannot be read back from a store
//! ("non-unique tag"), so event type names are unique within each binary: a module whose type
//! shares its identifier with another module's gives it a `name = "<module>.<Type>"`.

pub mod chain;
pub mod stores;
