//! Nothing lost under faults and odd settings: keys read ahead but never emitted are taken
//! back, a call applied after its timeout is taken back under fail closed, a key too long for
//! the store fails alone, extreme settings never panic inside a poll, and a panicking key
//! function ends the stream. A property test runs the store path against a fault-injecting
//! store for every backend configured here.

mod support;

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::{FutureExt, StreamExt, stream};
use proptest::prelude::*;
#[cfg(feature = "embedded")]
use stream_dedup::store::EmbeddedStore;
#[cfg(feature = "mysql")]
use stream_dedup::store::MySqlStore;
#[cfg(feature = "postgres")]
use stream_dedup::store::PostgresStore;
#[cfg(feature = "redis")]
use stream_dedup::store::RedisStore;
use stream_dedup::store::{ClaimStore, InsertBatch, Inserted, MemoryStore, Store, StoreError};
use stream_dedup::{DedupStreamExt, FailurePolicy, StoreWindow, TryDedupStreamExt, Window};
use support::faulty::{FaultyStore, Mode};
#[cfg(feature = "embedded")]
use tempfile::TempDir;

const TTL: Duration = Duration::from_secs(600);

fn window<S: Store>(store: S) -> StoreWindow<S> {
    Window::max_keys(10_000).ttl(TTL).store(store)
}

#[derive(Debug, Clone, PartialEq)]
struct AppError(String);

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError(e.to_string())
    }
}

/// Whether `key` is recorded in `store`: asked with one fresh token, again and again for up to
/// `patience` while the answer is "present" (a take-back started as an operator was dropped
/// may still be running: on a busy machine the embedded store's write waits for a thread). A
/// key found absent is recorded with the question's token, which later questions with the
/// same token answer as absent again.
async fn recorded_within<S: Store>(store: &S, key: u32, patience: Duration) -> bool {
    let batch = InsertBatch::new(vec![key.to_be_bytes().to_vec()], TTL);
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let answer = store.insert(batch.clone()).await.expect("insert");
        if answer == [Inserted::New] {
            return false;
        }
        if tokio::time::Instant::now() >= deadline {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `key` is recorded in `store` now.
async fn recorded<S: Store>(store: &S, key: u32) -> bool {
    recorded_within(store, key, Duration::ZERO).await
}

/// A fresh embedded store in a temporary directory (kept alive by the returned guard).
#[cfg(feature = "embedded")]
fn embedded() -> (EmbeddedStore, TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), "faults").expect("open");
    (store, dir)
}

/// A Redis store under a fresh namespace, if `STREAM_DEDUP_REDIS_URL` is set.
#[cfg(feature = "redis")]
async fn redis(test: &str) -> Option<RedisStore> {
    let Ok(url) = std::env::var("STREAM_DEDUP_REDIS_URL") else {
        eprintln!("skipped: {test} on Redis (set STREAM_DEDUP_REDIS_URL)");
        return None;
    };
    let ns = format!(
        "faults-{test}-{}-{}",
        std::process::id(),
        stream_dedup::store::Token::new()
    );
    Some(RedisStore::connect(&url, &ns).await.expect("connect"))
}

/// A namespace of its own for one case of `test`.
#[cfg(any(feature = "postgres", feature = "mysql"))]
fn case_namespace(test: &str) -> String {
    format!(
        "faults-{test}-{}-{}",
        std::process::id(),
        stream_dedup::store::Token::new()
    )
}

/// A PostgreSQL store under a fresh namespace, if `STREAM_DEDUP_POSTGRES_URL` is set.
#[cfg(feature = "postgres")]
async fn postgres(test: &str) -> Option<PostgresStore> {
    let url = std::env::var("STREAM_DEDUP_POSTGRES_URL").ok()?;
    let store = PostgresStore::builder(&case_namespace(test))
        .max_connections(4)
        .connect(&url)
        .await
        .expect("connect");
    Some(store)
}

/// A MySQL store under a fresh namespace, if `STREAM_DEDUP_MYSQL_URL` is set.
#[cfg(feature = "mysql")]
async fn mysql(test: &str) -> Option<MySqlStore> {
    let url = std::env::var("STREAM_DEDUP_MYSQL_URL").ok()?;
    let store = MySqlStore::builder(&case_namespace(test))
        .connect(&url)
        .await
        .expect("connect");
    Some(store)
}

