//! The background purge: deletes expired rows in bounded batches, off the hot path.

use std::time::Duration;

use sqlx::{Executor, PgPool, Postgres};
use tokio::task::AbortHandle;
use tokio::time::MissedTickBehavior;

/// Stops the purge task when dropped: the store's shared state holds it, so the task ends with
/// the last clone of the store.
#[derive(Debug)]
pub(super) struct PurgeTask(AbortHandle);

impl Drop for PurgeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deletes at most `batch` expired rows of the table (of every namespace) with `sql`; answers
/// how many.
pub(super) async fn purge_once<'c>(
    conn: impl Executor<'c, Database = Postgres>,
    sql: &str,
    batch: usize,
) -> Result<u64, sqlx::Error> {
    let limit = i64::try_from(batch).unwrap_or(i64::MAX);
    let done = sqlx::query(sql).bind(limit).execute(conn).await?;
    Ok(done.rows_affected())
}

/// Starts the purge on the current tokio runtime: every `interval`, batches of at most `batch`
/// rows until a batch finds fewer (a backlog is worked off one bounded statement at a time,
/// each waiting for no lock). A failed round is a warning (at most one per interval): the next
/// round tries again, and expired rows count as absent whether or not they were purged. Each
/// statement is given up after `limit`.
/// `None` outside a tokio runtime.
pub(super) fn spawn(
    pool: PgPool,
    sql: String,
    interval: Duration,
    batch: usize,
    limit: Duration,
) -> Option<PurgeTask> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let task = runtime.spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            loop {
                let error = match tokio::time::timeout(limit, purge_once(&pool, &sql, batch)).await
                {
                    Ok(Ok(deleted)) if deleted < batch as u64 => break,
                    // A full batch: there may be more. Let the other tasks run between batches.
                    Ok(Ok(_)) => {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {limit:?}"),
                };
                tracing::warn!(
                    target: crate::logging::TARGET,
                    store = "PostgresStore",
                    error = %error,
                    "purge of expired rows failed; the next round tries again"
                );
                break;
            }
        }
    });
    Some(PurgeTask(task.abort_handle()))
}
