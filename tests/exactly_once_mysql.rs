//! Exactly-once effects with MySQL / MariaDB: [`Claim::commit_with`] on a
//! `sqlx::Transaction<'_, MySql>` marks the key done inside the transaction that wrote the
//! effect, so the two commit or roll back together (the crash test of `tests/exactly_once.rs`
//! proves the same on PostgreSQL, where the code path above the store is the same).
//!
//! Needs the `mysql` feature and `STREAM_DEDUP_MYSQL_URL` (e.g.
//! `mysql://root@127.0.0.1:3306/test`). Each test works in a namespace and an effects table of
//! its own and drops them at the end.
#![cfg(feature = "mysql")]

mod support;

use std::pin::pin;
use std::time::Duration;

use futures::{StreamExt, stream};
use stream_dedup::sqlx::{self, MySql, Transaction};
use stream_dedup::store::{MemoryStore, MySqlStore, StoreError, Token};
use stream_dedup::{Claim, DedupStreamExt, StoreWindow, Window};
use support::mysql_server;

const TTL: Duration = Duration::from_secs(600);

/// A namespace and an effects table of this test (`k varchar, consumer int`, no unique key).
struct Scratch {
    url: String,
    namespace: String,
    effects: String,
}

impl Scratch {
    async fn new(url: &str, test: &str) -> Scratch {
        let tag = Token::new().to_string().replace('-', "");
        let scratch = Scratch {
            url: url.to_owned(),
            namespace: format!("{test}-{tag}"),
            effects: format!("eo_effects_{}", &tag[..16]),
        };
        let mut conn = mysql_server::admin(url).await;
        sqlx::raw_sql(&format!(
            "CREATE TABLE {} (k VARCHAR(64) NOT NULL, consumer INT NOT NULL)",
            scratch.effects
        ))
        .execute(&mut conn)
        .await
        .expect("create the effects table");
        scratch
    }

    async fn store(&self) -> MySqlStore {
        MySqlStore::builder(&self.namespace)
            .timeout(Duration::from_secs(5))
            .connect(&self.url)
            .await
            .expect("connect")
    }

    /// The effects written, in order.
    async fn effects(&self) -> Vec<(String, i32)> {
        let mut conn = mysql_server::admin(&self.url).await;
        sqlx::query_as(&format!(
            "SELECT k, consumer FROM {} ORDER BY k, consumer",
            self.effects
        ))
        .fetch_all(&mut conn)
        .await
        .expect("read the effects")
    }

    async fn drop_all(self) {
        let mut conn = mysql_server::admin(&self.url).await;
        sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {}", self.effects))
            .execute(&mut conn)
            .await
            .expect("drop the effects table");
        mysql_server::delete_namespace(&self.url, "stream_dedup_keys", &self.namespace).await;
    }
}

/// The effect: one row, written in `tx`.
async fn write_effect(
    tx: &mut Transaction<'_, MySql>,
    effects: &str,
    key: &str,
    consumer: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {effects} (k, consumer) VALUES (?, ?)"
    ))
    .bind(key)
    .bind(consumer)
    .execute(&mut **tx)
    .await
    .map(drop)
}

/// A window whose claims' leases run out after `lease` (keep-alive off).
fn short_lease(store: MySqlStore, lease: Duration) -> StoreWindow<MySqlStore> {
    Window::max_keys(100)
        .ttl(TTL)
        .lease(lease)
        .keep_alive(false)
        .store(store)
}

