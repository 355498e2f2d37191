//! [`MySqlStore`] against real servers.
//!
//! - `STREAM_DEDUP_MYSQL_URL` (e.g. `mysql://root@127.0.0.1:3306/test`): the store and claim
//!   suites, restarts, consumers that agree, deadlocks, killed connections, bad keys, expiry
//!   and purge, `commit_in` in real transactions — each test in a namespace (or a table) of
//!   its own, deleted at its end.
//! - `STREAM_DEDUP_MYSQL_SERVER` (the path of `mariadbd` or `mysqld`): the tests that stop a
//!   server start their own on a free loopback port and kill it (by pid) when done.
//!
//! Unset, the tests say they skipped and pass.
#![cfg(feature = "mysql")]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use sqlx::mysql::{MySqlConnection, MySqlPoolOptions};
use sqlx::{Connection as _, Executor as _, Row as _};
use stream_dedup::sqlx;
use stream_dedup::store::{
    ClaimBatch, ClaimStore, Claimed, InsertBatch, Inserted, MySqlStore, Store, StoreError, Token,
};
use stream_dedup::{DedupStreamExt, Window};
use support::mysql_server::{self, MySqlServer, Proxy};

const TABLE: &str = "stream_dedup_keys";
const TTL: Duration = Duration::from_secs(120);

async fn make(namespace: String) -> Option<MySqlStore> {
    let url = std::env::var("STREAM_DEDUP_MYSQL_URL").ok()?;
    // Generous: the suite runs in parallel with the other tests on a small machine.
    let store = MySqlStore::builder(&namespace)
        .timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .expect("connect to STREAM_DEDUP_MYSQL_URL");
    Some(store)
}

stream_dedup::store_suite!(
    #[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
    make,
    expiry = Duration::from_millis(50)
);
stream_dedup::claim_suite!(
    #[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
    make,
    expiry = Duration::from_millis(50)
);

/// The suites again with batches recorded as on MySQL (the upsert, then the read-back when it
/// met a key of another request), which MariaDB answers with `RETURNING` otherwise.
mod read_back {
    use super::*;

    async fn make_read_back(namespace: String) -> Option<MySqlStore> {
        let url = std::env::var("STREAM_DEDUP_MYSQL_URL").ok()?;
        let store = MySqlStore::builder(&namespace)
            .timeout(Duration::from_secs(5))
            .without_returning()
            .connect(&url)
            .await
            .expect("connect to STREAM_DEDUP_MYSQL_URL");
        Some(store)
    }

    stream_dedup::store_suite!(
        #[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
        make_read_back,
        expiry = Duration::from_millis(50)
    );
    stream_dedup::claim_suite!(
        #[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
        make_read_back,
        expiry = Duration::from_millis(50)
    );
}

/// A namespace unique to this test and run.
fn namespace(test: &str) -> String {
    format!("test-{test}-{}-{}", std::process::id(), Token::new())
}

fn key(i: u32) -> Vec<u8> {
    format!("key-{i:08}").into_bytes()
}

fn count<T: PartialEq>(answers: &[T], which: T) -> usize {
    answers.iter().filter(|&a| *a == which).count()
}

async fn connect(url: &str, namespace: &str) -> MySqlStore {
    MySqlStore::builder(namespace)
        .timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .expect("connect")
}

/// The shared server's URL, a store in a namespace of the test's own, and the namespace.
async fn shared(test: &str) -> Option<(String, MySqlStore, String)> {
    let url = mysql_server::url(test)?;
    let ns = namespace(test);
    let store = connect(&url, &ns).await;
    Some((url, store, ns))
}

/// The row of `key` in `namespace`: (token, done, seconds until it expires, by the server).
async fn row(
    conn: &mut MySqlConnection,
    namespace: &str,
    key: &[u8],
) -> Option<(Vec<u8>, bool, f64)> {
    let r = sqlx::query(
        "SELECT token, done, \
         TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at) / 1e6 AS left_s \
         FROM stream_dedup_keys WHERE namespace = ? AND k = ?",
    )
    .bind(namespace.as_bytes())
    .bind(key)
    .fetch_optional(conn)
    .await
    .unwrap()?;
    Some((r.get(0), r.get(1), r.get(2)))
}

/// Keys are rows `(namespace, k, token, done, expires_at)`, binary-safe, with the ttl on the
/// server's clock; a claim writes `done = 0` for the lease, its commit `done = 1` for the ttl.
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn row_layout() {
    let Some((url, store, ns)) = shared("row_layout").await else {
        return;
    };
    let mut conn = mysql_server::admin(&url).await;
    let token = Token::new();
    let k = b"k\xff\x00 ".to_vec();
    let batch = InsertBatch::new(vec![k.clone()], Duration::from_secs(60)).with_token(token);
    assert_eq!(store.insert(batch).await.unwrap(), [Inserted::New]);
    let (held, done, left) = row(&mut conn, &ns, &k).await.expect("a row");
    assert_eq!(held, token.to_bytes());
    assert!(done);
    assert!((55.0..=60.0).contains(&left), "{left}");

    let claim = ClaimBatch::new(vec![b"c".to_vec()], Duration::from_secs(30));
    let t = claim.token;
    assert_eq!(store.claim(claim).await.unwrap(), [Claimed::Mine]);
    let (held, done, left) = row(&mut conn, &ns, b"c").await.expect("a row");
    assert_eq!((held, done), (t.to_bytes().to_vec(), false));
    assert!((25.0..=30.0).contains(&left), "the lease: {left}");
    let ttl = Duration::from_secs(600);
    let answers = store.commit(vec![(b"c".to_vec(), t)], ttl).await.unwrap();
    assert_eq!(answers, [true]);
    let (_, done, left) = row(&mut conn, &ns, b"c").await.expect("a row");
    assert!(done);
    assert!((595.0..=600.0).contains(&left), "the ttl: {left}");
    mysql_server::delete_namespace(&url, TABLE, &ns).await;
}

