//! The Redis store: [`RedisStore`], its constructors and builder, and the [`Store`] and
//! [`ClaimStore`] impls. The work is done in the submodules: the checks made before a
//! constructor answers (`connect`), the pipelines of each call (`ops`), the Lua scripts of
//! claims (`scripts`), the routing on Redis Cluster (`cluster`) and the mapping of redis-rs
//! errors (`error`).

mod cluster;
mod connect;
mod error;
mod ops;
mod scripts;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;

use self::cluster::Cluster;
use self::connect::{check_cluster, check_namespace, check_single, parse_url, tls_provider};
use self::error::{CONNECT, Target, connect_timed_out, map_error};
use self::ops::{Conn, Inner, MAX_KEY_LEN};
use crate::store::{
    ClaimBatch, ClaimStore, Claimed, HeldKey, InsertBatch, Inserted, Store, StoreError, StoreFuture,
};

/// Default deadline of one store call: the connection manager's response timeout, and the
/// client-side limit on the whole call (waiting for a reconnect included).
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default limit on one attempt to open a connection.
const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_millis(500);

/// A store on Redis (≥ 7.0) or Redis Cluster, shared by every consumer that uses the same
/// namespace, on any number of machines.
///
/// Each key is stored as `{namespace}:{key bytes}` (binary-safe), holding the 16 bytes of the
/// [`Token`](super::Token) of the request that recorded it, with the batch's ttl as a Redis
/// expiry (`PX`): Redis forgets it by itself.
///
/// # How a batch is claimed
///
/// [`insert`](Store::insert) sends `SET key token NX GET PX ttl` for every key of the batch,
/// pipelined: one round trip per batch. `SET … NX` is atomic per key in Redis, so of any number
/// of consumers asking for one key exactly one records it. The `GET` reply tells the answer:
/// no previous value → [`Inserted::New`]; the request's own token → `New` as well (a retry of a
/// request that timed out after Redis applied it); anything else → [`Inserted::Present`].
/// [`remove`](Store::remove) sends one `DEL` per key, pipelined.
///
/// On Redis Cluster, a pipeline must stay on one node: the store reads the cluster's slot map
/// (`CLUSTER SLOTS`), sends one pipeline per node concurrently, and puts the answers back in
/// order. When a node answers with a redirect (`MOVED`/`ASK`/`TRYAGAIN`: slots moved or are
/// moving), the keys of that pipeline are sent again one by one through redis-rs's cluster
/// routing, which follows redirects, and the slot map is read again on the next call. Sending
/// a key twice is safe because of the token: a key that holds it answers `New`.
///
/// # Timeouts and failures
///
/// Every call has a deadline ([`RedisStoreBuilder::timeout`], default 500 ms), enforced by
/// the store around the whole call, so a call never waits for longer, whether Redis is slow,
/// hung or being reconnected to; it then fails with [`StoreError::Timeout`] (it may have been
/// applied: retrying it with the same token is safe). A lost or refused connection fails with
/// [`StoreError::Unavailable`]; any other error of Redis with [`StoreError::Backend`]; the
/// redis-rs error is the [`source`](std::error::Error::source). No call panics.
///
/// The connection reconnects by itself. When a call finds the connection broken (closed
/// while idle, or Redis restarted), the connection manager starts one new connection attempt
/// and the store sends the call once more through it, within the deadline. The connection
/// manager made by [`connect`](RedisStore::connect) and [`RedisStoreBuilder::client`] makes
/// one attempt per reconnect (limited by [`RedisStoreBuilder::connection_timeout`], default
/// 500 ms) and no backoff of its own: while Redis is down each call fails at once with
/// `Unavailable` (measured: under 1 ms on loopback) instead of waiting out seconds of retries,
/// and the first call after Redis is back goes through. The failure policy (fail open, fail
/// closed, retry with backoff) belongs to the operator.
///
/// # Requirements and limits
///
/// - Redis 7.0 or later (tested with 7.0.15): `SET` with both `NX` and
///   `GET` is a 7.0 addition. An older server answers every insert with a
///   [`StoreError::Backend`] ("syntax error").
/// - Keys up to [`RedisStoreBuilder::max_key_len`] bytes (default: Redis's bulk-string limit,
///   512 MiB less the namespace), reported by [`Store::max_key_len`]: the operators never send
///   a longer key (its item alone gets the failure policy); a call that holds one fails with
///   [`StoreError::KeyTooLong`]. The ttl is rounded up to whole milliseconds, at least 1 ms.
/// - A key that holds a value of another Redis type in the namespace makes the batch fail
///   with [`StoreError::Backend`] (`WRONGTYPE`).
/// - A namespace is 1 to 128 printable ASCII characters other than `:` (letters, digits, `-`,
///   `_`, `.`, …), with braces only around one hash tag; any other is refused when the store
///   is made. Without `:` in namespaces, the first `:` of a Redis key ends its namespace, so the
///   keys of two namespaces never meet.
/// - On Redis Cluster, a namespace with a hash tag (such as `{payments}`) puts all its keys
///   in one slot, on one node: one pipeline per batch, and no spreading of the load.
///
/// # Connecting
///
/// The constructors that connect ([`connect`](RedisStore::connect),
/// [`connect_cluster`](RedisStore::connect_cluster), [`from_client`](RedisStore::from_client)
/// and the builder's) check the connection before they answer, within the connection timeout:
/// a `PING` (after the login, when the URL has a user name or password), so that a server that
/// needs a password, or refuses the one given, fails here with an error that says so (`NOAUTH`,
/// `WRONGPASS`) rather than on every call. A plain connection to a node of a Redis Cluster
/// (cluster mode on) is refused with the fix: use `connect_cluster`. `rediss://` URLs (TLS)
/// need the cargo feature `redis-tls` (rustls, with the system's root certificates); without
/// it, such a URL fails with an error that names the feature. Errors name the server by host
/// and port, never by URL: a URL may hold a password.
///
/// Clones share one connection (a handle); `Debug` shows the namespace, the deployment, the
/// timeout and the key limit, never the URL or its credentials.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use stream_dedup::store::{InsertBatch, Inserted, RedisStore, Store};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379", "payments").await?;
/// let ttl = Duration::from_secs(3600);
/// let keys = vec![b"12345/payment".to_vec(), b"12346/payment".to_vec()];
/// let answers = store.insert(InsertBatch::new(keys, ttl)).await?;
/// assert_eq!(answers.len(), 2);
/// if answers[0] == Inserted::Present {
///     println!("order 12345 was paid already");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let deployment = match self.inner.conn {
            Conn::Single(_) => "single",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("namespace", &self.inner.namespace)
            .field("deployment", &deployment)
            .field("timeout", &self.inner.timeout)
            .field("max_key_len", &self.inner.max_key_len)
            .finish()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` with the feature `redis-tls`) with the default timeouts, and checks the
    /// connection (a `PING`); every key of this store is prefixed with `namespace` and `:`.
    ///
    /// Shorthand for [`RedisStore::builder(namespace).connect(url)`](RedisStoreBuilder::connect).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when no connection can be made (refused, or no answer
    /// within the connection timeout), and [`StoreError::Backend`] for an invalid namespace, a
    /// malformed URL, a `rediss://` URL without TLS support compiled in, a login Redis refuses
    /// (or a password it needs and the URL lacks), or a node of a Redis Cluster.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use stream_dedup::store::RedisStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), stream_dedup::store::StoreError> {
    /// let store = RedisStore::connect("redis://127.0.0.1:6379", "payments").await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str, namespace: &str) -> Result<RedisStore, StoreError> {
        RedisStore::builder(namespace).connect(url).await
    }

    /// Connects through an existing redis-rs [`Client`](redis::Client), in a new
    /// [`ConnectionManager`] configured with the default timeouts, and checks the connection.
    ///
    /// Shorthand for [`RedisStore::builder(namespace).client(client)`](RedisStoreBuilder::client).
    ///
    /// # Errors
    ///
    /// As [`connect`](RedisStore::connect).
    pub async fn from_client(
        client: redis::Client,
        namespace: &str,
    ) -> Result<RedisStore, StoreError> {
        RedisStore::builder(namespace).client(client).await
    }

    /// Uses an existing redis-rs [`ConnectionManager`] (shared with the rest of the
    /// application), with its own reconnect and response-timeout settings; the store adds its
    /// deadline (default 500 ms) around each call. The connection is not checked (this does
    /// not wait): errors of Redis show on the first call.
    ///
    /// Shorthand for
    /// [`RedisStore::builder(namespace).connection_manager(manager)`](RedisStoreBuilder::connection_manager).
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] for an invalid namespace.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use stream_dedup::store::RedisStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379")?;
    /// let manager = redis::aio::ConnectionManager::new(client).await?;
    /// let store = RedisStore::from_connection_manager(manager.clone(), "payments")?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_connection_manager(
        manager: ConnectionManager,
        namespace: &str,
    ) -> Result<RedisStore, StoreError> {
        RedisStore::builder(namespace).connection_manager(manager)
    }

    /// Connects to a Redis Cluster through any of its nodes (`urls`), with the default
    /// timeouts, and checks the connection (a `PING` to every primary).
    ///
    /// Shorthand for
    /// [`RedisStore::builder(namespace).connect_cluster(urls)`](RedisStoreBuilder::connect_cluster).
    ///
    /// # Errors
    ///
    /// As [`connect`](RedisStore::connect).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use stream_dedup::store::RedisStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), stream_dedup::store::StoreError> {
    /// let nodes = ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"];
    /// let store = RedisStore::connect_cluster(nodes, "payments").await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_cluster<'a>(
        urls: impl IntoIterator<Item = &'a str>,
        namespace: &str,
    ) -> Result<RedisStore, StoreError> {
        RedisStore::builder(namespace).connect_cluster(urls).await
    }

    /// Uses an existing redis-rs cluster connection, with its own settings; the store adds its
    /// deadline (default 500 ms) around each call. The connection is not checked.
    ///
    /// Shorthand for
    /// [`RedisStore::builder(namespace).cluster_connection(connection)`](RedisStoreBuilder::cluster_connection).
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] for an invalid namespace.
    pub fn from_cluster_connection(
        connection: ClusterConnection,
        namespace: &str,
    ) -> Result<RedisStore, StoreError> {
        RedisStore::builder(namespace).cluster_connection(connection)
    }

    /// A builder, to set the timeouts before connecting.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use stream_dedup::store::RedisStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), stream_dedup::store::StoreError> {
    /// let store = RedisStore::builder("payments")
    ///     .timeout(Duration::from_millis(200))
    ///     .connection_timeout(Duration::from_millis(100))
    ///     .connect("redis://127.0.0.1:6379")
    ///     .await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(namespace: &str) -> RedisStoreBuilder {
        RedisStoreBuilder {
            namespace: namespace.into(),
            timeout: DEFAULT_TIMEOUT,
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            max_key_len: usize::MAX,
        }
    }

    /// The namespace: every key of this store is stored as `{namespace}:{key}`.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The deadline of one call.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }
}