// ---- 1. Keys read ahead but never emitted ------------------------------------------------

/// The case: the consumer takes 10 items of 1,000 and stops; the other 990 were read
/// ahead (up to `batch_size × (max_in_flight + 1)`), recorded, and must be taken back, so that
/// the broker's redeliveries are processed.
async fn read_ahead_is_taken_back<S: Store + Clone>(store: S, settle: Duration) {
    let first: Vec<u32> = stream::iter(0..1000u32)
        .dedup_by_key(|k| *k, window(store.clone()))
        .take(10)
        .collect()
        .await;
    assert_eq!(first, (0..10).collect::<Vec<_>>());
    // The take-back was started as the operator was dropped; a remote store answers later.
    tokio::time::sleep(settle).await;
    let again = stream::iter(10..1000u32)
        .dedup_by_key(|k| *k, window(store.clone()))
        .count()
        .await;
    assert_eq!(again, 990, "keys of items never emitted stayed recorded");
    // The ten that were emitted stay recorded.
    let first_again = stream::iter(0..10u32)
        .dedup_by_key(|k| *k, window(store))
        .count()
        .await;
    assert_eq!(first_again, 0);
}

#[tokio::test]
async fn read_ahead_is_taken_back_in_memory() {
    // The memory store takes back at once: no wait at all.
    read_ahead_is_taken_back(MemoryStore::new(), Duration::ZERO).await;
}

#[cfg(feature = "embedded")]
#[tokio::test]
async fn read_ahead_is_taken_back_embedded() {
    let (store, _dir) = embedded();
    read_ahead_is_taken_back(store, Duration::from_millis(200)).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
#[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
async fn read_ahead_is_taken_back_on_redis() {
    if let Some(store) = redis("read-ahead").await {
        read_ahead_is_taken_back(store, Duration::from_millis(200)).await;
    }
}

/// A consumer that stops in the middle of a `select!` (the operator dropped with calls still in
/// flight): the keys of those calls are taken back too.
#[tokio::test(start_paused = true)]
async fn keys_of_calls_in_flight_are_taken_back() {
    let store = FaultyStore::new();
    store.set(Mode::Slow(Duration::from_millis(100)));
    let mut unique = stream::iter(0..100u32).dedup_by_key(|k| *k, window(store.clone()));
    tokio::select! {
        _ = unique.next() => panic!("the store answers after 100 ms"),
        () = tokio::time::sleep(Duration::from_millis(10)) => {}
    }
    drop(unique);
    store.set(Mode::Up);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for k in 0..100 {
        assert!(!recorded(&store.inner, k).await, "key {k} stayed recorded");
    }
}

// ---- 2. Fail closed, and a call applied after its timeout -------------------------------

/// The call records its keys, then never answers: under fail closed the items' errors are
/// yielded, the keys are taken back (with the call's token), and the redelivery is processed.
async fn fail_closed_takes_back(policy: FailurePolicy) {
    let store = FaultyStore::new();
    store.set(Mode::ApplyThenHang);
    let w = || {
        window(store.clone())
            .timeout(Duration::from_millis(100))
            .on_failure(policy)
    };
    let out: Vec<Result<u32, AppError>> = stream::iter([Ok(1), Ok(2), Ok(1)])
        .try_dedup_by_key(|k: &u32| *k, w())
        .collect()
        .await;
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(Result::is_err), "{out:?}");
    assert!(
        out[0]
            .as_ref()
            .unwrap_err()
            .0
            .contains("may still have been applied"),
        "{out:?}"
    );
    store.set(Mode::Up);
    let again: Vec<Result<u32, AppError>> = stream::iter([Ok(1), Ok(2)])
        .try_dedup_by_key(|k: &u32| *k, w())
        .collect()
        .await;
    assert_eq!(again, [Ok(1), Ok(2)], "the late write was not taken back");
}

#[tokio::test(start_paused = true)]
async fn fail_closed_takes_back_a_call_applied_after_its_timeout() {
    fail_closed_takes_back(FailurePolicy::fail_closed()).await;
}

#[tokio::test(start_paused = true)]
async fn fail_closed_with_retries_takes_back_a_call_applied_after_its_timeout() {
    fail_closed_takes_back(FailurePolicy::fail_closed().retry(2, Duration::from_millis(10))).await;
}

