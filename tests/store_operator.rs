//! The operators with a store behind the window: batching, order, and every failure path.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{StreamExt, stream};
use proptest::prelude::*;
use stream_dedup::store::{
    HeldKey, InsertBatch, Inserted, MemoryStore, Store, StoreError, StoreFuture,
};
use stream_dedup::{DedupStreamExt, FailurePolicy, TryDedupStreamExt, Window};
use support::faulty::{FaultyStore, Mode};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const TTL: Duration = Duration::from_secs(3600);

fn window() -> Window {
    Window::max_keys(10_000).ttl(TTL)
}

/// The next item, or a panic if none comes within a minute of (paused) time: a test that
/// waits for an item that was wrongly dropped fails instead of hanging.
async fn next<S: futures::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    tokio::time::timeout(Duration::from_secs(60), s.next())
        .await
        .expect("no item within 60 s: was it dropped?")
}

#[tokio::test]
async fn consumers_with_their_own_windows_agree_through_the_store() {
    let store = MemoryStore::new();
    let mut all = Vec::new();
    for part in [[1u64, 2, 3, 2], [3, 4, 1, 5], [5, 6, 6, 2]] {
        let out: Vec<u64> = stream::iter(part)
            .dedup_by_key(|k| *k, window().store(store.clone()))
            .collect()
            .await;
        all.extend(out);
    }
    assert_eq!(all, [1, 2, 3, 4, 5, 6]);
}

