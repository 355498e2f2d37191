//! Exactly-once effects with PostgreSQL: [`Claim::commit_with`] marks the key done inside the
//! transaction that wrote the effect, so the two commit or roll back together.
//!
//! - The contract, in one process: the effect and the key committed together (a redelivery
//!   is a duplicate), a lost lease rolls the effect back, a transaction of the wrong store is
//!   refused and rolled back, a failing effect or `COMMIT` releases the key.
//! - **A crash anywhere**: consumer processes (this test binary, run again as a consumer) are
//!   killed with `SIGKILL` at random moments — before the effect, with the effect written and
//!   the transaction open, during `commit_with`, after it and before the ack — some of them
//!   stalling past their lease with keep-alive off, and restarted until every key is done,
//!   every restart a redelivery of everything: the effects table, with no unique constraint
//!   of its own, holds exactly one row per key. The same runs with `tx.commit()` then
//!   `claim.commit()` double effects (a consumer kills itself in that gap), which is what
//!   `commit_with` is for.
//!
//! Needs the `postgres` feature and `STREAM_DEDUP_POSTGRES_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); skips without it. Each test works in tables and
//! namespaces of its own and drops them at the end. `STREAM_DEDUP_SEED` replays the crash
//! tests' runs.
#![cfg(feature = "postgres")]

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::pin;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use stream_dedup::sqlx::{self, Connection, PgConnection, Postgres, Transaction};
use stream_dedup::store::{ClaimStore, MemoryStore, PostgresStore, StoreError, Token};
use stream_dedup::{Claim, DedupStreamExt, HeldBack, StoreWindow, Window};
use support::postgres as pg;
use tokio_stream::wrappers::UnboundedReceiverStream;

const TTL: Duration = Duration::from_secs(600);
const PATIENCE: Duration = Duration::from_secs(10);

/// A name for a table of this run (lowercase letters, digits and `_`).
fn table_name(prefix: &str) -> String {
    format!("{prefix}_{}", Token::new().to_string().replace('-', ""))
}

/// The tables of a test and its namespace in the default table, dropped (deleted) when it is
/// dropped, passed or failed.
struct Scratch {
    url: String,
    namespace: String,
    effects: String,
    tables: Vec<String>,
}

impl Scratch {
    /// A namespace and an effects table (`key text, consumer int`, no unique constraint).
    async fn new(url: &str, test: &str) -> Scratch {
        let scratch = Scratch {
            url: url.to_owned(),
            namespace: pg::namespace(test),
            effects: table_name("eo_fx"),
            tables: Vec::new(),
        };
        scratch
            .execute(&format!(
                "CREATE TABLE {} (key text NOT NULL, consumer int NOT NULL, \
                 at timestamptz NOT NULL DEFAULT clock_timestamp())",
                scratch.effects
            ))
            .await;
        scratch
    }

    async fn execute(&self, sql: &str) {
        let mut conn = pg::connection(&self.url).await;
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn store(&self) -> PostgresStore {
        PostgresStore::builder(&self.namespace)
            .statement_timeout(Duration::from_secs(5))
            .max_connections(4)
            .connect(&self.url)
            .await
            .expect("connect to STREAM_DEDUP_POSTGRES_URL")
    }

    /// The effects, `(key, consumer)`, in the order they were written.
    async fn effects(&self) -> Vec<(String, i32)> {
        let mut conn = pg::connection(&self.url).await;
        sqlx::query_as(&format!(
            "SELECT key, consumer FROM {} ORDER BY at",
            self.effects
        ))
        .fetch_all(&mut conn)
        .await
        .expect("read the effects")
    }

    /// `done` of this namespace's rows in the default table.
    async fn key_rows(&self) -> Vec<bool> {
        let mut conn = pg::connection(&self.url).await;
        sqlx::query_scalar(&format!(
            "SELECT done FROM {} WHERE namespace = $1",
            pg::TABLE
        ))
        .bind(&self.namespace)
        .fetch_all(&mut conn)
        .await
        .expect("read the keys")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let url = self.url.clone();
        let namespace = self.namespace.clone();
        let mut tables = self.tables.clone();
        tables.push(self.effects.clone());
        let done = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup")
                .block_on(async {
                    let mut conn = pg::connection(&url).await;
                    for table in tables {
                        sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table}"))
                            .execute(&mut conn)
                            .await
                            .expect("drop a test table");
                    }
                    drop(conn);
                    pg::delete_namespace(&url, pg::TABLE, &namespace).await;
                });
        })
        .join();
        if done.is_err() && !std::thread::panicking() {
            panic!("the cleanup of {} failed", self.namespace);
        }
    }
}

/// The effect: one row in `effects`, written in `tx`.
async fn write_effect(
    tx: &mut Transaction<'_, Postgres>,
    effects: &str,
    key: &str,
    consumer: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {effects} (key, consumer) VALUES ($1, $2)"
    ))
    .bind(key)
    .bind(consumer)
    .execute(&mut **tx)
    .await
    .map(drop)
}

