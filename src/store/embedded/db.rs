//! One namespace of the fjall database: its buckets, its atomic write batches with their
//! durable commit, and expiry by dropping whole buckets.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fjall::{Keyspace, KeyspaceCreateOptions, PersistMode};

use super::error::{OpenError, corrupt, fjall_error};
use super::format::{BucketId, FORMAT_2, MARKER_KEY, MARKER_KEYSPACE, Record, stored_key};
use super::open::Db;
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

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
}
