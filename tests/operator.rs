//! Behaviour of the operators: order, hooks, pending inner streams, sharing, fairness.

use std::collections::HashSet;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::stream::{self, FusedStream};
use futures::{Stream, StreamExt};
use stream_dedup::{DedupStreamExt, TryDedupStreamExt, Window};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

#[derive(Clone, Debug, PartialEq)]
struct Msg {
    key: String,
    delivery: u32,
}

fn msg(key: &str, delivery: u32) -> Msg {
    Msg {
        key: key.to_owned(),
        delivery,
    }
}

#[tokio::test]
async fn items_pass_unchanged_and_in_order() {
    let input = vec![
        msg("a", 1),
        msg("b", 1),
        msg("a", 2),
        msg("c", 1),
        msg("b", 2),
    ];
    let out: Vec<Msg> = stream::iter(input)
        .dedup_by_key(|m| m.key.clone(), Window::max_keys(10))
        .collect()
        .await;
    assert_eq!(out, [msg("a", 1), msg("b", 1), msg("c", 1)]);
}

#[tokio::test]
async fn on_duplicate_receives_every_dropped_item_in_order() {
    let input = vec![
        msg("a", 1),
        msg("a", 2),
        msg("b", 1),
        msg("a", 3),
        msg("b", 2),
    ];
    let mut acked = Vec::new();
    let unique = stream::iter(input)
        .dedup_by_key(|m| m.key.clone(), Window::max_keys(10))
        .on_duplicate(|m: Msg| acked.push((m.key, m.delivery)));
    let stats = unique.stats();
    let out: Vec<Msg> = unique.collect().await;
    assert_eq!(out, [msg("a", 1), msg("b", 1)]);
    assert_eq!(
        acked,
        [("a".into(), 2), ("a".into(), 3), ("b".into(), 2)] as [(String, u32); 3]
    );
    assert_eq!((stats.accepted(), stats.duplicates()), (2, 3));
}

#[tokio::test]
async fn try_variant_passes_errors_in_place() {
    let input: Vec<Result<u32, String>> = vec![
        Ok(1),
        Err("e1".into()),
        Ok(1),
        Ok(2),
        Err("e1".into()),
        Ok(2),
    ];
    let mut dropped = Vec::new();
    let out: Vec<_> = stream::iter(input)
        .try_dedup_by_key(|n| *n, Window::max_keys(10))
        .on_duplicate(|n| dropped.push(n))
        .collect()
        .await;
    assert_eq!(out, [Ok(1), Err("e1".into()), Ok(2), Err("e1".into())]);
    assert_eq!(dropped, [1, 2]);
}

