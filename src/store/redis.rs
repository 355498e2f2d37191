use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisWrite, ServerErrorKind, ToRedisArgs, Value,
};

use super::{
    BoxError, ClaimBatch, ClaimStore, Claimed, HeldKey, InsertBatch, Inserted, Store, StoreError,
    StoreFuture, Token,
};

/// Default deadline of one store call: the connection manager's response timeout, and the
/// client-side limit on the whole call (waiting for a reconnect included).
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default limit on one attempt to open a connection.
const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_millis(500);
/// Redis refuses a bulk string longer than `proto-max-bulk-len` (512 MiB by default).
const MAX_KEY_LEN: usize = 512 * 1024 * 1024;
/// The longest ttl sent to Redis (100 years); Redis refuses an expiry that overflows its clock.
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
/// Redis Cluster's number of hash slots.
const SLOTS: usize = 16384;

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
/// - Keys up to Redis's bulk-string limit (512 MiB less the namespace), else
///   [`StoreError::KeyTooLong`]. The ttl is rounded up to whole milliseconds, at least 1 ms.
/// - A key that holds a value of another Redis type in the namespace makes the batch fail
///   with [`StoreError::Backend`] (`WRONGTYPE`).
/// - Namespaces are kept apart by their text and the `:`: do not nest them. The key `b:k` of
///   namespace `a` and the key `k` of namespace `a:b` are the same Redis key, `a:b:k`.
/// - On Redis Cluster, a namespace with a hash tag (such as `{payments}`) puts all its keys
///   in one slot, on one node: one pipeline per batch, and no spreading of the load.
///
/// Clones share one connection (a handle); `Debug` shows the namespace, the deployment and the
/// timeout, never the URL or its credentials.
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

struct Inner {
    conn: Conn,
    namespace: Box<str>,
    /// `namespace` and `:`, the start of every Redis key of this store.
    prefix: Box<[u8]>,
    timeout: Duration,
}

enum Conn {
    Single(ConnectionManager),
    Cluster(Cluster),
}

