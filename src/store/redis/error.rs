//! redis-rs errors and unexpected replies as [`StoreError`]s whose messages name the cause:
//! what failed, where (host and port, never the URL: it may hold a password), and what Redis
//! said, once.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use redis::{ConnectionAddr, ErrorKind, RedisError, ServerErrorKind, Value};

use crate::store::{BoxError, StoreError};

/// Where a store connects, as its errors name it: `Redis at host:port`, or the nodes of a
/// Redis Cluster. Built from parsed addresses, so it never holds a user name or password.
#[derive(Clone, Debug)]
pub(super) struct Target {
    text: Box<str>,
    cluster: bool,
    tls: bool,
    /// Whether `text` names several nodes (for the verb).
    plural: bool,
}

impl Target {
    /// One Redis node (or a proxy) at `addr`.
    pub(super) fn single(addr: &ConnectionAddr) -> Target {
        let tls = matches!(addr, ConnectionAddr::TcpTls { .. });
        Target {
            text: format!("Redis at {addr}{}", if tls { " (TLS)" } else { "" }).into(),
            cluster: false,
            tls,
            plural: false,
        }
    }

    /// A Redis Cluster reached through the nodes at `addrs`.
    pub(super) fn cluster<'a>(addrs: impl IntoIterator<Item = &'a ConnectionAddr>) -> Target {
        let mut tls = false;
        let list: Vec<String> = addrs
            .into_iter()
            .map(|addr| {
                tls |= matches!(addr, ConnectionAddr::TcpTls { .. });
                addr.to_string()
            })
            .collect();
        Target {
            text: format!(
                "the Redis Cluster nodes at {}{}",
                list.join(", "),
                if tls { " (TLS)" } else { "" }
            )
            .into(),
            cluster: true,
            tls,
            plural: true,
        }
    }

    /// A connection the application made (its address is not known to the store).
    pub(super) fn given(cluster: bool) -> Target {
        let text = if cluster {
            "the Redis Cluster"
        } else {
            "the Redis server"
        };
        Target {
            text: text.into(),
            cluster,
            tls: false,
            plural: false,
        }
    }

    /// `one` or `many`, as the verb of a sentence about this target.
    fn verb<'a>(&self, one: &'a str, many: &'a str) -> &'a str {
        if self.plural { many } else { one }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A failure on Redis, as the shared error of a [`StoreError`]: the message says what failed
/// (and includes Redis's own words); the source is the I/O error of a connection that failed,
/// when there is one. redis-rs's own error is not the source: its message repeats its source's.
#[derive(Debug)]
pub(super) struct RedisFailure {
    message: String,
    /// A redis-rs error whose source (the I/O error) is not in `message`.
    io: Option<RedisError>,
}

impl RedisFailure {
    pub(super) fn new(message: impl Into<String>) -> RedisFailure {
        RedisFailure {
            message: message.into(),
            io: None,
        }
    }
}

impl fmt::Display for RedisFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error for RedisFailure {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.io.as_ref().and_then(Error::source)
    }
}

/// A reply of the wrong shape, as a [`StoreError::Backend`].
pub(super) fn unexpected(op: &'static str, reply: Value) -> StoreError {
    StoreError::backend(op, format!("unexpected reply from Redis: {reply:?}"))
}

/// Redis's words for a server error: its code, then its message (as Redis sends them).
fn server_words(e: &RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        (Some(code), None) => code.to_owned(),
        _ => e.to_string(),
    }
}

/// What an I/O error means for the connection to `target`.
fn io_words(target: &Target, e: &RedisError, connecting: bool) -> String {
    if e.is_connection_refusal() {
        format!("connection to {target} refused")
    } else if e.is_connection_dropped() {
        format!("connection to {target} lost")
    } else if connecting && target.tls {
        format!("cannot connect to {target}, or its TLS handshake failed")
    } else if connecting {
        format!("cannot connect to {target}")
    } else {
        format!("I/O failure on the connection to {target}")
    }
}

