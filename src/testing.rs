//! The store conformance suite: one test per behaviour of the [`Store`] and [`ClaimStore`]
//! contracts, written once and run for every backend — this crate's and yours.
//!
//! [`store_suite!`](crate::store_suite) and [`claim_suite!`](crate::claim_suite) expand to one
//! `#[tokio::test]` per behaviour (your test crate needs `tokio` with its `macros` and
//! `rt-multi-thread` features). `make` is an `async fn(namespace: String) -> Option<S>` that
//! builds a store under a namespace unique to the test; `None` means the backend is not
//! reachable here (no server configured), and the test says it skipped. `expiry` is how long
//! past a ttl the backend may take to forget a key.
//!
//! ```ignore
//! // tests/store_mine.rs
//! use std::time::Duration;
//!
//! async fn make(namespace: String) -> Option<MyStore> {
//!     Some(MyStore::connect(&namespace).await.unwrap())
//! }
//!
//! stream_dedup::store_suite!(make, expiry = Duration::from_millis(50));
//! stream_dedup::claim_suite!(make, expiry = Duration::from_millis(50));
//! ```
//!
//! An attribute before `make` goes on every test of the suite: for a backend that needs a
//! server, mark the tests ignored where it is not configured, so that they do not pass
//! without running (`my_server` being a `cfg` your build script sets from the environment):
//!
//! ```ignore
//! stream_dedup::store_suite!(
//!     #[cfg_attr(not(my_server), ignore = "set MY_SERVER_URL")]
//!     make,
//!     expiry = Duration::from_millis(50)
//! );
//! ```
//!
//! The functions are public too, to run one behaviour on its own. They panic (assert) when
//! the store breaks the contract: they are for tests only.

use std::time::Duration;

use crate::store::{
    ClaimBatch, ClaimStore, Claimed, InsertBatch, Inserted, Store, StoreError, Token,
};

/// The ttl the suite records keys with.
pub const TTL: Duration = Duration::from_secs(30);

/// `ks` as store keys (their UTF-8 bytes).
pub fn keys(ks: &[&str]) -> Vec<Vec<u8>> {
    ks.iter().map(|k| k.as_bytes().to_vec()).collect()
}

/// Inserts `ks` with [`TTL`] and a fresh token.
pub async fn insert<S: Store>(store: &S, ks: &[&str]) -> Vec<Inserted> {
    store
        .insert(InsertBatch::new(keys(ks), TTL))
        .await
        .expect("insert")
}

/// A new key is `New`, then `Present`, in the order of the batch.
pub async fn new_then_present<S: Store>(store: S) {
    use Inserted::{New, Present};
    assert_eq!(insert(&store, &["a", "b"]).await, [New, New]);
    assert_eq!(
        insert(&store, &["b", "c", "a"]).await,
        [Present, New, Present]
    );
}

/// A retry with the same token answers `New` for the keys it recorded (an applied call that
/// timed out is never a false duplicate).
pub async fn retry_with_same_token_is_new<S: Store>(store: S) {
    let token = Token::new();
    let batch = InsertBatch::new(keys(&["k1", "k2"]), TTL).with_token(token);
    assert_eq!(
        store.insert(batch.clone()).await.unwrap(),
        [Inserted::New; 2]
    );
    // The first answer was "lost" (a timeout): the retry must not call our own keys duplicates.
    assert_eq!(store.insert(batch).await.unwrap(), [Inserted::New; 2]);
    // Anybody else sees them.
    assert_eq!(insert(&store, &["k1"]).await, [Inserted::Present]);
}

/// `remove` forgets keys; an absent key is no error.
pub async fn remove_forgets<S: Store>(store: S) {
    insert(&store, &["x", "y"]).await;
    store.remove(keys(&["x", "absent"])).await.unwrap();
    assert_eq!(
        insert(&store, &["x", "y"]).await,
        [Inserted::New, Inserted::Present]
    );
}

