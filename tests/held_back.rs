//! Copies held back (their key in flight under another claim): parked until the key settles,
//! or waited for in order; with no store and with one, checked against a model.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;
use stream_dedup::store::MemoryStore;
use stream_dedup::{DedupStreamExt, HeldBack, Verdict, Window};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const TTL: Duration = Duration::from_secs(3600);

fn window() -> Window {
    Window::max_keys(1_000)
        .ttl(TTL)
        .lease(Duration::from_secs(3))
}

/// The next item, or `None` if none comes within a second of (paused) time.
async fn soon<S: futures::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    tokio::time::timeout(Duration::from_secs(1), s.next())
        .await
        .ok()
        .flatten()
}

/// Parked: the copy waits while other items pass; committed, the copy is a duplicate.
#[tokio::test(start_paused = true)]
async fn a_parked_copy_becomes_a_duplicate_when_its_original_commits() {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut verdicts = UnboundedReceiverStream::new(rx)
        .claim_by_key(|k: &u32| *k, window())
        .held_back(HeldBack::Wait { max_parked: 10 })
        .verdicts();
    for k in [1, 1, 2] {
        tx.send(k).unwrap();
    }
    let Some(Verdict::Claimed(first)) = soon(&mut verdicts).await else {
        panic!()
    };
    // 2 passes the parked copy of 1.
    let Some(Verdict::Claimed(second)) = soon(&mut verdicts).await else {
        panic!()
    };
    assert_eq!((*first, *second), (1, 2));
    assert!(soon(&mut verdicts).await.is_none(), "the copy must wait");
    // Something else settles first (2's commit): the copy of 1 waits on, not counted again.
    second.commit().await.unwrap();
    assert!(soon(&mut verdicts).await.is_none(), "the copy must wait");
    first.commit().await.unwrap();
    assert!(matches!(
        soon(&mut verdicts).await,
        Some(Verdict::Duplicate(1))
    ));
    let stats = verdicts.stats();
    assert_eq!(
        stats.held_back(),
        1,
        "held back once, however long it waited"
    );
    assert_eq!(stats.duplicates(), 1);
}

/// Parked: released, the copy is processed as a new claim (the broker need not redeliver).
#[tokio::test(start_paused = true)]
async fn a_parked_copy_is_claimed_when_its_original_is_released() {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut claims = UnboundedReceiverStream::new(rx)
        .claim_by_key(|k: &u32| *k, window())
        .held_back(HeldBack::Wait { max_parked: 10 });
    tx.send(1).unwrap();
    tx.send(1).unwrap();
    let first = soon(&mut claims).await.unwrap();
    assert!(soon(&mut claims).await.is_none());
    drop(first); // failed: released
    let again = soon(&mut claims).await.expect("the parked copy, claimed");
    assert_eq!(*again, 1);
    again.commit().await.unwrap();
    assert_eq!(claims.stats().held_back(), 1);
}

/// In order: nothing after the copy comes out until its key settles.
#[tokio::test(start_paused = true)]
async fn waiting_in_order_keeps_the_order() {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut verdicts = UnboundedReceiverStream::new(rx)
        .claim_by_key(|k: &u32| *k, window())
        .held_back(HeldBack::WaitInOrder)
        .verdicts();
    for k in [1, 1, 2] {
        tx.send(k).unwrap();
    }
    let Some(Verdict::Claimed(first)) = soon(&mut verdicts).await else {
        panic!()
    };
    assert!(
        soon(&mut verdicts).await.is_none(),
        "2 must not pass the copy of 1"
    );
    first.commit().await.unwrap();
    assert!(matches!(
        soon(&mut verdicts).await,
        Some(Verdict::Duplicate(1))
    ));
    let Some(Verdict::Claimed(second)) = soon(&mut verdicts).await else {
        panic!()
    };
    assert_eq!(*second, 2);
}

/// Through a store, with the original held by another consumer: the parked copy is asked
/// about again on each keep-alive round, and claimed once the other consumer releases.
#[tokio::test(start_paused = true)]
async fn a_copy_parked_for_another_consumer_is_claimed_after_its_release() {
    let store = MemoryStore::new();
    let w = || window().store(store.clone());
    let mut a = futures::stream::iter([7u32]).claim_by_key(|k| *k, w());
    let original = a.next().await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut b = UnboundedReceiverStream::new(rx)
        .claim_by_key(|k: &u32| *k, w())
        .held_back(HeldBack::Wait { max_parked: 10 });
    tx.send(7).unwrap();
    tx.send(8).unwrap();
    assert_eq!(*soon(&mut b).await.unwrap(), 8);
    drop(original);
    let copy = tokio::time::timeout(Duration::from_secs(5), b.next())
        .await
        .expect("claimed within a keep-alive round")
        .unwrap();
    assert_eq!(*copy, 7);
}