/// A redis-rs error as a [`StoreError`] whose message names the cause: timeouts of calls →
/// `Timeout`; a lost, refused or not yet available connection, a connect that timed out (and a
/// cluster without a node for the key) → `Unavailable`; a refused login, a cluster node reached
/// without cluster support, and the rest → `Backend`.
pub(super) fn map_error(
    op: &'static str,
    e: RedisError,
    timeout: Duration,
    target: &Target,
) -> StoreError {
    let connecting = op == CONNECT;
    if login_refused(&e) {
        return StoreError::backend(op, RedisFailure::new(login_refused_words(target)));
    }
    if e.is_timeout() {
        if connecting {
            return connect_timed_out(target, timeout);
        }
        return StoreError::Timeout(timeout);
    }
    if e.kind() == ErrorKind::Io {
        let words = io_words(target, &e, connecting);
        let failure = if e.source().is_some() {
            RedisFailure {
                message: words,
                io: Some(e),
            }
        } else {
            // An I/O failure that redis-rs reports without an I/O error inside.
            RedisFailure::new(format!("{words}: {e}"))
        };
        return unavailable_error(failure);
    }
    let code = e.code().unwrap_or_default();
    let words = server_words(&e);
    let message = match e.kind() {
        ErrorKind::ClusterConnectionNotFound => {
            return unavailable_error(RedisFailure::new(format!(
                "no connection to the node of a key in {target}: {e}"
            )));
        }
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::TryAgain,
        ) => {
            return unavailable_error(RedisFailure::new(format!(
                "{target} {} not ready: it answered {words}",
                target.verb("is", "are")
            )));
        }
        _ if code == "WRONGPASS" => format!(
            "{target} refused the login ({words}): check the user name and password in the URL"
        ),
        _ if code == "NOAUTH" => format!(
            "{target} {} a password ({words}): put it in the URL, as \
             redis://:password@host:port or redis://user:password@host:port",
            target.verb("needs", "need")
        ),
        ErrorKind::Server(ServerErrorKind::NoPerm) => format!(
            "{target} refused a command to this user ({words}): its ACL must allow PING, SET, \
             GET, DEL, EVAL, PTTL and PEXPIRE on the namespace's keys"
        ),
        ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask) if !target.cluster => {
            cluster_node_words(target, &words)
        }
        ErrorKind::Server(ServerErrorKind::ReadOnly) => {
            format!("{target} is a read-only replica ({words}): connect to the primary")
        }
        ErrorKind::Server(ServerErrorKind::ResponseError)
            if target.cluster && words.contains("cluster support disabled") =>
        {
            format!(
                "{target}: a node is not in cluster mode ({words}): for a single Redis, use \
                 RedisStore::connect"
            )
        }
        ErrorKind::Server(_) | ErrorKind::Extension => format!("{target} answered {words}"),
        ErrorKind::InvalidClientConfig => {
            format!("the connection to {target} is misconfigured: {e}")
        }
        _ => format!("{target}: {e}"),
    };
    StoreError::backend(op, RedisFailure::new(message))
}

/// Connecting (a connection, its TLS handshake, its first replies) took longer than `limit`:
/// `Unavailable`, with a message that names the server (a call's `Timeout` says that the call
/// may have been applied, which means nothing here).
pub(super) fn connect_timed_out(target: &Target, limit: Duration) -> StoreError {
    let tls = if target.tls {
        ": the TLS handshake did not complete (does the server serve TLS on that port?)"
    } else {
        ""
    };
    unavailable_error(RedisFailure::new(format!(
        "connecting to {target} timed out (no answer within {limit:?}){tls}"
    )))
}

/// Whether `e` says that Redis refused the login: redis-rs reports it as
/// `AuthenticationFailed`, or, when it connects to a cluster, in the text of an I/O error.
fn login_refused(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed
        || (e.kind() == ErrorKind::Io
            && e.detail()
                .is_some_and(|d| d.contains("AuthenticationFailed")))
}

