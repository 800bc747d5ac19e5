//! Command handlers as several instances: keyed (same key, same instance, arrival order) and
//! pooled (any free instance, no order), each instance supervised, all drained at shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tidings::prelude::*;
use tidings::testing::Recorder;
use tidings::{BuildError, CommandOptions, Key, RequestError};
use tokio::sync::{mpsc, Barrier, Notify};

/// A request for `key`'s `seq`-th step; `key` 0 is no key at all.
#[derive(Debug, Clone, Copy)]
struct Step {
    key: u64,
    seq: u32,
    panic: bool,
}

impl Step {
    fn new(key: u64, seq: u32) -> Self {
        Step {
            key,
            seq,
            panic: false,
        }
    }
}

impl Command for Step {
    /// The instance that handled it.
    type Reply = usize;
    fn key(&self) -> Option<Key<'_>> {
        (self.key != 0).then_some(Key::U64(self.key))
    }
}

/// Records `(instance, key, seq)` in handling order, and checks that no two steps of one key are
/// in a handler at once; yields inside, so that instances interleave.
struct Stepper {
    instance: usize,
    seen: Recorder<(usize, u64, u32)>,
    busy_keys: Arc<Mutex<HashSet<u64>>>,
}

impl CommandHandler<Step> for Stepper {
    async fn handle(&mut self, cmd: Step, _: &Context) -> Result<usize, HandlerError> {
        if cmd.panic {
            panic!("step {} of key {} crashed", cmd.seq, cmd.key);
        }
        let fresh = self.busy_keys.lock().unwrap().insert(cmd.key);
        assert!(fresh, "two steps of key {} at once", cmd.key);
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        self.seen.push((self.instance, cmd.key, cmd.seq));
        self.busy_keys.lock().unwrap().remove(&cmd.key);
        Ok(self.instance)
    }
}

/// A factory of numbered steppers sharing one record; the counter counts the instances made.
fn steppers(
    made: &Arc<AtomicUsize>,
    seen: &Recorder<(usize, u64, u32)>,
) -> impl Fn() -> Stepper + Send + Sync + 'static {
    let (made, seen) = (Arc::clone(made), seen.clone());
    let busy_keys = Arc::new(Mutex::new(HashSet::new()));
    move || Stepper {
        instance: made.fetch_add(1, Ordering::SeqCst),
        seen: seen.clone(),
        busy_keys: Arc::clone(&busy_keys),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_instances_handle_each_keys_requests_one_at_a_time_in_arrival_order() {
    let (made, seen) = (Arc::new(AtomicUsize::new(0)), Recorder::new());
    let bus = Bus::builder()
        .command_handler_with::<Step, _>(CommandOptions::keyed(4), steppers(&made, &seen))
        .build()
        .unwrap();
    // 23 keys (not a multiple of the instances, so that taking turns would not pass for
    // routing by key), 20 steps each, interleaved and all in flight at once: `join_all` sends
    // them in this order on its first poll.
    let steps: Vec<Step> = (0..20)
        .flat_map(|seq| (1..=23).map(move |key| Step::new(key, seq)))
        .collect();
    let replies = join_all(steps.iter().map(|&step| bus.request(step))).await;

    let mut instance_of: HashMap<u64, usize> = HashMap::new();
    for (step, reply) in steps.iter().zip(&replies) {
        let instance = reply.clone().expect("every step is answered");
        // One key, one instance.
        assert_eq!(*instance_of.entry(step.key).or_insert(instance), instance);
    }
    let mut order: HashMap<u64, Vec<u32>> = HashMap::new();
    for (instance, key, seq) in seen.snapshot() {
        assert_eq!(instance_of[&key], instance);
        order.entry(key).or_default().push(seq);
    }
    for key in 1..=23 {
        assert_eq!(order[&key], (0..20).collect::<Vec<_>>(), "key {key}");
    }
    let used: HashSet<usize> = instance_of.values().copied().collect();
    assert!(used.len() > 1, "23 keys all went to one instance");
    assert_eq!(made.load(Ordering::SeqCst), 4);
    bus.shutdown().await;
}

/// Waits at a barrier that opens only when `parties` requests are in handlers at once.
struct Meet;
impl Command for Meet {
    type Reply = usize;
}
struct Meeter {
    instance: usize,
    barrier: Arc<Barrier>,
}
impl CommandHandler<Meet> for Meeter {
    async fn handle(&mut self, _: Meet, _: &Context) -> Result<usize, HandlerError> {
        self.barrier.wait().await;
        Ok(self.instance)
    }
}

fn meeters(parties: usize) -> impl Fn() -> Meeter + Send + Sync + 'static {
    let barrier = Arc::new(Barrier::new(parties));
    let made = AtomicUsize::new(0);
    move || Meeter {
        instance: made.fetch_add(1, Ordering::SeqCst),
        barrier: Arc::clone(&barrier),
    }
}

