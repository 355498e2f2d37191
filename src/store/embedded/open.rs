//! The fjall database: one per directory and process (a registry of the open directories,
//! since fjall locks its directory against this process too), its directory prepared and its
//! format marker checked.

use std::collections::HashMap;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use fjall::{Database, KeyspaceCreateOptions, PersistMode};

use super::db::{Namespace, lock};
use super::error::{OpenError, corrupt, fjall_error, locked, panic_message, unavailable};
use super::format::{FORMAT_1, FORMAT_2, MARKER_KEY, MARKER_KEYSPACE};
use crate::store::StoreError;

/// The directories this process has open, so that a second `open` shares the database (fjall
/// locks its directory, against this process too).
fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<Db>>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Weak<Db>>>> = OnceLock::new();
    OPEN.get_or_init(Mutex::default)
}

pub(super) struct Db {
    /// The canonical path, the key in [`registry`].
    pub(super) path: PathBuf,
    /// `Some` until dropped.
    db: Option<Database>,
    pub(super) namespaces: Mutex<HashMap<String, Weak<Namespace>>>,
    /// Whether the marker says [`FORMAT_2`] (records in flight may be written).
    pub(super) claims_format: AtomicBool,
}

impl Db {
    pub(super) fn open(path: &Path) -> Result<Arc<Db>, StoreError> {
        let path = prepare_dir(path)?;
        // A handle being dropped right now still holds fjall's lock: wait for its `Drop` to
        // take it out of the registry (a few ms at most).
        for _ in 0..5_000 {
            let mut open = lock(registry());
            match open.get(&path).map(Weak::upgrade) {
                Some(Some(db)) => return Ok(db),
                Some(None) => {
                    drop(open);
                    std::thread::sleep(Duration::from_millis(1));
                }
                None => {
                    let (database, format) = open_database(&path)?;
                    let db = Arc::new(Db {
                        db: Some(database),
                        path: path.clone(),
                        namespaces: Mutex::default(),
                        claims_format: AtomicBool::new(format == FORMAT_2),
                    });
                    open.insert(path, Arc::downgrade(&db));
                    return Ok(db);
                }
            }
        }
        Err(locked(OpenError::Io {
            what: "wait for this process to close",
            path,
            source: io::ErrorKind::WouldBlock.into(),
        }))
    }

    pub(super) fn get(&self) -> &Database {
        match &self.db {
            Some(db) => db,
            None => unreachable!("the database is taken in `Drop` only"),
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let mut open = lock(registry());
        // Closes fjall (stops its threads, releases its lock) before another `open` of this
        // path can start.
        drop(self.db.take());
        open.remove(&self.path);
    }
}

/// Checks `path` and creates it if needed; returns its canonical form.
fn prepare_dir(path: &Path) -> Result<PathBuf, StoreError> {
    let io_err = |what, source| OpenError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => return Err(corrupt(OpenError::NotADirectory(path.into()))),
        Ok(_) => {
            let has_marker = path
                .join("version")
                .try_exists()
                .map_err(|e| unavailable(io_err("read", e)))?;
            if !has_marker {
                let mut entries = std::fs::read_dir(path).map_err(|e| {
                    let kind_is_access = e.kind() == io::ErrorKind::PermissionDenied;
                    let e = io_err("read the directory", e);
                    if kind_is_access {
                        unavailable(e)
                    } else {
                        StoreError::backend("open the store", e)
                    }
                })?;
                if entries.next().is_some() {
                    return Err(corrupt(OpenError::Foreign(path.into())));
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir(path)
                .map_err(|e| unavailable(io_err("create the directory", e)))?;
        }
        Err(e) => return Err(unavailable(io_err("read", e))),
    }
    std::fs::canonicalize(path).map_err(|e| unavailable(io_err("resolve", e)))
}

/// Opens fjall at `path` and checks (or writes) this crate's format marker; returns the
/// database and its format ([`FORMAT_1`] or [`FORMAT_2`]).
fn open_database(path: &Path) -> Result<(Database, &'static [u8]), StoreError> {
    type Opened = Result<(Database, &'static [u8]), StoreError>;
    let opened = catch_unwind(AssertUnwindSafe(|| -> Opened {
        let db = Database::builder(path)
            .open()
            .map_err(|e| fjall_error("open the store", path, e))?;
        let fail = |e| fjall_error("open the store", path, e);
        if db.keyspace_exists(MARKER_KEYSPACE) {
            let marker = db
                .keyspace(MARKER_KEYSPACE, KeyspaceCreateOptions::default)
                .map_err(fail)?;
            let format = match marker.get(MARKER_KEY).map_err(fail)? {
                Some(found) if *found == *FORMAT_1 => FORMAT_1,
                Some(found) if *found == *FORMAT_2 => FORMAT_2,
                Some(found) => {
                    return Err(corrupt(OpenError::Format {
                        path: path.to_owned(),
                        found: String::from_utf8_lossy(&found).into_owned(),
                    }));
                }
                None => return Err(corrupt(OpenError::LostMarker(path.to_owned()))),
            };
            Ok((db, format))
        } else if db.keyspace_count() > 0 {
            Err(corrupt(OpenError::ForeignDatabase(path.to_owned())))
        } else {
            let marker = db
                .keyspace(MARKER_KEYSPACE, KeyspaceCreateOptions::default)
                .map_err(fail)?;
            // A new store is written as format 1 until its first claim (see `FORMAT_2`).
            marker.insert(MARKER_KEY, FORMAT_1).map_err(fail)?;
            db.persist(PersistMode::SyncAll).map_err(fail)?;
            Ok((db, FORMAT_1))
        }
    }));
    opened.unwrap_or_else(|panic| {
        Err(corrupt(OpenError::Panicked {
            path: path.to_owned(),
            message: panic_message(&*panic),
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fjall locks its directory against a second open in this process too; `open` shares the
    /// database instead.
    #[test]
    fn fjall_locks_against_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let first = Database::builder(dir.path()).open().unwrap();
        let second = Database::builder(dir.path()).open();
        assert!(
            matches!(second, Err(fjall::Error::Locked)),
            "{:?}",
            second.err()
        );
        drop(first);
        Database::builder(dir.path()).open().unwrap();
    }
}
