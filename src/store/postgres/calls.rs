//! The store's calls: one statement per batch, on a connection of the pool.

use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{Postgres, Row};

use super::batch::{Sorted, SortedHeld};
use super::error::{diagnose, is_connection_lost, map_error};
use super::sql::micros;
use super::{ATTEMPTS, GRACE, Inner};
use crate::store::{ClaimBatch, Claimed, HeldKey, InsertBatch, Inserted, StoreError, Token};

/// An answer for a key that was not in the batch.
fn not_asked(op: &'static str) -> StoreError {
    StoreError::backend(op, "PostgreSQL answered for a key that was not asked about")
}

impl Inner {
    pub(super) async fn insert(&self, batch: InsertBatch) -> Result<Vec<Inserted>, StoreError> {
        const OP: &str = "insert keys";
        if batch.keys.is_empty() {
            return Ok(Vec::new());
        }
        let sorted = Sorted::new(batch.keys.iter().map(Vec::as_slice));
        let taken = self
            .upsert(
                OP,
                &self.sql.insert,
                &sorted,
                batch.token,
                batch.ttl,
                Duration::ZERO,
            )
            .await?;
        let answers: Vec<Inserted> = taken
            .into_iter()
            .map(|new| {
                if new {
                    Inserted::New
                } else {
                    Inserted::Present
                }
            })
            .collect();
        Ok(sorted.answers(&answers))
    }

    pub(super) async fn claim(&self, batch: ClaimBatch) -> Result<Vec<Claimed>, StoreError> {
        const OP: &str = "claim keys";
        if batch.keys.is_empty() {
            return Ok(Vec::new());
        }
        let sorted = Sorted::new(batch.keys.iter().map(Vec::as_slice));
        let taken = self
            .upsert(
                OP,
                &self.sql.claim,
                &sorted,
                batch.token,
                batch.lease,
                batch.ttl,
            )
            .await?;
        let mut answers: Vec<Claimed> = taken
            .iter()
            .map(|&mine| {
                if mine {
                    Claimed::Mine
                } else {
                    Claimed::InFlight
                }
            })
            .collect();
        // Keys another request holds: in flight or done? A second, read-only statement, for
        // those keys only. A key that is gone by now (released, expired) was held when the
        // claim found it: in flight.
        let busy: Vec<&[u8]> = sorted
            .keys
            .iter()
            .zip(&taken)
            .filter(|(_, mine)| !**mine)
            .map(|(key, _)| *key)
            .collect();
        if !busy.is_empty() {
            let rows = self
                .fetch_all(OP, || {
                    sqlx::query(&self.sql.states)
                        .bind(&*self.namespace)
                        .bind(&busy)
                })
                .await?;
            for row in &rows {
                let (key, done): (&[u8], bool) = (
                    row.try_get(0).map_err(|e| StoreError::backend(OP, e))?,
                    row.try_get(1).map_err(|e| StoreError::backend(OP, e))?,
                );
                let at = sorted.position(key).ok_or_else(|| not_asked(OP))?;
                if done && !taken[at] {
                    answers[at] = Claimed::Done;
                }
            }
        }
        Ok(sorted.answers(&answers))
    }

    /// Runs an upsert statement (`insert` or `claim`) for the sorted keys, their rows kept for
    /// `duration` and their purge put off by `purge_later` more; answers, per distinct key,
    /// whether the statement wrote it (absent or expired, or a retry's).
    async fn upsert(
        &self,
        op: &'static str,
        sql: &str,
        sorted: &Sorted<'_>,
        token: Token,
        duration: Duration,
        purge_later: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        self.check_keys(sorted.keys.iter().copied())?;
        let token = token.to_string();
        let (duration, purge_later) = (micros(duration), micros(purge_later));
        let rows = self
            .fetch_all(op, || {
                sqlx::query(sql)
                    .bind(&*self.namespace)
                    .bind(&sorted.keys)
                    .bind(&token)
                    .bind(duration)
                    .bind(purge_later)
            })
            .await?;
        let mut taken = vec![false; sorted.keys.len()];
        for row in &rows {
            let key: &[u8] = row.try_get(0).map_err(|e| StoreError::backend(op, e))?;
            taken[sorted.position(key).ok_or_else(|| not_asked(op))?] = true;
        }
        Ok(taken)
    }

    pub(super) async fn commit(
        &self,
        held: Vec<HeldKey>,
        ttl: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        self.per_held("commit claims", &self.sql.commit, held, ttl)
            .await
    }

    pub(super) async fn renew(
        &self,
        held: Vec<HeldKey>,
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        self.per_held("renew claims", &self.sql.renew, held, lease)
            .await
    }

