//! What is checked before anything runs: `#[derive(Event)]` (with its compile errors, trybuild
//! cases in `tests/ui/`), settings out of range refused at build, and every public async fn
//! returning a `Send` future.

mod derive_event;
mod futures_are_send;
mod invalid_settings;
mod modules;
