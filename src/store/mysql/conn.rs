//! Connections and errors: a connection taken from the pool for one call and never given
//! back in a transaction, deadlocks retried, sqlx's errors as [`StoreError`]s.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sqlx::mysql::{MySqlArguments, MySqlConnection, MySqlDatabaseError, MySqlRow};
use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, Executor as _, MySql, MySqlPool};
use tokio::time::Instant;

use crate::store::{BoxError, StoreError};

/// Attempts of one transaction that InnoDB chose as a deadlock's victim.
pub(super) const MAX_ATTEMPTS: u32 = 5;
/// How long a call waits for a connection from the pool before it checks, with a connection
/// of its own, whether the server can be reached at all.
const PROBE_AFTER: Duration = Duration::from_millis(50);
/// A connection that breaks sooner than this after a call sent its first statement is taken
/// for one that was dead already (closed by the server while idle, a server restarted), and
/// the call is sent once more on a new one; one that breaks later (a killed statement) fails
/// the call.
const FOUND_BROKEN_WITHIN: Duration = Duration::from_millis(50);
/// How long a probe's answer is believed (calls that wait meanwhile share it).
const PROBE_FRESH: Duration = Duration::from_millis(250);

/// MySQL / MariaDB error numbers the store tells apart.
mod code {
    /// `ER_LOCK_DEADLOCK`: the transaction was rolled back; run it again.
    pub(super) const DEADLOCK: u16 = 1213;
    /// `ER_LOCK_WAIT_TIMEOUT`: the statement (only) was rolled back.
    pub(super) const LOCK_WAIT_TIMEOUT: u16 = 1205;
    /// `ER_SERVER_SHUTDOWN`.
    pub(super) const SERVER_SHUTDOWN: u16 = 1053;
    /// `ER_QUERY_INTERRUPTED` (`KILL QUERY`).
    pub(super) const QUERY_INTERRUPTED: u16 = 1317;
    /// `ER_CONNECTION_KILLED` (MariaDB, `KILL`).
    pub(super) const CONNECTION_KILLED: u16 = 1927;
    /// `ER_SESSION_WAS_KILLED` (MySQL 8, `KILL`).
    pub(super) const SESSION_KILLED: u16 = 3169;
    /// `ER_CON_COUNT_ERROR`: too many connections.
    pub(super) const TOO_MANY_CONNECTIONS: u16 = 1040;
}

/// A pooled connection held by one call. Dropped before the call finished (a timeout, a
/// cancelled future), it is closed, never given back to the pool: it may be inside a
/// transaction of ours, or waiting for a reply.
pub(super) struct Held(Option<PoolConnection<MySql>>);

impl Held {
    pub(super) fn conn(&mut self) -> &mut MySqlConnection {
        // Only `give_back` and `close` take it, and both consume `self`.
        match &mut self.0 {
            Some(conn) => conn,
            None => unreachable!("a held connection is used after it was given back"),
        }
    }

    /// Back to the pool: the call left it outside any transaction.
    pub(super) fn give_back(mut self) {
        drop(self.0.take());
    }

    /// Closed: its state is unknown (an error left a transaction open, or the link broke).
    pub(super) fn close(self) {
        drop(self);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(conn) = &mut self.0 {
            conn.close_on_drop();
        }
    }
}

/// The last check of whether the server accepts connections at all.
#[derive(Debug, Default)]
pub(super) struct Probe {
    last: Mutex<Option<(Instant, Option<StoreError>)>>,
}

impl Probe {
    /// `Some(Unavailable)` when a connection of its own to the server failed with a network
    /// error (the pool retries refused connections until its timeout, which would hide the
    /// cause); `None` when the server is reachable and the pool is only busy.
    async fn check(&self, pool: &MySqlPool, limit: Duration) -> Option<StoreError> {
        if let Some((at, answer)) = &*self.last.lock().unwrap_or_else(PoisonError::into_inner) {
            if at.elapsed() < PROBE_FRESH {
                return answer.clone();
            }
        }
        let options = pool.connect_options();
        let answer =
            match tokio::time::timeout(limit, MySqlConnection::connect_with(&options)).await {
                Ok(Ok(conn)) => {
                    let _ = conn.close_hard().await;
                    None
                }
                Ok(Err(e @ sqlx::Error::Io(_))) => Some(unavailable(e)),
                Ok(Err(_)) | Err(_) => None,
            };
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), answer.clone()));
        answer
    }
}