fn window<S: ClaimStore>(store: S) -> StoreWindow<S> {
    Window::max_keys(1_000)
        .ttl(TTL)
        .store(store)
        .batch_size(16)
        .timeout(Duration::from_secs(5))
}

/// A window whose claims' leases run out after `lease` (keep-alive off).
fn short_lease(store: PostgresStore, lease: Duration) -> StoreWindow<PostgresStore> {
    Window::max_keys(100)
        .ttl(TTL)
        .lease(lease)
        .keep_alive(false)
        .store(store)
        .timeout(Duration::from_secs(5))
}

/// The next claim, within a deadline.
async fn next<S: futures::Stream + Unpin>(claims: &mut S) -> S::Item {
    tokio::time::timeout(PATIENCE, claims.next())
        .await
        .expect("no claim within 10 s")
        .expect("the stream ended")
}

/// `commit_with` and a handler around it can run on any tokio worker: their futures are `Send`
/// (whatever the transaction's lifetime), which this checks when it compiles.
#[allow(dead_code)]
fn commit_with_futures_are_send(claim: Claim<String>, tx: Transaction<'_, Postgres>) {
    fn send<F: Send>(_: &F) {}
    send(&claim.commit_with(tx));
}

/// As above, for several claims at once.
#[allow(dead_code)]
fn commit_all_with_futures_are_send(claims: Vec<Claim<String>>, tx: Transaction<'_, Postgres>) {
    fn send<F: Send>(_: &F) {}
    send(&Claim::commit_all_with(claims, tx));
}

/// As above, for a whole handler.
#[allow(dead_code)]
fn handler_futures_are_send<'c>(
    claim: Claim<String>,
    conn: &'c mut PgConnection,
    pool: stream_dedup::sqlx::PgPool,
    effects: &'c str,
) {
    fn send<F: Send>(_: &F) {}
    let handler = async move {
        let mut tx = pool.begin().await?;
        write_effect(&mut tx, effects, "k", 0).await?;
        let mut inner = conn.begin().await?;
        write_effect(&mut inner, effects, "k", 0).await?;
        inner.commit().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(claim.commit_with(tx).await?)
    };
    send(&handler);
}

/// The effect and the key commit together; the item comes back; a redelivery, to the same
/// consumer or another one, is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn commit_with_commits_the_effect_and_the_key_together() {
    let Some(url) = pg::url("commit_with_commits_the_effect_and_the_key_together") else {
        return;
    };
    let fx = Scratch::new(&url, "eo-happy").await;
    let store = fx.store().await;
    let (deliver, deliveries) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut claims = Box::pin(
        UnboundedReceiverStream::new(deliveries)
            .claim_by_key(|m: &String| m.clone(), window(store.clone())),
    );
    let stats = claims.stats();
    deliver.send("order-1".to_owned()).unwrap();
    let claim = next(&mut claims).await;

    // A handler on another worker: the whole future is `Send + 'static`.
    let (pool, effects) = (store.pool().clone(), fx.effects.clone());
    let handler = tokio::spawn(async move {
        let mut tx = pool.begin().await.expect("begin");
        write_effect(&mut tx, &effects, &claim, 1)
            .await
            .expect("effect");
        claim.commit_with(tx).await
    });
    let item = handler.await.unwrap().expect("commit_with");
    assert_eq!(item, "order-1", "the item comes back, to ack");
    assert_eq!(fx.effects().await, [("order-1".to_owned(), 1)]);
    assert_eq!(fx.key_rows().await, [true], "the key is done in the table");
    assert_eq!(stats.committed(), 1);

    // Redelivered to the same consumer: a duplicate, and the next message is claimed.
    deliver.send("order-1".to_owned()).unwrap();
    deliver.send("order-2".to_owned()).unwrap();
    let claim = next(&mut claims).await;
    assert_eq!(*claim, "order-2");
    assert_eq!(stats.duplicates(), 1);
    drop(claim);

    // Redelivered to another consumer (its own operator and pool): a duplicate.
    let other = stream::iter(["order-1".to_owned()])
        .claim_by_key(|m: &String| m.clone(), window(fx.store().await));
    let other_stats = other.stats();
    assert_eq!(other.count().await, 0);
    assert_eq!(other_stats.duplicates(), 1);
    assert_eq!(fx.effects().await.len(), 1);
}

