//! Keep-alive: an open claim's lease is renewed while it lives, a claim taken over knows it,
//! the heartbeat beats each round, and a dead consumer's keys free up after the short lease.

mod support;

use std::time::Duration;

use futures::{StreamExt, stream};
use stream_dedup::store::{MemoryStore, StoreError};
use stream_dedup::{DedupStreamExt, Window};
use support::faulty::{FaultyStore, Mode};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const TTL: Duration = Duration::from_secs(3600);
const LEASE: Duration = Duration::from_secs(3);

fn window(keep_alive: bool) -> Window {
    Window::max_keys(100)
        .ttl(TTL)
        .lease(LEASE)
        .keep_alive(keep_alive)
}

/// A handler that runs ten leases long keeps its key: a second consumer's copy is held back
/// the whole time, and the commit succeeds.
#[tokio::test(start_paused = true)]
async fn an_open_claim_outlives_its_lease() {
    let store = MemoryStore::new();
    let mut first = stream::iter([7u32]).claim_by_key(|k| *k, window(true).store(store.clone()));
    let claim = first.next().await.expect("claimed");
    let stats = first.stats();
    for _ in 0..10 {
        tokio::time::sleep(LEASE).await;
        let mut held = 0;
        let copies: Vec<_> = stream::iter([7u32])
            .claim_by_key(|k| *k, window(true).store(store.clone()))
            .on_held_back(|_| held += 1)
            .collect()
            .await;
        assert!(
            copies.is_empty(),
            "the key was taken while its claim was open"
        );
        assert_eq!(held, 1);
        assert!(!claim.is_lost());
    }
    assert!(stats.renewed() >= 25, "{} renewals", stats.renewed());
    claim.commit().await.expect("still ours");
    assert_eq!(stats.leases_lost(), 0);
}

/// Without keep-alive the lease runs out: another consumer takes the key, the first claim
/// knows it is lost, and its commit fails.
#[tokio::test(start_paused = true)]
async fn without_keep_alive_the_lease_runs_out() {
    let store = MemoryStore::new();
    let mut first = stream::iter([7u32]).claim_by_key(|k| *k, window(false).store(store.clone()));
    let claim = first.next().await.expect("claimed");
    tokio::time::sleep(LEASE + Duration::from_millis(1)).await;
    assert!(claim.is_lost());
    let second: Vec<_> = stream::iter([7u32])
        .claim_by_key(|k| *k, window(false).store(store.clone()))
        .collect()
        .await;
    assert_eq!(second.len(), 1);
    let err = claim.commit().await.expect_err("taken over");
    assert!(matches!(err.error(), StoreError::LeaseLost), "{err}");
    assert_eq!(first.stats().renewed(), 0);
}

/// The store was unreachable for longer than a lease, another consumer took the key; when the
/// store is back, the next renewal finds it taken over: the claim is lost, counted, and its
/// commit fails.
#[tokio::test(start_paused = true)]
async fn a_claim_taken_over_knows_it() {
    let store = FaultyStore::new();
    let w = || window(true).store(store.clone());
    let mut first = stream::iter([7u32]).claim_by_key(|k| *k, w());
    let claim = first.next().await.expect("claimed");
    store.set(Mode::Down);
    tokio::time::sleep(LEASE + Duration::from_millis(1)).await;
    store.set(Mode::Up);
    // The first claim's lease ran out in the store: another consumer takes the key.
    let second: Vec<_> = stream::iter([7u32])
        .claim_by_key(|k| *k, w())
        .collect()
        .await;
    assert_eq!(second.len(), 1);
    // Next round: the renewal answers "not yours".
    tokio::time::sleep(LEASE).await;
    assert!(claim.is_lost());
    assert_eq!(first.stats().leases_lost(), 1);
    let err = claim.commit().await.expect_err("taken over");
    assert!(matches!(err.error(), StoreError::LeaseLost), "{err}");
    for c in second {
        c.commit().await.expect("the new owner commits");
    }
}

/// The heartbeat beats once a round (a third of the lease), and ends with keep-alive off.
#[tokio::test(start_paused = true)]
async fn the_heartbeat_beats_each_round() {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut claims = UnboundedReceiverStream::new(rx).claim_by_key(|k: &u32| *k, window(true));
    tx.send(1).unwrap();
    let claim = claims.next().await.expect("claimed");
    let mut beat = claim.heartbeat();
    let start = tokio::time::Instant::now();
    for _ in 0..6 {
        assert_eq!(beat.tick().await, Some(()));
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= LEASE * 2 - Duration::from_millis(10) && elapsed <= LEASE * 2 + LEASE / 3,
        "{elapsed:?}"
    );
    claim.commit().await.expect("commit");

    let off = stream::iter([2u32])
        .claim_by_key(|k| *k, window(false))
        .next()
        .await
        .expect("claimed");
    assert_eq!(off.heartbeat().tick().await, None);
}

