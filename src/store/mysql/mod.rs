//! [`MySqlStore`]: keys in a MySQL 8 / MariaDB table, through sqlx.

mod batch;
mod builder;
mod conn;
mod purge;
mod sql;
mod tx;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::mysql::MySqlConnection;
use sqlx::{Executor as _, MySqlPool};
use tokio::sync::{OnceCell, oneshot};

use self::batch::Outcome;
pub use self::builder::MySqlStoreBuilder;
use self::builder::Server;
use self::conn::{Probe, map_error};
use self::purge::PurgeConfig;
use self::sql::{MAX_KEY_LEN, MAX_NAMESPACE_LEN, Record, Sql, TableName};
use super::{
    ClaimBatch, ClaimStore, Claimed, HeldKey, InsertBatch, Inserted, Store, StoreError,
    StoreFuture, Token,
};

/// Default deadline of one store call.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default limit on opening one connection.
const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Default size of the pool the store makes.
const DEFAULT_MAX_CONNECTIONS: u32 = 8;
/// Default table.
const DEFAULT_TABLE: &str = "stream_dedup_keys";
/// Default time between two rounds of the background purge.
const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Default rows per purge statement.
const DEFAULT_PURGE_BATCH: usize = 1000;

/// A store in a MySQL 8 or MariaDB table, shared by every consumer that uses the same table
/// and namespace: for consumers whose business data lives in that database, and — with
/// [`commit_in`](MySqlStore::commit_in) — the key marked done in the very transaction that
/// wrote the effect.
///
/// # The table
///
/// One row per key. The store creates the table when it is missing (`CREATE TABLE IF NOT
/// EXISTS`, safe when several consumers start at once; turn it off with
/// [`MySqlStoreBuilder::create_table`] and run it yourself):
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS stream_dedup_keys (
///   namespace  VARBINARY(255)  NOT NULL,
///   k          VARBINARY(1024) NOT NULL,
///   token      BINARY(16)      NOT NULL,
///   done       BOOLEAN         NOT NULL,
///   expires_at DATETIME(6)     NOT NULL,
///   PRIMARY KEY (namespace, k),
///   KEY stream_dedup_expiry (expires_at)
/// ) ENGINE = InnoDB ROW_FORMAT = DYNAMIC
/// ```
///
/// `token` is the [`Token`] of the request that recorded the key; `done` is false while a
/// claim holds it (in flight, until `expires_at`: the lease) and true once recorded or
/// committed (until `expires_at`: the ttl). `expires_at` is UTC on the **server's** clock
/// (`UTC_TIMESTAMP(6)`); consumers' clocks never matter. A row past `expires_at` counts as
/// absent at once; a background task deletes such rows in bounded batches
/// ([`MySqlStoreBuilder::purge_interval`]), of every namespace in the table.
///
/// What a key costs: measured on MariaDB 10.11 (`tests/store_mysql.rs`, `what_a_key_costs`)
/// with 36-byte keys in random order under a 19-byte namespace, 100,000 keys took 18.4 MB of
/// rows and 7.9 MB of expiry index (`data_length` and `index_length` of
/// `information_schema.tables` after `ANALYZE TABLE`): **~264 bytes per key**. A row holds
/// ~100 bytes (the key, the namespace, 25 bytes of columns, InnoDB's 18 bytes of row header
/// and transaction fields), in pages that random inserts leave about two thirds full; each
/// entry of the expiry index repeats the primary key (namespace and key): short namespaces are
/// cheaper.
///
/// # How a batch is recorded
///
/// A batch is one statement, a multi-row `INSERT … ON DUPLICATE KEY UPDATE` that writes
/// every absent or expired key and leaves a live row as it is: one round trip, and one
/// transaction of its own. It decides every key atomically (InnoDB locks each row it inserts
/// or finds). On MariaDB (10.5 and later) the same statement answers for every key with
/// `RETURNING`: the key of each row that is another request's after it (another token, or
/// the other state), and the row's `done`; any other key holds this request's token in the
/// state it wrote. MySQL has no `RETURNING`: there, only when the upsert met a live row of
/// another request — it flags that with `LAST_INSERT_ID(1)`, which its reply carries — does a
/// second round trip read the batch's rows back: a row holding this request's token in the
/// state it wrote was written by it (nobody else writes that token), any other key was not,
/// and a key whose row is gone since (removed, or expired and purged in between) counts as
/// not written by it either: the conservative answer. The statements are prepared once per
/// connection for each of a few batch sizes (1, 2, 4, … 512, 768, 1,000 keys; a batch is
/// padded to the next by repeating its last key, which changes nothing), so the server parses
/// no key, and a connection holds a few dozen prepared statements whatever the batch sizes.
/// The keys are sorted (as bytes) first, so every batch locks its rows in the same order: two
/// consumers whose batches hold the same keys in other orders wait for each other rather than
/// deadlock. A deadlock that happens anyway (with an application's own transactions, or with
/// the purge) makes InnoDB roll the statement back; it is run again, up to 5 times. A batch of
/// more than 1,000 keys is cut into statements of 1,000. Commits, releases and removals are
/// one round trip each: their statements in one string (keys as hexadecimal literals: nothing
/// of a key is ever read as SQL); a commit's upsert and its read-back of the refused keys run
/// inside `BEGIN` … `COMMIT`, under the same locks. [`commit_in`](MySqlStore::commit_in) is
/// one prepared upsert that flags a refusal with `LAST_INSERT_ID(1)`.
///
/// (A first version read every batch back inside the batch's own transaction — `BEGIN`, the
/// upsert, `SELECT … FOR UPDATE`, `COMMIT` — and reached 64–70% of a plain multi-row `INSERT
/// IGNORE` in paired runs: the read-back of 1,000 keys cost as much as the upsert.)
///
/// A key that holds this request's token in the state it asked for answers as recorded by it
/// (`New`, `Mine`, committed), so a call that timed out after the server applied it, retried
/// with the same token, gets the answers of the first attempt, never a false duplicate.
///
/// # Claims
///
/// [`claim`](ClaimStore::claim) writes `done = false` with `expires_at` = now + the lease;
/// a key whose lease ran out is taken by the next claim. [`commit`](ClaimStore::commit)
/// marks a key done for the ttl if its row holds the claim's token (or expired, or is gone),
/// and refuses it, leaving the row as it is, when another token holds it;
/// [`release`](ClaimStore::release) deletes the rows still in flight with the claim's token;
/// [`commit_in`](MySqlStore::commit_in) commits one key inside the caller's transaction.
/// [`Store::insert`] (mark on emit) counts a key in flight as present until its lease runs out.
///
/// # Timeouts and failures
///
/// Every call has a deadline ([`MySqlStoreBuilder::timeout`], default 1 s); past it the call
/// fails with [`StoreError::Timeout`] (it may have been applied: retrying it with the same
/// token is safe) and its connection is closed, not given back to the pool. A server that
/// cannot be reached fails a call with [`StoreError::Unavailable`] whose
/// [`source`](std::error::Error::source) names the cause (`Connection refused`, a killed
/// connection, a server shutting down); when the pool has no connection for 50 ms, the store
/// opens one of its own to find out, so a call does not wait out the pool's timeout while the
/// server is down. A lock wait past the server's `innodb_lock_wait_timeout` is a `Timeout`
/// too; the pool the store makes sets it to the call's deadline (rounded up to whole seconds)
/// on each connection. A connection found broken at once (within 50 ms of the call's first
/// statement, before any answer: an idle connection the server closed, a server restarted) is
/// replaced within the call, once; a connection that breaks while the call runs (killed, the
/// server gone) fails it with `Unavailable`. Measured with a test-owned MariaDB killed: each call fails in ~50 ms with
/// `Connection refused`, and the first call after the server is back succeeds. Other errors are [`StoreError::Backend`], sqlx's error the source. Errors leave
/// no transaction open on a connection of the pool: a failed statement is rolled back.
///
/// # Requirements and limits
///
/// - MySQL 8.0 or MariaDB 10.5 and later (tested with MariaDB 10.11); InnoDB. The SQL uses
///   `X'…'` literals, `UTC_TIMESTAMP(6) + INTERVAL n MICROSECOND`, `INSERT … ON DUPLICATE KEY
///   UPDATE` with `IF()` and `LAST_INSERT_ID(expr)` (no `VALUES()`, which MySQL 8.0.20
///   deprecates, and no row alias, which MariaDB lacks), `SELECT … FOR UPDATE`, `DELETE …
///   LIMIT`, a session variable (`@stream_dedup_expires`, in commits and renewals of
///   claims), several statements in one query (sqlx enables them). One thing only MariaDB
///   has, used where the server's `VERSION()` says MariaDB 10.5 or later: `INSERT …
///   RETURNING`, for batches.
/// - Keys up to [`max_key_len`](MySqlStore::max_key_len) (1,024) bytes, any bytes, the empty
///   key too; namespaces up to 255 bytes. A longer key is never sent; see
///   [`Store::insert`] below for what it answers.
/// - The ttl and the lease count in whole microseconds, at least 1 µs, at most 100 years.
///
/// Clones share one pool; `Debug` shows the table, the namespace and the settings, never the
/// URL or its password.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use stream_dedup::store::{InsertBatch, Inserted, MySqlStore, Store};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MySqlStore::connect("mysql://app:secret@127.0.0.1:3306/shop", "payments").await?;
/// let keys = vec![b"12345/payment".to_vec(), b"12346/payment".to_vec()];
/// let answers = store.insert(InsertBatch::new(keys, Duration::from_secs(3600))).await?;
/// if answers[0] == Inserted::Present {
///     println!("order 12345 was paid already");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MySqlStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: MySqlPool,
    sql: Sql,
    table: TableName,
    namespace: Box<str>,
    timeout: Duration,
    create_table: bool,
    /// `RETURNING` allowed where the server has it (off only in tests, by the builder's
    /// `without_returning`).
    returning: bool,
    purge: PurgeConfig,
    probe: Probe,
    /// Set once the table is known to be there (and the purge started): what the server
    /// offers.
    ready: OnceCell<Server>,
    /// Dropped with the last clone: the background purge ends.
    stop_purge: Mutex<Option<oneshot::Sender<()>>>,
}

