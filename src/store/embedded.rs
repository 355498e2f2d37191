use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{
    BoxError, ClaimBatch, ClaimStore, Claimed, HeldKey, InsertBatch, Inserted, Store, StoreError,
    StoreFuture,
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
///   (`fsync`, [`PersistMode::SyncAll`]) before its future resolves `Ok`. A key that one call
///   found recorded by another call still in progress is answered only after this call's own
///   sync, which covers the other call's write too (the journal is one sequential file).
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
        Box::pin(async move {
            let work = move || f(&ns);
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

// ---- Format ----

/// The keyspace that marks a directory as this crate's store.
const MARKER_KEYSPACE: &str = "stream-dedup";
const MARKER_KEY: &[u8] = b"format";
/// The marker of a store whose records are all done (24-byte values): every store that never
/// held a claim in flight, and every store written before claims existed.
const FORMAT_1: &[u8] = b"stream-dedup embedded 1";
/// The marker of a store that may hold records in flight (25-byte values). Written with the
/// first claim, so that a version of this crate that knows only format 1 refuses the store at
/// open instead of failing on a record it cannot read. Changes whenever the format changes.
const FORMAT_2: &[u8] = b"stream-dedup embedded 2";
/// Bucket keyspaces are named `{BUCKET_PREFIX}{namespace}#{exp}#{index}`.
const BUCKET_PREFIX: &str = "dedup#";
/// The byte before each key (fjall refuses empty keys; it leaves room for other records).
const KEY_TAG: u8 = 0;
/// A done record: token (16 bytes) + expiry in ms (8 bytes).
const DONE_LEN: usize = 24;
/// A record in flight: [`IN_FLIGHT_TAG`] + token (16 bytes) + end of the lease in ms (8 bytes).
const IN_FLIGHT_LEN: usize = 1 + DONE_LEN;
/// The first byte of a record in flight (`c`, as `RedisStore` marks its claims).
const IN_FLIGHT_TAG: u8 = b'c';
const MAX_NAMESPACE_LEN: usize = 128;
/// The narrowest bucket: 2^10 ms = 1.024 s.
const MIN_BUCKET_EXP: u32 = 10;
/// Buckets per ttl (before rounding the width down to a power of two).
const BUCKETS_PER_TTL: u64 = 8;

fn stored_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    out.push(KEY_TAG);
    out.extend_from_slice(key);
    out
}

/// What a key's record says: done or in flight, by which token, until when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    /// In flight (claimed, not yet committed); otherwise done.
    in_flight: bool,
    token: u128,
    /// The end of the ttl (done) or of the lease (in flight), in ms since the Unix epoch.
    expires_ms: u64,
}

impl Record {
    fn done(token: u128, expires_ms: u64) -> Record {
        Record {
            in_flight: false,
            token,
            expires_ms,
        }
    }

    fn in_flight(token: u128, expires_ms: u64) -> Record {
        Record {
            in_flight: true,
            token,
            expires_ms,
        }
    }

    /// 24 bytes (done, the format of every version) or 25 (in flight).
    fn encode(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(IN_FLIGHT_LEN);
        if self.in_flight {
            out.push(IN_FLIGHT_TAG);
        }
        out.extend_from_slice(&self.token.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out
    }

    /// The record, or `None` for a value this crate did not write.
    fn decode(value: &[u8]) -> Option<Record> {
        let (in_flight, rest) = match value.len() {
            DONE_LEN => (false, value),
            IN_FLIGHT_LEN if value.first() == Some(&IN_FLIGHT_TAG) => (true, value.get(1..)?),
            _ => return None,
        };
        let token = u128::from_be_bytes(rest.get(..16)?.try_into().ok()?);
        let expires_ms = u64::from_be_bytes(rest.get(16..DONE_LEN)?.try_into().ok()?);
        Some(Record {
            in_flight,
            token,
            expires_ms,
        })
    }
}

/// One bucket: the keys whose expiry time lies in `[index << exp, (index + 1) << exp)` ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct BucketId {
    exp: u32,
    index: u64,
}

impl BucketId {
    /// The bucket of a done key: about an eighth of its ttl wide.
    fn for_key(expires_ms: u64, ttl_ms: u64) -> BucketId {
        BucketId::of_width(expires_ms, ttl_ms / BUCKETS_PER_TTL)
    }

    /// The bucket of a key in flight: about one lease wide, so that the short-lived leases
    /// keep two or three buckets live, not a dozen more for every lookup to ask.
    fn for_lease(expires_ms: u64, lease_ms: u64) -> BucketId {
        BucketId::of_width(expires_ms, lease_ms)
    }

    /// The bucket of `expires_ms` among buckets `width_ms` wide, rounded down to a power of two
    /// (at least 2^[`MIN_BUCKET_EXP`] ms).
    fn of_width(expires_ms: u64, width_ms: u64) -> BucketId {
        let exp = width_ms
            .checked_ilog2()
            .unwrap_or(0)
            .clamp(MIN_BUCKET_EXP, 62);
        BucketId {
            exp,
            index: expires_ms >> exp,
        }
    }

    /// The first moment (ms) after every expiry time of this bucket.
    fn end_ms(self) -> u64 {
        self.index.saturating_add(1).saturating_mul(1 << self.exp)
    }

    fn name(self, namespace: &str) -> String {
        format!("{BUCKET_PREFIX}{namespace}#{}#{}", self.exp, self.index)
    }

    fn parse(name: &str, namespace: &str) -> Option<BucketId> {
        let rest = name.strip_prefix(BUCKET_PREFIX)?.strip_prefix(namespace)?;
        let (exp, index) = rest.strip_prefix('#')?.split_once('#')?;
        let id = BucketId {
            exp: exp.parse().ok()?,
            index: index.parse().ok()?,
        };
        (id.name(namespace) == name).then_some(id)
    }
}

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

fn now_ms() -> u64 {
    // A clock before 1970 counts as 1970: keys then simply live longer.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

// ---- Errors ----

/// What went wrong, as the source of a [`StoreError`].
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error(
        "invalid namespace {0:?}: use 1 to {MAX_NAMESPACE_LEN} ASCII letters, digits, '-', '_' or '.'"
    )]
    Namespace(String),
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{} is neither empty nor a stream-dedup store", .0.display())]
    Foreign(PathBuf),
    #[error("{} holds a fjall database that stream-dedup did not write", .0.display())]
    ForeignDatabase(PathBuf),
    #[error("{} is a stream-dedup store of another format: {found:?}", path.display())]
    Format { path: PathBuf, found: String },
    #[error("{} has lost its format marker (its journal is damaged)", .0.display())]
    LostMarker(PathBuf),
    #[error("a value of {0} bytes is not a stream-dedup record")]
    Value(usize),
    #[error("fjall failed on {}", path.display())]
    Fjall {
        path: PathBuf,
        #[source]
        source: fjall::Error,
    },
    #[error("fjall panicked on {}: {message}", path.display())]
    Panicked { path: PathBuf, message: String },
}

