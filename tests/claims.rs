//! Claims: keys marked only on commit, held back while in flight, freed on drop.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use proptest::prelude::*;
use stream_dedup::store::{MemoryStore, StoreError};
use stream_dedup::{Claim, DedupStreamExt, FailurePolicy, TryDedupStreamExt, Window};
use support::faulty::{FaultyStore, Mode};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const TTL: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, Debug)]
enum Op {
    /// A delivery of this key.
    Deliver(u8),
    /// Settle the open claim at this index (modulo the open claims): commit, release or drop.
    Settle(usize, Settle),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Settle {
    Commit,
    Release,
    Drop,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Fate {
    Claimed,
    Duplicate,
    HeldBack,
}

/// The specification: per key, free, in flight or done.
#[derive(Default)]
struct Model {
    in_flight: HashMap<u8, ()>,
    done: HashMap<u8, ()>,
}

impl Model {
    fn deliver(&mut self, key: u8) -> Fate {
        if self.in_flight.contains_key(&key) {
            Fate::HeldBack
        } else if self.done.contains_key(&key) {
            Fate::Duplicate
        } else {
            self.in_flight.insert(key, ());
            Fate::Claimed
        }
    }

    fn settle(&mut self, key: u8, how: Settle) {
        self.in_flight.remove(&key);
        if how == Settle::Commit {
            self.done.insert(key, ());
        }
    }
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        3 => (0u8..10).prop_map(Op::Deliver),
        2 => (any::<usize>(), prop_oneof![Just(Settle::Commit), Just(Settle::Release), Just(Settle::Drop)])
            .prop_map(|(i, s)| Op::Settle(i, s)),
    ];
    prop::collection::vec(op, 0..120)
}

async fn run_ops(ops: &[Op], store: Option<MemoryStore>) -> (Vec<Fate>, Vec<Fate>) {
    let (tx, rx) = mpsc::unbounded_channel::<u8>();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (dups, held) = (log.clone(), log.clone());
    let window = Window::max_keys(1_000).ttl(TTL);
    let input = UnboundedReceiverStream::new(rx);
    let mut claims: std::pin::Pin<Box<dyn futures::Stream<Item = Claim<u8>> + Send>> = match store {
        None => Box::pin(
            input
                .claim_by_key(|k| *k, window)
                .on_duplicate(move |_| dups.lock().unwrap().push(Fate::Duplicate))
                .on_held_back(move |_| held.lock().unwrap().push(Fate::HeldBack)),
        ),
        Some(store) => Box::pin(
            input
                .claim_by_key(|k| *k, window.store(store).batch_size(1))
                .on_duplicate(move |_| dups.lock().unwrap().push(Fate::Duplicate))
                .on_held_back(move |_| held.lock().unwrap().push(Fate::HeldBack)),
        ),
    };
    let mut model = Model::default();
    let mut expected = Vec::new();
    let mut open: Vec<Claim<u8>> = Vec::new();
    for op in ops {
        match *op {
            Op::Deliver(key) => {
                expected.push(model.deliver(key));
                tx.send(key).unwrap();
                // Poll once: the item's fate is decided within the poll.
                if let Some(Some(claim)) = claims.next().now_or_never() {
                    assert_eq!(*claim, key);
                    log.lock().unwrap().push(Fate::Claimed);
                    open.push(claim);
                }
            }
            Op::Settle(i, how) if !open.is_empty() => {
                let claim = open.remove(i % open.len());
                let key = *claim;
                model.settle(key, how);
                match how {
                    Settle::Commit => assert_eq!(claim.commit().await.expect("commit"), key),
                    Settle::Release => assert_eq!(claim.release(), key),
                    Settle::Drop => drop(claim),
                }
                // A store's release goes out in the background: let it (paused time).
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Op::Settle(..) => {}
        }
    }
    let got = log.lock().unwrap().clone();
    (got, expected)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Random deliveries with random commits, releases and drops, against the model, for the
    /// in-memory window and for the store path.
    #[test]
    fn claims_match_model(ops in ops(), with_store in any::<bool>()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        let store = with_store.then(MemoryStore::new);
        let (got, expected) = rt.block_on(run_ops(&ops, store));
        prop_assert_eq!(got, expected);
    }
}

/// A claim whose lease ran out loses its key to the next copy. Committed late, it is refused;
/// dropped, it frees nothing (the other claim still holds the key). Either way it counts as
/// released, whoever holds the key now.
#[tokio::test(start_paused = true)]
async fn an_expired_lease_frees_the_key_and_the_late_claim_cannot_take_it_back() {
    for commit_late in [true, false] {
        let (tx, rx) = mpsc::unbounded_channel();
        let window = Window::max_keys(100).lease(Duration::from_secs(5));
        let mut claims = UnboundedReceiverStream::new(rx).claim_by_key(|k: &u32| *k, window);
        tx.send(1).unwrap();
        let slow = claims.next().await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        tx.send(1).unwrap();
        let again = claims.next().await.unwrap(); // the lease ran out: processed again
        if commit_late {
            assert!(matches!(
                slow.commit().await.map_err(|e| e.into_parts().1),
                Err(StoreError::LeaseLost)
            ));
        } else {
            drop(slow);
            // The second claim still holds the key: a copy is held back, not processed.
            tx.send(1).unwrap();
            let mut next = claims.next();
            assert!(futures::poll!(&mut next).is_pending());
            assert_eq!(claims.stats().held_back(), 1);
        }
        assert_eq!(claims.stats().released(), 1);
        again.commit().await.unwrap();
        tx.send(1).unwrap();
        drop(tx);
        assert!(claims.next().await.is_none());
        assert_eq!(claims.stats().duplicates(), 1);
        assert_eq!(claims.stats().committed(), 1);
    }
}

/// A handler that panics drops its claim while unwinding: the key is free again.
#[tokio::test]
async fn a_panicking_handler_releases_its_claim() {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut claims =
        UnboundedReceiverStream::new(rx).claim_by_key(|k: &u32| *k, Window::max_keys(100));
    tx.send(7).unwrap();
    let claim = claims.next().await.unwrap();
    let handler = tokio::spawn(async move {
        let _claim = claim;
        panic!("handler failed");
    });
    assert!(handler.await.is_err());
    tx.send(7).unwrap();
    let retry = claims.next().await.unwrap();
    assert_eq!(*retry, 7);
    assert_eq!(claims.stats().released(), 1);
}

/// Two consumers share a store: while one holds a key, the other's copy is held back (not a
/// duplicate, not acked); after the commit it is a duplicate; after a release it is processed.
#[tokio::test]
async fn consumers_share_claims_through_the_store() {
    let store = MemoryStore::new();
    let window = || Window::max_keys(100).ttl(TTL).store(store.clone());
    let (tx_a, rx_a) = mpsc::unbounded_channel();
    let (tx_b, rx_b) = mpsc::unbounded_channel();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let held = Arc::new(Mutex::new(Vec::new()));
    let mut a = UnboundedReceiverStream::new(rx_a).claim_by_key(|k: &u32| *k, window());
    let (acked_b, held_b) = (acked.clone(), held.clone());
    let mut b = UnboundedReceiverStream::new(rx_b)
        .claim_by_key(|k: &u32| *k, window())
        .on_duplicate(move |k| acked_b.lock().unwrap().push(k))
        .on_held_back(move |k| held_b.lock().unwrap().push(k));

    tx_a.send(1).unwrap();
    tx_a.send(2).unwrap();
    let one = a.next().await.unwrap();
    let two = a.next().await.unwrap();
    tx_b.send(1).unwrap();
    tx_b.send(2).unwrap();
    tx_b.send(3).unwrap();
    assert_eq!(*b.next().await.unwrap(), 3);
    assert_eq!(*held.lock().unwrap(), [1, 2]);

    one.commit().await.unwrap();
    two.release();
    tokio::task::yield_now().await; // the release goes out in the background
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx_b.send(1).unwrap();
    tx_b.send(2).unwrap();
    let two_again = b.next().await.unwrap();
    assert_eq!(*two_again, 2);
    assert_eq!(*acked.lock().unwrap(), [1]);
    two_again.commit().await.unwrap();
    let s = b.stats().snapshot();
    assert_eq!(
        (s.accepted, s.duplicates, s.held_back, s.committed),
        (2, 1, 2, 1)
    );
}

/// A consumer task aborted with claims open: its keys are released, and another consumer
/// processes the redeliveries.
#[tokio::test]
async fn an_aborted_consumer_releases_its_open_claims() {
    let store = MemoryStore::new();
    let window = || Window::max_keys(100).ttl(TTL).store(store.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let w = window();
    let victim = tokio::spawn(async move {
        let mut claims = UnboundedReceiverStream::new(rx).claim_by_key(|k: &u32| *k, w);
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(claims.next().await.unwrap());
        }
        let _ = started_tx.send(());
        std::future::pending::<()>().await; // "processing" forever
    });
    for k in [1, 2, 3] {
        tx.send(k).unwrap();
    }
    started.await.unwrap();
    victim.abort();
    assert!(victim.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_millis(50)).await; // releases go out in the background
    let out: Vec<u32> = futures::stream::iter([1, 2, 3])
        .claim_by_key(|k| *k, window())
        .then(|c| async move {
            let k = *c;
            c.commit().await.unwrap();
            k
        })
        .collect()
        .await;
    assert_eq!(out, [1, 2, 3]);
}

#[derive(Debug, PartialEq)]
struct AppError(String);

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError(e.to_string())
    }
}

