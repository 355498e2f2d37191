//! The operator with the PostgreSQL store, end to end: a restart, and consumers that share
//! the table, with `dedup_by_key` and with claims.
//!
//! Needs the `postgres` feature and `STREAM_DEDUP_POSTGRES_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); skips without it. Each test deletes its
//! namespace at the end.
#![cfg(feature = "postgres")]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures::{StreamExt, stream};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use stream_dedup::store::{PostgresStore, StoreError};
use stream_dedup::{DedupStreamExt, FailurePolicy, TryDedupStreamExt, Window};
use support::postgres as pg;

const TTL: Duration = Duration::from_secs(120);

async fn connect(url: &str, namespace: &str) -> PostgresStore {
    PostgresStore::builder(namespace)
        .statement_timeout(Duration::from_secs(5))
        .max_connections(4)
        .connect(url)
        .await
        .expect("connect")
}

/// The operator, end to end: a stream of 20,000 keys read twice by two processes one after
/// the other; the second accepts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn the_operator_remembers_across_a_restart() {
    let Some(url) = pg::url("the_operator_remembers_across_a_restart") else {
        return;
    };
    let ns = pg::namespace("op-restart");
    let window = |store: PostgresStore| {
        Window::max_keys(1_000)
            .ttl(TTL)
            .store(store)
            .batch_size(1_000)
            .timeout(Duration::from_secs(5))
    };
    let keys = uuid_keys(20_000, 1);
    let first = stream::iter(keys.clone())
        .dedup_by_key(|k| k.clone(), window(connect(&url, &ns).await))
        .count()
        .await;
    assert_eq!(first, 20_000);
    let unique = stream::iter(keys).dedup_by_key(|k| k.clone(), window(connect(&url, &ns).await));
    let stats = unique.stats();
    assert_eq!(unique.count().await, 0, "a key was accepted twice");
    assert_eq!((stats.duplicates(), stats.unchecked()), (20_000, 0));
    pg::delete_namespace(&url, pg::TABLE, &ns).await;
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

/// One stream with redeliveries, split at random between two consumers with operators and
/// pools of their own: every key accepted exactly once overall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn two_consumers_accept_each_key_once() {
    let Some(url) = pg::url("two_consumers_accept_each_key_once") else {
        return;
    };
    let ns = pg::namespace("two");
    let keys = uuid_keys(10_000, 2);
    let mut rng = StdRng::seed_from_u64(3);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for k in &keys {
        for _ in 0..rng.random_range(1..=3) {
            if rng.random_bool(0.5) { &mut a } else { &mut b }.push(k.clone());
        }
    }
    let consume = |part: Vec<String>, store: PostgresStore| {
        tokio::spawn(async move {
            let window = Window::max_keys(100)
                .ttl(TTL)
                .store(store)
                .batch_size(64)
                .timeout(Duration::from_secs(5))
                .on_failure(FailurePolicy::fail_closed());
            stream::iter(part)
                .map(Ok::<_, StoreError>)
                .try_dedup_by_key(|k| k.clone(), window)
                .map(|r| r.expect("no store error"))
                .collect::<Vec<String>>()
                .await
        })
    };
    let ta = consume(a, connect(&url, &ns).await);
    let tb = consume(b, connect(&url, &ns).await);
    let (a, b) = (ta.await.unwrap(), tb.await.unwrap());
    let accepted: Vec<String> = a.into_iter().chain(b).collect();
    assert_eq!(accepted.len(), keys.len(), "accepted twice or lost");
    let distinct: HashSet<&String> = accepted.iter().collect();
    assert_eq!(distinct.len(), keys.len());
    pg::delete_namespace(&url, pg::TABLE, &ns).await;
}

/// Two consumers with claims, committing what they process: each key processed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn two_consumers_with_claims_process_each_key_once() {
    let Some(url) = pg::url("two_consumers_with_claims_process_each_key_once") else {
        return;
    };
    let ns = pg::namespace("two-claims");
    let keys = uuid_keys(4_000, 4);
    let mut rng = StdRng::seed_from_u64(5);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for k in &keys {
        for _ in 0..rng.random_range(1..=2) {
            if rng.random_bool(0.5) { &mut a } else { &mut b }.push(k.clone());
        }
    }
    let consume = |part: Vec<String>, store: PostgresStore| {
        tokio::spawn(async move {
            let window = Window::max_keys(100)
                .ttl(TTL)
                .store(store)
                .batch_size(64)
                .timeout(Duration::from_secs(5))
                .on_failure(FailurePolicy::fail_closed());
            let mut claims = std::pin::pin!(stream::iter(part).claim_by_key(|k| k.clone(), window));
            let mut processed = Vec::new();
            while let Some(claim) = claims.next().await {
                processed.push(claim.commit().await.expect("commit"));
            }
            processed
        })
    };
    let ta = consume(a, connect(&url, &ns).await);
    let tb = consume(b, connect(&url, &ns).await);
    let (a, b) = (ta.await.unwrap(), tb.await.unwrap());
    // A copy held back while its key was in flight is not processed; the original was.
    let processed: Vec<String> = a.into_iter().chain(b).collect();
    let distinct: HashSet<&String> = processed.iter().collect();
    assert_eq!(distinct.len(), processed.len(), "a key was processed twice");
    assert_eq!(distinct.len(), keys.len(), "a key was never processed");
    pg::delete_namespace(&url, pg::TABLE, &ns).await;
}
