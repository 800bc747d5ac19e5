//! What the bus has accepted and not finished yet, and who waits for it to be nothing.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Deliveries and requests accepted but not finished: [`settled`](crate::Bus::settled) waits
/// for zero, a shutdown drains to zero.
///
/// A delivery is counted once per group it is queued for, when it is queued (under the
/// partition lock), and finished by that group's worker once handled, failed or dropped. A
/// request is counted before intake is checked and finished by its handler task.
#[derive(Default)]
pub(crate) struct Pending {
    count: AtomicUsize,
    /// Of `count`, requests (so that a shutdown report tells them from deliveries).
    requests: AtomicUsize,
    /// Callers waiting in `settled`, woken through `idle`.
    settling: AtomicUsize,
    idle: Notify,
}

impl Pending {
    /// Counts `n` more deliveries.
    pub(crate) fn add(&self, n: usize) {
        self.count.fetch_add(n, Ordering::SeqCst);
    }

    /// Counts one more request.
    pub(crate) fn add_request(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// Marks `n` deliveries or requests as finished.
    pub(crate) fn finish(&self, n: usize) {
        // Wake `settled` callers only if there are any: the bus goes idle after every request
        // of a sequential round trip, and a notification costs a lock.
        if self.count.fetch_sub(n, Ordering::SeqCst) == n
            && self.settling.load(Ordering::SeqCst) > 0
        {
            self.idle.notify_waiters();
        }
    }

    /// Marks `n` requests as finished (answered, or refused).
    pub(crate) fn finish_requests(&self, n: usize) {
        self.requests.fetch_sub(n, Ordering::SeqCst);
        self.finish(n);
    }

    /// Deliveries and requests not finished.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Requests not answered.
    pub(crate) fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Waits until nothing is pending.
    pub(crate) async fn settled(&self) {
        struct Settling<'a>(&'a AtomicUsize);
        impl Drop for Settling<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.settling.fetch_add(1, Ordering::SeqCst);
        let _settling = Settling(&self.settling);
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}