/// A claim whose lease ran out, and whose key another consumer took: `commit_with` rolls the
/// effect back and answers `LeaseLost` with the item; the other consumer's commit stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn a_lost_lease_rolls_the_effect_back() {
    let Some(url) = pg::url("a_lost_lease_rolls_the_effect_back") else {
        return;
    };
    let fx = Scratch::new(&url, "eo-lease").await;
    let lease = Duration::from_millis(500);
    let short = |store: PostgresStore| short_lease(store, lease);
    let store_a = fx.store().await;
    let pool_a = store_a.pool().clone();
    let mut a = pin!(
        stream::iter(["order-7".to_owned()]).claim_by_key(|m: &String| m.clone(), short(store_a))
    );
    let claim_a = next(&mut a).await;
    let mut tx_a = pool_a.begin().await.unwrap();
    write_effect(&mut tx_a, &fx.effects, &claim_a, 1)
        .await
        .unwrap();

    // A slow handler: the lease runs out, and the broker's redelivery reaches consumer B.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    assert!(claim_a.is_lost(), "the lease ran out");
    let store_b = fx.store().await;
    let mut b = pin!(
        stream::iter(["order-7".to_owned()])
            .claim_by_key(|m: &String| m.clone(), short(store_b.clone()))
    );
    let claim_b = next(&mut b).await;

    let error = claim_a.commit_with(tx_a).await.expect_err("the key is B's");
    assert!(
        matches!(error.error(), StoreError::LeaseLost),
        "{:?}",
        error.error()
    );
    assert_eq!(error.into_item(), "order-7", "the item comes back, to nack");
    assert!(fx.effects().await.is_empty(), "A's effect was rolled back");

    let mut tx_b = store_b.pool().begin().await.unwrap();
    write_effect(&mut tx_b, &fx.effects, &claim_b, 2)
        .await
        .unwrap();
    claim_b.commit_with(tx_b).await.expect("B still holds it");
    assert_eq!(fx.effects().await, [("order-7".to_owned(), 2)]);
    assert_eq!(fx.key_rows().await, [true]);
}

/// A claim of a window on a store that is not this database's (a `MemoryStore`), or on no
/// store, given a PostgreSQL transaction: refused, the transaction rolled back, the key
/// released, the item given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn a_transaction_of_another_store_is_refused_and_rolled_back() {
    let Some(url) = pg::url("a_transaction_of_another_store_is_refused_and_rolled_back") else {
        return;
    };
    let fx = Scratch::new(&url, "eo-not-tx").await;
    let pool = fx.store().await.pool().clone();

    type Claims = std::pin::Pin<Box<dyn futures::Stream<Item = Claim<String>> + Send>>;
    let (on_memory, deliveries) = tokio::sync::mpsc::unbounded_channel::<String>();
    let memory_store: Claims = Box::pin(
        UnboundedReceiverStream::new(deliveries)
            .claim_by_key(|m: &String| m.clone(), window(MemoryStore::new()))
            .held_back(HeldBack::Wait { max_parked: 8 }),
    );
    let (on_none, deliveries) = tokio::sync::mpsc::unbounded_channel::<String>();
    let no_store: Claims = Box::pin(
        UnboundedReceiverStream::new(deliveries)
            .claim_by_key(|m: &String| m.clone(), Window::max_keys(100)),
    );

    for (deliver, mut claims) in [(on_memory, memory_store), (on_none, no_store)] {
        let claims = &mut claims;
        deliver.send("order-3".to_owned()).unwrap();
        let claim = next(claims).await;
        let mut tx = pool.begin().await.unwrap();
        write_effect(&mut tx, &fx.effects, &claim, 1).await.unwrap();
        let error = claim.commit_with(tx).await.expect_err("not this store");
        assert!(
            matches!(error.error(), StoreError::NotTransactional(_)),
            "{:?}",
            error.error()
        );
        assert_eq!(error.into_item(), "order-3");
        assert!(fx.effects().await.is_empty(), "the effect was rolled back");
        // The key was released: the redelivery is processed.
        deliver.send("order-3".to_owned()).unwrap();
        let again = next(claims).await;
        assert_eq!(*again, "order-3");
        assert_eq!(again.commit().await.unwrap(), "order-3");
    }
}