/// Copies of a key in one batch and across batches in flight count once; items come out in
/// input order though calls finish out of order.
#[tokio::test(start_paused = true)]
async fn copies_in_flight_count_once_and_order_holds() {
    let store = FaultyStore::new();
    store.set(Mode::Slow(Duration::from_millis(50)));
    let (tx, rx) = mpsc::unbounded_channel();
    let unique = UnboundedReceiverStream::new(rx).dedup_by_key(
        |k: &u32| *k,
        window()
            .store(store.clone())
            .batch_size(4)
            .max_in_flight(3)
            .timeout(Duration::from_secs(1)),
    );
    let stats = unique.stats();
    let consumer = tokio::spawn(unique.collect::<Vec<u32>>());
    // Three batches of four, sent while the earlier ones are still in flight.
    for chunk in [[1, 2, 1, 3], [2, 4, 4, 1], [5, 3, 6, 5]] {
        for k in chunk {
            tx.send(k).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(tx);
    let out = consumer.await.unwrap();
    assert_eq!(out, [1, 2, 3, 4, 5, 6]);
    let s = stats.snapshot();
    assert_eq!((s.accepted, s.duplicates, s.unchecked), (6, 6, 0));
    // One call per batch with new keys; the copies never reached the store.
    assert_eq!(store.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn fail_open_passes_everything_and_counts_it() {
    let store = FaultyStore::new();
    store.set(Mode::Down);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut acked = Vec::new();
    let mut unique = Box::pin(
        UnboundedReceiverStream::new(rx)
            .dedup_by_key(|k: &u32| *k, window().store(store.clone()))
            .on_duplicate(|k| acked.push(k)),
    );
    for k in [1, 2] {
        tx.send(k).unwrap();
    }
    assert_eq!(next(&mut unique).await, Some(1));
    assert_eq!(next(&mut unique).await, Some(2));
    // The store comes back: keys the window knows are still dropped, new ones checked.
    store.set(Mode::Up);
    for k in [1, 3, 3] {
        tx.send(k).unwrap();
    }
    drop(tx);
    assert_eq!(next(&mut unique).await, Some(3));
    assert_eq!(next(&mut unique).await, None);
    let s = unique.stats().snapshot();
    assert_eq!(
        (s.unchecked, s.store_errors, s.accepted, s.duplicates),
        (2, 1, 1, 2)
    );
    drop(unique);
    assert_eq!(acked, [1, 3]);
}

#[derive(Debug, PartialEq)]
enum AppError {
    Store(String),
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::Store(e.to_string())
    }
}

#[tokio::test(start_paused = true)]
async fn fail_closed_yields_the_error_and_forgets_the_key() {
    let store = FaultyStore::new();
    store.set(Mode::Down);
    let (tx, rx) = mpsc::unbounded_channel::<Result<u32, AppError>>();
    let window = window()
        .store(store.clone())
        .on_failure(FailurePolicy::fail_closed());
    let mut unique = Box::pin(UnboundedReceiverStream::new(rx).try_dedup_by_key(|k| *k, window));
    tx.send(Ok(1)).unwrap();
    let err = next(&mut unique).await.unwrap().unwrap_err();
    assert_eq!(
        err,
        AppError::Store("the store is unavailable: connection refused (test)".into())
    );
    // The broker redelivers 1 once the store is back: it is processed, not dropped.
    store.set(Mode::Up);
    tx.send(Ok(1)).unwrap();
    assert_eq!(next(&mut unique).await, Some(Ok(1)));
    tx.send(Ok(1)).unwrap();
    tx.send(Err(AppError::Store("upstream".into()))).unwrap();
    assert_eq!(
        next(&mut unique).await,
        Some(Err(AppError::Store("upstream".into())))
    );
    assert_eq!(unique.stats().store_errors(), 1);
}

#[tokio::test(start_paused = true)]
async fn fail_closed_on_a_plain_stream_ends_it_and_keeps_the_error() {
    let store = FaultyStore::new();
    store.set(Mode::Down);
    let window = window()
        .store(store)
        .on_failure(FailurePolicy::fail_closed());
    let mut unique = stream::iter([1u32, 2, 3]).dedup_by_key(|k| *k, window);
    assert_eq!(next(&mut unique).await, None);
    assert!(matches!(
        unique.store_error(),
        Some(StoreError::Unavailable(_))
    ));
    assert_eq!(next(&mut unique).await, None);
}

/// A hung store: the call times out after the configured timeout and the policy applies.
#[tokio::test(start_paused = true)]
async fn a_hung_store_times_out() {
    let store = FaultyStore::new();
    store.set(Mode::Hang);
    let window = window()
        .store(store.clone())
        .timeout(Duration::from_millis(200));
    let start = tokio::time::Instant::now();
    let out: Vec<u32> = stream::iter([1, 2])
        .dedup_by_key(|k| *k, window)
        .collect()
        .await;
    assert_eq!(out, [1, 2]);
    assert_eq!(start.elapsed(), Duration::from_millis(200));
}

/// The call was applied but its answer was lost: the retry carries the same token, and the
/// store recognises the keys as ours, so they are accepted, not dropped as duplicates.
#[tokio::test(start_paused = true)]
async fn retry_after_an_applied_timeout_is_not_a_false_duplicate() {
    let store = FaultyStore::new();
    store.set(Mode::ApplyThenHang);
    let window = window()
        .store(store.clone())
        .timeout(Duration::from_millis(100))
        .on_failure(FailurePolicy::fail_closed().retry(3, Duration::from_millis(50)));
    let (tx, rx) = mpsc::unbounded_channel::<Result<u32, AppError>>();
    let mut unique = Box::pin(UnboundedReceiverStream::new(rx).try_dedup_by_key(|k| *k, window));
    tx.send(Ok(7)).unwrap();
    tx.send(Ok(8)).unwrap();
    let flip = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(120)).await;
            store.set(Mode::Up);
        })
    };
    assert_eq!(next(&mut unique).await, Some(Ok(7)));
    assert_eq!(next(&mut unique).await, Some(Ok(8)));
    flip.await.unwrap();
    let tokens = store.tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), 2, "one call and one retry");
    assert_eq!(tokens[0], tokens[1], "the retry must carry the same token");
    assert_eq!(unique.stats().store_errors(), 0);
}

#[tokio::test(start_paused = true)]
async fn retries_give_up_then_fall_back() {
    let store = FaultyStore::new();
    store.set(Mode::Down);
    let window = window()
        .store(store.clone())
        .on_failure(FailurePolicy::fail_open().retry(2, Duration::from_millis(10)));
    let out: Vec<u32> = stream::iter([1])
        .dedup_by_key(|k| *k, window)
        .collect()
        .await;
    assert_eq!(out, [1]);
    assert_eq!(store.calls(), 3);
}

