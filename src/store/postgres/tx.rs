//! [`ClaimTransaction`](crate::store::ClaimTransaction) for `sqlx::Transaction<'_, Postgres>`:
//! a claim's key marked done by a statement of the caller's own transaction.

crate::store::tx::sql_claim_transaction!(
    sqlx::Postgres,
    super::PostgresStore,
    "a PostgreSQL transaction, and the claim's store is not a PostgresStore",
    super::error::map_error
);