/// A failing effect (the transaction aborted), and a `COMMIT` that fails (a deferred
/// constraint): `commit_with` answers the error with the item, nothing of the transaction
/// stays, and the key is released, so the redelivery is processed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn a_failing_effect_or_commit_releases_the_key() {
    let Some(url) = pg::url("a_failing_effect_or_commit_releases_the_key") else {
        return;
    };
    let mut fx = Scratch::new(&url, "eo-fail").await;
    let checks = table_name("eo_ck");
    fx.tables.push(checks.clone());
    fx.execute(&format!(
        "CREATE TABLE {checks} (id int, UNIQUE (id) DEFERRABLE INITIALLY DEFERRED); \
         INSERT INTO {checks} VALUES (1)"
    ))
    .await;
    let store = fx.store().await;
    let pool = store.pool().clone();
    let (deliver, deliveries) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut claims = Box::pin(
        UnboundedReceiverStream::new(deliveries)
            .claim_by_key(|m: &String| m.clone(), window(store))
            .held_back(HeldBack::Wait { max_parked: 8 }),
    );

    // The effect fails (a NULL where none may be) and the handler commits anyway.
    deliver.send("order-4".to_owned()).unwrap();
    let claim = next(&mut claims).await;
    let mut tx = pool.begin().await.unwrap();
    write_effect(&mut tx, &fx.effects, &claim, 1).await.unwrap();
    let bad = sqlx::query(&format!(
        "INSERT INTO {} (key, consumer) VALUES (NULL, 1)",
        fx.effects
    ))
    .execute(&mut *tx)
    .await;
    assert!(bad.is_err());
    let error = claim
        .commit_with(tx)
        .await
        .expect_err("an aborted transaction");
    assert!(
        matches!(error.error(), StoreError::Backend { .. }),
        "{:?}",
        error.error()
    );
    assert_eq!(error.into_item(), "order-4");
    assert!(fx.effects().await.is_empty());

    // Delivered again: processed again; now the COMMIT itself fails.
    deliver.send("order-4".to_owned()).unwrap();
    let claim = next(&mut claims).await;
    let mut tx = pool.begin().await.unwrap();
    write_effect(&mut tx, &fx.effects, &claim, 2).await.unwrap();
    sqlx::query(&format!("INSERT INTO {checks} VALUES (1)"))
        .execute(&mut *tx)
        .await
        .expect("deferred: checked at COMMIT");
    let error = claim.commit_with(tx).await.expect_err("COMMIT fails");
    assert_eq!(error.into_item(), "order-4");
    assert!(fx.effects().await.is_empty());

    // Delivered again: processed again, and this time it commits.
    deliver.send("order-4".to_owned()).unwrap();
    let claim = next(&mut claims).await;
    let mut tx = pool.begin().await.unwrap();
    write_effect(&mut tx, &fx.effects, &claim, 3).await.unwrap();
    claim.commit_with(tx).await.expect("commit_with");
    assert_eq!(fx.effects().await, [("order-4".to_owned(), 3)]);
    assert_eq!(fx.key_rows().await, [true]);
}

/// The effects of several claims — of two windows, on two stores — written in one
/// transaction and committed with `commit_all_with`: every key done with its effect, the items
/// back in order, every redelivery a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn commit_all_with_commits_every_effect_and_key_together() {
    let Some(url) = pg::url("commit_all_with_commits_every_effect_and_key_together") else {
        return;
    };
    let fx = Scratch::new(&url, "eo-all").await;
    let store = fx.store().await;
    let pool = store.pool().clone();
    let orders: Vec<String> = (1..=5).map(|i| format!("order-{i}")).collect();
    let mut first =
        pin!(stream::iter(orders.clone()).claim_by_key(|m: &String| m.clone(), window(store)));
    let mut second = pin!(
        stream::iter(["refund-1".to_owned()])
            .claim_by_key(|m: &String| m.clone(), window(fx.store().await))
    );
    let stats = first.stats();
    let mut claims = Vec::new();
    for _ in 0..3 {
        claims.push(next(&mut first).await);
    }
    claims.push(next(&mut second).await);
    for _ in 0..2 {
        claims.push(next(&mut first).await);
    }
    let mut tx = pool.begin().await.unwrap();
    for claim in &claims {
        write_effect(&mut tx, &fx.effects, claim, 1).await.unwrap();
    }
    let expected: Vec<String> = claims.iter().map(|c| (**c).clone()).collect();
    let items = Claim::commit_all_with(claims, tx)
        .await
        .expect("commit_all_with");
    assert_eq!(items, expected, "the items come back in order");
    assert_eq!(fx.effects().await.len(), 6);
    assert_eq!(
        fx.key_rows().await,
        [true; 6],
        "every key is done in the table"
    );
    assert_eq!(stats.committed(), 5);

    // Redelivered to another consumer: duplicates, all of them.
    let mut all = orders;
    all.push("refund-1".to_owned());
    let other = stream::iter(all).claim_by_key(|m: &String| m.clone(), window(fx.store().await));
    let other_stats = other.stats();
    assert_eq!(other.count().await, 0);
    assert_eq!(other_stats.duplicates(), 6);
}

