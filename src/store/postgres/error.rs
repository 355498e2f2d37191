//! sqlx errors as [`StoreError`]s.

use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::store::{BoxError, StoreError};

/// SQLSTATE `query_canceled`: the statement ran past `statement_timeout`.
const QUERY_CANCELED: &str = "57014";

/// SQLSTATEs of a server that is going away or cannot take the connection: `admin_shutdown`
/// (`pg_terminate_backend`, a fast shutdown), `crash_shutdown`, `cannot_connect_now` (starting
/// up or shutting down), `too_many_connections`; and class `08`, connection exceptions.
fn is_unavailable_code(code: &str) -> bool {
    matches!(code, "57P01" | "57P02" | "57P03" | "53300") || code.starts_with("08")
}

/// A sqlx error as a [`StoreError`]: a statement cancelled by `statement_timeout` →
/// `Timeout(statement_timeout)`; a lost, refused or closed connection, or a server shutting
/// down → `Unavailable`; the rest → `Backend` (doing `op`). The sqlx error is the source.
///
/// [`sqlx::Error::PoolTimedOut`] is not mapped here: [`diagnose`] tells why.
pub(super) fn map_error(
    op: &'static str,
    e: sqlx::Error,
    statement_timeout: Duration,
) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some(QUERY_CANCELED) => {
            StoreError::Timeout(statement_timeout)
        }
        sqlx::Error::Database(db) if db.code().as_deref().is_some_and(is_unavailable_code) => {
            unavailable(e)
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => unavailable(e),
        _ => StoreError::backend(op, e),
    }
}

/// Whether `e` means the connection it came from is gone (so the statement may be sent again
/// on another one): an I/O error, or the server ending the session.
pub(super) fn is_connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().as_deref().is_some_and(is_unavailable_code),
        _ => false,
    }
}

/// Why the pool gave no connection within its acquire timeout: one connection attempt of its
/// own (within `limit`) names the cause — connection refused, a failed login, … —
/// as `Unavailable`; if it succeeds, the pool was busy: `Timeout(waited)`.
pub(super) async fn diagnose(
    options: &PgConnectOptions,
    limit: Duration,
    waited: Duration,
) -> StoreError {
    match tokio::time::timeout(limit, options.connect()).await {
        Ok(Ok(conn)) => {
            // Closed in the background: the caller is failing already.
            tokio::spawn(conn.close());
            StoreError::Timeout(waited)
        }
        Ok(Err(e)) => unavailable(e),
        Err(_) => unavailable(format!(
            "no connection to PostgreSQL within {:?} (the pool waited {waited:?})",
            limit
        )),
    }
}

fn unavailable(e: impl Into<BoxError>) -> StoreError {
    StoreError::unavailable(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_of_a_server_going_away() {
        for code in ["57P01", "57P02", "57P03", "53300", "08006", "08001"] {
            assert!(is_unavailable_code(code), "{code}");
        }
        for code in ["57014", "23505", "40P01", "42P01", "54000"] {
            assert!(!is_unavailable_code(code), "{code}");
        }
    }

    #[test]
    fn io_errors_are_unavailable() {
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_connection_lost(&refused));
        let e = map_error("insert keys", refused, Duration::from_secs(1));
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(std::error::Error::source(&e).is_some());
        let other = sqlx::Error::RowNotFound;
        assert!(!is_connection_lost(&other));
        assert!(matches!(
            map_error("insert keys", other, Duration::from_secs(1)),
            StoreError::Backend {
                operation: "insert keys",
                ..
            }
        ));
    }
}
