//! Stores: where keys are remembered beyond one process's memory and lifetime.
//!
//! The in-memory [`Window`](crate::Window) is always in front and answers most repeats with no
//! I/O; a store behind it remembers keys across restarts and across consumers. A store is
//! asked about whole batches of keys, one round trip a batch.
//!
//! | store | for | feature |
//! |---|---|---|
//! | `EmbeddedStore` | one process that must remember keys across restarts: a local directory (fjall), buckets by expiry time, a durable commit per batch; claims with leases that survive a restart | `embedded` |
//! | [`MemoryStore`] | tests, and as the reference for the others | (always) |
//! | `PostgresStore` | consumers whose business data lives in PostgreSQL: one table, one statement per batch (`INSERT … SELECT unnest(…) ON CONFLICT`), token-checked claims, expired rows purged in bounded batches in the background | `postgres` |
//! | `MySqlStore` | consumers whose business data lives in MySQL 8 / MariaDB: one table, one multi-row `INSERT … ON DUPLICATE KEY UPDATE` per batch with keys sorted (rows read back only when another request holds one), token-checked claims, and `Claim::commit_with` on the application's own transaction | `mysql` |
//! | `RedisStore` | many consumers on many machines: Redis ≥ 7.0 or Redis Cluster, `SET key token NX GET PX ttl` pipelined per batch | `redis` |
//!
//! Implement [`Store`] for your own database: the contract is in its docs, and the crate's
//! test suite for stores (`tests/support/store_suite.rs`) is written once and run for every
//! backend.

#[cfg(feature = "embedded")]
mod embedded;
mod key;
mod memory;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod tx;

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[cfg(feature = "embedded")]
#[cfg_attr(docsrs, doc(cfg(feature = "embedded")))]
pub use self::embedded::EmbeddedStore;
pub use self::key::StoreKey;
pub use self::memory::MemoryStore;
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use self::mysql::{MySqlStore, MySqlStoreBuilder};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::{PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisStore, RedisStoreBuilder};
pub use self::tx::ClaimTransaction;

/// A boxed error from a store's backend (a database or network error), what the
/// [`StoreError`] constructors take.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A backend error as a [`StoreError`] keeps it: shared, so that the error can be cloned (one
/// failed batch fails each of its items), and kept as the
/// [`source`](std::error::Error::source) so that backend types stay out of this crate's API.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The future a [`Store`] returns: boxed, `Send`, owning everything it needs.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// Why a store call failed.
///
/// Build one with the constructors ([`StoreError::unavailable`], [`StoreError::backend`], …),
/// which take any error. The message names the cause: it includes the backend error's own
/// message, and [`source`](std::error::Error::source) continues below it (the backend error's
/// source, such as the I/O error of a refused connection), so that a chain of errors says each
/// thing once. The backend error itself is the variant's field.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer within the configured timeout. The call may still have been
    /// applied: a retry with the same [`Token`] is safe, and the operators take back the keys of
    /// a call that failed for good (a write still on its way to the store can land after that).
    Timeout(Duration),
    /// The store could not be reached (connection refused or lost, server down).
    Unavailable(SharedError),
    /// The store's data is not what this crate wrote (a corrupt or foreign file).
    Corrupt(SharedError),
    /// The store is locked by another process.
    Locked(SharedError),
    /// This claim no longer holds its key: its lease ran out and another consumer took the
    /// key, so the commit was refused (the other consumer's result stands).
    LeaseLost,
    /// [`Claim::commit_with`](crate::Claim::commit_with) was given a transaction of a database
    /// that is not the claim's store (or the claim has no store behind it).
    NotTransactional(&'static str),
    /// A key is longer than the store accepts.
    KeyTooLong {
        /// The key's length in bytes.
        len: usize,
        /// The store's limit.
        max: usize,
    },
    /// Any other failure of the backend.
    Backend {
        /// What the store was doing.
        operation: &'static str,
        /// The backend's error.
        source: SharedError,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Timeout(limit) => write!(
                f,
                "the store did not answer within {limit:?} (the call may still have been applied)"
            ),
            StoreError::Unavailable(e) => write!(f, "the store is unavailable: {e}"),
            StoreError::Corrupt(e) => {
                write!(
                    f,
                    "the store's data is corrupt or not a stream-dedup store: {e}"
                )
            }
            StoreError::Locked(e) => write!(f, "the store is locked by another process: {e}"),
            StoreError::LeaseLost => {
                f.write_str("the claim's lease ran out and another consumer holds the key")
            }
            StoreError::NotTransactional(why) => write!(
                f,
                "commit_with needs the claim's store to be this database's store: {why}"
            ),
            StoreError::KeyTooLong { len, max } => write!(
                f,
                "a key of {len} bytes is longer than the store's limit of {max} bytes"
            ),
            StoreError::Backend { operation, source } => {
                write!(f, "the store failed to {operation}: {source}")
            }
        }
    }
}

