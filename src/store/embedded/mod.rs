//! The embedded store: [`EmbeddedStore`] and its [`Store`] and [`ClaimStore`] impls. The
//! on-disk encoding of keys, records and bucket names is in `format`, the fjall database (one
//! per directory and process), its buckets, batches and expiry in `db`, and the mapping of
//! fjall and I/O errors in `error`.

mod db;
mod error;
mod format;
mod open;

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use self::db::{Call, Namespace};
use self::error::{OpenError, panic_message};
use self::format::MAX_NAMESPACE_LEN;
use self::open::Db;
use crate::store::{
    ClaimBatch, ClaimStore, Claimed, HeldKey, InsertBatch, Inserted, Store, StoreError, StoreFuture,
};

/// A store in a local directory that survives restarts: one process's keys, on disk, with a
/// durable commit per batch; with [claims](EmbeddedStore#claims) for
/// [`claim_by_key`](crate::DedupStreamExt::claim_by_key).
///
/// Built on [fjall](https://docs.rs/fjall/3) (an LSM-tree key-value store), chosen by
/// measurement: with a durable commit per batch of 1,000 it recorded 150,000–225,000 keys/s on
/// a busy 2-core machine, ~100,000 keys/s once ten buckets are live, and 40–340× the plain
/// loop with one `fsync` per key (`benches/embedded.rs` has the table and the command).
///
/// # How keys are kept
///
/// - **Buckets by expiry time.** A key goes into the bucket of the moment it expires; each
///   bucket is one fjall keyspace. The bucket width is derived from the batch's ttl: `ttl / 8`,
///   rounded down to a power of two of milliseconds, and at least 1.024 s (so a store with one
///   ttl holds about 9 to 17 live buckets). A lookup asks every live bucket; **expiry drops
///   whole buckets** once their last moment has passed (checked on every call), so the store
///   never scans its keys to forget them and its disk space follows the live keys. Each key's
///   value holds its exact expiry time, so a key is forgotten exactly at its ttl even though
///   its bucket lives a little longer. When writes move on to a new bucket, the older ones are
///   written from memory to tables on disk, where fjall's bloom filters answer lookups of
///   absent keys cheaply; a bucket keeps at most 8 MiB of keys in memory.
/// - **Wall-clock time.** Expiry stamps are read from [`std::time::SystemTime`], because they
///   outlive the process: a key recorded before a restart expires at the same moment after it.
///   (So `tokio::time::pause` does not move them.) A clock that jumps moves expiry with it.
/// - **Durability.** Each call writes one atomic batch and syncs fjall's journal to disk
///   (`fsync`, [`PersistMode::SyncAll`](fjall::PersistMode::SyncAll)) before its future
///   resolves `Ok`. A key that one call found recorded by another call still in progress is
///   answered only after this call's own sync, which covers the other call's write too (the
///   journal is one sequential file).
/// - **Atomic per key.** The check-and-write of one batch runs under a lock per namespace, and
///   fjall locks the directory against other processes, so of concurrent calls for one key
///   exactly one records it. A key that holds the call's own [`Token`](super::Token) answers
///   [`Inserted::New`] again (a retried call).
/// - **One live record per key.** Every call that writes a key's record first finds none live,
///   or replaces the one it found in the same atomic batch; older records of the key in other
///   buckets have expired, are skipped by lookups and go with their buckets.
/// - **Blocking I/O off the executor.** Inside a tokio runtime each call runs on
///   [`tokio::task::spawn_blocking`]; outside one (another executor) it runs where it is polled.
///
/// # Claims
///
/// The store implements [`ClaimStore`]: a key is **free**, **in flight** (claimed by a token,
/// until its lease ends) or **done** (committed, or recorded by [`insert`](Store::insert), for
/// a ttl), with the contract's semantics:
///
/// - [`claim`](ClaimStore::claim) writes a record in flight for each free key and answers
///   [`Claimed::Mine`]; a key in flight with the batch's own token is `Mine` again (a retry;
///   its lease is not extended), with another token [`Claimed::InFlight`], and a done key
///   [`Claimed::Done`]. [`insert`](Store::insert) counts a key in flight as present.
/// - [`commit`](ClaimStore::commit) marks a key done for the ttl if the claim still holds it:
///   in flight with its token (or done by it, a retried commit; or free again, if the lease
///   ran out and nobody took the key). A key that another token holds or committed answers
///   `false`: a consumer whose lease ran out never overwrites the new owner's claim.
/// - [`release`](ClaimStore::release) deletes the record only if it is in flight with the
///   release's token.
/// - **Leases expire like keys, without a scan.** A record in flight holds the exact end of
///   its lease and lives in a bucket of its own time scale: about **one lease wide** (the lease
///   rounded down to a power of two of milliseconds, at least 1.024 s), not an eighth of it
///   like a ttl's, so the short-lived leases keep two or three buckets live (a lookup asks each
///   live bucket). A lease that ran out is free when it is read, before its bucket is dropped;
///   the bucket is dropped whole at most one width later, so a consumer that died leaves
///   nothing behind. A commit moves the record to the bucket of its ttl, and a commit or
///   release deletes it from its lease's bucket, in the same atomic batch.
/// - **Durable, like inserts:** each `claim`, `commit` and `release` is one atomic batch
///   followed by an `fsync` before it answers. A claim in flight survives a restart until its
///   lease ends (its owner's retry, with the same token, is still `Mine`), and a committed key
///   stays done for its ttl.
///
/// With a durable commit per call, a claimed and committed item pays two `fsync`s where a
/// key recorded by [`insert`](Store::insert) pays one (both batched: the operator sends up to
/// `batch_size` keys per call, and commits the claims settled meanwhile together), and two
/// lookups and two writes where an insert pays one of each: measured, `claim` + `commit` in
/// batches of 1,000 ran at ~76,000 keys/s against ~250,000 for `insert` (`claim_by_key` +
/// `commit` ~62,000 items/s against ~218,000 for `dedup_by_key`), about the ratio of
/// `RedisStore`; `benches/embedded.rs` has the table and the command.
///
/// ```
/// use std::time::Duration;
/// use stream_dedup::store::{ClaimBatch, ClaimStore, Claimed, EmbeddedStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let (lease, ttl) = (Duration::from_secs(30), Duration::from_secs(300));
/// let store = EmbeddedStore::open(dir.path(), "orders")?;
///
/// let batch = ClaimBatch::new(vec![b"12345/payment".to_vec()], lease);
/// let token = batch.token;
/// assert_eq!(store.claim(batch).await?, [Claimed::Mine]);
/// // Until it is committed, another claim of the key is held back.
/// let other = ClaimBatch::new(vec![b"12345/payment".to_vec()], lease);
/// assert_eq!(store.claim(other).await?, [Claimed::InFlight]);
/// // ... process the message, then:
/// assert_eq!(store.commit(vec![(b"12345/payment".to_vec(), token)], ttl).await?, [true]);
/// drop(store);
///
/// // After a restart the key is done.
/// let store = EmbeddedStore::open(dir.path(), "orders")?;
/// let again = ClaimBatch::new(vec![b"12345/payment".to_vec()], lease);
/// assert_eq!(store.claim(again).await?, [Claimed::Done]);
/// # Ok(())
/// # }
/// ```
///
/// # Namespaces and sharing
///
/// The namespace is part of every bucket's name, so several namespaces share one directory and
/// never see each other's keys. Opening a directory that this process has open already shares
/// its database, and opening the same namespace again returns a handle to the same store (as
/// [`Clone`] does). Another **process** gets [`StoreError::Locked`] until the last handle of
/// this one is dropped.
///
/// # Limits and errors
///
/// Keys may be empty and hold any bytes; a key longer than
/// [`MAX_KEY_LEN`](EmbeddedStore::MAX_KEY_LEN) bytes fails its whole batch with
/// [`StoreError::KeyTooLong`] before anything is written (replace long keys with a
/// [`Fingerprint`](crate::Fingerprint)). Disk errors are [`StoreError`]s with fjall's error as
/// the [`source`](std::error::Error::source), never panics (a panic inside fjall while it reads
/// damaged files is caught and reported as [`StoreError::Corrupt`]). fjall checks its files
/// with checksums; damage it takes for a write cut short at the end of its journal is cut off
/// instead (the batches after it are forgotten: their keys are new again, so a duplicate may
/// pass, but no message is lost).
///
/// # Format
///
/// The directory is a fjall 3 database. It holds a keyspace `stream-dedup` whose key `format`
/// is the format marker, and per namespace and bucket a keyspace `dedup#{namespace}#{log2 width
/// in ms}#{bucket index}` (the bucket covers expiry times `[index << log2, (index + 1) <<
/// log2)` in milliseconds since the Unix epoch; buckets of done keys and of keys in flight are
/// named alike and may be shared). Its keys are a `0` byte followed by the key's bytes. Its
/// values are one of:
///
/// - **done** (24 bytes): the token (16 bytes, big-endian) followed by the expiry time (`u64`
///   milliseconds since the Unix epoch, big-endian);
/// - **in flight** (25 bytes): the byte `c` (0x63), the claim's token (16 bytes, big-endian),
///   the end of the lease (`u64` milliseconds since the Unix epoch, big-endian).
///
/// The marker is `stream-dedup embedded 1` for a store that holds done records only, and
/// `stream-dedup embedded 2` once a record in flight was written (the marker is changed in the
/// same atomic batch as the first claim). This version reads both; a store written before
/// claims existed (format 1) reads as before, its keys done. A version that knows only format
/// 1 refuses a format 2 store at open ([`StoreError::Corrupt`], "another format") rather than
/// misreading a record in flight. Golden tests pin this format.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use stream_dedup::store::{EmbeddedStore, InsertBatch, Inserted, Store};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let ttl = Duration::from_secs(300);
///
/// let store = EmbeddedStore::open(dir.path().join("dedup"), "orders")?;
/// let first = store.insert(InsertBatch::new(vec![b"12345/payment".to_vec()], ttl)).await?;
/// assert_eq!(first, [Inserted::New]);
/// drop(store);
///
/// // After a restart the key is still there.
/// let store = EmbeddedStore::open(dir.path().join("dedup"), "orders")?;
/// let again = store.insert(InsertBatch::new(vec![b"12345/payment".to_vec()], ttl)).await?;
/// assert_eq!(again, [Inserted::Present]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EmbeddedStore {
    ns: Arc<Namespace>,
}

