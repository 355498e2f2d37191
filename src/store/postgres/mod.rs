//! [`PostgresStore`]: keys in a PostgreSQL table, next to the business data.

mod batch;
mod builder;
mod calls;
mod error;
mod purge;
mod sql;
#[cfg(test)]
mod tests;
mod tx;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use self::batch::SortedHeld;
pub use self::builder::PostgresStoreBuilder;
use self::sql::{Statements, micros};
use crate::store::{
    ClaimBatch, ClaimStore, Claimed, HeldKey, InsertBatch, Inserted, Store, StoreError,
    StoreFuture, Token,
};

/// How long a call waits past the statement timeout before it stops waiting: long enough for
/// the server's own cancellation (which says "not applied") to arrive first.
const GRACE: Duration = Duration::from_millis(100);
/// The most times one call sends its statement (again after a lost connection).
const ATTEMPTS: u32 = 3;

/// A store in a PostgreSQL table, shared by every consumer that uses the same namespace: for
/// consumers whose business data lives in PostgreSQL.
///
/// One table (default `stream_dedup_keys`) holds one row per key: its namespace, its bytes,
/// the [`Token`] of the request that wrote it, whether it is done (committed, or recorded by
/// [`insert`](Store::insert)) or in flight (claimed), and when it expires, by the server's
/// clock (`clock_timestamp()`), so that the consumers' clocks never matter. A row past its
/// expiry counts as absent at once.
///
/// # One statement per batch
///
/// Each call is one statement on one connection of the store's pool, whatever the batch's
/// size (a claim that finds keys held by others adds one read-only statement for those), and
/// at most [`max_connections`](PostgresStoreBuilder::max_connections) calls run at once.
/// [`insert`](Store::insert) and [`claim`](ClaimStore::claim) send the keys as one array:
///
/// ```sql
/// INSERT INTO stream_dedup_keys AS d (namespace, key, token, done, expires_at, purge_at)
/// SELECT $1, k, $3::uuid, true, n.e, n.e + $5 * interval '1 microsecond'
/// FROM unnest($2::bytea[]) AS k,
///      (SELECT clock_timestamp() + $4 * interval '1 microsecond' AS e) AS n
/// ORDER BY k
/// ON CONFLICT (namespace, key) DO UPDATE
/// SET token = excluded.token, done = excluded.done, expires_at = excluded.expires_at,
///     purge_at = greatest(d.purge_at, excluded.purge_at)
/// WHERE d.expires_at <= clock_timestamp()               -- expired: absent, taken
///    OR (d.token = excluded.token AND d.done)           -- this request's own (a retry)
/// RETURNING key
/// ```
///
/// - **Atomic per key**: PostgreSQL's unique index and row lock decide which of any number of
///   concurrent requests writes a key. A returned key is this request's ([`Inserted::New`],
///   [`Claimed::Mine`]); any other key is held by another request, and is left as it is (not
///   rewritten: a duplicate costs a row lock, not a new row version): [`Inserted::Present`].
///   For claims, those keys are then read in a second, read-only statement (only when there
///   are any) to tell [`Claimed::Done`] from [`Claimed::InFlight`]; a key that is gone by then
///   was held when the claim found it, and answers `InFlight`. Answers come back in the
///   input's order.
/// - **No deadlocks**: the keys are sorted (and made distinct) before they are sent, and
///   `ORDER BY k` keeps that order, so two batches that share keys lock their rows in the same
///   order, whatever order their items came in. Releases and removals lock in key order too.
/// - **Retries are recognised**: a key that holds the request's own token is written again
///   (its expiry counted from the retry) and answers `New` / `Mine`, so a call that timed out
///   after the server applied it, sent again with the same token, never turns a new message
///   into a false duplicate.
/// - [`commit`](ClaimStore::commit) upserts the keys as done where the row holds the claim's
///   token, has expired, or is missing, and answers `false` for the others (another claim took
///   the key after this one's lease ran out). [`release`](ClaimStore::release) deletes the
///   rows still in flight with the claim's token; [`remove`](Store::remove) deletes the rows.
///
/// # The table
///
/// The store creates the table and its index when they are missing (`IF NOT EXISTS`, under a
/// transaction-scoped advisory lock, so that consumers starting at once do not collide). For
/// teams that run their migrations themselves (then
/// [`create_table(false)`](PostgresStoreBuilder::create_table)):
///
/// ```sql
/// CREATE TABLE stream_dedup_keys (
///     namespace  text        NOT NULL,
///     key        bytea       NOT NULL,
///     token      uuid        NOT NULL,
///     done       boolean     NOT NULL,
///     expires_at timestamptz NOT NULL,
///     purge_at   timestamptz NOT NULL,
///     PRIMARY KEY (namespace, key)
/// ) WITH (fillfactor = 80);
/// CREATE INDEX stream_dedup_keys_purge_at ON stream_dedup_keys (purge_at);
/// ```
///
/// `expires_at` is when the row stops counting; `purge_at`, never before it, is when the purge
/// may delete it, and the only time the index holds. A claim sets `purge_at` past its lease
/// and the ttl its commit will give, so that the commit, which moves `expires_at`, and
/// renewals within that ttl change no indexed column: they are HOT updates (no new index
/// entries, about a fifth of the WAL of an update that indexes, the old version pruned in
/// place), with room for them in each page (`fillfactor = 80`).
///
/// **What a key costs**, measured with `pg_total_relation_size` after 1,000,000 keys written
/// by [`insert`](Store::insert) in batches of 1,000 (namespace `payments`, PostgreSQL 15, after
/// `VACUUM`): **232 bytes** per 36-byte key (a UUID as text): 137 in the table (a fifth of its
/// pages kept free for updates), 89 in the primary key (random keys leave its pages ~70%
/// full), 6 in the purge index (a batch's keys share one `purge_at`, which the index stores
/// once); **166 bytes** per 8-byte key (106 + 53 + 6). A claimed key that is then committed
/// leaves one dead row version, pruned from its page on a later visit.
///
/// # Expiry and the purge
///
/// A row past `expires_at` counts as absent for every statement at once; deleting it is only
/// housekeeping. A background task (see
/// [`purge_interval`](PostgresStoreBuilder::purge_interval)) deletes expired rows — of every
/// namespace of the table — in bounded batches through the purge index, never with an
/// unbounded `DELETE`, and never on a call's path:
///
/// ```sql
/// DELETE FROM stream_dedup_keys WHERE ctid = ANY(ARRAY(
///     SELECT ctid FROM stream_dedup_keys WHERE purge_at < statement_timestamp()
///     AND expires_at < statement_timestamp()
///     ORDER BY purge_at LIMIT 1000 FOR UPDATE SKIP LOCKED))
/// ```
///
/// # Keys and failures
///
/// - Keys are bytes (`bytea`): empty and binary keys are keys like any other. The longest key
///   is what PostgreSQL's btree index takes in one row with the namespace: 2,688 bytes less
///   the namespace's length, about (see [`max_key_len`](PostgresStore::max_key_len)). A call
///   with a longer key fails whole with [`StoreError::KeyTooLong`] before anything is sent;
///   give the operator that limit ([`StoreWindow::max_key_len`](crate::StoreWindow::max_key_len))
///   and such a key fails alone, the rest of its batch unaffected, or use a
///   [`Fingerprint`](crate::Fingerprint).
/// - A refused or lost connection, or a server shutting down, fails the call with
///   [`StoreError::Unavailable`], the sqlx error (naming the cause) as its source; a
///   statement cancelled by the statement timeout with [`StoreError::Timeout`]; any other
///   database error with [`StoreError::Backend`]. A call whose connection turns out to be lost
///   is sent again on another connection (three attempts at most): every statement is safe
///   to repeat. No call panics.
///
/// Clones share one pool and one purge task; `Debug` shows the namespace, the table and the
/// settings, never the URL or its credentials.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use stream_dedup::store::{InsertBatch, Inserted, PostgresStore, Store};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/test", "payments").await?;
/// let ttl = Duration::from_secs(3600);
/// let keys = vec![b"12345/payment".to_vec(), b"12346/payment".to_vec()];
/// let answers = store.insert(InsertBatch::new(keys, ttl)).await?;
/// if answers[0] == Inserted::Present {
///     println!("order 12345 was paid already");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    namespace: Box<str>,
    /// As given to the builder (unquoted).
    table: Box<str>,
    sql: Statements,
    max_key_len: usize,
    statement_timeout: Duration,
    acquire_timeout: Duration,
    purge_interval: Option<Duration>,
    purge_batch: usize,
    /// Stops the purge when the last clone goes.
    purge_task: Option<purge::PurgeTask>,
    /// Rate limit of the warnings about connections found lost.
    reconnects: std::sync::Mutex<crate::logging::Limiter>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("PostgresStore")
            .field("namespace", &inner.namespace)
            .field("table", &inner.table)
            .field("max_key_len", &inner.max_key_len)
            .field("statement_timeout", &inner.statement_timeout)
            .field("acquire_timeout", &inner.acquire_timeout)
            .field("purge_interval", &inner.purge_interval)
            .field("purge_batch", &inner.purge_batch)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the PostgreSQL at `url` (`postgres://user:password@host:port/database`)
    /// with the default settings, and creates the table `stream_dedup_keys` if it is missing.
    ///
    /// Shorthand for [`PostgresStore::builder(namespace).connect(url)`](PostgresStoreBuilder::connect).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when no connection can be made (the cause is the source),
    /// [`StoreError::Backend`] for a malformed URL or a table that cannot be created.
    ///
    /// # Panics
    ///
    /// If `namespace` holds a NUL character or is longer than 255 bytes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use stream_dedup::store::PostgresStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), stream_dedup::store::StoreError> {
    /// let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/test", "payments").await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str, namespace: &str) -> Result<PostgresStore, StoreError> {
        PostgresStore::builder(namespace).connect(url).await
    }

    /// Uses `pool`, the application's own sqlx pool (so that the business writes and the store
    /// share connections), with the default settings, and creates the table if it is missing.
    ///
    /// Shorthand for [`PostgresStore::builder(namespace).pool(pool)`](PostgresStoreBuilder::pool).
    ///
    /// # Errors
    ///
    /// As [`connect`](PostgresStore::connect).
    ///
    /// # Panics
    ///
    /// As [`connect`](PostgresStore::connect).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use stream_dedup::sqlx::PgPool;
    /// use stream_dedup::store::PostgresStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
    /// let store = PostgresStore::from_pool(pool.clone(), "payments").await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn from_pool(pool: PgPool, namespace: &str) -> Result<PostgresStore, StoreError> {
        PostgresStore::builder(namespace).pool(pool).await
    }

    /// A builder, for the table's name, the timeouts and the purge.
    ///
    /// # Panics
    ///
    /// If `namespace` holds a NUL character or is longer than 255 bytes.
    #[track_caller]
    pub fn builder(namespace: &str) -> PostgresStoreBuilder {
        PostgresStoreBuilder::new(namespace)
    }

    /// The namespace: the first column of this store's rows.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The table, as given to the builder.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// The longest key this store takes, in bytes: what fits, with the namespace, in one row
    /// of the primary key's index (2,688 bytes less the namespace's length, rounded to
    /// PostgreSQL's alignment, with 8 KiB pages). Longer keys fail with
    /// [`StoreError::KeyTooLong`].
    pub fn max_key_len(&self) -> usize {
        self.inner.max_key_len
    }

    /// The pool the store's calls use.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Deletes at most one [purge batch](PostgresStoreBuilder::purge_batch) of expired rows
    /// (of every namespace of the table) now, and answers how many: what the background purge
    /// does each round, for a job that purges on its own schedule.
    ///
    /// # Errors
    ///
    /// As any call: [`StoreError::Unavailable`], [`StoreError::Timeout`],
    /// [`StoreError::Backend`].
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let mut conn = inner.acquire().await?;
        let run = purge::purge_once(&mut *conn, &inner.sql.purge, inner.purge_batch);
        match tokio::time::timeout(inner.statement_timeout + GRACE, run).await {
            Ok(result) => result.map_err(|e| inner.fail("purge expired keys", e)),
            Err(_) => Err(StoreError::Timeout(inner.statement_timeout + GRACE)),
        }
    }

    /// Marks `key` done for `ttl` on the caller's connection, inside the caller's transaction
    /// (`&mut *tx`), if the claim with `token` still holds it: in flight with `token`, done by
    /// it already, or free (expired or absent). Answers whether it did; `false` means another
    /// claim holds the key (this claim's lease ran out and the key was taken), and the row was
    /// left alone.
    ///
    /// The row is written by the caller's transaction, so it commits or rolls back with the
    /// business writes made in it; until then it stays locked, and other consumers' calls
    /// that touch this key wait for the transaction's end.
    ///
    /// This is the building block of a claim committed in the user's own transaction; it is
    /// public for the crate's benches, and may become crate-private.
    ///
    /// # Errors
    ///
    /// [`StoreError::KeyTooLong`] for a key over [`max_key_len`](Self::max_key_len) (nothing
    /// is sent), [`StoreError::Timeout`] past the statement timeout (the transaction then has
    /// a statement in progress or failed: roll it back), and the errors of the connection.
    #[doc(hidden)]
    pub async fn commit_in(
        &self,
        conn: &mut PgConnection,
        key: &[u8],
        token: Token,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        const OP: &str = "commit a claim in a transaction";
        let inner = &self.inner;
        inner.check_keys([key])?;
        let statement = sqlx::query(&inner.sql.commit_one)
            .bind(&*inner.namespace)
            .bind(key)
            .bind(token.to_string())
            .bind(micros(ttl))
            .fetch_optional(conn);
        match tokio::time::timeout(inner.statement_timeout + GRACE, statement).await {
            Ok(Ok(row)) => Ok(row.is_some()),
            Ok(Err(e)) => Err(inner.fail(OP, e)),
            Err(_) => Err(StoreError::Timeout(inner.statement_timeout + GRACE)),
        }
    }

    /// Marks several claims' keys done for `ttl` inside the caller's transaction, in one
    /// statement (keys locked in sorted order, as every batch): [`commit_in`](Self::commit_in)
    /// for a transaction that writes the effects of several messages. Answers `true` if every
    /// key was still held by its claim's token (in flight, done by it already, or free) and
    /// is now marked; `false` if another claim holds one of them (or `keys` names one key
    /// under two tokens), and then the others may be marked: roll the transaction back.
    ///
    /// Public for the crate's benches, like `commit_in`; may become crate-private.
    ///
    /// # Errors
    ///
    /// As [`commit_in`](Self::commit_in).
    #[doc(hidden)]
    pub async fn commit_all_in(
        &self,
        conn: &mut PgConnection,
        keys: &[HeldKey],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        const OP: &str = "commit claims in a transaction";
        if keys.is_empty() {
            return Ok(true);
        }
        let inner = &self.inner;
        inner.check_keys(keys.iter().map(|(k, _)| k.as_slice()))?;
        let sorted = SortedHeld::new(keys.iter().map(|(k, t)| (k.as_slice(), t.as_u128())));
        if sorted.has_repeated_keys() {
            // One key under two tokens: at most one of them holds it, and a statement cannot
            // write one row twice.
            return Ok(false);
        }
        let (sorted_keys, tokens) = sorted.columns(0..sorted.pairs.len());
        let statement = sqlx::query(&inner.sql.commit)
            .bind(&*inner.namespace)
            .bind(&sorted_keys)
            .bind(&tokens)
            .bind(micros(ttl))
            .fetch_all(conn);
        match tokio::time::timeout(inner.statement_timeout + GRACE, statement).await {
            // The statement returns the keys it marked: each at most once.
            Ok(Ok(rows)) => Ok(rows.len() == sorted_keys.len()),
            Ok(Err(e)) => Err(inner.fail(OP, e)),
            Err(_) => Err(StoreError::Timeout(inner.statement_timeout + GRACE)),
        }
    }
}

impl Store for PostgresStore {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.insert(batch).await })
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.remove(keys).await })
    }

    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.take_back(keys).await })
    }

    fn max_key_len(&self) -> usize {
        self.inner.max_key_len
    }

    fn namespace(&self) -> Option<&str> {
        Some(&self.inner.namespace)
    }
}

impl ClaimStore for PostgresStore {
    fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.claim(batch).await })
    }

    fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.commit(keys, ttl).await })
    }

    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.release(keys).await })
    }

    fn renew(&self, keys: Vec<HeldKey>, lease: Duration) -> StoreFuture<Vec<bool>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.renew(keys, lease).await })
    }
}
