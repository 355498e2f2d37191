//! redis-rs errors and unexpected replies as [`StoreError`]s.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use crate::store::{BoxError, StoreError};

/// A reply of the wrong shape, as a [`StoreError::Backend`].
pub(super) fn unexpected(op: &'static str, reply: Value) -> StoreError {
    StoreError::backend(op, format!("unexpected reply from Redis: {reply:?}"))
}

/// A redis-rs error as a [`StoreError`]: timeouts → `Timeout`; a lost, refused or not yet
/// available connection (and a cluster without a node for the key) → `Unavailable`; the rest
/// → `Backend`.
pub(super) fn map_error(op: &'static str, e: RedisError, timeout: Duration) -> StoreError {
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
    use std::io;

    use super::*;

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
