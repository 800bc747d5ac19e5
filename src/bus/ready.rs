//! Readiness: when a started bus is ready to serve ([`Bus::ready`], [`Bus::is_ready`]).

use super::Bus;

impl Bus {
    /// Waits until the bus is ready: the start-up signal for a readiness probe or an operator
    /// tool. Returns [`is_ready`](Bus::is_ready): `false` if shutdown began first.
    ///
    /// With a [store](crate::BusBuilder::store), the bus is ready once
    ///
    /// - every consumer group's dead letters are read back from the store ([`build`] cannot
    ///   wait for the store, so right after it the dead-letter queues of a restarted bus may
    ///   still be empty: an operator tool reads them after `ready()`; redrives wait for their
    ///   group's entries on their own), and
    /// - every group has caught up: each of its partition workers handled (or dead-lettered)
    ///   every event the partition's log held when that worker started, from its committed
    ///   offset (or its [`StartFrom`](crate::store::StartFrom)). A projection is then as
    ///   current as the log was at start.
    ///
    /// Without a store there is nothing to restore or catch up: the bus is ready at once.
    ///
    /// # Ready is not settled
    ///
    /// `ready()` is about the start: events published after it are not waited for, and it
    /// returns while events keep coming. [`settled`](Bus::settled) is for tests: it waits until
    /// *everything* published so far is handled and every queue is empty, which a busy bus in
    /// production may never reach. A [rebuild](Bus::rebuild) on a running bus does not make it
    /// unready: wait for the rebuild with [`Rebuild::caught_up`](crate::rebuild::Rebuild::caught_up).
    ///
    /// [`build`]: crate::BusBuilder::build
    ///
    /// ```
    /// use tidings::store::MemoryStore;
    /// use tidings::Bus;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # #[derive(serde::Serialize, serde::Deserialize, tidings::Event)]
    /// # #[event(topic = "orders")] struct Placed;
    /// # struct H;
    /// # impl tidings::Handler<Placed> for H {
    /// #     async fn handle(&mut self, _: &tidings::Envelope<Placed>, _: &tidings::Context) -> Result<(), tidings::HandlerError> { Ok(()) }
    /// # }
    /// let bus = Bus::builder()
    ///     .store(MemoryStore::new())
    ///     .topic(tidings::TopicConfig::new("orders").partitions(2))
    ///     .subscribe::<Placed, _>("billing", || H)
    ///     .build()?;
    /// assert!(bus.ready().await);
    /// // Complete, whatever the store held before this start.
    /// let waiting = bus.dead_letters("billing")?.len();
    /// # assert_eq!(waiting, 0);
    /// # bus.shutdown().await; Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits.
    pub async fn ready(&self) -> bool {
        if let Some(d) = self.inner.durable.as_ref() {
            tokio::select! {
                _ = d.caught_up.cancelled() => {}
                _ = self.inner.cancel.cancelled() => {}
            }
        }
        self.is_ready()
    }

    /// Whether the bus is [ready](Bus::ready) and not shutting down, without waiting: what a
    /// readiness probe (a health endpoint) asks.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tidings::BuildError> {
    /// let bus = tidings::Bus::builder().build()?; // in memory: ready at once
    /// assert!(bus.is_ready());
    /// bus.shutdown().await;
    /// assert!(!bus.is_ready());
    /// # Ok(()) }
    /// ```
    pub fn is_ready(&self) -> bool {
        self.inner.is_open()
            && !self.inner.cancel.is_cancelled()
            && self
                .inner
                .durable
                .as_ref()
                .is_none_or(|d| d.caught_up.is_cancelled())
    }
}
