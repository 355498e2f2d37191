//! The proof against a real NATS JetStream broker and a real Redis (issue 14): a consumer
//! killed with claims open has its keys taken over after the **short lease** that keep-alive
//! renews, not after its longest handler.
//!
//! Consumer A, a child process (this test binary run again, with
//! `STREAM_DEDUP_TAKEOVER_CONSUMER` set), claims every message of a fresh stream with a 2 s
//! lease and keep-alive on; its handlers take 60 s and send a progress ack on every beat of
//! keep-alive. Once it holds them all, and has held them for more than two leases (its keys
//! still in flight in Redis: renewed), it is killed with `SIGKILL` (its own pid, nothing
//! else). Consumer B, in the test process, on the same durable consumer and the same Redis
//! namespace, then gets the broker's redeliveries (`ack_wait` 3 s) and processes each message
//! exactly once, within about lease + `ack_wait` of the kill: far below the 60 s handler.
//!
//! The control: without keep-alive, the lease must cover the longest handler (60 s). A is
//! killed as soon as it holds its claims; B holds back every redelivery (the keys are still in
//! flight in Redis, with most of the 60 s lease left) and processes none: it would have to wait
//! out the whole lease.
//!
//! Real clocks (no paused time), with wide margins for a loaded machine. Needs
//! `STREAM_DEDUP_NATS_URL` and `STREAM_DEDUP_REDIS_URL` (and the `redis` feature); skips
//! without them. Each test deletes its stream and its Redis namespace, passed or failed.
#![cfg(feature = "redis")]

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::pin::pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message, consumer::PullConsumer};
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use redis::aio::MultiplexedConnection;
use stream_dedup::store::RedisStore;
use stream_dedup::{Claim, TryDedupStreamExt, Window};
use support::jetstream::{Broker, ConsumerSettings, business_key, unique_name};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Set in consumer A's process: its settings ([`ConsumerA::to_env`]).
const CHILD_ENV: &str = "STREAM_DEDUP_TAKEOVER_CONSUMER";
/// Messages published, one business key each.
const MESSAGES: usize = 20;
/// The short lease keep-alive renews (a round every third of it).
const LEASE: Duration = Duration::from_secs(2);
/// The broker redelivers a message not acked (nor progressed) within this.
const ACK_WAIT: Duration = Duration::from_secs(3);
/// Every handler of A takes this long: the longest handler.
const HANDLER: Duration = Duration::from_secs(60);
/// How long the done keys are kept.
const TTL: Duration = Duration::from_secs(3_600);
/// Store calls wait this long before the failure policy applies (a loaded machine).
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on every bound below, for a loaded 2-core machine.
const MARGIN: Duration = Duration::from_secs(12);

/// The two URLs, or `None` (and a line saying the test skipped).
fn urls(test: &str) -> Option<(String, String)> {
    let nats = std::env::var("STREAM_DEDUP_NATS_URL").ok();
    let redis = std::env::var("STREAM_DEDUP_REDIS_URL").ok();
    match (nats, redis) {
        (Some(nats), Some(redis)) => Some((nats, redis)),
        _ => {
            eprintln!(
                "{test}: skipped (set STREAM_DEDUP_NATS_URL and STREAM_DEDUP_REDIS_URL to run it)"
            );
            None
        }
    }
}

fn window(
    lease: Duration,
    keep_alive: bool,
    store: RedisStore,
) -> stream_dedup::StoreWindow<RedisStore> {
    Window::max_keys(10_000)
        .ttl(TTL)
        .lease(lease)
        .keep_alive(keep_alive)
        .store(store)
        .timeout(STORE_TIMEOUT)
}

/// The durable consumer of stream `stream`, through a connection of its own.
async fn pull_consumer(nats_url: &str, stream: &str, durable: &str) -> PullConsumer {
    let js = jetstream::new(support::jetstream::connect(nats_url).await);
    js.get_stream(stream)
        .await
        .expect("get the stream")
        .get_consumer(durable)
        .await
        .expect("get the consumer")
}

// ---------------------------------------------------------------------------------------------
// Consumer A: the child process that is killed.
// ---------------------------------------------------------------------------------------------

/// Consumer A's settings.
struct ConsumerA {
    keep_alive: bool,
    lease: Duration,
    stream: String,
    durable: String,
    namespace: String,
}