impl EmbeddedStore {
    /// The longest key this store takes, in bytes (fjall's limit of 65,535 bytes less the one
    /// byte this store puts before each key).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use stream_dedup::store::{EmbeddedStore, InsertBatch, Store, StoreError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let store = EmbeddedStore::open(dir.path(), "orders")?;
    /// let too_long = vec![b'k'; EmbeddedStore::MAX_KEY_LEN + 1];
    /// let err = store.insert(InsertBatch::new(vec![too_long], Duration::from_secs(60))).await;
    /// assert!(matches!(err, Err(StoreError::KeyTooLong { max: EmbeddedStore::MAX_KEY_LEN, .. })));
    /// # Ok(())
    /// # }
    /// ```
    pub const MAX_KEY_LEN: usize = u16::MAX as usize - 1;

    /// Opens the store in directory `path` (creating the directory, but not its parent, if it
    /// does not exist), for keys of `namespace`.
    ///
    /// `namespace` is 1 to 128 ASCII letters, digits, `-`, `_` or `.`. The call does blocking
    /// I/O (it replays fjall's journal): call it at startup, or inside
    /// [`spawn_blocking`](tokio::task::spawn_blocking) when the executor must not wait.
    /// Buckets that expired while the store was closed are dropped here.
    ///
    /// # Errors
    ///
    /// - [`StoreError::Unavailable`]: the parent directory does not exist, or the directory
    ///   cannot be read or created (permissions).
    /// - [`StoreError::Locked`]: another process has the store open.
    /// - [`StoreError::Corrupt`]: `path` is a file, or a directory that is neither empty nor a
    ///   store, or the store's files are damaged or of another format.
    /// - [`StoreError::Backend`]: an invalid namespace, or any other failure of fjall.
    ///
    /// # Examples
    ///
    /// ```
    /// use stream_dedup::store::{EmbeddedStore, StoreError};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let orders = EmbeddedStore::open(dir.path(), "orders")?;
    /// // Another namespace in the same directory: its own keys.
    /// let refunds = EmbeddedStore::open(dir.path(), "refunds")?;
    ///
    /// let missing = EmbeddedStore::open(dir.path().join("no/such/dir"), "orders");
    /// assert!(matches!(missing, Err(StoreError::Unavailable(_))));
    /// let invalid = EmbeddedStore::open(dir.path(), "orders/eu");
    /// assert!(invalid.is_err());
    /// # drop((orders, refunds));
    /// # Ok(())
    /// # }
    /// ```
    pub fn open(path: impl AsRef<Path>, namespace: &str) -> Result<EmbeddedStore, StoreError> {
        check_namespace(namespace)?;
        let db = Db::open(path.as_ref())?;
        let ns = Namespace::open(db, namespace)?;
        Ok(EmbeddedStore { ns })
    }

