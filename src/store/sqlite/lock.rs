//! One process per SQLite file: an OS lock on a file beside the database, held while any
//! [`SqliteStore`](super::SqliteStore) of this process has the database open.
//!
//! # Why a lock file, and not SQLite's own exclusive mode
//!
//! `PRAGMA locking_mode = EXCLUSIVE` locks the database per *connection*: the store's own pool
//! (a writer and readers) would lock itself out, the application's own sqlx code on the same file
//! and the `sqlite3` shell could not even read it, and in WAL mode it also gives up the
//! shared-memory index. What must be excluded is a second *bus* (a second process dispatching the
//! same consumer groups), not a second reader. So the store takes an advisory lock on
//! `<database>.tidings.lock` with [`std::fs::File::try_lock`] (`flock` on Unix, `LockFileEx` on
//! Windows), apart from SQLite's own locks on the database file (a lock on the database file
//! itself would share the POSIX locks SQLite relies on, and closing it would drop them).
//!
//! The kernel releases the lock when the process ends, however it ends (`kill -9` included): the
//! lock file left behind never blocks a restart, only a live holder does. The file is never
//! removed (removing it would let two processes lock two different files of one name).
//!
//! Inside one process the lock is shared: every store opened on the file holds it together (a
//! test, or an application rebuilding its bus after a shutdown, opens the file again while the
//! old bus's handle is still around), and it is released when the last one is dropped. Two buses
//! in one process on one file are the application's doing, as two buses on clones of one store.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::store::StoreError;

/// The lock files this process holds, by path, with how many stores hold each.
static HELD: Mutex<BTreeMap<PathBuf, (File, usize)>> = Mutex::new(BTreeMap::new());

/// This process's hold on the lock of one database file; released (for this store) on drop.
#[derive(Debug)]
pub(super) struct ProcessLock {
    path: PathBuf,
}

impl ProcessLock {
    /// Takes the lock of the database at `database` (as SQLite names it), or shares it if this
    /// process holds it already.
    pub(super) fn acquire(database: &Path) -> Result<Arc<Self>, StoreError> {
        // The same file by two paths (relative, through a symbolic link) is one lock.
        let database = std::fs::canonicalize(database).unwrap_or_else(|_| database.to_owned());
        let mut path = database.clone().into_os_string();
        path.push(".tidings.lock");
        let path = PathBuf::from(path);
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, holders)) = held.get_mut(&path) {
            *holders += 1;
            return Ok(Arc::new(ProcessLock { path }));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| lock_failed(&path, &e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::InUse {
                    file: database,
                    holder: holder(&mut file),
                })
            }
            Err(TryLockError::Error(e)) => return Err(lock_failed(&path, &e)),
        }
        // Who holds it, for the error another process gets; only a help, the lock is the rule.
        let _ = file
            .set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.flush());
        held.insert(path.clone(), (file, 1));
        Ok(Arc::new(ProcessLock { path }))
    }
}

impl Drop for ProcessLock {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        let Some((_, holders)) = held.get_mut(&self.path) else {
            return;
        };
        *holders -= 1;
        if *holders == 0 {
            if let Some((file, _)) = held.remove(&self.path) {
                // No stale pid for the next reader; closing the file releases the lock.
                let _ = file.set_len(0);
                drop(file);
            }
        }
    }
}

/// The pid the holder wrote in the lock file, if it could be read.
fn holder(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

fn lock_failed(path: &Path, error: &std::io::Error) -> StoreError {
    StoreError::backend(std::io::Error::new(
        error.kind(),
        format!(
            "cannot lock {} (the lock that keeps the SQLite database to one process): {error}",
            path.display()
        ),
    ))
}
