//! Request/reply: a command into its one handler's queue, and the reply back.

use std::any::{Any, TypeId};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use super::Core;
use crate::command::{Command, CommandMessage, CommandRequest};
use crate::envelope::new_id;
use crate::error::RequestError;
use crate::publish::Cause;

/// A command handler's queue: the typed sender (`mpsc::Sender<CommandMessage<C>>`), erased, and
/// how to tell its task to stop.
pub(crate) struct CommandEntry {
    pub(crate) sender: Box<dyn Any + Send + Sync>,
    pub(crate) stop: Box<dyn Fn() + Send + Sync>,
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
        let Some(sender) = inner
            .commands
            .get(&TypeId::of::<C>())
            .and_then(|e| e.sender.downcast_ref::<mpsc::Sender<CommandMessage<C>>>())
        else {
            return Err(RequestError::NoHandler { command: name });
        };
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
        rx.await.unwrap_or(Err(RequestError::Closed))
    }
}