impl ConsumerA {
    fn to_env(&self) -> String {
        format!(
            "{};{};{};{};{}",
            self.keep_alive as u8,
            self.lease.as_millis(),
            self.stream,
            self.durable,
            self.namespace
        )
    }

    fn from_env() -> Option<ConsumerA> {
        let env = std::env::var(CHILD_ENV).ok()?;
        let f: Vec<&str> = env.split(';').collect();
        Some(ConsumerA {
            keep_alive: f[0] == "1",
            lease: Duration::from_millis(f[1].parse().expect("the lease")),
            stream: f[2].to_owned(),
            durable: f[3].to_owned(),
            namespace: f[4].to_owned(),
        })
    }

    /// Claims every message and works on each for `HANDLER`, with a progress ack on each beat
    /// of keep-alive; says `TAKEOVER-HOLDING` once it holds `MESSAGES` claims, and how many
    /// leases keep-alive renewed, every 200 ms. Runs until it is killed.
    async fn run(self) {
        let nats_url = std::env::var("STREAM_DEDUP_NATS_URL").expect("the NATS URL, from the test");
        let redis_url =
            std::env::var("STREAM_DEDUP_REDIS_URL").expect("the Redis URL, from the test");
        let store = RedisStore::connect(&redis_url, &self.namespace)
            .await
            .expect("connect to Redis");
        let consumer = pull_consumer(&nats_url, &self.stream, &self.durable).await;
        let claims = consumer
            .messages()
            .await
            .expect("pull messages")
            .map_err(async_nats::Error::from)
            .try_claim_by_key(
                |m: &Message| business_key(&m.payload),
                window(self.lease, self.keep_alive, store),
            );
        let stats = claims.stats();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                say(&format!("TAKEOVER-RENEWED {}", stats.renewed()));
            }
        });
        let mut claims = pin!(claims);
        let mut held = 0;
        while let Some(claim) = claims.next().await {
            let claim = claim.expect("consumer stream");
            held += 1;
            tokio::spawn(work(claim));
            if held == MESSAGES {
                say(&format!("TAKEOVER-HOLDING {held}"));
            }
        }
    }
}

/// One line on stdout, at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A's handler: `HANDLER` of work, a progress ack on every beat. Never finishes in the test.
async fn work(claim: Claim<Message>) {
    let mut beat = claim.heartbeat();
    let work = tokio::time::sleep(HANDLER);
    tokio::pin!(work);
    loop {
        tokio::select! {
            () = &mut work => break,
            Some(()) = beat.tick() => {
                let _ = claim.ack_with(AckKind::Progress).await;
            }
        }
    }
    if let Ok(message) = claim.commit().await {
        let _ = message.ack().await;
    }
}

// ---------------------------------------------------------------------------------------------
// The test's side: the stream, A's process, consumer B.
// ---------------------------------------------------------------------------------------------

/// Kills A if it still runs, deletes the stream and the Redis namespace when dropped, also
/// when the test panics (on a thread of its own with a runtime of its own).
struct Cleanup {
    nats_url: String,
    redis_url: String,
    stream: String,
    namespace: String,
    child: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill(); // its pid only
            let _ = child.wait();
        }
        let (nats_url, redis_url) = (self.nats_url.clone(), self.redis_url.clone());
        let (stream, namespace) = (self.stream.clone(), self.namespace.clone());
        let done = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup")
                .block_on(async move {
                    let js = jetstream::new(support::jetstream::connect(&nats_url).await);
                    if let Err(e) = js.delete_stream(&stream).await {
                        eprintln!("cleanup: deleting the stream {stream}: {e}");
                    }
                    support::redis_server::delete_namespace(&redis_url, &namespace).await;
                });
        })
        .join();
        if done.is_err() && !std::thread::panicking() {
            panic!("the cleanup of {} failed", self.stream);
        }
    }
}

