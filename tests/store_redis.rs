//! [`RedisStore`] against real servers.
//!
//! - `STREAM_DEDUP_REDIS_URL` (e.g. `redis://127.0.0.1:6379`): the store suite, restart and
//!   two-consumer tests run against that server, each in its own namespace (never a
//!   `FLUSHALL`: the server may be shared).
//! - `STREAM_DEDUP_REDIS_SERVER` (the path of `redis-server`): the failure and cluster tests
//!   start their own servers on free loopback ports and kill them (by pid) when done.
//!
//! Unset, the tests say they skipped and pass.
#![cfg(feature = "redis")]

mod support;

use std::collections::HashMap;
use std::error::Error as _;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use stream_dedup::store::{
    ClaimBatch, ClaimStore, Claimed, InsertBatch, Inserted, RedisStore, Store, StoreError, Token,
};
use stream_dedup::{DedupStreamExt, FailurePolicy, TryDedupStreamExt, Window};
use support::redis_server::{self, RedisCluster, RedisServer};

/// The store for the suite, or `None` without a server.
#[cfg_attr(not(feature = "testing"), allow(dead_code))] // for the suite only
async fn make(namespace: String) -> Option<RedisStore> {
    let url = std::env::var("STREAM_DEDUP_REDIS_URL").ok()?;
    // Generous: the suite runs in parallel with the other tests on a small machine.
    let store = RedisStore::builder(&namespace)
        .timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .expect("connect to STREAM_DEDUP_REDIS_URL");
    Some(store)
}

// The suite needs the `testing` feature (the package of this crate leaves it to the caller).
#[cfg(feature = "testing")]
stream_dedup::store_suite!(
    #[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
    make,
    expiry = Duration::from_millis(50)
);
#[cfg(feature = "testing")]
stream_dedup::claim_suite!(
    #[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
    make,
    expiry = Duration::from_millis(50)
);

const TTL: Duration = Duration::from_secs(120);

/// A namespace unique to this test and run.
fn namespace(test: &str) -> String {
    format!("test-{test}-{}-{}", std::process::id(), Token::new())
}

fn key(i: u32) -> Vec<u8> {
    format!("key-{i:08}").into_bytes()
}

fn count(answers: &[Inserted], which: Inserted) -> usize {
    answers.iter().filter(|&&a| a == which).count()
}

async fn connect(url: &str, namespace: &str) -> RedisStore {
    RedisStore::builder(namespace)
        .timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .expect("connect")
}

/// Commits and releases of more keys than one script call takes (they go in chunks): every key
/// gets its own answer, in order, and a claim that lost its key is told so.
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn large_commits_answer_every_key_in_order() {
    let Some(url) = redis_server::url("large_commits_answer_every_key_in_order") else {
        return;
    };
    let store = connect(&url, &namespace("large-commits")).await;
    let claims = &store;
    let keys: Vec<Vec<u8>> = (0..2_500).map(key).collect();
    let (mine, theirs) = (Token::new(), Token::new());
    let claim = |keys: Vec<Vec<u8>>, token| {
        ClaimBatch::new(keys, Duration::from_secs(60)).with_token(token)
    };
    let got = claims.claim(claim(keys.clone(), mine)).await.unwrap();
    assert!(got.iter().all(|&c| c == Claimed::Mine));
    // Every seventh key is released and taken by another consumer: ours to commit no more.
    let lost: Vec<Vec<u8>> = keys.iter().step_by(7).cloned().collect();
    claims
        .release(lost.iter().map(|k| (k.clone(), mine)).collect())
        .await
        .unwrap();
    let got = claims.claim(claim(lost.clone(), theirs)).await.unwrap();
    assert!(got.iter().all(|&c| c == Claimed::Mine));

    let answers = claims
        .commit(keys.iter().map(|k| (k.clone(), mine)).collect(), TTL)
        .await
        .unwrap();
    assert_eq!(answers.len(), keys.len());
    for (i, committed) in answers.iter().enumerate() {
        assert_eq!(*committed, i % 7 != 0, "key {i}");
    }
    // A retried commit answers the same; the other consumer still holds its keys.
    let again = claims
        .commit(keys.iter().map(|k| (k.clone(), mine)).collect(), TTL)
        .await
        .unwrap();
    assert_eq!(again, answers);
    let got = claims
        .claim(claim(keys.clone(), Token::new()))
        .await
        .unwrap();
    for (i, c) in got.iter().enumerate() {
        let want = if i % 7 == 0 {
            Claimed::InFlight
        } else {
            Claimed::Done
        };
        assert_eq!(*c, want, "key {i}");
    }
}

#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn debug_shows_no_credentials() {
    let Some(url) = redis_server::url("debug_shows_no_credentials") else {
        return;
    };
    let store = connect(&url, "dbg").await;
    let shown = format!("{store:?}");
    assert!(
        shown.contains("\"dbg\"") && shown.contains("single"),
        "{shown}"
    );
    assert!(
        !shown.contains("redis://") && !shown.contains("127.0.0.1"),
        "{shown}"
    );
    assert_eq!(store.namespace(), "dbg");
}

/// Keys are `{namespace}:{key bytes}`, binary-safe, holding the token, with the ttl.
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn key_layout() {
    let Some(url) = redis_server::url("key_layout") else {
        return;
    };
    let ns = namespace("layout");
    let store = connect(&url, &ns).await;
    let token = Token::new();
    let batch =
        InsertBatch::new(vec![b"k\xff\x00".to_vec()], Duration::from_secs(60)).with_token(token);
    assert_eq!(store.insert(batch).await.unwrap(), [Inserted::New]);

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (held, pttl) = read_raw(&mut conn, &ns, b"k\xff\x00").await;
    assert_eq!(held, Some(token.to_bytes().to_vec()));
    assert!((50_000..=60_000).contains(&pttl), "{pttl}");
}

/// For tests that look at what Redis holds: a store in a namespace of the test's own, the
/// namespace, and a plain connection; `None` (skipped) without a server.
async fn store_and_raw(
    test: &str,
) -> Option<(RedisStore, String, redis::aio::MultiplexedConnection)> {
    let url = redis_server::url(test)?;
    let ns = namespace(test);
    let store = connect(&url, &ns).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    Some((store, ns, conn))
}

/// Claims `batch`, which must make every key ours.
async fn claim_all(claims: &dyn ClaimStore, batch: ClaimBatch) {
    let answers = claims.claim(batch).await.expect("claim");
    assert!(answers.iter().all(|c| *c == Claimed::Mine), "{answers:?}");
}

