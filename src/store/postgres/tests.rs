//! `commit_in` inside real transactions, on the server of `STREAM_DEDUP_POSTGRES_URL` (the
//! tests say they skipped without it).

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use super::PostgresStore;
use crate::store::{ClaimBatch, ClaimStore, Claimed, HeldKey, StoreError, Token};

const TTL: Duration = Duration::from_secs(60);

/// A store in a namespace of its own, and the URL; `None` without a server.
async fn store(test: &str) -> Option<(PostgresStore, String)> {
    let Ok(url) = std::env::var("STREAM_DEDUP_POSTGRES_URL") else {
        eprintln!("skipped: {test} (STREAM_DEDUP_POSTGRES_URL is not set)");
        return None;
    };
    let namespace = format!("unit-{test}-{}-{}", std::process::id(), Token::new());
    let store = PostgresStore::builder(&namespace)
        .max_connections(2)
        .statement_timeout(Duration::from_secs(5))
        .no_purge()
        .connect(&url)
        .await
        .expect("connect");
    Some((store, url))
}

async fn cleanup(store: &PostgresStore) {
    sqlx::query("DELETE FROM stream_dedup_keys WHERE namespace = $1")
        .bind(store.namespace())
        .execute(store.pool())
        .await
        .expect("delete the test's rows");
}

/// Claims `key` for `lease`; answers the claim's token.
async fn claim(store: &PostgresStore, key: &[u8], lease: Duration) -> Token {
    let batch = ClaimBatch::new(vec![key.to_vec()], lease).with_ttl(TTL);
    let token = batch.token;
    assert_eq!(store.claim(batch).await.unwrap(), [Claimed::Mine]);
    token
}

/// What another consumer finds when it claims `key`.
async fn state(store: &PostgresStore, key: &[u8]) -> Claimed {
    let batch = ClaimBatch::new(vec![key.to_vec()], TTL);
    let token = batch.token;
    let answer = store.claim(batch).await.unwrap()[0];
    if answer == Claimed::Mine {
        // Free: give it back.
        store.release(vec![(key.to_vec(), token)]).await.unwrap();
    }
    answer
}

async fn effects_table(conn: &mut PgConnection, name: &str) {
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {name} (key bytea NOT NULL)"
    ))
    .execute(conn)
    .await
    .expect("create the effects table");
}

async fn effects(conn: &mut PgConnection, name: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {name}"))
        .fetch_one(conn)
        .await
        .expect("count effects")
}

#[tokio::test]
async fn commit_in_then_rollback_leaves_the_key_in_flight() {
    let Some((store, url)) = store("rollback").await else {
        return;
    };
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let table = format!("unit_effects_rollback_{}", std::process::id());
    effects_table(&mut conn, &table).await;
    let token = claim(&store, b"k", TTL).await;

    let mut tx = conn.begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {table} VALUES ($1)"))
        .bind(&b"k"[..])
        .execute(&mut *tx)
        .await
        .unwrap();
    let held = store.commit_in(&mut tx, b"k", token, TTL).await.unwrap();
    assert!(held);
    tx.rollback().await.unwrap();

    // Neither the effect nor the mark: the key is still in flight with the claim's token.
    assert_eq!(effects(&mut conn, &table).await, 0);
    assert_eq!(state(&store, b"k").await, Claimed::InFlight);
    let key: HeldKey = (b"k".to_vec(), token);
    assert_eq!(store.commit(vec![key], TTL).await.unwrap(), [true]);
    assert_eq!(state(&store, b"k").await, Claimed::Done);

    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await
        .unwrap();
    cleanup(&store).await;
}

