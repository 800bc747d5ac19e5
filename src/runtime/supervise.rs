//! The handler under supervision: one attempt at a time, in a span, with panics caught and the
//! handler restarted from its factory after a backoff.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use tracing::Instrument;

use super::dispatch::{panic_message, Dispatch};
use super::subscription::RestartBackoff;
use crate::context::Context;
use crate::core::queue::Topic;
use crate::envelope::AnyEnvelope;
use crate::handler::{HandlerError, HandlerResult};
use crate::middleware::Endpoint;

/// Adds one to a counter that only this worker writes: a plain load and store, no locked
/// read-modify-write on the hot path.
pub(crate) fn bump(counter: &std::sync::atomic::AtomicU64) {
    counter.store(counter.load(Relaxed) + 1, Relaxed);
}

/// The handler under supervision: one attempt at a time, panics caught and the handler
/// restarted. The end of every middleware chain.
pub(crate) struct Supervised<D> {
    pub(crate) dispatch: D,
    pub(crate) topic: Arc<Topic>,
    pub(crate) slot: usize,
    pub(crate) partition: u32,
    pub(crate) group: Arc<str>,
    pub(crate) handler_name: &'static str,
    pub(crate) restart_backoff: RestartBackoff,
    pub(crate) consecutive_panics: u32,
    /// The group's metric handles (nothing without the `metrics` feature).
    pub(crate) metrics: crate::metrics::GroupMetrics,
}

impl<D: Dispatch> Supervised<D> {
    /// Swaps in a fresh handler, then waits the restart backoff (so that a handler that keeps
    /// panicking does not spin). The swap comes first: should an outer timeout cut the wait
    /// short, the next event still meets a fresh handler.
    async fn restart(&mut self) {
        if self.dispatch.restart() {
            let stats = &self.topic.worker_stats[self.slot][self.partition as usize];
            bump(&stats.restarts);
        }
        tokio::time::sleep(self.restart_backoff.delay(self.consecutive_panics)).await;
    }

    /// One attempt: the handler's result, or its panic as a transient error (after the
    /// restart backoff and a fresh handler).
    pub(crate) async fn attempt(&mut self, env: &D::Env, ctx: &Context) -> HandlerResult {
        let attempt = D::attempt(env);
        let meta = D::meta(env);
        let span = crate::spans::info_span!(
            "tidings.handle",
            topic = %self.topic.name,
            partition = self.partition,
            offset = meta.offset,
            group = %self.group,
            event_id = %meta.id,
            correlation_id = %meta.correlation_id,
            attempt,
        );
        let dispatch = &mut self.dispatch;
        // The handler's future is made inside the unwind guard: a handler that panics before
        // returning its future is caught too.
        let call = AssertUnwindSafe(async { dispatch.call(env, ctx).await }).catch_unwind();
        let timer = self.metrics.start();
        // A disabled span (no subscriber interested) costs nothing to skip.
        let outcome = match span.as_ref().filter(|span| !span.is_disabled()) {
            None => call.await,
            Some(span) => call.instrument(span.clone()).await,
        };
        self.metrics.processed(
            timer,
            match &outcome {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error.is_permanent()),
                // A panic is a transient error.
                Err(_) => Some(false),
            },
        );
        match outcome {
            Ok(Ok(())) => {
                self.consecutive_panics = 0;
                Ok(())
            }
            Ok(Err(err)) => Err(err),
            Err(panic) => {
                let message = panic_message(&*panic);
                let stats = &self.topic.worker_stats[self.slot][self.partition as usize];
                bump(&stats.panics);
                self.consecutive_panics += 1;
                {
                    let _enter = span.as_ref().map(tracing::Span::enter);
                    tracing::error!(topic = %self.topic.name, group = %self.group, partition = self.partition, offset = meta.offset, event_id = %meta.id, correlation_id = %meta.correlation_id, attempt, panic = %message, handler = self.handler_name, "handler panicked; restarting it");
                }
                // Boxed: the backoff timer's state stays out of the common path's future.
                Box::pin(self.restart()).await;
                Err(crate::handler::Panicked::handler(message).into())
            }
        }
    }
}

impl<D: Dispatch> Endpoint for Supervised<D> {
    fn call<'a>(
        &'a mut self,
        env: &'a AnyEnvelope,
        ctx: &'a Context,
    ) -> BoxFuture<'a, HandlerResult> {
        Box::pin(async move {
            match D::from_any(env) {
                Some(typed) => self.attempt(&typed, ctx).await,
                // Routing guarantees the type; reaching this is a bug in tidings.
                None => Err(HandlerError::permanent(
                    "event of an unexpected type reached a worker",
                )),
            }
        })
    }
}
