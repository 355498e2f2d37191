//! [`MySqlStoreBuilder`]: the settings, the first connection, the table.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPoolOptions};
use sqlx::{Connection as _, Executor as _, MySqlPool};
use tokio::sync::OnceCell;

use super::conn::{self, Probe, map_error};
use super::purge::PurgeConfig;
use super::sql::{Sql, TableName};
use super::{Inner, MySqlStore, within};
use crate::store::StoreError;

/// Settings for a [`MySqlStore`], then the connection: from [`MySqlStore::builder`].
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until it connects"]
pub struct MySqlStoreBuilder {
    pub(super) namespace: Box<str>,
    pub(super) table: TableName,
    pub(super) timeout: Duration,
    pub(super) connection_timeout: Duration,
    pub(super) max_connections: u32,
    pub(super) create_table: bool,
    pub(super) purge: PurgeConfig,
    /// Whether batches may use `RETURNING` where the server has it (off: read back, as on
    /// MySQL; for the tests of that path).
    pub(super) returning: bool,
}

impl MySqlStoreBuilder {
    /// The table (default **`stream_dedup_keys`**), in the connection's database or as
    /// `schema.table`. Several namespaces can share one table.
    ///
    /// # Panics
    ///
    /// If `name` is not one or two (`schema.table`) identifiers of 1 to 64 ASCII letters,
    /// digits, `_` or `$`, not only digits (so it can be written into SQL as it is).
    #[track_caller]
    pub fn table(mut self, name: &str) -> Self {
        match TableName::parse(name) {
            Ok(table) => self.table = table,
            Err(e) => panic!("MySqlStoreBuilder::table: {e}"),
        }
        self
    }

    /// The deadline of one store call (default **1 s**), waiting for a connection included;
    /// past it the call fails with [`StoreError::Timeout`]. For the pool the store makes, it
    /// is also the pool's acquire timeout and, rounded up to whole seconds, each connection's
    /// `innodb_lock_wait_timeout`.
    ///
    /// A batch of 1,000 keys takes a few milliseconds on a local server; set it well above
    /// your largest batch and your longest transaction that holds a key (see
    /// [`commit_in`](MySqlStore::commit_in)).
    ///
    /// # Panics
    ///
    /// If `timeout` is zero.
    #[track_caller]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        assert!(!timeout.is_zero(), "a MySqlStore timeout must not be zero");
        self.timeout = timeout;
        self
    }

    /// The limit on opening a connection in [`connect`](MySqlStoreBuilder::connect) (default
    /// **1 s**).
    ///
    /// # Panics
    ///
    /// If `timeout` is zero.
    #[track_caller]
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "a MySqlStore connection timeout must not be zero"
        );
        self.connection_timeout = timeout;
        self
    }

    /// The most connections of the pool that [`connect`](MySqlStoreBuilder::connect) makes
    /// (default **8**): one per call in flight.
    ///
    /// # Panics
    ///
    /// If `n` is zero.
    #[track_caller]
    pub fn max_connections(mut self, n: u32) -> Self {
        assert!(n > 0, "a MySqlStore pool needs at least one connection");
        self.max_connections = n;
        self
    }

    /// Whether the store creates its table when it is missing (default **true**). Set it to
    /// false when migrations create the table (the DDL is in [`MySqlStore`]'s docs) and the
    /// store's user may not; the store still checks that the table has its columns.
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }

    /// Time between two rounds of the background purge of expired rows (default **60 s**).
    /// Each round deletes at most 100 batches; a larger backlog is left to the next round.
    ///
    /// # Panics
    ///
    /// If `interval` is zero.
    #[track_caller]
    pub fn purge_interval(mut self, interval: Duration) -> Self {
        assert!(!interval.is_zero(), "a purge interval must not be zero");
        self.purge.interval = Some(interval);
        self
    }

    /// Rows deleted by one purge statement at most (default **1,000**): each statement is
    /// short, and locks few rows.
    ///
    /// # Panics
    ///
    /// If `rows` is zero.
    #[track_caller]
    pub fn purge_batch(mut self, rows: usize) -> Self {
        assert!(rows > 0, "a purge batch holds at least one row");
        self.purge.batch = rows;
        self
    }

    /// No background purge (default: on): expired rows stay until
    /// [`MySqlStore::purge_expired`] runs, or another consumer's store purges them.
    pub fn no_background_purge(mut self) -> Self {
        self.purge.interval = None;
        self
    }

    /// Records batches as on MySQL 8, whatever the server: the upsert, then a read-back when it
    /// met a key of another request. On MariaDB 10.5 and later the store otherwise has the
    /// upsert answer for every key itself (`RETURNING`); this switch lets a test suite run the
    /// MySQL path on MariaDB. Feature `testing`.
    #[cfg(feature = "testing")]
    #[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
    pub fn without_returning(mut self) -> Self {
        self.returning = false;
        self
    }

    /// Connects to the server at `url` with this builder's settings, in a pool of
    /// [`max_connections`](MySqlStoreBuilder::max_connections), and creates the table if it is
    /// missing.
    ///
    /// # Errors
    ///
    /// As [`MySqlStore::connect`].
    pub async fn connect(self, url: &str) -> Result<MySqlStore, StoreError> {
        let options: MySqlConnectOptions = url
            .parse()
            .map_err(|e| StoreError::backend("parse the MySQL URL", e))?;
        self.connect_with(options).await
    }

    /// Connects with sqlx's [`MySqlConnectOptions`] (TLS, a socket, …) instead of a URL.
    ///
    /// # Errors
    ///
    /// As [`MySqlStore::connect`].
    pub async fn connect_with(
        self,
        options: MySqlConnectOptions,
    ) -> Result<MySqlStore, StoreError> {
        // One connection first: it says why the server cannot be reached (a pool would retry a
        // refused connection until its timeout), and it sets the table up.
        let limit = self.connection_timeout;
        let mut conn =
            match tokio::time::timeout(limit, MySqlConnection::connect_with(&options)).await {
                Ok(conn) => conn.map_err(|e| map_error("connect", e, limit))?,
                Err(_) => return Err(StoreError::Timeout(limit)),
            };
        let sql = Sql::new(&self.table, self.namespace.as_bytes());
        let set_up = within(
            self.timeout,
            set_up(&mut conn, &sql, &self.table, self.create_table),
        );
        let set_up = set_up.await;
        let _ = conn.close().await;
        let server = set_up?;

        let lock_wait = self.timeout.as_secs_f64().ceil().max(1.0) as u64;
        let pool = MySqlPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(0)
            .acquire_timeout(self.timeout)
            // A dead connection fails its call's statement, which is sent again on a new one;
            // a ping before each call would cost a round trip each.
            .test_before_acquire(false)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    let set = format!("SET SESSION innodb_lock_wait_timeout = {lock_wait}");
                    conn.execute(sqlx::raw_sql(&set)).await.map(drop)
                })
            })
            .connect_lazy_with(options);
        let store = self.build(pool, sql);
        store.inner.mark_ready(server);
        Ok(store)
    }

    /// Uses the application's own pool, as it is configured; the table is created, if
    /// missing, by the first call.
    pub fn pool(self, pool: MySqlPool) -> MySqlStore {
        let sql = Sql::new(&self.table, self.namespace.as_bytes());
        self.build(pool, sql)
    }

    fn build(self, pool: MySqlPool, sql: Sql) -> MySqlStore {
        MySqlStore {
            inner: Arc::new(Inner {
                pool,
                sql,
                table: self.table,
                namespace: self.namespace,
                timeout: self.timeout,
                create_table: self.create_table,
                returning: self.returning,
                purge: self.purge,
                probe: Probe::default(),
                ready: OnceCell::new(),
                stop_purge: Mutex::new(None),
            }),
        }
    }
}

