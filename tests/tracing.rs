//! The `tracing` events: a store that goes down mid-stream gives a few warnings, not one per
//! item, each naming the window and counting the items that passed unchecked (or were
//! withheld); the store answering again is said once; lost leases and failed commits are
//! warned about; and no event carries a key's bytes.
//!
//! Events are captured by a small subscriber of this file, installed for the test's thread
//! (the tests run on a current-thread runtime, so the operators' tasks run there too).

mod support;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, stream};
use stream_dedup::store::{MemoryStore, StoreError};
use stream_dedup::{DedupStreamExt, FailurePolicy, TryDedupStreamExt, Window};
use support::faulty::{FaultyStore, Mode};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

/// Every key of these tests holds this, so that a key in an event is found.
const MARKER: &str = "secret-marker";

const TTL: Duration = Duration::from_secs(3600);

/// One event: its level, message and fields, as text.
#[derive(Clone, Debug)]
struct Captured {
    level: Level,
    target: String,
    fields: BTreeMap<String, String>,
}

impl Captured {
    fn message(&self) -> &str {
        self.fields.get("message").map_or("", String::as_str)
    }

    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    fn count(&self, name: &str) -> u64 {
        self.field(name)
            .map_or(0, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v}")))
    }
}

/// A subscriber that keeps every event of the crate.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

impl Capture {
    fn events(&self) -> Vec<Captured> {
        self.0.lock().unwrap().clone()
    }

    fn at(&self, level: Level) -> Vec<Captured> {
        self.events()
            .into_iter()
            .filter(|e| e.level == level)
            .collect()
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl Subscriber for Capture {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }

    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let target = event.metadata().target();
        if !target.starts_with("stream_dedup") {
            return;
        }
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: target.to_owned(),
            fields,
        });
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Captures the events of this thread until the guard is dropped.
fn capture() -> (Capture, tracing::subscriber::DefaultGuard) {
    let capture = Capture::default();
    let guard = tracing::subscriber::set_default(capture.clone());
    (capture, guard)
}

fn key(i: u32) -> String {
    format!("{MARKER}-{i}")
}

/// No event holds a key's bytes, and every event names the window and the store.
fn check_fields(events: &[Captured], window: &str, store: &str) {
    assert!(!events.is_empty());
    for e in events {
        assert_eq!(e.target, "stream_dedup");
        for (name, value) in &e.fields {
            assert!(!value.contains(MARKER), "{name}={value} holds a key: {e:?}");
        }
        assert_eq!(e.field("window"), Some(window), "{e:?}");
        assert!(e.field("store").is_some_and(|s| s.contains(store)), "{e:?}");
    }
}

/// Items that come one at a time, 10 ms apart (paused time): each is a store call of its own.
/// The store goes down at item `down` and comes back at item `up`.
fn paced(
    n: u32,
    store: &FaultyStore,
    down: u32,
    up: u32,
) -> impl futures::Stream<Item = String> + use<> {
    let store = store.clone();
    stream::iter(0..n).then(move |i| {
        let store = store.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            // Set as the item is read: its call is the first to see it.
            if i == down {
                store.set(Mode::Down);
            }
            if i == up {
                store.set(Mode::Up);
            }
            key(i)
        }
    })
}

/// 5,000 items, of which 3,000 meet a store that is down for 30 s: a handful of warnings (one
/// at once, then one per 10 s), one line when the store answers again, and the items counted
/// in them add up to the unchecked ones.
#[tokio::test(start_paused = true)]
async fn a_store_down_mid_stream_gives_a_few_warnings() {
    let (capture, _guard) = capture();
    let store = FaultyStore::new();
    let window = Window::max_keys(100_000)
        .ttl(TTL)
        .name("orders")
        .store(store.clone());
    let unique = paced(5_000, &store, 1_000, 4_000).dedup_by_key(|k| k.clone(), window);
    let stats = unique.stats();
    let out: Vec<String> = unique.collect().await;
    assert_eq!(out.len(), 5_000);
    assert_eq!(stats.unchecked(), 3_000);

    let events = capture.events();
    check_fields(&events, "orders", "FaultyStore");
    let warnings = capture.at(Level::WARN);
    assert!(
        (2..=5).contains(&warnings.len()),
        "{} warnings: {warnings:#?}",
        warnings.len()
    );
    // The first at once, for the first failed call.
    assert_eq!(warnings[0].count("calls"), 1, "{warnings:#?}");
    for w in &warnings {
        assert_eq!(w.field("kind"), Some("check"));
        assert!(w.message().contains("passed on unchecked"), "{w:?}");
        assert!(w.count("unchecked") >= 1, "{w:?}");
        assert_eq!(w.count("keys"), w.count("unchecked"));
        assert_eq!(w.count("failed"), 0);
        assert!(w.field("error").unwrap().contains("connection refused"));
    }
    let back: Vec<_> = capture
        .at(Level::INFO)
        .into_iter()
        .filter(|e| e.message().contains("answers again"))
        .collect();
    assert_eq!(back.len(), 1, "{back:#?}");
    // Every unchecked item is counted once, in a warning or in the line that ends the outage.
    let counted: u64 = warnings
        .iter()
        .chain(&back)
        .map(|e| e.count("unchecked"))
        .sum();
    assert_eq!(counted, 3_000);
    let calls: u64 = warnings.iter().chain(&back).map(|e| e.count("calls")).sum();
    assert_eq!(calls, 3_000, "one call per item here");

    // A debug event per store call that answered, with its counts.
    let answered: Vec<_> = capture
        .at(Level::DEBUG)
        .into_iter()
        .filter(|e| e.message() == "store call answered")
        .collect();
    assert_eq!(answered.len(), 2_000);
    assert!(
        answered
            .iter()
            .all(|e| e.count("keys") == 1 && e.count("new") == 1)
    );
    assert!(answered.iter().all(|e| e.field("elapsed_ms").is_some()));
}