/// What Redis holds for `key` of namespace `ns`: its value and its expiry in ms.
async fn read_raw(
    conn: &mut redis::aio::MultiplexedConnection,
    ns: &str,
    key: &[u8],
) -> (Option<Vec<u8>>, i64) {
    let mut redis_key = format!("{ns}:").into_bytes();
    redis_key.extend_from_slice(key);
    redis::pipe()
        .cmd("GET")
        .arg(&redis_key)
        .cmd("PTTL")
        .arg(&redis_key)
        .query_async(conn)
        .await
        .unwrap()
}

/// A key in flight holds `c` + the token + the ttl it will be committed with (ms), with an
/// expiry of ttl + lease; a commit with that ttl keeps the expiry. A commit that finds another
/// claim's key (in flight or done) is refused and leaves that key as it was: its value and its
/// expiry, not the refused commit's. One commit call mixes keys of several claim batches
/// (tokens) and answers each.
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn refused_commits_leave_the_holders_key_as_it_was() {
    let Some((store, ns, mut conn)) =
        store_and_raw("refused_commits_leave_the_holders_key_as_it_was").await
    else {
        return;
    };
    let claims = &store;
    let claim = |keys: &[&[u8]], lease: Duration, token: Token| {
        ClaimBatch::new(keys.iter().map(|k| k.to_vec()).collect(), lease).with_token(token)
    };
    let (mine, other, theirs) = (Token::new(), Token::new(), Token::new());
    let long = Duration::from_secs(600);
    let ttl = Duration::from_secs(300);
    claim_all(claims, claim(&[b"a", b"b", b"c"], long, mine).with_ttl(ttl)).await;
    // No ttl given: the key's expiry is the lease alone.
    claim_all(claims, claim(&[b"d"], long, other)).await;
    let (value, pttl) = read_raw(&mut conn, &ns, b"a").await;
    let mut expected = b"c".to_vec();
    expected.extend_from_slice(&mine.to_bytes());
    expected.extend_from_slice(b"300000");
    assert_eq!(value, Some(expected));
    assert!((890_000..=900_000).contains(&pttl), "ttl + lease: {pttl}");
    let (value, pttl) = read_raw(&mut conn, &ns, b"d").await;
    assert!(value.expect("d is claimed").ends_with(b"0"));
    assert!((590_000..=600_000).contains(&pttl), "the lease: {pttl}");

    // "b" is released and taken by a claim with a 20 s lease; "c" is released and recorded
    // done by mark-on-emit (an insert).
    claims
        .release(vec![(b"b".to_vec(), mine), (b"c".to_vec(), mine)])
        .await
        .unwrap();
    let lease = Duration::from_secs(20);
    assert_eq!(
        claims.claim(claim(&[b"b"], lease, theirs)).await.unwrap(),
        [Claimed::Mine]
    );
    let insert = InsertBatch::new(vec![b"c".to_vec()], TTL).with_token(theirs);
    assert_eq!(store.insert(insert).await.unwrap(), [Inserted::New]);
    let before_b = read_raw(&mut conn, &ns, b"b").await.0;
    // Time passes on their lease: the refused commit must not start it again.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // One call: keys of two claim batches, interleaved, and a free key ("e": its lease ran out).
    let held = vec![
        (b"a".to_vec(), mine),
        (b"d".to_vec(), other),
        (b"b".to_vec(), mine),
        (b"c".to_vec(), mine),
        (b"e".to_vec(), other),
    ];
    let answers = claims.commit(held, ttl).await.unwrap();
    assert_eq!(answers, [true, true, false, false, true]);
    // "a" keeps its claim's expiry (ttl + lease, less the time gone by); "d" (claimed with no
    // ttl) and "e" (free) get the commit's ttl.
    let (value, pttl) = read_raw(&mut conn, &ns, b"a").await;
    assert_eq!(value, Some(mine.to_bytes().to_vec()));
    assert!((880_000..=898_600).contains(&pttl), "a: {pttl}");
    for k in [&b"d"[..], b"e"] {
        let (value, pttl) = read_raw(&mut conn, &ns, k).await;
        assert_eq!(value, Some(other.to_bytes().to_vec()), "{k:?}");
        assert!((290_000..=300_000).contains(&pttl), "{k:?}: {pttl}");
    }
    let (value, pttl) = read_raw(&mut conn, &ns, b"b").await;
    assert_eq!(value, before_b);
    assert!(
        (10_000..=18_600).contains(&pttl),
        "in flight keeps what was left of its lease: {pttl}"
    );
    let (value, pttl) = read_raw(&mut conn, &ns, b"c").await;
    assert_eq!(value, Some(theirs.to_bytes().to_vec()));
    assert!(pttl > 100_000, "done keeps a ttl: {pttl}");
    // Their claim still commits.
    assert_eq!(
        claims
            .commit(vec![(b"b".to_vec(), theirs)], ttl)
            .await
            .unwrap(),
        [true]
    );
}

