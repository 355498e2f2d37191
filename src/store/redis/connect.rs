//! What [`RedisStore`](super::RedisStore)'s constructors check before they answer: the
//! namespace, the URLs, and the connection itself (a `PING`, so a login Redis refuses fails
//! here, and a Redis Cluster node reached through a plain connection is named as one).

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};

use super::error::{CONNECT, RedisFailure, Target, cluster_node_words, map_error, url_error};
use crate::store::StoreError;

/// The longest namespace, in bytes.
pub(super) const MAX_NAMESPACE_LEN: usize = 128;

/// Checks a namespace: 1 to [`MAX_NAMESPACE_LEN`] printable ASCII characters other than `:`,
/// with `{` and `}` only as one hash tag (`{payments}`, `orders-{eu}`).
///
/// Without a `:` in namespaces, the first `:` of a Redis key ends its namespace: the keys of
/// two namespaces never meet (with `a:b` allowed, namespace `a` + key `b:k` and namespace
/// `a:b` + key `k` were the same Redis key). The key layout (`{namespace}:{key}`) is unchanged,
/// so a store keeps reading the keys that a namespace allowed here wrote before.
pub(super) fn check_namespace(namespace: &str) -> Result<(), StoreError> {
    let refuse = |why: &str| {
        Err(StoreError::backend(
            "use the namespace",
            format!(
                "invalid Redis namespace {namespace:?}: {why}; use 1 to {MAX_NAMESPACE_LEN} \
                 printable ASCII characters other than ':' (letters, digits, '-', '_', '.', …), \
                 with braces only around one Redis Cluster hash tag, as in {{payments}}"
            ),
        ))
    };
    if namespace.is_empty() {
        return refuse("it is empty");
    }
    if namespace.len() > MAX_NAMESPACE_LEN {
        return refuse("it is too long");
    }
    if namespace.contains(':') {
        return refuse("':' ends the namespace in every Redis key");
    }
    if let Some(c) = namespace.chars().find(|c| !c.is_ascii_graphic()) {
        return refuse(&format!("{c:?} is not a printable ASCII character"));
    }
    let open = namespace.matches('{').count();
    let close = namespace.matches('}').count();
    let tag_ok = match (open, close) {
        (0, 0) => true,
        (1, 1) => {
            let (a, b) = (namespace.find('{'), namespace.find('}'));
            matches!((a, b), (Some(a), Some(b)) if b > a + 1)
        }
        _ => false,
    };
    if !tag_ok {
        return refuse("its braces are not one non-empty hash tag");
    }
    Ok(())
}

/// Parses a URL without echoing it in an error (it may hold a password).
pub(super) fn parse_url(url: &str) -> Result<ConnectionInfo, StoreError> {
    url.into_connection_info().map_err(|e| url_error(url, e))
}

/// Makes sure that rustls has a crypto provider before a TLS connection is made: the ring
/// provider, installed as the process default unless the application installed one (rustls
/// cannot pick one by itself when its features enable two).
#[cfg(feature = "redis-tls")]
pub(super) fn tls_provider(addr: &ConnectionAddr) {
    if matches!(addr, ConnectionAddr::TcpTls { .. })
        && rustls::crypto::CryptoProvider::get_default().is_none()
    {
        // Another thread may install one in between: either stays, both work.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(not(feature = "redis-tls"))]
pub(super) fn tls_provider(_addr: &ConnectionAddr) {}

/// `PING` and `INFO cluster` in one round trip: the login and the database are checked (a
/// server that needs a password answers `NOAUTH` here), and a node with cluster mode on is
/// refused with the fix. A server that refuses `INFO` (an ACL, a proxy) is not refused for it.
pub(super) async fn check_single(
    manager: &ConnectionManager,
    target: &Target,
    timeout: Duration,
) -> Result<(), StoreError> {
    let mut pipe = redis::pipe();
    pipe.cmd("PING").cmd("INFO").arg("cluster");
    pipe.ignore_errors();
    let mut conn = manager.clone();
    let replies: Vec<Value> = pipe
        .query_async(&mut conn)
        .await
        .map_err(|e| map_error(CONNECT, e, timeout, target))?;
    let mut replies = replies.into_iter();
    match replies.next() {
        Some(Value::ServerError(e)) => {
            return Err(map_error(CONNECT, e.into(), timeout, target));
        }
        Some(Value::SimpleString(pong)) if pong == "PONG" => {}
        Some(Value::BulkString(pong)) if pong == b"PONG" => {}
        other => {
            return Err(StoreError::backend(
                CONNECT,
                RedisFailure::new(format!("{target} answered PING with {other:?}")),
            ));
        }
    }
    let info = match replies.next() {
        Some(Value::BulkString(text)) => String::from_utf8_lossy(&text).into_owned(),
        Some(Value::VerbatimString { text, .. }) => text,
        Some(Value::SimpleString(text)) => text,
        _ => String::new(),
    };
    if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
        return Err(StoreError::backend(
            CONNECT,
            RedisFailure::new(cluster_node_words(target, "INFO says cluster_enabled:1")),
        ));
    }
    Ok(())
}

/// `PING` on every primary of the cluster.
pub(super) async fn check_cluster(
    connection: &ClusterConnection,
    target: &Target,
    timeout: Duration,
) -> Result<(), StoreError> {
    let routing = RoutingInfo::MultiNode((
        MultipleNodeRoutingInfo::AllMasters,
        Some(ResponsePolicy::AllSucceeded),
    ));
    connection
        .clone()
        .route_command(redis::cmd("PING"), routing)
        .await
        .map_err(|e| map_error(CONNECT, e, timeout, target))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        for good in [
            "payments",
            "a",
            "orders-eu_2.v1",
            "{payments}",
            "orders-{eu}",
            "{eu}orders",
            "app/payments@eu",
            &"n".repeat(MAX_NAMESPACE_LEN),
        ] {
            assert!(check_namespace(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "a:b",
            "app:payments",
            ":",
            "a b",
            "tab\t",
            "名前",
            "{}",
            "a{b",
            "a}b",
            "}a{",
            "{a}{b}",
            "{{a}}",
            &"n".repeat(MAX_NAMESPACE_LEN + 1),
        ] {
            let e = check_namespace(bad).expect_err(bad);
            assert!(e.to_string().contains("invalid Redis namespace"), "{e}");
        }
    }
}
