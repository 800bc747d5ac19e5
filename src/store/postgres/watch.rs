//! Announcements of committed appends for [`PostgresStore`](super::PostgresStore): every append
//! statement calls `pg_notify` on the schema's channel (one notification per partition it moved,
//! delivered at commit), and [`watch`] is the `LISTEN` side, on a connection of its own.
//!
//! A payload is `"<partition> <head> <topic>"`. A topic too long for a payload (PostgreSQL
//! takes at most 8000 bytes) is announced with an empty payload, which the watch reports as
//! [`HeadWatch::Resync`]: read every head.

use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};

use crate::store::{HeadWatch, PartitionHead};

/// Longest topic name announced by name (the payload's limit is 8000 bytes).
pub(super) const MAX_ANNOUNCED_TOPIC: usize = 7900;

/// The channel the appends to `schema` are announced on: `tidings_<schema>`, or for a schema
/// too long for a channel name (63 bytes) `tidings_` and a hash of it.
pub(super) fn channel_for(schema: &str) -> String {
    let channel = format!("tidings_{schema}");
    if channel.len() <= 63 {
        channel
    } else {
        format!(
            "tidings_{:016x}",
            xxhash_rust::xxh3::xxh3_64(schema.as_bytes())
        )
    }
}

/// What a notification's payload says.
fn parse(payload: &str) -> HeadWatch {
    let moved = (|| {
        let (partition, rest) = payload.split_once(' ')?;
        let (head, topic) = rest.split_once(' ')?;
        Some(PartitionHead {
            topic: topic.to_owned(),
            partition: partition.parse().ok()?,
            head: head.parse().ok()?,
        })
    })();
    match moved {
        Some(head) => HeadWatch::Moved(head),
        None => HeadWatch::Resync,
    }
}

struct Watch {
    options: PgConnectOptions,
    channel: String,
    listener: Option<PgListener>,
    failures: u32,
}

/// Listens on `channel` with a connection of its own (`options`, outside the store's pool):
/// `Resync` each time it (re)starts listening, `Moved` for each announcement, `Lost` when the
/// connection fails (then it reconnects, waiting 100 ms doubling to 5 s between attempts).
pub(super) fn watch(options: PgConnectOptions, channel: String) -> BoxStream<'static, HeadWatch> {
    let state = Watch {
        options,
        channel,
        listener: None,
        failures: 0,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            let Some(listener) = st.listener.as_mut() else {
                match listen(&st.options, &st.channel).await {
                    Ok(listener) => {
                        st.listener = Some(listener);
                        st.failures = 0;
                        return Some((HeadWatch::Resync, st));
                    }
                    Err(error) => {
                        tracing::warn!(channel = %st.channel, %error, "tidings: listening for appends of other processes failed; the bus polls the heads meanwhile; retrying");
                        let delay = Duration::from_millis(100 * (1u64 << st.failures.min(6)))
                            .min(Duration::from_secs(5));
                        st.failures += 1;
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
            };
            match listener.try_recv().await {
                Ok(Some(notification)) => return Some((parse(notification.payload()), st)),
                // The connection was lost and is back (notifications may have been missed).
                Ok(None) => return Some((HeadWatch::Resync, st)),
                Err(error) => {
                    tracing::warn!(channel = %st.channel, %error, "tidings: the connection listening for appends of other processes failed; the bus polls the heads until it is back");
                    st.listener = None;
                    return Some((HeadWatch::Lost, st));
                }
            }
        }
    })
    .boxed()
}

/// A listener on `channel`, on a pool of one connection of its own.
async fn listen(options: &PgConnectOptions, channel: &str) -> Result<PgListener, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(super::PostgresStore::DEFAULT_CONNECT_TIMEOUT)
        .connect_with(options.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(channel).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_read_back() {
        assert_eq!(
            parse("3 17 orders with spaces"),
            HeadWatch::Moved(PartitionHead {
                topic: "orders with spaces".into(),
                partition: 3,
                head: 17
            })
        );
        assert_eq!(parse(""), HeadWatch::Resync);
        assert_eq!(parse("x 1 t"), HeadWatch::Resync);
    }

    #[test]
    fn channels_fit_in_a_name() {
        assert_eq!(channel_for("public"), "tidings_public");
        let long = "s".repeat(63);
        assert!(channel_for(&long).len() <= 63);
        assert_ne!(channel_for(&long), channel_for(&"t".repeat(63)));
    }
}