struct Cluster {
    conn: ClusterConnection,
    /// The slot map as last read; `None` until the first call and after a redirect.
    slots: Mutex<Option<Arc<SlotMap>>>,
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
            .finish()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` with a TLS feature of redis-rs) with the default timeouts; every key of this
    /// store is prefixed with `namespace` and `:`.
    ///
    /// Shorthand for [`RedisStore::builder(namespace).connect(url)`](RedisStoreBuilder::connect).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when no connection can be made,
    /// [`StoreError::Timeout`] when it takes longer than the connection timeout, and
    /// [`StoreError::Backend`] for a malformed URL or a refused login.
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
    /// [`ConnectionManager`] configured with the default timeouts.
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
    /// deadline (default 500 ms) around each call.
    ///
    /// Shorthand for
    /// [`RedisStore::builder(namespace).connection_manager(manager)`](RedisStoreBuilder::connection_manager).
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
    /// let store = RedisStore::from_connection_manager(manager.clone(), "payments");
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_connection_manager(manager: ConnectionManager, namespace: &str) -> RedisStore {
        RedisStore::builder(namespace).connection_manager(manager)
    }

    /// Connects to a Redis Cluster through any of its nodes (`urls`), with the default
    /// timeouts.
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
    /// deadline (default 500 ms) around each call.
    ///
    /// Shorthand for
    /// [`RedisStore::builder(namespace).cluster_connection(connection)`](RedisStoreBuilder::cluster_connection).
    pub fn from_cluster_connection(connection: ClusterConnection, namespace: &str) -> RedisStore {
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

    /// Connects to the Redis at `url`, in a new [`ConnectionManager`].
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when no connection can be made,
    /// [`StoreError::Timeout`] when it takes longer than the connection timeout, and
    /// [`StoreError::Backend`] for a malformed URL or a refused login.
    pub async fn connect(self, url: &str) -> Result<RedisStore, StoreError> {
        let client =
            redis::Client::open(url).map_err(|e| StoreError::backend("parse the Redis URL", e))?;
        self.client(client).await
    }

    /// Connects through an existing redis-rs [`Client`](redis::Client), in a new
    /// [`ConnectionManager`] with this builder's timeouts.
    ///
    /// # Errors
    ///
    /// As [`connect`](RedisStoreBuilder::connect).
    pub async fn client(self, client: redis::Client) -> Result<RedisStore, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.timeout))
            .set_connection_timeout(Some(self.connection_timeout))
            // One attempt per reconnect: calls fail fast while Redis is down and the next
            // call tries again, instead of every call waiting out a backoff of seconds.
            .set_number_of_retries(0);
        // Connecting, then the connection's setup commands (each answer within the timeout).
        let limit = self.connection_timeout.saturating_add(self.timeout);
        let connecting = ConnectionManager::new_with_config(client, config);
        let manager = match tokio::time::timeout(limit, connecting).await {
            Ok(manager) => manager.map_err(|e| map_error("connect", e, self.timeout))?,
            Err(_) => return Err(StoreError::Timeout(limit)),
        };
        Ok(self.connection_manager(manager))
    }

    /// Uses an existing redis-rs [`ConnectionManager`], with its own reconnect and
    /// response-timeout settings; the store's deadline applies around each call.
    pub fn connection_manager(self, manager: ConnectionManager) -> RedisStore {
        self.build(Conn::Single(manager))
    }

    /// Connects to a Redis Cluster through any of its nodes (`urls`), with this builder's
    /// timeouts.
    ///
    /// # Errors
    ///
    /// As [`connect`](RedisStoreBuilder::connect).
    pub async fn connect_cluster<'a>(
        self,
        urls: impl IntoIterator<Item = &'a str>,
    ) -> Result<RedisStore, StoreError> {
        let client = ClusterClientBuilder::new(urls)
            .connection_timeout(self.connection_timeout)
            .response_timeout(self.timeout)
            .build()
            .map_err(|e| StoreError::backend("parse the Redis Cluster URLs", e))?;
        // Connecting to a cluster connects to every node: allow a few connection timeouts.
        let limit = self.connection_timeout.saturating_mul(4);
        let connection = match tokio::time::timeout(limit, client.get_async_connection()).await {
            Ok(connection) => connection.map_err(|e| map_error("connect", e, self.timeout))?,
            Err(_) => return Err(StoreError::Timeout(limit)),
        };
        Ok(self.cluster_connection(connection))
    }

    /// Uses an existing redis-rs cluster connection, with its own settings; the store's
    /// deadline applies around each call.
    pub fn cluster_connection(self, connection: ClusterConnection) -> RedisStore {
        self.build(Conn::Cluster(Cluster {
            conn: connection,
            slots: Mutex::new(None),
        }))
    }

    fn build(self, conn: Conn) -> RedisStore {
        let mut prefix = Vec::with_capacity(self.namespace.len() + 1);
        prefix.extend_from_slice(self.namespace.as_bytes());
        prefix.push(b':');
        RedisStore {
            inner: Arc::new(Inner {
                conn,
                namespace: self.namespace,
                prefix: prefix.into(),
                timeout: self.timeout,
            }),
        }
    }
}

impl Store for RedisStore {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let deadline = inner.timeout;
            within(deadline, inner.insert(batch)).await
        })
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let deadline = inner.timeout;
            within(deadline, inner.remove(keys)).await
        })
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
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let deadline = inner.timeout;
            within(deadline, inner.claim(batch)).await
        })
    }

    fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let deadline = inner.timeout;
            within(deadline, inner.commit(keys, ttl)).await
        })
    }

    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let deadline = inner.timeout;
            within(deadline, inner.release(keys)).await
        })
    }
}

/// Marks a key done if it is free, or held (in flight or done) by this claim's token, with one
/// command per key: `SET key done GET KEEPTTL` answers what the key held, and keeps its expiry
/// (the claim's ttl + lease). The usual answer is the claim's whole in-flight value, for which
/// nothing more is done. A key that was free (it now has no expiry) or held by this token with
/// another ttl gets the commit's ttl (`PEXPIRE`). If the key held another claim's value, the
/// script puts it back, with the same expiry, before anything else can run (Redis runs a
/// script alone), so no client ever sees the change. A key that is not a string is refused and
/// left alone (`SET … GET` fails before it writes).
///
/// KEYS = the keys; ARGV[1] = ttl in ms, then runs of (count, in-flight value for this ttl,
/// done value) that cover the keys in order (the keys of one claim batch share a token).
/// Returns how many keys it went through, then the positions (1-based) of those it refused,
/// usually none: an answer per key cost Redis a table entry and the client a parsed reply
/// each.
const COMMIT_SCRIPT: &str = r"
local ttl = ARGV[1]
local refused = {0}
local i, a = 1, 2
while a < #ARGV do
  local last, whole, done = i + tonumber(ARGV[a]) - 1, ARGV[a + 1], ARGV[a + 2]
  local mine = string.sub(whole, 1, 17)
  for j = i, last do
    local key = KEYS[j]
    local held = redis.pcall('SET', key, done, 'GET', 'KEEPTTL')
    if held == whole or held == done then
    elseif type(held) == 'table' then
      refused[#refused + 1] = j
    elseif not held or string.sub(held, 1, 17) == mine then
      redis.call('PEXPIRE', key, ttl)
    else
      redis.call('SET', key, held, 'KEEPTTL')
      refused[#refused + 1] = j
    end
  end
  i, a = last + 1, a + 3
end
refused[1] = i - 1
return refused
";

/// Takes the keys whose lease ran out, for a claim that found them in flight: a key in flight
/// holds its claim's ttl after the 17-byte prefix, and its lease is over once no more than
/// that ttl is left of its expiry (`PTTL`, Redis's clock). A value whose ttl cannot be read
/// is left to its own expiry.
///
/// KEYS = the keys; ARGV = this claim's in-flight value, its expiry in ms. Answers per key:
/// 1 = taken (or already this claim's), 2 = in flight under a running lease, 3 = done.
const TAKEOVER_SCRIPT: &str = r"
local value, px = ARGV[1], ARGV[2]
local mine = string.sub(value, 1, 17)
local answers = {}
for j = 1, #KEYS do
  local key = KEYS[j]
  local held = redis.pcall('GET', key)
  local answer = 2
  if not held then
    redis.call('SET', key, value, 'PX', px)
    answer = 1
  elseif type(held) == 'table' then
    answer = 2
  elseif string.sub(held, 1, 17) == mine then
    answer = 1
  elseif #held >= 17 and string.byte(held, 1) == 99 then
    local keep = string.sub(held, 18)
    if #keep <= 15 and string.match(keep, '^%d+$') then
      local left = redis.call('PTTL', key)
      if left < 0 or left <= tonumber(keep) then
        redis.call('SET', key, value, 'PX', px)
        answer = 1
      end
    end
  else
    answer = 3
  end
  answers[j] = answer
end
return answers
";

/// Frees keys that these claims still hold in flight. KEYS = the keys; ARGV = runs of (count,
/// in-flight prefix) that cover the keys in order. Returns how many were freed.
const RELEASE_SCRIPT: &str = r"
local freed = 0
local i, a = 1, 1
while a < #ARGV do
  local last, mine = i + tonumber(ARGV[a]) - 1, ARGV[a + 1]
  for j = i, last do
    local held = redis.call('GET', KEYS[j])
    if held and string.sub(held, 1, 17) == mine then
      freed = freed + redis.call('DEL', KEYS[j])
    end
  end
  i, a = last + 1, a + 2
end
return freed
";

/// Keys per call of the batch scripts: Redis runs a script alone, so a call is kept short
/// (~1 ms) for the other clients of the server.
const KEYS_PER_SCRIPT: usize = 1000;

/// A Redis key as one command argument: the namespace prefix, then the key's bytes, written
/// straight into the command (no buffer of its own).
#[derive(Clone, Copy)]
struct Prefixed<'a>(&'a [u8], &'a [u8]);

impl Prefixed<'_> {
    fn len(self) -> usize {
        self.0.len() + self.1.len()
    }
}

impl ToRedisArgs for Prefixed<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut arg = out.writer_for_next_arg();
        // Writes into the command's own buffer, which cannot fail.
        let _ = arg.write_all(self.0);
        let _ = arg.write_all(self.1);
    }
}

/// An empty `SET` for a key of `key_len` bytes, sized for its arguments (value, `NX`, `GET`,
/// `PX`, ttl): built without a reallocation, as every key of every batch needs one.
fn set_command(key_len: usize) -> Cmd {
    let mut cmd = Cmd::with_capacity(7, key_len + IN_FLIGHT_MAX + 3 + 2 + 3 + 2 + 20);
    cmd.arg("SET");
    cmd
}

/// The first bytes of the value of a key in flight: `c`, then the claim's token. Commits and
/// releases compare them.
fn in_flight_prefix(token: Token) -> [u8; 17] {
    let mut value = [b'c'; 17];
    value[1..].copy_from_slice(&token.to_bytes());
    value
}

/// The longest in-flight value: the prefix and a ttl in decimal milliseconds.
const IN_FLIGHT_MAX: usize = 17 + 20;

/// The value of a key in flight: [`in_flight_prefix`], then the ttl the key is kept for once
/// done, in decimal milliseconds (`0`: unknown). The key's expiry is that ttl plus the lease,
/// so the lease is over once no more than the ttl is left; a commit with the same ttl finds
/// exactly this value and keeps the expiry.
fn in_flight_value(token: Token, keep_ms: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(IN_FLIGHT_MAX);
    value.extend_from_slice(&in_flight_prefix(token));
    value.extend_from_slice(keep_ms.to_string().as_bytes());
    value
}

/// A claim's ttl in ms for its in-flight value: `0` when the batch gives none.
fn keep_millis(ttl: Duration) -> u64 {
    if ttl.is_zero() { 0 } else { ttl_millis(ttl) }
}

/// Whether a key's value is a claim's in-flight value (a done value is 16 bytes).
fn is_in_flight(value: &[u8]) -> bool {
    value.len() >= 17 && value[0] == b'c'
}

/// Runs of equal tokens in `tokens`, in order: (length, token). The keys of one claim batch
/// share a token, so a script call names each token once per run, not once per key.
fn token_runs(tokens: &[Token]) -> Vec<(usize, Token)> {
    let mut runs: Vec<(usize, Token)> = Vec::new();
    for &token in tokens {
        match runs.last_mut() {
            Some((n, t)) if *t == token => *n += 1,
            _ => runs.push((1, token)),
        }
    }
    runs
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

impl Inner {
    async fn insert(&self, batch: InsertBatch) -> Result<Vec<Inserted>, StoreError> {
        const OP: &str = "insert keys";
        if batch.keys.is_empty() {
            return Ok(Vec::new());
        }
        let token = batch.token.to_bytes();
        let ttl = ttl_millis(batch.ttl);
        self.check_keys(&batch.keys)?;
        let keys = &batch.keys;
        let replies = self
            .run(OP, keys, |_, key| {
                let mut cmd = set_command(key.len());
                cmd.arg(key)
                    .arg(&token[..])
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(ttl);
                cmd
            })
            .await?;
        replies
            .into_iter()
            .map(|reply| match reply {
                Value::Nil => Ok(Inserted::New),
                Value::BulkString(held) if held == token => Ok(Inserted::New),
                Value::BulkString(_) => Ok(Inserted::Present),
                other => Err(unexpected(OP, other)),
            })
            .collect()
    }

    async fn claim(&self, batch: ClaimBatch) -> Result<Vec<Claimed>, StoreError> {
        const OP: &str = "claim keys";
        if batch.keys.is_empty() {
            return Ok(Vec::new());
        }
        // The lease is what the expiry holds beyond the ttl: the ttl is cut short rather than
        // the lease when the two exceed Redis's longest expiry.
        let lease_ms = ttl_millis(batch.lease);
        let keep = keep_millis(batch.ttl).min(MAX_TTL_MS - lease_ms);
        let px = lease_ms + keep;
        let mine = in_flight_value(batch.token, keep);
        let prefix = in_flight_prefix(batch.token);
        self.check_keys(&batch.keys)?;
        let keys = &batch.keys;
        let replies = self
            .run(OP, keys, |_, key| {
                let mut cmd = set_command(key.len());
                cmd.arg(key)
                    .arg(&mine[..])
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(px);
                cmd
            })
            .await?;
        let mut answers = Vec::with_capacity(replies.len());
        // Keys in flight under another claim: their lease may have run out.
        let mut busy = Vec::new();
        for (i, reply) in replies.into_iter().enumerate() {
            answers.push(match reply {
                Value::Nil => Claimed::Mine,
                // A retry of this request (its first attempt was applied).
                Value::BulkString(held) if held.starts_with(&prefix) => Claimed::Mine,
                Value::BulkString(held) if is_in_flight(&held) => {
                    busy.push(i);
                    Claimed::InFlight
                }
                Value::BulkString(_) => Claimed::Done,
                other => return Err(unexpected(OP, other)),
            });
        }
        if !busy.is_empty() {
            let busy_keys: Vec<Vec<u8>> = busy.iter().map(|&i| keys[i].clone()).collect();
            let replies = self
                .run_scripts(OP, &busy_keys, |range| {
                    let mut cmd = self.script(TAKEOVER_SCRIPT, &busy_keys[range]);
                    cmd.arg(&mine[..]).arg(px);
                    cmd
                })
                .await?;
            for (range, reply) in replies {
                let taken = takeover_answers(OP, reply)?;
                if taken.len() != range.len() {
                    return Err(StoreError::backend(
                        OP,
                        format!("{} answers for {} keys", taken.len(), range.len()),
                    ));
                }
                for (at, answer) in range.zip(taken) {
                    answers[busy[at]] = answer;
                }
            }
        }
        Ok(answers)
    }

    async fn commit(&self, held: Vec<HeldKey>, ttl: Duration) -> Result<Vec<bool>, StoreError> {
        const OP: &str = "commit claims";
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let (keys, tokens): (Vec<Vec<u8>>, Vec<Token>) = held.into_iter().unzip();
        self.check_keys(&keys)?;
        let ttl = ttl_millis(ttl);
        let replies = self
            .run_scripts(OP, &keys, |range| {
                let mut cmd = self.script(COMMIT_SCRIPT, &keys[range.clone()]);
                cmd.arg(ttl);
                for (n, token) in token_runs(&tokens[range]) {
                    cmd.arg(n)
                        .arg(&in_flight_value(token, ttl)[..])
                        .arg(&token.to_bytes()[..]);
                }
                cmd
            })
            .await?;
        let mut answers = vec![true; keys.len()];
        for (range, reply) in replies {
            for at in refused_positions(OP, range, reply)? {
                answers[at] = false;
            }
        }
        Ok(answers)
    }

    async fn release(&self, held: Vec<HeldKey>) -> Result<(), StoreError> {
        const OP: &str = "release claims";
        if held.is_empty() {
            return Ok(());
        }
        let (keys, tokens): (Vec<Vec<u8>>, Vec<Token>) = held.into_iter().unzip();
        self.check_keys(&keys)?;
        let replies = self
            .run_scripts(OP, &keys, |range| {
                let mut cmd = self.script(RELEASE_SCRIPT, &keys[range.clone()]);
                for (n, token) in token_runs(&tokens[range]) {
                    cmd.arg(n).arg(&in_flight_prefix(token)[..]);
                }
                cmd
            })
            .await?;
        match replies
            .into_iter()
            .find(|(_, r)| !matches!(r, Value::Int(_)))
        {
            None => Ok(()),
            Some((_, other)) => Err(unexpected(OP, other)),
        }
    }

    async fn remove(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        const OP: &str = "remove keys";
        if keys.is_empty() {
            return Ok(());
        }
        self.check_keys(&keys)?;
        let replies = self
            .run(OP, &keys, |_, key| {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(key);
                cmd
            })
            .await?;
        match replies.into_iter().find(|r| !matches!(r, Value::Int(_))) {
            None => Ok(()),
            Some(other) => Err(unexpected(OP, other)),
        }
    }

    /// Fails if a key is too long for Redis once prefixed.
    fn check_keys(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let max = MAX_KEY_LEN.saturating_sub(self.prefix.len());
        match keys.iter().find(|key| key.len() > max) {
            Some(key) => Err(StoreError::KeyTooLong {
                len: key.len(),
                max,
            }),
            None => Ok(()),
        }
    }

    /// `EVAL script` on `keys` (prefixed), sized for them; the caller adds the arguments.
    fn script(&self, script: &str, keys: &[Vec<u8>]) -> Cmd {
        let bytes: usize = keys.iter().map(|k| self.prefix.len() + k.len()).sum();
        let mut cmd = Cmd::with_capacity(keys.len() + 8, bytes + script.len() + 256);
        cmd.arg("EVAL").arg(script).arg(keys.len());
        for key in keys {
            cmd.arg(self.prefixed(key));
        }
        cmd
    }

    /// `key` as its Redis key: the prefix, then the key's bytes.
    fn prefixed<'a>(&'a self, key: &'a [u8]) -> Prefixed<'a> {
        Prefixed(&self.prefix, key)
    }

    /// The Redis keys, each in a buffer of its own (to route them on a Cluster).
    fn full_keys(&self, keys: &[Vec<u8>]) -> Vec<Vec<u8>> {
        keys.iter()
            .map(|key| {
                let mut full = Vec::with_capacity(self.prefix.len() + key.len());
                full.extend_from_slice(&self.prefix);
                full.extend_from_slice(key);
                full
            })
            .collect()
    }

    /// One script command per chunk of [`KEYS_PER_SCRIPT`] keys (per key on a Cluster), made
    /// by `cmd` from the chunk's range, pipelined; the replies in order, one per command.
    async fn run_scripts(
        &self,
        op: &'static str,
        keys: &[Vec<u8>],
        cmd: impl Fn(std::ops::Range<usize>) -> Cmd,
    ) -> Result<Vec<(std::ops::Range<usize>, Value)>, StoreError> {
        let manager = match &self.conn {
            Conn::Single(manager) => manager,
            // The keys of one script call must share a slot: one call per key.
            Conn::Cluster(cluster) => {
                let full = self.full_keys(keys);
                let replies = cluster
                    .run(op, &full, &|i, _: &[u8]| cmd(i..i + 1), self.timeout)
                    .await?;
                let replies = self.replies(op, replies, keys.len())?;
                return Ok(replies
                    .into_iter()
                    .enumerate()
                    .map(|(i, reply)| (i..i + 1, reply))
                    .collect());
            }
        };
        let ranges: Vec<_> = (0..keys.len())
            .step_by(KEYS_PER_SCRIPT)
            .map(|start| start..keys.len().min(start + KEYS_PER_SCRIPT))
            .collect();
        let mut pipe = Pipeline::with_capacity(ranges.len());
        for range in &ranges {
            pipe.add_command(cmd(range.clone()));
        }
        pipe.ignore_errors();
        // Commits and releases compare tokens, so sending them again is safe.
        let replies = self.send(op, manager, &pipe).await?;
        let replies = self.replies(op, replies, ranges.len())?;
        Ok(ranges.into_iter().zip(replies).collect())
    }

    /// Sends `pipe` through the connection manager, once more if the connection was found
    /// broken (closed while idle, Redis restarted: the manager has started a new one). Every
    /// caller's commands are safe to repeat.
    async fn send(
        &self,
        op: &'static str,
        manager: &ConnectionManager,
        pipe: &Pipeline,
    ) -> Result<Vec<Value>, StoreError> {
        let mut conn = manager.clone();
        match pipe.query_async::<Vec<Value>>(&mut conn).await {
            Ok(replies) => Ok(replies),
            Err(e) if e.is_io_error() && !e.is_timeout() => pipe
                .query_async::<Vec<Value>>(&mut conn)
                .await
                .map_err(|e| map_error(op, e, self.timeout)),
            Err(e) => Err(map_error(op, e, self.timeout)),
        }
    }

    /// `expected` replies, each an error if Redis answered one.
    fn replies(
        &self,
        op: &'static str,
        replies: Vec<Value>,
        expected: usize,
    ) -> Result<Vec<Value>, StoreError> {
        if replies.len() != expected {
            return Err(StoreError::backend(
                op,
                format!(
                    "Redis sent {} replies to {expected} commands",
                    replies.len()
                ),
            ));
        }
        replies
            .into_iter()
            .map(|reply| match reply {
                Value::ServerError(e) => Err(map_error(op, e.into(), self.timeout)),
                reply => Ok(reply),
            })
            .collect()
    }

    /// Sends `cmd(i, key)` for every key, pipelined, and returns the replies in the order of
    /// the keys. A reply that is a Redis error fails the call.
    async fn run(
        &self,
        op: &'static str,
        keys: &[Vec<u8>],
        cmd: impl Fn(usize, Prefixed<'_>) -> Cmd,
    ) -> Result<Vec<Value>, StoreError> {
        let replies = match &self.conn {
            Conn::Single(manager) => {
                let mut pipe = Pipeline::with_capacity(keys.len());
                for (i, key) in keys.iter().enumerate() {
                    pipe.add_command(cmd(i, self.prefixed(key)));
                }
                pipe.ignore_errors();
                // Safe to repeat: a key that holds this request's token answers `New`, and
                // `DEL` of a deleted key does nothing.
                self.send(op, manager, &pipe).await?
            }
            Conn::Cluster(cluster) => {
                let full = self.full_keys(keys);
                let cmd = |i: usize, _: &[u8]| cmd(i, self.prefixed(&keys[i]));
                cluster.run(op, &full, &cmd, self.timeout).await?
            }
        };
        self.replies(op, replies, keys.len())
    }
}

impl Cluster {
    /// One pipeline per node, concurrently; redirected keys again one by one.
    async fn run(
        &self,
        op: &'static str,
        keys: &[Vec<u8>],
        cmd: &impl Fn(usize, &[u8]) -> Cmd,
        timeout: Duration,
    ) -> Result<Vec<Value>, StoreError> {
        let map = self.slot_map(timeout).await?;
        let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); map.nodes];
        let mut one_by_one = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match map.node_of(key_slot(key)) {
                Some(node) => per_node[node].push(i),
                None => one_by_one.push(i),
            }
        }

        let pipelines = per_node.iter().filter(|ks| !ks.is_empty()).map(|ks| {
            let mut pipe = Pipeline::with_capacity(ks.len());
            for &i in ks {
                pipe.add_command(cmd(i, &keys[i]));
            }
            // Every key of `ks` is on the node of its first key, by our slot map.
            let route = Route::with_key(&keys[ks[0]], SlotAddr::Master);
            let mut conn = self.conn.clone();
            async move {
                let replies = conn
                    .route_pipeline(
                        pipe,
                        0,
                        ks.len(),
                        SingleNodeRoutingInfo::SpecificNode(route),
                    )
                    .await;
                (ks, replies)
            }
        });
        let mut replies: Vec<Option<Value>> = (0..keys.len()).map(|_| None).collect();
        for (ks, answer) in join_all(pipelines).await {
            let answer = match answer {
                Ok(answer) => answer,
                // redis-rs re-sends a whole pipeline to the node a redirect names; keys of
                // other slots bounce, and the redirect comes back as the pipeline's error.
                Err(e) if is_redirect_error(&e) => {
                    one_by_one.extend_from_slice(ks);
                    continue;
                }
                Err(e) => return Err(map_error(op, e, timeout)),
            };
            if answer.len() != ks.len() {
                return Err(StoreError::backend(
                    op,
                    format!(
                        "a node sent {} replies to {} commands",
                        answer.len(),
                        ks.len()
                    ),
                ));
            }
            for (&i, reply) in ks.iter().zip(answer) {
                if is_redirect(&reply) {
                    one_by_one.push(i);
                } else {
                    replies[i] = Some(reply);
                }
            }
        }

        if !one_by_one.is_empty() {
            // The slot map is out of date (slots moving, or a failover): read it again next
            // time, and let redis-rs's routing follow the redirects for these keys now.
            *self.slots.lock().unwrap_or_else(PoisonError::into_inner) = None;
            let singles = one_by_one.into_iter().map(|i| {
                let cmd = cmd(i, &keys[i]);
                let mut conn = self.conn.clone();
                async move { (i, cmd.query_async::<Value>(&mut conn).await) }
            });
            for (i, reply) in join_all(singles).await {
                replies[i] = Some(reply.map_err(|e| map_error(op, e, timeout))?);
            }
        }
        replies
            .into_iter()
            .map(|r| r.ok_or_else(|| StoreError::backend(op, "a key got no reply")))
            .collect()
    }

    /// The slot map, read with `CLUSTER SLOTS` when there is none.
    async fn slot_map(&self, timeout: Duration) -> Result<Arc<SlotMap>, StoreError> {
        const OP: &str = "read the cluster's slot map";
        if let Some(map) = &*self.slots.lock().unwrap_or_else(PoisonError::into_inner) {
            return Ok(Arc::clone(map));
        }
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let reply = self
            .conn
            .clone()
            .route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await
            .map_err(|e| map_error(OP, e, timeout))?;
        let map = Arc::new(SlotMap::parse(&reply).map_err(|e| StoreError::backend(OP, e))?);
        *self.slots.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&map));
        Ok(map)
    }
}

/// Which node (an index) serves each hash slot, from `CLUSTER SLOTS`.
#[derive(Debug)]
struct SlotMap {
    /// Per slot, the node's index, or `u16::MAX` when no node serves it.
    owner: Vec<u16>,
    /// How many nodes.
    nodes: usize,
}

impl SlotMap {
    /// Parses the reply of `CLUSTER SLOTS`: `[[start, end, [host, port, ..], replicas..], ..]`.
    fn parse(reply: &Value) -> Result<SlotMap, String> {
        let bad = || format!("unexpected reply to CLUSTER SLOTS: {reply:?}");
        let Value::Array(ranges) = reply else {
            return Err(bad());
        };
        let mut owner = vec![u16::MAX; SLOTS];
        let mut nodes: Vec<(Vec<u8>, i64)> = Vec::new();
        for range in ranges {
            let Value::Array(range) = range else {
                return Err(bad());
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
                (range.first(), range.get(1), range.get(2))
            else {
                return Err(bad());
            };
            let host = match primary.first() {
                Some(Value::BulkString(host)) => host.clone(),
                Some(Value::SimpleString(host)) => host.clone().into_bytes(),
                _ => return Err(bad()),
            };
            let Some(Value::Int(port)) = primary.get(1) else {
                return Err(bad());
            };
            let node = (host, *port);
            let index = match nodes.iter().position(|n| *n == node) {
                Some(index) => index,
                None => {
                    nodes.push(node);
                    nodes.len() - 1
                }
            };
            let index = u16::try_from(index).map_err(|_| bad())?;
            let (Ok(start), Ok(end)) = (usize::try_from(*start), usize::try_from(*end)) else {
                return Err(bad());
            };
            if start > end || end >= SLOTS {
                return Err(bad());
            }
            owner[start..=end].fill(index);
        }
        Ok(SlotMap {
            owner,
            nodes: nodes.len(),
        })
    }

    fn node_of(&self, slot: u16) -> Option<usize> {
        match self.owner[usize::from(slot)] {
            u16::MAX => None,
            node => Some(usize::from(node)),
        }
    }
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the bytes between
/// the first `{` and the next `}`, when not empty) or of the whole key, modulo 16384.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(tagged) % (SLOTS as u16)
}

/// CRC16-CCITT (XMODEM), as Redis Cluster uses it.
fn crc16(bytes: &[u8]) -> u16 {
    const TABLE: [u16; 256] = {
        let mut table = [0u16; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = (i as u16) << 8;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ TABLE[usize::from(((crc >> 8) as u8) ^ b)]
    })
}

/// A node's answer that the key lives elsewhere (or is moving) right now.
fn is_redirect(reply: &Value) -> bool {
    matches!(reply, Value::ServerError(e) if e.kind().is_some_and(is_redirect_kind))
}

fn is_redirect_error(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::Server(kind) if is_redirect_kind(kind))
}

fn is_redirect_kind(kind: ServerErrorKind) -> bool {
    matches!(
        kind,
        ServerErrorKind::Moved | ServerErrorKind::Ask | ServerErrorKind::TryAgain
    )
}

/// The ttl in whole milliseconds, rounded up, between 1 ms and 100 years.
fn ttl_millis(ttl: Duration) -> u64 {
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).clamp(1, MAX_TTL_MS)
}

/// The answers of one takeover script call, one per key in order.
fn takeover_answers(op: &'static str, reply: Value) -> Result<Vec<Claimed>, StoreError> {
    let Value::Array(reply) = reply else {
        return Err(unexpected(op, reply));
    };
    reply
        .into_iter()
        .map(|answer| match answer {
            Value::Int(1) => Ok(Claimed::Mine),
            Value::Int(2) => Ok(Claimed::InFlight),
            Value::Int(3) => Ok(Claimed::Done),
            other => Err(unexpected(op, other)),
        })
        .collect()
}

/// The keys one commit script call refused, as indices into the whole call's keys: the reply
/// is how many keys the script went through (all of `range`, or the reply is an error), then
/// the 1-based positions it refused.
fn refused_positions(
    op: &'static str,
    range: std::ops::Range<usize>,
    reply: Value,
) -> Result<Vec<usize>, StoreError> {
    let Value::Array(reply) = reply else {
        return Err(unexpected(op, reply));
    };
    let mut reply = reply.into_iter();
    match reply.next() {
        Some(Value::Int(n)) if usize::try_from(n).is_ok_and(|n| n == range.len()) => {}
        other => {
            return Err(StoreError::backend(
                op,
                format!(
                    "the commit script went through {other:?} of {} keys",
                    range.len()
                ),
            ));
        }
    }
    reply
        .map(|position| match position {
            Value::Int(j) if j >= 1 && usize::try_from(j).is_ok_and(|j| j <= range.len()) => {
                Ok(range.start + j as usize - 1)
            }
            other => Err(unexpected(op, other)),
        })
        .collect()
}

fn unexpected(op: &'static str, reply: Value) -> StoreError {
    StoreError::backend(op, format!("unexpected reply from Redis: {reply:?}"))
}

/// A redis-rs error as a [`StoreError`]: timeouts → `Timeout`; a lost, refused or not yet
/// available connection (and a cluster without a node for the key) → `Unavailable`; the rest
/// → `Backend`.
fn map_error(op: &'static str, e: RedisError, timeout: Duration) -> StoreError {
    if e.is_timeout() {
        return StoreError::Timeout(timeout);
    }
    let unavailable = e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::TryAgain
                )
        );
    if unavailable {
        unavailable_error(e)
    } else {
        StoreError::backend(op, e)
    }
}

/// A [`StoreError::Unavailable`] with `e` as its source.
#[allow(
    clippy::useless_conversion,
    reason = "the variant holds a `BoxError` today; `into` keeps this right if it becomes shared"
)]
fn unavailable_error(e: RedisError) -> StoreError {
    StoreError::Unavailable(BoxError::from(e).into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn takeover_replies_are_checked_before_they_are_believed() {
        use super::{Claimed, takeover_answers};
        use redis::Value::{Array, BulkString, Int, Nil};
        assert_eq!(
            takeover_answers("claim", Array(vec![Int(1), Int(2), Int(3)])).unwrap(),
            [Claimed::Mine, Claimed::InFlight, Claimed::Done]
        );
        for bad in [
            Array(vec![Int(0)]),
            Array(vec![Int(4)]),
            Array(vec![Int(1), Nil]),
            Array(vec![BulkString(b"1".to_vec())]),
            Int(1),
        ] {
            assert!(takeover_answers("claim", bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn commit_replies_are_checked_before_they_are_believed() {
        use super::refused_positions;
        use redis::Value::{Array, Int, Nil};
        let ok = |reply| refused_positions("commit", 1000..1004, reply);
        // All four went through, the 2nd and 4th refused.
        assert_eq!(
            ok(Array(vec![Int(4), Int(2), Int(4)])).unwrap(),
            [1001, 1003]
        );
        assert_eq!(ok(Array(vec![Int(4)])).unwrap(), Vec::<usize>::new());
        // A script that stopped early, positions outside its keys, replies of the wrong shape.
        for bad in [
            Array(vec![Int(3)]),
            Array(vec![]),
            Array(vec![Int(4), Int(0)]),
            Array(vec![Int(4), Int(5)]),
            Array(vec![Int(4), Int(-1)]),
            Array(vec![Int(4), Nil]),
            Int(1),
        ] {
            assert!(ok(bad.clone()).is_err(), "{bad:?}");
        }
    }

    use std::io;

    use super::*;

    #[test]
    fn slots_match_redis() {
        // Checked with `CLUSTER KEYSLOT` on a Redis 7.0 cluster node.
        let cases: [(&[u8], u16); 10] = [
            (b"foo", 12182),
            (b"somekey", 11058),
            (b"{user1000}.following", 3443),
            (b"a{}b", 13694),
            (b"ns:{x}y{z}", 16287),
            (b"x", 16287),
            (b"", 0),
            (b"ns:{}{a}", 5014),
            (b"ns:{a", 9629),
            (b"\xff\xfe", 3374),
        ];
        for (key, slot) in cases {
            assert_eq!(key_slot(key), slot, "{key:?}");
        }
        assert_eq!(crc16(b"123456789"), 0x31c3);
    }

    #[test]
    fn ttl_is_rounded_up_and_bounded() {
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::from_nanos(1)), 1);
        assert_eq!(ttl_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_millis(Duration::from_secs(300)), 300_000);
        assert_eq!(ttl_millis(Duration::MAX), MAX_TTL_MS);
    }

    #[test]
    fn slot_map_from_cluster_slots() {
        let node = |port| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range =
            |start, end, port| Value::Array(vec![Value::Int(start), Value::Int(end), node(port)]);
        let reply = Value::Array(vec![
            range(0, 5460, 7000),
            range(5461, 10922, 7001),
            range(10923, 16382, 7000),
        ]);
        let map = SlotMap::parse(&reply).unwrap();
        assert_eq!(map.nodes, 2);
        assert_eq!(map.node_of(0), Some(0));
        assert_eq!(map.node_of(5461), Some(1));
        assert_eq!(map.node_of(16382), Some(0));
        assert_eq!(map.node_of(16383), None);
        assert!(SlotMap::parse(&Value::Okay).is_err());
        assert!(SlotMap::parse(&Value::Array(vec![range(5, 16384, 7000)])).is_err());
    }

    #[test]
    fn errors_map_to_store_errors() {
        let t = Duration::from_millis(7);
        let timed_out = RedisError::from(io::Error::from(io::ErrorKind::TimedOut));
        assert!(matches!(map_error("x", timed_out, t), StoreError::Timeout(d) if d == t));
        let broken = RedisError::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(matches!(
            map_error("x", broken, t),
            StoreError::Unavailable(_)
        ));
        let refused = RedisError::from(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(matches!(
            map_error("x", refused, t),
            StoreError::Unavailable(_)
        ));
        let wrong = RedisError::from((ErrorKind::UnexpectedReturnType, "wrong"));
        let e = map_error("insert keys", wrong, t);
        assert!(matches!(
            e,
            StoreError::Backend {
                operation: "insert keys",
                ..
            }
        ));
        assert!(std::error::Error::source(&e).is_some());
    }
}