/// With a ttl, a key in flight outlives its lease in Redis (its expiry is ttl + lease), and the
/// lease is judged by what is left of that expiry, on Redis's clock: during the lease another
/// claim answers `InFlight`; after it, the next claim takes the key, the first claim's commit
/// is refused and its release leaves the new holder alone. A committed key keeps its claim's
/// expiry and answers `Done`.
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn a_lease_that_ran_out_is_taken_by_the_next_claim() {
    let Some((store, ns, mut conn)) =
        store_and_raw("a_lease_that_ran_out_is_taken_by_the_next_claim").await
    else {
        return;
    };
    let claims = &store;
    let ttl = Duration::from_secs(300);
    let batch = |keys: &[&[u8]], lease_ms: u64, token: Token| {
        ClaimBatch::new(
            keys.iter().map(|k| k.to_vec()).collect(),
            Duration::from_millis(lease_ms),
        )
        .with_token(token)
        .with_ttl(ttl)
    };
    let (first, second, third) = (Token::new(), Token::new(), Token::new());
    claim_all(claims, batch(&[b"k", b"d"], 1_000, first)).await;
    let held = |k: &[u8], token: Token| vec![(k.to_vec(), token)];
    assert_eq!(claims.commit(held(b"d", first), ttl).await.unwrap(), [true]);
    let (value, pttl) = read_raw(&mut conn, &ns, b"d").await;
    assert_eq!(value, Some(first.to_bytes().to_vec()));
    assert!(
        (299_000..=301_000).contains(&pttl),
        "the claim's expiry: {pttl}"
    );

    assert_eq!(
        claims
            .claim(batch(&[b"k", b"d"], 60_000, second))
            .await
            .unwrap(),
        [Claimed::InFlight, Claimed::Done],
        "during the lease"
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (value, pttl) = read_raw(&mut conn, &ns, b"k").await;
    assert!(value.is_some(), "still in Redis after its lease");
    assert!(pttl < 300_000, "less than the ttl left: {pttl}");

    assert_eq!(
        claims
            .claim(batch(&[b"k", b"d"], 60_000, second))
            .await
            .unwrap(),
        [Claimed::Mine, Claimed::Done],
        "after the lease"
    );
    let (taken, pttl) = read_raw(&mut conn, &ns, b"k").await;
    let mut expected = b"c".to_vec();
    expected.extend_from_slice(&second.to_bytes());
    expected.extend_from_slice(b"300000");
    assert_eq!(taken, Some(expected));
    assert!(
        (359_000..=360_000).contains(&pttl),
        "its own ttl + lease: {pttl}"
    );
    // A retry of that claim is still its own; another claim finds it in flight.
    assert_eq!(
        claims.claim(batch(&[b"k"], 60_000, second)).await.unwrap(),
        [Claimed::Mine]
    );
    assert_eq!(
        claims.claim(batch(&[b"k"], 60_000, third)).await.unwrap(),
        [Claimed::InFlight]
    );
    // The first claim can neither commit nor free it.
    assert_eq!(
        claims.commit(held(b"k", first), ttl).await.unwrap(),
        [false]
    );
    claims.release(held(b"k", first)).await.unwrap();
    let (value, pttl) = read_raw(&mut conn, &ns, b"k").await;
    assert_eq!(value, taken);
    assert!((350_000..=360_000).contains(&pttl), "kept: {pttl}");
    assert_eq!(
        claims.commit(held(b"k", second), ttl).await.unwrap(),
        [true]
    );
    assert_eq!(
        claims.claim(batch(&[b"k"], 60_000, third)).await.unwrap(),
        [Claimed::Done]
    );
}

/// A ttl beyond Redis's longest expiry is cut short, never the lease: a claim made a moment
/// ago is not taken by the next one.
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn an_endless_ttl_keeps_the_lease() {
    let Some((store, _ns, _conn)) = store_and_raw("an_endless_ttl_keeps_the_lease").await else {
        return;
    };
    let claims = &store;
    let batch =
        || ClaimBatch::new(vec![b"k".to_vec()], Duration::from_secs(60)).with_ttl(Duration::MAX);
    claim_all(claims, batch()).await;
    assert_eq!(claims.claim(batch()).await.unwrap(), [Claimed::InFlight]);
}

/// A commit that meets a value it did not write answers `false` for that key and leaves it as
/// it was, whatever it holds: another claim's in-flight value of an odd shape (kept, with its
/// expiry, and never taken over: its lease cannot be read, so it runs to the key's expiry), a
/// key that is not a string (untouched), and the other keys of the call still commit.
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn commits_survive_foreign_values() {
    let Some((store, ns, mut conn)) = store_and_raw("commits_survive_foreign_values").await else {
        return;
    };
    let claims = &store;
    let mine = Token::new();
    let keys: Vec<Vec<u8>> = [&b"k1"[..], b"k2", b"k3", b"k4", b"k5"]
        .iter()
        .map(|k| k.to_vec())
        .collect();
    let batch = ClaimBatch::new(keys.clone(), Duration::from_secs(60)).with_token(mine);
    claim_all(claims, batch).await;
    let raw = |k: &str| format!("{ns}:{k}");
    let mut odd = b"c".to_vec();
    odd.extend_from_slice(&Token::new().to_bytes());
    odd.extend_from_slice(b"-5");
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(raw("k2"))
        .arg(&odd[..])
        .arg("PX")
        .arg(60_000)
        .ignore()
        .cmd("DEL")
        .arg(raw("k4"))
        .ignore()
        .cmd("RPUSH")
        .arg(raw("k4"))
        .arg("a list")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let answers = claims
        .commit(keys.iter().map(|k| (k.clone(), mine)).collect(), TTL)
        .await
        .unwrap();
    assert_eq!(answers, [true, false, true, false, true]);
    let (value, pttl) = read_raw(&mut conn, &ns, b"k2").await;
    assert_eq!(value, Some(odd));
    assert!(
        (50_000..=60_000).contains(&pttl),
        "kept with its expiry: {pttl}"
    );
    let claim_k2 = ClaimBatch::new(vec![b"k2".to_vec()], Duration::from_millis(1)).with_ttl(TTL);
    assert_eq!(claims.claim(claim_k2).await.unwrap(), [Claimed::InFlight]);
    let list: Vec<String> = redis::cmd("LRANGE")
        .arg(raw("k4"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(list, ["a list"]);
    for k in [&b"k1"[..], b"k3", b"k5"] {
        assert_eq!(
            read_raw(&mut conn, &ns, k).await.0,
            Some(mine.to_bytes().to_vec())
        );
    }
}

/// 100,000 keys through one store, the store dropped, a new one connected: all present.
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn restart_forgets_nothing() {
    let Some(url) = redis_server::url("restart_forgets_nothing") else {
        return;
    };
    let ns = namespace("restart");
    let batches = || (0..100u32).map(|b| (b * 1_000..(b + 1) * 1_000).map(key).collect::<Vec<_>>());

    let store = connect(&url, &ns).await;
    let mut new = 0;
    for keys in batches() {
        let answers = store.insert(InsertBatch::new(keys, TTL)).await.unwrap();
        new += count(&answers, Inserted::New);
    }
    assert_eq!(new, 100_000);
    drop(store);

    let store = connect(&url, &ns).await;
    let mut new_again = 0;
    for keys in batches() {
        let answers = store.insert(InsertBatch::new(keys, TTL)).await.unwrap();
        new_again += count(&answers, Inserted::New);
    }
    assert_eq!(new_again, 0, "keys accepted twice across a restart");
    redis_server::delete_namespace(&url, &ns).await;
}

/// Two stores (two connections, one namespace) inserting overlapping keys at the same time:
/// every key is new exactly once overall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn two_consumers_agree() {
    let Some(url) = redis_server::url("two_consumers_agree") else {
        return;
    };
    let ns = namespace("two");
    let (a, b) = (connect(&url, &ns).await, connect(&url, &ns).await);
    // a takes 0..30,000 upwards, b 10,000..40,000 downwards: they meet in the middle, in
    // batches of 500, while 20,000 keys are asked for by both.
    let run = |store: RedisStore, keys: Vec<u32>| {
        tokio::spawn(async move {
            let mut new = Vec::new();
            for chunk in keys.chunks(500) {
                let batch = InsertBatch::new(chunk.iter().map(|&i| key(i)).collect(), TTL);
                let answers = store.insert(batch).await.unwrap();
                for (&i, answer) in chunk.iter().zip(answers) {
                    if answer == Inserted::New {
                        new.push(i);
                    }
                }
            }
            new
        })
    };
    let ta = run(a, (0..30_000).collect());
    let tb = run(b, (10_000..40_000).rev().collect());
    let mut times_new: HashMap<u32, u32> = HashMap::new();
    for i in ta.await.unwrap().into_iter().chain(tb.await.unwrap()) {
        *times_new.entry(i).or_default() += 1;
    }
    assert_eq!(times_new.len(), 40_000, "a key was never new");
    assert!(times_new.values().all(|&n| n == 1), "a key was new twice");
    redis_server::delete_namespace(&url, &ns).await;
}

/// Redis killed and restarted on the same port: calls fail with a clear error within the
/// timeout (no hang, no panic), then succeed again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn killed_server_fails_fast_then_recovers() {
    let Some(bin) = redis_server::server_binary("killed_server_fails_fast_then_recovers") else {
        return;
    };
    let mut server = RedisServer::start(&bin);
    let timeout = Duration::from_millis(500);
    let store = RedisStore::builder("fault")
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
    let mut kinds = Vec::new();
    for attempt in 0..5 {
        let start = Instant::now();
        let result = store.insert(batch(100..200)).await;
        let took = start.elapsed();
        assert!(
            took < timeout + Duration::from_millis(250),
            "attempt {attempt} took {took:?}"
        );
        let error = result.expect_err("Redis is down");
        assert!(
            matches!(error, StoreError::Unavailable(_) | StoreError::Timeout(_)),
            "{error:?}"
        );
        assert!(error.is_transient());
        eprintln!("down, attempt {attempt}: {error} ({took:?}): {error:?}");
        if matches!(error, StoreError::Unavailable(_)) {
            let port = format!("Redis at 127.0.0.1:{}", server.port());
            assert!(error.to_string().contains(&port), "{error}");
            assert_said_once(&error);
        }
        kinds.push(matches!(error, StoreError::Unavailable(_)));
    }
    assert!(
        kinds.iter().any(|&u| u),
        "an outage should read as unavailable"
    );
    assert!(store.remove(vec![key(1)]).await.is_err());
    // Let the reconnect attempt that the last failure started fail too.
    tokio::time::sleep(Duration::from_millis(200)).await;

    server.restart();
    let back = Instant::now();
    let mut failed = 0;
    let answers = loop {
        match store.insert(batch(0..150)).await {
            Ok(answers) => break answers,
            Err(e) => {
                failed += 1;
                assert!(
                    back.elapsed() < Duration::from_secs(5),
                    "no success 5 s after Redis came back: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    eprintln!(
        "first success {:?} after Redis came back, after {failed} failed calls",
        back.elapsed()
    );
    assert_eq!(failed, 0, "the first call after Redis is back reconnects");
    // The restarted Redis kept nothing (no persistence): all new, and remembered again.
    assert_eq!(count(&answers, Inserted::New), 150);
    let again = store.insert(batch(0..150)).await.unwrap();
    assert_eq!(count(&again, Inserted::Present), 150);
}

/// Makes the server at `url` close every other client's connection (the store's among them).
async fn close_clients(url: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal"])
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(killed >= 1, "killed {killed}");
}

/// A connection that Redis closed (idle clients closed, a proxy restarted) is replaced within
/// the call that finds it broken: no call fails.
#[tokio::test]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn closed_connection_is_replaced_within_the_call() {
    let Some(bin) = redis_server::server_binary("closed_connection_is_replaced_within_the_call")
    else {
        return;
    };
    let server = RedisServer::start(&bin);
    let store = RedisStore::connect(&server.url(), "closed").await.unwrap();
    let batch = |range: std::ops::Range<u32>| InsertBatch::new(range.map(key).collect(), TTL);
    assert_eq!(
        count(&store.insert(batch(0..100)).await.unwrap(), Inserted::New),
        100
    );
    for round in 0..3 {
        close_clients(&server.url()).await;
        let answers = store.insert(batch(0..200)).await.expect("reconnected");
        let present = if round == 0 { 100 } else { 200 };
        assert_eq!(count(&answers, Inserted::Present), present);
        assert_eq!(count(&answers, Inserted::New), 200 - present);
    }
}

/// The claim scripts find a closed connection the same way: a claim, its commit and a release
/// each succeed on the first call after Redis closed the store's connection, and the answers
/// are those of a single call (a resent commit compares the token, so it is still "mine").
#[tokio::test]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn closed_connection_is_replaced_for_claim_scripts() {
    let Some(bin) = redis_server::server_binary("closed_connection_is_replaced_for_claim_scripts")
    else {
        return;
    };
    let server = RedisServer::start(&bin);
    let store = RedisStore::connect(&server.url(), "closed-claims")
        .await
        .unwrap();
    let claims = &store;
    let url = server.url();
    let kill = || close_clients(&url);
    let keys: Vec<Vec<u8>> = (0..1_500).map(key).collect();
    let token = Token::new();
    let batch = ClaimBatch::new(keys.clone(), Duration::from_secs(60)).with_token(token);
    // Open the store's connection, then close it under every call.
    claim_all(claims, batch.clone()).await;
    kill().await;
    claim_all(claims, batch).await;
    kill().await;
    let (done, freed) = keys.split_at(1_000);
    let answers = claims
        .commit(done.iter().map(|k| (k.clone(), token)).collect(), TTL)
        .await
        .expect("reconnected");
    assert!(answers.iter().all(|&a| a), "every commit is ours");
    kill().await;
    claims
        .release(freed.iter().map(|k| (k.clone(), token)).collect())
        .await
        .expect("reconnected");
    let after = claims
        .claim(ClaimBatch::new(keys.clone(), TTL))
        .await
        .unwrap();
    assert!(after[..1_000].iter().all(|c| *c == Claimed::Done));
    assert!(after[1_000..].iter().all(|c| *c == Claimed::Mine));
}

/// A hung Redis (SIGSTOP): the call times out; Redis applies it once resumed, and a retry with
/// the same token answers `New` for those keys, while anybody else sees them `Present`.
#[tokio::test]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn hung_server_times_out_and_retry_is_new() {
    let Some(bin) = redis_server::server_binary("hung_server_times_out_and_retry_is_new") else {
        return;
    };
    let server = RedisServer::start(&bin);
    let timeout = Duration::from_millis(300);
    let store = RedisStore::builder("hung")
        .timeout(timeout)
        .connect(&server.url())
        .await
        .unwrap();
    // Warm the connection.
    store
        .insert(InsertBatch::new(vec![b"warm".to_vec()], TTL))
        .await
        .unwrap();

    let token = Token::new();
    let keys: Vec<Vec<u8>> = (0..500).map(key).collect();
    let batch = InsertBatch::new(keys.clone(), TTL).with_token(token);

    server.pause();
    let start = Instant::now();
    let result = store.insert(batch.clone()).await;
    let took = start.elapsed();
    server.resume();
    match result {
        Err(StoreError::Timeout(d)) => assert_eq!(d, timeout),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(took < timeout + Duration::from_millis(250), "took {took:?}");

    // Once resumed, Redis runs what it had received: the timed-out call was applied.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = redis::Client::open(server.url().as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut held = 0;
    for k in &keys {
        let mut redis_key = b"hung:".to_vec();
        redis_key.extend_from_slice(k);
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(redis_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if value.as_deref() == Some(&token.to_bytes()[..]) {
            held += 1;
        }
    }
    eprintln!("{held} of 500 keys were written by the call that timed out");

    let retry = store.insert(batch).await.unwrap();
    assert_eq!(
        count(&retry, Inserted::New),
        500,
        "the retry must not lose a message"
    );
    let other = store.insert(InsertBatch::new(keys, TTL)).await.unwrap();
    assert_eq!(count(&other, Inserted::Present), 500);
}

/// A 3-node Redis Cluster: keys across all slots in batches, all new, then all present;
/// removes too; and a stale slot map (slots moved behind the store's back) still answers
/// right.
#[tokio::test]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn cluster_exactly_once() {
    let Some(bin) = redis_server::server_binary("cluster_exactly_once") else {
        return;
    };
    let cluster = RedisCluster::start(&bin, 3);
    let urls = cluster.urls();
    let store = RedisStore::builder("cluster")
        .timeout(Duration::from_secs(5))
        .connect_cluster(urls.iter().map(String::as_str))
        .await
        .unwrap();
    assert!(format!("{store:?}").contains("cluster"));

    let batches = || (0..10u32).map(|b| (b * 1_000..(b + 1) * 1_000).map(key).collect::<Vec<_>>());
    for keys in batches() {
        let answers = store.insert(InsertBatch::new(keys, TTL)).await.unwrap();
        assert_eq!(count(&answers, Inserted::New), 1_000);
    }
    for keys in batches() {
        let answers = store.insert(InsertBatch::new(keys, TTL)).await.unwrap();
        assert_eq!(count(&answers, Inserted::Present), 1_000);
    }
    // Every node holds some of them, and each key went straight to its node: no redirects.
    for node in 0..3 {
        let size: usize = cluster.cli(node, &["dbsize"]).trim().parse().unwrap();
        assert!(size > 2_000, "node {node} holds {size} keys");
        let errors = cluster.cli(node, &["info", "errorstats"]);
        assert!(!errors.contains("MOVED"), "node {node}: {errors}");
    }

    // The same token again (a retry) is new; remove forgets.
    let token = Token::new();
    let retried = InsertBatch::new((20_000..21_000).map(key).collect(), TTL).with_token(token);
    assert_eq!(
        count(&store.insert(retried.clone()).await.unwrap(), Inserted::New),
        1_000
    );
    assert_eq!(
        count(&store.insert(retried).await.unwrap(), Inserted::New),
        1_000
    );
    store.remove((0..500).map(key).collect()).await.unwrap();
    let answers = store
        .insert(InsertBatch::new((0..1_000).map(key).collect(), TTL))
        .await
        .unwrap();
    assert_eq!(count(&answers, Inserted::New), 500);
    assert!(answers[..500].iter().all(|&a| a == Inserted::New));

    // Move 200 slots from node 0 to node 1: the store's slot map is now stale, and the
    // nodes answer MOVED for the keys of those slots.
    let id = |node: usize| cluster.cli(node, &["cluster", "myid"]).trim().to_owned();
    let (from, to) = (id(0), id(1));
    let reshard = std::process::Command::new(redis_server::cli_binary(&bin))
        .args(["--cluster", "reshard", &urls[0]["redis://".len()..]])
        .args(["--cluster-from", &from, "--cluster-to", &to])
        .args(["--cluster-slots", "200", "--cluster-yes"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run redis-cli --cluster reshard");
    assert!(
        reshard.status.success(),
        "reshard failed: {}",
        String::from_utf8_lossy(&reshard.stdout)
    );
    for keys in batches() {
        let answers = store
            .insert(InsertBatch::new(keys.clone(), TTL))
            .await
            .unwrap();
        // 0..500 were removed and inserted again above: all present now.
        assert_eq!(count(&answers, Inserted::Present), 1_000);
    }
    let moved: usize = (0..3)
        .map(|node| moved_count(&cluster.cli(node, &["info", "errorstats"])))
        .sum();
    assert!(moved > 0, "the stale slot map was never used");
    let fresh = store
        .insert(InsertBatch::new((30_000..40_000).map(key).collect(), TTL))
        .await
        .unwrap();
    assert_eq!(count(&fresh, Inserted::New), 10_000);
    // The slot map was read again: no more redirects.
    let moved_after: usize = (0..3)
        .map(|node| moved_count(&cluster.cli(node, &["info", "errorstats"])))
        .sum();
    assert_eq!(moved_after, moved);

    // Claims on the cluster: one script call per key, routed to the key's node.
    let claims = &store;
    let keys: Vec<Vec<u8>> = (50_000..51_000).map(key).collect();
    let (mine, theirs) = (Token::new(), Token::new());
    let lease = Duration::from_secs(60);
    let batch = ClaimBatch::new(keys.clone(), lease).with_token(mine);
    claim_all(claims, batch).await;
    let (done, freed) = keys.split_at(600);
    claims
        .release(freed.iter().map(|k| (k.clone(), mine)).collect())
        .await
        .unwrap();
    // One freed key is taken by another claim: our late commit of it is refused.
    let taken = ClaimBatch::new(vec![freed[0].clone()], lease).with_token(theirs);
    assert_eq!(claims.claim(taken).await.unwrap(), [Claimed::Mine]);
    let mut held: Vec<(Vec<u8>, Token)> = done.iter().map(|k| (k.clone(), mine)).collect();
    held.push((freed[0].clone(), mine));
    let answers = claims.commit(held, TTL).await.unwrap();
    assert!(answers[..600].iter().all(|&a| a));
    assert!(!answers[600]);
    let again = claims
        .claim(ClaimBatch::new(keys.clone(), lease))
        .await
        .unwrap();
    assert!(again[..600].iter().all(|c| *c == Claimed::Done));
    assert_eq!(again[600], Claimed::InFlight, "their claim stands");
    assert!(again[601..].iter().all(|c| *c == Claimed::Mine));

    // A lease that ran out (the key kept for its ttl) is taken on the key's node.
    let short = |token: Token| {
        ClaimBatch::new(vec![key(60_000)], Duration::from_millis(300))
            .with_token(token)
            .with_ttl(TTL)
    };
    claim_all(claims, short(mine)).await;
    assert_eq!(
        claims.claim(short(theirs)).await.unwrap(),
        [Claimed::InFlight]
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(claims.claim(short(theirs)).await.unwrap(), [Claimed::Mine]);
}

/// The `MOVED` count in the output of `INFO errorstats`.
fn moved_count(errorstats: &str) -> usize {
    errorstats
        .lines()
        .find_map(|l| l.strip_prefix("errorstat_MOVED:count="))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A handle: shared across tasks and threads, cloned cheaply.
#[test]
fn auto_traits() {
    fn handle<T: Send + Sync + Unpin + Clone + std::fmt::Debug + 'static>() {}
    handle::<RedisStore>();
    handle::<stream_dedup::store::RedisStoreBuilder>();
}

/// The store's own limits: zero timeouts are refused where they are given.
#[test]
#[should_panic(expected = "timeout must not be zero")]
fn zero_timeout_panics() {
    let _ = RedisStore::builder("x").timeout(Duration::ZERO);
}

/// A URL that is not one is a clear error, not a panic.
#[tokio::test]
async fn bad_url_is_an_error() {
    let error = RedisStore::connect("not a url", "x").await.unwrap_err();
    assert!(matches!(error, StoreError::Backend { .. }), "{error:?}");
}

/// Nothing listening: `Unavailable`, quickly.
#[tokio::test]
async fn refused_connection_is_unavailable() {
    let port = redis_server::free_port();
    let start = Instant::now();
    let error = RedisStore::connect(&format!("redis://127.0.0.1:{port}"), "x")
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
    // The message names what failed and where; the chain says each thing once, and the
    // I/O error is the source.
    assert_eq!(
        error.to_string(),
        format!("the store is unavailable: connection to Redis at 127.0.0.1:{port} refused")
    );
    assert_said_once(&error);
    let source = error.source().map(ToString::to_string).unwrap_or_default();
    assert!(source.contains("refused"), "{}", chain(&error));
}

/// The error's message with its sources, as a log line shows it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out += &format!(": {s}");
        source = s.source();
    }
    out
}

/// No message in the chain repeats the one before it, nor is part of it.
fn assert_said_once(e: &dyn std::error::Error) {
    let mut previous = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        assert!(
            !previous.contains(&text),
            "said twice: {text:?} in {previous:?} ({})",
            chain(e)
        );
        previous = text;
        source = s.source();
    }
}

/// A server that needs a password: a URL without one fails at `connect` (`NOAUTH`), a wrong
/// one too (`WRONGPASS`), and neither error nor `Debug` shows the password; the right one
/// connects.
#[tokio::test]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn a_server_that_needs_a_password_fails_at_connect() {
    let Some(bin) = redis_server::server_binary("a_server_that_needs_a_password_fails_at_connect")
    else {
        return;
    };
    let password = "s3cret-Pa55";
    let server = RedisServer::start_with(
        &bin,
        redis_server::free_port(),
        &["--requirepass", password],
    );
    let port = server.port();

    let start = Instant::now();
    let error = RedisStore::connect(&server.url(), "auth")
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(matches!(error, StoreError::Backend { .. }), "{error:?}");
    let text = error.to_string();
    eprintln!("no password: {}", chain(&error));
    assert!(text.contains("NOAUTH"), "{text}");
    assert!(
        text.contains(&format!("Redis at 127.0.0.1:{port} needs a password")),
        "{text}"
    );
    assert_said_once(&error);

    for wrong in [
        format!("redis://:wrong-Pa55@127.0.0.1:{port}"),
        format!("redis://default:wrong-Pa55@127.0.0.1:{port}"),
    ] {
        let error = RedisStore::connect(&wrong, "auth").await.unwrap_err();
        let (text, debug) = (chain(&error), format!("{error:?}"));
        eprintln!("wrong password: {text}");
        assert!(text.contains("WRONGPASS"), "{text}");
        assert!(text.contains("refused the login"), "{text}");
        assert!(
            !text.contains("wrong-Pa55") && !debug.contains("wrong-Pa55"),
            "{debug}"
        );
        assert_said_once(&error);
    }

    for right in [
        format!("redis://:{password}@127.0.0.1:{port}"),
        format!("redis://default:{password}@127.0.0.1:{port}"),
    ] {
        let store = RedisStore::connect(&right, "auth").await.expect("connect");
        assert!(!format!("{store:?}").contains(password));
        let answers = store
            .insert(InsertBatch::new(vec![b"k".to_vec()], TTL))
            .await
            .unwrap();
        assert_eq!(answers.len(), 1);
    }
}

/// A plain `connect` to a node of a Redis Cluster is refused with the fix; a connection the
/// application made fails on its first call with the fix, not a bare `MOVED`; and
/// `connect_cluster` to a Redis without cluster mode says so. A namespace with a hash tag
/// keeps all its keys on one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn a_cluster_node_needs_connect_cluster() {
    let Some(bin) = redis_server::server_binary("a_cluster_node_needs_connect_cluster") else {
        return;
    };
    let cluster = RedisCluster::start(&bin, 3);
    let urls = cluster.urls();

    let error = RedisStore::connect(&urls[0], "plain").await.unwrap_err();
    let text = error.to_string();
    eprintln!("connect to a cluster node: {}", chain(&error));
    assert!(
        text.contains("is a Redis Cluster node")
            && text.contains("use RedisStore::connect_cluster"),
        "{text}"
    );
    assert_said_once(&error);

    let client = redis::Client::open(urls[0].as_str()).unwrap();
    let manager = redis::aio::ConnectionManager::new(client).await.unwrap();
    let store = RedisStore::from_connection_manager(manager, "plain").unwrap();
    let keys: Vec<Vec<u8>> = (0..100).map(key).collect();
    let error = store
        .insert(InsertBatch::new(keys.clone(), TTL))
        .await
        .unwrap_err();
    let text = error.to_string();
    eprintln!(
        "a call through a plain connection to a cluster node: {}",
        chain(&error)
    );
    assert!(
        text.contains("MOVED") && text.contains("use RedisStore::connect_cluster"),
        "{text}"
    );

    let plain = RedisServer::start(&bin);
    let error = RedisStore::connect_cluster([plain.url().as_str()], "plain")
        .await
        .unwrap_err();
    let text = chain(&error);
    eprintln!("connect_cluster to a plain Redis: {text}");
    assert!(
        text.contains("not in cluster mode") && text.contains("use RedisStore::connect"),
        "{text}"
    );

    // A hash tag in the namespace: all keys in one slot, on one node.
    let sizes = || -> Vec<usize> {
        (0..3)
            .map(|node| cluster.cli(node, &["dbsize"]).trim().parse().unwrap())
            .collect()
    };
    let before = sizes();
    let tagged = RedisStore::connect_cluster(urls.iter().map(String::as_str), "{tagged}")
        .await
        .unwrap();
    let answers = tagged.insert(InsertBatch::new(keys, TTL)).await.unwrap();
    assert_eq!(count(&answers, Inserted::New), 100);
    let mut added: Vec<usize> = sizes().iter().zip(&before).map(|(a, b)| a - b).collect();
    added.sort_unstable();
    assert_eq!(added, [0, 0, 100]);
}

/// A Redis Cluster that needs a password: `connect_cluster` without one fails at connect
/// (`NOAUTH`), with a wrong one too; the right one connects and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn a_cluster_that_needs_a_password_fails_at_connect() {
    let Some(bin) = redis_server::server_binary("a_cluster_that_needs_a_password_fails_at_connect")
    else {
        return;
    };
    let password = "s3cret-Pa55";
    let cluster = RedisCluster::start_with_password(&bin, 3, Some(password));
    let ports: Vec<u16> = cluster.nodes.iter().map(RedisServer::port).collect();
    let urls = |auth: &str| -> Vec<String> {
        ports
            .iter()
            .map(|p| format!("redis://{auth}127.0.0.1:{p}"))
            .collect()
    };
    let connect = |urls: Vec<String>| async move {
        RedisStore::builder("auth")
            .timeout(Duration::from_secs(5))
            .connect_cluster(urls.iter().map(String::as_str))
            .await
    };

    let error = connect(urls("")).await.unwrap_err();
    let text = chain(&error);
    eprintln!("cluster, no password: {text}");
    assert!(
        text.contains("NOAUTH") && text.contains("need a password"),
        "{text}"
    );
    let error = connect(urls(":wrong-Pa55@")).await.unwrap_err();
    let text = chain(&error);
    eprintln!("cluster, wrong password: {text}");
    assert!(text.contains("WRONGPASS"), "{text}");
    assert!(!text.contains("wrong-Pa55") && !format!("{error:?}").contains("wrong-Pa55"));

    let store = connect(urls(&format!(":{password}@")))
        .await
        .expect("connect");
    let keys: Vec<Vec<u8>> = (0..300).map(key).collect();
    let answers = store.insert(InsertBatch::new(keys, TTL)).await.unwrap();
    assert_eq!(count(&answers, Inserted::New), 300);
}