/// Starts consumer A (this binary, running `test` with `CHILD_ENV` set); its stdout lines come
/// on the returned channel.
fn spawn_a(test: &str, a: &ConsumerA) -> (Child, mpsc::UnboundedReceiver<String>) {
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            test,
            "--nocapture",
            "--test-threads=1",
            "--include-ignored",
        ])
        .env(CHILD_ENV, a.to_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start consumer A");
    let stdout = child.stdout.take().expect("A's stdout");
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // A's own lines only (the first may follow the harness's "test … ").
            let Some(at) = line.find("TAKEOVER-") else {
                continue;
            };
            if tx.send(line[at..].to_owned()).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for A to say it holds every message; the latest renewal count it said, meanwhile.
async fn wait_holding(lines: &mut mpsc::UnboundedReceiver<String>, renewed: &mut u64) {
    let deadline = Duration::from_secs(30);
    tokio::time::timeout(deadline, async {
        while let Some(line) = lines.recv().await {
            if let Some(n) = line.strip_prefix("TAKEOVER-RENEWED ") {
                *renewed = n.parse().unwrap_or(*renewed);
            }
            if line == format!("TAKEOVER-HOLDING {MESSAGES}") {
                return;
            }
        }
        panic!("consumer A ended before it held every message");
    })
    .await
    .expect("consumer A holds every message within 30 s");
}

/// A's latest renewal count among the lines it said so far.
fn drain_renewed(lines: &mut mpsc::UnboundedReceiver<String>, renewed: &mut u64) {
    while let Ok(line) = lines.try_recv() {
        if let Some(n) = line.strip_prefix("TAKEOVER-RENEWED ") {
            *renewed = n.parse().unwrap_or(*renewed);
        }
    }
}

/// What is left of the lease of `key` in Redis, or `None` if it is not in flight (free, or
/// done). A key in flight holds `c` + its claim's token (16 bytes) + the ttl in ms, and
/// expires after that ttl + the lease.
async fn lease_left(
    conn: &mut MultiplexedConnection,
    namespace: &str,
    key: &str,
) -> Option<Duration> {
    let redis_key = format!("{namespace}:{key}");
    let value: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&redis_key)
        .query_async(conn)
        .await
        .expect("GET");
    let value = value?;
    if value.len() <= 17 || value[0] != b'c' {
        return None;
    }
    let keep: u64 = std::str::from_utf8(&value[17..])
        .ok()
        .and_then(|ms| ms.parse().ok())
        .expect("the in-flight value ends with the ttl in ms");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&redis_key)
        .query_async(conn)
        .await
        .expect("PTTL");
    Some(Duration::from_millis(
        u64::try_from(pttl).unwrap_or(0).saturating_sub(keep),
    ))
}

/// The business keys of the test's messages.
fn keys() -> Vec<String> {
    (0..MESSAGES)
        .map(|n| format!("order-{n}/payment"))
        .collect()
}

/// What consumer B saw, each time measured from A's kill.
#[derive(Debug, Default)]
struct Seen {
    /// Business key → when B processed it (its claim came out), once per processing.
    processed: HashMap<String, Vec<Duration>>,
    /// Business key → when B held a copy of it back.
    held_back: HashMap<String, Vec<Duration>>,
}

/// Consumer B: the same durable consumer and namespace as A, its own lease and keep-alive.
struct ConsumerB<'a> {
    nats_url: &'a str,
    redis_url: &'a str,
    broker: &'a Broker,
    namespace: &'a str,
    lease: Duration,
    keep_alive: bool,
}