/// A key longer than the limit is not sent; its item gets the policy, its batch goes on.
#[tokio::test]
async fn a_key_too_long_gets_the_policy_alone() {
    let store = FaultyStore::new();
    let long = "x".repeat(100);
    let items = vec![long.clone(), "a".to_owned(), long.clone(), "a".to_owned()];

    let open = window().store(store.clone()).max_key_len(10);
    let unique = stream::iter(items.clone()).dedup_by_key(|s| s.clone(), open);
    let stats = unique.stats();
    let out: Vec<String> = unique.collect().await;
    assert_eq!(out, [long.clone(), "a".to_owned()]);
    assert_eq!((stats.unchecked(), stats.duplicates()), (1, 2));

    let closed = window()
        .store(FaultyStore::new())
        .max_key_len(10)
        .on_failure(FailurePolicy::fail_closed());
    let out: Vec<Result<String, AppError>> = stream::iter(items.into_iter().map(Ok))
        .try_dedup_by_key(|s| s.clone(), closed)
        .collect()
        .await;
    let too_long = "a key of 100 bytes is longer than the store's limit of 10 bytes";
    assert_eq!(
        out,
        [
            Err(AppError::Store(too_long.into())),
            Ok("a".to_owned()),
            Err(AppError::Store(too_long.into())),
        ]
    );
}

/// A store must know when to forget a key: a window without a ttl gets the documented default,
/// in memory and in the store.
#[tokio::test(start_paused = true)]
async fn a_store_window_without_a_ttl_gets_the_default() {
    let store = MemoryStore::new();
    let window = Window::max_keys(10).store(store.clone());
    assert_eq!(
        window.window().policy().ttl(),
        Some(stream_dedup::DEFAULT_STORE_TTL)
    );
    let out: Vec<u8> = stream::iter([1u8, 1])
        .dedup_by_key(|k| *k, window)
        .collect()
        .await;
    assert_eq!(out, [1]);
    // Remembered in the store until the default ttl runs out, then forgotten.
    let again = || Window::max_keys(10).store(store.clone());
    let out: Vec<u8> = stream::iter([1u8])
        .dedup_by_key(|k| *k, again())
        .collect()
        .await;
    assert!(out.is_empty());
    tokio::time::advance(stream_dedup::DEFAULT_STORE_TTL + Duration::from_millis(1)).await;
    let out: Vec<u8> = stream::iter([1u8])
        .dedup_by_key(|k| *k, again())
        .collect()
        .await;
    assert_eq!(out, [1]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random keys through several consumers sharing a store, each with small windows, random
    /// batch sizes and store latencies: every key accepted exactly once overall, each
    /// consumer's output in its input order, nothing lost (accepted + dropped = input).
    #[test]
    fn store_path_is_exactly_once(
        parts in prop::collection::vec(prop::collection::vec(0u16..60, 0..80), 1..4),
        cap in 1usize..20,
        batch in 1usize..10,
        in_flight in 1usize..4,
        delay_ms in 0u64..5,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        let (outs, dropped) = rt.block_on(async {
            let store = FaultyStore::new();
            store.set(Mode::Slow(Duration::from_millis(delay_ms)));
            let tasks: Vec<_> = parts.iter().cloned().map(|part| {
                let window = Window::max_keys(cap).ttl(TTL).store(store.clone())
                    .batch_size(batch).max_in_flight(in_flight).timeout(Duration::from_secs(5));
                tokio::spawn(async move {
                    let mut dropped = 0usize;
                    let out: Vec<(usize, u16)> = stream::iter(part.into_iter().enumerate())
                        .dedup_by_key(|&(_, k)| k, window)
                        .on_duplicate(|_| dropped += 1)
                        .collect()
                        .await;
                    (out, dropped)
                })
            }).collect();
            let mut outs = Vec::new();
            let mut dropped = 0;
            for t in tasks {
                let (o, d) = t.await.unwrap();
                outs.push(o);
                dropped += d;
            }
            (outs, dropped)
        });
        let mut keys: Vec<u16> = outs.iter().flatten().map(|&(_, k)| k).collect();
        let total: usize = parts.iter().map(Vec::len).sum();
        prop_assert_eq!(keys.len() + dropped, total);
        for o in &outs {
            prop_assert!(o.windows(2).all(|w| w[0].0 < w[1].0), "out of order: {:?}", o);
        }
        let distinct: std::collections::BTreeSet<u16> = parts.iter().flatten().copied().collect();
        keys.sort_unstable();
        prop_assert_eq!(keys, distinct.into_iter().collect::<Vec<_>>());
    }
}

/// A store whose calls answer after `delay` and count how often they are polled.
#[derive(Clone, Debug)]
struct PollCounting {
    inner: MemoryStore,
    delay: Duration,
    polls: Arc<AtomicUsize>,
}

/// Counts the polls of the future it wraps.
struct Counted<F> {
    inner: Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.inner.as_mut().poll(cx)
    }
}

