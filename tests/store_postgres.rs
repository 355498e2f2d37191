//! [`PostgresStore`] against real servers.
//!
//! - `STREAM_DEDUP_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`): the store
//!   and claim suites, restarts, consumers that share the table, killed connections, bad keys,
//!   expiry and the purge, each test in namespaces (or tables) of its own that it deletes at
//!   the end.
//! - `pg_config` on `PATH`: the test that stops a server starts its own (`initdb` + `pg_ctl`
//!   in a temporary directory, on a free loopback port) and stops only that one.
//!
//! Unset, the tests say they skipped and pass.
#![cfg(feature = "postgres")]

mod support;

use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use stream_dedup::sqlx::{self, Connection};
use stream_dedup::store::{
    ClaimBatch, ClaimStore, Claimed, InsertBatch, Inserted, PostgresStore, Store, StoreError, Token,
};
use stream_dedup::{FailurePolicy, TryDedupStreamExt, Window};
use support::postgres::{self as pg, PgServer, TestStore};

/// The store for the suites (its namespace deleted with its last clone), or `None` without a
/// server.
async fn make(namespace: String) -> Option<TestStore> {
    let url = std::env::var("STREAM_DEDUP_POSTGRES_URL").ok()?;
    // Generous: the suite runs in parallel with the other tests on a small machine. Few
    // connections: the shared server's are counted.
    let store = PostgresStore::builder(&namespace)
        .statement_timeout(Duration::from_secs(5))
        .max_connections(4)
        .connect(&url)
        .await
        .expect("connect to STREAM_DEDUP_POSTGRES_URL");
    Some(TestStore::new(store, &url))
}

stream_dedup::store_suite!(
    #[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
    make,
    expiry = Duration::from_millis(50)
);
stream_dedup::claim_suite!(
    #[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
    make,
    expiry = Duration::from_millis(50)
);

const TTL: Duration = Duration::from_secs(120);

async fn connect(url: &str, namespace: &str) -> PostgresStore {
    PostgresStore::builder(namespace)
        .statement_timeout(Duration::from_secs(5))
        .max_connections(4)
        .connect(url)
        .await
        .expect("connect")
}

fn key(i: u32) -> Vec<u8> {
    format!("key-{i:08}").into_bytes()
}

fn count<T: PartialEq>(answers: &[T], which: T) -> usize {
    answers.iter().filter(|&a| *a == which).count()
}

/// Keys, tokens, claims in flight and done keys are in the table: a store connected again
/// (a new process) sees them all.
#[tokio::test]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn a_restart_remembers_keys_and_claims() {
    let Some(url) = pg::url("a_restart_remembers_keys_and_claims") else {
        return;
    };
    let ns = pg::namespace("restart");
    let keys: Vec<Vec<u8>> = (0..2_000).map(key).collect();
    let token = Token::new();
    let claimed = Token::new();
    {
        let store = connect(&url, &ns).await;
        let batch = InsertBatch::new(keys.clone(), TTL).with_token(token);
        assert_eq!(
            count(&store.insert(batch).await.unwrap(), Inserted::New),
            2_000
        );
        let claim = ClaimBatch::new(vec![b"open".to_vec()], TTL).with_token(claimed);
        assert_eq!(store.claim(claim).await.unwrap(), [Claimed::Mine]);
    }
    let store = connect(&url, &ns).await;
    let again = store
        .insert(InsertBatch::new(keys.clone(), TTL))
        .await
        .unwrap();
    assert_eq!(count(&again, Inserted::Present), 2_000);
    // The first process's retry is still recognised, and its claim is still in flight.
    let retry = InsertBatch::new(keys, TTL).with_token(token);
    assert_eq!(
        count(&store.insert(retry).await.unwrap(), Inserted::New),
        2_000
    );
    let other = ClaimBatch::new(vec![b"open".to_vec()], TTL);
    assert_eq!(store.claim(other).await.unwrap(), [Claimed::InFlight]);
    let held = vec![(b"open".to_vec(), claimed)];
    assert_eq!(store.commit(held, TTL).await.unwrap(), [true]);
    pg::delete_namespace(&url, pg::TABLE, &ns).await;
}