/// `rediss://` without TLS compiled in: the error says so and names the feature.
#[cfg(not(feature = "redis-tls"))]
#[tokio::test]
async fn a_tls_url_without_tls_support_names_the_feature() {
    let error = RedisStore::connect("rediss://127.0.0.1:6380", "tls")
        .await
        .unwrap_err();
    let text = chain(&error);
    assert!(
        text.contains("TLS support, which is not compiled in")
            && text.contains("the feature `redis-tls`"),
        "{text}"
    );
    assert!(!text.contains("parse"), "{text}");
    let error = RedisStore::connect_cluster(["rediss://127.0.0.1:7000"], "tls")
        .await
        .unwrap_err();
    assert!(chain(&error).contains("`redis-tls`"), "{}", chain(&error));
}

/// With TLS compiled in, a `rediss://` URL to a Redis that does not serve TLS fails in the
/// TLS handshake (not as a URL that does not parse).
#[cfg(feature = "redis-tls")]
#[tokio::test]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn a_tls_url_to_a_plain_server_fails_the_handshake() {
    let Some(bin) = redis_server::server_binary("a_tls_url_to_a_plain_server_fails_the_handshake")
    else {
        return;
    };
    let server = RedisServer::start(&bin);
    let url = format!("rediss://127.0.0.1:{}", server.port());
    let error = RedisStore::connect(&url, "tls").await.unwrap_err();
    let text = chain(&error);
    eprintln!("rediss:// to a plain Redis: {text}");
    let at = format!("Redis at 127.0.0.1:{} (TLS)", server.port());
    assert!(
        text.contains("TLS handshake") && text.contains(&at),
        "{text}"
    );
    assert!(
        !text.contains("not valid") && !text.contains("parse"),
        "{text}"
    );
    assert_said_once(&error);
}