/// Fail open with claims: the claim is handed out unchecked and committed once the store is
/// back. Fail closed: the error is yielded and the key stays free.
#[tokio::test(start_paused = true)]
async fn claims_under_store_failures() {
    let store = FaultyStore::new();
    store.set(Mode::Down);
    let (tx, rx) = mpsc::unbounded_channel::<Result<u32, AppError>>();
    let mut open = UnboundedReceiverStream::new(rx)
        .try_claim_by_key(|k| *k, Window::max_keys(100).ttl(TTL).store(store.clone()));
    tx.send(Ok(1)).unwrap();
    let claim = open.next().await.unwrap().unwrap();
    assert_eq!(open.stats().unchecked(), 1);
    store.set(Mode::Up);
    claim.commit().await.unwrap();
    tx.send(Ok(1)).unwrap();
    tx.send(Ok(2)).unwrap();
    assert_eq!(*open.next().await.unwrap().unwrap(), 2);

    store.set(Mode::Down);
    let (tx, rx) = mpsc::unbounded_channel::<Result<u32, AppError>>();
    let window = Window::max_keys(100)
        .ttl(TTL)
        .store(store.clone())
        .on_failure(FailurePolicy::fail_closed());
    let mut closed = UnboundedReceiverStream::new(rx).try_claim_by_key(|k| *k, window);
    tx.send(Ok(5)).unwrap();
    assert_eq!(
        closed.next().await.unwrap().unwrap_err(),
        AppError("the store is unavailable: connection refused (test)".into())
    );
    store.set(Mode::Up);
    tx.send(Ok(5)).unwrap();
    assert_eq!(*closed.next().await.unwrap().unwrap(), 5);
}

