//! [`ClaimTransaction`](crate::store::ClaimTransaction) for `sqlx::Transaction<'_, MySql>`:
//! a claim's key marked done by a statement of the caller's own transaction.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{MySql, Transaction};

use super::MySqlStore;
use crate::store::tx::{TxFuture, seal};
use crate::store::{StoreError, Token};

/// The `MySqlStore` behind a claim's window: the store itself, or in an `Arc` or a `Box`.
fn postgres_store(store: &(dyn Any + Send + Sync)) -> Option<&MySqlStore> {
    store
        .downcast_ref::<MySqlStore>()
        .or_else(|| store.downcast_ref::<Arc<MySqlStore>>().map(|s| &**s))
        .or_else(|| store.downcast_ref::<Box<MySqlStore>>().map(|s| &**s))
}

impl seal::Commit for Transaction<'_, MySql> {
    fn mark_done<'a>(
        &'a mut self,
        store: &'a (dyn Any + Send + Sync),
        key: &'a [u8],
        token: Token,
        ttl: Duration,
    ) -> TxFuture<'a, bool> {
        Box::pin(async move {
            let Some(store) = postgres_store(store) else {
                return Err(StoreError::NotTransactional(
                    "a MySQL transaction, and the claim's store is not a MySqlStore",
                ));
            };
            store.commit_in(&mut *self, key, token, ttl).await
        })
    }

    fn commit<'t>(self) -> TxFuture<'t, ()>
    where
        Self: 't,
    {
        Box::pin(async move {
            Transaction::commit(self)
                .await
                .map_err(|e| super::conn::map_error("commit the transaction", e, Duration::ZERO))
        })
    }

    fn rollback<'t>(self) -> TxFuture<'t, ()>
    where
        Self: 't,
    {
        Box::pin(async move {
            Transaction::rollback(self)
                .await
                .map_err(|e| super::conn::map_error("roll the transaction back", e, Duration::ZERO))
        })
    }
}