/// `take_back` forgets the keys its token recorded, and only those.
pub async fn take_back_forgets_only_its_own_keys<S: Store>(store: S) {
    let mine = InsertBatch::new(keys(&["t1", "t2"]), TTL);
    let token = mine.token;
    assert_eq!(store.insert(mine).await.unwrap(), [Inserted::New; 2]);
    assert_eq!(insert(&store, &["t3"]).await, [Inserted::New]);
    // Another token takes back nothing; ours takes back its own keys, not "t3" nor absent ones.
    store
        .take_back(
            keys(&["t1"])
                .into_iter()
                .map(|k| (k, Token::new()))
                .collect(),
        )
        .await
        .unwrap();
    store
        .take_back(
            keys(&["t1", "t2", "t3", "absent"])
                .into_iter()
                .map(|k| (k, token))
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(
        insert(&store, &["t1", "t2", "t3"]).await,
        [Inserted::New, Inserted::New, Inserted::Present]
    );
}

/// A key is forgotten once its ttl (+ `expiry`) has passed.
pub async fn ttl_expires<S: Store>(store: S, expiry: Duration) {
    let ttl = Duration::from_millis(300);
    let batch = InsertBatch::new(keys(&["short"]), ttl);
    assert_eq!(store.insert(batch).await.unwrap(), [Inserted::New]);
    assert_eq!(
        store
            .insert(InsertBatch::new(keys(&["short"]), ttl))
            .await
            .unwrap(),
        [Inserted::Present]
    );
    tokio::time::sleep(ttl + expiry).await;
    assert_eq!(
        store
            .insert(InsertBatch::new(keys(&["short"]), ttl))
            .await
            .unwrap(),
        [Inserted::New]
    );
}

/// Two namespaces never share a key.
pub async fn namespaces_are_isolated<S: Store>(a: S, b: S) {
    assert_eq!(insert(&a, &["shared-key"]).await, [Inserted::New]);
    assert_eq!(insert(&b, &["shared-key"]).await, [Inserted::New]);
    assert_eq!(insert(&a, &["shared-key"]).await, [Inserted::Present]);
}

/// Many concurrent requests for the same keys: each key is new for exactly one of them.
/// Eight concurrent inserts of the same keys: exactly one `New` per key.
pub async fn concurrent_inserts_agree<S: Store + Clone>(store: S) {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let ks: Vec<String> = (0..200).map(|i| format!("c{i}")).collect();
                let refs: Vec<&str> = ks.iter().map(String::as_str).collect();
                insert(&store, &refs).await
            })
        })
        .collect();
    let mut new_per_key = vec![0; 200];
    for t in tasks {
        for (i, a) in t.await.unwrap().into_iter().enumerate() {
            if a == Inserted::New {
                new_per_key[i] += 1;
            }
        }
    }
    assert!(new_per_key.iter().all(|&n| n == 1), "{new_per_key:?}");
}

/// Empty keys and non-UTF-8 bytes are keys like any other; a 1 MiB key is either stored or
/// refused with `KeyTooLong`, never a panic, and never breaks the other keys of its batch.
pub async fn odd_keys<S: Store>(store: S) {
    let odd = vec![Vec::new(), vec![0xff, 0xfe, 0x00, 0x80], b"plain".to_vec()];
    let first = store
        .insert(InsertBatch::new(odd.clone(), TTL))
        .await
        .unwrap();
    assert_eq!(first, [Inserted::New; 3]);
    let again = store.insert(InsertBatch::new(odd, TTL)).await.unwrap();
    assert_eq!(again, [Inserted::Present; 3]);

    let huge = vec![vec![b'h'; 1 << 20]];
    match store.insert(InsertBatch::new(huge.clone(), TTL)).await {
        Ok(a) => {
            assert_eq!(a, [Inserted::New]);
            let again = store.insert(InsertBatch::new(huge, TTL)).await.unwrap();
            assert_eq!(again, [Inserted::Present]);
        }
        Err(StoreError::KeyTooLong { len, .. }) => assert_eq!(len, 1 << 20),
        Err(e) => panic!("a long key must be stored or refused as too long, got {e:?}"),
    }
}