#[tokio::test]
async fn commit_in_then_commit_marks_the_key_done_with_the_effect() {
    let Some((store, url)) = store("commit").await else {
        return;
    };
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let table = format!("unit_effects_commit_{}", std::process::id());
    effects_table(&mut conn, &table).await;
    let token = claim(&store, b"k", TTL).await;

    let mut tx = conn.begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {table} VALUES ($1)"))
        .bind(&b"k"[..])
        .execute(&mut *tx)
        .await
        .unwrap();
    // Inside the transaction the row is locked: another consumer's claim waits for it, then
    // finds the key done.
    assert!(store.commit_in(&mut tx, b"k", token, TTL).await.unwrap());
    let waiting = tokio::spawn({
        let store = store.clone();
        async move { state(&store, b"k").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "a claim went past a locked row");
    tx.commit().await.unwrap();
    assert_eq!(waiting.await.unwrap(), Claimed::Done);

    assert_eq!(effects(&mut conn, &table).await, 1);
    // A retried commit of the same claim is still the claim's.
    let mut tx = conn.begin().await.unwrap();
    assert!(store.commit_in(&mut tx, b"k", token, TTL).await.unwrap());
    tx.commit().await.unwrap();

    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await
        .unwrap();
    cleanup(&store).await;
}

#[tokio::test]
async fn commit_in_after_the_lease_was_lost_is_refused() {
    let Some((store, url)) = store("lost").await else {
        return;
    };
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let late = claim(&store, b"k", Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The lease ran out: another consumer takes the key.
    let owner = claim(&store, b"k", TTL).await;

    let mut tx = conn.begin().await.unwrap();
    assert!(!store.commit_in(&mut tx, b"k", late, TTL).await.unwrap());
    tx.commit().await.unwrap();
    // The new owner's claim stands, and it commits.
    assert_eq!(state(&store, b"k").await, Claimed::InFlight);
    let mut tx = conn.begin().await.unwrap();
    assert!(store.commit_in(&mut tx, b"k", owner, TTL).await.unwrap());
    tx.commit().await.unwrap();
    assert_eq!(state(&store, b"k").await, Claimed::Done);

    // A claim that failed open has no row: its commit is the key's.
    let mut tx = conn.begin().await.unwrap();
    assert!(
        store
            .commit_in(&mut tx, b"free", Token::new(), TTL)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    assert_eq!(state(&store, b"free").await, Claimed::Done);
    cleanup(&store).await;
}

#[tokio::test]
async fn commit_in_checks_keys_and_reports_errors() {
    let Some((store, url)) = store("errors").await else {
        return;
    };
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let long = vec![7u8; store.max_key_len() + 1];
    let mut tx = conn.begin().await.unwrap();
    match store.commit_in(&mut tx, &long, Token::new(), TTL).await {
        Err(StoreError::KeyTooLong { len, max }) => {
            assert_eq!((len, max), (long.len(), store.max_key_len()));
        }
        other => panic!("expected KeyTooLong, got {other:?}"),
    }
    // Nothing was sent: the transaction is still usable.
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(one, 1);
    // A statement timeout inside the transaction is a timeout.
    sqlx::query("SET LOCAL statement_timeout = '50ms'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let mut other = PgConnection::connect(&url).await.unwrap();
    let token = claim(&store, b"busy", TTL).await;
    let mut blocker = other.begin().await.unwrap();
    assert!(
        store
            .commit_in(&mut blocker, b"busy", token, TTL)
            .await
            .unwrap()
    );
    match store.commit_in(&mut tx, b"busy", token, TTL).await {
        Err(StoreError::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    tx.rollback().await.unwrap();
    blocker.rollback().await.unwrap();
    cleanup(&store).await;
}

/// `commit_all_in` answers for the keys of several claims: `true` only when every key is
/// still its token's (in flight, done by it, or free), and then every one is done.
#[tokio::test]
async fn commit_all_in_marks_every_key_or_refuses() {
    let Some((store, url)) = store("commit-all").await else {
        return;
    };
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let in_flight = claim(&store, b"a", TTL).await;
    let done = claim(&store, b"b", TTL).await;
    assert_eq!(
        store
            .commit(vec![(b"b".to_vec(), done)], TTL)
            .await
            .unwrap(),
        [true]
    );
    let other = claim(&store, b"c", TTL).await;
    let free = Token::new(); // "d" has no row: a claim that failed open

    let mut tx = conn.begin().await.unwrap();
    assert!(store.commit_all_in(&mut tx, &[], TTL).await.unwrap());
    let mine: Vec<HeldKey> = vec![
        (b"d".to_vec(), free),
        (b"a".to_vec(), in_flight),
        (b"b".to_vec(), done),
        (b"a".to_vec(), in_flight), // twice: one key
    ];
    assert!(store.commit_all_in(&mut tx, &mine, TTL).await.unwrap());
    tx.commit().await.unwrap();
    for key in [&b"a"[..], b"b", b"d"] {
        assert_eq!(state(&store, key).await, Claimed::Done, "{key:?}");
    }

    // "c" is another claim's: refused (roll back); so is one key under two tokens.
    let mut tx = conn.begin().await.unwrap();
    let refused = [(b"e".to_vec(), free), (b"c".to_vec(), free)];
    assert!(!store.commit_all_in(&mut tx, &refused, TTL).await.unwrap());
    tx.rollback().await.unwrap();
    assert_eq!(state(&store, b"c").await, Claimed::InFlight);
    assert_eq!(
        state(&store, b"e").await,
        Claimed::Mine,
        "rolled back: still free"
    );
    let mut tx = conn.begin().await.unwrap();
    let twice = [(b"c".to_vec(), other), (b"c".to_vec(), free)];
    assert!(!store.commit_all_in(&mut tx, &twice, TTL).await.unwrap());
    tx.rollback().await.unwrap();

    // A key too long: refused before anything is sent.
    let mut tx = conn.begin().await.unwrap();
    let long = [(vec![7; store.max_key_len() + 1], free)];
    let error = store.commit_all_in(&mut tx, &long, TTL).await.unwrap_err();
    assert!(matches!(error, StoreError::KeyTooLong { .. }), "{error:?}");
    tx.rollback().await.unwrap();
    cleanup(&store).await;
}

/// `expires_at` and `purge_at` of `key` in `table`, in seconds since the epoch.
async fn times(conn: &mut PgConnection, table: &str, key: &[u8]) -> (f64, f64) {
    sqlx::query_as(&format!(
        "SELECT extract(epoch FROM expires_at)::float8, extract(epoch FROM purge_at)::float8 \
         FROM {table} WHERE key = $1"
    ))
    .bind(key)
    .fetch_one(conn)
    .await
    .expect("read the row's times")
}

/// A commit and a renewal change no indexed column (`purge_at` stays as the claim set it, past
/// the lease and the ttl its commit gives): HOT updates, counted as such by PostgreSQL. A
/// commit later than the claim expected moves `purge_at` with the expiry, never before it.
#[tokio::test]
async fn commits_and_renewals_are_hot_updates() {
    let Ok(url) = std::env::var("STREAM_DEDUP_POSTGRES_URL") else {
        eprintln!(
            "skipped: commits_and_renewals_are_hot_updates (STREAM_DEDUP_POSTGRES_URL is not set)"
        );
        return;
    };
    let table = format!("unit_hot_{}", Token::new().to_string().replace('-', ""));
    let store = PostgresStore::builder("hot")
        .table(&table)
        .max_connections(2)
        .no_purge()
        .connect(&url)
        .await
        .expect("connect");
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let updates = format!(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relid = '{table}'::regclass"
    );

    let lease = Duration::from_secs(30);
    let batch = ClaimBatch::new(vec![b"k".to_vec()], lease).with_ttl(TTL);
    let token = batch.token;
    assert_eq!(store.claim(batch).await.unwrap(), [Claimed::Mine]);
    let (expires, purge) = times(&mut conn, &table, b"k").await;
    assert!(
        (purge - expires - TTL.as_secs_f64()).abs() < 0.01,
        "{expires} {purge}"
    );

    // A renewal: the expiry moves, `purge_at` does not.
    let held: HeldKey = (b"k".to_vec(), token);
    assert_eq!(store.renew(vec![held], lease).await.unwrap(), [true]);
    let (renewed, same) = times(&mut conn, &table, b"k").await;
    assert!(renewed > expires);
    assert_eq!(same, purge);

    // The commit, in a transaction that counts its own updates.
    let mut tx = conn.begin().await.unwrap();
    assert!(store.commit_in(&mut tx, b"k", token, TTL).await.unwrap());
    let (updated, hot): (i64, i64) = sqlx::query_as(&updates).fetch_one(&mut *tx).await.unwrap();
    assert_eq!((updated, hot), (1, 1), "the commit is a HOT update");
    tx.commit().await.unwrap();
    let (done_until, same) = times(&mut conn, &table, b"k").await;
    assert!(
        done_until <= same && same == purge,
        "{done_until} {same} {purge}"
    );

    // A claim told a ttl shorter than its commit gives: the commit moves `purge_at` along.
    let batch = ClaimBatch::new(vec![b"l".to_vec()], lease).with_ttl(Duration::from_secs(1));
    let token = batch.token;
    assert_eq!(store.claim(batch).await.unwrap(), [Claimed::Mine]);
    assert!(
        store
            .commit_all_in(&mut conn, &[(b"l".to_vec(), token)], TTL)
            .await
            .unwrap()
    );
    let (expires, purge) = times(&mut conn, &table, b"l").await;
    assert_eq!(expires, purge, "purged when it expires, not before");

    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await
        .unwrap();
}