/// A connection from `pool` for one call. When none comes within [`PROBE_AFTER`], a
/// connection of its own tells whether the server is down (then the call fails at once with
/// [`StoreError::Unavailable`] and its cause) or the pool is busy (then it waits on).
pub(super) async fn acquire(
    pool: &MySqlPool,
    probe: &Probe,
    timeout: Duration,
) -> Result<Held, StoreError> {
    let acquiring = pool.acquire();
    tokio::pin!(acquiring);
    let first = tokio::time::timeout(PROBE_AFTER, &mut acquiring).await;
    let result = match first {
        Ok(result) => result,
        Err(_) => {
            if let Some(down) = probe.check(pool, timeout).await {
                return Err(down);
            }
            acquiring.await
        }
    };
    match result {
        Ok(conn) => Ok(Held(Some(conn))),
        Err(sqlx::Error::PoolTimedOut) => match probe.check(pool, timeout).await {
            Some(down) => Err(down),
            None => Err(StoreError::Timeout(timeout)),
        },
        Err(e) => Err(map_error("connect", e, timeout)),
    }
}

/// One step of a call: a round trip.
pub(super) enum Step<'a> {
    /// One or more statements, through the text protocol.
    Text(&'a str),
    /// A prepared statement (prepared once per connection, then cached) and its parameters.
    Prepared(&'a str, MySqlArguments),
    /// A prepared statement that answers rows (an upsert with `RETURNING`) and its parameters.
    PreparedRows(&'a str, MySqlArguments),
    /// A prepared statement run only if the step before it answered an insert id other than
    /// 0 (a row of the upsert set `LAST_INSERT_ID(1)`).
    ReadBackIfMarked(&'a str, MySqlArguments),
}

/// What a call's steps answered.
#[derive(Debug, Default)]
pub(super) struct Ran {
    /// The rows of every step, in order.
    pub(super) rows: Vec<MySqlRow>,
    /// Whether a [`Step::ReadBackIfMarked`] ran.
    pub(super) read_back: bool,
}

/// How a call's steps stand to transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tx {
    /// Each statement commits by itself.
    None,
    /// The text holds its own `BEGIN` … `COMMIT`.
    Inline,
    /// The steps run between a `BEGIN` and a `COMMIT` of their own (a round trip each).
    Wrap,
}

/// Runs `steps` on a connection of `pool`, with their rows. An error inside a transaction
/// leaves it open: it is rolled back before the connection goes back to the pool. A deadlock
/// runs the whole call again, up to [`MAX_ATTEMPTS`] times; a connection found broken at once
/// (within [`FOUND_BROKEN_WITHIN`], before it answered anything of the call), once more on a
/// new one (every call of the store can be repeated: tokens make it so).
pub(super) async fn run(
    pool: &MySqlPool,
    probe: &Probe,
    op: &'static str,
    steps: &[Step<'_>],
    tx: Tx,
    timeout: Duration,
) -> Result<Ran, StoreError> {
    let mut attempt = 0;
    let mut resent = false;
    loop {
        attempt += 1;
        let mut held = acquire(pool, probe, timeout).await?;
        let sent = Instant::now();
        match run_steps(held.conn(), steps, tx).await {
            Ok(ran) => {
                held.give_back();
                return Ok(ran);
            }
            Err((e, answered)) => {
                let deadlock = error_number(&e) == Some(code::DEADLOCK);
                settle(held, &e, tx != Tx::None).await;
                if deadlock && attempt < MAX_ATTEMPTS {
                    // InnoDB rolled the whole transaction back: run it again, after a pause
                    // that grows (1, 2, 4, 8 ms) so that the other transaction finishes.
                    tokio::time::sleep(Duration::from_millis(1 << (attempt - 1))).await;
                    continue;
                }
                let at_once = sent.elapsed() < FOUND_BROKEN_WITHIN;
                if matches!(e, sqlx::Error::Io(_)) && !answered && at_once && !resent {
                    // Broken before it answered anything of this call, at once: an idle
                    // connection that the server closed, or a server restarted. (One that
                    // broke while the call ran, such as a killed connection, fails the call.)
                    resent = true;
                    continue;
                }
                return Err(map_error(op, e, timeout));
            }
        }
    }
}

/// The steps, in a transaction of their own with [`Tx::Wrap`]. An error comes with whether
/// the connection had answered a step of this call before it.
async fn run_steps(
    conn: &mut MySqlConnection,
    steps: &[Step<'_>],
    tx: Tx,
) -> Result<Ran, (sqlx::Error, bool)> {
    let mut answered = false;
    if tx == Tx::Wrap {
        conn.execute(sqlx::raw_sql("BEGIN"))
            .await
            .map_err(|e| (e, answered))?;
        answered = true;
    }
    let mut ran = Ran::default();
    let mut marked = false;
    for step in steps {
        let found = match step {
            Step::Text(sql) => conn.fetch_all(sqlx::raw_sql(sql)).await,
            Step::Prepared(sql, args) => {
                let query = sqlx::query_with::<MySql, _>(sql, args.clone()).persistent(true);
                conn.execute(query).await.map(|done| {
                    marked = done.last_insert_id() != 0;
                    Vec::new()
                })
            }
            Step::PreparedRows(sql, args) => {
                let query = sqlx::query_with::<MySql, _>(sql, args.clone()).persistent(true);
                conn.fetch_all(query).await
            }
            Step::ReadBackIfMarked(sql, args) => {
                if !marked {
                    continue;
                }
                ran.read_back = true;
                let query = sqlx::query_with::<MySql, _>(sql, args.clone()).persistent(true);
                conn.fetch_all(query).await
            }
        };
        ran.rows.extend(found.map_err(|e| (e, answered))?);
        answered = true;
    }
    if tx == Tx::Wrap {
        conn.execute(sqlx::raw_sql("COMMIT"))
            .await
            .map_err(|e| (e, answered))?;
    }
    Ok(ran)
}

/// After an error: a server's error leaves the connection usable, with our transaction
/// (if any) open: roll it back and give the connection back. Anything else: close it.
async fn settle(mut held: Held, e: &sqlx::Error, transaction: bool) {
    if !matches!(e, sqlx::Error::Database(_)) {
        held.close();
        return;
    }
    if !transaction {
        held.give_back();
        return;
    }
    match held.conn().execute(sqlx::raw_sql("ROLLBACK")).await {
        Ok(_) => held.give_back(),
        Err(_) => held.close(),
    }
}

/// The server's error number, if the error is one of its replies.
pub(super) fn error_number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number),
        _ => None,
    }
}

/// A sqlx error as a [`StoreError`]: a lost or refused connection, a server shutting down, a
/// killed connection or a closed pool → `Unavailable`; a lock wait past the server's limit or
/// no connection in time → `Timeout`; the rest → `Backend`, with sqlx's error as the source.
pub(super) fn map_error(op: &'static str, e: sqlx::Error, timeout: Duration) -> StoreError {
    match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => unavailable(e),
        sqlx::Error::PoolTimedOut => StoreError::Timeout(timeout),
        sqlx::Error::Database(_) => match error_number(&e) {
            Some(code::LOCK_WAIT_TIMEOUT) => StoreError::Timeout(timeout),
            Some(
                code::SERVER_SHUTDOWN
                | code::QUERY_INTERRUPTED
                | code::CONNECTION_KILLED
                | code::SESSION_KILLED
                | code::TOO_MANY_CONNECTIONS,
            ) => unavailable(e),
            _ => StoreError::backend(op, e),
        },
        _ => StoreError::backend(op, e),
    }
}

/// A [`StoreError::Unavailable`] with `e` as its source.
pub(super) fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::unavailable(BoxError::from(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_store_errors() {
        let t = Duration::from_millis(7);
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = map_error("x", refused, t);
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(std::error::Error::source(&e).is_some());
        assert!(matches!(
            map_error("x", sqlx::Error::PoolTimedOut, t),
            StoreError::Timeout(d) if d == t
        ));
        assert!(matches!(
            map_error("x", sqlx::Error::PoolClosed, t),
            StoreError::Unavailable(_)
        ));
        let e = map_error("insert keys", sqlx::Error::RowNotFound, t);
        assert!(matches!(
            e,
            StoreError::Backend {
                operation: "insert keys",
                ..
            }
        ));
    }
}