/// A batch of 10,000 keys, then one half old, half new.
pub async fn large_batch<S: Store>(store: S) {
    let ks: Vec<Vec<u8>> = (0..10_000u32).map(|i| i.to_be_bytes().to_vec()).collect();
    let a = store
        .insert(InsertBatch::new(ks.clone(), TTL))
        .await
        .unwrap();
    assert!(a.iter().all(|&x| x == Inserted::New));
    let mut mixed = ks[5_000..].to_vec();
    mixed.extend((10_000..15_000u32).map(|i| i.to_be_bytes().to_vec()));
    let b = store.insert(InsertBatch::new(mixed, TTL)).await.unwrap();
    assert_eq!(b.iter().filter(|&&x| x == Inserted::Present).count(), 5_000);
    assert!(b[5_000..].iter().all(|&x| x == Inserted::New));
}

/// Expands to a `#[tokio::test]` per case, each with a fresh store from `$make` under a unique
/// namespace; a store that is not configured (`None`) makes the test say it skipped. The
/// building block of [`store_suite!`](crate::store_suite) and [`claim_suite!`](crate::claim_suite).
#[macro_export]
macro_rules! store_suite_cases {
    (#[$attr:meta] $make:path, $($name:ident => |$s:ident| $body:expr;)*) => {
        fn ns(test: &str) -> String {
            format!("suite-{test}-{}-{}", std::process::id(), $crate::store::Token::new())
        }

        $(
            #[tokio::test]
            #[$attr]
            async fn $name() {
                let Some($s) = $make(ns(stringify!($name))).await else {
                    eprintln!("skipped: {} (store not configured)", stringify!($name));
                    return;
                };
                $body.await;
            }
        )*
    };
}

