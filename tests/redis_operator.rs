//! The operator with the Redis store, end to end: restarts, consumers that share Redis, Redis
//! killed mid-stream, and Redis Cluster.
//!
//! Needs the `redis` feature, `STREAM_DEDUP_REDIS_URL` (a running Redis) and, for the tests
//! that start and kill servers of their own, `STREAM_DEDUP_REDIS_SERVER`; skips without them.
#![cfg(feature = "redis")]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures::{StreamExt, stream};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use stream_dedup::store::{RedisStore, StoreError};
use stream_dedup::{DedupStreamExt, FailurePolicy, TryDedupStreamExt, Window};
use support::redis_server::{self, RedisCluster, RedisServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const TTL: Duration = Duration::from_secs(600);

fn namespace(test: &str) -> String {
    format!(
        "op-{test}-{}-{}",
        std::process::id(),
        stream_dedup::store::Token::new()
    )
}

/// A small window, so that the store decides almost everything.
fn window(store: RedisStore) -> stream_dedup::StoreWindow<RedisStore> {
    Window::max_keys(1_000)
        .ttl(TTL)
        .store(store)
        .batch_size(1_000)
        .timeout(Duration::from_secs(2))
}

fn uuid_keys(n: usize, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let b: u128 = rng.random();
            let h = format!("{b:032x}");
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn a_restart_remembers_every_key() {
    let Some(url) = redis_server::url("a_restart_remembers_every_key") else {
        return;
    };
    let ns = namespace("restart");
    let keys = uuid_keys(100_000, 1);
    let first: usize = stream::iter(keys.clone())
        .dedup_by_key(
            |k| k.clone(),
            window(RedisStore::connect(&url, &ns).await.unwrap()),
        )
        .count()
        .await;
    assert_eq!(first, 100_000);
    // Everything dropped: a new process would start here.
    let unique = stream::iter(keys).dedup_by_key(
        |k| k.clone(),
        window(RedisStore::connect(&url, &ns).await.unwrap()),
    );
    let stats = unique.stats();
    assert_eq!(unique.count().await, 0, "a key was accepted twice");
    assert_eq!((stats.duplicates(), stats.unchecked()), (100_000, 0));
    redis_server::delete_namespace(&url, &ns).await;
}

/// One stream with redeliveries, split at random between two consumers with operators and
/// connections of their own: every key accepted exactly once overall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn two_consumers_accept_each_key_once() {
    let Some(url) = redis_server::url("two_consumers_accept_each_key_once") else {
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
    let consume = |part: Vec<String>, store: RedisStore| {
        tokio::spawn(async move {
            stream::iter(part)
                .dedup_by_key(|k| k.clone(), window(store).batch_size(64))
                .collect::<Vec<String>>()
                .await
        })
    };
    let ta = consume(a, RedisStore::connect(&url, &ns).await.unwrap());
    let tb = consume(b, RedisStore::connect(&url, &ns).await.unwrap());
    let (a, b) = (ta.await.unwrap(), tb.await.unwrap());
    let accepted: Vec<String> = a.into_iter().chain(b).collect();
    assert_eq!(accepted.len(), keys.len(), "accepted twice or lost");
    let distinct: HashSet<&String> = accepted.iter().collect();
    assert_eq!(distinct.len(), keys.len());
    redis_server::delete_namespace(&url, &ns).await;
}

/// Redis is killed mid-stream and restarted. Fail open: every item is delivered, the counter
/// says how many passed unchecked, and once Redis is back duplicates are dropped again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn redis_killed_mid_stream_fail_open() {
    let Some(bin) = redis_server::server_binary("redis_killed_mid_stream_fail_open") else {
        return;
    };
    let mut server = RedisServer::start(&bin);
    let store = RedisStore::builder("killed")
        .timeout(Duration::from_millis(300))
        .connect(&server.url())
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel::<u32>();
    let mut dropped = Vec::new();
    let window = Window::max_keys(1)
        .ttl(TTL)
        .store(store.clone())
        .timeout(Duration::from_millis(500));
    let mut unique = Box::pin(
        UnboundedReceiverStream::new(rx)
            .dedup_by_key(|k| *k, window)
            .on_duplicate(|k| dropped.push(k)),
    );
    let next = async |s: &mut std::pin::Pin<Box<_>>| {
        tokio::time::timeout(Duration::from_secs(10), StreamExt::next(s))
            .await
            .expect("an item within 10 s")
    };

    // Up: 0..100 accepted, their repeats dropped by the store (the window holds one key);
    // a last new key shows that every item before it was decided.
    for k in (0..100).chain(0..99).chain([999]) {
        tx.send(k).unwrap();
    }
    for k in (0..100).chain([999]) {
        assert_eq!(next(&mut unique).await, Some(k));
    }
    // Down: new keys pass unchecked (none lost), and so do repeats the window forgot.
    server.kill();
    for k in (100..150).chain(0..10) {
        tx.send(k).unwrap();
    }
    let mut during = Vec::new();
    for _ in 0..60 {
        during.push(next(&mut unique).await.unwrap());
    }
    assert_eq!(during, (100..150).chain(0..10).collect::<Vec<_>>());
    let s = unique.stats().snapshot();
    assert_eq!(s.unchecked, 60, "{s:?}");
    assert!(s.store_errors > 0);
    // Back (empty: it keeps nothing on disk): checked again, repeats dropped again.
    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut k = 1_000;
    loop {
        // New keys until the store answers again (the connection manager reconnects).
        tx.send(k).unwrap();
        assert_eq!(next(&mut unique).await, Some(k));
        k += 1;
        if unique.stats().unchecked() == s.unchecked || tokio::time::Instant::now() > deadline {
            let before = unique.stats().unchecked();
            tx.send(k).unwrap();
            assert_eq!(next(&mut unique).await, Some(k));
            if unique.stats().unchecked() == before {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Redis never came back"
            );
        }
    }
    for r in [k, k - 1, k] {
        tx.send(r).unwrap(); // repeats: the store says so
    }
    tx.send(5_000).unwrap();
    assert_eq!(next(&mut unique).await, Some(5_000));
    drop(tx);
    assert_eq!(next(&mut unique).await, None);
    drop(unique);
    assert!(
        dropped.ends_with(&[k, k - 1, k]),
        "{:?}",
        &dropped[dropped.len() - 3..]
    );
    assert_eq!(dropped.len(), 99 + 3);
}

#[derive(Debug, PartialEq)]
struct AppError(String);

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError(e.to_string())
    }
}

