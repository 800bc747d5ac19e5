//! Tower layers as middleware (feature `tower`).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;
use tower_layer::Layer;
use tower_service::Service;

use super::{Middleware, Next, NotHandled};
use crate::envelope::AnyEnvelope;
use crate::handler::{HandlerError, HandlerResult};

type BoxError = Box<dyn StdError + Send + Sync>;

/// Runs a [tower](https://docs.rs/tower) layer as middleware, so that tower's timeout, rate
/// limit, concurrency limit, load shedding or your own tower layers wrap a subscription's
/// handler without waiting for tidings to write them (feature `tower`).
///
/// Tower services take owned requests and return `'static` futures, which does not fit
/// handlers that borrow their event and keep `&mut self` state. So the layer wraps a small
/// inner service, and the rest of the chain runs beside it: when the tower service calls its
/// inner service, the handler runs; when the tower service answers without calling it (a
/// timeout, a shed load), the handler's call is dropped. The tower service sees a
/// [`TowerRequest`], which carries the envelope.
///
/// Each partition worker builds its own service from the layer on its first event (and again
/// after the service's readiness failed, as tower's contract asks), so state
/// that lives in the service (tower's `RateLimit`, `ConcurrencyLimit`) is per partition; layers
/// that share state between services (`GlobalConcurrencyLimitLayer`) share it across
/// partitions (a per-partition `ConcurrencyLimit` limits nothing: a partition handles one event
/// at a time anyway). Errors of the tower service become transient handler errors; a handler's
/// own error comes back as it was (permanent stays permanent, if the layer passes it through).
/// An `Ok` answer acknowledges the event only if the handler ran and succeeded: a service that
/// answers `Ok` after dropping or detaching its inner call fails the attempt, with a
/// [`NotHandled`](crate::middleware::NotHandled). Errors of the tower service keep their type
/// (match tower's timeout with `err.is::<tower::timeout::error::Elapsed>()`).
///
/// ```
/// # #[cfg(feature = "tower")] {
/// use std::time::Duration;
/// use tidings::middleware::TowerLayer;
/// use tidings::Subscription;
///
/// let mailer = Subscription::new("mailer")
///     .layer(TowerLayer::new(tower::timeout::TimeoutLayer::new(Duration::from_secs(2))))
///     .layer(TowerLayer::new(tower::limit::RateLimitLayer::new(10, Duration::from_secs(1))));
/// # }
/// ```
pub struct TowerLayer<L: Layer<Gate>> {
    layer: L,
    service: Option<L::Service>,
}

impl<L: Layer<Gate>> TowerLayer<L> {
    /// Wraps `layer`.
    pub fn new(layer: L) -> Self {
        TowerLayer {
            layer,
            service: None,
        }
    }
}

impl<L: Layer<Gate> + Clone> Clone for TowerLayer<L> {
    /// A clone of the layer, without the service: each clone builds its own.
    fn clone(&self) -> Self {
        TowerLayer::new(self.layer.clone())
    }
}

impl<L: Layer<Gate>> fmt::Debug for TowerLayer<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TowerLayer")
            .field("layer", &std::any::type_name::<L>())
            .finish()
    }
}

/// The request a [`TowerLayer`]'s service sees: the envelope, and the way to the handler.
pub struct TowerRequest {
    env: AnyEnvelope,
    go: oneshot::Sender<()>,
    done: oneshot::Receiver<HandlerResult>,
}

impl TowerRequest {
    /// The event being delivered.
    pub fn envelope(&self) -> &AnyEnvelope {
        &self.env
    }
}

impl fmt::Debug for TowerRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TowerRequest")
            .field("event_id", &self.env.id())
            .finish_non_exhaustive()
    }
}

/// The inner service a [`TowerLayer`] wraps: calling it runs the rest of the chain.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gate;

/// A handler error carried through a tower service, to come back out unchanged.
#[derive(Debug)]
struct Carried(HandlerError);

impl fmt::Display for Carried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for Carried {}

impl Service<TowerRequest> for Gate {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: TowerRequest) -> Self::Future {
        Box::pin(async move {
            let TowerRequest { go, done, .. } = request;
            if go.send(()).is_err() {
                return Err(NotHandled::delivery_dropped().into());
            }
            match done.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(Box::new(Carried(err)) as BoxError),
                Err(_) => Err(NotHandled::call_dropped().into()),
            }
        })
    }
}

fn from_tower(err: BoxError) -> HandlerError {
    match err.downcast::<Carried>() {
        Ok(carried) => carried.0,
        Err(other) => HandlerError::transient(other),
    }
}

impl<L> Middleware for TowerLayer<L>
where
    L: Layer<Gate> + Clone + Send + 'static,
    L::Service: Service<TowerRequest, Response = ()> + Send + 'static,
    <L::Service as Service<TowerRequest>>::Error: Into<BoxError>,
    <L::Service as Service<TowerRequest>>::Future: Send,
{
    async fn call(&mut self, env: &AnyEnvelope, mut next: Next<'_>) -> HandlerResult {
        let layer = &self.layer;
        let service = self.service.get_or_insert_with(|| layer.layer(Gate));
        if let Err(err) = std::future::poll_fn(|cx| service.poll_ready(cx)).await {
            // Tower's contract: a service whose readiness failed is discarded; the next event
            // gets a fresh one from the layer.
            self.service = None;
            return Err(from_tower(err.into()));
        }
        let service = self.service.as_mut().expect("built above");
        let (go, go_rx) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        let response = service.call(TowerRequest {
            env: env.clone(),
            go,
            done,
        });
        // Whether the handler ran to a success: a service that answers `Ok` without that (it
        // dropped or detached its inner call) has not handled the event.
        let succeeded = AtomicBool::new(false);
        let drive = async {
            if go_rx.await.is_ok() {
                let result = next.run(env).await;
                succeeded.store(result.is_ok(), Ordering::Relaxed);
                let _ = done_tx.send(result);
            }
            // The answer comes from `response`.
            std::future::pending::<()>().await;
        };
        let answer = tokio::select! {
            biased;
            answer = response => answer.map_err(|e| from_tower(e.into())),
            () = drive => unreachable!("`drive` never completes"),
        };
        match answer {
            Ok(()) if !succeeded.load(Ordering::Relaxed) => {
                Err(HandlerError::transient(NotHandled::answered_ok()))
            }
            answer => answer,
        }
    }
}