/// A stream that ends while the store is down logs what the limiter held back as the
/// operator is dropped: the counts still add up.
#[tokio::test(start_paused = true)]
async fn the_end_of_the_stream_logs_what_was_held_back() {
    let (capture, _guard) = capture();
    let store = FaultyStore::new();
    let window = Window::max_keys(100_000)
        .ttl(TTL)
        .name("tail")
        .store(store.clone());
    let unique = paced(1_500, &store, 500, u32::MAX).dedup_by_key(|k| k.clone(), window);
    let stats = unique.stats();
    let out: Vec<String> = unique.collect().await;
    assert_eq!(out.len(), 1_500);
    let warnings = capture.at(Level::WARN);
    assert!(warnings.len() <= 3, "{warnings:#?}");
    let counted: u64 = warnings.iter().map(|e| e.count("unchecked")).sum();
    assert_eq!(counted, stats.unchecked());
    assert_eq!(counted, 1_000);
    check_fields(&capture.events(), "tail", "FaultyStore");
}

#[derive(Debug, Clone, PartialEq)]
struct AppError(String);

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError(e.to_string())
    }
}

/// Fail closed: the warnings count the items withheld (yielded as errors), not unchecked.
#[tokio::test(start_paused = true)]
async fn fail_closed_counts_the_items_withheld() {
    let (capture, _guard) = capture();
    let store = FaultyStore::new();
    store.set(Mode::Down);
    let window = Window::max_keys(100_000)
        .ttl(TTL)
        .name("payments")
        .store(store.clone())
        .batch_size(16)
        .on_failure(FailurePolicy::fail_closed());
    let items = stream::iter((0..2_000).map(|i| Ok::<_, AppError>(key(i))));
    let out: Vec<Result<String, AppError>> = items
        .try_dedup_by_key(|k| k.clone(), window)
        .collect()
        .await;
    assert_eq!(out.iter().filter(|r| r.is_err()).count(), 2_000);
    let warnings = capture.at(Level::WARN);
    assert!(warnings.len() <= 2, "{warnings:#?}");
    let failed: u64 = warnings.iter().map(|e| e.count("failed")).sum();
    assert_eq!(failed, 2_000);
    assert!(warnings.iter().all(|w| w.count("unchecked") == 0));
    assert!(warnings[0].message().contains("withheld"));
    check_fields(&capture.events(), "payments", "FaultyStore");
}

/// A key longer than the store takes passes unchecked, and says so without its bytes.
#[tokio::test(start_paused = true)]
async fn a_key_too_long_is_warned_about_without_its_bytes() {
    let (capture, _guard) = capture();
    let window = Window::max_keys(100)
        .ttl(TTL)
        .name("long")
        .store(MemoryStore::new())
        .max_key_len(8);
    let out: Vec<String> = stream::iter((0..100).map(key))
        .dedup_by_key(|k| k.clone(), window)
        .collect()
        .await;
    assert_eq!(out.len(), 100);
    let warnings = capture.at(Level::WARN);
    assert!(warnings.len() <= 2, "{warnings:#?}");
    assert!(
        warnings[0]
            .message()
            .contains("longer than the store takes")
    );
    let unchecked: u64 = warnings.iter().map(|e| e.count("unchecked")).sum();
    assert_eq!(unchecked, 100);
    check_fields(&capture.events(), "long", "MemoryStore");
}

