//! [`EmbeddedStore`]: the store and claim suites, restarts (of keys and of claims), expiry by
//! dropping buckets, the format of older files, and its errors.
#![cfg(feature = "embedded")]

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stream_dedup::store::{
    ClaimBatch, ClaimStore, Claimed, EmbeddedStore, HeldKey, InsertBatch, Inserted, Store,
    StoreError, StoreFuture, Token,
};
use tempfile::TempDir;

/// A store with its own temporary directory, removed when the last clone is dropped.
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "testing"), allow(dead_code))] // for the suite only
struct TestStore {
    store: EmbeddedStore,
    _dir: Arc<TempDir>,
}

impl Store for TestStore {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        self.store.insert(batch)
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        self.store.remove(keys)
    }

    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        self.store.take_back(keys)
    }

    fn max_key_len(&self) -> usize {
        self.store.max_key_len()
    }
}

impl ClaimStore for TestStore {
    fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>> {
        self.store.claim(batch)
    }

    fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>> {
        self.store.commit(keys, ttl)
    }

    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        self.store.release(keys)
    }

    fn renew(&self, keys: Vec<HeldKey>, lease: Duration) -> StoreFuture<Vec<bool>> {
        self.store.renew(keys, lease)
    }
}

#[cfg_attr(not(feature = "testing"), allow(dead_code))] // for the suite only
async fn make(namespace: String) -> Option<TestStore> {
    let dir = TempDir::new().expect("temp dir");
    let store = EmbeddedStore::open(dir.path().join("store"), &namespace).expect("open");
    Some(TestStore {
        store,
        _dir: Arc::new(dir),
    })
}

// The suite needs the `testing` feature (the package of this crate leaves it to the caller).
// Expiry stamps are exact to the millisecond; a little slack for a slow machine.
#[cfg(feature = "testing")]
stream_dedup::store_suite!(make, expiry = Duration::from_millis(20));
#[cfg(feature = "testing")]
stream_dedup::claim_suite!(make, expiry = Duration::from_millis(20));

const TTL: Duration = Duration::from_secs(600);

/// 36-byte keys, like UUIDs in text.
fn key(i: u64) -> Vec<u8> {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        i >> 32,
        i & 0xffff_ffff_ffff
    )
    .into_bytes()
}

async fn insert(store: &EmbeddedStore, keys: Vec<Vec<u8>>, ttl: Duration) -> Vec<Inserted> {
    store
        .insert(InsertBatch::new(keys, ttl))
        .await
        .expect("insert")
}

fn count(answers: &[Inserted], which: Inserted) -> usize {
    answers.iter().filter(|&&a| a == which).count()
}