/// 20,000 keys through one store, the store dropped, a new one connected: all present.
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn restart_forgets_nothing() {
    let Some((url, store, ns)) = shared("restart_forgets_nothing").await else {
        return;
    };
    let batches = || (0..20u32).map(|b| (b * 1_000..(b + 1) * 1_000).map(key).collect::<Vec<_>>());
    let mut new = 0;
    for keys in batches() {
        new += count(
            &store.insert(InsertBatch::new(keys, TTL)).await.unwrap(),
            Inserted::New,
        );
    }
    assert_eq!(new, 20_000);
    drop(store);
    let store = connect(&url, &ns).await;
    let mut present = 0;
    for keys in batches() {
        present += count(
            &store.insert(InsertBatch::new(keys, TTL)).await.unwrap(),
            Inserted::Present,
        );
    }
    assert_eq!(present, 20_000, "keys accepted twice across a restart");
    mysql_server::delete_namespace(&url, TABLE, &ns).await;
}

fn uuid_keys(n: usize, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| format!("{:032x}", rng.random::<u128>()))
        .collect()
}

/// One stream with redeliveries, split at random between two consumers with operators and
/// pools of their own: every key accepted exactly once overall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn two_consumers_through_the_operator_accept_each_key_once() {
    let Some(url) = mysql_server::url("two_consumers_through_the_operator_accept_each_key_once")
    else {
        return;
    };
    let ns = namespace("two");
    let keys = uuid_keys(20_000, 2);
    let mut rng = StdRng::seed_from_u64(3);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for k in &keys {
        for _ in 0..rng.random_range(1..=3) {
            if rng.random_bool(0.5) { &mut a } else { &mut b }.push(k.clone());
        }
    }
    let consume = |part: Vec<String>, store: MySqlStore| {
        tokio::spawn(async move {
            let window = Window::max_keys(1_000)
                .ttl(TTL)
                .store(store)
                .batch_size(200)
                .timeout(Duration::from_secs(10));
            stream::iter(part)
                .dedup_by_key(|k| k.clone(), window)
                .collect::<Vec<String>>()
                .await
        })
    };
    let ta = consume(a, connect(&url, &ns).await);
    let tb = consume(b, connect(&url, &ns).await);
    let (a, b) = (ta.await.unwrap(), tb.await.unwrap());
    let mut times: HashMap<String, u32> = HashMap::new();
    for k in a.into_iter().chain(b) {
        *times.entry(k).or_default() += 1;
    }
    assert_eq!(times.len(), keys.len(), "a key was lost");
    assert!(times.values().all(|&n| n == 1), "a key was accepted twice");
    mysql_server::delete_namespace(&url, TABLE, &ns).await;
}

/// Eight consumers ask for the same 500 keys at once, each in its own random order, round
/// after round (inserts and claims): no call fails (no deadlock reaches a caller), and each
/// key has exactly one winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn batches_in_other_orders_never_deadlock() {
    let Some((url, store, ns)) = shared("batches_in_other_orders_never_deadlock").await else {
        return;
    };
    for round in 0..6u32 {
        let keys: Vec<Vec<u8>> = (0..500).map(|i| key(round * 1_000 + i)).collect();
        let tasks: Vec<_> = (0..8u64)
            .map(|t| {
                let store = store.clone();
                let mut mine = keys.clone();
                mine.shuffle(&mut StdRng::seed_from_u64(u64::from(round) * 100 + t));
                tokio::spawn(async move {
                    let won: Vec<Vec<u8>> = if round % 2 == 0 {
                        let answers = store.insert(InsertBatch::new(mine.clone(), TTL)).await;
                        let answers = answers.expect("no deadlock reaches the caller");
                        mine.into_iter()
                            .zip(answers)
                            .filter(|(_, a)| *a == Inserted::New)
                            .map(|(k, _)| k)
                            .collect()
                    } else {
                        let batch = ClaimBatch::new(mine.clone(), TTL);
                        let answers = store.claim(batch).await;
                        let answers = answers.expect("no deadlock reaches the caller");
                        mine.into_iter()
                            .zip(answers)
                            .filter(|(_, a)| *a == Claimed::Mine)
                            .map(|(k, _)| k)
                            .collect()
                    };
                    won
                })
            })
            .collect();
        let mut winners: HashMap<Vec<u8>, u32> = HashMap::new();
        for t in tasks {
            for k in t.await.unwrap() {
                *winners.entry(k).or_default() += 1;
            }
        }
        assert_eq!(winners.len(), 500, "round {round}: a key had no winner");
        assert!(winners.values().all(|&n| n == 1), "round {round}");
    }
    mysql_server::delete_namespace(&url, TABLE, &ns).await;
}