impl Store for PollCounting {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        let (inner, delay) = (self.inner.clone(), self.delay);
        Box::pin(Counted {
            inner: Box::pin(async move {
                tokio::time::sleep(delay).await;
                inner.insert(batch).await
            }),
            polls: Arc::clone(&self.polls),
        })
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        self.inner.remove(keys)
    }

    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        self.inner.take_back(keys)
    }
}

/// Polling the operator while its store call is out does not poll the call again: the call is
/// polled when it starts and when it wakes the operator. (A consumer that polls the operator
/// once per finished task, as `buffer_unordered` does, used to poll every call in flight each
/// time.)
#[tokio::test(start_paused = true)]
async fn a_call_in_flight_is_polled_only_when_it_wakes_the_operator() {
    let store = PollCounting {
        inner: MemoryStore::new(),
        delay: Duration::from_millis(10),
        polls: Arc::default(),
    };
    let mut out = stream::iter([1u64, 2, 1]).dedup_by_key(|k| *k, window().store(store.clone()));
    for _ in 0..1_000 {
        assert!(futures::poll!(out.next()).is_pending());
    }
    assert_eq!(store.polls.load(Ordering::SeqCst), 1);
    assert_eq!(next(&mut out).await, Some(1));
    assert_eq!(next(&mut out).await, Some(2));
    assert_eq!(next(&mut out).await, None);
    // Started, then woken once by its timer.
    assert_eq!(store.polls.load(Ordering::SeqCst), 2);
}

/// The operator polled once with a waker that does nothing, then awaited: the call's wake-up
/// reaches the new waker.
#[tokio::test(start_paused = true)]
async fn a_call_wakes_the_latest_waker() {
    let store = PollCounting {
        inner: MemoryStore::new(),
        delay: Duration::from_millis(10),
        polls: Arc::default(),
    };
    let mut out = stream::iter([1u64]).dedup_by_key(|k| *k, window().store(store));
    let mut noop = Context::from_waker(futures::task::noop_waker_ref());
    assert!(out.poll_next_unpin(&mut noop).is_pending());
    let start = tokio::time::Instant::now();
    assert_eq!(next(&mut out).await, Some(1));
    // At the call's answer, not at `next`'s 60 s limit (which polls once more before it fails).
    assert_eq!(start.elapsed(), Duration::from_millis(10));
    assert_eq!(next(&mut out).await, None);
}

/// A store that answers each call from a thread of its own.
#[derive(Clone, Debug)]
struct Threaded(MemoryStore);

impl Store for Threaded {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        let inner = self.0.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(200));
            let _ = tx.send(futures::executor::block_on(inner.insert(batch)));
        });
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError::unavailable("the thread is gone")))
        })
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        self.0.remove(keys)
    }

    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        self.0.take_back(keys)
    }
}

/// Calls answered on other threads, many in flight, on a multi-threaded runtime: no wake-up is
/// lost and every key is decided once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_answered_on_other_threads_wake_the_operator() {
    let window = window()
        .store(Threaded(MemoryStore::new()))
        .batch_size(50)
        .max_in_flight(8)
        .timeout(Duration::from_secs(30));
    let out: Vec<u64> = tokio::time::timeout(
        Duration::from_secs(60),
        stream::iter(0..5_000u64)
            .map(|i| i % 3_000)
            .dedup_by_key(|k| *k, window)
            .collect(),
    )
    .await
    .expect("the operator stalled: a lost wake-up?");
    assert_eq!(out, (0..3_000).collect::<Vec<_>>());
}