/// What a server offers beyond what every supported server has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Server {
    /// `INSERT … RETURNING`: MariaDB 10.5 and later (MySQL has none).
    pub(super) returning: bool,
}

impl Server {
    /// From the server's `VERSION()` (`10.11.6-MariaDB-0+deb12u1`, `8.0.36`).
    fn from_version(version: &str) -> Server {
        let mut numbers = version
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let major = numbers.next().unwrap_or(0);
        let minor = numbers.next().unwrap_or(0);
        Server {
            returning: version.contains("MariaDB") && (major, minor) >= (10, 5),
        }
    }
}

/// Creates the table if missing (with `create`), checks its columns, and asks what the
/// server offers.
pub(super) async fn set_up(
    conn: &mut MySqlConnection,
    sql: &Sql,
    table: &TableName,
    create: bool,
) -> Result<Server, StoreError> {
    if create {
        (&mut *conn)
            .execute(sqlx::raw_sql(&sql.create_table()))
            .await
            .map_err(|e| map_error("create the table", e, Duration::ZERO))?;
    }
    match (&mut *conn)
        .execute(sqlx::raw_sql(&sql.check_table()))
        .await
    {
        Ok(_) => {}
        // ER_BAD_FIELD_ERROR: a table of that name with other columns.
        Err(e) if conn::error_number(&e) == Some(1054) => {
            return Err(StoreError::corrupt(format!(
                "the table {} exists but is not a stream-dedup table: {e}",
                table.name
            )));
        }
        Err(e) => return Err(map_error("find the table", e, Duration::ZERO)),
    }
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| map_error("ask the server's version", e, Duration::ZERO))?;
    Ok(Server::from_version(&version))
}

#[cfg(test)]
mod tests {
    use super::Server;

    #[test]
    fn returning_is_used_on_mariadb_from_10_5() {
        let returning = |v| Server::from_version(v).returning;
        assert!(returning("10.11.19-MariaDB-0+deb12u1"));
        assert!(returning("10.5.0-MariaDB"));
        assert!(returning("11.4.2-MariaDB-log"));
        assert!(!returning("10.4.34-MariaDB"));
        assert!(!returning("8.0.36"));
        assert!(!returning("9.1.0-commercial"));
        assert!(!returning(""));
    }
}