/// Fail closed: while Redis is down the error reaches the consumer in place of each item, and
/// nothing is dropped silently; the redeliveries are accepted once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn redis_killed_mid_stream_fail_closed() {
    let Some(bin) = redis_server::server_binary("redis_killed_mid_stream_fail_closed") else {
        return;
    };
    let mut server = RedisServer::start(&bin);
    let store = RedisStore::builder("closed")
        .timeout(Duration::from_millis(300))
        .connect(&server.url())
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel::<Result<u32, AppError>>();
    let window = Window::max_keys(100)
        .ttl(TTL)
        .store(store)
        .timeout(Duration::from_millis(500))
        .on_failure(FailurePolicy::fail_closed().retry(1, Duration::from_millis(50)));
    let mut unique = Box::pin(UnboundedReceiverStream::new(rx).try_dedup_by_key(|k| *k, window));
    let next = async |s: &mut std::pin::Pin<Box<_>>| {
        tokio::time::timeout(Duration::from_secs(10), StreamExt::next(s))
            .await
            .expect("an item within 10 s")
    };
    tx.send(Ok(1)).unwrap();
    assert_eq!(next(&mut unique).await, Some(Ok(1)));
    server.kill();
    for k in 2..6 {
        tx.send(Ok(k)).unwrap();
    }
    for _ in 2..6 {
        match next(&mut unique).await {
            Some(Err(AppError(e))) => {
                assert!(e.contains("unavailable") || e.contains("answer"), "{e}")
            }
            other => panic!("expected the store's error, got {other:?}"),
        }
    }
    server.restart();
    // The broker redelivers 2..6: processed now, although they were seen before the outage.
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while got.len() < 4 {
        for k in 2..6 {
            if !got.contains(&k) {
                tx.send(Ok(k)).unwrap();
                match next(&mut unique).await {
                    Some(Ok(v)) => got.push(v),
                    Some(Err(_)) => assert!(
                        tokio::time::Instant::now() < deadline,
                        "Redis never came back"
                    ),
                    None => unreachable!(),
                }
            }
        }
    }
    got.sort_unstable();
    assert_eq!(got, [2, 3, 4, 5]);
}

/// Redis Cluster (three test-owned nodes): two consumers, every key accepted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn cluster_two_consumers_exactly_once() {
    let Some(bin) = redis_server::server_binary("cluster_two_consumers_exactly_once") else {
        return;
    };
    let cluster = RedisCluster::start(&bin, 3);
    let urls = cluster.urls();
    let connect = || async {
        RedisStore::connect_cluster(urls.iter().map(String::as_str), "cluster-op")
            .await
            .unwrap()
    };
    let keys = uuid_keys(10_000, 4);
    let (a, b): (Vec<String>, Vec<String>) = (
        keys.iter()
            .cloned()
            .chain(keys[..5_000].iter().cloned())
            .collect(),
        keys[2_500..].to_vec(),
    );
    let (sa, sb) = (connect().await, connect().await);
    let ta = tokio::spawn(async move {
        stream::iter(a)
            .dedup_by_key(|k| k.clone(), window(sa))
            .collect::<Vec<_>>()
            .await
    });
    let tb = tokio::spawn(async move {
        stream::iter(b)
            .dedup_by_key(|k| k.clone(), window(sb))
            .collect::<Vec<_>>()
            .await
    });
    let accepted: Vec<String> = ta
        .await
        .unwrap()
        .into_iter()
        .chain(tb.await.unwrap())
        .collect();
    assert_eq!(accepted.len(), 10_000);
    assert_eq!(accepted.iter().collect::<HashSet<_>>().len(), 10_000);
}
