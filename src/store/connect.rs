//! [`connect`]: a store chosen by a URL, so that where an application keeps its events is one
//! line of configuration.

use std::sync::Arc;

use super::{MemoryStore, Store, StoreError};

/// Opens the store a URL names, for an application that reads it from its configuration
/// (`TIDINGS_STORE=sqlite://shop.db`): the bus's whole persistence is then that one setting.
///
/// | URL | store | feature |
/// |---|---|---|
/// | `memory:` | a new [`MemoryStore`] (tests, demos: gone with the process) | always |
/// | `sqlite://path/to/file.db`, `sqlite:file.db` | [`SqliteStore::connect`](super::SqliteStore::connect): created if missing | `sqlite` (default) |
/// | `postgres://…`, `postgresql://…` | [`PostgresStore::connect`](super::PostgresStore::connect) | `postgres` |
///
/// ```
/// use tidings::{store, Bus, TopicConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let url = std::env::var("TIDINGS_STORE").unwrap_or_else(|_| "memory:".into());
/// let bus = Bus::builder()
///     .store(store::connect(&url).await?)
///     .topic(TopicConfig::new("orders").partitions(4))
///     .build()?;
/// # bus.shutdown().await; Ok(()) }
/// ```
///
/// # Errors
///
/// [`StoreError::Config`] for a scheme this build does not know (or whose feature is off); the
/// backend's error if it cannot be opened.
///
/// # Cancel safety
///
/// Dropped before it completes, no store is made (see each backend's `connect`).
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let scheme = url.split(':').next().unwrap_or_default();
    match scheme {
        "memory" if url == "memory:" || url == "memory://" => Ok(Arc::new(MemoryStore::new())),
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Arc::new(super::SqliteStore::connect(url).await?)),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Arc::new(super::PostgresStore::connect(url).await?)),
        _ => Err(StoreError::Config(format!(
            "no store for {url:?}: use memory:, sqlite://<file> (feature \"sqlite\") or postgres://… (feature \"postgres\")"
        ))),
    }
}