/// Settings for a [`RedisStore`], then the connection: from [`RedisStore::builder`].
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until it connects"]
pub struct RedisStoreBuilder {
    namespace: Box<str>,
    timeout: Duration,
    connection_timeout: Duration,
    max_key_len: usize,
}

impl RedisStoreBuilder {
    /// The deadline of one store call (default **500 ms**, redis-rs's own default response
    /// timeout): the store fails a call with [`StoreError::Timeout`] once it has waited that
    /// long, whatever it waits for (a reply, or a reconnect). For connections the store makes,
    /// it is also the connection manager's response timeout.
    ///
    /// A batch of 1,000 keys takes 3–5 ms on a loopback Redis; set it well above the round
    /// trip of your largest batch.
    ///
    /// # Panics
    ///
    /// If `timeout` is zero.
    #[track_caller]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        assert!(!timeout.is_zero(), "a RedisStore timeout must not be zero");
        self.timeout = timeout;
        self
    }

    /// The limit on one attempt to open a connection (default **500 ms**), for connections
    /// the store makes. Once a connection is lost, each attempt to reconnect is limited by it
    /// too.
    ///
    /// # Panics
    ///
    /// If `timeout` is zero.
    #[track_caller]
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "a RedisStore connection timeout must not be zero"
        );
        self.connection_timeout = timeout;
        self
    }

    /// The longest key, in bytes, that the store takes (default and most: Redis's limit on a
    /// string, 512 MiB, less the namespace and its `:`), as [`Store::max_key_len`] reports
    /// it: the operators never send a longer key, they give its item alone the failure policy
    /// with [`StoreError::KeyTooLong`] (also when their own
    /// [`max_key_len`](crate::StoreWindow::max_key_len) is larger). A lower limit keeps
    /// outsized keys out of Redis's memory.
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.max_key_len = bytes;
        self
    }

    /// Connects to the Redis at `url`, in a new [`ConnectionManager`], and checks the
    /// connection: a `PING` (after the login the URL asks for) and `INFO cluster`, within the
    /// connection timeout.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when no connection can be made: refused, or no answer
    /// within the connection timeout (plus the call timeout, for the first replies); and
    /// [`StoreError::Backend`] for an invalid namespace, a malformed URL, a `rediss://` URL
    /// without the feature `redis-tls`, a login Redis refuses (`WRONGPASS`) or a password it
    /// needs and the URL lacks (`NOAUTH`), or a node of a Redis Cluster (use
    /// [`connect_cluster`](RedisStoreBuilder::connect_cluster)).
    pub async fn connect(self, url: &str) -> Result<RedisStore, StoreError> {
        check_namespace(&self.namespace)?;
        let info = parse_url(url)?;
        let client = redis::Client::open(info).map_err(|e| error::url_error(url, e))?;
        self.client(client).await
    }

    /// Connects through an existing redis-rs [`Client`](redis::Client), in a new
    /// [`ConnectionManager`] with this builder's timeouts, and checks the connection as
    /// [`connect`](RedisStoreBuilder::connect) does.
    ///
    /// # Errors
    ///
    /// As [`connect`](RedisStoreBuilder::connect).
    pub async fn client(self, client: redis::Client) -> Result<RedisStore, StoreError> {
        check_namespace(&self.namespace)?;
        let addr = client.get_connection_info().addr();
        let target = Target::single(addr);
        tls_provider(addr);
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.timeout))
            .set_connection_timeout(Some(self.connection_timeout))
            // One attempt per reconnect: calls fail fast while Redis is down and the next
            // call tries again, instead of every call waiting out a backoff of seconds.
            .set_number_of_retries(0);
        // Connecting, then the connection's setup commands and the check (each answer within
        // the timeout).
        let limit = self.connection_timeout.saturating_add(self.timeout);
        let timeout = self.timeout;
        let connecting = async {
            let manager = ConnectionManager::new_with_config(client, config)
                .await
                .map_err(|e| map_error(CONNECT, e, timeout, &target))?;
            check_single(&manager, &target, timeout).await?;
            Ok(manager)
        };
        let manager = within(limit, &target, connecting).await?;
        self.build(Conn::Single(manager), target)
    }

    /// Uses an existing redis-rs [`ConnectionManager`], with its own reconnect and
    /// response-timeout settings; the store's deadline applies around each call. The
    /// connection is not checked (this does not wait).
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] for an invalid namespace.
    pub fn connection_manager(self, manager: ConnectionManager) -> Result<RedisStore, StoreError> {
        self.build(Conn::Single(manager), Target::given(false))
    }

    /// Connects to a Redis Cluster through any of its nodes (`urls`), with this builder's
    /// timeouts, and checks the connection (a `PING` to every primary).
    ///
    /// # Errors
    ///
    /// As [`connect`](RedisStoreBuilder::connect); a node without cluster mode is refused
    /// (use [`connect`](RedisStoreBuilder::connect)).
    pub async fn connect_cluster<'a>(
        self,
        urls: impl IntoIterator<Item = &'a str>,
    ) -> Result<RedisStore, StoreError> {
        check_namespace(&self.namespace)?;
        let nodes = urls
            .into_iter()
            .map(parse_url)
            .collect::<Result<Vec<_>, _>>()?;
        let target = Target::cluster(nodes.iter().map(redis::ConnectionInfo::addr));
        for node in &nodes {
            tls_provider(node.addr());
        }
        let client = ClusterClientBuilder::new(nodes)
            .connection_timeout(self.connection_timeout)
            .response_timeout(self.timeout)
            .build()
            .map_err(|e| map_error(CONNECT, e, self.timeout, &target))?;
        // Connecting to a cluster connects to every node: allow a few connection timeouts.
        let limit = self.connection_timeout.saturating_mul(4);
        let timeout = self.timeout;
        let connecting = async {
            let connection = client
                .get_async_connection()
                .await
                .map_err(|e| map_error(CONNECT, e, timeout, &target))?;
            check_cluster(&connection, &target, timeout).await?;
            Ok(connection)
        };
        let connection = within(limit, &target, connecting).await?;
        self.build(Conn::Cluster(Cluster::new(connection)), target)
    }

    /// Uses an existing redis-rs cluster connection, with its own settings; the store's
    /// deadline applies around each call. The connection is not checked.
    ///
    /// # Errors
    ///
    /// [`StoreError::Backend`] for an invalid namespace.
    pub fn cluster_connection(
        self,
        connection: ClusterConnection,
    ) -> Result<RedisStore, StoreError> {
        self.build(Conn::Cluster(Cluster::new(connection)), Target::given(true))
    }

    /// The store on `conn`, once its namespace is checked (the constructors that connect
    /// check it first, before any connection is made).
    fn build(self, conn: Conn, target: Target) -> Result<RedisStore, StoreError> {
        check_namespace(&self.namespace)?;
        let mut prefix = Vec::with_capacity(self.namespace.len() + 1);
        prefix.extend_from_slice(self.namespace.as_bytes());
        prefix.push(b':');
        let max_key_len = self
            .max_key_len
            .min(MAX_KEY_LEN.saturating_sub(prefix.len()));
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                namespace: self.namespace,
                prefix: prefix.into(),
                timeout: self.timeout,
                max_key_len,
                target,
            }),
        })
    }
}