// On the paused clock a request that cannot meet the others times out at once (the runtime
// skips to its deadline), so a pool that does not run in parallel fails instead of hanging.
#[tokio::test(start_paused = true)]
async fn a_pool_handles_as_many_requests_at_once_as_it_has_instances() {
    let bus = Bus::builder()
        .command_handler_with::<Meet, _>(CommandOptions::pool(4), meeters(4))
        .build()
        .unwrap();
    for _round in 0..3 {
        let replies = join_all((0..4).map(|_| bus.request(Meet))).await;
        let instances: HashSet<usize> = replies.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            instances.len(),
            4,
            "each of the 4 meeting requests had its own instance"
        );
    }
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn keyless_commands_are_spread_over_keyed_instances() {
    let bus = Bus::builder()
        .command_handler_with::<Meet, _>(CommandOptions::keyed(3), meeters(3))
        .build()
        .unwrap();
    let replies = join_all((0..3).map(|_| bus.request(Meet))).await;
    let instances: HashSet<usize> = replies.into_iter().map(Result::unwrap).collect();
    assert_eq!(instances.len(), 3);
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_single_handler_takes_one_request_at_a_time() {
    // The default: two requests that must meet never do.
    let bus = Bus::builder()
        .command_handler::<Meet, _>(meeters(2))
        .request_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let replies = join_all((0..2).map(|_| bus.request(Meet))).await;
    assert!(replies
        .iter()
        .all(|r| matches!(r, Err(RequestError::Timeout { .. }))));
    bus.shutdown_timeout(Duration::from_secs(1)).await;
}

/// Blocks until released when asked to; answers at once otherwise.
struct Gate {
    hold: bool,
}
impl Command for Gate {
    type Reply = bool;
}
struct Gated {
    open: Arc<Notify>,
    entered: mpsc::UnboundedSender<()>,
}
impl CommandHandler<Gate> for Gated {
    async fn handle(&mut self, cmd: Gate, _: &Context) -> Result<bool, HandlerError> {
        if cmd.hold {
            let opened = self.open.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            let _ = self.entered.send(());
            opened.await;
        }
        Ok(cmd.hold)
    }
}

/// A pool of two gated instances: the gate, and a channel that says when a held request is in.
fn gated_pool() -> (Bus, Arc<Notify>, mpsc::UnboundedReceiver<()>) {
    let open = Arc::new(Notify::new());
    let (entered, entries) = mpsc::unbounded_channel();
    let bus = Bus::builder()
        .command_handler_with::<Gate, _>(CommandOptions::pool(2), {
            let open = Arc::clone(&open);
            move || Gated {
                open: Arc::clone(&open),
                entered: entered.clone(),
            }
        })
        .build()
        .unwrap();
    (bus, open, entries)
}

#[tokio::test(start_paused = true)]
async fn a_pool_request_goes_to_a_free_instance_not_behind_a_busy_one() {
    let (bus, open, mut entered) = gated_pool();
    let held = tokio::spawn({
        let bus = bus.clone();
        async move { bus.request(Gate { hold: true }).await }
    });
    entered.recv().await.unwrap();
    // One instance is held: every later request is answered by the other one.
    for _ in 0..10 {
        assert_eq!(bus.request(Gate { hold: false }).await, Ok(false));
    }
    assert!(!held.is_finished());
    open.notify_one();
    assert_eq!(held.await.unwrap(), Ok(true));
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_pool_request_waiting_for_a_busy_pool_times_out() {
    let (bus, open, mut entered) = gated_pool();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let bus = bus.clone();
            tokio::spawn(async move {
                bus.request_timeout(Gate { hold: true }, Duration::from_secs(3600))
                    .await
            })
        })
        .collect();
    entered.recv().await.unwrap();
    entered.recv().await.unwrap();
    let waiting = bus
        .request_timeout(Gate { hold: false }, Duration::from_secs(5))
        .await;
    assert!(
        matches!(waiting, Err(RequestError::Timeout { timeout, .. }) if timeout == Duration::from_secs(5))
    );
    open.notify_waiters();
    for task in held {
        assert_eq!(task.await.unwrap(), Ok(true));
    }
    // The timed-out request was taken off the queue and uncounted: the bus settles.
    bus.settled().await;
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_keyed_instance_that_panics_is_restarted_while_the_others_answer() {
    let (made, seen) = (Arc::new(AtomicUsize::new(0)), Recorder::new());
    let bus = Bus::builder()
        .command_handler_with::<Step, _>(CommandOptions::keyed(4), steppers(&made, &seen))
        .build()
        .unwrap();
    let mut steps: Vec<Step> = (0..10)
        .flat_map(|seq| (1..=7).map(move |key| Step::new(key, seq)))
        .collect();
    steps[3 * 7 + 5].panic = true; // key 6, step 3
    let replies = join_all(steps.iter().map(|&step| bus.request(step))).await;
    for (step, reply) in steps.iter().zip(&replies) {
        if step.panic {
            assert!(
                matches!(reply, Err(RequestError::Panicked { message, .. }) if message.contains("crashed"))
            );
        } else {
            assert!(reply.is_ok(), "{step:?}: {reply:?}");
        }
    }
    // The panicked instance was replaced, once; key 6's later steps went to the new one, in order.
    assert_eq!(made.load(Ordering::SeqCst), 5);
    let key6: Vec<(usize, u32)> = seen
        .snapshot()
        .into_iter()
        .filter(|&(_, key, _)| key == 6)
        .map(|(instance, _, seq)| (instance, seq))
        .collect();
    assert_eq!(
        key6.iter().map(|&(_, seq)| seq).collect::<Vec<_>>(),
        vec![0, 1, 2, 4, 5, 6, 7, 8, 9]
    );
    assert!(key6[3..].iter().all(|&(instance, _)| instance == 4));
    bus.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_pool_instance_that_panics_is_restarted_without_losing_other_requests() {
    let (made, seen) = (Arc::new(AtomicUsize::new(0)), Recorder::new());
    let bus = Bus::builder()
        .command_handler_with::<Step, _>(CommandOptions::pool(3), steppers(&made, &seen))
        .build()
        .unwrap();
    let steps: Vec<Step> = (0..60)
        .map(|seq| Step {
            panic: seq % 20 == 7,
            ..Step::new(seq.into(), seq)
        })
        .collect();
    let replies = join_all(steps.iter().map(|&step| bus.request(step))).await;
    for (step, reply) in steps.iter().zip(&replies) {
        assert_eq!(step.panic, reply.is_err(), "{step:?}: {reply:?}");
    }
    assert_eq!(seen.len(), 57);
    assert_eq!(made.load(Ordering::SeqCst), 3 + 3);
    bus.shutdown().await;
}

/// Answers after a while.
struct Slowly(u64);
impl Command for Slowly {
    type Reply = u64;
    fn key(&self) -> Option<Key<'_>> {
        Some(Key::U64(self.0 % 5))
    }
}
struct SlowAdder;
impl CommandHandler<Slowly> for SlowAdder {
    async fn handle(&mut self, cmd: Slowly, _: &Context) -> Result<u64, HandlerError> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(cmd.0 + 1)
    }
}