/// Expands to one `#[tokio::test]` per behaviour of the [`Store`](crate::store::Store)
/// contract. `$make` is an async fn `(namespace: String) -> Option<S>`; the namespace is unique
/// per test and run. See [`testing`](crate::testing).
#[macro_export]
macro_rules! store_suite {
    ($make:path, expiry = $expiry:expr) => {
        $crate::store_suite!(#[cfg_attr(any(), ignore)] $make, expiry = $expiry);
    };
    (#[$attr:meta] $make:path, expiry = $expiry:expr) => {
        mod store_suite_tests {
            use super::*;
            use $crate::testing as suite;

            $crate::store_suite_cases! {
                #[$attr] $make,
                new_then_present => |s| suite::new_then_present(s);
                retry_with_same_token_is_new => |s| suite::retry_with_same_token_is_new(s);
                remove_forgets => |s| suite::remove_forgets(s);
                take_back_forgets_only_its_own_keys => |s| suite::take_back_forgets_only_its_own_keys(s);
                ttl_expires => |s| suite::ttl_expires(s, $expiry);
                concurrent_inserts_agree => |s| suite::concurrent_inserts_agree(s);
                odd_keys => |s| suite::odd_keys(s);
                large_batch => |s| suite::large_batch(s);
            }

            #[tokio::test]
            #[$attr]
            async fn namespaces_are_isolated() {
                let name = ns("namespaces");
                let (Some(a), Some(b)) = (
                    $make(format!("{name}-a")).await,
                    $make(format!("{name}-b")).await,
                ) else {
                    eprintln!("skipped: namespaces_are_isolated (store not configured)");
                    return;
                };
                suite::namespaces_are_isolated(a, b).await;
            }
        }
    };
}

// ---- Claims: for stores that implement `ClaimStore`. ----

/// Claims `ks` for `lease` (with the ttl [`TTL`] the operators send); the batch's token and the
/// answers.
pub async fn claim<S: ClaimStore>(
    store: &S,
    ks: &[&str],
    lease: Duration,
) -> (Token, Vec<Claimed>) {
    // With the ttl its keys are committed with, as the operators send it.
    let batch = ClaimBatch::new(keys(ks), lease).with_ttl(TTL);
    let token = batch.token;
    (token, store.claim(batch).await.expect("claim"))
}

/// `ks` held by `token`, for `commit` and `release`.
pub fn held(ks: &[&str], token: Token) -> Vec<(Vec<u8>, Token)> {
    keys(ks).into_iter().map(|k| (k, token)).collect()
}

/// free → in flight → done; a copy in flight is held back; a done key is a duplicate.
pub async fn claim_states<S: ClaimStore>(store: S) {
    use Claimed::{Done, InFlight, Mine};
    let (t1, a) = claim(&store, &["a", "b"], TTL).await;
    assert_eq!(a, [Mine, Mine]);
    let (_, b) = claim(&store, &["a", "c"], TTL).await;
    assert_eq!(b, [InFlight, Mine]);
    assert_eq!(store.commit(held(&["a"], t1), TTL).await.unwrap(), [true]);
    let (_, c) = claim(&store, &["a", "b"], TTL).await;
    assert_eq!(c, [Done, InFlight]);
    // A committed key is present for mark-on-emit too, and an in-flight one as well.
    assert_eq!(
        insert(&store, &["a", "b"]).await,
        [Inserted::Present, Inserted::Present]
    );
}

/// A claim retried with the same token is `Mine` again.
pub async fn claim_retry_with_same_token_is_mine<S: ClaimStore>(store: S) {
    let batch = ClaimBatch::new(keys(&["r"]), TTL);
    assert_eq!(store.claim(batch.clone()).await.unwrap(), [Claimed::Mine]);
    assert_eq!(store.claim(batch).await.unwrap(), [Claimed::Mine]);
}

/// A release frees only keys its token holds.
pub async fn release_frees_only_its_own_keys<S: ClaimStore>(store: S) {
    let (t1, _) = claim(&store, &["x"], TTL).await;
    // Somebody else's release does nothing.
    store.release(held(&["x"], Token::new())).await.unwrap();
    assert_eq!(claim(&store, &["x"], TTL).await.1, [Claimed::InFlight]);
    store.release(held(&["x"], t1)).await.unwrap();
    assert_eq!(claim(&store, &["x"], TTL).await.1, [Claimed::Mine]);
}

/// `take_back` frees a key in flight or done under its token, and leaves other claims' keys.
pub async fn take_back_frees_claimed_and_committed_keys<S: ClaimStore>(store: S) {
    let (t1, _) = claim(&store, &["b1", "b2"], TTL).await;
    let (t2, _) = claim(&store, &["b3"], TTL).await;
    assert_eq!(store.commit(held(&["b2"], t1), TTL).await.unwrap(), [true]);
    store
        .take_back(held(&["b1", "b2", "b3"], t1))
        .await
        .unwrap();
    let (_, again) = claim(&store, &["b1", "b2", "b3"], TTL).await;
    assert_eq!(again, [Claimed::Mine, Claimed::Mine, Claimed::InFlight]);
    store.release(held(&["b3"], t2)).await.unwrap();
}

/// `renew` keeps a claim's key in flight past its first lease, answers `false` for a key the
/// claim no longer holds, and a renewed key still commits.
pub async fn renew_keeps_a_lease_alive<S: ClaimStore>(store: S, expiry: Duration) {
    let lease = Duration::from_millis(400);
    let (mine, _) = claim(&store, &["n1", "n2"], lease).await;
    let (other, _) = claim(&store, &["n3"], TTL).await;
    for _ in 0..3 {
        tokio::time::sleep(lease / 2).await;
        let renewed = store
            .renew(held(&["n1", "n2", "n3", "absent"], mine), lease)
            .await
            .unwrap();
        assert_eq!(renewed, [true, true, false, false]);
    }
    // 600 ms after the claim, past its first lease: still in flight, still ours.
    assert_eq!(claim(&store, &["n1"], TTL).await.1, [Claimed::InFlight]);
    assert_eq!(
        store.commit(held(&["n1"], mine), TTL).await.unwrap(),
        [true]
    );
    // Not renewed any more: n2's lease runs out and another claim takes it.
    tokio::time::sleep(lease + expiry).await;
    assert_eq!(claim(&store, &["n2"], TTL).await.1, [Claimed::Mine]);
    assert_eq!(
        store.renew(held(&["n2"], mine), lease).await.unwrap(),
        [false]
    );
    store.release(held(&["n3"], other)).await.unwrap();
}

/// A claim whose owner died frees its key after the lease; the late owner's commit is refused
/// and cannot overwrite the new owner's claim, nor its release free it.
pub async fn lease_expiry_and_late_owner<S: ClaimStore>(store: S, expiry: Duration) {
    let lease = Duration::from_millis(300);
    let (late, _) = claim(&store, &["l"], lease).await;
    tokio::time::sleep(lease + expiry).await;
    let (now_owner, again) = claim(&store, &["l"], TTL).await;
    assert_eq!(again, [Claimed::Mine]);
    assert_eq!(
        store.commit(held(&["l"], late), TTL).await.unwrap(),
        [false]
    );
    store.release(held(&["l"], late)).await.unwrap();
    assert_eq!(claim(&store, &["l"], TTL).await.1, [Claimed::InFlight]);
    assert_eq!(
        store.commit(held(&["l"], now_owner), TTL).await.unwrap(),
        [true]
    );
    assert_eq!(claim(&store, &["l"], TTL).await.1, [Claimed::Done]);
}

/// Many consumers claim the same keys at once: exactly one owns each.
pub async fn concurrent_claims_agree<S: ClaimStore + Clone>(store: S) {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let ks: Vec<String> = (0..100).map(|i| format!("cc{i}")).collect();
                let refs: Vec<&str> = ks.iter().map(String::as_str).collect();
                claim(&store, &refs, TTL).await.1
            })
        })
        .collect();
    let mut mine = vec![0; 100];
    for t in tasks {
        for (i, c) in t.await.unwrap().into_iter().enumerate() {
            if c == Claimed::Mine {
                mine[i] += 1;
            }
        }
    }
    assert!(mine.iter().all(|&n| n == 1), "{mine:?}");
}