    fn run<T: Send + 'static>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Namespace) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<T> {
        let ns = Arc::clone(&self.ns);
        // A call dropped before its write took the namespace's lock (its caller timed out, or
        // the operator was dropped) is cancelled: it writes nothing. A take-back that follows
        // it then cannot be overtaken by it (`db::Call`).
        let call = Call::new();
        Box::pin(async move {
            let work = {
                let call = call.clone();
                move || call.run(|| f(&ns))
            };
            let _cancel_on_drop = call;
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => rt
                    .spawn_blocking(work)
                    .await
                    .map_err(|e| StoreError::backend(operation, e))?,
                Err(_) => catch_unwind(AssertUnwindSafe(work))
                    .map_err(|panic| StoreError::backend(operation, panic_message(&*panic)))?,
            }
        })
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.ns.db.path)
            .field("namespace", &self.ns.name)
            .finish_non_exhaustive()
    }
}

impl Store for EmbeddedStore {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        if batch.keys.is_empty() {
            return Box::pin(std::future::ready(Ok(Vec::new())));
        }
        if let Some(err) = too_long(batch.keys.iter()) {
            return Box::pin(std::future::ready(Err(err)));
        }
        self.run("insert keys", move |ns| ns.insert(&batch))
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        // A key too long to be stored is not there: nothing to forget.
        let keys: Vec<_> = keys
            .into_iter()
            .filter(|k| k.len() <= Self::MAX_KEY_LEN)
            .collect();
        if keys.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        self.run("remove keys", move |ns| ns.remove(&keys))
    }

    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        // A key too long to be stored was never recorded here: nothing to take back.
        let keys: Vec<_> = keys
            .into_iter()
            .filter(|(k, _)| k.len() <= Self::MAX_KEY_LEN)
            .collect();
        if keys.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        self.run("take back keys", move |ns| ns.take_back(&keys))
    }

    fn max_key_len(&self) -> usize {
        Self::MAX_KEY_LEN
    }

    fn namespace(&self) -> Option<&str> {
        Some(&self.ns.name)
    }
}