/// One claim of three lost its lease and another consumer took its key: `commit_all_with`
/// rolls every effect back, gives every item back, and releases the two other keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn commit_all_with_rolls_every_effect_back_when_one_lease_is_lost() {
    let Some(url) = pg::url("commit_all_with_rolls_every_effect_back_when_one_lease_is_lost")
    else {
        return;
    };
    let fx = Scratch::new(&url, "eo-all-lost").await;
    let lease = Duration::from_millis(500);
    let short = |store: PostgresStore| short_lease(store, lease);
    let store_a = fx.store().await;
    let pool_a = store_a.pool().clone();
    let orders: Vec<String> = (1..=3).map(|i| format!("order-{i}")).collect();
    let mut a =
        pin!(stream::iter(orders.clone()).claim_by_key(|m: &String| m.clone(), short(store_a)));
    let mut claims = Vec::new();
    for _ in 0..3 {
        claims.push(next(&mut a).await);
    }
    let mut tx_a = pool_a.begin().await.unwrap();
    for claim in &claims {
        write_effect(&mut tx_a, &fx.effects, claim, 1)
            .await
            .unwrap();
    }

    // A slow handler: the leases run out, and order-2's redelivery reaches consumer B.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    let store_b = fx.store().await;
    let mut b = pin!(
        stream::iter(["order-2".to_owned()])
            .claim_by_key(|m: &String| m.clone(), short(store_b.clone()))
    );
    let claim_b = next(&mut b).await;

    let error = Claim::commit_all_with(claims, tx_a)
        .await
        .expect_err("order-2 is B's");
    assert!(
        matches!(error.error(), StoreError::LeaseLost),
        "{:?}",
        error.error()
    );
    assert_eq!(error.into_item(), orders, "every item comes back, to nack");
    assert!(
        fx.effects().await.is_empty(),
        "every effect was rolled back"
    );
    // A's two other keys are released (in the background): only B's claim is left.
    let deadline = Instant::now() + PATIENCE;
    while fx.key_rows().await != [false] {
        assert!(
            Instant::now() < deadline,
            "A's keys were not released: {:?}",
            fx.key_rows().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut tx_b = store_b.pool().begin().await.unwrap();
    write_effect(&mut tx_b, &fx.effects, &claim_b, 2)
        .await
        .unwrap();
    claim_b.commit_with(tx_b).await.expect("B still holds it");
    assert_eq!(fx.effects().await, [("order-2".to_owned(), 2)]);
}

/// `commit_all_with` fails whole: with a claim of a window on another store
/// (`NotTransactional`), and when the `COMMIT` itself fails (a deferred constraint). Each
/// time every effect is rolled back, every item given back, and every key released, so the
/// redeliveries are processed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn commit_all_with_fails_whole_and_releases_every_key() {
    let Some(url) = pg::url("commit_all_with_fails_whole_and_releases_every_key") else {
        return;
    };
    let mut fx = Scratch::new(&url, "eo-all-fail").await;
    let checks = table_name("eo_ck");
    fx.tables.push(checks.clone());
    fx.execute(&format!(
        "CREATE TABLE {checks} (id int, UNIQUE (id) DEFERRABLE INITIALLY DEFERRED); \
         INSERT INTO {checks} VALUES (1)"
    ))
    .await;
    let store = fx.store().await;
    let pool = store.pool().clone();
    let (deliver, deliveries) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut claims = Box::pin(
        UnboundedReceiverStream::new(deliveries)
            .claim_by_key(|m: &String| m.clone(), window(store))
            .held_back(HeldBack::Wait { max_parked: 8 }),
    );
    let mut elsewhere = pin!(
        stream::iter(["order-x".to_owned()])
            .claim_by_key(|m: &String| m.clone(), window(MemoryStore::new()))
    );
    let orders = ["order-1".to_owned(), "order-2".to_owned()];
    let deliver_both = || {
        for order in &orders {
            deliver.send(order.clone()).unwrap();
        }
    };

    // A claim of a window on a MemoryStore among them: refused, nothing stays.
    deliver_both();
    let mut batch = vec![next(&mut claims).await, next(&mut claims).await];
    batch.push(next(&mut elsewhere).await);
    let mut tx = pool.begin().await.unwrap();
    for claim in &batch {
        write_effect(&mut tx, &fx.effects, claim, 1).await.unwrap();
    }
    let error = Claim::commit_all_with(batch, tx)
        .await
        .expect_err("not this store");
    assert!(
        matches!(error.error(), StoreError::NotTransactional(_)),
        "{:?}",
        error.error()
    );
    assert_eq!(error.into_item(), ["order-1", "order-2", "order-x"]);
    assert!(fx.effects().await.is_empty());

    // Delivered again: claimed again (released); now the COMMIT fails.
    deliver_both();
    let batch = vec![next(&mut claims).await, next(&mut claims).await];
    let mut tx = pool.begin().await.unwrap();
    for claim in &batch {
        write_effect(&mut tx, &fx.effects, claim, 2).await.unwrap();
    }
    sqlx::query(&format!("INSERT INTO {checks} VALUES (1)"))
        .execute(&mut *tx)
        .await
        .expect("deferred: checked at COMMIT");
    let error = Claim::commit_all_with(batch, tx)
        .await
        .expect_err("COMMIT fails");
    assert_eq!(error.into_item(), orders);
    assert!(fx.effects().await.is_empty());

    // Delivered again: claimed again, and this time committed.
    deliver_both();
    let batch = vec![next(&mut claims).await, next(&mut claims).await];
    let mut tx = pool.begin().await.unwrap();
    for claim in &batch {
        write_effect(&mut tx, &fx.effects, claim, 3).await.unwrap();
    }
    assert_eq!(Claim::commit_all_with(batch, tx).await.unwrap(), orders);
    assert_eq!(fx.effects().await.len(), 2);
    assert_eq!(fx.key_rows().await, [true, true]);
}

// ---------------------------------------------------------------------------------------------
// A crash anywhere: consumer processes killed at random moments.
// ---------------------------------------------------------------------------------------------

