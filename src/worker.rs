//! The partition worker: the actor loop that feeds one partition of one group to its handler,
//! and supervises it.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tracing::Instrument;

use crate::bus::{
    Bus, CommandMessage, CommandRequest, Failure, QueueId, RestartBackoff, Subscription,
};
use crate::command::{Command, CommandHandler};
use crate::context::{Cause, Context};
use crate::envelope::{downcast, AnyEnvelope, Envelope, Erased};
use crate::error::RequestError;
use crate::event::Event;
use crate::handler::{AnyHandler, Handler, HandlerError};
use crate::topic::Topic;

pub(crate) type Factory<H> = Arc<dyn Fn() -> H + Send + Sync>;

/// How a worker turns a queued event into a handler call.
pub(crate) trait Dispatch: Send + 'static {
    type Env: Send + Sync + 'static;
    fn wrap(item: Erased) -> Option<Self::Env>;
    fn set_attempt(env: &mut Self::Env, attempt: u32);
    /// The envelope, type-erased again (to report a failure).
    fn erase(env: &Self::Env) -> AnyEnvelope;
    /// The envelope back as a queue item (to hand it to the graveyard).
    fn into_item(env: Self::Env) -> Erased;
    fn call<'a>(
        &'a mut self,
        env: &'a Self::Env,
        ctx: &'a Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;
    /// Replaces the handler with a fresh one from the factory.
    fn restart(&mut self) -> bool;
}

pub(crate) struct Typed<E, H> {
    handler: H,
    factory: Factory<H>,
    _event: PhantomData<fn() -> E>,
}

impl<E, H> Typed<E, H> {
    pub(crate) fn new(factory: Factory<H>) -> Self {
        Typed {
            handler: factory(),
            factory,
            _event: PhantomData,
        }
    }
}

fn fresh<H>(factory: &Factory<H>) -> Option<H> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| factory())) {
        Ok(h) => Some(h),
        Err(panic) => {
            tracing::error!(
                panic = %panic_message(&*panic),
                "handler factory panicked; keeping the previous handler instance"
            );
            None
        }
    }
}

impl<E: Event, H: Handler<E>> Dispatch for Typed<E, H> {
    type Env = Envelope<E>;

    fn wrap(item: Erased) -> Option<Envelope<E>> {
        downcast::<E>(item).map(|inner| Envelope { inner, attempt: 1 })
    }

    fn set_attempt(env: &mut Envelope<E>, attempt: u32) {
        env.attempt = attempt;
    }

    fn erase(env: &Envelope<E>) -> AnyEnvelope {
        env.clone().into()
    }

    fn into_item(env: Envelope<E>) -> Erased {
        env.inner
    }

    fn call<'a>(
        &'a mut self,
        env: &'a Envelope<E>,
        ctx: &'a Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a {
        self.handler.handle(env, ctx)
    }

    fn restart(&mut self) -> bool {
        fresh(&self.factory)
            .map(|h| replace_handler(&mut self.handler, h))
            .is_some()
    }
}

pub(crate) struct Untyped<H> {
    handler: H,
    factory: Factory<H>,
}

impl<H> Untyped<H> {
    pub(crate) fn new(factory: Factory<H>) -> Self {
        Untyped {
            handler: factory(),
            factory,
        }
    }
}

impl<H: AnyHandler> Dispatch for Untyped<H> {
    type Env = AnyEnvelope;

    fn wrap(item: Erased) -> Option<AnyEnvelope> {
        Some(AnyEnvelope {
            inner: item,
            attempt: 1,
        })
    }

    fn set_attempt(env: &mut AnyEnvelope, attempt: u32) {
        env.attempt = attempt;
    }

    fn erase(env: &AnyEnvelope) -> AnyEnvelope {
        env.clone()
    }

    fn into_item(env: AnyEnvelope) -> Erased {
        env.inner
    }

    fn call<'a>(
        &'a mut self,
        env: &'a AnyEnvelope,
        ctx: &'a Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a {
        self.handler.handle(env, ctx)
    }

    fn restart(&mut self) -> bool {
        fresh(&self.factory)
            .map(|h| replace_handler(&mut self.handler, h))
            .is_some()
    }
}

