//! Request/reply: a command into its one handler's queue, and the reply back.

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use super::Core;
use crate::command::{Command, CommandMessage, CommandRequest};
use crate::envelope::new_id;
use crate::error::RequestError;
use crate::publish::Cause;

/// A command handler's queues: the typed [`CommandQueues`], erased, and how to tell its tasks
/// to stop.
pub(crate) struct CommandEntry {
    pub(crate) sender: Box<dyn Any + Send + Sync>,
    pub(crate) stop: Box<dyn Fn() + Send + Sync>,
}

/// Where the requests of command type `C` go.
pub(crate) enum CommandQueues<C: Command> {
    /// One instance and its queue; the instance keeps the requests' deadlines.
    One(mpsc::Sender<CommandMessage<C>>),
    /// A pool: one queue that every idle instance takes from. Busy instances do not watch it,
    /// so the requester keeps its own deadline.
    Shared(mpsc::Sender<CommandMessage<C>>),
    /// Keyed instances, one queue each: the command's key picks one (keyless commands go
    /// round-robin); each instance keeps its requests' deadlines.
    Keyed {
        queues: Box<[mpsc::Sender<CommandMessage<C>>]>,
        next: AtomicU32,
    },
}

impl<C: Command> CommandQueues<C> {
    /// The queue for `command`, and whether the requester must keep the deadline itself.
    #[inline]
    fn pick(&self, command: &C) -> (&mpsc::Sender<CommandMessage<C>>, bool) {
        match self {
            CommandQueues::One(sender) => (sender, false),
            CommandQueues::Shared(sender) => (sender, true),
            CommandQueues::Keyed { queues, next } => {
                let n = queues.len() as u32;
                let i = match command.key() {
                    Some(key) => key.partition(n),
                    None => next.fetch_add(1, Ordering::Relaxed) % n,
                };
                (&queues[i as usize], false)
            }
        }
    }
}

/// Uncounts one pending request when dropped, unless disarmed.
struct PendingGuard<'a>(Option<&'a Core>);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Some(inner) = self.0 {
            inner.pending.finish_requests(1);
        }
    }
}

impl Core {
    pub(crate) async fn request_from<C: Command>(
        &self,
        command: C,
        cause: Option<Cause>,
        timeout: Option<Duration>,
    ) -> Result<C::Reply, RequestError> {
        let inner = self;
        let name = std::any::type_name::<C>();
        let Some(queues) = inner
            .commands
            .get(&TypeId::of::<C>())
            .and_then(|e| e.sender.downcast_ref::<CommandQueues<C>>())
        else {
            return Err(RequestError::NoHandler { command: name });
        };
        let (sender, own_deadline) = queues.pick(&command);
        // Counted as pending before intake is checked, so that shutdown either sees this
        // request and waits for it, or this request sees shutdown and backs off; the guard
        // uncounts it on every way out until the handler task owns it.
        inner.pending.add_request();
        let mut counted = PendingGuard(Some(inner));
        if cause.is_none() && !inner.intake_open.load(Ordering::SeqCst) {
            return Err(RequestError::Closed);
        }
        let timeout = timeout.unwrap_or(inner.request_timeout);
        // From a handler, the request carries the handled event's cause on, so events its
        // command handler publishes name that event; from outside, the request starts a chain.
        let cause = cause.unwrap_or_else(|| {
            let id = new_id(SystemTime::now());
            Cause {
                id,
                correlation: id,
            }
        });
        let now = tokio::time::Instant::now();
        // A timeout too large to add is as good as none (about 30 years).
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600));
        let (tx, rx) = oneshot::channel();
        let request = CommandRequest {
            command,
            cause,
            deadline,
            timeout,
            reply: tx,
        };
        // Fast path: room in the handler's queue. Only a full queue needs a timer here; the
        // handler task enforces the deadline once the request is queued (see `run_commands`),
        // so a round trip costs no timer registration.
        let permit = match sender.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Closed(())) => return Err(RequestError::Closed),
            Err(mpsc::error::TrySendError::Full(())) => {
                match tokio::time::timeout_at(deadline, sender.reserve()).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(RequestError::Closed),
                    Err(_) => {
                        return Err(RequestError::Timeout {
                            command: name,
                            timeout,
                        })
                    }
                }
            }
        };
        permit.send(Some(request));
        // From here the handler task finishes the request, answered or not.
        counted.0 = None;
        if own_deadline {
            // A pool: the request may wait in the shared queue while every instance is busy,
            // and no instance watches it there. It stays counted until an instance takes it
            // (and, past its deadline, drops it).
            return match tokio::time::timeout_at(deadline, rx).await {
                Ok(reply) => reply.unwrap_or(Err(RequestError::Closed)),
                Err(_) => Err(RequestError::Timeout {
                    command: name,
                    timeout,
                }),
            };
        }
        rx.await.unwrap_or(Err(RequestError::Closed))
    }
}