/// Expands to one `#[tokio::test]` per behaviour of the
/// [`ClaimStore`](crate::store::ClaimStore) contract; same arguments as [`store_suite!`](crate::store_suite).
#[macro_export]
macro_rules! claim_suite {
    ($make:path, expiry = $expiry:expr) => {
        $crate::claim_suite!(#[cfg_attr(any(), ignore)] $make, expiry = $expiry);
    };
    (#[$attr:meta] $make:path, expiry = $expiry:expr) => {
        mod claim_suite_tests {
            use super::*;
            use $crate::testing as suite;

            $crate::store_suite_cases! {
                #[$attr] $make,
                claim_states => |s| suite::claim_states(s);
                claim_retry_with_same_token_is_mine => |s| suite::claim_retry_with_same_token_is_mine(s);
                release_frees_only_its_own_keys => |s| suite::release_frees_only_its_own_keys(s);
                take_back_frees_claimed_and_committed_keys => |s| suite::take_back_frees_claimed_and_committed_keys(s);
                lease_expiry_and_late_owner => |s| suite::lease_expiry_and_late_owner(s, $expiry);
                renew_keeps_a_lease_alive => |s| suite::renew_keeps_a_lease_alive(s, $expiry);
                concurrent_claims_agree => |s| suite::concurrent_claims_agree(s);
            }
        }
    };
}