// The variants that wrap a backend error are built here only; `.into()` also fits a variant
// that holds the error shared rather than boxed.
#[allow(clippy::useless_conversion, reason = "see above")]
fn corrupt(e: impl Into<BoxError>) -> StoreError {
    let e: BoxError = e.into();
    StoreError::Corrupt(e.into())
}

#[allow(clippy::useless_conversion, reason = "see `corrupt`")]
fn locked(e: impl Into<BoxError>) -> StoreError {
    let e: BoxError = e.into();
    StoreError::Locked(e.into())
}

#[allow(clippy::useless_conversion, reason = "see `corrupt`")]
fn unavailable(e: impl Into<BoxError>) -> StoreError {
    let e: BoxError = e.into();
    StoreError::Unavailable(e.into())
}

/// Sorts a fjall error into the [`StoreError`] it is.
fn fjall_error(operation: &'static str, path: &Path, e: fjall::Error) -> StoreError {
    use fjall::Error as F;
    let io = match &e {
        F::Io(io) | F::Storage(fjall::LsmError::Io(io)) => Some(io.kind()),
        _ => None,
    };
    let kind = match (&e, io) {
        (F::Locked, _) => Kind::Locked,
        (_, Some(io::ErrorKind::PermissionDenied)) => Kind::Unavailable,
        // A file that the database refers to is gone: damaged, whenever it is found.
        (
            _,
            Some(
                io::ErrorKind::NotFound | io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof,
            ),
        ) => Kind::Corrupt,
        (_, Some(_)) | (F::Poisoned | F::KeyspaceDeleted, None) => Kind::Backend,
        // Decoding, checksums, versions, journal recovery: the files are not what fjall wrote.
        (_, None) => Kind::Corrupt,
    };
    let e = OpenError::Fjall {
        path: path.to_owned(),
        source: e,
    };
    match kind {
        Kind::Locked => locked(e),
        Kind::Corrupt => corrupt(e),
        Kind::Unavailable => unavailable(e),
        Kind::Backend => StoreError::backend(operation, e),
    }
}