/// With TLS compiled in, a store talks to a Redis that serves TLS: through a client that
/// trusts the test's certificate authority, it connects and works; through a `rediss://` URL
/// (the system's root certificates, which do not hold that authority), it fails at connect,
/// naming TLS and the certificate.
#[cfg(feature = "redis-tls")]
#[tokio::test]
#[cfg_attr(
    not(all(server_redis, server_redis_bin)),
    ignore = "set STREAM_DEDUP_REDIS_URL and STREAM_DEDUP_REDIS_SERVER"
)]
async fn a_store_over_tls() {
    let Some(bin) = redis_server::server_binary("a_store_over_tls") else {
        return;
    };
    let Some(tls) = redis_server::TlsFiles::make("a_store_over_tls") else {
        return;
    };
    let (_server, tls_port) = RedisServer::start_tls(&bin, &tls);
    let ca = std::fs::read(&tls.ca).unwrap();
    let certificates = || redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.clone()),
    };
    let client =
        redis::Client::build_with_tls(format!("rediss://localhost:{tls_port}"), certificates())
            .unwrap();
    let store = RedisStore::builder("tls")
        .timeout(Duration::from_secs(5))
        .client(client)
        .await
        .expect("connect over TLS");
    let keys: Vec<Vec<u8>> = (0..100).map(key).collect();
    let answers = store
        .insert(InsertBatch::new(keys.clone(), TTL))
        .await
        .unwrap();
    assert_eq!(count(&answers, Inserted::New), 100);
    let answers = store.insert(InsertBatch::new(keys, TTL)).await.unwrap();
    assert_eq!(count(&answers, Inserted::Present), 100);

    let error = RedisStore::connect(&format!("rediss://localhost:{tls_port}"), "tls")
        .await
        .unwrap_err();
    let text = chain(&error);
    eprintln!("rediss:// with an unknown certificate authority: {text}");
    assert!(text.contains("TLS handshake failed"), "{text}");
    assert!(text.contains("certificate"), "{text}");
}