/// Claims: the store down while a thousand claims commit gives a warning or two (not a
/// thousand), and a lease taken over is warned about, by keep-alive and by the refused commit.
#[tokio::test(start_paused = true)]
async fn failed_commits_and_lost_leases_are_warned_about() {
    let (capture, _guard) = capture();
    let store = FaultyStore::new();
    let lease = Duration::from_secs(3);
    let window = || {
        Window::max_keys(10_000)
            .ttl(TTL)
            .lease(lease)
            .name("claims")
            .store(store.clone())
    };
    let claims: Vec<_> = stream::iter((0..1_000).map(key))
        .claim_by_key(|k| k.clone(), window())
        .collect()
        .await;
    store.set(Mode::Down);
    for c in claims {
        c.commit().await.expect_err("the store is down");
    }
    let commits: Vec<_> = capture
        .at(Level::WARN)
        .into_iter()
        .filter(|e| e.message().contains("commits failed"))
        .collect();
    assert!(!commits.is_empty() && commits.len() <= 2, "{commits:#?}");

    // A claim whose lease runs out while the store is down, and another consumer takes it.
    store.set(Mode::Up);
    let mut first = stream::iter([key(5_000)]).claim_by_key(|k| k.clone(), window());
    let claim = first.next().await.expect("claimed");
    store.set(Mode::Down);
    tokio::time::sleep(lease + Duration::from_millis(1)).await;
    store.set(Mode::Up);
    let second: Vec<_> = stream::iter([key(5_000)])
        .claim_by_key(|k| k.clone(), window())
        .collect()
        .await;
    assert_eq!(second.len(), 1);
    tokio::time::sleep(lease).await;
    assert!(claim.is_lost());
    claim.commit().await.expect_err("taken over");
    let warnings = capture.at(Level::WARN);
    let said = |what: &str| {
        warnings
            .iter()
            .filter(|e| e.message().contains(what))
            .count()
    };
    assert!(said("keep-alive failed") >= 1, "{warnings:#?}");
    assert_eq!(said("leases lost"), 1, "{warnings:#?}");
    assert_eq!(said("commits refused"), 1, "{warnings:#?}");
    let lost = warnings
        .iter()
        .find(|e| e.message().contains("leases lost"))
        .unwrap();
    assert_eq!(lost.count("keys"), 1);
    drop((first, second));
    check_fields(&capture.events(), "claims", "FaultyStore");
}

/// A real Redis (owned by the test) killed mid-stream: a few warnings, each naming the window,
/// the store and its namespace and counting the unchecked items; then, with the server back,
/// one line that it answers again.
#[cfg(feature = "redis")]
#[tokio::test]
#[cfg_attr(not(server_redis_bin), ignore = "set STREAM_DEDUP_REDIS_SERVER")]
async fn redis_killed_mid_stream() {
    let Some(bin) = support::redis_server::server_binary("redis_killed_mid_stream") else {
        return;
    };
    let (capture, _guard) = capture();
    let mut server = support::redis_server::RedisServer::start(&bin);
    let redis = stream_dedup::store::RedisStore::builder("tracing-test")
        .timeout(Duration::from_millis(200))
        .connection_timeout(Duration::from_millis(200))
        .connect(&server.url())
        .await
        .expect("connect");
    assert_eq!(
        stream_dedup::store::Store::namespace(&redis),
        Some("tracing-test")
    );
    let window = Window::max_keys(100_000)
        .ttl(TTL)
        .name("redis-orders")
        .store(redis)
        .batch_size(64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut unique = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .dedup_by_key(|k: &String| k.clone(), window);
    let stats = unique.stats();
    let mut i = 0;
    let mut send = |n: u32| {
        for _ in 0..n {
            tx.send(key(i)).unwrap();
            i += 1;
        }
    };
    send(1_000);
    for _ in 0..1_000 {
        unique.next().await.expect("an item");
    }
    assert_eq!(stats.accepted(), 1_000);
    server.kill();
    send(3_000);
    for _ in 0..3_000 {
        unique.next().await.expect("an item");
    }
    assert_eq!(stats.unchecked(), 3_000);
    let warnings = capture.at(Level::WARN);
    assert!(
        (1..=3).contains(&warnings.len()),
        "{} warnings: {warnings:#?}",
        warnings.len()
    );
    for w in &warnings {
        assert!(w.count("unchecked") >= 1, "{w:?}");
        assert_eq!(w.field("namespace"), Some("tracing-test"));
    }
    // The server comes back: the store answers again (redis-rs reconnects on the next call).
    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stats.accepted() == 1_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never answered again"
        );
        send(1);
        unique.next().await.expect("an item");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(unique);
    let back: Vec<_> = capture
        .at(Level::INFO)
        .into_iter()
        .filter(|e| e.message().contains("answers again"))
        .collect();
    assert_eq!(back.len(), 1, "{back:#?}");
    let warnings = capture.at(Level::WARN);
    let counted: u64 = warnings
        .iter()
        .chain(&back)
        .map(|e| e.count("unchecked"))
        .sum();
    assert_eq!(counted, stats.unchecked());
    check_fields(&capture.events(), "redis-orders", "RedisStore");
}

