//! The background purge of expired rows: bounded `DELETE … LIMIT n` statements, repeated,
//! every interval, in a task that ends when the last clone of the store is dropped.
//!
//! Expired rows already count as absent (every statement compares `expires_at` with the
//! server's clock), so the purge only gives their space back; nothing on a call's path waits
//! for it.

use std::time::Duration;

use sqlx::{Executor as _, MySqlPool};
use tokio::sync::oneshot;

use super::sql::Sql;

/// Statements of one round of the purge at most: a backlog larger than this many batches is
/// left for the next round, so that one round never runs for long.
const MAX_BATCHES_PER_ROUND: usize = 100;

/// When and how much to purge.
#[derive(Clone, Copy, Debug)]
pub(super) struct PurgeConfig {
    /// Time between two rounds; `None`: no background purge.
    pub(super) interval: Option<Duration>,
    /// Rows per `DELETE`.
    pub(super) batch: usize,
}

/// Deletes expired rows in statements of at most `batch` rows until one deletes fewer, or
/// `max_batches` statements ran; answers how many rows went.
pub(super) async fn purge(
    pool: &MySqlPool,
    sql: &Sql,
    batch: usize,
    max_batches: usize,
) -> Result<u64, sqlx::Error> {
    let statement = sql.purge(batch);
    let mut deleted = 0;
    for _ in 0..max_batches {
        let n = pool
            .execute(sqlx::raw_sql(&statement))
            .await?
            .rows_affected();
        deleted += n;
        if n < batch as u64 {
            break;
        }
    }
    Ok(deleted)
}

/// Starts the background purge on the current tokio runtime; it stops when `stop`'s sender is
/// dropped (with the store's last clone). Errors are left for the next round: a purge that
/// fails (the server down, a lock wait) costs only space. Each failed round is a warning (at
/// most one per interval).
pub(super) fn spawn(pool: MySqlPool, sql: Sql, config: PurgeConfig, stop: oneshot::Receiver<()>) {
    let Some(interval) = config.interval else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut stop = stop;
        loop {
            // `Err(Elapsed)`: time for a round; `Ok(_)`: the store is gone.
            if tokio::time::timeout(interval, &mut stop).await.is_ok() {
                return;
            }
            if let Err(e) = purge(&pool, &sql, config.batch, MAX_BATCHES_PER_ROUND).await {
                tracing::warn!(
                    target: crate::logging::TARGET,
                    store = "MySqlStore",
                    error = %e,
                    "purge of expired rows failed; the next round tries again"
                );
            }
            if !matches!(stop.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
                return;
            }
        }
    });
}