    /// Runs a statement on held keys (`commit` or `renew`, `$4` the duration) that returns
    /// the keys it wrote; answers, per pair, whether it wrote that key.
    async fn per_held(
        &self,
        op: &'static str,
        sql: &str,
        held: Vec<HeldKey>,
        duration: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        self.check_keys(held.iter().map(|(k, _)| k.as_slice()))?;
        let sorted = SortedHeld::new(held.iter().map(|(k, t)| (k.as_slice(), t.as_u128())));
        let duration = micros(duration);
        let mut per_pair = vec![false; sorted.pairs.len()];
        // One statement, unless the batch names a key under two tokens (never from the
        // operator): a statement cannot write one row twice.
        let rounds = if sorted.has_repeated_keys() {
            sorted.rounds()
        } else {
            vec![(0..sorted.pairs.len()).collect()]
        };
        for round in rounds {
            let (keys, tokens) = sorted.columns(round.iter().copied());
            let rows = self
                .fetch_all(op, || {
                    sqlx::query(sql)
                        .bind(&*self.namespace)
                        .bind(&keys)
                        .bind(&tokens)
                        .bind(duration)
                })
                .await?;
            for row in &rows {
                let key: &[u8] = row.try_get(0).map_err(|e| StoreError::backend(op, e))?;
                let at = keys.binary_search(&key).map_err(|_| not_asked(op))?;
                per_pair[round[at]] = true;
            }
        }
        Ok(sorted.answers(&per_pair))
    }

    pub(super) async fn release(&self, held: Vec<HeldKey>) -> Result<(), StoreError> {
        self.delete_held("release claims", &self.sql.release, held)
            .await
    }

    pub(super) async fn take_back(&self, held: Vec<HeldKey>) -> Result<(), StoreError> {
        self.delete_held("take keys back", &self.sql.take_back, held)
            .await
    }

    /// Runs a delete statement on held keys (`release` or `take_back`).
    async fn delete_held(
        &self,
        op: &'static str,
        sql: &str,
        held: Vec<HeldKey>,
    ) -> Result<(), StoreError> {
        if held.is_empty() {
            return Ok(());
        }
        self.check_keys(held.iter().map(|(k, _)| k.as_slice()))?;
        let sorted = SortedHeld::new(held.iter().map(|(k, t)| (k.as_slice(), t.as_u128())));
        let (keys, tokens) = sorted.columns(0..sorted.pairs.len());
        self.fetch_all(op, || {
            sqlx::query(sql)
                .bind(&*self.namespace)
                .bind(&keys)
                .bind(&tokens)
        })
        .await?;
        Ok(())
    }

    pub(super) async fn remove(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.check_keys(keys.iter().map(Vec::as_slice))?;
        let sorted = Sorted::new(keys.iter().map(Vec::as_slice));
        self.fetch_all("remove keys", || {
            sqlx::query(&self.sql.remove)
                .bind(&*self.namespace)
                .bind(&sorted.keys)
        })
        .await?;
        Ok(())
    }

    /// Fails with the first key over the limit.
    pub(super) fn check_keys<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), StoreError> {
        let max = self.max_key_len;
        match keys.into_iter().find(|k| k.len() > max) {
            Some(key) => Err(StoreError::KeyTooLong {
                len: key.len(),
                max,
            }),
            None => Ok(()),
        }
    }

    /// A connection of the pool, within the acquire timeout; when none comes, the cause.
    pub(super) async fn acquire(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        let started = Instant::now();
        match tokio::time::timeout(self.acquire_timeout, self.pool.acquire()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_) => {
                let options = self.pool.connect_options();
                Err(diagnose(&options, self.acquire_timeout, started.elapsed()).await)
            }
            Ok(Err(e)) => Err(self.fail("connect", e)),
        }
    }

    pub(super) fn fail(&self, op: &'static str, e: sqlx::Error) -> StoreError {
        map_error(op, e, self.statement_timeout)
    }

    /// A connection was found lost, and the statement goes again on another one: a warning,
    /// at most one per [`EVERY`](crate::logging::EVERY) (a restart of the server loses every
    /// connection of the pool), with the count since the last.
    fn log_reconnect(&self, op: &'static str, attempt: u32) {
        let t = crate::logging::Tally {
            calls: 1,
            ..Default::default()
        };
        let now = tokio::time::Instant::now();
        let due = self
            .reconnects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .fail(now, t);
        if let Some(t) = due {
            tracing::warn!(
                target: crate::logging::TARGET,
                store = "PostgresStore",
                namespace = &*self.namespace,
                operation = op,
                attempt,
                connections_lost = t.calls,
                "PostgreSQL connection lost: the statement is sent again on another connection"
            );
        }
    }

    /// Runs the statement `query` makes on a connection of the pool, within the statement
    /// timeout (and [`GRACE`]); sends it again on another connection when the connection is
    /// found lost, up to [`ATTEMPTS`] times.
    async fn fetch_all<'q>(
        &self,
        op: &'static str,
        query: impl Fn() -> Query<'q, Postgres, PgArguments>,
    ) -> Result<Vec<PgRow>, StoreError> {
        let limit = self.statement_timeout + GRACE;
        let mut attempt = 1;
        loop {
            let mut conn = self.acquire().await?;
            match tokio::time::timeout(limit, query().fetch_all(&mut *conn)).await {
                Ok(Ok(rows)) => return Ok(rows),
                Ok(Err(e)) if is_connection_lost(&e) && attempt < ATTEMPTS => {
                    // The pool tests the connection as it comes back, and closes it.
                    drop(conn);
                    self.log_reconnect(op, attempt);
                    attempt += 1;
                }
                Ok(Err(e)) => return Err(self.fail(op, e)),
                Err(_) => return Err(StoreError::Timeout(limit)),
            }
        }
    }
}