/// A server that accepts the connection and never answers: `connect` fails within its limit,
/// naming the server, as unavailable.
#[tokio::test]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn a_hung_server_fails_at_connect_naming_it() {
    let Some(bin) = redis_server::server_binary("a_hung_server_fails_at_connect_naming_it") else {
        return;
    };
    let server = RedisServer::start(&bin);
    server.pause();
    let start = Instant::now();
    let result = RedisStore::builder("hung-connect")
        .timeout(Duration::from_millis(200))
        .connection_timeout(Duration::from_millis(200))
        .connect(&server.url())
        .await;
    let took = start.elapsed();
    server.resume();
    let error = result.unwrap_err();
    assert!(took < Duration::from_millis(700), "took {took:?}");
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    let text = error.to_string();
    let at = format!(
        "connecting to Redis at 127.0.0.1:{} timed out",
        server.port()
    );
    assert!(text.contains(&at), "{text}");
}

/// Namespaces cannot collide: one with a `:` is refused (namespace `n:b` + key `k` was the
/// Redis key of namespace `n` + key `b:k`); other namespaces keep their keys apart.
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn namespaces_cannot_collide() {
    // Refused before any connection is tried.
    for bad in ["a:b", "", "a b", "orders{eu", "{}"] {
        let error = RedisStore::connect("redis://127.0.0.1:1", bad)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("invalid Redis namespace"),
            "{bad:?}: {error}"
        );
    }
    let Some(url) = redis_server::url("namespaces_cannot_collide") else {
        return;
    };
    let ns = namespace("collide");
    let store = connect(&url, &ns).await;
    let error = RedisStore::builder(&format!("{ns}:b"))
        .connect(&url)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("':'"), "{error}");
    let client = redis::Client::open(url.as_str()).unwrap();
    let manager = redis::aio::ConnectionManager::new(client).await.unwrap();
    assert!(RedisStore::from_connection_manager(manager, &format!("{ns}:b")).is_err());

    let near = connect(&url, &format!("{ns}.b")).await;
    let insert = |k: &[u8]| InsertBatch::new(vec![k.to_vec()], TTL);
    assert_eq!(store.insert(insert(b"b:k")).await.unwrap(), [Inserted::New]);
    assert_eq!(near.insert(insert(b"k")).await.unwrap(), [Inserted::New]);
    assert_eq!(
        store.insert(insert(b"b:k")).await.unwrap(),
        [Inserted::Present]
    );
    assert_eq!(store.insert(insert(b"b.k")).await.unwrap(), [Inserted::New]);
}