/// Claims under fail closed: the claim applied after its timeout is freed, so the redelivery
/// is claimed at once, not after the lease.
#[tokio::test(start_paused = true)]
async fn fail_closed_claims_free_a_claim_applied_after_its_timeout() {
    let store = FaultyStore::new();
    store.set(Mode::ApplyThenHang);
    let w = || {
        Window::max_keys(100)
            .ttl(TTL)
            .lease(Duration::from_secs(3600))
            .store(store.clone())
            .timeout(Duration::from_millis(100))
            .on_failure(FailurePolicy::fail_closed())
    };
    let out: Vec<_> = stream::iter([Ok::<u32, AppError>(7)])
        .try_claim_by_key(|k| *k, w())
        .collect()
        .await;
    assert!(matches!(out[..], [Err(_)]));
    store.set(Mode::Up);
    let mut claims = stream::iter([Ok::<u32, AppError>(7)]).try_claim_by_key(|k| *k, w());
    let claim = claims
        .next()
        .await
        .expect("the redelivery")
        .expect("claimed");
    assert_eq!(*claim, 7);
    claim.commit().await.expect("commit");
}

// ---- 3. A key too long for the store fails alone ----------------------------------------

/// The embedded store takes keys up to 65,534 bytes; the window's default limit is 64 KiB, so a
/// 65,535-byte key passes the window's check. It must fail alone (the store's limit wins), and
/// the other keys of its batch must still be checked.
#[cfg(feature = "embedded")]
#[tokio::test]
async fn an_oversize_key_fails_alone() {
    let (store, _dir) = embedded();
    let huge = "h".repeat(EmbeddedStore::MAX_KEY_LEN + 1);
    let items = || stream::iter(["a".to_owned(), huge.clone(), "b".to_owned()]);
    let first = items().dedup_by_key(|k| k.clone(), window(store.clone()));
    let stats = first.stats();
    assert_eq!(first.collect::<Vec<_>>().await.len(), 3);
    assert_eq!(stats.unchecked(), 1);
    assert_eq!(stats.store_errors(), 0);
    // A new consumer: "a" and "b" are duplicates (the store has them), the long key passes
    // unchecked again.
    let again = items().dedup_by_key(|k| k.clone(), window(store.clone()));
    let stats = again.stats();
    assert_eq!(again.collect::<Vec<_>>().await, std::slice::from_ref(&huge));
    assert_eq!((stats.duplicates(), stats.unchecked()), (2, 1));
}

/// With claims, one oversize key does not fail the commit batch of the others.
#[cfg(feature = "embedded")]
#[tokio::test]
async fn an_oversize_key_does_not_fail_the_other_commits() {
    let (store, _dir) = embedded();
    let huge = "h".repeat(EmbeddedStore::MAX_KEY_LEN + 1);
    let items = || stream::iter(["a".to_owned(), huge.clone(), "b".to_owned()]);
    let claims: Vec<_> = items()
        .claim_by_key(|k| k.clone(), window(store.clone()))
        .collect()
        .await;
    assert_eq!(claims.len(), 3);
    let results = futures::future::join_all(claims.into_iter().map(|c| c.commit())).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // The store has "a" and "b" done: another consumer drops them.
    let again: Vec<_> = items()
        .claim_by_key(|k| k.clone(), window(store.clone()))
        .collect()
        .await;
    assert_eq!(again.len(), 1);
    assert_eq!(*again[0], huge);
}