impl std::error::Error for StoreError {
    /// The backend error's own source: the backend error's message is part of this one's.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Unavailable(e)
            | StoreError::Corrupt(e)
            | StoreError::Locked(e)
            | StoreError::Backend { source: e, .. } => e.source(),
            StoreError::Timeout(_)
            | StoreError::LeaseLost
            | StoreError::NotTransactional(_)
            | StoreError::KeyTooLong { .. } => None,
        }
    }
}

impl StoreError {
    /// A [`StoreError::Backend`]: the store failed to do `operation` (e.g. `"insert keys"`).
    pub fn backend(operation: &'static str, source: impl Into<BoxError>) -> Self {
        StoreError::Backend {
            operation,
            source: Arc::from(source.into()),
        }
    }

    /// A [`StoreError::Unavailable`]: the store could not be reached.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        StoreError::Unavailable(Arc::from(source.into()))
    }

    /// A [`StoreError::Corrupt`]: the store's data is not what this crate wrote.
    pub fn corrupt(source: impl Into<BoxError>) -> Self {
        StoreError::Corrupt(Arc::from(source.into()))
    }

    /// A [`StoreError::Locked`]: another process holds the store.
    pub fn locked(source: impl Into<BoxError>) -> Self {
        StoreError::Locked(Arc::from(source.into()))
    }

    /// Whether trying again later may succeed (timeouts and unavailability), as opposed to
    /// errors that will not go away by themselves (corruption, a key too long).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Timeout(_) | StoreError::Unavailable(_) | StoreError::Backend { .. }
        )
    }
}

/// Identifies one batch of one operator, so that a store can tell "recorded by this very
/// request" from "recorded by someone else".
///
/// A store call that timed out may have been applied anyway (Redis measured here: 500 of 500
/// keys written after a client-side timeout). The operator retries with the **same** token, and
/// the store answers [`Inserted::New`] for a key that holds this token, so a retry never turns
/// a new message into a false duplicate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(u128);

impl Token {
    /// A token unique to this process and call: 128 bits from a per-process random seed, the
    /// process id and a counter.
    pub fn new() -> Token {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static SEED: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
        let seed = SEED.get_or_init(std::hash::RandomState::new);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let half = |salt: u64| {
            let mut h = seed.build_hasher();
            h.write_u64(salt);
            h.write_u32(std::process::id());
            h.write_u64(n);
            h.finish()
        };
        Token((u128::from(half(1)) << 64) | u128::from(half(2)))
    }

    /// A token with a given value (for stores that read one back).
    pub fn from_u128(value: u128) -> Token {
        Token(value)
    }

    /// The token as a number.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// The token's 16 bytes, big-endian.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl Default for Token {
    fn default() -> Self {
        Token::new()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({:032x})", self.0)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// One request to [`Store::insert`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct InsertBatch {
    /// The keys, encoded with [`StoreKey`]; never two equal keys in one batch.
    pub keys: Vec<Vec<u8>>,
    /// How long the store must remember each key it records (from now).
    pub ttl: Duration,
    /// This request's token; the same on every retry of it.
    pub token: Token,
}

impl InsertBatch {
    /// A batch of distinct `keys` to remember for `ttl`, with a fresh token.
    pub fn new(keys: Vec<Vec<u8>>, ttl: Duration) -> Self {
        InsertBatch {
            keys,
            ttl,
            token: Token::new(),
        }
    }

    /// The same batch with `token` (to retry an earlier request).
    pub fn with_token(mut self, token: Token) -> Self {
        self.token = token;
        self
    }
}

/// What [`Store::insert`] found for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Inserted {
    /// The key was absent (or held this batch's own token): it is recorded now. Accept the item.
    New,
    /// The key was already recorded by another request: the item is a duplicate.
    Present,
}