/// In order through a store: the other consumer commits, the copy is a duplicate, and the item
/// after it comes out only then.
#[tokio::test(start_paused = true)]
async fn waiting_in_order_through_a_store() {
    let store = MemoryStore::new();
    let w = || window().store(store.clone());
    let mut a = futures::stream::iter([7u32]).claim_by_key(|k| *k, w());
    let original = a.next().await.unwrap();
    let dropped = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&dropped);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut b = UnboundedReceiverStream::new(rx)
        .claim_by_key(|k: &u32| *k, w())
        .on_duplicate(move |k| seen.lock().unwrap().push(k))
        .held_back(HeldBack::WaitInOrder);
    tx.send(7).unwrap();
    tx.send(8).unwrap();
    assert!(soon(&mut b).await.is_none(), "8 must wait for 7");
    original.commit().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), b.next())
        .await
        .expect("within a keep-alive round")
        .unwrap();
    assert_eq!(*next, 8);
    assert_eq!(*dropped.lock().unwrap(), [7]);
}

// ---- The model ----------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Case {
    keys: Vec<u8>,
    /// Per delivery: how long its claim stays open (ms), and whether it commits.
    settle: Vec<(u64, bool)>,
    in_order: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(0u8..6, 1..30),
        prop::collection::vec((0u64..50, any::<bool>()), 30),
        any::<bool>(),
    )
        .prop_map(|(keys, settle, in_order)| Case {
            keys,
            settle,
            in_order,
        })
}

/// Runs the deliveries through a claim operator whose consumer settles each claim after a
/// while (commit or release), concurrently with reading the next ones. Checks: nothing lost
/// (every delivery comes out as a claim or a duplicate, none is left waiting), nothing
/// processed twice (a key is committed at most once, and a duplicate only after its key's
/// commit), and, in order, the deliveries come out in input order.
async fn run(c: Case) {
    let (tx, rx) = mpsc::unbounded_channel();
    let policy = if c.in_order {
        HeldBack::WaitInOrder
    } else {
        HeldBack::Wait { max_parked: 100 }
    };
    let mut verdicts = UnboundedReceiverStream::new(rx)
        .claim_by_key(|d: &(usize, u8)| d.1, window())
        .held_back(policy)
        .verdicts();
    for (i, &k) in c.keys.iter().enumerate() {
        tx.send((i, k)).unwrap();
    }
    drop(tx);
    let committed: Arc<Mutex<HashMap<u8, usize>>> = Arc::default();
    let mut out = Vec::new();
    let mut tasks = Vec::new();
    while let Some(v) = tokio::time::timeout(Duration::from_secs(30), verdicts.next())
        .await
        .expect("a delivery left waiting")
    {
        match v {
            Verdict::Claimed(claim) => {
                let (i, k) = *claim;
                out.push(i);
                let (delay, commit) = c.settle[i];
                let committed = Arc::clone(&committed);
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    if commit {
                        claim.commit().await.expect("commit");
                        *committed.lock().unwrap().entry(k).or_default() += 1;
                    } else {
                        drop(claim);
                    }
                }));
            }
            Verdict::Duplicate((i, k)) => {
                out.push(i);
                assert!(
                    committed.lock().unwrap().get(&k).copied().unwrap_or(0) > 0,
                    "a duplicate of {k} before its commit"
                );
            }
            Verdict::HeldBack(d) => panic!("{d:?} held back under a waiting policy"),
            Verdict::Failed(d, e) => panic!("{d:?} failed: {e}"),
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut sorted = out.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..c.keys.len()).collect::<Vec<_>>(),
        "lost or doubled: {out:?}"
    );
    assert!(committed.lock().unwrap().values().all(|&n| n == 1));
    if c.in_order {
        assert!(out.windows(2).all(|w| w[0] < w[1]), "out of order: {out:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn waiting_policies_lose_nothing_and_process_nothing_twice(c in case()) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(run(c));
    }
}