/// The effect and the key commit together; a redelivery to another consumer is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn commit_with_commits_the_effect_and_the_key_together() {
    let Some(url) = mysql_server::url("commit_with_commits_the_effect_and_the_key_together") else {
        return;
    };
    let fx = Scratch::new(&url, "eo-my-happy").await;
    let store = fx.store().await;
    let w = |store| Window::max_keys(100).ttl(TTL).store(store);
    let mut claims = pin!(
        stream::iter(["order-1".to_owned()]).claim_by_key(|m: &String| m.clone(), w(store.clone()))
    );
    let claim = claims.next().await.expect("claimed");
    let mut tx = store.pool().begin().await.expect("begin");
    write_effect(&mut tx, &fx.effects, &claim, 1)
        .await
        .expect("effect");
    let item = claim.commit_with(tx).await.expect("commit_with");
    assert_eq!(item, "order-1");
    assert_eq!(fx.effects().await, [("order-1".to_owned(), 1)]);

    let other = stream::iter(["order-1".to_owned()])
        .claim_by_key(|m: &String| m.clone(), w(fx.store().await));
    let stats = other.stats();
    assert_eq!(other.count().await, 0, "the redelivery is a duplicate");
    assert_eq!(stats.duplicates(), 1);
    fx.drop_all().await;
}

/// A claim whose lease ran out and whose key another consumer took: `commit_with` rolls the
/// effect back and answers `LeaseLost` with the item; the other consumer's commit stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn a_lost_lease_rolls_the_effect_back() {
    let Some(url) = mysql_server::url("a_lost_lease_rolls_the_effect_back") else {
        return;
    };
    let fx = Scratch::new(&url, "eo-my-lease").await;
    let lease = Duration::from_millis(500);
    let short = |store| short_lease(store, lease);
    let store_a = fx.store().await;
    let mut a = pin!(
        stream::iter(["order-7".to_owned()])
            .claim_by_key(|m: &String| m.clone(), short(store_a.clone()))
    );
    let claim_a = a.next().await.expect("claimed");
    let mut tx_a = store_a.pool().begin().await.unwrap();
    write_effect(&mut tx_a, &fx.effects, &claim_a, 1)
        .await
        .unwrap();

    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    let store_b = fx.store().await;
    let mut b = pin!(
        stream::iter(["order-7".to_owned()])
            .claim_by_key(|m: &String| m.clone(), short(store_b.clone()))
    );
    let claim_b = b.next().await.expect("the key is free again");

    let error = claim_a.commit_with(tx_a).await.expect_err("the key is B's");
    assert!(
        matches!(error.error(), StoreError::LeaseLost),
        "{:?}",
        error.error()
    );
    assert_eq!(error.into_item(), "order-7");
    assert!(fx.effects().await.is_empty(), "A's effect was rolled back");

    let mut tx_b = store_b.pool().begin().await.unwrap();
    write_effect(&mut tx_b, &fx.effects, &claim_b, 2)
        .await
        .unwrap();
    claim_b.commit_with(tx_b).await.expect("B still holds it");
    assert_eq!(fx.effects().await, [("order-7".to_owned(), 2)]);
    fx.drop_all().await;
}

