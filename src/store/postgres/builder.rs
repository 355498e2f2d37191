//! [`PostgresStoreBuilder`]: the settings, the connection, and the table.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool, Row};

use super::error::map_error;
use super::sql::{self, Statements};
use super::{Inner, PostgresStore, purge};
use crate::store::StoreError;

/// Default limit on one statement.
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default limit on waiting for a connection.
const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_millis(500);
/// Default size of the pool the store makes.
const DEFAULT_MAX_CONNECTIONS: u32 = 8;
/// Default time between two purges.
const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Default number of rows one purge statement deletes at most.
const DEFAULT_PURGE_BATCH: usize = 1_000;
/// The longest namespace.
const MAX_NAMESPACE: usize = 255;
/// A connection idle for longer is checked (one round trip) before a call uses it.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Settings for a [`PostgresStore`], then its connection: from [`PostgresStore::builder`].
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use stream_dedup::store::PostgresStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), stream_dedup::store::StoreError> {
/// let store = PostgresStore::builder("payments")
///     .table("dedup.processed_messages")
///     .statement_timeout(Duration::from_millis(500))
///     .purge_interval(Duration::from_secs(10))
///     .connect("postgres://app@db.internal/shop")
///     .await?;
/// # drop(store);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until it connects"]
pub struct PostgresStoreBuilder {
    namespace: Box<str>,
    table: Box<str>,
    statement_timeout: Duration,
    acquire_timeout: Duration,
    max_connections: u32,
    create_table: bool,
    purge: Option<Duration>,
    purge_batch: usize,
}

impl PostgresStoreBuilder {
    /// The builder's defaults, for `namespace`.
    #[track_caller]
    pub(super) fn new(namespace: &str) -> PostgresStoreBuilder {
        assert!(
            !namespace.contains('\0'),
            "a PostgresStore namespace cannot hold a NUL character (PostgreSQL text cannot)"
        );
        assert!(
            namespace.len() <= MAX_NAMESPACE,
            "a PostgresStore namespace is at most {MAX_NAMESPACE} bytes, not {}",
            namespace.len()
        );
        PostgresStoreBuilder {
            namespace: namespace.into(),
            table: sql::DEFAULT_TABLE.into(),
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            create_table: true,
            purge: Some(DEFAULT_PURGE_INTERVAL),
            purge_batch: DEFAULT_PURGE_BATCH,
        }
    }

    /// The table (default **`stream_dedup_keys`**), optionally with its schema
    /// (`schema.table`); without one, the connection's `search_path` finds or places it.
    /// Several namespaces share one table.
    ///
    /// # Panics
    ///
    /// If `name` is not a lowercase SQL identifier (`[a-z_][a-z0-9_]*`, at most 54 bytes so
    /// that its index's name `{table}_purge_at` fits PostgreSQL's 63), with at most one
    /// schema before a `.`.
    #[track_caller]
    pub fn table(mut self, name: &str) -> Self {
        if let Err(why) = sql::check_table(name) {
            panic!("PostgresStoreBuilder::table: {why}");
        }
        self.table = name.into();
        self
    }

    /// The limit on one statement (default **1 s**). On the connections the store makes, it is
    /// the server's `statement_timeout`: the server cancels a statement that runs longer (it
    /// is rolled back) and the call fails with [`StoreError::Timeout`]. The store also stops
    /// waiting for a statement 100 ms after this limit, whatever it waits for (a server that
    /// does not answer), and fails the call with `Timeout` (such a call may have been applied:
    /// a retry with the same token is safe). With a pool of yours ([`pool`](Self::pool)) only
    /// that client-side limit applies; set `statement_timeout` in your connection options for
    /// the server's.
    ///
    /// A batch of 1,000 keys takes 5–15 ms on a loopback PostgreSQL 15 that syncs its log to
    /// disk. A statement also waits for keys that another transaction has locked (a
    /// [`commit_in`](PostgresStore::commit_in) not yet committed).
    ///
    /// # Panics
    ///
    /// If `timeout` is zero.
    #[track_caller]
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "a PostgresStore statement timeout must not be zero"
        );
        self.statement_timeout = timeout;
        self
    }

    /// The limit on waiting for a connection of the pool (default **500 ms**), opening one
    /// included. When it runs out, the store tries one connection of its own to name the cause
    /// (refused, a failed login, …) in a [`StoreError::Unavailable`]; if that one succeeds,
    /// the pool was busy and the call fails with [`StoreError::Timeout`].
    ///
    /// # Panics
    ///
    /// If `timeout` is zero.
    #[track_caller]
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "a PostgresStore acquire timeout must not be zero"
        );
        self.acquire_timeout = timeout;
        self
    }

    /// The most connections the store opens (default **8**), shared by its clones: each store
    /// call and each purge statement takes one for its duration. Ignored by
    /// [`pool`](Self::pool).
    ///
    /// # Panics
    ///
    /// If `n` is zero.
    #[track_caller]
    pub fn max_connections(mut self, n: u32) -> Self {
        assert!(n > 0, "a PostgresStore needs at least one connection");
        self.max_connections = n;
        self
    }

    /// Whether to create the table and its index when they are missing (default **true**).
    /// With `false` the table must exist (see [the DDL](PostgresStore#the-table)); the store
    /// then needs only `SELECT`, `INSERT`, `UPDATE` and `DELETE` on it.
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }

    /// How often the store deletes expired rows (default **60 s**), in the background, from a
    /// task on the tokio runtime the store is built on; the task ends with the store's last
    /// clone. Each round deletes batches of at most [`purge_batch`](Self::purge_batch) rows
    /// until a batch finds fewer. Expired rows count as absent whether or not they were purged,
    /// so the interval bounds only the table's size: about the keys of one ttl plus one
    /// interval.
    ///
    /// # Panics
    ///
    /// If `interval` is zero.
    #[track_caller]
    pub fn purge_interval(mut self, interval: Duration) -> Self {
        assert!(
            !interval.is_zero(),
            "a PostgresStore purge interval must not be zero"
        );
        self.purge = Some(interval);
        self
    }

    /// The most rows one purge statement deletes (default **1,000**).
    ///
    /// # Panics
    ///
    /// If `rows` is zero.
    #[track_caller]
    pub fn purge_batch(mut self, rows: usize) -> Self {
        assert!(
            rows > 0,
            "a PostgresStore purge batch must delete at least one row"
        );
        self.purge_batch = rows;
        self
    }

    /// No background purge (default: one every 60 s): for a deployment where one job purges
    /// for everybody, with [`PostgresStore::purge_expired`] or the statement in
    /// [the docs](PostgresStore#expiry-and-the-purge).
    pub fn no_purge(mut self) -> Self {
        self.purge = None;
        self
    }

    /// Connects to the PostgreSQL at `url` (`postgres://user:password@host:port/database`,
    /// any form sqlx's [`PgConnectOptions`] reads), in a pool of its own, and creates the
    /// table if it is missing.
    ///
    /// The pool's connections use the [statement timeout](Self::statement_timeout) as the
    /// server's `statement_timeout`, the application name `stream-dedup` (unless the URL gives
    /// one), and are checked with a round trip before use only after a second idle.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when no connection can be made (the cause is the source),
    /// [`StoreError::Backend`] for a malformed URL or when the table cannot be created, and
    /// [`StoreError::Corrupt`] when a table of that name exists without the store's columns.
    pub async fn connect(self, url: &str) -> Result<PostgresStore, StoreError> {
        let mut options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::backend("parse the PostgreSQL URL", e))?;
        if options.get_application_name().is_none() {
            options = options.application_name("stream-dedup");
        }
        let ms = self.statement_timeout.as_millis().max(1);
        options = options.options([("statement_timeout", format!("{ms}ms"))]);
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            // A ping per call would add a round trip to every batch: only connections that sat
            // idle are checked; a connection found lost during a call is replaced and the
            // statement sent again.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > CHECK_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options);
        self.pool(pool).await
    }

    /// Uses `pool` (shared with the rest of the application, with its own settings), and
    /// creates the table if it is missing. The store's [acquire](Self::acquire_timeout) and
    /// [statement](Self::statement_timeout) limits apply on the client side.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    pub async fn pool(self, pool: PgPool) -> Result<PostgresStore, StoreError> {
        let sql = Statements::new(&self.table);
        let mut inner = Inner {
            pool,
            namespace: self.namespace,
            table: self.table,
            sql,
            max_key_len: 0,
            statement_timeout: self.statement_timeout,
            acquire_timeout: self.acquire_timeout,
            purge_interval: self.purge,
            purge_batch: self.purge_batch,
            purge_task: None,
            reconnects: Default::default(),
        };
        inner.max_key_len = prepare(&inner, self.create_table).await?;
        if let Some(interval) = self.purge {
            inner.purge_task = purge::spawn(
                inner.pool.clone(),
                inner.sql.purge.clone(),
                interval,
                self.purge_batch,
                self.acquire_timeout + self.statement_timeout + super::GRACE,
            );
        }
        Ok(PostgresStore {
            inner: Arc::new(inner),
        })
    }
}