/// The builder's key limit is the store's: reported by `max_key_len`, and a call with a longer
/// key fails with `KeyTooLong`. The default is Redis's limit less the namespace and `:`.
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn the_builders_key_limit_is_the_stores() {
    let Some(url) = redis_server::url("the_builders_key_limit_is_the_stores") else {
        return;
    };
    let ns = namespace("limit");
    let store = RedisStore::builder(&ns)
        .max_key_len(16)
        .connect(&url)
        .await
        .unwrap();
    assert_eq!(store.max_key_len(), 16);
    let ok = InsertBatch::new(vec![vec![b'x'; 16]], TTL);
    assert_eq!(store.insert(ok).await.unwrap(), [Inserted::New]);
    let long = InsertBatch::new(vec![b"a".to_vec(), vec![b'x'; 17]], TTL);
    match store.insert(long).await {
        Err(StoreError::KeyTooLong { len: 17, max: 16 }) => {}
        other => panic!("expected KeyTooLong, got {other:?}"),
    }
    let default = connect(&url, &ns).await;
    assert_eq!(default.max_key_len(), 512 * 1024 * 1024 - ns.len() - 1);
}

/// The error type of the consumer's stream.
#[derive(Debug)]
struct AppError(StoreError);

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError(e)
    }
}

/// A window whose own key limit (1 MiB) is larger than the store's (16 bytes).
fn roomy_window(store: &RedisStore) -> stream_dedup::StoreWindow<RedisStore> {
    Window::max_keys(1_000)
        .ttl(TTL)
        .store(store.clone())
        .timeout(Duration::from_secs(5))
        .max_key_len(1 << 20)
}