/// Set in a consumer process: its settings (see [`Consumer::from_env`]).
const CONSUMER_ENV: &str = "STREAM_DEDUP_EO_CONSUMER";
/// Keys, and copies of each delivered to each consumer in each run (interleaved at random).
/// Crash run `r` delivers the first `(r + 1) * NEW_KEYS` keys: new ones, and the earlier
/// runs' again (their acks lost); the runs after the crash runs deliver them all.
const NEW_KEYS: usize = 20;
const COPIES: usize = 3;
/// Short, so that a dead consumer's claims are taken over quickly.
const LEASE: Duration = Duration::from_millis(800);
/// Runs in which consumers crash: each point twice, then the points that did not happen
/// (a consumer may get fewer claims than its crash was set at) again, up to
/// `MAX_CRASH_RUNS`. Then runs without crashes until every key is done.
const CRASH_RUNS: u64 = 10;
const MAX_CRASH_RUNS: u64 = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The effect and `claim.commit_with(tx)`.
    CommitWith,
    /// The effect, `tx.commit()`, then `claim.commit()`: the gap `commit_with` closes.
    Naive,
}

/// Where a consumer kills itself, at its `crash_after`-th claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// Claimed, before the transaction.
    BeforeEffect,
    /// The effect written, its transaction open.
    InTx,
    /// While the commit runs (a thread kills the process after a random 0–3 ms).
    DuringCommit,
    /// The effect committed and, with `commit_with`, the key done: before the ack. With
    /// `tx.commit()` then `claim.commit()`, between the two.
    AfterCommit,
    /// After the ack.
    AfterAck,
}

const POINTS: [Point; 5] = [
    Point::AfterCommit,
    Point::InTx,
    Point::DuringCommit,
    Point::BeforeEffect,
    Point::AfterAck,
];

/// A consumer process's settings.
#[derive(Debug)]
struct Consumer {
    mode: Mode,
    namespace: String,
    keys_table: String,
    effects: String,
    id: i32,
    seed: u64,
    /// Deliver keys `0..keys`.
    keys: usize,
    /// Kill itself at this claim (1-based), at `point`.
    crash: Option<(usize, Point)>,
    /// Keep-alive off, and some handlers stall past the lease (a processing timeout).
    stall: bool,
}

impl Consumer {
    fn to_env(&self) -> String {
        let (after, point) = self.crash.map_or((0, 0), |(n, p)| {
            (n, POINTS.iter().position(|&q| q == p).unwrap())
        });
        format!(
            "{};{};{};{};{};{};{};{};{};{}",
            matches!(self.mode, Mode::Naive) as u8,
            self.namespace,
            self.keys_table,
            self.effects,
            self.id,
            self.seed,
            after,
            point,
            self.stall as u8,
            self.keys
        )
    }

    /// The settings of this process if it is a consumer.
    fn from_env() -> Option<Consumer> {
        let env = std::env::var(CONSUMER_ENV).ok()?;
        let f: Vec<&str> = env.split(';').collect();
        let after: usize = f[6].parse().unwrap();
        Some(Consumer {
            mode: if f[0] == "1" {
                Mode::Naive
            } else {
                Mode::CommitWith
            },
            namespace: f[1].to_owned(),
            keys_table: f[2].to_owned(),
            effects: f[3].to_owned(),
            id: f[4].parse().unwrap(),
            seed: f[5].parse().unwrap(),
            crash: (after > 0).then(|| (after, POINTS[f[7].parse::<usize>().unwrap()])),
            stall: f[8] == "1",
            keys: f[9].parse().unwrap(),
        })
    }

    /// Runs the consumer: every key `COPIES` times, interleaved, claimed, the effect written,
    /// committed as the mode says; killed where `crash` says.
    fn run(self) {
        let url = std::env::var("STREAM_DEDUP_POSTGRES_URL").expect("the URL, from the test");
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(self.consume(&url));
    }