/// The global count of deadlocks InnoDB detected.
async fn deadlocks(conn: &mut MySqlConnection) -> u64 {
    let r = sqlx::query("SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'")
        .fetch_one(conn)
        .await
        .unwrap();
    r.get::<String, _>(1).parse().unwrap()
}

/// A deadlock with an application's transaction (which locks the keys in the other order):
/// InnoDB rolls the store's lighter transaction back, the store runs it again, and the call
/// answers as if nothing had happened.
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn a_deadlock_is_retried() {
    let Some((url, store, ns)) = shared("a_deadlock_is_retried").await else {
        return;
    };
    let mut app = mysql_server::admin(&url).await;
    let before = deadlocks(&mut app).await;
    assert_eq!(
        store
            .insert(InsertBatch::new(vec![b"b".to_vec()], TTL))
            .await
            .unwrap(),
        [Inserted::New]
    );
    // The application: a heavy transaction (many rows written) that holds "b".
    app.execute("BEGIN").await.unwrap();
    let other = format!("{ns}-other");
    for i in 0..50u32 {
        sqlx::query(
            "INSERT INTO stream_dedup_keys VALUES (?, ?, REPEAT('x', 16), 1, UTC_TIMESTAMP(6))",
        )
        .bind(other.as_bytes())
        .bind(key(i))
        .execute(&mut app)
        .await
        .unwrap();
    }
    let lock = "SELECT k FROM stream_dedup_keys WHERE namespace = ? AND k = ? FOR UPDATE";
    sqlx::query(lock)
        .bind(ns.as_bytes())
        .bind(&b"b"[..])
        .fetch_all(&mut app)
        .await
        .unwrap();
    // The store locks "a", then waits for "b".
    let call = {
        let store = store.clone();
        tokio::spawn(async move {
            let keys = vec![b"a".to_vec(), b"b".to_vec()];
            store.insert(InsertBatch::new(keys, TTL)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The application now wants "a": a cycle. InnoDB rolls back the lighter transaction, the
    // store's; the application gets "a" (gone with that rollback) and commits.
    sqlx::query(lock)
        .bind(ns.as_bytes())
        .bind(&b"a"[..])
        .fetch_all(&mut app)
        .await
        .expect("the application's transaction is not the victim");
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.execute("COMMIT").await.unwrap();
    let answers = call.await.unwrap().expect("the deadlock was retried");
    assert_eq!(answers, [Inserted::New, Inserted::Present]);
    assert!(deadlocks(&mut app).await > before, "no deadlock happened");
    mysql_server::delete_namespace(&url, TABLE, &ns).await;
    mysql_server::delete_namespace(&url, TABLE, &other).await;
}

/// The connection of a store's call is killed (`KILL`) while the call waits for a lock: the
/// call fails with an error (no panic, no hang), nothing of it stays, and the next call works.
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn a_killed_connection_fails_the_call_and_the_next_works() {
    let Some(url) = mysql_server::url("a_killed_connection_fails_the_call_and_the_next_works")
    else {
        return;
    };
    // A table of its own: the store's statement is found by its table's name.
    let table = own_table(&url, "killed").await;
    let ns = namespace("killed");
    let store = MySqlStore::builder(&ns)
        .table(&table)
        .timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .unwrap();
    let mut app = mysql_server::admin(&url).await;
    store
        .insert(InsertBatch::new(vec![key(0)], TTL))
        .await
        .unwrap();
    app.execute("BEGIN").await.unwrap();
    sqlx::query(&format!(
        "SELECT k FROM {table} WHERE namespace = ? AND k = ? FOR UPDATE"
    ))
    .bind(ns.as_bytes())
    .bind(key(0))
    .fetch_all(&mut app)
    .await
    .unwrap();
    let keys: Vec<Vec<u8>> = (0..1_000).map(key).collect();
    let call = {
        let store = store.clone();
        let keys = keys.clone();
        tokio::spawn(async move { store.insert(InsertBatch::new(keys, TTL)).await })
    };
    let mut id = None;
    for _ in 0..100 {
        let found = sqlx::query(
            "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST \
             WHERE INFO LIKE CONCAT('INSERT INTO `', ?, '`%')",
        )
        .bind(&table)
        .fetch_optional(&mut app)
        .await
        .unwrap();
        if let Some(r) = found {
            id = Some(r.get::<i64, _>(0));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = id.expect("the store's statement waits for the lock");
    // Killed while it runs (not at once, which would read as a connection found broken).
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.execute(format!("KILL {id}").as_str()).await.unwrap();
    let error = call.await.unwrap().expect_err("its connection was killed");
    assert!(
        matches!(error, StoreError::Unavailable(_)),
        "a killed connection reads as unavailable: {error:?}"
    );
    app.execute("ROLLBACK").await.unwrap();
    // Nothing of the killed call stayed (its transaction was rolled back); the next call
    // gets a working connection.
    let answers = store
        .insert(InsertBatch::new(keys, TTL))
        .await
        .expect("the next call works");
    assert_eq!(answers[0], Inserted::Present);
    assert_eq!(count(&answers, Inserted::New), 999);
    app.execute(format!("DROP TABLE {table}").as_str())
        .await
        .unwrap();
}

/// Empty keys, binary keys, keys that differ only by trailing spaces or NULs, and keys too
/// long for the table: a batch of only long keys fails with `KeyTooLong` (nothing sent); in a
/// batch with other keys, a long key answers as unchecked (new, not recorded) and the others
/// as usual.
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn bad_keys() {
    let Some((url, store, ns)) = shared("bad_keys").await else {
        return;
    };
    let odd: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"a".to_vec(),
        b"a ".to_vec(),
        b"a\0".to_vec(),
        b"A".to_vec(),
        vec![0xff; 1024],
        b"\x00\x01'\\\"".to_vec(),
    ];
    let first = store
        .insert(InsertBatch::new(odd.clone(), TTL))
        .await
        .unwrap();
    assert_eq!(first, vec![Inserted::New; odd.len()], "all distinct");
    let again = store
        .insert(InsertBatch::new(odd.clone(), TTL))
        .await
        .unwrap();
    assert_eq!(again, vec![Inserted::Present; odd.len()]);

    let long = vec![b'x'; store.max_key_len() + 1];
    let error = store
        .insert(InsertBatch::new(vec![long.clone()], TTL))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::KeyTooLong {
                len: 1025,
                max: 1024
            }
        ),
        "{error:?}"
    );
    let mixed = vec![b"fresh".to_vec(), long.clone(), b"a".to_vec()];
    let answers = store.insert(InsertBatch::new(mixed, TTL)).await.unwrap();
    assert_eq!(answers, [Inserted::New, Inserted::New, Inserted::Present]);
    let claims = store
        .claim(ClaimBatch::new(vec![long.clone(), b"c".to_vec()], TTL))
        .await
        .unwrap();
    assert_eq!(claims, [Claimed::Mine, Claimed::Mine]);
    let error = store
        .claim(ClaimBatch::new(vec![long.clone()], TTL))
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::KeyTooLong { .. }), "{error:?}");
    store.remove(vec![long.clone()]).await.unwrap();
    store
        .release(vec![(long.clone(), Token::new())])
        .await
        .unwrap();
    // Not recorded: the table holds no row longer than its column.
    let mut conn = mysql_server::admin(&url).await;
    let rows: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM stream_dedup_keys WHERE namespace = ? AND LENGTH(k) > 1024",
    )
    .bind(ns.as_bytes())
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows, 0);
    let mut tx = conn.begin().await.unwrap();
    let error = store
        .commit_in(&mut tx, &long, Token::new(), TTL)
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::KeyTooLong { .. }), "{error:?}");
    tx.rollback().await.unwrap();
    mysql_server::delete_namespace(&url, TABLE, &ns).await;
}