/// Claims, with the same buckets and the same durable commit per call as
/// [`insert`](Store::insert); see [Claims](EmbeddedStore#claims).
impl ClaimStore for EmbeddedStore {
    fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>> {
        if batch.keys.is_empty() {
            return Box::pin(std::future::ready(Ok(Vec::new())));
        }
        if let Some(err) = too_long(batch.keys.iter()) {
            return Box::pin(std::future::ready(Err(err)));
        }
        self.run("claim keys", move |ns| ns.claim(&batch))
    }

    fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>> {
        if keys.is_empty() {
            return Box::pin(std::future::ready(Ok(Vec::new())));
        }
        if let Some(err) = too_long(keys.iter().map(|(k, _)| k)) {
            return Box::pin(std::future::ready(Err(err)));
        }
        self.run("commit claims", move |ns| ns.commit(&keys, ttl))
    }

    fn renew(&self, keys: Vec<HeldKey>, lease: Duration) -> StoreFuture<Vec<bool>> {
        if keys.is_empty() {
            return Box::pin(std::future::ready(Ok(Vec::new())));
        }
        self.run("renew leases", move |ns| {
            // A key too long to be stored was never claimed here: not renewed.
            let (fits, held): (Vec<bool>, Vec<HeldKey>) = {
                let fits: Vec<bool> = keys
                    .iter()
                    .map(|(k, _)| k.len() <= Self::MAX_KEY_LEN)
                    .collect();
                let held = keys
                    .into_iter()
                    .filter(|(k, _)| k.len() <= Self::MAX_KEY_LEN)
                    .collect();
                (fits, held)
            };
            let mut renewed = ns.renew(&held, lease)?.into_iter();
            Ok(fits
                .into_iter()
                .map(|fit| fit && renewed.next().unwrap_or(false))
                .collect())
        })
    }

    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        // A key too long to be stored was never claimed here: nothing to free.
        let keys: Vec<_> = keys
            .into_iter()
            .filter(|(k, _)| k.len() <= Self::MAX_KEY_LEN)
            .collect();
        if keys.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        self.run("release claims", move |ns| ns.release(&keys))
    }
}

/// [`StoreError::KeyTooLong`] for the first key longer than [`EmbeddedStore::MAX_KEY_LEN`].
fn too_long<'a>(mut keys: impl Iterator<Item = &'a Vec<u8>>) -> Option<StoreError> {
    keys.find(|k| k.len() > EmbeddedStore::MAX_KEY_LEN)
        .map(|key| StoreError::KeyTooLong {
            len: key.len(),
            max: EmbeddedStore::MAX_KEY_LEN,
        })
}

/// Checks a namespace (it is part of every bucket's name).
fn check_namespace(namespace: &str) -> Result<(), StoreError> {
    let valid = (1..=MAX_NAMESPACE_LEN).contains(&namespace.len())
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(StoreError::backend(
            "accept the namespace",
            OpenError::Namespace(namespace.to_owned()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_checked() {
        for ok in ["a", "orders", "group-1.payments_eu", &"n".repeat(128)] {
            assert!(check_namespace(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a#b", "a/b", "ü", "a:b", &"n".repeat(129)] {
            let err = check_namespace(bad).unwrap_err().to_string();
            assert!(err.contains(": invalid namespace"), "{err}");
        }
    }
}
