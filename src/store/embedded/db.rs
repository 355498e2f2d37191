//! The fjall database, one per directory and process (a registry of the open directories),
//! and per namespace its buckets, its atomic write batches with their durable commit, and
//! expiry by dropping whole buckets.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::error::{OpenError, corrupt, fjall_error, locked, panic_message, unavailable};
use super::format::{
    BucketId, FORMAT_1, FORMAT_2, MARKER_KEY, MARKER_KEYSPACE, Record, stored_key,
};
use crate::store::{ClaimBatch, Claimed, HeldKey, InsertBatch, Inserted, StoreError};

fn now_ms() -> u64 {
    // A clock before 1970 counts as 1970: keys then simply live longer.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

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
    namespaces: Mutex<HashMap<String, Weak<Namespace>>>,
    /// Whether the marker says [`FORMAT_2`] (records in flight may be written).
    claims_format: AtomicBool,
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

    fn get(&self) -> &Database {
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

// ---- One namespace ----

fn bucket_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default().max_memtable_size(MAX_MEMTABLE)
}

/// Keys in a bucket's memory table, at most; more go to a table on disk in the background.
const MAX_MEMTABLE: u64 = 8 << 20;

/// Has fjall write the keys that `buckets` hold in memory to tables, in the background.
///
/// A lookup of an absent key costs ~2.6 µs in a memory table of 10,000 random keys (fjall's
/// skip list) and ~0.25 µs in a table (its bloom filter), measured here; a lookup asks every
/// live bucket. fjall offers this as `rotate_memtable`, public but hidden from its docs
/// (fjall 3.1); if it goes away, memory tables are still flushed at `MAX_MEMTABLE`.
fn seal<'a>(buckets: impl Iterator<Item = &'a Keyspace>) -> fjall::Result<()> {
    for bucket in buckets {
        bucket.rotate_memtable()?;
    }
    Ok(())
}

/// When [`Namespace::write`] syncs the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SyncWhen {
    /// Always: the call's answers may rest on another call's writes, not yet synced.
    Always,
    /// Only if the call wrote something (it answers nothing).
    IfWritten,
}

/// One call of the store, as its blocking work sees it: cancelled once its future is dropped
/// (the last clone of the future's side goes). A write checks it under the namespace's lock, so
/// a call dropped before it wrote writes nothing, and one that wrote came first: what the
/// caller does after dropping it (a take-back) is never overtaken by it.
#[derive(Clone)]
pub(super) struct Call(Arc<AtomicBool>);

impl Call {
    pub(super) fn new() -> Call {
        Call(Arc::new(AtomicBool::new(false)))
    }

    /// Runs `f` as this call's work (on this thread).
    pub(super) fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        CURRENT_CALL.with(|c| *c.borrow_mut() = Some(Arc::clone(&self.0)));
        let out = f();
        CURRENT_CALL.with(|c| *c.borrow_mut() = None);
        out
    }
}

/// The future's side: dropping it cancels the work if it has not written yet.
impl Drop for Call {
    fn drop(&mut self) {
        // Only the future's clone is dropped here while the work may still run; the work's own
        // clone is dropped when it ends, after which cancelling changes nothing.
        self.0.store(true, Ordering::Release);
    }
}

thread_local! {
    static CURRENT_CALL: std::cell::RefCell<Option<Arc<AtomicBool>>> = const { std::cell::RefCell::new(None) };
}

/// Whether the call running on this thread was cancelled.
fn call_cancelled() -> bool {
    CURRENT_CALL.with(|c| {
        c.borrow()
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Acquire))
    })
}

pub(super) struct Namespace {
    pub(super) db: Arc<Db>,
    pub(super) name: String,
    /// The live buckets. The lock is held for the check-and-insert of one batch.
    buckets: Mutex<BTreeMap<BucketId, Keyspace>>,
    /// The width (log2 ms) of the buckets the last claim wrote to, or 0 before the first claim:
    /// where commits and releases look first (a key they present is most likely in flight).
    lease_exp: AtomicU32,
}