/// A table of this test's own (the purge deletes expired rows of every namespace in its
/// table), dropped at the end.
async fn own_table(url: &str, test: &str) -> String {
    let table = format!("purge_{}_{}", test, std::process::id());
    let mut conn = mysql_server::admin(url).await;
    conn.execute(format!("DROP TABLE IF EXISTS {table}").as_str())
        .await
        .unwrap();
    table
}

async fn rows_in(url: &str, table: &str) -> i64 {
    let mut conn = mysql_server::admin(url).await;
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// Expired keys count as absent at once and are deleted by the background purge in bounded
/// batches; live keys stay. The purge ends with the store's last clone.
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn expired_keys_are_purged_in_the_background() {
    let Some(url) = mysql_server::url("expired_keys_are_purged_in_the_background") else {
        return;
    };
    let table = own_table(&url, "background").await;
    let store = MySqlStore::builder("purged")
        .table(&table)
        .timeout(Duration::from_secs(10))
        .purge_interval(Duration::from_millis(300))
        .purge_batch(400)
        .connect(&url)
        .await
        .unwrap();
    let short = Duration::from_millis(200);
    let keys: Vec<Vec<u8>> = (0..2_500).map(key).collect();
    store
        .insert(InsertBatch::new(keys.clone(), short))
        .await
        .unwrap();
    let live: Vec<Vec<u8>> = (10_000..10_010).map(key).collect();
    store
        .insert(InsertBatch::new(live.clone(), TTL))
        .await
        .unwrap();
    // (The purge may have begun: the first keys' ttl may be over on a busy machine.)
    assert!(rows_in(&url, &table).await <= 2_510);
    tokio::time::sleep(short).await;
    // Absent at once, whether or not the purge ran yet.
    let again = store
        .insert(InsertBatch::new(keys[..10].to_vec(), TTL))
        .await
        .unwrap();
    assert_eq!(again, [Inserted::New; 10]);
    let start = Instant::now();
    while rows_in(&url, &table).await > 20 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the purge did not run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows_in(&url, &table).await, 20, "live keys stay");

    // The last clone dropped, the purge stops: expired rows stay.
    let clone = store.clone();
    drop(store);
    clone
        .insert(InsertBatch::new((20_000..20_100).map(key).collect(), short))
        .await
        .unwrap();
    drop(clone);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(
        rows_in(&url, &table).await,
        120,
        "the purge outlived the store"
    );

    // `purge_expired` deletes them now, in batches.
    let store = MySqlStore::builder("purged")
        .table(&table)
        .purge_batch(30)
        .no_background_purge()
        .connect(&url)
        .await
        .unwrap();
    assert_eq!(store.purge_expired().await.unwrap(), 100);
    assert_eq!(rows_in(&url, &table).await, 20);
    let mut conn = mysql_server::admin(&url).await;
    conn.execute(format!("DROP TABLE {table}").as_str())
        .await
        .unwrap();
}