/// A commit the store fails (it went down between the claim and the commit, or it is too
/// slow) returns the store's error; the key is freed here and counted released, never
/// committed. Down: the store's copy cannot be released either, so it stays in flight until
/// its lease runs out, and the broker's redelivery after that is processed. Slow: the commit
/// may still be applied late (a timeout is not a refusal), so the redelivery is processed or,
/// once the late commit landed, a duplicate: never lost.
#[tokio::test(start_paused = true)]
async fn a_commit_the_store_fails_frees_the_key() {
    let lease = Duration::from_secs(30);
    for fault in [Mode::Down, Mode::Slow(Duration::from_secs(5))] {
        let store = FaultyStore::new();
        let (tx, rx) = mpsc::unbounded_channel::<u32>();
        let window = Window::max_keys(100)
            .ttl(TTL)
            .lease(lease)
            .store(store.clone())
            .timeout(Duration::from_secs(1));
        let dropped = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&dropped);
        let mut claims = UnboundedReceiverStream::new(rx)
            .claim_by_key(|k| *k, window)
            .on_duplicate(move |k| seen.lock().unwrap().push(k));
        tx.send(7).unwrap();
        let claim = claims.next().await.unwrap();
        store.set(fault);
        let err = claim.commit().await.unwrap_err();
        // The error gives the item back, to nack it.
        assert_eq!(*err.item(), 7);
        let err = err.into_parts().1;
        assert!(
            matches!(err, StoreError::Unavailable(_) | StoreError::Timeout(_)),
            "{fault:?}: {err:?}"
        );
        assert_eq!(
            (claims.stats().committed(), claims.stats().released()),
            (0, 1),
            "{fault:?}"
        );
        store.set(Mode::Up);
        tokio::time::sleep(lease + Duration::from_secs(10)).await;
        tx.send(7).unwrap();
        tx.send(8).unwrap();
        let next = claims.next().await.unwrap();
        let processed = *next == 7;
        assert!(
            processed || dropped.lock().unwrap().as_slice() == [7],
            "{fault:?}: the redelivery is processed or a duplicate"
        );
        if fault == Mode::Down {
            assert!(
                processed,
                "nothing was committed: the redelivery is processed"
            );
        }
    }
}

