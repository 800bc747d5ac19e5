//! Taking part in tokio's cooperative scheduling budget.

use std::task::Poll;

/// Upper bound of units [`spend_turn`] spends: tokio gives a task 128 per scheduler tick. Also
/// what keeps it finite where the budget is unconstrained (outside a tokio task, or inside
/// `tokio::task::unconstrained`), which always says some is left.
const TICK_BUDGET: usize = 128;

/// Spends what is left of the current task's tokio budget for this scheduler tick, without
/// ever yielding.
///
/// A publisher calls it before it sleeps on a full queue: it has had its turn, as a tokio mpsc
/// sender that filled its channel has (every send spends a unit). It matters for whom the
/// publisher woke: a worker woken by a task with budget left is put in its thread's LIFO slot
/// and runs right after it, and a worker and a publisher that keep waking each other that way
/// hit tokio's cap on LIFO hand-offs (3 per tick), after which every wake-up goes to the run
/// queue *and unparks another thread* to steal it: the pair then moves between threads and the
/// idle thread parks and unparks several times per 1,000 events. Woken by a task with no
/// budget left, the worker goes to the back of the run queue without unparking anyone and runs
/// in a fresh tick, on the same thread, as with tokio's own channels.
pub(crate) async fn spend_turn() {
    std::future::poll_fn(|cx| {
        for _ in 0..TICK_BUDGET {
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
            match tokio::task::coop::poll_proceed(cx) {
                Poll::Ready(progress) => progress.made_progress(),
                // Not reached (checked above); never wait here.
                Poll::Pending => break,
            }
        }
        Poll::Ready(())
    })
    .await
}