/// A store of keys behind the in-memory window, shared by every operator that holds a clone.
///
/// # Contract
///
/// - [`insert`](Store::insert) records each key of the batch **atomically per key**: of any
///   number of concurrent requests for one key, from any number of processes, exactly one
///   gets [`Inserted::New`] (until the key expires or is removed). A key that already holds
///   the request's own [`Token`] answers `New` again (a retry of a request that timed out).
///   The answers are in the order of the keys.
/// - A recorded key is remembered for the batch's `ttl`, then forgotten, without the store
///   scanning all its keys to find it.
/// - A store that answers `Ok` has made the keys durable as far as it promises durability
///   (a file store: committed to disk) before it answers.
/// - [`remove`](Store::remove) forgets keys (a key that is absent is not an error);
///   [`take_back`](Store::take_back) forgets only keys that still hold the given token.
/// - A key longer than [`max_key_len`](Store::max_key_len) is never sent by the operators.
/// - Errors are [`StoreError`]s, never panics; a failed call leaves every key either recorded
///   or not, and the operator applies the user's failure policy.
/// - Keys of two stores with different namespaces never meet.
///
/// Claims (keys in flight with a lease, then done) extend this trait: a store that offers them
/// implements [`ClaimStore`] too, and the claim operators take only such stores (checked at
/// compile time).
pub trait Store: fmt::Debug + Send + Sync + 'static {
    /// Records the keys that are absent; answers, per key, whether it was new.
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>>;

    /// Forgets `keys`.
    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()>;

    /// Takes back keys that their tokens still hold: each key recorded with the given token (by
    /// an insert, a claim or a commit made with it) is forgotten; a key that another token
    /// holds, or that is absent, is left alone.
    ///
    /// The operators take back the keys of items they read ahead but never emitted (the
    /// operator was dropped: `take`, `select!`, a cancelled task, shutdown), and the keys of a
    /// call that failed for good under fail closed (it may have been applied after its timeout),
    /// so that the broker's redelivery is processed. An operator being dropped polls this future
    /// once at once, then runs it to its end on the tokio runtime if there is one: a store
    /// should start its work when first polled.
    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()>;

    /// The longest key, in bytes, that this store accepts (default: no limit). The operators
    /// never send a longer key: its item alone gets the failure policy with
    /// [`StoreError::KeyTooLong`], and the rest of its batch is unaffected.
    fn max_key_len(&self) -> usize {
        usize::MAX
    }

    /// The namespace that keeps this store's keys apart from those of other stores on the
    /// same database, if it has one (default: none). The operators name it in their log
    /// events (the `namespace` field); it must not hold a secret.
    fn namespace(&self) -> Option<&str> {
        None
    }
}

/// One request to [`ClaimStore::claim`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClaimBatch {
    /// The keys, encoded with [`StoreKey`]; never two equal keys in one batch.
    pub keys: Vec<Vec<u8>>,
    /// How long a claimed key stays in flight if its claim is neither committed nor released
    /// (its owner died).
    pub lease: Duration,
    /// This request's token; the same on every retry of it. Commits and releases of these
    /// keys present it.
    pub token: Token,
    /// How long a key will be kept once committed (the ttl its commit will give), or zero
    /// when unknown. A store may shape the in-flight record by it: the Redis store gives the
    /// key an expiry of ttl + lease at once, so that a commit with this ttl keeps it.
    pub ttl: Duration,
}

impl ClaimBatch {
    /// A batch of distinct `keys` to claim for `lease`, with a fresh token.
    pub fn new(keys: Vec<Vec<u8>>, lease: Duration) -> Self {
        ClaimBatch {
            keys,
            lease,
            token: Token::new(),
            ttl: Duration::ZERO,
        }
    }

    /// The same batch with the `ttl` its keys will be committed with (see
    /// [`ttl`](ClaimBatch::ttl)).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The same batch with `token` (to retry an earlier request).
    pub fn with_token(mut self, token: Token) -> Self {
        self.token = token;
        self
    }
}

/// What [`ClaimStore::claim`] found for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Claimed {
    /// The key was free (or already held by this batch's token): it is now in flight, ours.
    Mine,
    /// Another claim holds the key and its lease has not run out.
    InFlight,
    /// The key was committed: the item is a duplicate.
    Done,
}

