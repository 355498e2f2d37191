//! [`ClaimTransaction`](crate::store::ClaimTransaction) for `sqlx::Transaction<'_, MySql>`:
//! a claim's key marked done by a statement of the caller's own transaction.

crate::store::tx::sql_claim_transaction!(
    sqlx::MySql,
    super::MySqlStore,
    "a MySQL transaction, and the claim's store is not a MySqlStore",
    super::conn::map_error
);