/// A call whose reply is lost (the server committed it; the client timed out): a retry with the
/// same token answers as the first attempt would have, never a false duplicate; anybody
/// else sees the keys taken. The same for claims and commits.
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn a_call_applied_after_its_timeout_is_recognised_by_its_token() {
    let Some(url) =
        mysql_server::url("a_call_applied_after_its_timeout_is_recognised_by_its_token")
    else {
        return;
    };
    let ns = namespace("lost-reply");
    let target: u16 = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(3306);
    let proxy = Proxy::start(target).await;
    let via_proxy = url.replacen(&format!(":{target}"), &format!(":{}", proxy.port()), 1);
    assert_ne!(via_proxy, url, "{url}");
    let timeout = Duration::from_millis(400);
    let store = MySqlStore::builder(&ns)
        .timeout(timeout)
        .connect(&via_proxy)
        .await
        .unwrap();
    let direct = connect(&url, &ns).await;

    let keys: Vec<Vec<u8>> = (0..300).map(key).collect();
    let token = Token::new();
    let batch = InsertBatch::new(keys.clone(), TTL).with_token(token);
    // A call of the same size first: its statement is prepared on the connection, so the
    // next call is one request (an insert commits by itself; a commit is `BEGIN` … `COMMIT`
    // in one request).
    let warm = (5_000..5_300).map(key).collect();
    store.insert(InsertBatch::new(warm, TTL)).await.unwrap();
    // sqlx pings a connection given back to the pool: let that finish first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The reply is lost: the server applied the call, the client never knows.
    proxy.hold_replies_from_next_request();
    let start = Instant::now();
    let error = store.insert(batch.clone()).await.unwrap_err();
    assert!(
        matches!(error, StoreError::Timeout(d) if d == timeout),
        "{error:?}"
    );
    assert!(start.elapsed() < timeout + Duration::from_millis(300));
    proxy.hold_replies(false);
    // It was applied: anybody else sees the keys; the retry sees them as its own.
    let others = direct
        .insert(InsertBatch::new(keys.clone(), TTL))
        .await
        .unwrap();
    assert_eq!(count(&others, Inserted::Present), 300);
    let retry = store.insert(batch).await.expect("the retry goes through");
    assert_eq!(count(&retry, Inserted::New), 300, "a false duplicate");

    // Claims and commits likewise.
    let ckeys: Vec<Vec<u8>> = (1_000..1_100).map(key).collect();
    let warm = (6_000..6_100).map(key).collect();
    store.claim(ClaimBatch::new(warm, TTL)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let claim = ClaimBatch::new(ckeys.clone(), TTL);
    let ctoken = claim.token;
    proxy.hold_replies_from_next_request();
    assert!(matches!(
        store.claim(claim.clone()).await,
        Err(StoreError::Timeout(_))
    ));
    proxy.hold_replies(false);
    let retry = store.claim(claim).await.unwrap();
    assert_eq!(count(&retry, Claimed::Mine), 100);
    let held: Vec<(Vec<u8>, Token)> = ckeys.iter().map(|k| (k.clone(), ctoken)).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.hold_replies_from_next_request();
    assert!(matches!(
        store.commit(held.clone(), TTL).await,
        Err(StoreError::Timeout(_))
    ));
    proxy.hold_replies(false);
    assert_eq!(store.commit(held, TTL).await.unwrap(), vec![true; 100]);
    let after = direct.claim(ClaimBatch::new(ckeys, TTL)).await.unwrap();
    assert_eq!(count(&after, Claimed::Done), 100);
    mysql_server::delete_namespace(&url, TABLE, &ns).await;
}

/// `commit_in` inside the application's transaction: rolled back, the key stays in flight
/// (and the effect is gone); committed, the key is done with the effect; a claim whose lease
/// ran out and was taken is refused and leaves the other claim's row alone; a key with no row
/// (a claim that failed open) is committed.
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn commit_in_follows_the_transaction() {
    let Some((url, store, ns)) = shared("commit_in_follows_the_transaction").await else {
        return;
    };
    let mut conn = mysql_server::admin(&url).await;
    let effects = format!("effects_{}", std::process::id());
    conn.execute(
        format!(
            "CREATE TABLE IF NOT EXISTS {effects} (k VARBINARY(64) NOT NULL, ns VARBINARY(255) \
             NOT NULL) ENGINE = InnoDB"
        )
        .as_str(),
    )
    .await
    .unwrap();
    let effect = format!("INSERT INTO {effects} (k, ns) VALUES (?, ?)");
    let effect_rows = format!("SELECT COUNT(*) FROM {effects} WHERE k = ? AND ns = ?");
    let batch = ClaimBatch::new(vec![b"k".to_vec()], TTL);
    let token = batch.token;
    assert_eq!(store.claim(batch).await.unwrap(), [Claimed::Mine]);

    // Rolled back: still in flight, with this claim's token; no effect.
    let mut tx = conn.begin().await.unwrap();
    sqlx::query(&effect)
        .bind(&b"k"[..])
        .bind(ns.as_bytes())
        .execute(&mut *tx)
        .await
        .unwrap();
    assert!(store.commit_in(&mut tx, b"k", token, TTL).await.unwrap());
    tx.rollback().await.unwrap();
    let (held, done, _) = row(&mut conn, &ns, b"k").await.unwrap();
    assert_eq!((held, done), (token.to_bytes().to_vec(), false));
    let other = store
        .claim(ClaimBatch::new(vec![b"k".to_vec()], TTL))
        .await
        .unwrap();
    assert_eq!(other, [Claimed::InFlight]);
    let n: i64 = sqlx::query_scalar(&effect_rows)
        .bind(&b"k"[..])
        .bind(ns.as_bytes())
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 0);

    // Committed: done, with the effect.
    let mut tx = conn.begin().await.unwrap();
    sqlx::query(&effect)
        .bind(&b"k"[..])
        .bind(ns.as_bytes())
        .execute(&mut *tx)
        .await
        .unwrap();
    assert!(store.commit_in(&mut tx, b"k", token, TTL).await.unwrap());
    tx.commit().await.unwrap();
    let (_, done, left) = row(&mut conn, &ns, b"k").await.unwrap();
    assert!(done);
    assert!(left > 100.0, "the ttl: {left}");
    let again = store
        .claim(ClaimBatch::new(vec![b"k".to_vec()], TTL))
        .await
        .unwrap();
    assert_eq!(again, [Claimed::Done]);
    let n: i64 = sqlx::query_scalar(&effect_rows)
        .bind(&b"k"[..])
        .bind(ns.as_bytes())
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1);

    // The lease ran out and another claim took the key: refused, their row untouched.
    let late = ClaimBatch::new(vec![b"l".to_vec()], Duration::from_millis(200));
    let late_token = late.token;
    assert_eq!(store.claim(late).await.unwrap(), [Claimed::Mine]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let theirs = ClaimBatch::new(vec![b"l".to_vec()], TTL);
    let their_token = theirs.token;
    assert_eq!(store.claim(theirs).await.unwrap(), [Claimed::Mine]);
    let before = row(&mut conn, &ns, b"l").await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    assert!(
        !store
            .commit_in(&mut tx, b"l", late_token, TTL)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    let after = row(&mut conn, &ns, b"l").await.unwrap();
    assert_eq!((&after.0, after.1), (&before.0, before.1));
    assert_eq!(after.0, their_token.to_bytes());
    assert_eq!(
        store
            .commit(vec![(b"l".to_vec(), their_token)], TTL)
            .await
            .unwrap(),
        [true]
    );

    // No row at all (the claim failed open): committed.
    let mut tx = conn.begin().await.unwrap();
    assert!(
        store
            .commit_in(&mut tx, b"free", Token::new(), TTL)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    assert!(row(&mut conn, &ns, b"free").await.unwrap().1);

    conn.execute(format!("DROP TABLE {effects}").as_str())
        .await
        .unwrap();
    mysql_server::delete_namespace(&url, TABLE, &ns).await;
}

/// `commit_all_in` answers for the keys of several claims: `true` only when every key is
/// still its token's (in flight, done by it, or free), and then every one is done; a key of
/// another claim is refused and its row left alone; so is one key under two tokens.
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn commit_all_in_marks_every_key_or_refuses() {
    let Some((url, store, ns)) = shared("commit_all_in_marks_every_key_or_refuses").await else {
        return;
    };
    let mut conn = mysql_server::admin(&url).await;
    let first = ClaimBatch::new(vec![b"a".to_vec(), b"b".to_vec()], TTL);
    let first_token = first.token;
    assert_eq!(store.claim(first).await.unwrap(), [Claimed::Mine; 2]);
    let second = ClaimBatch::new(vec![b"c".to_vec()], TTL);
    let second_token = second.token;
    assert_eq!(store.claim(second).await.unwrap(), [Claimed::Mine]);
    let free = Token::new(); // "d" has no row: a claim that failed open

    let mut tx = conn.begin().await.unwrap();
    assert!(store.commit_all_in(&mut tx, &[], TTL).await.unwrap());
    let mine = [
        (b"d".to_vec(), free),
        (b"b".to_vec(), first_token),
        (b"c".to_vec(), second_token),
        (b"b".to_vec(), first_token), // twice: one key
    ];
    assert!(store.commit_all_in(&mut tx, &mine, TTL).await.unwrap());
    tx.commit().await.unwrap();
    for key in [&b"b"[..], b"c", b"d"] {
        assert!(row(&mut conn, &ns, key).await.unwrap().1, "{key:?} is done");
    }

    // "a" is still the first claim's: refused under another token, its row untouched.
    let before = row(&mut conn, &ns, b"a").await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let refused = [(b"e".to_vec(), free), (b"a".to_vec(), free)];
    assert!(!store.commit_all_in(&mut tx, &refused, TTL).await.unwrap());
    tx.rollback().await.unwrap();
    let after = row(&mut conn, &ns, b"a").await.unwrap();
    assert_eq!((&after.0, after.1), (&before.0, before.1));
    assert!(row(&mut conn, &ns, b"e").await.is_none(), "rolled back");
    let mut tx = conn.begin().await.unwrap();
    let twice = [(b"a".to_vec(), first_token), (b"a".to_vec(), free)];
    assert!(!store.commit_all_in(&mut tx, &twice, TTL).await.unwrap());
    tx.rollback().await.unwrap();

    // A key too long: refused before anything is sent.
    let mut tx = conn.begin().await.unwrap();
    let long = [(vec![7; store.max_key_len() + 1], free)];
    let error = store.commit_all_in(&mut tx, &long, TTL).await.unwrap_err();
    assert!(matches!(error, StoreError::KeyTooLong { .. }), "{error:?}");
    tx.rollback().await.unwrap();
    mysql_server::delete_namespace(&url, TABLE, &ns).await;
}

/// Several consumers start at once on a table that does not exist: each creates it if
/// missing, none fails; a table of that name with other columns is refused as corrupt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn concurrent_starts_create_the_table_once() {
    let Some(url) = mysql_server::url("concurrent_starts_create_the_table_once") else {
        return;
    };
    let table = own_table(&url, "create").await;
    let starts: Vec<_> = (0..8)
        .map(|i| {
            let (url, table) = (url.clone(), table.clone());
            tokio::spawn(async move {
                MySqlStore::builder(&format!("c{i}"))
                    .table(&table)
                    .timeout(Duration::from_secs(10))
                    .connect(&url)
                    .await
            })
        })
        .collect();
    for s in starts {
        let store = s.await.unwrap().expect("connect and create");
        let answers = store
            .insert(InsertBatch::new(vec![b"x".to_vec()], TTL))
            .await
            .unwrap();
        assert_eq!(answers, [Inserted::New]);
    }
    let mut conn = mysql_server::admin(&url).await;
    conn.execute(format!("DROP TABLE {table}").as_str())
        .await
        .unwrap();

    // A foreign table of the same name.
    conn.execute(format!("CREATE TABLE {table} (id INT PRIMARY KEY)").as_str())
        .await
        .unwrap();
    let error = MySqlStore::builder("x")
        .table(&table)
        .connect(&url)
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Corrupt(_)), "{error:?}");
    // On the application's pool, the first call finds out.
    let pool = sqlx::MySqlPool::connect(&url).await.unwrap();
    let store = MySqlStore::builder("x").table(&table).pool(pool);
    let error = store
        .insert(InsertBatch::new(vec![b"x".to_vec()], TTL))
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Corrupt(_)), "{error:?}");
    conn.execute(format!("DROP TABLE {table}").as_str())
        .await
        .unwrap();
}