    async fn consume(self, url: &str) {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let store = PostgresStore::builder(&self.namespace)
            .table(&self.keys_table)
            .statement_timeout(Duration::from_secs(5))
            .max_connections(4)
            .no_purge()
            .connect(url)
            .await
            .expect("connect");
        let pool = store.pool().clone();
        let mut deliveries: Vec<String> = (0..self.keys)
            .flat_map(|k| std::iter::repeat_n(format!("key-{k:04}"), COPIES))
            .collect();
        deliveries.shuffle(&mut rng);
        let window = Window::max_keys(10_000)
            .ttl(TTL)
            .lease(LEASE)
            .keep_alive(!self.stall)
            .store(store)
            .batch_size(16)
            .timeout(Duration::from_secs(5));
        // Copies of a key in flight elsewhere: parked until it settles (keep-alive asks again
        // each round); without keep-alive, left to the next run (a redelivery).
        let policy = if self.stall {
            HeldBack::Hook
        } else {
            HeldBack::Wait { max_parked: 10_000 }
        };
        let mut claims = pin!(
            stream::iter(deliveries)
                .claim_by_key(|k: &String| k.clone(), window)
                .held_back(policy)
        );
        let (mut claimed, mut lost, mut failed) = (0usize, 0u32, 0u32);
        while let Some(claim) = claims.next().await {
            claimed += 1;
            let crash = |point| {
                let here = self.crash == Some((claimed, point));
                if here {
                    eprintln!("EO-CRASH {point:?}");
                }
                here
            };
            if crash(Point::BeforeEffect) {
                die();
            }
            let Ok(mut tx) = pool.begin().await else {
                failed += 1;
                continue;
            };
            if write_effect(&mut tx, &self.effects, &claim, self.id)
                .await
                .is_err()
            {
                failed += 1;
                continue;
            }
            if crash(Point::InTx) {
                die();
            }
            if self.stall && rng.random_bool(0.1) {
                // Past the lease: another consumer may take the key meanwhile.
                eprintln!("EO-STALL");
                tokio::time::sleep(LEASE * 3 / 2).await;
            }
            if crash(Point::DuringCommit) {
                let delay = Duration::from_micros(rng.random_range(0..3_000));
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    die();
                });
            }
            match self.mode {
                Mode::CommitWith => match claim.commit_with(tx).await {
                    Ok(_) => {}
                    Err(e) => {
                        if matches!(e.error(), StoreError::LeaseLost) {
                            eprintln!("EO-LOST");
                            lost += 1;
                        } else {
                            failed += 1;
                        }
                        continue; // not acked: the broker redelivers it
                    }
                },
                Mode::Naive => {
                    if tx.commit().await.is_err() {
                        failed += 1;
                        continue;
                    }
                    if crash(Point::AfterCommit) {
                        die();
                    }
                    match claim.commit().await {
                        Ok(_) => {}
                        Err(e) => {
                            if matches!(e.error(), StoreError::LeaseLost) {
                                eprintln!("EO-LOST");
                                lost += 1;
                            } else {
                                failed += 1;
                            }
                            continue;
                        }
                    }
                }
            }
            if crash(Point::AfterCommit) {
                die();
            }
            // The ack would go here; every run redelivers everything anyway (lost acks).
            if crash(Point::AfterAck) {
                die();
            }
        }
        eprintln!("EO-STATS claimed={claimed} lease_lost={lost} failed={failed}");
    }
}

/// Kills this process with `SIGKILL`: no destructor, no release, no `ROLLBACK` sent.
fn die() -> ! {
    let _ = Command::new("kill")
        .args(["-KILL", &std::process::id().to_string()])
        .status();
    std::process::abort();
}

/// What the crash runs left.
#[derive(Debug, Default)]
struct Outcome {
    /// Keys with more than one effect row.
    doubled: usize,
    /// Keys with no effect row.
    missing: usize,
    /// Keys delivered.
    keys: usize,
    /// Consumers killed (by themselves or by the test).
    kills: usize,
    /// Handlers that stalled past their lease.
    stalls: u64,
    /// Commits that found their lease lost (and rolled back, with `commit_with`).
    leases_lost: u64,
    /// Where consumers killed themselves, and how often.
    crashes: std::collections::BTreeMap<String, usize>,
    runs: usize,
}

