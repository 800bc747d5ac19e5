//! SQLite is one process per file: a second process opening the database as a store is refused
//! with an error naming the file and the holder, stores of one process share the lock, and the
//! lock goes with its holder (dropped, or killed: a `kill -9` leaves no lock behind).

#![cfg(feature = "sqlite")]

use std::fs::{File, TryLockError};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tidings::store::{Log, SqliteStore, StoreError};

use crate::support::stores;

/// Set in the child process: the database it opens and holds.
const CHILD_DATABASE: &str = "TIDINGS_TEST_SQLITE_HOLDER";
/// What the child prints once it holds the store.
const READY: &str = "tidings-sqlite-holder-ready";

/// Not a test of its own: the child process of
/// [`a_second_process_is_refused_until_the_holder_is_killed`], run by it with the database in
/// [`CHILD_DATABASE`]. It opens the store, says so, and holds it until it is killed.
#[tokio::test]
#[ignore = "the child process of a_second_process_is_refused_until_the_holder_is_killed"]
async fn sqlite_holder_child() {
    let Some(path) = std::env::var_os(CHILD_DATABASE) else {
        return;
    };
    let store = SqliteStore::open(&path).await.expect("the child opens");
    // Straight to stdout (libtest prints its own "test … " before it, on the same line).
    let mut out = std::io::stdout();
    writeln!(out, "\n{READY}")
        .and_then(|()| out.flush())
        .unwrap();
    // Its parent kills it; if the parent goes first, stdin closes and the child ends too.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(store);
}

/// Runs this test binary again, as [`sqlite_holder_child`] holding `path`, and waits for it to
/// hold the store.
fn spawn_holder(path: &Path) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "sqlite_one_process::sqlite_holder_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DATABASE, path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the holder");
    // Read on a thread of its own, so that a child that never gets ready fails the test instead
    // of hanging it (a safety net, not a timing assertion).
    let stdout = child.stdout.take().unwrap();
    let (ready, is_ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let found = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.trim() == READY);
        let _ = ready.send(found);
    });
    match is_ready.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(true) => child,
        other => {
            let _ = child.kill();
            let status = child.wait();
            panic!("the holder never held the store: {other:?}, {status:?}");
        }
    }
}

fn lock_file(database: &Path) -> PathBuf {
    let mut path = std::fs::canonicalize(database).unwrap().into_os_string();
    path.push(".tidings.lock");
    PathBuf::from(path)
}

/// Whether someone (another process, or this one's stores) holds the lock of `database`: tried
/// on an open file of its own, which the OS sees as another holder.
fn locked(database: &Path) -> bool {
    let file = File::open(lock_file(database)).unwrap();
    match file.try_lock() {
        Ok(()) => false,
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(e)) => panic!("{e}"),
    }
}

/// Another process holding the file as a store makes this one's open fail with `InUse`, naming
/// the file and the holder's pid; no row is written meanwhile. Once the holder is killed
/// (SIGKILL: no destructor runs, the lock file stays), the open succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_is_refused_until_the_holder_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let mut child = spawn_holder(&path);

    let refused = SqliteStore::open(&path).await;
    let url = format!("sqlite://{}", path.display());
    let refused_by_url = SqliteStore::connect(&url).await;
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let refused_on_pool = SqliteStore::from_pool(pool.clone()).await;
    // The application's own connections are not bus stores: they read the file as before.
    let tables: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'tidings_events'")
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    child.kill().unwrap();
    child.wait().unwrap();

    for (how, result) in [
        ("open", refused),
        ("connect", refused_by_url),
        ("from_pool", refused_on_pool),
    ] {
        match result {
            Err(error @ StoreError::InUse { .. }) => {
                let StoreError::InUse { file, holder } = &error else {
                    unreachable!()
                };
                assert_eq!(
                    file,
                    &std::fs::canonicalize(&path).unwrap(),
                    "{how}: {error}"
                );
                let message = error.to_string();
                assert!(
                    message.contains(&path.display().to_string())
                        || message.contains(&file.display().to_string()),
                    "{how}: {message}"
                );
                #[cfg(unix)]
                {
                    assert_eq!(*holder, Some(child.id()), "{how}: {message}");
                    assert!(message.contains(&child.id().to_string()), "{message}");
                }
                let _ = holder;
            }
            other => panic!("{how}: a second process's open must be refused: {other:?}"),
        }
    }
    assert_eq!(tables, 1, "the holder migrated the file");

    // Killed: the lock file is still there, the lock is not.
    assert!(lock_file(&path).exists());
    let store = SqliteStore::open(&path)
        .await
        .expect("the holder is dead: the file opens");
    let mut rows = vec![stores::placed_row(0, 1, 0)];
    store.append(&mut rows).await.unwrap();
    assert_eq!(store.head("orders", 0).await.unwrap(), 1);
}

/// The stores of one process on one file share the lock (a restart in the same process opens the
/// file while the old store lingers): held while any of them (or a clone) lives, released when
/// the last is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_of_one_process_share_the_lock_until_the_last_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let first = SqliteStore::open(&path).await.unwrap();
    assert!(locked(&path), "an open store holds the lock");
    // The same file again, by another path: shared, not refused.
    let again = SqliteStore::connect(&format!(
        "sqlite://{}",
        dir.path().join(".").join("events.db").display()
    ))
    .await
    .expect("a second store of this process opens");
    let clone = first.clone();
    let mut rows = vec![stores::placed_row(0, 1, 0)];
    again.append(&mut rows).await.unwrap();
    assert_eq!(first.head("orders", 0).await.unwrap(), 1);

    drop(first);
    assert!(locked(&path), "a clone of the first still holds it");
    drop(clone);
    assert!(locked(&path), "the second store still holds it");
    drop(again);
    assert!(!locked(&path), "the last store is dropped: released");

    // And taken again by the next open.
    let reopened = SqliteStore::open(&path).await.unwrap();
    assert!(locked(&path));
    assert_eq!(reopened.head("orders", 0).await.unwrap(), 1);
}

/// A lock held by the bus's store is released when the bus is dropped, so another process (here:
/// a child) can open the file after this process let go of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_bus_lets_another_process_open_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let bus = tidings::Bus::builder()
        .store(SqliteStore::open(&path).await.unwrap())
        .build()
        .unwrap();
    assert!(locked(&path), "the bus's store holds the lock");
    bus.shutdown().await;
    drop(bus);
    assert!(!locked(&path), "dropped with the bus");
    let mut child = spawn_holder(&path);
    let refused = SqliteStore::open(&path).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        matches!(refused, Err(StoreError::InUse { .. })),
        "{refused:?}"
    );
}
