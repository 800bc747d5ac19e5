//! Crash recovery: a child process publishes and handles on a durable store and is killed
//! (SIGKILL, no clean shutdown) at random points, 22 times in a row, then runs once more to the
//! end. Every event whose `publish` returned `Ok` must have been handled at least once by each
//! group; the effectively-once group never handles a copy published again with the same id
//! (an id is handled at one offset of the log only), and handles an event twice only if a kill
//! landed between its handler's end and the commit of its mark (the marks of a partition share
//! commits: at most the events whose marks were waiting for one, see `MARKS_IN_DOUBT`).
//!
//! The child is this test binary itself, started with `TIDINGS_CRASH_CHILD` set (the test
//! `crash_recovery::child` runs it). The kill schedule comes from a fixed seed (`TIDINGS_CRASH_SEED`, default
//! 7); `TIDINGS_CRASH_KILLS` changes the number of kills (default 22).

use crate::support::stores;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::store::Store;
use tidings::Uuid;

const PARTITIONS: u32 = 2;
/// Events a child publishes per run (a killed child publishes fewer).
const PER_RUN: u64 = 300;
/// Most events of one partition of an effectively-once group whose marks a kill can lose: those
/// not yet sent to the shared commit (below 1024, plus the batch of 128 being handled) and those
/// being committed (as many).
const MARKS_IN_DOUBT: u64 = 2 * (1024 + 128);

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "crash", key = key)]
struct Tick {
    key: u64,
    n: u64,
}

/// Appends one line per call (one `write` with O_APPEND: whole lines, even when killed).
#[derive(Clone)]
struct Journal(Arc<parking_lot::Mutex<std::fs::File>>);

impl Journal {
    fn open(path: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("journal");
        Journal(Arc::new(parking_lot::Mutex::new(file)))
    }

    fn line(&self, line: &str) {
        self.0
            .lock()
            .write_all(format!("{line}\n").as_bytes())
            .expect("journal write");
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Records what it handles in the effects journal, taking a little time.
struct Effect {
    group: &'static str,
    journal: Journal,
}

impl Handler<Tick> for Effect {
    async fn handle(&mut self, e: &Envelope<Tick>, _: &Context) -> Result<(), HandlerError> {
        if e.event().n.is_multiple_of(3) {
            tokio::task::yield_now().await;
        }
        self.journal
            .line(&format!("{} {} {}", self.group, e.id(), e.offset()));
        Ok(())
    }
}

async fn open_store(spec: &str) -> Arc<dyn Store> {
    if let Some(path) = spec.strip_prefix("sqlite:") {
        #[cfg(feature = "sqlite")]
        return Arc::new(
            tidings::store::SqliteStore::open(path)
                .await
                .expect("open SQLite"),
        );
        #[cfg(not(feature = "sqlite"))]
        panic!("built without sqlite: {path}");
    }
    if let Some(rest) = spec.strip_prefix("postgres:") {
        let (url, schema) = rest.split_once('|').expect("url|schema");
        #[cfg(feature = "postgres")]
        return Arc::new(
            tidings::store::PostgresStore::connect_in_schema(url, schema)
                .await
                .expect("open PostgreSQL"),
        );
        #[cfg(not(feature = "postgres"))]
        panic!("built without postgres: {url} {schema}");
    }
    panic!("unknown store {spec}");
}

/// The child: build the bus, publish (resuming an in-doubt publish with its id), handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child() {
    let Ok(spec) = std::env::var("TIDINGS_CRASH_CHILD") else {
        return; // Not started as a child: nothing to do.
    };
    let dir = PathBuf::from(std::env::var("TIDINGS_CRASH_DIR").expect("dir"));
    let run: u64 = std::env::var("TIDINGS_CRASH_RUN").unwrap().parse().unwrap();
    let last = std::env::var("TIDINGS_CRASH_LAST").is_ok();
    let effects = Journal::open(&dir.join("effects"));
    let published = Journal::open(&dir.join("published"));

    let store = open_store(&spec).await;
    let (e1, e2) = (effects.clone(), effects.clone());
    let bus = Bus::builder()
        .store(store)
        .commit_interval(Duration::from_millis(20))
        .topic(
            TopicConfig::new("crash")
                .partitions(PARTITIONS)
                .capacity(64),
        )
        .subscribe::<Tick, _>("alo", move || Effect {
            group: "alo",
            journal: e1.clone(),
        })
        .subscribe::<Tick, _>(
            Subscription::new("once").delivery(DeliveryMode::EffectivelyOnce),
            move || Effect {
                group: "once",
                journal: e2.clone(),
            },
        )
        .build()
        .expect("bus");

    // A publish tried but not acknowledged before the kill is in doubt: publish it again with
    // its id (it may or may not be in the log already).
    let lines = read_lines(&dir.join("published"));
    let acked: HashSet<&str> = lines.iter().filter_map(|l| l.strip_prefix("ok ")).collect();
    let in_doubt: Vec<(Uuid, u64)> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("try "))
        .filter(|rest| !acked.contains(rest.split(' ').next().unwrap()))
        .map(|rest| {
            let (id, n) = rest.split_once(' ').unwrap();
            (id.parse().unwrap(), n.parse().unwrap())
        })
        .collect();
    for (id, n) in in_doubt {
        bus.publish_with(Tick { key: n % 16, n }, PublishOptions::new().id(id))
            .await
            .expect("republished");
        published.line(&format!("ok {id}"));
    }
    if !last {
        for i in 0..PER_RUN {
            let n = run * 1_000_000 + i;
            let id = Uuid::now_v7();
            published.line(&format!("try {id} {n}"));
            bus.publish_with(Tick { key: n % 16, n }, PublishOptions::new().id(id))
                .await
                .expect("published");
            published.line(&format!("ok {id}"));
        }
    }
    bus.settled().await;
    bus.shutdown().await;
}