// ---- 4. and 5. Extreme settings ---------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn extreme_settings_never_panic_in_a_poll() {
    // A lease of Duration::MAX, in memory and through a store with a ttl of Duration::MAX.
    let claims: Vec<_> = stream::iter([1u8, 1])
        .claim_by_key(|k| *k, Window::max_keys(10).lease(Duration::MAX))
        .collect()
        .await;
    assert_eq!(claims.len(), 1);
    let w = Window::max_keys(10)
        .ttl(Duration::MAX)
        .lease(Duration::MAX)
        .store(MemoryStore::new())
        .max_in_flight(usize::MAX)
        .batch_size(usize::MAX);
    let claims: Vec<_> = stream::iter([1u8, 2, 1])
        .claim_by_key(|k| *k, w)
        .collect()
        .await;
    assert_eq!(claims.len(), 2);
    for c in claims {
        c.commit().await.expect("commit");
    }
    // The memory store with a ttl of u64::MAX seconds.
    let store = MemoryStore::new();
    let ttl = Duration::from_secs(u64::MAX);
    let a = store
        .insert(InsertBatch::new(vec![b"k".to_vec()], ttl))
        .await;
    assert_eq!(a.expect("insert"), [Inserted::New]);
    // Retries with a backoff of Duration::MAX (clamped to an hour) and a store that is down.
    let down = FaultyStore::new();
    down.set(Mode::Down);
    let out: Vec<Result<u8, AppError>> = stream::iter([Ok(1)])
        .try_dedup_by_key(
            |k| *k,
            window(down.clone()).on_failure(FailurePolicy::fail_closed().retry(3, Duration::MAX)),
        )
        .collect()
        .await;
    assert!(matches!(out[..], [Err(_)]));
    assert_eq!(down.calls(), 4);
    // max_in_flight(usize::MAX) reads (it used to wrap an addition and never read).
    let out: Vec<u8> = stream::iter([1u8, 2, 2, 3])
        .dedup_by_key(|k| *k, window(MemoryStore::new()).max_in_flight(usize::MAX))
        .collect()
        .await;
    assert_eq!(out, [1, 2, 3]);
}

// ---- 6. A panicking key function -------------------------------------------------------

#[tokio::test]
async fn a_panicking_key_function_ends_the_stream() {
    let mut unique = stream::iter(0..10u32).dedup_by_key(
        |k| {
            assert!(*k != 3, "a key function that panics on item 3");
            *k
        },
        window(MemoryStore::new()),
    );
    let first = AssertUnwindSafe(unique.next()).catch_unwind().await;
    assert!(
        first.is_err(),
        "the key function panicked in the first batch"
    );
    let after = tokio::time::timeout(Duration::from_secs(5), unique.next())
        .await
        .expect("a poll after the panic must not hang");
    assert_eq!(after, None);
}

// ---- The property: nothing lost, whatever the store does --------------------------------

/// What one store call does in the property test.
fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        4 => Just(Mode::Up),
        1 => Just(Mode::Down),
        1 => Just(Mode::Hang),
        1 => Just(Mode::ApplyThenHang),
        1 => (1u64..80).prop_map(|ms| Mode::ApplyThenSlow(Duration::from_millis(ms))),
        1 => (1u64..80).prop_map(|ms| Mode::Slow(Duration::from_millis(ms))),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    keys: Vec<u32>,
    /// The consumer reads this many outputs, then drops the operator.
    stop_at: usize,
    plan: Vec<Mode>,
    fail_open: bool,
    batch_size: usize,
    max_in_flight: usize,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(0u32..40, 0..60),
        0usize..70,
        prop::collection::vec(mode(), 0..12),
        any::<bool>(),
        1usize..8,
        1usize..4,
    )
        .prop_map(
            |(keys, stop_at, plan, fail_open, batch_size, max_in_flight)| Case {
                keys,
                stop_at,
                plan,
                fail_open,
                batch_size,
                max_in_flight,
            },
        )
}

/// Runs one case against `inner` behind a fault-injecting store; checks that every key of an
/// item that was not emitted is absent from the store once the operator is dropped (and the
/// take-backs it started have run), and that what was emitted is in input order with no key
/// twice.
async fn nothing_lost<S: Store + Clone>(inner: S, c: Case, settle: Duration) {
    let store = FaultyStore::wrap(inner.clone());
    store.plan(c.plan.iter().copied());
    let policy = if c.fail_open {
        FailurePolicy::fail_open()
    } else {
        FailurePolicy::fail_closed()
    };
    let w = window(store.clone())
        .timeout(Duration::from_millis(50))
        .batch_size(c.batch_size)
        .max_in_flight(c.max_in_flight)
        .on_failure(policy);
    let mut unique = stream::iter(c.keys.clone().into_iter().map(Ok::<u32, AppError>))
        .try_dedup_by_key(|k| *k, w);
    let mut emitted = Vec::new();
    let mut outputs = 0;
    while outputs < c.stop_at {
        match unique.next().await {
            Some(Ok(k)) => emitted.push(k),
            Some(Err(_)) => {}
            None => break,
        }
        outputs += 1;
    }
    drop(unique);
    // The detached take-backs (and any call still answering late) finish.
    tokio::time::sleep(settle).await;
    // In input order (each emitted key's first copy), no key twice.
    let mut seen = std::collections::HashSet::new();
    assert!(
        emitted.iter().all(|k| seen.insert(*k)),
        "a key emitted twice: {emitted:?}"
    );
    // In input order: each emitted key is a copy after the previous one's (a key's first
    // copy may have failed, and a later copy been emitted).
    let mut at = 0;
    for k in &emitted {
        match c.keys[at..].iter().position(|x| x == k) {
            Some(p) => at += p + 1,
            None => panic!("out of order: {emitted:?} from {:?}", c.keys),
        }
    }
    for k in c
        .keys
        .iter()
        .copied()
        .collect::<std::collections::BTreeSet<_>>()
    {
        if !seen.contains(&k) {
            assert!(
                !recorded_within(&inner, k, settle * 10).await,
                "key {k} was never emitted but stayed recorded ({c:?}, emitted {emitted:?})"
            );
        }
    }
}