/// Checks the table (creating it if allowed and missing) and answers the longest key, from
/// the server's page size.
async fn prepare(inner: &Inner, create: bool) -> Result<usize, StoreError> {
    const OP: &str = "prepare the table";
    let mut conn = inner.acquire().await?;
    let fail = |e| map_error(OP, e, inner.statement_timeout);
    let row = sqlx::query("SELECT to_regclass($1) IS NOT NULL, current_setting('block_size')::int")
        .bind(&inner.sql.table)
        .fetch_one(&mut *conn)
        .await
        .map_err(fail)?;
    let (exists, block_size): (bool, i32) =
        (row.try_get(0).map_err(fail)?, row.try_get(1).map_err(fail)?);
    if !exists {
        if !create {
            return Err(StoreError::backend(
                OP,
                format!(
                    "the table {} does not exist (and the store may not create it)",
                    inner.table
                ),
            ));
        }
        // `CREATE TABLE IF NOT EXISTS` run by two sessions at once can fail on the catalog's
        // unique index (the table's row type): one session at a time, under a lock named
        // after the table, released at the end of the transaction.
        let lock = xxhash_rust::xxh3::xxh3_64(format!("stream-dedup:{}", inner.table).as_bytes());
        let mut tx = conn.begin().await.map_err(fail)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock as i64)
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
        for ddl in &inner.sql.create {
            sqlx::query(ddl).execute(&mut *tx).await.map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
    }
    if let Err(e) = sqlx::query(&inner.sql.check).execute(&mut *conn).await {
        return Err(match e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("42703") => {
                StoreError::corrupt(format!(
                    "the table {} exists but is not a stream-dedup table: {db}",
                    inner.table
                ))
            }
            e => fail(e),
        });
    }
    let block_size = usize::try_from(block_size).unwrap_or(8192);
    Ok(sql::max_key_len(inner.namespace.len(), block_size))
}