/// The effects of several claims written in one transaction and committed with
/// `commit_all_with`: every key done with its effect; then one claim of three loses its key
/// to another consumer, and `commit_all_with` rolls every effect back and frees the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn commit_all_with_commits_every_key_or_none() {
    let Some(url) = mysql_server::url("commit_all_with_commits_every_key_or_none") else {
        return;
    };
    let fx = Scratch::new(&url, "eo-my-all").await;
    let lease = Duration::from_millis(500);
    let short = |store| short_lease(store, lease);
    let store_a = fx.store().await;
    let orders: Vec<String> = (1..=6).map(|i| format!("order-{i}")).collect();
    let mut a = pin!(
        stream::iter(orders.clone()).claim_by_key(|m: &String| m.clone(), short(store_a.clone()))
    );
    let mut claims = Vec::new();
    for _ in 0..3 {
        claims.push(a.next().await.expect("claimed"));
    }
    let mut tx = store_a.pool().begin().await.unwrap();
    for claim in &claims {
        write_effect(&mut tx, &fx.effects, claim, 1).await.unwrap();
    }
    let items = Claim::commit_all_with(claims, tx)
        .await
        .expect("commit_all_with");
    assert_eq!(items, orders[..3], "the items come back in order");

    // The next three: their leases run out, and order-5's redelivery reaches consumer B.
    let mut claims = Vec::new();
    for _ in 0..3 {
        claims.push(a.next().await.expect("claimed"));
    }
    let mut tx = store_a.pool().begin().await.unwrap();
    for claim in &claims {
        write_effect(&mut tx, &fx.effects, claim, 1).await.unwrap();
    }
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    let store_b = fx.store().await;
    let mut b = pin!(
        stream::iter(["order-5".to_owned()])
            .claim_by_key(|m: &String| m.clone(), short(store_b.clone()))
    );
    let claim_b = b.next().await.expect("the key is free again");
    let error = Claim::commit_all_with(claims, tx)
        .await
        .expect_err("order-5 is B's");
    assert!(
        matches!(error.error(), StoreError::LeaseLost),
        "{:?}",
        error.error()
    );
    assert_eq!(
        error.into_item(),
        orders[3..],
        "every item comes back, to nack"
    );
    let committed: Vec<(String, i32)> = orders[..3].iter().map(|o| (o.clone(), 1)).collect();
    assert_eq!(
        fx.effects().await,
        committed,
        "the second transaction was rolled back"
    );

    // Redelivered to a third consumer: the first three are duplicates; order-4 and order-6
    // are free (released, and their leases ran out anyway), order-5 is still B's (held back:
    // not yielded).
    let other =
        stream::iter(orders.clone()).claim_by_key(|m: &String| m.clone(), short(fx.store().await));
    let stats = other.stats();
    let mut fresh: Vec<String> = Vec::new();
    let mut other = pin!(other);
    while let Some(claim) = other.next().await {
        fresh.push(claim.release());
    }
    assert_eq!(fresh, ["order-4", "order-6"]);
    assert_eq!(stats.duplicates(), 3);
    drop(claim_b);
    fx.drop_all().await;
}

/// A claim of a window on another store, given a MySQL transaction: refused with
/// `NotTransactional`, the transaction (and its effect) rolled back, the key released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn a_transaction_of_another_store_is_refused() {
    let Some(url) = mysql_server::url("a_transaction_of_another_store_is_refused") else {
        return;
    };
    let fx = Scratch::new(&url, "eo-my-other").await;
    let pool = fx.store().await.pool().clone();
    let memory = MemoryStore::new();
    let w = || Window::max_keys(100).ttl(TTL).store(memory.clone());
    let mut claims =
        pin!(stream::iter(["order-9".to_owned()]).claim_by_key(|m: &String| m.clone(), w()));
    let claim = claims.next().await.expect("claimed");
    let mut tx = pool.begin().await.unwrap();
    write_effect(&mut tx, &fx.effects, &claim, 1).await.unwrap();
    let error = claim.commit_with(tx).await.expect_err("not this store");
    assert!(
        matches!(error.error(), StoreError::NotTransactional(_)),
        "{:?}",
        error.error()
    );
    assert!(fx.effects().await.is_empty(), "the effect was rolled back");
    let again: Vec<_> = stream::iter(["order-9".to_owned()])
        .claim_by_key(|m: &String| m.clone(), w())
        .collect()
        .await;
    assert_eq!(again.len(), 1, "the key was released");
    fx.drop_all().await;
}

/// A key's row: (token, done, expiry as the server writes it).
async fn key_row(
    conn: &mut sqlx::MySqlConnection,
    namespace: &str,
    key: &[u8],
) -> Option<(Vec<u8>, bool, String)> {
    sqlx::query_as(
        "SELECT token, done, CAST(expires_at AS CHAR) FROM stream_dedup_keys \
         WHERE namespace = ? AND k = ?",
    )
    .bind(namespace.as_bytes())
    .bind(key)
    .fetch_optional(conn)
    .await
    .expect("read the key's row")
}