/// A store with a 16-byte key limit, for the operator tests.
async fn store_with_short_keys(url: &str, test: &str) -> RedisStore {
    RedisStore::builder(&namespace(test))
        .timeout(Duration::from_secs(5))
        .max_key_len(16)
        .connect(url)
        .await
        .unwrap()
}

/// Through `dedup_by_key`, a key over the store's limit fails alone: the store's limit wins
/// over the window's larger one, the item gets the failure policy, and the other keys of its
/// batch are recorded in Redis (another consumer finds them).
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn a_key_over_the_stores_limit_fails_alone_in_dedup_by_key() {
    let Some(url) = redis_server::url("a_key_over_the_stores_limit_fails_alone_in_dedup_by_key")
    else {
        return;
    };
    let store = store_with_short_keys(&url, "long-dedup").await;
    let long = "x".repeat(100);

    // Fail closed: the long key's item alone is an error.
    let items = ["a".to_owned(), long.clone(), "b".to_owned()];
    let window = roomy_window(&store).on_failure(FailurePolicy::fail_closed());
    let out: Vec<Result<String, AppError>> = stream::iter(items.map(Ok))
        .try_dedup_by_key(|s: &String| s.clone(), window)
        .collect()
        .await;
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(
        out[0].as_ref().ok().map(String::as_str),
        Some("a"),
        "{out:?}"
    );
    assert!(
        matches!(
            &out[1],
            Err(AppError(StoreError::KeyTooLong { len: 100, max: 16 }))
        ),
        "{out:?}"
    );
    assert_eq!(
        out[2].as_ref().ok().map(String::as_str),
        Some("b"),
        "{out:?}"
    );

    // Fail open: the long key's item passes unchecked, the others are recorded.
    let items = ["c".to_owned(), long.clone(), "d".to_owned()];
    let unique = stream::iter(items).dedup_by_key(|s: &String| s.clone(), roomy_window(&store));
    let stats = unique.stats();
    let out: Vec<String> = unique.collect().await;
    assert_eq!(out, ["c", long.as_str(), "d"]);
    assert_eq!(stats.unchecked(), 1);

    // Another consumer (a window of its own) finds a, b, c and d in Redis.
    let again: Vec<&str> = stream::iter(["a", "b", "c", "d", "e"])
        .dedup_by_key(|s| s.to_owned(), roomy_window(&store))
        .collect()
        .await;
    assert_eq!(again, ["e"]);
}

/// Through `claim_by_key`, a key over the store's limit fails alone: the other claims of its
/// batch are made and commit, and another consumer finds them done.
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn a_key_over_the_stores_limit_fails_alone_in_claim_by_key() {
    let Some(url) = redis_server::url("a_key_over_the_stores_limit_fails_alone_in_claim_by_key")
    else {
        return;
    };
    let store = store_with_short_keys(&url, "long-claim").await;
    let long = "x".repeat(100);
    let items = ["a".to_owned(), long.clone(), "b".to_owned()];
    let window = roomy_window(&store).on_failure(FailurePolicy::fail_closed());
    let mut claims =
        stream::iter(items.map(Ok::<_, AppError>)).try_claim_by_key(|s: &String| s.clone(), window);
    let mut committed = Vec::new();
    let mut errors = Vec::new();
    while let Some(item) = claims.next().await {
        match item {
            Ok(claim) => committed.push(claim.commit().await.expect("commit")),
            Err(e) => errors.push(e),
        }
    }
    assert_eq!(committed, ["a", "b"], "errors: {errors:?}");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        matches!(
            errors[0],
            AppError(StoreError::KeyTooLong { len: 100, max: 16 })
        ),
        "{errors:?}"
    );

    let again: Vec<String> = stream::iter(["a", "b", "c"].map(str::to_owned))
        .claim_by_key(|s: &String| s.clone(), roomy_window(&store))
        .then(|claim| async move { claim.commit().await.expect("commit") })
        .collect()
        .await;
    assert_eq!(again, ["c"]);
}