impl fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("MySqlStore")
            .field("table", &inner.table.name)
            .field("namespace", &inner.namespace)
            .field("timeout", &inner.timeout)
            .field("purge_interval", &inner.purge.interval)
            .field("purge_batch", &inner.purge.batch)
            .finish_non_exhaustive()
    }
}

impl MySqlStore {
    /// Connects to the server at `url` (`mysql://user:password@host:port/database`, see
    /// sqlx's [`MySqlConnectOptions`](sqlx::mysql::MySqlConnectOptions)) with the default
    /// settings, creates the table if it is missing, and keeps this store's keys under
    /// `namespace`.
    ///
    /// Shorthand for
    /// [`MySqlStore::builder(namespace).connect(url)`](MySqlStoreBuilder::connect).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when the server cannot be reached (the source says why),
    /// [`StoreError::Timeout`] when connecting takes longer than the connection timeout,
    /// [`StoreError::Corrupt`] when the table exists with other columns, and
    /// [`StoreError::Backend`] for a malformed URL, a refused login or a missing privilege.
    ///
    /// # Panics
    ///
    /// If `namespace` is longer than 255 bytes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use stream_dedup::store::MySqlStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), stream_dedup::store::StoreError> {
    /// let store = MySqlStore::connect("mysql://root@127.0.0.1:3306/test", "payments").await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str, namespace: &str) -> Result<MySqlStore, StoreError> {
        MySqlStore::builder(namespace).connect(url).await
    }

    /// Uses the application's own pool, as it is configured (its size, its timeouts and
    /// `innodb_lock_wait_timeout`); the store adds its deadline around each call. The table
    /// is created, if missing, by the first call.
    ///
    /// Shorthand for [`MySqlStore::builder(namespace).pool(pool)`](MySqlStoreBuilder::pool).
    ///
    /// # Panics
    ///
    /// If `namespace` is longer than 255 bytes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use stream_dedup::sqlx::MySqlPool;
    /// use stream_dedup::store::MySqlStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = MySqlPool::connect("mysql://root@127.0.0.1:3306/test").await?;
    /// let store = MySqlStore::from_pool(pool.clone(), "payments");
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    pub fn from_pool(pool: MySqlPool, namespace: &str) -> MySqlStore {
        MySqlStore::builder(namespace).pool(pool)
    }

    /// A builder, to set the table and the timeouts before connecting.
    ///
    /// # Panics
    ///
    /// If `namespace` is longer than 255 bytes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use stream_dedup::store::MySqlStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), stream_dedup::store::StoreError> {
    /// let store = MySqlStore::builder("payments")
    ///     .table("app.processed_messages")
    ///     .timeout(Duration::from_millis(500))
    ///     .purge_interval(Duration::from_secs(10))
    ///     .connect("mysql://root@127.0.0.1:3306/test")
    ///     .await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    pub fn builder(namespace: &str) -> MySqlStoreBuilder {
        assert!(
            namespace.len() <= MAX_NAMESPACE_LEN,
            "a MySqlStore namespace is at most {MAX_NAMESPACE_LEN} bytes, not {}",
            namespace.len()
        );
        MySqlStoreBuilder {
            namespace: namespace.into(),
            table: TableName::parse(DEFAULT_TABLE).unwrap_or_else(|e| unreachable!("{e}")),
            timeout: DEFAULT_TIMEOUT,
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            create_table: true,
            returning: true,
            purge: PurgeConfig {
                interval: Some(DEFAULT_PURGE_INTERVAL),
                batch: DEFAULT_PURGE_BATCH,
            },
        }
    }

    /// The namespace: this store's rows are those with this `namespace` column.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The table, as given to [`MySqlStoreBuilder::table`].
    pub fn table(&self) -> &str {
        &self.inner.table.name
    }

    /// The deadline of one call.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The longest key the table holds, in bytes (1,024).
    pub fn max_key_len(&self) -> usize {
        MAX_KEY_LEN
    }

    /// The pool: the application's own (from [`from_pool`](MySqlStore::from_pool)) or the one
    /// the store made; begin the transactions for [`commit_in`](MySqlStore::commit_in) on it.
    pub fn pool(&self) -> &MySqlPool {
        &self.inner.pool
    }

    /// Deletes every expired row of the table (all namespaces) now, in statements of the
    /// purge batch size; answers how many rows went. The background purge does the same every
    /// [`purge_interval`](MySqlStoreBuilder::purge_interval), a bounded number of statements
    /// each time.
    ///
    /// # Errors
    ///
    /// As any call of the store; the deadline applies to each statement.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        const OP: &str = "purge expired keys";
        let inner = &self.inner;
        inner.ready().await?;
        let mut deleted = 0;
        loop {
            let round = within(inner.timeout, async {
                purge::purge(&inner.pool, &inner.sql, inner.purge.batch, 1)
                    .await
                    .map_err(|e| map_error(OP, e, inner.timeout))
            })
            .await?;
            deleted += round;
            if round < inner.purge.batch as u64 {
                return Ok(deleted);
            }
        }
    }

    /// Marks `key` done for `ttl` inside the caller's transaction (or on the caller's
    /// connection), and answers whether the claim of `token` still held it: `true` when the
    /// key's row holds `token` (in flight or done), or has expired, or is gone (a claim that
    /// failed open has no row); `false` when another claim holds the key or committed it (this
    /// claim's lease ran out): that row is left as it is.
    ///
    /// The change commits or rolls back with the caller's transaction: the effect written in it
    /// and the key's mark are never split. The row stays locked until the transaction ends, so
    /// another consumer's claim of the key waits for it. The deadline of the store's calls
    /// applies; a call that timed out leaves the transaction in an unknown state: roll it back.
    /// It is one prepared statement (an `INSERT … ON DUPLICATE KEY UPDATE` of the key's row),
    /// one round trip, on the caller's connection, prepared once and kept in that connection's
    /// statement cache. It tells a refusal by `LAST_INSERT_ID(1)`: after an answer `false`,
    /// the session's `LAST_INSERT_ID()` is 1; after `true` it is unchanged.
    ///
    /// # Errors
    ///
    /// [`StoreError::KeyTooLong`] for a key over [`max_key_len`](MySqlStore::max_key_len)
    /// (nothing is sent); otherwise as any call of the store. On an error, roll the
    /// transaction back.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use stream_dedup::store::{ClaimBatch, ClaimStore, Claimed, MySqlStore, StoreError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MySqlStore::connect("mysql://root@127.0.0.1:3306/test", "payments").await?;
    /// let batch = ClaimBatch::new(vec![b"order-7".to_vec()], Duration::from_secs(30));
    /// let token = batch.token;
    /// if store.claim(batch).await? == [Claimed::Mine] {
    ///     let mut tx = store.pool().begin().await?;
    ///     stream_dedup::sqlx::query("INSERT INTO payments (order_id) VALUES (7)")
    ///         .execute(&mut *tx)
    ///         .await?;
    ///     if store.commit_in(&mut tx, b"order-7", token, Duration::from_secs(3600)).await? {
    ///         tx.commit().await?; // the payment and the key's mark, together
    ///     } else {
    ///         tx.rollback().await?; // another consumer took the key
    ///         return Err(StoreError::LeaseLost.into());
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn commit_in(
        &self,
        conn: &mut MySqlConnection,
        key: &[u8],
        token: Token,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        const OP: &str = "commit a claim in a transaction";
        if key.len() > MAX_KEY_LEN {
            return Err(StoreError::KeyTooLong {
                len: key.len(),
                max: MAX_KEY_LEN,
            });
        }
        let inner = &self.inner;
        inner.ready().await?;
        let token = token.to_bytes();
        let us = i64::try_from(sql::micros(ttl)).unwrap_or(i64::MAX);
        let statement = sqlx::query(inner.sql.commit_one())
            .bind(inner.namespace.as_bytes())
            .bind(key)
            .bind(&token[..])
            .bind(us)
            .bind(&token[..])
            .bind(&token[..])
            .bind(&token[..])
            .bind(&token[..])
            .bind(us);
        let timeout = inner.timeout;
        let done = within(timeout, async {
            (&mut *conn)
                .execute(statement)
                .await
                .map_err(|e| map_error(OP, e, timeout))
        })
        .await?;
        // The insert id is 1 only when the statement refused the key (`LAST_INSERT_ID(1)`).
        Ok(done.last_insert_id() == 0)
    }

    /// Marks several claims' keys done for `ttl` inside the caller's transaction:
    /// [`commit_in`](Self::commit_in) for a transaction that writes the effects of several
    /// messages. One prepared multi-row upsert per token that the keys were claimed under
    /// (keys sorted; up to 1,000 a statement), whose reply says whether it refused any key:
    /// one round trip per token, no read-back. Answers `true` if every
    /// key was still held by its claim's token (in flight, done by it already, or free) and
    /// is now marked; `false` if another claim holds one of them (or `keys` names one key
    /// under two tokens), and then the others may be marked: roll the transaction back.
    ///
    /// # Errors
    ///
    /// As [`commit_in`](Self::commit_in).
    pub async fn commit_all_in(
        &self,
        conn: &mut MySqlConnection,
        keys: &[HeldKey],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.commit_in_tx(conn, keys, ttl).await
    }
}