/// A store on the application's own pool creates the table with its first call, and works
/// like any other.
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn a_store_on_the_applications_pool() {
    let Some(url) = mysql_server::url("a_store_on_the_applications_pool") else {
        return;
    };
    let table = own_table(&url, "pool").await;
    let pool = MySqlPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let store = MySqlStore::builder("app").table(&table).pool(pool.clone());
    let answers = store
        .insert(InsertBatch::new(vec![b"k".to_vec(), b"l".to_vec()], TTL))
        .await
        .unwrap();
    assert_eq!(answers, [Inserted::New; 2]);
    assert_eq!(rows_in(&url, &table).await, 2);
    // Many calls on a pool of two: none leaves a connection in a transaction.
    let calls: Vec<_> = (0..20u32)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let batch = InsertBatch::new((i * 10..i * 10 + 10).map(key).collect(), TTL);
                store.insert(batch).await
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let mut conn = pool.acquire().await.unwrap();
    let open: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.innodb_trx \
         WHERE trx_mysql_thread_id = CONNECTION_ID()",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(open, 0, "a connection was given back inside a transaction");
    drop(conn);
    let mut admin = mysql_server::admin(&url).await;
    admin
        .execute(format!("DROP TABLE {table}").as_str())
        .await
        .unwrap();
}