/// Runs consumer B: processes each claim at once (commit, ack), until `done` says so or
/// `deadline` (from now) passes. Times are measured from `killed`.
async fn consume_b(
    b: ConsumerB<'_>,
    killed: Instant,
    deadline: Duration,
    done: impl Fn(&Seen) -> bool,
) -> (Seen, stream_dedup::Stats) {
    let ConsumerB {
        nats_url,
        redis_url,
        broker,
        namespace,
        lease,
        keep_alive,
    } = b;
    let store = RedisStore::connect(redis_url, namespace)
        .await
        .expect("connect to Redis");
    let consumer = pull_consumer(nats_url, &broker.stream, &broker.durable).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let on_held_back = seen.clone();
    let claims = consumer
        .messages()
        .await
        .expect("pull messages")
        .map_err(async_nats::Error::from)
        .try_claim_by_key(
            |m: &Message| business_key(&m.payload),
            window(lease, keep_alive, store),
        )
        // Left unacked: the broker redelivers it by itself.
        .on_held_back(move |m: Message| {
            on_held_back
                .lock()
                .unwrap()
                .held_back
                .entry(business_key(&m.payload))
                .or_default()
                .push(killed.elapsed());
        });
    let stats = claims.stats();
    let mut claims = pin!(claims);
    let mut settling = FuturesUnordered::new();
    let mut check = tokio::time::interval(Duration::from_millis(50));
    let end = Instant::now() + deadline;
    loop {
        if done(&seen.lock().unwrap()) {
            break;
        }
        tokio::select! {
            claim = claims.next() => {
                let claim: Claim<Message> = claim.expect("the stream goes on").expect("consumer stream");
                seen.lock()
                    .unwrap()
                    .processed
                    .entry(business_key(&claim.payload))
                    .or_default()
                    .push(killed.elapsed());
                settling.push(async move {
                    let message = claim.commit().await.expect("B's commit");
                    message.ack().await.expect("B's ack");
                });
            }
            Some(()) = settling.next(), if !settling.is_empty() => {}
            _ = check.tick() => {}
            () = tokio::time::sleep_until(end) => break,
        }
    }
    while settling.next().await.is_some() {}
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    (seen, stats)
}

/// The stream with its messages, A started and holding them all; the cleanup guard holds A.
async fn setup(
    test: &str,
    nats_url: &str,
    redis_url: &str,
    lease: Duration,
    keep_alive: bool,
) -> (Broker, Cleanup, mpsc::UnboundedReceiver<String>, u64) {
    let name = unique_name("stream_dedup_takeover");
    let broker = Broker::create(
        nats_url,
        &name,
        ConsumerSettings {
            ack_wait: ACK_WAIT,
            max_deliver: 100,
        },
    )
    .await;
    let mut cleanup = Cleanup {
        nats_url: nats_url.to_owned(),
        redis_url: redis_url.to_owned(),
        stream: name.clone(),
        namespace: name.clone(),
        child: None,
    };
    broker
        .publish_all(keys().into_iter().map(String::into_bytes))
        .await;
    let a = ConsumerA {
        keep_alive,
        lease,
        stream: name.clone(),
        durable: broker.durable.clone(),
        namespace: name,
    };
    let (child, mut lines) = spawn_a(test, &a);
    cleanup.child = Some(child);
    let mut renewed = 0;
    wait_holding(&mut lines, &mut renewed).await;
    (broker, cleanup, lines, renewed)
}

/// Kills A (`SIGKILL`, its pid only) and waits for it; the instant of the kill.
fn kill_a(cleanup: &mut Cleanup) -> Instant {
    let child = cleanup.child.as_mut().expect("A runs");
    let killed = Instant::now();
    child.kill().expect("kill consumer A");
    let status = child.wait().expect("wait for consumer A");
    assert!(!status.success(), "A was killed, not finished: {status}");
    cleanup.child = None;
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(server_nats, server_redis)),
    ignore = "set STREAM_DEDUP_NATS_URL and STREAM_DEDUP_REDIS_URL"
)]
async fn a_killed_consumers_claims_are_taken_over_after_the_short_lease() {
    const TEST: &str = "a_killed_consumers_claims_are_taken_over_after_the_short_lease";
    if let Some(a) = ConsumerA::from_env() {
        a.run().await;
        return;
    }
    let Some((nats_url, redis_url)) = urls(TEST) else {
        return;
    };
    let (broker, mut cleanup, mut lines, mut renewed) =
        setup(TEST, &nats_url, &redis_url, LEASE, true).await;
    let mut conn = redis::Client::open(redis_url.as_str())
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");

    // A lives for more than two leases with its claims open: keep-alive keeps them in flight.
    tokio::time::sleep(LEASE * 5 / 2).await;
    for key in keys() {
        let left = lease_left(&mut conn, &cleanup.namespace, &key).await;
        assert!(
            left.is_some_and(|left| !left.is_zero() && left <= LEASE),
            "{key}: in flight, its lease running, while A lives: {left:?}"
        );
    }
    drain_renewed(&mut lines, &mut renewed);
    assert!(
        renewed >= MESSAGES as u64,
        "A's keep-alive renewed its leases: {renewed}"
    );

    let killed = kill_a(&mut cleanup);
    let bound = LEASE + ACK_WAIT + MARGIN;
    assert!(bound < HANDLER / 2);
    let b = ConsumerB {
        nats_url: &nats_url,
        redis_url: &redis_url,
        broker: &broker,
        namespace: &cleanup.namespace,
        lease: LEASE,
        keep_alive: true,
    };
    let (seen, stats) = consume_b(b, killed, bound, |seen| seen.processed.len() == MESSAGES).await;
    let last = seen.processed.values().flatten().max().copied();
    let first = seen.processed.values().flatten().min().copied();
    println!(
        "{TEST}: A renewed {renewed} leases before its death; kill → first taken over {first:?}, \
         all {MESSAGES} taken over {last:?} (lease {LEASE:?}, ack_wait {ACK_WAIT:?}, handler \
         {HANDLER:?}); B held back {} copies; B's stats {:?}",
        seen.held_back.values().map(Vec::len).sum::<usize>(),
        stats.snapshot()
    );
    assert_eq!(
        seen.processed.len(),
        MESSAGES,
        "B processed every message within {bound:?} of A's death: {seen:?}"
    );
    for (key, times) in &seen.processed {
        assert_eq!(times.len(), 1, "{key} processed once: {times:?}");
    }
    let last = last.expect("taken over");
    assert!(last <= bound, "all taken over {last:?} after the kill");
    assert_eq!(stats.committed(), MESSAGES as u64);
    // Nothing left at the broker: B acked everything.
    broker.wait_drained(Duration::from_secs(20)).await;
    for key in keys() {
        assert_eq!(
            lease_left(&mut conn, &cleanup.namespace, &key).await,
            None,
            "{key}: done"
        );
    }
    drop(cleanup);
}