/// `fut`, failed with [`StoreError::Timeout`] once `deadline` has passed.
async fn within<T>(
    deadline: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or(Err(StoreError::Timeout(deadline)))
}

/// Keys over [`MySqlStore::max_key_len`] are never sent. A call whose keys are all too long
/// fails with [`StoreError::KeyTooLong`]; in a call with other keys, a key too long answers as
/// if the store had failed open for it alone — [`Inserted::New`] / [`Claimed::Mine`], a
/// commit `true`, nothing recorded — and the other keys are answered as usual. (The
/// [`Store`] trait has no per-key error; the operators read [`Store::max_key_len`] and refuse
/// such keys, alone, before they reach the store.)
impl Store for MySqlStore {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            if batch.keys.is_empty() {
                return Ok(Vec::new());
            }
            let timeout = inner.timeout;
            let outcomes = within(timeout, async {
                let (token, ttl) = (batch.token, batch.ttl);
                inner
                    .record("insert keys", batch.keys, token, Record::Done, ttl)
                    .await
            })
            .await?;
            Ok(outcomes
                .into_iter()
                .map(|o| match o {
                    Outcome::Ours | Outcome::TooLong => Inserted::New,
                    Outcome::Held { .. } => Inserted::Present,
                })
                .collect())
        })
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            within(inner.timeout, inner.remove(keys)).await
        })
    }

    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            within(inner.timeout, inner.take_back(keys)).await
        })
    }

    fn max_key_len(&self) -> usize {
        MAX_KEY_LEN
    }

    fn namespace(&self) -> Option<&str> {
        Some(MySqlStore::namespace(self))
    }
}

impl ClaimStore for MySqlStore {
    fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            if batch.keys.is_empty() {
                return Ok(Vec::new());
            }
            let timeout = inner.timeout;
            let outcomes = within(timeout, async {
                let (token, lease) = (batch.token, batch.lease);
                inner
                    .record("claim keys", batch.keys, token, Record::InFlight, lease)
                    .await
            })
            .await?;
            Ok(outcomes
                .into_iter()
                .map(|o| match o {
                    Outcome::Ours | Outcome::TooLong => Claimed::Mine,
                    Outcome::Held { done: true } => Claimed::Done,
                    Outcome::Held { done: false } => Claimed::InFlight,
                })
                .collect())
        })
    }

    fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            within(inner.timeout, inner.commit(keys, ttl)).await
        })
    }

    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            within(inner.timeout, inner.release(keys)).await
        })
    }

    fn renew(&self, keys: Vec<HeldKey>, lease: Duration) -> StoreFuture<Vec<bool>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            within(inner.timeout, inner.renew(keys, lease)).await
        })
    }
}
