//! The operators with [`EmbeddedStore`], end to end across a restart: 100,000 distinct keys
//! through `dedup_by_key` (and through `claim_by_key` + `commit`), everything dropped, the
//! same directory opened again, all 100,000 replayed: not one accepted (claimed) twice.
//!
//! Each run of the operator gets a tokio runtime of its own, dropped after it, so that no
//! background task (the claims' committer) keeps the store open: the test then opens the
//! directory with fjall itself, which only succeeds once this process has really closed it
//! (fjall locks its directory against this process too), as a new process would find it.
#![cfg(feature = "embedded")]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};
use stream_dedup::store::EmbeddedStore;
use stream_dedup::{DedupStreamExt, StatsSnapshot, StoreWindow, Window};

const KEYS: u64 = 100_000;
const TTL: Duration = Duration::from_secs(600);

/// 36-byte keys, like UUIDs in text (distinct by construction).
fn keys() -> Vec<String> {
    (0..KEYS)
        .map(|i| {
            let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            format!(
                "{:08x}-{:04x}-4{:03x}-8000-{:012x}",
                h >> 32,
                (h >> 16) & 0xffff,
                h & 0xfff,
                i
            )
        })
        .collect()
}

/// A small window in front, so that the store decides almost every item; a generous timeout
/// (a durable commit per batch on a busy machine), so that nothing passes unchecked.
fn window(store: EmbeddedStore) -> StoreWindow<EmbeddedStore> {
    Window::max_keys(1_000)
        .ttl(TTL)
        .store(store)
        .batch_size(1_000)
        .timeout(Duration::from_secs(30))
}

/// Runs `f` on a runtime of its own, then drops the runtime (and every task left on it).
fn in_runtime<T>(f: impl AsyncFnOnce() -> T) -> T {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let out = rt.block_on(f());
    drop(rt);
    out
}

/// Asserts that nothing in this process still has the store at `path` open.
fn assert_closed(path: &Path) {
    match fjall::Database::builder(path).open() {
        Ok(db) => drop(db),
        Err(e) => panic!("the store is still open in this process: {e}"),
    }
}

#[test]
fn dedup_by_key_remembers_every_key_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let keys = keys();

    let first: StatsSnapshot = in_runtime(async || {
        let store = EmbeddedStore::open(&path, "restart").unwrap();
        let unique = stream::iter(keys.clone()).dedup_by_key(|k| k.clone(), window(store));
        let stats = unique.stats();
        assert_eq!(unique.count().await, KEYS as usize);
        stats.snapshot()
    });
    assert_eq!((first.accepted, first.duplicates), (KEYS, 0));
    assert_eq!((first.unchecked, first.store_errors), (0, 0), "{first:?}");
    assert_closed(&path);

    // A new process: same directory, every key again.
    let dropped = Arc::new(AtomicU64::new(0));
    let replay: StatsSnapshot = in_runtime(async || {
        let store = EmbeddedStore::open(&path, "restart").unwrap();
        let counter = Arc::clone(&dropped);
        let unique = stream::iter(keys.clone())
            .dedup_by_key(|k| k.clone(), window(store))
            .on_duplicate(move |_| {
                counter.fetch_add(1, Ordering::Relaxed);
            });
        let stats = unique.stats();
        assert_eq!(unique.count().await, 0, "a key was accepted twice");
        stats.snapshot()
    });
    assert_eq!(dropped.load(Ordering::Relaxed), KEYS);
    assert_eq!(
        (replay.accepted, replay.duplicates),
        (0, KEYS),
        "{replay:?}"
    );
    assert_eq!(
        (replay.unchecked, replay.store_errors),
        (0, 0),
        "{replay:?}"
    );
}

#[test]
fn claim_by_key_remembers_every_commit_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let keys = keys();

    let first: StatsSnapshot = in_runtime(async || {
        let store = EmbeddedStore::open(&path, "claims").unwrap();
        let claims = stream::iter(keys.clone()).claim_by_key(|k| k.clone(), window(store));
        let stats = claims.stats();
        // A consumer that processes up to 1,000 messages at once and commits each.
        let committed = claims
            .map(|claim| async move { claim.commit().await.expect("commit") })
            .buffer_unordered(1_000)
            .count()
            .await;
        assert_eq!(committed, KEYS as usize);
        stats.snapshot()
    });
    assert_eq!((first.accepted, first.committed), (KEYS, KEYS), "{first:?}");
    assert_eq!((first.unchecked, first.store_errors), (0, 0), "{first:?}");
    assert_closed(&path);

    let dropped = Arc::new(AtomicU64::new(0));
    let replay: StatsSnapshot = in_runtime(async || {
        let store = EmbeddedStore::open(&path, "claims").unwrap();
        let counter = Arc::clone(&dropped);
        let claims = stream::iter(keys.clone())
            .claim_by_key(|k| k.clone(), window(store))
            .on_duplicate(move |_| {
                counter.fetch_add(1, Ordering::Relaxed);
            });
        let stats = claims.stats();
        let claimed: Vec<_> = claims.collect().await;
        assert_eq!(claimed.len(), 0, "a committed key was claimed again");
        stats.snapshot()
    });
    assert_eq!(dropped.load(Ordering::Relaxed), KEYS);
    assert_eq!(
        (replay.duplicates, replay.held_back, replay.accepted),
        (KEYS, 0, 0),
        "{replay:?}"
    );
    assert_eq!(
        (replay.unchecked, replay.store_errors),
        (0, 0),
        "{replay:?}"
    );
}