/// The control: without keep-alive the lease must cover the longest handler, and a dead
/// consumer's keys stay in flight for it: B holds back every redelivery, processes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(server_nats, server_redis)),
    ignore = "set STREAM_DEDUP_NATS_URL and STREAM_DEDUP_REDIS_URL"
)]
async fn without_keep_alive_a_killed_consumers_claims_wait_out_the_long_lease() {
    const TEST: &str = "without_keep_alive_a_killed_consumers_claims_wait_out_the_long_lease";
    if let Some(a) = ConsumerA::from_env() {
        a.run().await;
        return;
    }
    let Some((nats_url, redis_url)) = urls(TEST) else {
        return;
    };
    let (broker, mut cleanup, _lines, _) = setup(TEST, &nats_url, &redis_url, HANDLER, false).await;
    let mut conn = redis::Client::open(redis_url.as_str())
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");

    let killed = kill_a(&mut cleanup);
    let bound = ACK_WAIT + MARGIN;
    let b = ConsumerB {
        nats_url: &nats_url,
        redis_url: &redis_url,
        broker: &broker,
        namespace: &cleanup.namespace,
        lease: HANDLER,
        keep_alive: false,
    };
    let (seen, stats) = consume_b(b, killed, bound, |seen| seen.held_back.len() == MESSAGES).await;
    let last = seen
        .held_back
        .values()
        .filter_map(|t| t.first())
        .max()
        .copied();
    let mut least_left = HANDLER;
    for key in keys() {
        let left = lease_left(&mut conn, &cleanup.namespace, &key)
            .await
            .unwrap_or_else(|| panic!("{key}: still in flight after A's death"));
        least_left = least_left.min(left);
    }
    println!(
        "{TEST}: kill → every key held back by B {last:?}; B processed {}; the least lease left \
         {least_left:?} of {HANDLER:?} at {:?} after the kill",
        seen.processed.len(),
        killed.elapsed()
    );
    assert_eq!(
        seen.held_back.len(),
        MESSAGES,
        "B held back a redelivery of every key within {bound:?}: {seen:?}"
    );
    assert!(seen.processed.is_empty(), "B took nothing over: {seen:?}");
    assert_eq!(stats.committed(), 0);
    // B would wait out the rest of the 60 s lease.
    assert!(
        least_left >= HANDLER.saturating_sub(killed.elapsed() + MARGIN),
        "the keys stay in flight for the long lease: {least_left:?} left"
    );
    assert!(least_left > HANDLER / 2);
    drop(cleanup);
}
