//! Transactions a claim can be committed in ([`ClaimTransaction`]): the key marked done inside
//! the caller's own database transaction, with the business effect, for exactly-once effects.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::{HeldKey, StoreError, Token};

/// A boxed, `Send` future that may borrow for `'a`.
pub(crate) type TxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A database transaction in which a [`Claim`](crate::Claim) can be committed with
/// [`Claim::commit_with`](crate::Claim::commit_with): the claim's key is marked done by a
/// statement of this very transaction, so the business effect written in it and the mark
/// commit or roll back together.
///
/// Implemented for `sqlx::Transaction<'_, sqlx::Postgres>` with a `PostgresStore` behind the
/// window (feature `postgres`), and for `sqlx::Transaction<'_, sqlx::MySql>` with a
/// `MySqlStore` (feature `mysql`). This trait is sealed.
pub trait ClaimTransaction: Send + seal::Commit {}

impl<T: seal::Commit + Send> ClaimTransaction for T {}

pub(crate) mod seal {
    use super::{Any, Duration, HeldKey, Token, TxFuture};

    /// What [`ClaimTransaction`](super::ClaimTransaction) does; private, so the trait is
    /// sealed.
    pub trait Commit: Sized {
        /// Marks `key` done for `ttl` inside this transaction if the claim with `token` still
        /// holds it (in flight with this token, or free); `false` if another claim holds it.
        /// `store` is the claim's store: an error if it is not this database's store.
        fn mark_done<'a>(
            &'a mut self,
            store: &'a (dyn Any + Send + Sync),
            key: &'a [u8],
            token: Token,
            ttl: Duration,
        ) -> TxFuture<'a, bool>;

        /// Marks every key of `keys` done for `ttl` inside this transaction if each is still
        /// held by its token; `false` if another claim holds one (some others may be marked:
        /// roll back). `store` as for [`mark_done`](Self::mark_done).
        fn mark_all_done<'a>(
            &'a mut self,
            store: &'a (dyn Any + Send + Sync),
            keys: &'a [HeldKey],
            ttl: Duration,
        ) -> TxFuture<'a, bool>;

        /// Commits the transaction.
        fn commit<'t>(self) -> TxFuture<'t, ()>
        where
            Self: 't;

        /// Rolls the transaction back.
        fn rollback<'t>(self) -> TxFuture<'t, ()>
        where
            Self: 't;
    }
}

/// The store behind a claim's window as `S`: the store itself, or in an `Arc` or a `Box`.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn downcast<S: Any>(store: &(dyn Any + Send + Sync)) -> Option<&S> {
    use std::sync::Arc;
    store
        .downcast_ref::<S>()
        .or_else(|| store.downcast_ref::<Arc<S>>().map(|s| &**s))
        .or_else(|| store.downcast_ref::<Box<S>>().map(|s| &**s))
}

/// [`ClaimTransaction`] for `sqlx::Transaction<'_, $db>` with `$store` behind the claim's
/// window: the key marked done by `$store::commit_in` on the transaction's connection; sqlx's
/// errors mapped by `$map_error`. `$why` is the `NotTransactional` message for another store.
#[cfg(any(feature = "postgres", feature = "mysql"))]
macro_rules! sql_claim_transaction {
    ($db:ty, $store:ty, $why:literal, $map_error:path) => {
        impl $crate::store::tx::seal::Commit for sqlx::Transaction<'_, $db> {
            fn mark_done<'a>(
                &'a mut self,
                store: &'a (dyn std::any::Any + Send + Sync),
                key: &'a [u8],
                token: $crate::store::Token,
                ttl: std::time::Duration,
            ) -> $crate::store::tx::TxFuture<'a, bool> {
                Box::pin(async move {
                    let Some(store) = $crate::store::tx::downcast::<$store>(store) else {
                        return Err($crate::store::StoreError::NotTransactional($why));
                    };
                    store.commit_in(&mut *self, key, token, ttl).await
                })
            }

            fn mark_all_done<'a>(
                &'a mut self,
                store: &'a (dyn std::any::Any + Send + Sync),
                keys: &'a [$crate::store::HeldKey],
                ttl: std::time::Duration,
            ) -> $crate::store::tx::TxFuture<'a, bool> {
                Box::pin(async move {
                    let Some(store) = $crate::store::tx::downcast::<$store>(store) else {
                        return Err($crate::store::StoreError::NotTransactional($why));
                    };
                    store.commit_all_in(&mut *self, keys, ttl).await
                })
            }

            fn commit<'t>(self) -> $crate::store::tx::TxFuture<'t, ()>
            where
                Self: 't,
            {
                Box::pin(async move {
                    sqlx::Transaction::commit(self).await.map_err(|e| {
                        $map_error("commit the transaction", e, std::time::Duration::ZERO)
                    })
                })
            }

            fn rollback<'t>(self) -> $crate::store::tx::TxFuture<'t, ()>
            where
                Self: 't,
            {
                Box::pin(async move {
                    sqlx::Transaction::rollback(self).await.map_err(|e| {
                        $map_error("roll the transaction back", e, std::time::Duration::ZERO)
                    })
                })
            }
        }
    };
}
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) use sql_claim_transaction;