/// What a key costs in the table and its index: 100,000 36-byte keys, then
/// `data_length + index_length` after `ANALYZE TABLE` (printed; the docs quote it).
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn what_a_key_costs() {
    let Some(url) = mysql_server::url("what_a_key_costs") else {
        return;
    };
    let table = own_table(&url, "cost").await;
    let store = MySqlStore::builder("payments-2026-12-eu")
        .table(&table)
        .timeout(Duration::from_secs(30))
        .connect(&url)
        .await
        .unwrap();
    let keys = uuid_keys(100_000, 9);
    for chunk in keys.chunks(1_000) {
        let batch = InsertBatch::new(
            chunk
                .iter()
                .map(|k| {
                    format!(
                        "{}-{}-{}-{}-{}",
                        &k[..8],
                        &k[8..12],
                        &k[12..16],
                        &k[16..20],
                        &k[20..]
                    )
                    .into_bytes()
                })
                .collect(),
            TTL,
        );
        store.insert(batch).await.unwrap();
    }
    let mut conn = mysql_server::admin(&url).await;
    conn.execute(format!("ANALYZE TABLE {table}").as_str())
        .await
        .unwrap();
    let r = sqlx::query(
        "SELECT CAST(data_length AS SIGNED), CAST(index_length AS SIGNED) \
         FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?",
    )
    .bind(&table)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let (data, index): (i64, i64) = (r.get(0), r.get(1));
    let per_key = (data + index) as f64 / 100_000.0;
    eprintln!(
        "100,000 keys: data {data} B, index {index} B, {per_key:.0} B per key (namespace of 19 \
         bytes, keys of 36)"
    );
    assert!(per_key > 50.0 && per_key < 400.0, "{per_key}");
    conn.execute(format!("DROP TABLE {table}").as_str())
        .await
        .unwrap();
}