pub(crate) struct WorkerArgs {
    pub(crate) bus: Bus,
    pub(crate) topic: Arc<Topic>,
    pub(crate) slot: usize,
    pub(crate) partition: u32,
    pub(crate) options: Subscription,
    pub(crate) handler_name: &'static str,
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Adds one to a counter that only this worker writes: a plain load and store, no locked
/// read-modify-write on the hot path.
fn bump(counter: &std::sync::atomic::AtomicU64) {
    counter.store(counter.load(Relaxed) + 1, Relaxed);
}

/// Runs one partition of one group until the partition is closed and drained.
pub(crate) async fn run<D: Dispatch>(mut dispatch: D, args: WorkerArgs) {
    let WorkerArgs {
        bus,
        topic,
        slot,
        partition,
        options,
        handler_name,
    } = args;
    let part = &topic.partitions[partition as usize];
    let stats = &topic.worker_stats[slot][partition as usize];
    let group: Arc<str> = Arc::from(topic.groups[slot].as_str());
    let mut ctx = Context::for_bus(bus.clone(), Arc::clone(&group), bus.inner.cancel.clone());
    ctx.owner = Some(QueueId::of(&topic, slot, partition));
    let mut batch: VecDeque<Erased> = VecDeque::with_capacity(options.batch_size);
    let mut done: Vec<Erased> = Vec::new();
    let mut consecutive_panics = 0u32;

    while part
        .next_batch(
            slot,
            &mut batch,
            &mut done,
            options.batch_size,
            topic.capacity,
        )
        .await
    {
        let n = batch.len();
        done.reserve(n);
        while let Some(item) = batch.pop_front() {
            let meta = item.meta();
            let (id, offset, correlation) = (meta.id, meta.offset, meta.correlation_id);
            let Some(mut env) = D::wrap(item) else {
                // Routing guarantees the type; reaching this is a bug in tidings.
                tracing::error!(group = %group, %id, "event of an unexpected type reached a worker");
                bump(&stats.failed);
                continue;
            };
            ctx.cause = Some(Cause { id, correlation });
            let mut attempt = 1u32;
            loop {
                D::set_attempt(&mut env, attempt);
                let span = tracing::info_span!(
                    "tidings.handle",
                    topic = %topic.name,
                    partition,
                    offset,
                    group = %group,
                    event_id = %id,
                    correlation_id = %correlation,
                    attempt,
                );
                // The handler's future is made inside the unwind guard: a handler that panics
                // before returning its future is caught too.
                let call =
                    AssertUnwindSafe(async { dispatch.call(&env, &ctx).await }).catch_unwind();
                // A disabled span (no subscriber interested) costs nothing to skip.
                let outcome = if span.is_disabled() {
                    call.await
                } else {
                    call.instrument(span.clone()).await
                };
                let (give_up, message) = match outcome {
                    Ok(Ok(())) => {
                        bump(&stats.handled);
                        consecutive_panics = 0;
                        break;
                    }
                    Ok(Err(err)) => {
                        let _enter = span.enter();
                        let last = err.is_permanent() || attempt >= options.max_deliveries;
                        if last {
                            tracing::error!(topic = %topic.name, group = %group, partition, offset, event_id = %id, correlation_id = %correlation, attempt, error = %err, permanent = err.is_permanent(), handler = handler_name, "handler failed; giving up on the event");
                        } else {
                            tracing::warn!(topic = %topic.name, group = %group, partition, offset, event_id = %id, correlation_id = %correlation, attempt, error = %err, handler = handler_name, "handler failed; redelivering");
                        }
                        (last, err.to_string())
                    }
                    Err(panic) => {
                        let message = panic_message(&*panic);
                        bump(&stats.panics);
                        consecutive_panics += 1;
                        {
                            let _enter = span.enter();
                            tracing::error!(topic = %topic.name, group = %group, partition, offset, event_id = %id, correlation_id = %correlation, attempt, panic = %message, handler = handler_name, "handler panicked; restarting it");
                        }
                        tokio::time::sleep(options.restart_backoff.delay(consecutive_panics)).await;
                        if dispatch.restart() {
                            bump(&stats.restarts);
                        }
                        (
                            attempt >= options.max_deliveries,
                            format!("panic: {message}"),
                        )
                    }
                };
                if give_up {
                    bump(&stats.failed);
                    bus.inner.record_failure(|| Failure {
                        group: group.to_string(),
                        envelope: D::erase(&env),
                        error: message,
                        attempts: attempt,
                    });
                    break;
                }
                attempt += 1;
            }
            stats.next_offset.store(offset + 1, Relaxed);
            done.push(D::into_item(env));
        }
        bus.inner.finish(n);
    }
}

impl RestartBackoff {
    pub(crate) fn delay(&self, consecutive: u32) -> std::time::Duration {
        let factor = 1u32 << consecutive.saturating_sub(1).min(16);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Keeps the deadlines of a command handler's requests while the handler is busy.
///
/// One timer, re-armed lazily: it stays at an earlier deadline until it fires, and only then
/// moves to the earliest deadline still open. Requests of one bus mostly share one timeout, so
/// their deadlines arrive in order, and a stream of quick round trips re-arms it about once per
/// timeout period instead of once per request.
struct Deadlines<C: Command> {
    name: &'static str,
    requests: tokio::sync::mpsc::Receiver<CommandMessage<C>>,
    /// Requests taken off the channel while the handler was busy, so their deadlines are kept.
    /// Bounded by the deadlines: expired ones are answered and dropped.
    backlog: VecDeque<CommandRequest<C>>,
    timer: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    /// Shutdown asked the task to stop once the backlog is done.
    stopping: bool,
    bus: Bus,
}

/// The request being handled: its reply (until answered) and deadline.
struct Current<R> {
    reply: Option<tokio::sync::oneshot::Sender<Result<R, RequestError>>>,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl<C: Command> Deadlines<C> {
    fn arm(&mut self, deadline: tokio::time::Instant) {
        if !self.armed || deadline < self.timer.deadline() {
            self.timer.as_mut().reset(deadline);
            self.armed = true;
        }
    }

    fn timed_out(&self, timeout: Duration) -> RequestError {
        RequestError::Timeout {
            command: self.name,
            timeout,
        }
    }

    /// The next request to handle, or `None` when the task should stop.
    async fn next(&mut self) -> Option<CommandRequest<C>> {
        if let Some(request) = self.backlog.pop_front() {
            return Some(request);
        }
        if self.stopping {
            return None;
        }
        match self.requests.recv().await {
            Some(Some(request)) => Some(request),
            // Shutdown drained every request and asks the task to stop.
            Some(None) | None => None,
        }
    }

    /// Drives `work` to completion while answering `Timeout` to the current request (if any)
    /// and to queued requests whose deadlines pass meanwhile.
    async fn drive<F: Future>(
        &mut self,
        work: F,
        mut current: Option<&mut Current<C::Reply>>,
    ) -> F::Output {
        if let Some(current) = current.as_deref() {
            self.arm(current.deadline);
        }
        tokio::pin!(work);
        // Most handlers answer without waiting: skip the select machinery then.
        if let std::task::Poll::Ready(output) = futures::poll!(work.as_mut()) {
            return output;
        }
        loop {
            tokio::select! {
                biased;
                output = &mut work => return output,
                () = self.timer.as_mut(), if self.armed => {
                    self.armed = false;
                    let now = tokio::time::Instant::now();
                    let mut next: Option<tokio::time::Instant> = None;
                    if let Some(current) = current.as_deref_mut() {
                        if current.reply.is_some() {
                            if now >= current.deadline {
                                let err = self.timed_out(current.timeout);
                                if let Some(reply) = current.reply.take() {
                                    let _ = reply.send(Err(err));
                                }
                            } else {
                                next = Some(current.deadline);
                            }
                        }
                    }
                    let mut kept = VecDeque::with_capacity(self.backlog.len());
                    for queued in std::mem::take(&mut self.backlog) {
                        if now >= queued.deadline {
                            let _ = queued.reply.send(Err(self.timed_out(queued.timeout)));
                            self.bus.inner.finish(1);
                        } else {
                            next = Some(next.map_or(queued.deadline, |n| n.min(queued.deadline)));
                            kept.push_back(queued);
                        }
                    }
                    self.backlog = kept;
                    if let Some(next) = next {
                        self.arm(next);
                    }
                }
                message = self.requests.recv(), if !self.stopping => match message {
                    Some(Some(queued)) => {
                        self.arm(queued.deadline);
                        self.backlog.push_back(queued);
                    }
                    Some(None) | None => self.stopping = true,
                },
            }
        }
    }
}

/// Runs the one handler of command type `C`, and keeps the requests' deadlines (see
/// [`Deadlines`]).
pub(crate) async fn run_commands<C: Command, H: CommandHandler<C>>(
    mut handler: H,
    factory: Factory<H>,
    requests: tokio::sync::mpsc::Receiver<CommandMessage<C>>,
    bus: Bus,
    backoff: RestartBackoff,
) {
    let name = std::any::type_name::<C>();
    let mut ctx = Context::for_bus(bus.clone(), Arc::from(name), bus.inner.cancel.clone());
    let mut consecutive_panics = 0u32;
    let mut deadlines = Deadlines {
        name,
        requests,
        backlog: VecDeque::new(),
        timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
        armed: false,
        stopping: false,
        bus: bus.clone(),
    };

    while let Some(request) = deadlines.next().await {
        let CommandRequest {
            command,
            cause,
            deadline,
            timeout,
            reply,
        } = request;
        if tokio::time::Instant::now() >= deadline {
            let _ = reply.send(Err(deadlines.timed_out(timeout)));
            bus.inner.finish(1);
            continue;
        }
        let mut current = Current {
            reply: Some(reply),
            deadline,
            timeout,
        };
        ctx.cause = Some(cause);
        let span = tracing::info_span!(
            "tidings.request",
            command = name,
            request_id = %cause.id,
            correlation_id = %cause.correlation,
        );
        // The handler's future is made inside the unwind guard: a handler that panics before
        // returning its future is caught too.
        let call = AssertUnwindSafe(async { handler.handle(command, &ctx).await }).catch_unwind();
        let outcome = if span.is_disabled() {
            deadlines.drive(call, Some(&mut current)).await
        } else {
            deadlines
                .drive(call.instrument(span), Some(&mut current))
                .await
        };
        let answer = match outcome {
            Ok(Ok(value)) => {
                consecutive_panics = 0;
                Ok(value)
            }
            Ok(Err(err)) => Err(RequestError::Failed {
                command: name,
                message: err.to_string(),
            }),
            Err(panic) => {
                let message = panic_message(&*panic);
                tracing::error!(command = name, panic = %message, "command handler panicked; restarting it");
                consecutive_panics += 1;
                Err(RequestError::Panicked {
                    command: name,
                    message,
                })
            }
        };
        let panicked = matches!(answer, Err(RequestError::Panicked { .. }));
        match current.reply.take() {
            // The requester may have gone away; that is its business.
            Some(reply) => {
                let _ = reply.send(answer);
            }
            None => tracing::debug!(command = name, "reply discarded: the request had timed out"),
        }
        bus.inner.finish(1);
        if panicked {
            // Deadlines of queued requests are kept during the restart backoff too.
            deadlines
                .drive(tokio::time::sleep(backoff.delay(consecutive_panics)), None)
                .await;
            if let Some(fresh) = fresh(&factory) {
                replace_handler(&mut handler, fresh);
            }
        }
    }
    // Stopping: refuse what is still queued (requests that slipped in beside the stop
    // message), answering and uncounting each, so that nothing waits or stays counted.
    deadlines.requests.close();
    while let Ok(message) = deadlines.requests.try_recv() {
        if let Some(request) = message {
            let _ = request.reply.send(Err(RequestError::Closed));
            bus.inner.finish(1);
        }
    }
    for request in deadlines.backlog.drain(..) {
        let _ = request.reply.send(Err(RequestError::Closed));
        bus.inner.finish(1);
    }
}

/// Swaps in a fresh handler; a panic in the old one's `Drop` is caught and logged.
pub(crate) fn replace_handler<H>(slot: &mut H, fresh: H) {
    let old = std::mem::replace(slot, fresh);
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(move || drop(old))) {
        tracing::error!(panic = %panic_message(&*panic), "dropping a panicked handler panicked");
    }
}