/// `commit()` sends nothing until it is polled: dropped unpolled, it releases the key as
/// dropping the claim does. Its future stays small (it sits in a consumer's
/// `buffer_unordered` by the thousand).
#[tokio::test(start_paused = true)]
async fn an_unpolled_commit_releases_the_key() {
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let window = Window::max_keys(100).ttl(TTL).store(MemoryStore::new());
    let mut claims = UnboundedReceiverStream::new(rx).claim_by_key(String::clone, window);
    tx.send("k".into()).unwrap();
    let commit = claims.next().await.unwrap().commit();
    assert!(
        std::mem::size_of_val(&commit) <= 48,
        "{}",
        std::mem::size_of_val(&commit)
    );
    drop(commit);
    assert_eq!(claims.stats().released(), 1);
    tokio::time::sleep(Duration::from_millis(1)).await; // the store's release, in the background
    tx.send("k".into()).unwrap();
    assert_eq!(*claims.next().await.unwrap(), "k");
}

/// Dropping a claim operator frees the keys it claimed in the store but never handed out (read
/// ahead in its batch), so another consumer processes their redeliveries at once.
#[tokio::test]
async fn dropping_the_operator_releases_what_it_read_ahead() {
    let store = MemoryStore::new();
    let window = || Window::max_keys(100).ttl(TTL).store(store.clone());
    let mut a = futures::stream::iter([1u32, 2, 3]).claim_by_key(|k| *k, window());
    let first = a.next().await.unwrap(); // 1, 2 and 3 were claimed in one batch
    drop(first);
    let stats = a.stats();
    drop(a);
    // Only the claim handed out counts as released; 2 and 3 were never anyone's.
    assert_eq!(stats.released(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await; // the releases go out in the background
    let processed: Vec<u32> = futures::stream::iter([1u32, 2, 3])
        .claim_by_key(|k| *k, window())
        .then(|c| async move { c.commit().await.unwrap() })
        .collect()
        .await;
    assert_eq!(processed, [1, 2, 3]);
}

/// The runtime shuts down while a commit waits on the store: the claim's key is freed in memory
/// (counted as released), not left in flight until its lease ran out.
#[test]
fn a_commit_cut_off_by_runtime_shutdown_frees_its_key() {
    let store = FaultyStore::new();
    let window = Window::max_keys(10).ttl(TTL).store(store.clone());
    let mut claims = futures::stream::iter([1u32, 2]).claim_by_key(|k| *k, window);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let claim = claims.next().await.unwrap();
        store.set(Mode::Hang);
        tokio::spawn(claim.commit());
        // The commit reaches the store, which never answers (the call's timeout is 250 ms).
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    assert_eq!(claims.stats().released(), 0);
    drop(rt);
    assert_eq!(claims.stats().released(), 1);
}

/// A claim committed outside any tokio runtime (its store cannot be reached from there): the
/// commit fails with a clear error and the key is released, never left in flight.
#[test]
fn a_commit_outside_a_runtime_fails_and_releases() {
    let window = Window::max_keys(10).ttl(TTL).store(MemoryStore::new());
    let mut claims = futures::stream::iter([1u32]).claim_by_key(|k| *k, window);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let claim = rt.block_on(claims.next()).unwrap();
    drop(rt);
    let e = futures::executor::block_on(claim.commit()).unwrap_err();
    assert!(
        e.to_string().ends_with(": no tokio runtime to commit on"),
        "{e}"
    );
    assert_eq!(claims.stats().released(), 1);
}

/// Dropping the operator while a claim call is in flight frees its keys in the store, but
/// counts no release: none of them was ever a claim.
#[tokio::test]
async fn dropping_the_operator_mid_call_counts_no_release() {
    let store = FaultyStore::new();
    store.set(Mode::Hang);
    let window = Window::max_keys(10).ttl(TTL).store(store.clone());
    let mut claims = futures::stream::iter([1u32, 2, 3]).claim_by_key(|k| *k, window);
    assert!(futures::poll!(claims.next()).is_pending());
    assert_eq!(store.calls(), 1);
    let stats = claims.stats();
    drop(claims);
    assert_eq!(stats.released(), 0);
}

/// Commits still queued behind batches that hang (the committer runs four at a time) are
/// freed in memory too when the runtime shuts down, not left in flight until their lease.
#[test]
fn commits_queued_behind_hung_batches_are_freed_at_shutdown() {
    let store = FaultyStore::new();
    let window = Window::max_keys(10).ttl(TTL).store(store.clone());
    let mut claims = futures::stream::iter(1u32..=6).claim_by_key(|k| *k, window);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut open = Vec::new();
        for _ in 0..6 {
            open.push(claims.next().await.unwrap());
        }
        store.set(Mode::Hang);
        for claim in open {
            tokio::spawn(claim.commit());
            // One batch each: four hang in the store, the last two wait in the channel.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert_eq!(claims.stats().released(), 0);
    drop(rt);
    assert_eq!(claims.stats().released(), 6);
}