async fn shutdown_answers_every_request_already_sent(options: CommandOptions) {
    let bus = Bus::builder()
        .command_handler_with::<Slowly, _>(options, || SlowAdder)
        .build()
        .unwrap();
    let all = join_all((0..40).map(|x| bus.request(Slowly(x))));
    tokio::pin!(all);
    // One poll sends them all (every queue has room); none is answered yet.
    assert!(futures::poll!(&mut all).is_pending());
    let (replies, report) = tokio::join!(all, bus.shutdown());
    assert_eq!(replies, (0..40).map(|x| Ok(x + 1)).collect::<Vec<_>>());
    assert_eq!(report.abandoned, 0);
    assert_eq!(bus.request(Slowly(1)).await, Err(RequestError::Closed));
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_every_keyed_instance() {
    shutdown_answers_every_request_already_sent(CommandOptions::keyed(3)).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_every_pool_instance() {
    shutdown_answers_every_request_already_sent(CommandOptions::pool(3)).await;
}

#[tokio::test]
async fn zero_command_instances_is_a_build_error() {
    for options in [CommandOptions::pool(0), CommandOptions::keyed(0)] {
        let err = Bus::builder()
            .command_handler_with::<Slowly, _>(options, || SlowAdder)
            .build()
            .unwrap_err();
        assert!(matches!(err, BuildError::InvalidSetting(ref m) if m.contains("instances")));
    }
}