fn login_refused_words(target: &Target) -> String {
    format!("{target} refused the login (WRONGPASS): check the user name and password in the URL")
}

/// The message for a cluster node reached through a plain connection.
pub(super) fn cluster_node_words(target: &Target, said: &str) -> String {
    format!(
        "{target} is a Redis Cluster node ({said}): use RedisStore::connect_cluster \
         (or RedisStoreBuilder::connect_cluster)"
    )
}

/// The operation of every error at connect.
pub(super) const CONNECT: &str = "connect to Redis";

/// A [`StoreError::Unavailable`] with `e` as its shared error.
#[allow(
    clippy::useless_conversion,
    reason = "the variant holds a `BoxError` today; `into` keeps this right if it becomes shared"
)]
fn unavailable_error(e: RedisFailure) -> StoreError {
    StoreError::Unavailable(BoxError::from(e).into())
}

/// A URL that redis-rs refused: a `rediss://` URL without TLS compiled in says so and names the
/// feature; any other says what is wrong with it (never echoing the URL: it may hold a
/// password).
pub(super) fn url_error(url: &str, e: RedisError) -> StoreError {
    let scheme = url.split("://").next().unwrap_or_default();
    let tls_scheme =
        scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys");
    let message = if tls_scheme && cfg!(not(feature = "redis-tls")) {
        format!(
            "{scheme}:// needs TLS support, which is not compiled in: enable the feature \
             `redis-tls` of stream-dedup"
        )
    } else {
        format!("the Redis URL is not valid: {e}")
    };
    StoreError::backend(CONNECT, RedisFailure::new(message))
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn target() -> Target {
        Target::single(&ConnectionAddr::Tcp("127.0.0.1".into(), 6379))
    }

    /// The message with its sources, as a log line shows it.
    fn chain(e: &dyn Error) -> String {
        let mut out = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            out += &format!(": {s}");
            source = s.source();
        }
        out
    }

    #[test]
    fn errors_map_to_store_errors() {
        let t = Duration::from_millis(7);
        let at = target();
        let timed_out = RedisError::from(io::Error::from(io::ErrorKind::TimedOut));
        assert!(matches!(map_error("x", timed_out, t, &at), StoreError::Timeout(d) if d == t));
        let broken = RedisError::from(io::Error::from(io::ErrorKind::BrokenPipe));
        let e = map_error("x", broken, t, &at);
        assert!(matches!(e, StoreError::Unavailable(_)));
        assert!(
            e.to_string()
                .contains("connection to Redis at 127.0.0.1:6379 lost")
        );
        let refused = RedisError::from(io::Error::from(io::ErrorKind::ConnectionRefused));
        let e = map_error("x", refused, t, &at);
        assert!(matches!(e, StoreError::Unavailable(_)));
        assert_eq!(
            e.to_string(),
            "the store is unavailable: connection to Redis at 127.0.0.1:6379 refused"
        );
        // The I/O error is the source, once.
        assert_eq!(
            e.source().map(ToString::to_string).as_deref(),
            Some("connection refused")
        );
        assert_eq!(chain(&e).matches("refused").count(), 2, "{}", chain(&e));

        let wrong = RedisError::from((ErrorKind::UnexpectedReturnType, "wrong"));
        let e = map_error("insert keys", wrong, t, &at);
        assert!(matches!(
            e,
            StoreError::Backend {
                operation: "insert keys",
                ..
            }
        ));
        assert!(e.to_string().contains("wrong"), "{e}");
        assert!(e.source().is_none(), "the message holds it all");
    }

    #[test]
    fn a_tls_url_without_tls_names_the_feature() {
        let e = url_error(
            "rediss://127.0.0.1:6380",
            RedisError::from((ErrorKind::InvalidClientConfig, "no TLS")),
        );
        let text = e.to_string();
        if cfg!(feature = "redis-tls") {
            assert!(text.contains("not valid"), "{text}");
        } else {
            assert!(text.contains("not compiled in"), "{text}");
            assert!(text.contains("`redis-tls`"), "{text}");
        }
    }
}