/// PostgreSQL: a connection killed while its statement runs is replaced, the statement sent
/// again, and the warning names the store and its namespace (never a key).
#[cfg(feature = "postgres")]
#[tokio::test]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn a_postgres_connection_replaced_is_warned_about() {
    use stream_dedup::sqlx::{self, Connection};
    use stream_dedup::store::{ClaimBatch, ClaimStore, InsertBatch, PostgresStore, Store, Token};
    use support::postgres as pg;

    let Some(url) = pg::url("a_postgres_connection_replaced_is_warned_about") else {
        return;
    };
    let (capture, _guard) = capture();
    let ns = pg::namespace("tracing");
    let app = format!("sd-tracing-{}", Token::new());
    let sep = if url.contains('?') { '&' } else { '?' };
    let store = PostgresStore::builder(&ns)
        .statement_timeout(Duration::from_secs(5))
        .max_connections(2)
        .connect(&format!("{url}{sep}application_name={app}"))
        .await
        .expect("connect");
    // A row that another transaction locks: the store's statement waits for it, and is killed
    // while it waits.
    let blocker = key(0).into_bytes();
    store
        .insert(InsertBatch::new(vec![blocker.clone()], TTL))
        .await
        .unwrap();
    let mut locker = pg::connection(&url).await;
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM stream_dedup_keys WHERE namespace = $1 AND key = $2 FOR UPDATE")
        .bind(&ns)
        .bind(&blocker)
        .execute(&mut *tx)
        .await
        .unwrap();
    let call = tokio::spawn({
        let store = store.clone();
        let keys = vec![blocker.clone(), key(1).into_bytes()];
        async move { store.claim(ClaimBatch::new(keys, TTL)).await }
    });
    let mut killer = pg::connection(&url).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(std::time::Instant::now() < deadline, "nothing to kill");
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind(&app)
        .fetch_all(&mut killer)
        .await
        .unwrap();
        if !killed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.rollback().await.unwrap();
    call.await
        .unwrap()
        .expect("the statement, sent again, works");

    let events = capture.events();
    let lost: Vec<_> = events
        .iter()
        .filter(|e| e.message().contains("PostgreSQL connection lost"))
        .collect();
    assert_eq!(lost.len(), 1, "{events:#?}");
    assert_eq!(lost[0].level, Level::WARN);
    assert_eq!(lost[0].field("store"), Some("PostgresStore"));
    assert_eq!(lost[0].field("namespace"), Some(ns.as_str()));
    assert_eq!(lost[0].field("operation"), Some("claim keys"));
    for e in &events {
        assert!(e.fields.values().all(|v| !v.contains(MARKER)), "{e:?}");
    }
    pg::delete_namespace(&url, pg::TABLE, &ns).await;
}

