//! A command handler instance's task: requests one at a time, their deadlines kept while the
//! handler is busy, panics answered and the handler restarted.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tracing::Instrument;

use super::dispatch::{fresh, panic_message, replace_handler, Factory};
use super::subscription::RestartBackoff;
use crate::command::{Command, CommandMessage, CommandRequest};
use crate::context::Context;
use crate::core::Core;
use crate::error::RequestError;
use crate::handler::CommandHandler;

type Receiver<C> = tokio::sync::mpsc::Receiver<CommandMessage<C>>;

/// Where an instance takes its requests from.
pub(crate) enum Requests<C: Command> {
    /// Its own queue (one instance, or one of keyed instances): while the handler is busy the
    /// task moves waiting requests aside to keep their deadlines.
    Own(Receiver<C>),
    /// The queue of a pool, shared with the other instances: taken from only when idle, so
    /// waiting requests stay for any instance that frees up; requesters keep their deadlines.
    Shared(Arc<tokio::sync::Mutex<Receiver<C>>>),
}

/// What is still queued once an instance stops: refused, each answered and uncounted, so that
/// nothing waits or stays counted. The queue is closed first, so nothing more comes in.
fn refuse_queued<C: Command>(requests: &mut Receiver<C>, core: &Core) {
    requests.close();
    while let Ok(message) = requests.try_recv() {
        if let Some(request) = message {
            let _ = request.reply.send(Err(RequestError::Closed));
            core.pending.finish_requests(1);
        }
    }
}

/// The next message of an instance's own queue; a pool's instance never finishes this.
async fn recv_own<C: Command>(requests: &mut Requests<C>) -> Option<CommandMessage<C>> {
    match requests {
        Requests::Own(receiver) => receiver.recv().await,
        Requests::Shared(_) => std::future::pending().await,
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
    requests: Requests<C>,
    /// The queue is this instance's own (not a pool's).
    own: bool,
    /// Requests taken off the channel while the handler was busy, so their deadlines are kept.
    /// Bounded by the deadlines: expired ones are answered and dropped.
    backlog: VecDeque<CommandRequest<C>>,
    timer: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    /// Shutdown asked the task to stop once the backlog is done.
    stopping: bool,
    core: Arc<Core>,
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
        let message = match &mut self.requests {
            Requests::Own(receiver) => receiver.recv().await,
            // Idle instances of a pool wait in turn for the shared queue; one at a time waits
            // on it, so a request goes to an idle instance.
            Requests::Shared(shared) => {
                let mut receiver = shared.lock().await;
                let message = receiver.recv().await;
                if !matches!(message, Some(Some(_))) {
                    // The first instance to see the stop closes the shared queue (refusing what
                    // slipped in beside the stop) before it lets go of it: the others then find
                    // it closed instead of waiting on it.
                    refuse_queued(&mut receiver, &self.core);
                }
                message
            }
        };
        match message {
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
                            self.core.pending.finish_requests(1);
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
                message = recv_own(&mut self.requests), if self.own && !self.stopping => match message {
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
    requests: Requests<C>,
    core: Arc<Core>,
    backoff: RestartBackoff,
) {
    let name = std::any::type_name::<C>();
    let mut ctx = Context::for_core(Arc::clone(&core), Arc::from(name));
    ctx.source = core.sightings.command(name);
    let mut consecutive_panics = 0u32;
    let mut deadlines = Deadlines {
        name,
        own: matches!(requests, Requests::Own(_)),
        requests,
        backlog: VecDeque::new(),
        timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
        armed: false,
        stopping: false,
        core: Arc::clone(&core),
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
            core.pending.finish_requests(1);
            continue;
        }
        let mut current = Current {
            reply: Some(reply),
            deadline,
            timeout,
        };
        ctx.cause = Some(cause);
        let span = crate::spans::info_span!(
            "tidings.request",
            command = name,
            request_id = %cause.id,
            correlation_id = %cause.correlation,
        );
        // The handler's future is made inside the unwind guard: a handler that panics before
        // returning its future is caught too.
        let call = AssertUnwindSafe(async { handler.handle(command, &ctx).await }).catch_unwind();
        let outcome = match span.filter(|span| !span.is_disabled()) {
            None => deadlines.drive(call, Some(&mut current)).await,
            Some(span) => {
                deadlines
                    .drive(call.instrument(span), Some(&mut current))
                    .await
            }
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
        core.pending.finish_requests(1);
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
    match &mut deadlines.requests {
        Requests::Own(receiver) => refuse_queued(receiver, &core),
        Requests::Shared(shared) => refuse_queued(&mut *shared.lock().await, &core),
    }
    for request in deadlines.backlog.drain(..) {
        let _ = request.reply.send(Err(RequestError::Closed));
        core.pending.finish_requests(1);
    }
}