fn open_err(path: impl AsRef<Path>, namespace: &str) -> StoreError {
    match EmbeddedStore::open(path, namespace) {
        Ok(store) => panic!("expected an error, opened {store:?}"),
        Err(e) => e,
    }
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

#[tokio::test]
async fn restart_remembers_every_key() {
    let dir = TempDir::new().unwrap();
    let keys: Vec<Vec<u8>> = (0..100_000).map(key).collect();
    {
        let store = EmbeddedStore::open(dir.path(), "restart").unwrap();
        for chunk in keys.chunks(1_000) {
            let a = insert(&store, chunk.to_vec(), TTL).await;
            assert_eq!(count(&a, Inserted::New), 1_000);
        }
    }
    let store = EmbeddedStore::open(dir.path(), "restart").unwrap();
    let mut new = 0;
    for chunk in keys.chunks(1_000) {
        new += count(&insert(&store, chunk.to_vec(), TTL).await, Inserted::New);
    }
    assert_eq!(new, 0, "keys accepted twice across a restart");
    // Another namespace in the same directory has none of them.
    let other = EmbeddedStore::open(dir.path(), "restart-other").unwrap();
    let a = insert(&other, keys[..1_000].to_vec(), TTL).await;
    assert_eq!(count(&a, Inserted::New), 1_000);
}

/// The bucket keyspaces' directories under the store (fjall keeps one per keyspace).
fn keyspace_dirs(path: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(path.join("keyspaces"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// Waits (at most 5 s) until `f` holds.
async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > Duration::from_secs(5) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Six batches with ttls 1.2 s apart land in six buckets (1.024 s wide for short ttls); the
/// ones whose keys have all expired are dropped whole, their files deleted, by the next call.
#[tokio::test]
async fn expiry_drops_whole_buckets_from_disk() {
    let dir = TempDir::new().unwrap();
    let store = EmbeddedStore::open(dir.path(), "expiry").unwrap();
    let empty = keyspace_dirs(dir.path());
    let ttl = |i: u64| Duration::from_millis(1_200 * (i + 1));
    for i in 0..6 {
        let keys = (i * 100..(i + 1) * 100).map(key).collect();
        assert_eq!(
            count(&insert(&store, keys, ttl(i)).await, Inserted::New),
            100
        );
    }
    let full = keyspace_dirs(dir.path());
    let buckets: BTreeSet<_> = full.difference(&empty).cloned().collect();
    assert_eq!(buckets.len(), 6, "{full:?}");

    // After 4 s the first two batches (ttl 1.2 s and 2.4 s) have expired and their buckets
    // ended (at most 1.024 s after their keys); the last three have not.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let probe = vec![key(0), key(150), key(350), key(450), key(550)];
    let a = insert(&store, probe, ttl(6)).await;
    use Inserted::{New, Present};
    assert_eq!(a, [New, New, Present, Present, Present]);
    let gone = || buckets.difference(&keyspace_dirs(dir.path())).count();
    assert!(
        eventually(|| gone() >= 2).await,
        "expired buckets still on disk"
    );
    assert!(gone() <= 3, "a live bucket was dropped");

    // Buckets that expire while the store is closed are dropped when it opens.
    drop(store);
    let before = keyspace_dirs(dir.path());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let store = EmbeddedStore::open(dir.path(), "expiry").unwrap();
    assert!(
        eventually(|| keyspace_dirs(dir.path()).len() < before.len()).await,
        "no bucket dropped at open"
    );
    let a = insert(&store, vec![key(350), key(0)], ttl(0)).await;
    assert_eq!(a, [New, Present]);
}

#[tokio::test]
async fn namespaces_in_one_directory_are_isolated() {
    let dir = TempDir::new().unwrap();
    let a = EmbeddedStore::open(dir.path(), "group-a").unwrap();
    let b = EmbeddedStore::open(dir.path(), "group-b").unwrap();
    // A namespace that is a prefix of another one's bucket names.
    let ab = EmbeddedStore::open(dir.path(), "group-a.b").unwrap();
    for store in [&a, &b, &ab] {
        assert_eq!(insert(store, vec![key(1)], TTL).await, [Inserted::New]);
    }
    a.remove(vec![key(1)]).await.unwrap();
    assert_eq!(insert(&b, vec![key(1)], TTL).await, [Inserted::Present]);
    assert_eq!(insert(&ab, vec![key(1)], TTL).await, [Inserted::Present]);
    drop((a, b, ab));

    let a = EmbeddedStore::open(dir.path(), "group-a").unwrap();
    let b = EmbeddedStore::open(dir.path(), "group-b").unwrap();
    assert_eq!(insert(&a, vec![key(1)], TTL).await, [Inserted::New]);
    assert_eq!(insert(&b, vec![key(1)], TTL).await, [Inserted::Present]);
}

#[tokio::test]
async fn opening_again_in_this_process_shares_the_store() {
    let dir = TempDir::new().unwrap();
    let first = EmbeddedStore::open(dir.path(), "shared").unwrap();
    let second = EmbeddedStore::open(dir.path(), "shared").unwrap();
    assert_eq!(insert(&first, vec![key(7)], TTL).await, [Inserted::New]);
    assert_eq!(
        insert(&second, vec![key(7)], TTL).await,
        [Inserted::Present]
    );

    // Concurrent batches through both handles: each key is new exactly once.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = if i % 2 == 0 {
                first.clone()
            } else {
                second.clone()
            };
            tokio::spawn(async move { insert(&store, (100..400).map(key).collect(), TTL).await })
        })
        .collect();
    let mut new = 0;
    for t in tasks {
        new += count(&t.await.unwrap(), Inserted::New);
    }
    assert_eq!(new, 300);
}

#[tokio::test]
async fn keys_of_any_bytes_and_the_length_limit() {
    let dir = TempDir::new().unwrap();
    let store = EmbeddedStore::open(dir.path(), "keys").unwrap();
    let longest = vec![b'l'; EmbeddedStore::MAX_KEY_LEN];
    let keys = vec![
        Vec::new(),
        vec![0],
        vec![0xff; 3],
        "ключ".as_bytes().to_vec(),
        longest,
    ];
    assert_eq!(insert(&store, keys.clone(), TTL).await, [Inserted::New; 5]);
    assert_eq!(insert(&store, keys, TTL).await, [Inserted::Present; 5]);

    // One key too long fails its batch before anything is written.
    let batch = vec![key(1), vec![b'h'; 1 << 20], key(2)];
    match store.insert(InsertBatch::new(batch, TTL)).await {
        Err(StoreError::KeyTooLong { len, max }) => {
            assert_eq!((len, max), (1 << 20, EmbeddedStore::MAX_KEY_LEN));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        insert(&store, vec![key(1), key(2)], TTL).await,
        [Inserted::New; 2]
    );
    // Removing a key that cannot be stored is no error; an empty batch neither.
    store.remove(vec![vec![b'h'; 1 << 20]]).await.unwrap();
    assert_eq!(insert(&store, Vec::new(), TTL).await, []);
}

#[test]
fn works_without_a_tokio_runtime() {
    let dir = TempDir::new().unwrap();
    let store = EmbeddedStore::open(dir.path(), "no-runtime").unwrap();
    let batch = || InsertBatch::new(vec![key(1)], TTL);
    let first = futures::executor::block_on(store.insert(batch())).unwrap();
    let again = futures::executor::block_on(store.insert(batch())).unwrap();
    assert_eq!(
        (first, again),
        (vec![Inserted::New], vec![Inserted::Present])
    );
}

#[test]
fn auto_traits() {
    fn assert_store<S: Store + Clone + Send + Sync + Unpin + 'static>() {}
    assert_store::<EmbeddedStore>();
}

// ---- Claims ----

async fn claim(
    store: &EmbeddedStore,
    keys: Vec<Vec<u8>>,
    lease: Duration,
) -> (Token, Vec<Claimed>) {
    let batch = ClaimBatch::new(keys, lease);
    let token = batch.token;
    (token, store.claim(batch).await.expect("claim"))
}

fn held(keys: &[Vec<u8>], token: Token) -> Vec<HeldKey> {
    keys.iter().map(|k| (k.clone(), token)).collect()
}

/// A claim in flight when the process stops is still in flight after it starts again (its
/// owner's retry is `Mine`, anybody else is held back), and its lease frees it even though
/// nobody released it; the late owner's commit is then refused.
#[tokio::test]
async fn a_claim_in_flight_survives_a_restart_until_its_lease_runs_out() {
    use Claimed::{InFlight, Mine};
    let dir = TempDir::new().unwrap();
    let lease = Duration::from_millis(1_500);
    let keys: Vec<Vec<u8>> = (0..1_000).map(key).collect();
    let batch = ClaimBatch::new(keys.clone(), lease);
    let owner = batch.token;
    {
        let store = EmbeddedStore::open(dir.path(), "claims").unwrap();
        assert_eq!(store.claim(batch.clone()).await.unwrap(), [Mine; 1_000]);
    }
    let store = EmbeddedStore::open(dir.path(), "claims").unwrap();
    assert_eq!(claim(&store, keys.clone(), TTL).await.1, [InFlight; 1_000]);
    // The owner's retry of its claim (the answer was lost in the crash) is still its own.
    assert_eq!(store.claim(batch).await.unwrap(), [Mine; 1_000]);
    // In flight counts as present for mark-on-emit too.
    assert_eq!(
        count(
            &insert(&store, keys[..10].to_vec(), TTL).await,
            Inserted::Present
        ),
        10
    );

    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let (taker, again) = claim(&store, keys.clone(), TTL).await;
    assert_eq!(again, [Mine; 1_000], "a lease that ran out frees its key");
    assert_eq!(
        store.commit(held(&keys, owner), TTL).await.unwrap(),
        [false; 1_000],
        "the late owner must not overwrite the new claim"
    );
    store.release(held(&keys, owner)).await.unwrap();
    assert_eq!(claim(&store, keys.clone(), TTL).await.1, [InFlight; 1_000]);
    assert_eq!(
        store.commit(held(&keys, taker), TTL).await.unwrap(),
        [true; 1_000]
    );
}

/// Committed keys are done after a restart; a released key is free; a key whose commit was
/// retried after the restart is still the committer's.
#[tokio::test]
async fn a_committed_key_survives_a_restart() {
    use Claimed::{Done, Mine};
    let dir = TempDir::new().unwrap();
    let keys: Vec<Vec<u8>> = (0..2_000).map(key).collect();
    let (committed, released) = keys.split_at(1_500);
    let owner = {
        let store = EmbeddedStore::open(dir.path(), "commits").unwrap();
        let (owner, mine) = claim(&store, keys.clone(), Duration::from_secs(30)).await;
        assert_eq!(mine, [Mine; 2_000]);
        let answers = store.commit(held(committed, owner), TTL).await.unwrap();
        assert_eq!(answers, [true; 1_500]);
        store.release(held(released, owner)).await.unwrap();
        owner
    };
    let store = EmbeddedStore::open(dir.path(), "commits").unwrap();
    let (_, after) = claim(&store, keys.clone(), Duration::from_secs(30)).await;
    assert_eq!(after[..1_500], [Done; 1_500]);
    assert_eq!(after[1_500..], [Mine; 500]);
    assert_eq!(
        count(
            &insert(&store, committed.to_vec(), TTL).await,
            Inserted::Present
        ),
        1_500
    );
    // A retried commit (its first answer lost) is still accepted.
    let again = store
        .commit(held(&committed[..10], owner), TTL)
        .await
        .unwrap();
    assert_eq!(again, [true; 10]);
    let other = store
        .commit(held(&committed[..10], Token::new()), TTL)
        .await
        .unwrap();
    assert_eq!(other, [false; 10]);
}

/// A commit moves the key's record from its lease's bucket to its ttl's, and a commit retried
/// with another ttl moves it again: the key is never found twice, and expires after the ttl
/// of its last commit.
#[tokio::test]
async fn a_commit_expires_after_its_ttl() {
    let dir = TempDir::new().unwrap();
    let store = EmbeddedStore::open(dir.path(), "commit-ttl").unwrap();
    let short = Duration::from_millis(300);
    let (token, _) = claim(&store, vec![key(1)], TTL).await;
    let commit = |ttl| store.commit(held(&[key(1)], token), ttl);
    assert_eq!(commit(TTL).await.unwrap(), [true]);
    assert_eq!(claim(&store, vec![key(1)], TTL).await.1, [Claimed::Done]);
    assert_eq!(commit(short).await.unwrap(), [true]);
    assert_eq!(claim(&store, vec![key(1)], TTL).await.1, [Claimed::Done]);
    tokio::time::sleep(short + Duration::from_millis(20)).await;
    assert_eq!(claim(&store, vec![key(1)], TTL).await.1, [Claimed::Mine]);
}

/// Leases go into buckets about one lease wide, dropped whole once every lease in them has
/// run out: a store whose consumers died leaves nothing behind. Short leases share the
/// narrowest bucket (1.024 s).
#[tokio::test]
async fn expired_leases_are_dropped_from_disk() {
    let dir = TempDir::new().unwrap();
    let store = EmbeddedStore::open(dir.path(), "leases").unwrap();
    let empty = keyspace_dirs(dir.path());
    let lease = Duration::from_millis(300);
    let keys: Vec<Vec<u8>> = (0..100).map(key).collect();
    assert_eq!(
        claim(&store, keys.clone(), lease).await.1,
        [Claimed::Mine; 100]
    );
    let with_leases = keyspace_dirs(dir.path());
    let buckets: BTreeSet<_> = with_leases.difference(&empty).cloned().collect();
    assert_eq!(buckets.len(), 1, "{with_leases:?}");
    // The lease's bucket ends at most 1.024 s after the lease.
    tokio::time::sleep(Duration::from_millis(1_400)).await;
    assert_eq!(claim(&store, vec![key(0)], TTL).await.1, [Claimed::Mine]);
    let gone = || buckets.difference(&keyspace_dirs(dir.path())).count();
    assert!(
        eventually(|| gone() == 1).await,
        "an expired lease bucket is still on disk"
    );
}

/// A key too long to store fails its claim or commit as `KeyTooLong`; releasing it is no
/// error; empty calls answer at once.
#[tokio::test]
async fn claims_of_keys_too_long() {
    let dir = TempDir::new().unwrap();
    let store = EmbeddedStore::open(dir.path(), "long-claims").unwrap();
    let long = vec![b'l'; EmbeddedStore::MAX_KEY_LEN + 1];
    let err = store
        .claim(ClaimBatch::new(vec![key(1), long.clone()], TTL))
        .await;
    assert!(matches!(err, Err(StoreError::KeyTooLong { .. })), "{err:?}");
    let err = store
        .commit(held(std::slice::from_ref(&long), Token::new()), TTL)
        .await;
    assert!(matches!(err, Err(StoreError::KeyTooLong { .. })), "{err:?}");
    store.release(held(&[long], Token::new())).await.unwrap();
    // Nothing of the failed batch was written.
    assert_eq!(claim(&store, vec![key(1)], TTL).await.1, [Claimed::Mine]);
    assert_eq!(claim(&store, Vec::new(), TTL).await.1, []);
    assert!(store.commit(Vec::new(), TTL).await.unwrap().is_empty());
}

/// The store against the reference (`MemoryStore`) on a seeded random mix of claims, commits,
/// releases, inserts and removes of a few keys with a few tokens (so that retries, other
/// owners and done keys meet): the same answer to every call.
#[tokio::test]
async fn claims_agree_with_the_memory_store() {
    use stream_dedup::store::MemoryStore;
    let dir = TempDir::new().unwrap();
    let store = EmbeddedStore::open(dir.path(), "model").unwrap();
    let model = MemoryStore::new();
    let tokens: Vec<Token> = (0..4).map(|_| Token::new()).collect();
    let mut rng = 0x5eed_u64;
    let mut next = move |n: u64| {
        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    };
    for step in 0..600 {
        // Up to four distinct keys of eight.
        let mut keys: Vec<Vec<u8>> = (0..=next(3)).map(|_| key(next(8))).collect();
        keys.sort();
        keys.dedup();
        let token = tokens[next(4) as usize];
        let held: Vec<HeldKey> = keys
            .iter()
            .map(|k| (k.clone(), tokens[next(4) as usize]))
            .collect();
        let what = next(10);
        match what {
            0..=3 => {
                let batch = ClaimBatch::new(keys, TTL).with_token(token);
                let a = store.claim(batch.clone()).await.unwrap();
                assert_eq!(a, model.claim(batch).await.unwrap(), "step {step}: claim");
            }
            4..=5 => {
                let a = store.commit(held.clone(), TTL).await.unwrap();
                assert_eq!(a, model.commit(held, TTL).await.unwrap(), "step {step}");
            }
            6..=7 => {
                store.release(held.clone()).await.unwrap();
                model.release(held).await.unwrap();
            }
            8 => {
                let batch = InsertBatch::new(keys, TTL).with_token(token);
                let a = store.insert(batch.clone()).await.unwrap();
                assert_eq!(a, model.insert(batch).await.unwrap(), "step {step}: insert");
            }
            _ => {
                store.remove(keys.clone()).await.unwrap();
                model.remove(keys).await.unwrap();
            }
        }
    }
}

// ---- The format of older files ----

/// The marker of the store at `path`, read with fjall itself.
fn format_marker(path: &Path) -> String {
    let db = fjall::Database::builder(path).open().unwrap();
    let marker = db
        .keyspace("stream-dedup", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    String::from_utf8(marker.get("format").unwrap().unwrap().to_vec()).unwrap()
}

/// A store as the insert-only version wrote it (format 1, built here byte for byte with
/// fjall): its keys are done for both paths; the first claim marks the store format 2, and a
/// store that only ever inserts stays format 1.
#[tokio::test]
async fn format_1_files_read_as_done_keys() {
    let dir = TempDir::new().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let expires = now_ms + 600_000;
    let token = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10_u128;
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let marker = db
            .keyspace("stream-dedup", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        marker.insert("format", "stream-dedup embedded 1").unwrap();
        // ttl 600 s: buckets 2^16 ms wide.
        let name = format!("dedup#orders#16#{}", expires >> 16);
        let bucket = db
            .keyspace(&name, fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let mut value = token.to_be_bytes().to_vec();
        value.extend_from_slice(&expires.to_be_bytes());
        for i in 0..100 {
            let mut stored = vec![0u8];
            stored.extend_from_slice(&key(i));
            bucket.insert(stored, value.clone()).unwrap();
        }
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }

    let store = EmbeddedStore::open(dir.path(), "orders").unwrap();
    let old: Vec<Vec<u8>> = (0..100).map(key).collect();
    assert_eq!(
        count(&insert(&store, old.clone(), TTL).await, Inserted::Present),
        100
    );
    // The same token as the old records: a retry of the request that wrote them.
    let retry = InsertBatch::new(old[..5].to_vec(), TTL).with_token(Token::from_u128(token));
    assert_eq!(store.insert(retry).await.unwrap(), [Inserted::New; 5]);
    drop(store);
    assert_eq!(format_marker(dir.path()), "stream-dedup embedded 1");

    let store = EmbeddedStore::open(dir.path(), "orders").unwrap();
    assert_eq!(
        claim(&store, old.clone(), TTL).await.1,
        [Claimed::Done; 100]
    );
    // Commits of a done key by another claim are refused; done keys need no new format.
    let other = store
        .commit(held(&old[..3], Token::new()), TTL)
        .await
        .unwrap();
    assert_eq!(other, [false; 3]);
    drop(store);
    assert_eq!(format_marker(dir.path()), "stream-dedup embedded 1");

    // The first key in flight marks the store format 2 (a version without claims refuses it).
    let store = EmbeddedStore::open(dir.path(), "orders").unwrap();
    assert_eq!(claim(&store, vec![key(500)], TTL).await.1, [Claimed::Mine]);
    drop(store);
    assert_eq!(format_marker(dir.path()), "stream-dedup embedded 2");
    let store = EmbeddedStore::open(dir.path(), "orders").unwrap();
    let (_, after) = claim(&store, vec![key(0), key(500), key(501)], TTL).await;
    assert_eq!(after, [Claimed::Done, Claimed::InFlight, Claimed::Mine]);
}

/// A marker of a format this version does not know (a newer one) is refused as corrupt.
#[test]
fn an_unknown_format_is_refused() {
    let dir = TempDir::new().unwrap();
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let marker = db
            .keyspace("stream-dedup", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        marker.insert("format", "stream-dedup embedded 3").unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let e = open_err(dir.path(), "orders");
    assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
    assert!(chain(&e).contains("another format"), "{}", chain(&e));
}

// ---- Errors ----

#[test]
fn invalid_namespace_is_refused() {
    let dir = TempDir::new().unwrap();
    for bad in ["", "orders/eu", "a b", "a#b", "名前"] {
        let e = open_err(dir.path(), bad);
        assert!(matches!(e, StoreError::Backend { .. }), "{e:?}");
        assert!(chain(&e).contains("invalid namespace"), "{}", chain(&e));
    }
    // Nothing was created for them.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn missing_parent_is_unavailable() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("no/such/dir");
    let e = open_err(&path, "orders");
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    let text = chain(&e);
    assert!(text.contains("cannot create the directory"), "{text}");
    assert!(text.contains("no/such/dir"), "{text}");
}

#[test]
fn a_file_or_a_foreign_directory_is_refused() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a store").unwrap();
    let e = open_err(&file, "orders");
    assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
    assert!(chain(&e).contains("is not a directory"), "{}", chain(&e));

    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    let e = open_err(&foreign, "orders");
    assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
    assert!(chain(&e).contains("neither empty nor"), "{}", chain(&e));
    // And it was left as it was.
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);
}

#[test]
fn a_fjall_database_of_someone_else_is_refused() {
    let dir = TempDir::new().unwrap();
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let ks = db
            .keyspace("items", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        ks.insert("a", "b").unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let e = open_err(dir.path(), "orders");
    assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
    assert!(chain(&e).contains("did not write"), "{}", chain(&e));
}

/// A store with some keys in it, closed; returns its directory.
async fn filled_store() -> TempDir {
    let dir = TempDir::new().unwrap();
    let store = EmbeddedStore::open(dir.path(), "corrupt").unwrap();
    for chunk in (0..30_000).map(key).collect::<Vec<_>>().chunks(1_000) {
        insert(&store, chunk.to_vec(), TTL).await;
    }
    dir
}

fn files(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn flip(file: &Path, at: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = at.min(bytes.len().saturating_sub(8));
    for b in bytes.iter_mut().skip(at).take(8) {
        *b ^= 0x5a;
    }
    std::fs::write(file, bytes).unwrap();
}

#[tokio::test]
async fn damaged_files_are_corrupt() {
    // The version marker.
    let dir = filled_store().await;
    std::fs::write(dir.path().join("version"), b"garbage").unwrap();
    let e = open_err(dir.path(), "corrupt");
    assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");

    // The journal, where the recent batches are (checksums catch it).
    let dir = filled_store().await;
    flip(&dir.path().join("0.jnl"), 1 << 20);
    let e = open_err(dir.path(), "corrupt");
    assert!(matches!(e, StoreError::Corrupt(_)), "{}", chain(&e));

    // A table of the database's own catalogue.
    let dir = filled_store().await;
    let table = files(dir.path())
        .into_iter()
        .find(|f| f.parent().is_some_and(|p| p.ends_with("tables")))
        .expect("a table file");
    std::fs::write(&table, vec![0xa5; 4096]).unwrap();
    let e = open_err(dir.path(), "corrupt");
    assert!(matches!(e, StoreError::Corrupt(_)), "{}", chain(&e));
}

/// Garbage in any one file of the store: the store opens and works (fjall does not need that
/// file, or treats the damage as a torn write at the journal's end), or it refuses with
/// `Corrupt`. Never a panic, never another error.
#[tokio::test]
async fn garbage_in_any_file_never_panics() {
    let template = filled_store().await;
    let names: Vec<PathBuf> = files(template.path())
        .into_iter()
        .map(|f| f.strip_prefix(template.path()).unwrap().to_owned())
        .collect();
    let mut refused = 0;
    for name in &names {
        for damage in ["garbage", "truncate", "flip"] {
            let dir = TempDir::new().unwrap();
            for f in &names {
                let to = dir.path().join(f);
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::copy(template.path().join(f), to).unwrap();
            }
            let target = dir.path().join(name);
            let len = std::fs::metadata(&target).unwrap().len() as usize;
            match damage {
                "garbage" => std::fs::write(&target, vec![0xa5; len.clamp(1, 1 << 20)]).unwrap(),
                "truncate" => {
                    std::fs::write(&target, &std::fs::read(&target).unwrap()[..len / 2]).unwrap()
                }
                _ => flip(&target, len / 3),
            }
            match EmbeddedStore::open(dir.path(), "corrupt") {
                Ok(store) => {
                    let a = store.insert(InsertBatch::new(vec![key(1)], TTL)).await;
                    assert!(a.is_ok(), "{name:?} {damage}: {a:?}");
                }
                Err(StoreError::Corrupt(_)) => refused += 1,
                Err(e) => panic!("{name:?} {damage}: {}", chain(&e)),
            }
        }
    }
    assert!(refused > 0);
}

// ---- Locked by another process ----

const HOLD_ENV: &str = "STREAM_DEDUP_TEST_HOLD_STORE";

/// Not a test by itself: `locked_by_another_process` runs it in a child process, which opens
/// the store at `$STREAM_DEDUP_TEST_HOLD_STORE`, says `READY`, and holds it until its stdin
/// closes.
#[test]
#[ignore = "run by locked_by_another_process in a child process"]
fn hold_store_for_parent() {
    let Ok(path) = std::env::var(HOLD_ENV) else {
        return;
    };
    let store = EmbeddedStore::open(&path, "locked").unwrap();
    println!("READY");
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {}
    drop(store);
}

#[tokio::test]
async fn locked_by_another_process() {
    let dir = TempDir::new().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hold_store_for_parent",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLD_ENV, dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // libtest prints `test hold_store_for_parent ... ` before the child's own `READY`.
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if line.ends_with("READY") {
                let _ = ready_tx.send(());
            }
        }
    });
    if ready.recv_timeout(Duration::from_secs(60)).is_err() {
        child.kill().unwrap();
        panic!("the child did not open the store");
    }

    let e = open_err(dir.path(), "locked");
    assert!(matches!(e, StoreError::Locked(_)), "{}", chain(&e));
    // Another namespace in the same directory: the directory is locked as a whole.
    let e = open_err(dir.path(), "other");
    assert!(matches!(e, StoreError::Locked(_)), "{}", chain(&e));

    // Once the child lets go, this process opens it.
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(status.success());
    let store = EmbeddedStore::open(dir.path(), "locked").unwrap();
    assert_eq!(insert(&store, vec![key(1)], TTL).await, [Inserted::New]);
}
