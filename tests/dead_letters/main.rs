//! Dead letters without a store: the queue (redrive, discard, the sequenced policy that parks a
//! failed key), delayed redelivery, and how redrives, releases, restarts and panics interleave.
//! (With a store: the `durable` binary.)

mod redelivery;
mod redelivery_interactions;
mod redrive_and_discard;
mod redrives_releases_and_panics;
mod sequenced_stats;
