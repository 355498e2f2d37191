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

    fn as_claim_store(&self) -> Option<&dyn ClaimStore> {
        Some(self)
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
}

async fn make(namespace: String) -> Option<TestStore> {
    let dir = TempDir::new().expect("temp dir");
    let store = EmbeddedStore::open(dir.path().join("store"), &namespace).expect("open");
    Some(TestStore {
        store,
        _dir: Arc::new(dir),
    })
}

// Expiry stamps are exact to the millisecond; a little slack for a slow machine.
store_suite!(make, expiry = Duration::from_millis(20));
claim_suite!(make, expiry = Duration::from_millis(20));

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