/// An inner stream that is Pending between items (a channel fed by another task).
#[tokio::test]
async fn pending_inner_stream() {
    let (tx, rx) = mpsc::unbounded_channel();
    let producer = tokio::spawn(async move {
        for k in [1, 2, 1, 3, 3, 2, 4] {
            tx.send(k).unwrap();
            tokio::task::yield_now().await;
        }
    });
    let out: Vec<u32> = UnboundedReceiverStream::new(rx)
        .dedup_by_key(|k| *k, Window::max_keys(100))
        .collect()
        .await;
    producer.await.unwrap();
    assert_eq!(out, [1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn ttl_forgets_keys_after_first_acceptance() {
    let (tx, rx) = mpsc::unbounded_channel();
    let window = Window::max_keys(100).ttl(Duration::from_secs(10));
    let mut unique = pin!(UnboundedReceiverStream::new(rx).dedup_by_key(|k: &u32| *k, window));
    tx.send(1).unwrap();
    assert_eq!(unique.next().await, Some(1));
    tokio::time::advance(Duration::from_secs(9)).await;
    tx.send(1).unwrap();
    tx.send(2).unwrap();
    assert_eq!(unique.next().await, Some(2)); // 1 is still a duplicate; not extended
    tokio::time::advance(Duration::from_secs(1)).await;
    tx.send(1).unwrap();
    assert_eq!(unique.next().await, Some(1)); // 10 s after its first acceptance
}

/// A backlog (the inner stream never waits) on a paused clock that a test moves between items:
/// every item sees the move, however long the backlog.
#[tokio::test(start_paused = true)]
async fn paused_clock_moves_are_seen_inside_a_ready_backlog() {
    let window = Window::max_keys(10_000).ttl(Duration::from_secs(10));
    let backlog = (0..1_000u32).chain([0, 1]).chain(1_000..1_010);
    let mut unique = pin!(stream::iter(backlog).dedup_by_key(|k| *k, window));
    for k in 0..1_000 {
        assert_eq!(unique.next().await, Some(k));
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    // 0 and 1 ran out exactly now: accepted again.
    assert_eq!(unique.next().await, Some(0));
    assert_eq!(unique.next().await, Some(1));
    assert_eq!(unique.next().await, Some(1_000));
}

#[tokio::test(start_paused = true)]
async fn refresh_on_hit_extends_the_ttl() {
    let (tx, rx) = mpsc::unbounded_channel();
    let window = Window::max_keys(100)
        .ttl(Duration::from_secs(10))
        .refresh_on_hit(true);
    let mut unique = pin!(UnboundedReceiverStream::new(rx).dedup_by_key(|k: &u32| *k, window));
    tx.send(1).unwrap();
    assert_eq!(unique.next().await, Some(1));
    for marker in 100..105 {
        // A redelivery 9 s after the last sighting, then a new key to see it was processed.
        tokio::time::advance(Duration::from_secs(9)).await;
        tx.send(1).unwrap();
        tx.send(marker).unwrap();
        assert_eq!(unique.next().await, Some(marker));
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    tx.send(1).unwrap();
    assert_eq!(unique.next().await, Some(1));
}

/// Two partitions consumed by two tasks on two threads, one window: every key once overall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_window_across_tasks() {
    let window = Window::max_keys(100_000).shared::<u64>();
    let partition = |offset: u64| {
        // Each key appears in both partitions, several times.
        (0..20_000u64).map(move |i| (i * 7 + offset) % 10_000)
    };
    let a = tokio::spawn(
        stream::iter(partition(0))
            .dedup_by_key(|k| *k, window.clone())
            .collect::<Vec<_>>(),
    );
    let b = tokio::spawn(
        stream::iter(partition(3))
            .dedup_by_key(|k| *k, &window)
            .collect::<Vec<_>>(),
    );
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let mut all: Vec<u64> = a.into_iter().chain(b).collect();
    assert_eq!(all.len(), 10_000, "every key accepted exactly once");
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 10_000);
    let stats = window.stats().snapshot();
    assert_eq!((stats.accepted, stats.duplicates), (10_000, 30_000));
}

/// A long run of duplicates from an always-ready stream yields to the other tasks.
#[tokio::test(flavor = "current_thread")]
async fn long_duplicate_runs_do_not_starve_the_executor() {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    tokio::spawn(async move { seen.store(true, Ordering::SeqCst) });
    let mut observed_during_run = false;
    // 1 once, then a million repeats of it, then 2: the operator must yield in between.
    let input = stream::iter(std::iter::once(1u32).chain(std::iter::repeat_n(1, 1_000_000)))
        .chain(stream::iter([2]))
        .inspect(|_| observed_during_run |= flag.load(Ordering::SeqCst));
    let out: Vec<u32> = input
        .dedup_by_key(|k| *k, Window::max_keys(10))
        .collect()
        .await;
    assert_eq!(out, [1, 2]);
    assert!(
        observed_during_run,
        "the spawned task never ran while duplicates were skipped"
    );
}

#[tokio::test]
async fn fused_and_size_hint_and_access() {
    let inner = stream::iter([1, 1, 2]).fuse();
    let mut unique = inner.dedup_by_key(|k| *k, Window::max_keys(4));
    assert_eq!(unique.size_hint(), (0, Some(3)));
    assert_eq!(unique.get_ref().size_hint(), (3, Some(3)));
    assert!(!unique.is_terminated());
    assert_eq!(unique.next().await, Some(1));
    assert_eq!(unique.next().await, Some(2));
    assert_eq!(unique.next().await, None);
    assert!(unique.is_terminated());
    assert_eq!(unique.next().await, None);
    let _inner = unique.get_mut();
    let _inner = unique.into_inner();
}

#[test]
fn debug_skips_closures() {
    let unique = stream::iter([1]).dedup_by_key(|k| *k, Window::max_keys(4));
    let s = format!("{unique:?}");
    assert!(s.starts_with("DedupByKey"), "{s}");
    assert!(s.contains("accepted: 0"), "{s}");
}

#[test]
#[should_panic(expected = "at least one key")]
fn zero_capacity_is_refused() {
    let _ = Window::max_keys(0);
}

#[test]
#[should_panic(expected = "at least 1 ms")]
fn sub_millisecond_ttl_is_refused() {
    let _ = Window::max_keys(1).ttl(Duration::from_micros(10));
}

/// The window also works on its own, on any executor, and with keys that borrow.
#[test]
fn works_without_a_tokio_runtime() {
    let words = ["a", "b", "a"];
    let out: Vec<&str> = futures::executor::block_on(
        stream::iter(words.iter().copied())
            .dedup_by_key(|w| *w, Window::max_keys(2).ttl(Duration::from_secs(1)))
            .collect(),
    );
    assert_eq!(out, ["a", "b"]);
    let mut set = Window::max_keys(2).build::<&str>();
    assert!(set.insert("x") && !set.insert("x"));
    assert!(set.contains(&"x") && set.remove(&"x") && set.is_empty());
    let _: HashSet<&str> = out.into_iter().collect();
}