/// A key with the token of the claim that holds it, for [`ClaimStore::commit`] and
/// [`ClaimStore::release`].
pub type HeldKey = (Vec<u8>, Token);

/// Claims: a key is **free**, **in flight** (claimed, with a lease, by a token) or **done**
/// (committed, kept for a ttl).
///
/// # Contract
///
/// - [`claim`](ClaimStore::claim), atomically per key: a free key (or one whose lease ran
///   out) becomes in flight with the batch's token and answers [`Claimed::Mine`]; a key in
///   flight with the **same** token answers `Mine` too (a retry); a key in flight with another
///   token answers [`Claimed::InFlight`]; a done key answers [`Claimed::Done`].
/// - [`commit`](ClaimStore::commit): a key in flight with the given token (or free again, or
///   done by the same token) becomes done for `ttl` (a store that sizes the in-flight record
///   by [`ClaimBatch::ttl`] may keep it until that ttl + the lease after the claim instead,
///   which is at least `ttl` after a commit made within the lease), and answers `true`; a key
///   another token holds or committed answers `false` (this claim's lease ran out and someone else took
///   the key): a consumer never overwrites a key it no longer holds.
/// - [`release`](ClaimStore::release): a key in flight with the given token becomes free;
///   any other key is left alone.
/// - [`renew`](ClaimStore::renew): a key in flight with the given token stays in flight for
///   the new lease from now; any other key is left alone and answers `false`.
/// - [`Store::insert`] records keys as done, and counts an in-flight key as present.
pub trait ClaimStore: Store {
    /// Claims the keys; answers per key.
    fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>>;

    /// Marks keys done for `ttl`; answers, per key, whether this claim still held it.
    fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>>;

    /// Frees keys that these claims still hold.
    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()>;

    /// Extends the lease of keys that these claims still hold: each key in flight with the
    /// given token stays in flight for `lease` from now, and answers `true`; a key that another
    /// claim took over (or that is done or free) is left alone and answers `false`. The claims
    /// keep their open claims' leases alive with it (`Window::keep_alive`).
    fn renew(&self, keys: Vec<HeldKey>, lease: Duration) -> StoreFuture<Vec<bool>>;
}

macro_rules! forward_store {
    ($($ptr:ident),*) => {$(
        impl<S: Store + ?Sized> Store for $ptr<S> {
            fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
                (**self).insert(batch)
            }

            fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
                (**self).remove(keys)
            }

            fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
                (**self).take_back(keys)
            }

            fn max_key_len(&self) -> usize {
                (**self).max_key_len()
            }

            fn namespace(&self) -> Option<&str> {
                (**self).namespace()
            }
        }

        impl<S: ClaimStore + ?Sized> ClaimStore for $ptr<S> {
            fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>> {
                (**self).claim(batch)
            }

            fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>> {
                (**self).commit(keys, ttl)
            }

            fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
                (**self).release(keys)
            }

            fn renew(&self, keys: Vec<HeldKey>, lease: Duration) -> StoreFuture<Vec<bool>> {
                (**self).renew(keys, lease)
            }
        }
    )*};
}
forward_store!(Arc, Box);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct() {
        let a = Token::new();
        let b = Token::new();
        assert_ne!(a, b);
        assert_eq!(Token::from_u128(a.as_u128()), a);
        assert_eq!(a.to_string().len(), 32);
    }

    /// An error that names its cause as its source.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn errors_say_what_happened() {
        let e = StoreError::KeyTooLong { len: 10, max: 5 };
        assert_eq!(
            e.to_string(),
            "a key of 10 bytes is longer than the store's limit of 5 bytes"
        );
        assert!(!e.is_transient());
        assert!(StoreError::Timeout(Duration::from_millis(5)).is_transient());
        let e = StoreError::unavailable("connection refused");
        assert_eq!(
            e.clone().to_string(),
            "the store is unavailable: connection refused"
        );
        // Said once: the message holds the backend's, the source goes on below it.
        assert!(std::error::Error::source(&e).is_none());
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = StoreError::backend("insert keys", Wrapped(io));
        assert_eq!(e.to_string(), "the store failed to insert keys: wrapped");
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("connection refused"));
    }
}