enum Kind {
    Locked,
    Corrupt,
    Unavailable,
    Backend,
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---- The database: one per directory and process ----

/// The directories this process has open, so that a second `open` shares the database (fjall
/// locks its directory, against this process too).
fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<Db>>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Weak<Db>>>> = OnceLock::new();
    OPEN.get_or_init(Mutex::default)
}

struct Db {
    /// The canonical path, the key in [`registry`].
    path: PathBuf,
    /// `Some` until dropped.
    db: Option<Database>,
    namespaces: Mutex<HashMap<String, Weak<Namespace>>>,
    /// Whether the marker says [`FORMAT_2`] (records in flight may be written).
    claims_format: AtomicBool,
}

impl Db {
    fn open(path: &Path) -> Result<Arc<Db>, StoreError> {
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

struct Namespace {
    db: Arc<Db>,
    name: String,
    /// The live buckets. The lock is held for the check-and-insert of one batch.
    buckets: Mutex<BTreeMap<BucketId, Keyspace>>,
    /// The width (log2 ms) of the buckets the last claim wrote to, or 0 before the first claim:
    /// where commits and releases look first (a key they present is most likely in flight).
    lease_exp: AtomicU32,
}

impl Namespace {
    fn open(db: Arc<Db>, name: &str) -> Result<Arc<Namespace>, StoreError> {
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

    fn insert(&self, batch: &InsertBatch) -> Result<Vec<Inserted>, StoreError> {
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

    fn remove(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
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

    fn claim(&self, batch: &ClaimBatch) -> Result<Vec<Claimed>, StoreError> {
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

    fn commit(&self, held: &[HeldKey], ttl: Duration) -> Result<Vec<bool>, StoreError> {
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

    fn release(&self, held: &[HeldKey]) -> Result<(), StoreError> {
        let first = self.lease_exp.load(Ordering::Relaxed);
        self.write(
            "release claims",
            SyncWhen::IfWritten,
            |buckets, write, now| {
                for (key, token) in held {
                    let key = stored_key(key);
                    let Some((id, r)) = self.find(buckets, &key, now, first)? else {
                        continue;
                    };
                    match buckets.get(&id) {
                        Some(bucket) if r.in_flight && r.token == token.as_u128() => {
                            write.remove(bucket, key);
                        }
                        _ => {}
                    }
                }
                Ok(())
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The on-disk format: these must never change without a new format marker.
    #[test]
    fn golden_format() {
        assert_eq!(FORMAT_1, b"stream-dedup embedded 1");
        assert_eq!(FORMAT_2, b"stream-dedup embedded 2");
        assert_eq!(stored_key(b""), [0]);
        assert_eq!(stored_key(b"ab"), [0, b'a', b'b']);
        let token = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10_u128;
        let expires = 0x1122_3344_5566_7788;
        // Done: the format 1 value, unchanged.
        let done = Record::done(token, expires).encode();
        assert_eq!(
            done,
            [
                1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, //
                0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88
            ]
        );
        assert_eq!(Record::decode(&done), Some(Record::done(token, expires)));
        // In flight: `c`, then the same.
        let in_flight = Record::in_flight(token, expires).encode();
        assert_eq!(in_flight[0], b'c');
        assert_eq!(in_flight[1..], done[..]);
        assert_eq!(
            Record::decode(&in_flight),
            Some(Record::in_flight(token, expires))
        );
        // Anything else is not a record.
        assert_eq!(Record::decode(&done[..23]), None);
        assert_eq!(Record::decode(&[0; 25]), None);
        assert_eq!(Record::decode(&[b'c'; 26]), None);
        assert_eq!(Record::decode(&[]), None);
        let id = BucketId::for_key(1_700_000_000_000, 300_000);
        assert_eq!(id.exp, 15); // 300 s / 8 = 37.5 s → 32.768 s
        assert_eq!(id.name("orders"), "dedup#orders#15#51879882");
        assert_eq!(
            BucketId::parse("dedup#orders#15#51879882", "orders"),
            Some(id)
        );
    }

    #[test]
    fn bucket_widths() {
        // Short ttls share the narrowest bucket.
        assert_eq!(BucketId::for_key(5_000, 0).exp, MIN_BUCKET_EXP);
        assert_eq!(BucketId::for_key(5_000, 300).exp, MIN_BUCKET_EXP);
        assert_eq!(BucketId::for_key(5_000, 8_191).exp, MIN_BUCKET_EXP);
        assert_eq!(BucketId::for_key(5_000, 16_384).exp, 11);
        // A day: 3 h → 2^23 ms ≈ 2.3 h.
        assert_eq!(BucketId::for_key(5_000, 86_400_000).exp, 23);
        // The largest ttl does not overflow.
        let huge = BucketId::for_key(u64::MAX, u64::MAX);
        assert_eq!(huge.exp, 60);
        assert_eq!(huge.end_ms(), u64::MAX);
        // Every key of a bucket expires before the bucket ends.
        for expires in [0, 1, 1023, 1024, 1_700_000_000_123] {
            let id = BucketId::for_key(expires, 60_000);
            assert!(id.index << id.exp <= expires && expires < id.end_ms());
            let id = BucketId::for_lease(expires, 30_000);
            assert!(id.index << id.exp <= expires && expires < id.end_ms());
        }
        // A lease's bucket is about one lease wide: 30 s → 2^14 ms ≈ 16.4 s, so two or three
        // are live; short leases share the narrowest bucket.
        assert_eq!(BucketId::for_lease(5_000, 30_000).exp, 14);
        assert_eq!(BucketId::for_lease(5_000, 0).exp, MIN_BUCKET_EXP);
        assert_eq!(BucketId::for_lease(5_000, 300).exp, MIN_BUCKET_EXP);
        assert_eq!(BucketId::for_lease(u64::MAX, u64::MAX).end_ms(), u64::MAX);
    }

    #[test]
    fn bucket_names_belong_to_one_namespace() {
        let id = BucketId { exp: 12, index: 7 };
        assert_eq!(BucketId::parse(&id.name("a"), "a"), Some(id));
        assert_eq!(BucketId::parse(&id.name("a.b"), "a"), None);
        assert_eq!(BucketId::parse(&id.name("a"), "a.b"), None);
        assert_eq!(BucketId::parse("dedup#a#12#07", "a"), None);
        assert_eq!(BucketId::parse("dedup#a#12", "a"), None);
        assert_eq!(BucketId::parse("stream-dedup", "a"), None);
    }

    #[test]
    fn namespaces_are_checked() {
        for ok in ["a", "orders", "group-1.payments_eu", &"n".repeat(128)] {
            assert!(check_namespace(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a#b", "a/b", "ü", "a:b", &"n".repeat(129)] {
            let err = check_namespace(bad).unwrap_err();
            let source = std::error::Error::source(&err).unwrap().to_string();
            assert!(source.starts_with("invalid namespace"), "{source}");
        }
    }

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