/// Waits (real time) until an event whose message contains `text` was captured.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn wait_for(capture: &Capture, text: &str) -> Captured {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(e) = capture
            .events()
            .into_iter()
            .find(|e| e.message().contains(text))
        {
            return e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no event with {text:?}: {:#?}",
            capture.events()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The warning of a failed purge comes, from `store`, naming the missing `table`.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn purge_warned(capture: &Capture, store: &str, table: &str) {
    let warning = wait_for(capture, "purge of expired rows failed").await;
    assert_eq!(warning.level, Level::WARN);
    assert_eq!(warning.field("store"), Some(store));
    assert!(
        warning.field("error").is_some_and(|e| e.contains(table)),
        "{warning:?}"
    );
}

/// PostgreSQL: a background purge that fails (here its table was dropped under it) is a
/// warning, not silence.
#[cfg(feature = "postgres")]
#[tokio::test]
#[cfg_attr(not(server_postgres), ignore = "set STREAM_DEDUP_POSTGRES_URL")]
async fn a_failed_postgres_purge_is_warned_about() {
    use stream_dedup::sqlx;
    use stream_dedup::store::{PostgresStore, Token};
    use support::postgres as pg;

    let Some(url) = pg::url("a_failed_postgres_purge_is_warned_about") else {
        return;
    };
    let (capture, _guard) = capture();
    let table = format!("sd_purge_{}", Token::new().as_u128() % 1_000_000_007);
    let store = PostgresStore::builder("purge")
        .table(&table)
        .purge_interval(Duration::from_millis(100))
        .connect(&url)
        .await
        .expect("connect");
    let mut admin = pg::connection(&url).await;
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut admin)
        .await
        .unwrap();
    purge_warned(&capture, "PostgresStore", &table).await;
    drop(store);
}

/// MySQL: the same for its purge.
#[cfg(feature = "mysql")]
#[tokio::test]
#[cfg_attr(not(server_mysql), ignore = "set STREAM_DEDUP_MYSQL_URL")]
async fn a_failed_mysql_purge_is_warned_about() {
    use stream_dedup::sqlx::{self, Connection, MySqlConnection};
    use stream_dedup::store::{MySqlStore, Token};

    let Ok(url) = std::env::var("STREAM_DEDUP_MYSQL_URL") else {
        eprintln!("a_failed_mysql_purge_is_warned_about: skipped, set STREAM_DEDUP_MYSQL_URL");
        return;
    };
    let (capture, _guard) = capture();
    let table = format!("sd_purge_{}", Token::new().as_u128() % 1_000_000_007);
    let store = MySqlStore::builder("purge")
        .table(&table)
        .purge_interval(Duration::from_millis(100))
        .connect(&url)
        .await
        .expect("connect");
    let mut admin = MySqlConnection::connect(&url).await.unwrap();
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut admin)
        .await
        .unwrap();
    purge_warned(&capture, "MySqlStore", &table).await;
    drop(store);
}

/// A store whose take-backs fail, or never answer with `hang` (everything else as
/// `MemoryStore`).
#[derive(Clone, Debug)]
struct NoTakeBack(MemoryStore, bool);

impl stream_dedup::store::Store for NoTakeBack {
    fn insert(
        &self,
        batch: stream_dedup::store::InsertBatch,
    ) -> stream_dedup::store::StoreFuture<Vec<stream_dedup::store::Inserted>> {
        self.0.insert(batch)
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> stream_dedup::store::StoreFuture<()> {
        self.0.remove(keys)
    }

    fn take_back(
        &self,
        _: Vec<stream_dedup::store::HeldKey>,
    ) -> stream_dedup::store::StoreFuture<()> {
        let hang = self.1;
        Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
            Err(StoreError::Unavailable(Arc::new(refused)))
        })
    }
}

/// An operator dropped with items it read ahead takes their keys back; when that fails, a
/// `take_back` warning says how many keys stay marked (they were silent before).
#[tokio::test]
async fn a_failed_take_back_is_warned_about() {
    let (capture, _guard) = capture();
    let window = Window::max_keys(1_000)
        .ttl(TTL)
        .name("read-ahead")
        .store(NoTakeBack(MemoryStore::new(), false));
    let mut unique = stream::iter((0..10).map(key)).dedup_by_key(|k| k.clone(), window);
    assert_eq!(unique.next().await, Some(key(0)));
    drop(unique);
    // The take-back runs in the background.
    for _ in 0..100 {
        if !capture.at(Level::WARN).is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let warnings = capture.at(Level::WARN);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert_eq!(warnings[0].field("kind"), Some("take_back"));
    assert_eq!(warnings[0].count("keys"), 9, "{warnings:#?}");
    assert!(
        warnings[0].message().contains("stay marked"),
        "{warnings:#?}"
    );
    check_fields(&warnings, "read-ahead", "NoTakeBack");
}

/// A take-back that never answers is given up after its timeout (at least 5 s), and warned
/// about as one that failed.
#[tokio::test(start_paused = true)]
async fn a_take_back_that_hangs_is_warned_about_when_given_up() {
    let (capture, _guard) = capture();
    let window = Window::max_keys(1_000)
        .ttl(TTL)
        .name("read-ahead")
        .store(NoTakeBack(MemoryStore::new(), true));
    let mut unique = stream::iter((0..10).map(key)).dedup_by_key(|k| k.clone(), window);
    assert_eq!(unique.next().await, Some(key(0)));
    drop(unique);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(capture.at(Level::WARN).is_empty(), "not given up yet");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let warnings = capture.at(Level::WARN);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert_eq!(warnings[0].field("kind"), Some("take_back"));
    assert_eq!(warnings[0].count("keys"), 9, "{warnings:#?}");
    assert!(
        warnings[0]
            .field("error")
            .is_some_and(|e| e.contains("did not answer within 5s")),
        "{warnings:#?}"
    );
}