/// A server of the test's own is killed and restarted on the same port: calls fail with a
/// clear error within the timeout (`Unavailable`, the source naming the refused connection),
/// no panic; once it is back the first call works, and the keys written before are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_mysql_bin), ignore = "set STREAM_DEDUP_MYSQL_SERVER")]
async fn a_stopped_server_fails_calls_then_recovers() {
    let Some(bin) = mysql_server::server_binary("a_stopped_server_fails_calls_then_recovers")
    else {
        return;
    };
    let mut server = MySqlServer::start(&bin).await;
    let timeout = Duration::from_millis(800);
    let store = MySqlStore::builder("stopped")
        .timeout(timeout)
        .connect(&server.url())
        .await
        .unwrap();
    let batch = |range: std::ops::Range<u32>| InsertBatch::new(range.map(key).collect(), TTL);
    assert_eq!(
        count(&store.insert(batch(0..100)).await.unwrap(), Inserted::New),
        100
    );

    server.kill();
    for attempt in 0..4 {
        let start = Instant::now();
        let error = store
            .insert(batch(100..200))
            .await
            .expect_err("the server is down");
        let took = start.elapsed();
        assert!(
            took < timeout + Duration::from_millis(300),
            "attempt {attempt}: {took:?}"
        );
        let cause = std::error::Error::source(&error).map(ToString::to_string);
        eprintln!("down, attempt {attempt}: {error} ({took:?}): {cause:?}");
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
        assert!(error.is_transient());
        if attempt > 0 {
            let cause = cause.unwrap_or_default();
            assert!(cause.to_lowercase().contains("refused"), "{cause}");
        }
    }
    let claims = store.claim(ClaimBatch::new(vec![key(7)], TTL)).await;
    assert!(
        matches!(claims, Err(StoreError::Unavailable(_))),
        "{claims:?}"
    );

    server.restart().await;
    let answers = store
        .insert(batch(0..150))
        .await
        .expect("the first call after the server is back works");
    assert_eq!(
        count(&answers, Inserted::Present),
        100,
        "kept across the crash"
    );
    assert_eq!(count(&answers, Inserted::New), 50);
}

/// Nothing listening: `connect` fails with `Unavailable`, quickly, the source naming it.
#[tokio::test]
async fn refused_connection_is_unavailable() {
    let port = support::redis_server::free_port();
    let start = Instant::now();
    let error = MySqlStore::connect(&format!("mysql://root@127.0.0.1:{port}/test"), "x")
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    let cause = std::error::Error::source(&error).unwrap().to_string();
    assert!(cause.to_lowercase().contains("refused"), "{cause}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

/// A URL that is not one is a clear error, not a panic.
#[tokio::test]
async fn bad_url_is_an_error() {
    let error = MySqlStore::connect("not a url", "x").await.unwrap_err();
    assert!(matches!(error, StoreError::Backend { .. }), "{error:?}");
}

#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn debug_shows_no_credentials() {
    let Some(url) = mysql_server::url("debug_shows_no_credentials") else {
        return;
    };
    let store = connect(&url, "dbg").await;
    let shown = format!("{store:?}");
    assert!(
        shown.contains("\"dbg\"") && shown.contains(TABLE),
        "{shown}"
    );
    assert!(
        !shown.contains("mysql://") && !shown.contains("127.0.0.1"),
        "{shown}"
    );
    assert_eq!((store.namespace(), store.table()), ("dbg", TABLE));
    let builder = format!("{:?}", MySqlStore::builder("dbg"));
    assert!(!builder.contains("mysql://"), "{builder}");
}

/// A handle: shared across tasks and threads, cloned cheaply.
#[test]
fn auto_traits() {
    fn handle<T: Send + Sync + Unpin + Clone + std::fmt::Debug + 'static>() {}
    handle::<MySqlStore>();
    handle::<stream_dedup::store::MySqlStoreBuilder>();
}

/// `commit_in`'s future is `Send` (a consumer awaits it on a multi-threaded runtime).
#[allow(dead_code)]
fn commit_in_is_send(store: &MySqlStore, conn: &mut MySqlConnection) {
    fn send<T: Send>(_: T) {}
    send(store.commit_in(conn, b"k", Token::new(), TTL));
}

/// The store's own limits are checked where they are given.
#[test]
#[should_panic(expected = "a table name is")]
fn a_bad_table_name_panics() {
    let _ = MySqlStore::builder("x").table("t; DROP TABLE users");
}

#[test]
#[should_panic(expected = "at most 255 bytes")]
fn a_long_namespace_panics() {
    let _ = MySqlStore::builder(&"n".repeat(256));
}

#[test]
#[should_panic(expected = "timeout must not be zero")]
fn zero_timeout_panics() {
    let _ = MySqlStore::builder("x").timeout(Duration::ZERO);
}