impl Namespace {
    pub(super) fn open(db: Arc<Db>, name: &str) -> Result<Arc<Namespace>, StoreError> {
        let mut namespaces = lock(&db.namespaces);
        if let Some(ns) = namespaces.get(name).and_then(Weak::upgrade) {
            return Ok(ns);
        }
        let fail = |e| fjall_error("open the store", &db.path, e);
        let mut buckets = BTreeMap::new();
        for ks in db.get().list_keyspace_names() {
            if let Some(id) = BucketId::parse(&ks, name) {
                let handle = db.get().keyspace(&ks, bucket_options).map_err(fail)?;
                buckets.insert(id, handle);
            }
        }
        // fjall replayed its journal into memory: seal what it replayed (see `seal`).
        seal(buckets.values()).map_err(fail)?;
        let ns = Arc::new(Namespace {
            db: Arc::clone(&db),
            name: name.to_owned(),
            buckets: Mutex::new(buckets),
            lease_exp: AtomicU32::new(0),
        });
        ns.drop_expired(&mut lock(&ns.buckets), now_ms())?;
        namespaces.insert(name.to_owned(), Arc::downgrade(&ns));
        drop(namespaces);
        Ok(ns)
    }

    fn fail(&self, operation: &'static str) -> impl Fn(fjall::Error) -> StoreError + '_ {
        move |e| fjall_error(operation, &self.db.path, e)
    }

    /// Drops the buckets whose every key has expired.
    fn drop_expired(
        &self,
        buckets: &mut BTreeMap<BucketId, Keyspace>,
        now: u64,
    ) -> Result<(), StoreError> {
        let expired: Vec<BucketId> = buckets
            .keys()
            .filter(|id| id.end_ms() <= now)
            .copied()
            .collect();
        for id in expired {
            if let Some(handle) = buckets.remove(&id) {
                // fjall deletes the keyspace's files once the last handle is gone.
                self.db
                    .get()
                    .delete_keyspace(handle)
                    .map_err(self.fail("drop an expired bucket"))?;
            }
        }
        Ok(())
    }

    /// `key`'s live record and the bucket that holds it, if it has one.
    ///
    /// A key has at most one live record: every call that writes one first finds none, or
    /// replaces the one it found (in the same atomic batch). Older records of the key in other
    /// buckets have expired: they are skipped here (a lease that ran out is free even before
    /// its bucket is dropped) and go with their buckets.
    ///
    /// `first`: the width (log2 ms) of the buckets to ask first (0: none). Any order finds the
    /// one live record; a good one saves lookups.
    fn find(
        &self,
        buckets: &BTreeMap<BucketId, Keyspace>,
        key: &[u8],
        now: u64,
        first: u32,
    ) -> Result<Option<(BucketId, Record)>, StoreError> {
        // Then widest and newest first (a repeat is most likely recent).
        let preferred = buckets.iter().rev().filter(|(id, _)| id.exp == first);
        let others = buckets.iter().rev().filter(|(id, _)| id.exp != first);
        for (id, bucket) in preferred.chain(others) {
            if let Some(value) = bucket.get(key).map_err(self.fail("look up keys"))? {
                let record =
                    Record::decode(&value).ok_or_else(|| corrupt(OpenError::Value(value.len())))?;
                if record.expires_ms > now {
                    return Ok(Some((*id, record)));
                }
            }
        }
        Ok(None)
    }

    /// The bucket `id`, created if it is not live yet.
    fn bucket(
        &self,
        buckets: &mut BTreeMap<BucketId, Keyspace>,
        id: BucketId,
        operation: &'static str,
    ) -> Result<Keyspace, StoreError> {
        if let Some(bucket) = buckets.get(&id) {
            return Ok(bucket.clone());
        }
        let fail = self.fail(operation);
        // The buckets written so far are (mostly) complete: move their keys from memory into
        // tables, where fjall's bloom filters answer the lookups of absent keys.
        seal(buckets.values()).map_err(&fail)?;
        let bucket = self
            .db
            .get()
            .keyspace(&id.name(&self.name), bucket_options)
            .map_err(&fail)?;
        buckets.insert(id, bucket.clone());
        Ok(bucket)
    }

    /// Runs `f` with the live buckets under the namespace's lock (expired buckets dropped
    /// first) and a write batch that it fills; commits the batch, releases the lock, and
    /// answers once fjall's journal is synced to disk.
    ///
    /// The sync runs outside the lock, so the next call looks up while this one syncs. Every
    /// answer waits for a sync that covers the writes it saw (see the type's docs): an answer
    /// that found a key written by a call still syncing is given after this call's own sync,
    /// which covers the other's write too (the journal is one sequential file). A call that
    /// answers nothing ([`SyncWhen::IfWritten`]) skips the sync when it wrote nothing.
    fn write<T>(
        &self,
        operation: &'static str,
        sync: SyncWhen,
        f: impl FnOnce(
            &mut BTreeMap<BucketId, Keyspace>,
            &mut fjall::OwnedWriteBatch,
            u64,
        ) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let fail = self.fail(operation);
        let db = self.db.get();
        let now = now_ms();
        let answers = {
            let mut buckets = lock(&self.buckets);
            if call_cancelled() {
                return Err(StoreError::backend(
                    operation,
                    "cancelled: its caller gave up",
                ));
            }
            self.drop_expired(&mut buckets, now)?;
            let mut write = db.batch().durability(None);
            let answers = f(&mut buckets, &mut write, now)?;
            if write.is_empty() && sync == SyncWhen::IfWritten {
                return Ok(answers);
            }
            write.commit().map_err(&fail)?;
            answers
        };
        db.persist(PersistMode::SyncAll).map_err(&fail)?;
        Ok(answers)
    }

    pub(super) fn insert(&self, batch: &InsertBatch) -> Result<Vec<Inserted>, StoreError> {
        const OP: &str = "insert keys";
        let ttl = ttl_ms(batch.ttl);
        let token = batch.token.as_u128();
        self.write(OP, SyncWhen::Always, |buckets, write, now| {
            let expires = now.saturating_add(ttl);
            let mut answers = Vec::with_capacity(batch.keys.len());
            let mut new = Vec::new();
            for key in &batch.keys {
                let key = stored_key(key);
                answers.push(match self.find(buckets, &key, now, 0)? {
                    // Recorded by this very request (a retry). A key in flight is present,
                    // whoever holds it.
                    Some((_, r)) if !r.in_flight && r.token == token => Inserted::New,
                    Some(_) => Inserted::Present,
                    None => {
                        new.push(key);
                        Inserted::New
                    }
                });
            }
            if !new.is_empty() {
                let bucket = self.bucket(buckets, BucketId::for_key(expires, ttl), OP)?;
                let value = Record::done(token, expires).encode();
                for key in new {
                    write.insert(&bucket, key, &value);
                }
            }
            Ok(answers)
        })
    }

    pub(super) fn remove(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let fail = self.fail("remove keys");
        self.write("remove keys", SyncWhen::IfWritten, |buckets, write, _| {
            for key in keys {
                let key = stored_key(key);
                for bucket in buckets.values() {
                    if bucket.contains_key(&key).map_err(&fail)? {
                        write.remove(bucket, key.clone());
                    }
                }
            }
            Ok(())
        })
    }

    pub(super) fn claim(&self, batch: &ClaimBatch) -> Result<Vec<Claimed>, StoreError> {
        const OP: &str = "claim keys";
        let lease = ttl_ms(batch.lease);
        let token = batch.token.as_u128();
        let mut marked = false;
        let answers = self.write(OP, SyncWhen::Always, |buckets, write, now| {
            let expires = now.saturating_add(lease);
            let mut answers = Vec::with_capacity(batch.keys.len());
            let mut new = Vec::new();
            for key in &batch.keys {
                let key = stored_key(key);
                answers.push(match self.find(buckets, &key, now, 0)? {
                    Some((_, r)) if !r.in_flight => Claimed::Done,
                    // Held by this very request (a retry); the lease is not extended.
                    Some((_, r)) if r.token == token => Claimed::Mine,
                    Some(_) => Claimed::InFlight,
                    None => {
                        new.push(key);
                        Claimed::Mine
                    }
                });
            }
            if !new.is_empty() {
                if !self.db.claims_format.load(Ordering::Acquire) {
                    // The first record in flight in this directory: mark it format 2, in the
                    // same atomic batch.
                    let marker = self
                        .db
                        .get()
                        .keyspace(MARKER_KEYSPACE, KeyspaceCreateOptions::default)
                        .map_err(self.fail(OP))?;
                    write.insert(&marker, MARKER_KEY, FORMAT_2);
                    marked = true;
                }
                let id = BucketId::for_lease(expires, lease);
                self.lease_exp.store(id.exp, Ordering::Relaxed);
                let bucket = self.bucket(buckets, id, OP)?;
                let value = Record::in_flight(token, expires).encode();
                for key in new {
                    write.insert(&bucket, key, &value);
                }
            }
            Ok(answers)
        })?;
        if marked {
            // The marker is durable now.
            self.db.claims_format.store(true, Ordering::Release);
        }
        Ok(answers)
    }

    pub(super) fn commit(&self, held: &[HeldKey], ttl: Duration) -> Result<Vec<bool>, StoreError> {
        const OP: &str = "commit claims";
        let ttl = ttl_ms(ttl);
        let first = self.lease_exp.load(Ordering::Relaxed);
        self.write(OP, SyncWhen::Always, |buckets, write, now| {
            let expires = now.saturating_add(ttl);
            let target = BucketId::for_key(expires, ttl);
            let mut answers = Vec::with_capacity(held.len());
            let mut done = Vec::new();
            for (key, token) in held {
                let key = stored_key(key);
                let token = token.as_u128();
                answers.push(match self.find(buckets, &key, now, first)? {
                    // Another claim holds the key, or committed it: this one's lease ran out.
                    Some((_, r)) if r.token != token => false,
                    // Ours, in flight (or done by an earlier try of this commit): the record
                    // moves to the bucket of its new expiry.
                    Some((id, _)) => {
                        match buckets.get(&id) {
                            Some(bucket) if id != target => write.remove(bucket, key.clone()),
                            _ => {}
                        }
                        done.push((key, token));
                        true
                    }
                    // Free again (the lease ran out and nobody took the key): ours to commit.
                    None => {
                        done.push((key, token));
                        true
                    }
                });
            }
            if !done.is_empty() {
                let bucket = self.bucket(buckets, target, OP)?;
                for (key, token) in done {
                    write.insert(&bucket, key, Record::done(token, expires).encode());
                }
            }
            Ok(answers)
        })
    }

    /// Moves each key its token still holds in flight to a lease of `lease` from now.
    pub(super) fn renew(&self, held: &[HeldKey], lease: Duration) -> Result<Vec<bool>, StoreError> {
        const OP: &str = "renew leases";
        let lease = ttl_ms(lease);
        let first = self.lease_exp.load(Ordering::Relaxed);
        self.write(OP, SyncWhen::IfWritten, |buckets, write, now| {
            let expires = now.saturating_add(lease);
            let id = BucketId::for_lease(expires, lease);
            let mut answers = Vec::with_capacity(held.len());
            let mut renewed = Vec::new();
            for (key, token) in held {
                let key = stored_key(key);
                let mine = match self.find(buckets, &key, now, first)? {
                    Some((old, r)) if r.in_flight && r.token == token.as_u128() => {
                        if let Some(bucket) = buckets.get(&old) {
                            write.remove(bucket, key.clone());
                        }
                        renewed.push((key, token.as_u128()));
                        true
                    }
                    _ => false,
                };
                answers.push(mine);
            }
            if !renewed.is_empty() {
                let bucket = self.bucket(buckets, id, OP)?;
                for (key, token) in renewed {
                    write.insert(&bucket, key, Record::in_flight(token, expires).encode());
                }
            }
            Ok(answers)
        })
    }

    pub(super) fn release(&self, held: &[HeldKey]) -> Result<(), StoreError> {
        self.forget_held("release claims", held, true)
    }

    /// Forgets each key its token still holds, done or in flight.
    pub(super) fn take_back(&self, held: &[HeldKey]) -> Result<(), StoreError> {
        self.forget_held("take back keys", held, false)
    }

    /// Removes each key that holds its token (only while in flight, with `in_flight_only`).
    fn forget_held(
        &self,
        op: &'static str,
        held: &[HeldKey],
        in_flight_only: bool,
    ) -> Result<(), StoreError> {
        let first = self.lease_exp.load(Ordering::Relaxed);
        self.write(op, SyncWhen::IfWritten, |buckets, write, now| {
            for (key, token) in held {
                let key = stored_key(key);
                let Some((id, r)) = self.find(buckets, &key, now, first)? else {
                    continue;
                };
                match buckets.get(&id) {
                    Some(bucket)
                        if (r.in_flight || !in_flight_only) && r.token == token.as_u128() =>
                    {
                        write.remove(bucket, key);
                    }
                    _ => {}
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_milliseconds() {
        assert_eq!(ttl_ms(Duration::ZERO), 0);
        assert_eq!(ttl_ms(Duration::from_micros(1)), 1);
        assert_eq!(ttl_ms(Duration::from_millis(300)), 300);
        assert_eq!(ttl_ms(Duration::MAX), u64::MAX);
    }

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