/// A consumer that dies with claims open (its runtime gone, nothing released): its keys are
/// taken over after the short lease, not after the longest handler.
#[test]
fn a_dead_consumers_keys_free_up_after_the_lease() {
    let store = MemoryStore::new();
    let lease = Duration::from_millis(300);
    let w = || {
        Window::max_keys(100)
            .ttl(TTL)
            .lease(lease)
            .store(store.clone())
    };
    let dying = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    dying.block_on(async {
        let claims: Vec<_> = stream::iter(0..10u32)
            .claim_by_key(|k| *k, w())
            .collect()
            .await;
        assert_eq!(claims.len(), 10);
        // Killed: no release, no commit, and its keep-alive stops with its runtime.
        std::mem::forget(claims);
    });
    drop(dying);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let start = std::time::Instant::now();
        let mut taken = Vec::new();
        while taken.len() < 10 {
            let got: Vec<_> = stream::iter(0..10u32)
                .claim_by_key(|k| *k, w())
                .collect()
                .await;
            for c in got {
                taken.push(*c);
                c.commit().await.expect("commit");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(start.elapsed() < Duration::from_secs(5), "still held");
        }
        let waited = start.elapsed();
        assert!(waited >= lease - Duration::from_millis(50), "{waited:?}");
        assert!(waited < lease * 4, "{waited:?}");
    });
}

/// The mark-on-emit path is unaffected, and a claim operator dropped with claims open stops
/// its keep-alive once the last claim is gone.
#[tokio::test(start_paused = true)]
async fn keep_alive_ends_with_the_operator_and_its_claims() {
    let mut claims = stream::iter([1u32]).claim_by_key(|k| *k, window(true));
    let claim = claims.next().await.expect("claimed");
    let mut beat = claim.heartbeat();
    drop(claims);
    assert_eq!(beat.tick().await, Some(()));
    claim.commit().await.expect("commit");
    assert_eq!(beat.tick().await, None);
    // Mark on emit has no leases.
    let out: Vec<u32> = stream::iter([1u32, 1])
        .dedup_by_key(|k| *k, window(true))
        .collect()
        .await;
    assert_eq!(out, [1]);
}

/// A commit that reaches the store before a keep-alive round (the store then refuses to renew
/// a key that is done) does not make its claim lost: nothing is counted lost, and the commit
/// succeeds.
#[tokio::test(start_paused = true)]
async fn a_commit_that_beats_a_renewal_is_not_a_lost_lease() {
    use stream_dedup::store::ClaimStore;
    let store = MemoryStore::new();
    let mut first = stream::iter([7u32]).claim_by_key(|k| *k, window(true).store(store.clone()));
    let claim = first.next().await.expect("claimed");
    let stats = first.stats();
    // The claim's commit, as the store sees it, lands before the next round.
    let done = store
        .commit(vec![(7u32.to_be_bytes().to_vec(), claim.token())], TTL)
        .await
        .expect("commit");
    assert_eq!(done, [true]);
    // Two rounds, within the lease: each refused, neither counts it lost.
    for _ in 0..2 {
        tokio::time::sleep(LEASE / 3 + Duration::from_millis(1)).await;
        assert_eq!(stats.leases_lost(), 0);
        assert!(!claim.is_lost());
    }
    claim.commit().await.expect("the commit succeeds");
    assert_eq!(stats.leases_lost(), 0);
}

/// A round renews only the claims that are due: held (since their claim or last renewal) for a
/// quarter of the lease or more. A claim a moment old waits for the next round; claims held for
/// many leases are renewed every round, stay ours, and another consumer's copies are held back.
#[tokio::test(start_paused = true)]
async fn a_round_renews_only_the_claims_that_are_due() {
    let store = MemoryStore::new();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut claims = UnboundedReceiverStream::new(rx)
        .claim_by_key(|k: &u32| *k, window(true).store(store.clone()));
    let stats = claims.stats();
    tx.send(1).unwrap();
    let old = claims.next().await.expect("claimed");
    let mut beat = old.heartbeat();
    // A tenth of a second before the first round (a third of the lease in).
    tokio::time::sleep(LEASE / 3 - Duration::from_millis(100)).await;
    tx.send(2).unwrap();
    let young = claims.next().await.expect("claimed");
    assert_eq!(beat.tick().await, Some(()));
    assert_eq!(
        stats.renewed(),
        1,
        "only the claim held for a third of its lease"
    );
    assert_eq!(beat.tick().await, Some(()));
    assert_eq!(stats.renewed(), 3, "both are due at the second round");
    // Three more leases: both renewed on every round.
    for _ in 0..9 {
        assert_eq!(beat.tick().await, Some(()));
    }
    assert_eq!(stats.renewed(), 3 + 2 * 9);
    assert!(!old.is_lost() && !young.is_lost());
    let mut held = 0;
    let copies: Vec<_> = stream::iter([1u32, 2])
        .claim_by_key(|k| *k, window(true).store(store.clone()))
        .on_held_back(|_| held += 1)
        .collect()
        .await;
    assert!(copies.is_empty(), "taken while their claims were open");
    assert_eq!(held, 2);
    old.commit().await.expect("still ours");
    young.commit().await.expect("still ours");
    assert_eq!(stats.leases_lost(), 0);
}