/// Runs one case on the store `open` gives (a server's, on a fresh namespace), in real time;
/// nothing when its server is not configured.
#[cfg(any(feature = "redis", feature = "postgres", feature = "mysql"))]
fn nothing_lost_on_server<S: Store + Clone>(
    open: impl std::future::Future<Output = Option<S>>,
    c: Case,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        if let Some(store) = open.await {
            nothing_lost(store, c, Duration::from_millis(300)).await;
        }
    });
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn nothing_lost_in_memory(c in case()) {
        paused_runtime().block_on(nothing_lost(MemoryStore::new(), c, Duration::from_millis(500)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[cfg(feature = "embedded")]
    #[test]
    fn nothing_lost_embedded(c in case()) {
        // Real time: the embedded store runs its writes on blocking threads.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let (store, _dir) = embedded();
        rt.block_on(nothing_lost(store, c, Duration::from_millis(300)));
    }

    #[cfg(feature = "redis")]
    #[test]
    #[cfg_attr(not(server_redis), ignore = "set STREAM_DEDUP_REDIS_URL")]
    fn nothing_lost_on_redis(c in case()) {
        nothing_lost_on_server(redis("nothing-lost"), c);
    }

    #[cfg(feature = "postgres")]
    #[test]
    #[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
    fn nothing_lost_on_postgres(c in case()) {
        nothing_lost_on_server(postgres("nothing-lost"), c);
    }

    #[cfg(feature = "mysql")]
    #[test]
    #[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
    fn nothing_lost_on_mysql(c in case()) {
        nothing_lost_on_server(mysql("nothing-lost"), c);
    }
}

/// The claim stores too: the same property through `try_claim_by_key`, where a claim emitted
/// is committed, and an item not emitted must leave its key free.
async fn nothing_lost_claims<S: ClaimStore + Clone>(inner: S, c: Case, settle: Duration) {
    let store = FaultyStore::wrap(inner.clone());
    store.plan(c.plan.iter().copied());
    let policy = if c.fail_open {
        FailurePolicy::fail_open()
    } else {
        FailurePolicy::fail_closed()
    };
    let w = window(store.clone())
        .timeout(Duration::from_millis(50))
        .batch_size(c.batch_size)
        .max_in_flight(c.max_in_flight)
        .on_failure(policy);
    let mut claims = stream::iter(c.keys.clone().into_iter().map(Ok::<u32, AppError>))
        .try_claim_by_key(|k| *k, w);
    let mut emitted = Vec::new();
    let mut outputs = 0;
    while outputs < c.stop_at {
        match claims.next().await {
            Some(Ok(claim)) => emitted.push(claim.release()),
            Some(Err(_)) => {}
            None => break,
        }
        outputs += 1;
    }
    drop(claims);
    tokio::time::sleep(settle).await;
    // Released or never emitted: every key is free again (claimable at once).
    for k in c
        .keys
        .iter()
        .copied()
        .collect::<std::collections::BTreeSet<_>>()
    {
        assert!(
            !recorded(&inner, k).await,
            "key {k} stayed held ({c:?}, emitted {emitted:?})"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn nothing_held_in_memory_claims(c in case()) {
        paused_runtime().block_on(nothing_lost_claims(MemoryStore::new(), c, Duration::from_millis(500)));
    }
}