/// The crash runs of one mode: `CRASH_RUNS` runs of three consumers, in which consumer 0 or 1
/// kills itself at a point (each point in turn, for each of them), the other is killed by the
/// test at a random moment (if it is still running), and consumer 2 stalls past its lease now
/// and then (keep-alive off),
/// then runs without crashes until every key is done.
fn crash_runs(url: &str, mode: Mode, test: &str) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut scratch = rt.block_on(Scratch::new(url, test));
    let keys_table = table_name("eo_keys");
    scratch.tables.push(keys_table.clone());
    let seed = std::env::var("STREAM_DEDUP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: STREAM_DEDUP_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let logs = support::redis_server::TempDir::new("exactly-once");
    let exe = std::env::current_exe().expect("the test binary");
    let mut outcome = Outcome::default();

    let done = |scratch: &Scratch, keys: usize| -> usize {
        if keys == 0 {
            return 0;
        }
        rt.block_on(async {
            let mut conn = pg::connection(url).await;
            // The table exists once a consumer has connected.
            let count: Result<i64, _> = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {keys_table} WHERE namespace = $1 AND done AND key < $2"
            ))
            .bind(&scratch.namespace)
            .bind(format!("key-{keys:04}").into_bytes())
            .fetch_one(&mut conn)
            .await;
            count.map_or(0, |c| c as usize)
        })
    };

    let mut run = 0u64;
    let (mut crashing, mut keys) = (true, 0);
    loop {
        let pending: Vec<Point> = POINTS
            .into_iter()
            .filter(|p| !outcome.crashes.contains_key(&format!("{p:?}")))
            .collect();
        crashing = crashing && (run < CRASH_RUNS || (!pending.is_empty() && run < MAX_CRASH_RUNS));
        if crashing {
            keys += NEW_KEYS;
        }
        let remaining = keys - done(&scratch, keys);
        if !crashing && remaining == 0 {
            break;
        }
        assert!(
            run < MAX_CRASH_RUNS + 12,
            "keys still not done after {run} runs"
        );
        // Each point in turn, for each consumer once; then the points still pending.
        let (victim, point) = if run < CRASH_RUNS {
            ((run / 5) % 2, POINTS[run as usize % POINTS.len()])
        } else {
            (
                run % 2,
                pending.first().copied().unwrap_or(Point::AfterCommit),
            )
        };
        let victim = victim as i32;
        let spawn = |id: i32, crash: Option<(usize, Point)>, seed: u64| {
            let consumer = Consumer {
                mode,
                namespace: scratch.namespace.clone(),
                keys_table: keys_table.clone(),
                effects: scratch.effects.clone(),
                id,
                seed,
                keys,
                crash,
                // Consumer 2 stalls past its lease now and then, with keep-alive off.
                stall: id == 2,
            };
            let log: PathBuf = logs.path().join(format!("run-{run}-consumer-{id}.log"));
            let child = Command::new(&exe)
                .args(["--exact", test, "--nocapture", "--test-threads=1"])
                .env(CONSUMER_ENV, consumer.to_env())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start a consumer");
            (child, log)
        };
        let mut children = Vec::new();
        let mut killed_at = None;
        for id in 0..3 {
            let crash = (crashing && id == victim).then(|| {
                let after = rng.random_range(1..=(remaining / 5).max(1));
                (after, point)
            });
            if crashing && id == 1 - victim {
                killed_at = Some(Instant::now() + Duration::from_millis(rng.random_range(30..500)));
            }
            children.push(spawn(id, crash, rng.random()));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut statuses = vec![None; children.len()];
        while statuses.iter().any(Option::is_none) {
            for (i, (child, _)) in children.iter_mut().enumerate() {
                if statuses[i].is_none() {
                    statuses[i] = child.try_wait().expect("wait for a consumer");
                }
            }
            let other = (1 - victim) as usize;
            if killed_at.is_some_and(|at| Instant::now() >= at) && statuses[other].is_none() {
                let _ = children[other].0.kill(); // SIGKILL
                killed_at = None;
            }
            if Instant::now() > deadline {
                for (child, _) in &mut children {
                    let _ = child.kill();
                }
                panic!("a consumer did not finish within 120 s (run {run})");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for (status, (_, log)) in statuses.iter().zip(&children) {
            let status = status.unwrap();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            outcome.leases_lost += log.lines().filter(|l| *l == "EO-LOST").count() as u64;
            outcome.stalls += log.lines().filter(|l| *l == "EO-STALL").count() as u64;
            if status.signal() == Some(9) {
                outcome.kills += 1;
                for line in log.lines().filter(|l| l.starts_with("EO-CRASH ")) {
                    *outcome.crashes.entry(line[9..].to_owned()).or_default() += 1;
                }
                continue;
            }
            assert!(status.success(), "a consumer failed ({status}):\n{log}");
        }
        run += 1;
        outcome.runs += 1;
    }

    let effects = rt.block_on(scratch.effects());
    let mut per_key = std::collections::HashMap::<String, usize>::new();
    for (key, _) in &effects {
        *per_key.entry(key.clone()).or_default() += 1;
    }
    outcome.doubled = per_key.values().filter(|&&n| n > 1).count();
    outcome.keys = keys;
    outcome.missing = keys - per_key.len();
    eprintln!("{test}: {outcome:?} ({} effect rows)", effects.len());
    drop(scratch);
    outcome
}

/// Consumers crash anywhere, again and again; every key is done in the end, and its effect
/// is in the table exactly once.
#[test]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
fn crash_anywhere_commit_with_applies_each_effect_once() {
    const TEST: &str = "crash_anywhere_commit_with_applies_each_effect_once";
    if let Some(consumer) = Consumer::from_env() {
        consumer.run();
        return;
    }
    let Some(url) = pg::url(TEST) else {
        return;
    };
    let outcome = crash_runs(&url, Mode::CommitWith, TEST);
    // Not vacuous: consumers died at every point.
    for point in POINTS {
        let point = format!("{point:?}");
        assert!(
            outcome.crashes.contains_key(&point),
            "no crash at {point}: {outcome:?}"
        );
    }
    assert_eq!(outcome.missing, 0, "an effect is missing: {outcome:?}");
    assert_eq!(
        outcome.doubled, 0,
        "an effect was applied twice: {outcome:?}"
    );
}

/// The same runs with the effect's transaction committed, then the claim: a consumer that
/// dies between the two has applied the effect and left the key in flight, and the
/// redelivery applies it again.
#[test]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
fn crash_between_commits_doubles_effects_without_commit_with() {
    const TEST: &str = "crash_between_commits_doubles_effects_without_commit_with";
    if let Some(consumer) = Consumer::from_env() {
        consumer.run();
        return;
    }
    let Some(url) = pg::url(TEST) else {
        return;
    };
    let outcome = crash_runs(&url, Mode::Naive, TEST);
    assert!(outcome.crashes.contains_key("AfterCommit"), "{outcome:?}");
    assert_eq!(outcome.missing, 0, "an effect is missing: {outcome:?}");
    assert!(outcome.doubled >= 1, "no effect was doubled: {outcome:?}");
}
