//! The stores themselves: one conformance suite over every backend (memory, SQLite, PostgreSQL),
//! opening and connecting, rows SQLite's loose typing lets in broken, and SQLite kept to one
//! process per file.
//!
//! PostgreSQL tests need a server: `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); one that does not answer fails them.
//! `TIDINGS_STRESS=N cargo test --test store --all-features conformance::` runs every
//! conformance test N times over, in parallel.

#[path = "../support/mod.rs"]
mod support;

mod conformance;
mod connect;
mod memory_store_shared;
mod sqlite_broken_rows;
mod sqlite_one_process;