/// Starts the child for run `run` and kills it after `kill_after` (or lets it finish).
fn run_child(spec: &str, dir: &Path, run: u64, kill_after: Option<Duration>) {
    let exe = std::env::current_exe().expect("test binary");
    let acked = || {
        read_lines(&dir.join("published"))
            .iter()
            .filter(|l| l.starts_with("ok "))
            .count()
    };
    let acked_before = acked();
    let mut child = Command::new(exe)
        .args([
            "crash_recovery::child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TIDINGS_CRASH_CHILD", spec)
        .env("TIDINGS_CRASH_DIR", dir)
        .env("TIDINGS_CRASH_RUN", run.to_string())
        .envs(kill_after.is_none().then_some(("TIDINGS_CRASH_LAST", "1")))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    match kill_after {
        Some(after) => {
            std::thread::sleep(after);
            // A loaded machine may spend the whole delay starting the child: let it publish
            // a few events first, so every run kills a bus at work (bounded wait).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while acked() < acked_before + 15 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            // SIGKILL: no destructor, no shutdown, no flush.
            let _ = child.kill();
            let _ = child.wait();
        }
        None => {
            let status = child.wait().expect("child");
            assert!(status.success(), "the last run failed: {status}");
        }
    }
}

fn crash_loop(spec: &str, dir: &Path) {
    let seed: u64 = std::env::var("TIDINGS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let kills: u64 = std::env::var("TIDINGS_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(22);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for run in 0..kills {
        let after = Duration::from_millis(rng.random_range(100..500));
        run_child(spec, dir, run, Some(after));
    }
    run_child(spec, dir, kills, None);

    // What the publisher was told, and what the handlers did.
    let lines = read_lines(&dir.join("published"));
    let tried: HashSet<Uuid> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("try "))
        .map(|r| r.split(' ').next().unwrap().parse().unwrap())
        .collect();
    let acked: HashSet<Uuid> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("ok "))
        .map(|r| r.parse().unwrap())
        .collect();
    let mut handled: HashMap<&str, HashMap<Uuid, u32>> = HashMap::new();
    // Effectively-once: the offsets each id was handled at.
    let mut offsets: HashMap<Uuid, HashSet<u64>> = HashMap::new();
    let effects = read_lines(&dir.join("effects"));
    for line in &effects {
        let mut fields = line.split(' ');
        let (group, id, offset) = (
            fields.next().expect("group"),
            fields.next().expect("id").parse().unwrap(),
            fields.next().expect("offset").parse().unwrap(),
        );
        let group = if group == "alo" { "alo" } else { "once" };
        *handled.entry(group).or_default().entry(id).or_default() += 1;
        if group == "once" {
            offsets.entry(id).or_default().insert(offset);
        }
    }
    assert!(
        acked.len() > 300,
        "too few events to mean anything: {}",
        acked.len()
    );
    for group in ["alo", "once"] {
        let seen = &handled[group];
        let missing: Vec<_> = acked.iter().filter(|id| !seen.contains_key(id)).collect();
        assert!(
            missing.is_empty(),
            "{group}: {} acknowledged events never handled, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
        assert!(
            seen.keys().all(|id| tried.contains(id)),
            "{group} handled an event nobody published"
        );
    }
    let twice = |g: &str| handled[g].values().filter(|&&n| n > 1).count();
    let (alo_twice, once_twice) = (twice("alo"), twice("once"));
    eprintln!(
        "{spec}: {kills} kills, {} acknowledged, {} tried; handled twice: at-least-once {alo_twice}, effectively-once {once_twice}",
        acked.len(),
        tried.len()
    );
    let copies: Vec<_> = offsets.iter().filter(|(_, o)| o.len() > 1).collect();
    assert!(
        copies.is_empty(),
        "effectively-once handled a copy published again: {copies:?}"
    );
    assert!(
        once_twice as u64 <= kills * u64::from(PARTITIONS) * MARKS_IN_DOUBT,
        "effectively-once handled {once_twice} events twice in {kills} kills"
    );
}

#[cfg(feature = "sqlite")]
#[test]
fn sqlite_survives_repeated_kills() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("sqlite:{}", dir.path().join("events.db").display());
    crash_loop(&spec, dir.path());
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_survives_repeated_kills() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(stores::Backend::postgres("crash_recovery"));
    let stores::Backend::Postgres { url, schema } = backend else {
        unreachable!()
    };
    crash_loop(&format!("postgres:{url}|{schema}"), dir.path());
}