/// Eight consumers claim (and insert) the same 500 keys at once, each in its own order: no
/// deadlock (every call succeeds), and exactly one owner per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn batches_with_the_same_keys_in_other_orders_never_deadlock() {
    let Some(url) = pg::url("batches_with_the_same_keys_in_other_orders_never_deadlock") else {
        return;
    };
    let ns = pg::namespace("orders");
    for round in 0..5u64 {
        let keys: Vec<Vec<u8>> = (0..500).map(|i| key(i + round as u32 * 1_000)).collect();
        let tasks: Vec<_> = (0..8u64)
            .map(|consumer| {
                let mut mine = keys.clone();
                mine.shuffle(&mut StdRng::seed_from_u64(round * 100 + consumer));
                let (url, ns) = (url.clone(), ns.clone());
                tokio::spawn(async move {
                    let store = connect(&url, &ns).await;
                    let answers = if consumer % 2 == 0 {
                        let got = store.claim(ClaimBatch::new(mine.clone(), TTL)).await;
                        got.expect("claim")
                            .into_iter()
                            .map(|c| c == Claimed::Mine)
                            .collect()
                    } else {
                        let got = store.insert(InsertBatch::new(mine.clone(), TTL)).await;
                        got.expect("insert")
                            .into_iter()
                            .map(|i| i == Inserted::New)
                            .collect::<Vec<_>>()
                    };
                    mine.into_iter()
                        .zip(answers)
                        .filter(|(_, won)| *won)
                        .map(|(k, _)| k)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            winners.extend(t.await.unwrap());
        }
        winners.sort();
        let n = winners.len();
        winners.dedup();
        assert_eq!(n, winners.len(), "a key had two owners");
        assert_eq!(n, keys.len(), "a key had no owner");
    }
    pg::delete_namespace(&url, pg::TABLE, &ns).await;
}

/// The store's connection is killed (`pg_terminate_backend`) while its statement waits for a
/// row another transaction holds: the call fails with `Unavailable` after its attempts (each
/// killed too), with no panic; nothing of the killed statements was applied, and the next call
/// works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn a_connection_killed_mid_batch_fails_the_call_and_the_next_one_works() {
    let Some(url) = pg::url("a_connection_killed_mid_batch_fails_the_call_and_the_next_one_works")
    else {
        return;
    };
    let ns = pg::namespace("killed");
    let app = format!("sd-killed-{}", Token::new());
    let sep = if url.contains('?') { '&' } else { '?' };
    let store = connect(&format!("{url}{sep}application_name={app}"), &ns).await;
    // A row that another transaction locks: the batch waits for it.
    let blocker = b"blocker".to_vec();
    store
        .insert(InsertBatch::new(vec![blocker.clone()], TTL))
        .await
        .unwrap();
    let mut locker = pg::connection(&url).await;
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM stream_dedup_keys WHERE namespace = $1 AND key = $2 FOR UPDATE")
        .bind(&ns)
        .bind(&blocker)
        .execute(&mut *tx)
        .await
        .unwrap();

    let mut keys: Vec<Vec<u8>> = (0..1_000).map(key).collect();
    keys.push(blocker.clone());
    let batch = ClaimBatch::new(keys.clone(), TTL);
    let call = tokio::spawn({
        let store = store.clone();
        let batch = batch.clone();
        async move { store.claim(batch).await }
    });
    // Kill every statement of the store that waits for the lock, until the call gives up.
    let mut killer = pg::connection(&url).await;
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !call.is_finished() {
        assert!(Instant::now() < deadline, "the call never ended");
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind(&app)
        .fetch_all(&mut killer)
        .await
        .unwrap();
        kills += killed.len();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match call.await.unwrap() {
        Err(StoreError::Unavailable(source)) => {
            let why = source.to_string();
            assert!(why.contains("terminating connection"), "{why}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(kills, 3, "one kill per attempt");
    tx.rollback().await.unwrap();

    // Nothing was applied, and the store works: the same request now claims every key.
    assert_eq!(pg::rows(&url, pg::TABLE, &ns).await, 1);
    let answers = store.claim(batch).await.unwrap();
    assert_eq!(count(&answers, Claimed::Mine), 1_000);
    assert_eq!(answers[1_000], Claimed::Done);
    pg::delete_namespace(&url, pg::TABLE, &ns).await;
}

/// A server of the test's own is stopped: calls fail with `Unavailable`, naming the cause,
/// within the acquire timeout and no panic; once it is started again the store works, and the
/// keys written before are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_unavailable_then_back() {
    let Some(bin) = pg::bindir("a_stopped_server_is_unavailable_then_back") else {
        return;
    };
    let server = PgServer::start(bin);
    let store = PostgresStore::builder("stopped")
        .statement_timeout(Duration::from_secs(2))
        .acquire_timeout(Duration::from_millis(300))
        .connect(&server.url())
        .await
        .expect("connect to the test's server");
    let keys: Vec<Vec<u8>> = (0..100).map(key).collect();
    let first = store
        .insert(InsertBatch::new(keys.clone(), TTL))
        .await
        .unwrap();
    assert_eq!(count(&first, Inserted::New), 100);

    let pid = server.pid().expect("the server's pid");
    server.stop();
    assert!(server.pid().is_none(), "the server {pid} is still running");
    for _ in 0..3 {
        let started = Instant::now();
        match store
            .insert(InsertBatch::new(vec![b"new".to_vec()], TTL))
            .await
        {
            Err(StoreError::Unavailable(source)) => {
                let why = format!("{source}");
                assert!(
                    why.contains("refused") || why.contains("terminating connection"),
                    "{why}"
                );
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    // Claims and the rest fail the same way.
    let claims = &store;
    assert!(matches!(
        claims
            .claim(ClaimBatch::new(vec![b"c".to_vec()], TTL))
            .await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.purge_expired().await,
        Err(StoreError::Unavailable(_))
    ));

    server.start_again();
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        match store.insert(InsertBatch::new(keys.clone(), TTL)).await {
            Ok(answers) => break answers,
            Err(e) => assert!(Instant::now() < deadline, "the store never came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(count(&again, Inserted::Present), 100);
}

/// Empty and binary keys are keys; the longest key the store announces is taken, one byte
/// more fails that call with `KeyTooLong` before anything is sent; through the operator with
/// that limit, a long key fails alone and the rest of its batch is decided by the store.
#[tokio::test]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn bad_keys() {
    let Some(url) = pg::url("bad_keys") else {
        return;
    };
    let ns = pg::namespace("bad-keys");
    let store = connect(&url, &ns).await;
    let max = store.max_key_len();
    // The index row's limit (2,704 bytes with 8 KiB pages) less its header, the namespace and
    // the key's length word.
    assert_eq!(
        max,
        2_704 - ((8 + 1 + ns.len()).next_multiple_of(4) + 4),
        "{ns:?}"
    );
    let odd = vec![
        Vec::new(),
        vec![0, 0xff, 0x80, b'\\', b'\''],
        vec![0xab; max],
    ];
    let first = store
        .insert(InsertBatch::new(odd.clone(), TTL))
        .await
        .unwrap();
    assert_eq!(first, [Inserted::New; 3]);
    let again = store.insert(InsertBatch::new(odd, TTL)).await.unwrap();
    assert_eq!(again, [Inserted::Present; 3]);

    let mut with_long = vec![b"fine".to_vec(), vec![0xcd; max + 1]];
    match store.insert(InsertBatch::new(with_long.clone(), TTL)).await {
        Err(StoreError::KeyTooLong { len, max: m }) => assert_eq!((len, m), (max + 1, max)),
        other => panic!("expected KeyTooLong, got {other:?}"),
    }
    let claims = &store;
    assert!(matches!(
        claims.claim(ClaimBatch::new(with_long.clone(), TTL)).await,
        Err(StoreError::KeyTooLong { .. })
    ));
    // Nothing of the failed calls was written.
    with_long.truncate(1);
    assert_eq!(
        store
            .insert(InsertBatch::new(with_long, TTL))
            .await
            .unwrap(),
        [Inserted::New]
    );

    // The operator, told the store's limit: the long key's item gets the failure policy
    // alone.
    let window = Window::max_keys(10)
        .ttl(TTL)
        .store(store.clone())
        .max_key_len(max)
        .on_failure(FailurePolicy::fail_closed());
    let items = vec![
        b"fine".to_vec(),
        vec![0xef; max + 1],
        b"other".to_vec(),
        b"other".to_vec(),
    ];
    let out: Vec<Result<Vec<u8>, StoreError>> = stream::iter(items)
        .map(Ok)
        .try_dedup_by_key(|k: &Vec<u8>| k.clone(), window)
        .collect()
        .await;
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(
        matches!(out[0], Err(StoreError::KeyTooLong { .. })),
        "{out:?}"
    );
    assert_eq!(out[1].as_ref().unwrap(), b"other");
    pg::delete_namespace(&url, pg::TABLE, &ns).await;
}

/// A call that timed out on the client (the server had no statement timeout, and the batch
/// waited for a locked row) was applied once the lock went: its retry with the same token is
/// answered `New` for its keys, and anybody else's `Present`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn a_call_applied_after_it_timed_out_is_recognised_by_its_token() {
    let Some(url) = pg::url("a_call_applied_after_it_timed_out_is_recognised_by_its_token") else {
        return;
    };
    let ns = pg::namespace("timed-out");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let store = PostgresStore::builder(&ns)
        .statement_timeout(Duration::from_millis(200))
        .pool(pool)
        .await
        .unwrap();
    let blocker = b"blocker".to_vec();
    store
        .insert(InsertBatch::new(vec![blocker.clone()], TTL))
        .await
        .unwrap();
    let mut locker = pg::connection(&url).await;
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM stream_dedup_keys WHERE namespace = $1 AND key = $2 FOR UPDATE")
        .bind(&ns)
        .bind(&blocker)
        .execute(&mut *tx)
        .await
        .unwrap();

    let mut keys: Vec<Vec<u8>> = (0..200).map(key).collect();
    keys.insert(100, blocker);
    let batch = InsertBatch::new(keys, TTL);
    match store.insert(batch.clone()).await {
        Err(StoreError::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    tx.rollback().await.unwrap();
    // The server goes on with the statement once the lock is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg::rows(&url, pg::TABLE, &ns).await < 201 {
        assert!(Instant::now() < deadline, "the statement was never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let retry = store.insert(batch.clone()).await.unwrap();
    assert_eq!(count(&retry, Inserted::New), 200);
    assert_eq!(retry[100], Inserted::Present);
    let other = store
        .insert(InsertBatch::new(batch.keys, TTL))
        .await
        .unwrap();
    assert_eq!(count(&other, Inserted::Present), 201);
    pg::delete_namespace(&url, pg::TABLE, &ns).await;
}

/// The store's rows, as other tools see them: the namespace, the key's bytes, the token as a
/// uuid, done or in flight, an expiry by the server's clock.
#[tokio::test]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn row_layout() {
    let Some(url) = pg::url("row_layout") else {
        return;
    };
    let ns = pg::namespace("layout");
    let store = connect(&url, &ns).await;
    let token = Token::new();
    let batch =
        InsertBatch::new(vec![b"k\xff\x00".to_vec()], Duration::from_secs(60)).with_token(token);
    assert_eq!(store.insert(batch).await.unwrap(), [Inserted::New]);
    let mut conn = pg::connection(&url).await;
    let (key, held, done, left): (Vec<u8>, String, bool, f64) = sqlx::query_as(
        "SELECT key, token::text, done, extract(epoch FROM expires_at - clock_timestamp())::float8 \
         FROM stream_dedup_keys WHERE namespace = $1",
    )
    .bind(&ns)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(key, b"k\xff\x00");
    assert_eq!(held.replace('-', ""), token.to_string());
    assert!(done);
    assert!((55.0..=60.0).contains(&left), "{left}");
    pg::delete_namespace(&url, pg::TABLE, &ns).await;
}

#[tokio::test]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn debug_shows_no_credentials() {
    let Some(url) = pg::url("debug_shows_no_credentials") else {
        return;
    };
    // Trust authentication ignores the password; the store must not show it.
    let with_password = url.replacen("postgres://postgres@", "postgres://postgres:s3cret@", 1);
    let store = PostgresStore::builder("dbg")
        .max_connections(1)
        .no_purge()
        .connect(&with_password)
        .await
        .unwrap();
    let shown = format!("{store:?}");
    assert!(
        shown.contains("\"dbg\"") && shown.contains("stream_dedup_keys"),
        "{shown}"
    );
    assert!(
        !shown.contains("s3cret") && !shown.contains("127.0.0.1"),
        "{shown}"
    );
    assert_eq!(
        (store.namespace(), store.table()),
        ("dbg", "stream_dedup_keys")
    );
}

/// Six consumers start at once on a table that does not exist yet: each creates it or finds
/// it, none fails. A table of that name without the store's columns is refused as corrupt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn consumers_starting_at_once_create_the_table_once() {
    let Some(url) = pg::url("consumers_starting_at_once_create_the_table_once") else {
        return;
    };
    let table = format!("sd_create_{}", std::process::id());
    let starts: Vec<_> = (0..6)
        .map(|i| {
            let (url, table) = (url.clone(), table.clone());
            tokio::spawn(async move {
                PostgresStore::builder(&format!("ns{i}"))
                    .table(&table)
                    .max_connections(1)
                    .no_purge()
                    .connect(&url)
                    .await
            })
        })
        .collect();
    for start in starts {
        let store = start.await.unwrap().expect("a consumer failed to start");
        let answers = store
            .insert(InsertBatch::new(vec![b"k".to_vec()], TTL))
            .await
            .unwrap();
        assert_eq!(answers, [Inserted::New]);
    }
    let mut conn = pg::connection(&url).await;
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await
        .unwrap();

    // Not the store's table; and a missing table the store may not create.
    sqlx::query(&format!("CREATE TABLE {table} (namespace text, key bytea)"))
        .execute(&mut conn)
        .await
        .unwrap();
    let store = PostgresStore::builder("x")
        .table(&table)
        .no_purge()
        .connect(&url)
        .await;
    assert!(matches!(store, Err(StoreError::Corrupt(_))), "{store:?}");
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let store = PostgresStore::builder("x")
        .table(&table)
        .create_table(false)
        .no_purge()
        .connect(&url)
        .await;
    assert!(
        matches!(store, Err(StoreError::Backend { .. })),
        "{store:?}"
    );
}

/// Expired rows count as absent at once and are deleted by the background purge in bounded
/// batches; the purge stops with the store's last clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn expiry_and_the_purge() {
    let Some(url) = pg::url("expiry_and_the_purge") else {
        return;
    };
    // A table of its own: the purge deletes the expired rows of every namespace.
    let table = format!("sd_purge_{}", std::process::id());
    let ns = "purge";
    let rows = || pg::rows(&url, &table, ns);
    let store = PostgresStore::builder(ns)
        .table(&table)
        .max_connections(2)
        .purge_interval(Duration::from_millis(200))
        .purge_batch(10)
        .connect(&url)
        .await
        .unwrap();
    let short = Duration::from_millis(100);
    let keys: Vec<Vec<u8>> = (0..35).map(key).collect();
    assert_eq!(
        count(
            &store
                .insert(InsertBatch::new(keys.clone(), short))
                .await
                .unwrap(),
            Inserted::New
        ),
        35
    );
    let long = vec![b"long".to_vec()];
    store
        .insert(InsertBatch::new(long.clone(), TTL))
        .await
        .unwrap();
    tokio::time::sleep(short).await;
    // Absent at once, purged or not: a new request takes the keys (and rewrites the rows).
    let again = store
        .insert(InsertBatch::new(keys[..5].to_vec(), short))
        .await
        .unwrap();
    assert_eq!(again, [Inserted::New; 5]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows().await > 1 {
        assert!(Instant::now() < deadline, "the purge never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        store.insert(InsertBatch::new(long, TTL)).await.unwrap(),
        [Inserted::Present]
    );

    // By hand: one bounded batch per call.
    let manual = PostgresStore::builder(ns)
        .table(&table)
        .max_connections(1)
        .purge_batch(10)
        .no_purge()
        .connect(&url)
        .await
        .unwrap();
    drop(store);
    manual
        .insert(InsertBatch::new(keys[..25].to_vec(), Duration::ZERO))
        .await
        .unwrap();
    // The background purge ended with its store: nothing else deletes them.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rows().await, 26);
    let mut purged = Vec::new();
    for _ in 0..4 {
        purged.push(manual.purge_expired().await.unwrap());
    }
    assert_eq!(purged, [10, 10, 5, 0]);
    assert_eq!(rows().await, 1);

    let mut conn = pg::connection(&url).await;
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await
        .unwrap();
}

/// Commits and releases of keys held under several tokens, with a key named twice: answers
/// per key in order, never an error from the database.
#[tokio::test]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn commits_answer_every_key_in_order() {
    let Some(url) = pg::url("commits_answer_every_key_in_order") else {
        return;
    };
    let ns = pg::namespace("commits");
    let store = connect(&url, &ns).await;
    let keys: Vec<Vec<u8>> = (0..2_500).map(key).collect();
    let (mine, theirs) = (Token::new(), Token::new());
    let claim = |keys: Vec<Vec<u8>>, token| {
        ClaimBatch::new(keys, Duration::from_secs(60)).with_token(token)
    };
    let got = store.claim(claim(keys.clone(), mine)).await.unwrap();
    assert_eq!(count(&got, Claimed::Mine), 2_500);
    // Every seventh key is released and taken by another consumer: ours to commit no more.
    let lost: Vec<Vec<u8>> = keys.iter().step_by(7).cloned().collect();
    store
        .release(lost.iter().map(|k| (k.clone(), mine)).collect())
        .await
        .unwrap();
    let got = store.claim(claim(lost.clone(), theirs)).await.unwrap();
    assert_eq!(count(&got, Claimed::Mine), lost.len());

    let mut held: Vec<(Vec<u8>, Token)> = keys.iter().rev().map(|k| (k.clone(), mine)).collect();
    // The first key once more, under the other token (which holds it).
    held.push((keys[0].clone(), theirs));
    let answers = store.commit(held.clone(), TTL).await.unwrap();
    assert_eq!(answers.len(), held.len());
    for (i, committed) in answers[..2_500].iter().enumerate() {
        let k = 2_499 - i;
        assert_eq!(*committed, k % 7 != 0, "key {k}");
    }
    assert!(answers[2_500]);
    let again = store.commit(held, TTL).await.unwrap();
    assert_eq!(again, answers);
    let got = store
        .claim(claim(keys.clone(), Token::new()))
        .await
        .unwrap();
    for (i, c) in got.iter().enumerate() {
        let want = if i % 7 == 0 && i != 0 {
            Claimed::InFlight
        } else {
            Claimed::Done
        };
        assert_eq!(*c, want, "key {i}");
    }
    // Repeated keys in one batch share an answer.
    let twice = vec![b"dup".to_vec(), b"dup".to_vec()];
    assert_eq!(
        store
            .insert(InsertBatch::new(twice.clone(), TTL))
            .await
            .unwrap(),
        [Inserted::New; 2]
    );
    store.remove(twice).await.unwrap();
    pg::delete_namespace(&url, pg::TABLE, &ns).await;
}