/// Waits for `fut` (connecting to `target` and checking), for at most `limit`.
async fn within<T>(
    limit: Duration,
    target: &Target,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(connect_timed_out(target, limit)))
}

impl Store for RedisStore {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        self.call(move |inner| async move { inner.insert(batch).await })
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        self.call(move |inner| async move { inner.remove(keys).await })
    }

    /// Deletes each key whose value still holds the token (a done key holds the token, a key
    /// in flight `c` + the token), in a small Lua script per 1,000 keys.
    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        self.call(move |inner| async move { inner.take_back(keys).await })
    }

    fn max_key_len(&self) -> usize {
        self.inner.max_key_len()
    }

    fn namespace(&self) -> Option<&str> {
        Some(&self.inner.namespace)
    }
}

/// Claims on Redis. A done key holds the 16 bytes of the token that recorded it (as
/// [`Store::insert`] writes it); a key in flight holds `c` + its claim's token + the batch's
/// ttl ([`ClaimBatch::ttl`], decimal milliseconds, `0` when unknown), with an expiry of that
/// ttl **plus** the lease. `claim` is `SET key value NX GET PX ttl+lease`, pipelined like
/// `insert`; `commit` and `release` compare the token in a small Lua script (one call per
/// 1,000 keys on one Redis, per key on a Cluster).
///
/// The lease is over when less than the ttl is left of the key's expiry, by Redis's own clock
/// (`PTTL`), so consumers' clocks never matter. A key whose lease ran out is taken by the next
/// claim of it: a claim that finds another claim's key in flight asks a second script, for
/// those keys only, which takes each whose lease is over. A commit keeps the key's expiry
/// (`SET key token GET KEEPTTL`): a done key is kept until ttl + lease after its claim, so for
/// at least the ttl after a commit made within the lease (a commit that comes after the lease
/// ran out, the key not taken, keeps what is left of that), and Redis changes one value per
/// commit, where setting a new expiry also rewrote the key's entry in its table of expiries
/// (measured: the commit script ~24% cheaper for Redis). A consumer whose lease ran out cannot free a key
/// another consumer holds, nor change it as any other client sees it: a commit that finds
/// another claim's key puts it back within the same script, with the expiry it had, and is
/// refused. [`Store::insert`] (mark on emit) counts a key in flight as present, also once its
/// lease ran out and until a claim takes it: do not mix the two modes on one namespace if a
/// crashed claim's key must be processed by a mark-on-emit consumer.
impl ClaimStore for RedisStore {
    fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>> {
        self.call(move |inner| async move { inner.claim(batch).await })
    }

    fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>> {
        self.call(move |inner| async move { inner.commit(keys, ttl).await })
    }

    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        self.call(move |inner| async move { inner.release(keys).await })
    }

    fn renew(&self, keys: Vec<HeldKey>, lease: Duration) -> StoreFuture<Vec<bool>> {
        self.call(move |inner| async move { inner.renew(keys, lease).await })
    }
}

impl RedisStore {
    /// The future of one call: `call` on the shared connection, failed with
    /// [`StoreError::Timeout`] once the store's deadline has passed.
    fn call<T, F>(&self, call: impl FnOnce(Arc<Inner>) -> F) -> StoreFuture<T>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let deadline = inner.timeout;
        let fut = call(inner);
        Box::pin(async move {
            tokio::time::timeout(deadline, fut)
                .await
                .unwrap_or(Err(StoreError::Timeout(deadline)))
        })
    }
}