/// `MySqlStore::commit_in` answers by what the key's row holds: in flight or done with this
/// claim's token, expired (whoever held it), or no row at all → `true`, the row done with the
/// token for the ttl; in flight or done with another token and live → `false`, the row
/// untouched. Insert ids of the caller's own statements (an `AUTO_INCREMENT` effect,
/// `LAST_INSERT_ID(n)`) and a refusal just before on the same connection change no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn commit_in_answers_by_the_keys_row() {
    use stream_dedup::store::{ClaimBatch, ClaimStore, Claimed, InsertBatch, Inserted, Store};
    let Some(url) = mysql_server::url("commit_in_answers_by_the_keys_row") else {
        return;
    };
    let fx = Scratch::new(&url, "eo-my-rows").await;
    let store = fx.store().await;
    let ns = fx.namespace.clone();
    let mut conn = mysql_server::admin(&url).await;
    let auto = format!("{}_auto", fx.effects);
    sqlx::raw_sql(&format!(
        "CREATE TABLE {auto} (id BIGINT AUTO_INCREMENT PRIMARY KEY, k VARCHAR(64) NOT NULL)"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let short = Duration::from_millis(50);
    let claim = |key: &str, lease| ClaimBatch::new(vec![key.as_bytes().to_vec()], lease);
    let record = |key: &str, ttl| InsertBatch::new(vec![key.as_bytes().to_vec()], ttl);

    // Rows held by other tokens: live (in flight, done) and expired (in flight, done).
    assert_eq!(
        store.claim(claim("live-in-flight", TTL)).await.unwrap(),
        [Claimed::Mine]
    );
    assert_eq!(
        store.insert(record("live-done", TTL)).await.unwrap(),
        [Inserted::New]
    );
    assert_eq!(
        store
            .claim(claim("expired-in-flight", short))
            .await
            .unwrap(),
        [Claimed::Mine]
    );
    assert_eq!(
        store.insert(record("expired-done", short)).await.unwrap(),
        [Inserted::New]
    );
    // This claim's keys.
    let mine = ClaimBatch::new(vec![b"mine".to_vec(), b"mine-after".to_vec()], TTL);
    let token = mine.token;
    assert_eq!(
        store.claim(mine).await.unwrap(),
        [Claimed::Mine, Claimed::Mine]
    );
    tokio::time::sleep(short * 3).await;

    for key in ["live-in-flight", "live-done"] {
        let before = key_row(&mut conn, &ns, key.as_bytes()).await.unwrap();
        let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
        let held = store.commit_in(&mut tx, key.as_bytes(), token, TTL).await;
        assert!(!held.unwrap(), "{key}: another token holds it");
        tx.commit().await.unwrap();
        let after = key_row(&mut conn, &ns, key.as_bytes()).await.unwrap();
        assert_eq!(
            after, before,
            "{key}: the other claim's row is left as it is"
        );
    }
    // Straight after a refusal on this connection, and after insert ids of the caller's own.
    let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
    sqlx::query(&format!("INSERT INTO {auto} (k) VALUES ('x')"))
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT LAST_INSERT_ID(7)")
        .execute(&mut *tx)
        .await
        .unwrap();
    for key in [
        "mine",
        "mine",
        "expired-in-flight",
        "expired-done",
        "no-row",
    ] {
        let held = store.commit_in(&mut tx, key.as_bytes(), token, TTL).await;
        assert!(held.unwrap(), "{key}");
    }
    sqlx::query(&format!("INSERT INTO {auto} (k) VALUES ('y')"))
        .execute(&mut *tx)
        .await
        .unwrap();
    assert!(
        store
            .commit_in(&mut tx, b"mine-after", token, TTL)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    for key in [
        "mine",
        "mine-after",
        "expired-in-flight",
        "expired-done",
        "no-row",
    ] {
        let (held_by, done, _) = key_row(&mut conn, &ns, key.as_bytes()).await.unwrap();
        assert_eq!((held_by, done), (token.to_bytes().to_vec(), true), "{key}");
    }
    let again = store
        .claim(ClaimBatch::new(vec![b"expired-in-flight".to_vec()], TTL))
        .await
        .unwrap();
    assert_eq!(again, [Claimed::Done]);

    sqlx::raw_sql(&format!("DROP TABLE {auto}"))
        .execute(&mut conn)
        .await
        .unwrap();
    fx.drop_all().await;
}
