//! The proof against a real NATS JetStream broker (issue 4): with claims, every message's
//! effect is applied exactly once, although the broker redelivers (slow handlers, lost ACKs,
//! failed handlers) and one of two consumers is killed mid-run; with mark-on-emit, the same
//! scenario loses messages.
//!
//! The side effect is a row per key in a PostgreSQL ledger, counting how many times it was
//! applied. Needs `STREAM_DEDUP_NATS_URL` and `STREAM_DEDUP_POSTGRES_URL`; skips without them.
//!
//! Everything is generic over the store (`S: ClaimStore + Clone`): the two consumers share
//! one store, Redis (with the `redis` feature and `STREAM_DEDUP_REDIS_URL`) and, as the
//! reference, a `MemoryStore`.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use futures::{Stream, StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use stream_dedup::store::{ClaimStore, MemoryStore, StoreError};
use stream_dedup::{Claim, TryDedupStreamExt, Window};
use support::jetstream::{
    Broker, Cleanup, ConsumerSettings, Env, Ledger, business_key, unique_name,
};
use tokio::sync::watch;
use tokio::time::Instant;

/// Messages published, one business key each.
const MESSAGES: usize = 2_000;
/// The broker redelivers a message not acked within this.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// Deliveries before the broker gives up on a message: high enough that the copies held back
/// while a slow original runs (one per `ACK_WAIT`) do not exhaust it.
const MAX_DELIVER: i64 = 20;
/// A slow handler sleeps this long before processing: past `ACK_WAIT`, so the broker
/// redelivers while the original is still in flight.
const SLOW: Duration = Duration::from_millis(1_300);
/// The claims' lease: above the slowest handler (`SLOW` plus the effect), far below
/// `ACK_WAIT × MAX_DELIVER` (20 s), so that a key whose owner died without releasing it is
/// free again long before the broker gives up.
const LEASE: Duration = Duration::from_secs(4);
/// How long done keys are remembered (the whole run).
const TTL: Duration = Duration::from_secs(3_600);
/// Store calls wait this long before the failure policy applies: far more than a loaded CI
/// machine needs (the default, 250 ms, fired there).
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// Claims each consumer processes at once.
const CONCURRENCY: usize = 512;
/// The seed of the faults.
const SEED: u64 = 0x5eed_0004;
/// How long the broker may take to have nothing left.
const DEADLINE: Duration = Duration::from_secs(40);

/// What goes wrong with a key's **first** delivery (later deliveries are handled normally).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// Sleeps past `ack_wait` before processing (processing timeout): the broker redelivers
    /// while the original is in flight.
    Slow,
    /// Processes and commits, but the ACK is lost: the redelivery must be a duplicate.
    LostAck,
    /// Fails before processing (returns early): the redelivery must be processed.
    FailFirst,
}

/// The fault of `key`, drawn from an RNG seeded with `SEED` and the key: the same every run.
fn fault_of(key: &str) -> Fault {
    let mut h = SEED;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    match StdRng::seed_from_u64(h).random_range(0..100u32) {
        0..5 => Fault::Slow,
        5..12 => Fault::LostAck,
        12..17 => Fault::FailFirst,
        _ => Fault::None,
    }
}

fn keys() -> Vec<String> {
    (0..MESSAGES)
        .map(|n| format!("order-{n}/payment"))
        .collect()
}

/// The delivery count of a message (1 for the first delivery).
fn delivered(m: &Message) -> i64 {
    m.info().map_or(1, |info| info.delivered)
}

#[derive(Debug, Default)]
struct Counts {
    deliveries: AtomicU64,
    redeliveries: AtomicU64,
    duplicates_acked: AtomicU64,
    held_back: AtomicU64,
    processed: AtomicU64,
    failed: AtomicU64,
    /// The business keys whose first delivery reached a handler and failed there.
    failed_keys: std::sync::Mutex<Vec<String>>,
    slow: AtomicU64,
    lost_acks: AtomicU64,
    commit_errors: AtomicU64,
    stream_errors: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

/// The error of a consumer's stream: the broker's, or the store's (fail closed).
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
enum ConsumeError {
    Nats(String),
    Store(StoreError),
}

impl From<StoreError> for ConsumeError {
    fn from(e: StoreError) -> Self {
        ConsumeError::Store(e)
    }
}

/// Makes a consumer's kill land only on handlers that have not applied their effect.
///
/// Why: a handler killed between its effect and its commit has applied the effect, and its
/// claim is released (the drop frees the key), so the broker's redelivery applies it again.
/// Claims make redelivery *safe* (nothing lost, no repeat of a committed key); exactly-once of
/// the effect itself needs the effect and the commit to be one atomic step, which a ledger
/// outside the claim store cannot give. So the test kills the consumer only while none of its
/// handlers is between effect and ACK, and at least one claim is open (parked before its
/// effect): those are the claims a crash must not lose.
#[derive(Debug, Default)]
struct KillSwitch(Mutex<KillState>);

#[derive(Debug, Default)]
struct KillState {
    /// Set: handlers park before their effect instead of applying it.
    armed: bool,
    /// Handlers between their effect and their ACK.
    applying: usize,
    /// Handlers parked (with their claim open).
    parked: usize,
    /// Handlers running (each with its message, and with claims its claim, open).
    running: usize,
}

impl KillSwitch {
    fn lock(&self) -> std::sync::MutexGuard<'_, KillState> {
        self.0.lock().unwrap()
    }

    /// Before the effect: `true` to go on, `false` to park.
    fn enter(&self) -> bool {
        let mut s = self.lock();
        if s.armed {
            s.parked += 1;
            false
        } else {
            s.applying += 1;
            true
        }
    }

    /// After the ACK (or the decision not to ack).
    fn leave(&self) {
        self.lock().applying -= 1;
    }

    fn arm(&self) {
        self.lock().armed = true;
    }

    /// Parked and running handlers, once none is applying an effect.
    fn parked_when_idle(&self) -> Option<(usize, usize)> {
        let s = self.lock();
        (s.applying == 0 && s.parked > 0).then_some((s.parked, s.running))
    }

    /// Counts a handler as running until the guard is dropped (also when it is killed).
    fn running(&self) -> Running<'_> {
        self.lock().running += 1;
        Running(self)
    }
}

struct Running<'a>(&'a KillSwitch);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.lock().running -= 1;
    }
}

/// What one consumer's handlers share.
struct Ctx {
    ledger: Ledger,
    counts: Arc<Counts>,
    switch: Arc<KillSwitch>,
}

impl Ctx {
    /// Up to the effect: the first delivery's fault, then the kill switch. `None` when the
    /// handler fails here; parks forever (until killed) when the switch is armed.
    async fn before_effect(&self, m: &Message) -> Option<Fault> {
        let fault = if delivered(m) == 1 {
            fault_of(&business_key(&m.payload))
        } else {
            Fault::None
        };
        match fault {
            Fault::FailFirst => {
                inc(&self.counts.failed);
                self.counts
                    .failed_keys
                    .lock()
                    .unwrap()
                    .push(business_key(&m.payload).to_string());
                return None;
            }
            Fault::Slow => {
                inc(&self.counts.slow);
                tokio::time::sleep(SLOW).await;
            }
            Fault::None | Fault::LostAck => {}
        }
        if !self.switch.enter() {
            std::future::pending::<()>().await;
        }
        Some(fault)
    }

    /// The side effect.
    async fn effect(&self, key: &str) {
        self.ledger.apply(key).await;
        inc(&self.counts.processed);
    }

    /// The ACK, unless it is lost.
    async fn ack(&self, m: &Message, fault: Fault) {
        if fault == Fault::LostAck {
            inc(&self.counts.lost_acks);
        } else if let Err(e) = m.ack().await {
            eprintln!("ack failed (the broker will redeliver): {e}");
        }
    }
}

/// A consumer's deliveries, counted.
async fn deliveries(
    consumer: &PullConsumer,
    counts: Arc<Counts>,
) -> impl Stream<Item = Result<Message, ConsumeError>> + use<> {
    consumer
        .messages()
        .await
        .expect("pull messages")
        .map_err(|e| ConsumeError::Nats(e.to_string()))
        .inspect_ok(move |m| {
            inc(&counts.deliveries);
            if delivered(m) > 1 {
                inc(&counts.redeliveries);
            }
        })
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A consumer with claims: a key is done only when its claim commits, after the effect.
async fn claims_consumer<S: ClaimStore + Clone>(
    consumer: PullConsumer,
    store: S,
    ctx: Arc<Ctx>,
    stop: watch::Receiver<bool>,
) {
    let window = Window::max_keys(10_000)
        .ttl(TTL)
        .lease(LEASE)
        .store(store)
        .timeout(STORE_TIMEOUT);
    let (dups, held) = (ctx.counts.clone(), ctx.counts.clone());
    deliveries(&consumer, ctx.counts.clone())
        .await
        .try_claim_by_key(|m: &Message| business_key(&m.payload), window)
        // The key is done: the original was processed and committed, so acking is safe.
        .on_duplicate(move |m: Message| {
            inc(&dups.duplicates_acked);
            tokio::spawn(async move {
                let _ = m.ack().await;
            });
        })
        // The key is in flight: not acked, the broker delivers it again.
        .on_held_back(move |_m: Message| inc(&held.held_back))
        .take_until(stopped(stop))
        .for_each_concurrent(CONCURRENCY, |claim: Result<Claim<Message>, _>| {
            let ctx = ctx.clone();
            async move {
                let _running = ctx.switch.running();
                let claim = match claim {
                    Ok(claim) => claim,
                    Err(e) => {
                        inc(&ctx.counts.stream_errors);
                        eprintln!("consumer stream: {e:?}");
                        return;
                    }
                };
                // A failure returns here: the claim is dropped, which releases the key.
                let Some(fault) = ctx.before_effect(&claim).await else {
                    return;
                };
                let key = business_key(&claim.payload);
                ctx.effect(&key).await;
                match claim.commit().await {
                    Ok(message) => ctx.ack(&message, fault).await,
                    Err(e) => {
                        // Not done: no ACK, the redelivery is processed again.
                        inc(&ctx.counts.commit_errors);
                        eprintln!("commit of {key} failed: {e}");
                    }
                }
                ctx.switch.leave();
            }
        })
        .await;
}

/// A consumer with mark-on-emit: the key is marked when the message leaves the operator.
async fn mark_on_emit_consumer<S: ClaimStore + Clone>(
    consumer: PullConsumer,
    store: S,
    ctx: Arc<Ctx>,
    stop: watch::Receiver<bool>,
) {
    // A store call that timed out would pass its items unchecked (fail open), unrecorded: a
    // failed handler's redelivery would then be processed, and the loss this test shows would
    // not happen. The generous timeout keeps the scenario about the broker, not the store.
    let window = Window::max_keys(10_000)
        .ttl(TTL)
        .store(store)
        .timeout(STORE_TIMEOUT);
    let dups = ctx.counts.clone();
    deliveries(&consumer, ctx.counts.clone())
        .await
        .try_dedup_by_key(|m: &Message| business_key(&m.payload), window)
        .on_duplicate(move |m: Message| {
            inc(&dups.duplicates_acked);
            tokio::spawn(async move {
                let _ = m.ack().await;
            });
        })
        .take_until(stopped(stop))
        .for_each_concurrent(CONCURRENCY, |m: Result<Message, _>| {
            let ctx = ctx.clone();
            async move {
                let _running = ctx.switch.running();
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        inc(&ctx.counts.stream_errors);
                        eprintln!("consumer stream: {e:?}");
                        return;
                    }
                };
                let Some(fault) = ctx.before_effect(&m).await else {
                    return;
                };
                ctx.effect(&business_key(&m.payload)).await;
                ctx.ack(&m, fault).await;
                ctx.switch.leave();
            }
        })
        .await;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Claims,
    MarkOnEmit,
}

/// What one run saw.
struct Run {
    counts: Arc<Counts>,
    /// Key → how many times its effect was applied.
    ledger: HashMap<String, i32>,
    /// Handlers of the killed consumer parked before their effect when it was killed.
    killed_parked: usize,
    /// All its running handlers then (parked, sleeping as slow handlers, just started).
    killed_running: usize,
    elapsed: Duration,
}

impl Run {
    fn print(&self, label: &str) {
        let c = &self.counts;
        println!(
            "{label}: {} messages, {:.1?}: deliveries {}, redeliveries {}, duplicates acked {}, \
             held back {}, processed {} (slow {}, lost ACKs {}, failed first deliveries {}, \
             killed with {} handlers running, {} parked before their effect; \
             commit errors {}, stream errors {})",
            MESSAGES,
            self.elapsed,
            get(&c.deliveries),
            get(&c.redeliveries),
            get(&c.duplicates_acked),
            get(&c.held_back),
            get(&c.processed),
            get(&c.slow),
            get(&c.lost_acks),
            get(&c.failed),
            self.killed_running,
            self.killed_parked,
            get(&c.commit_errors),
            get(&c.stream_errors),
        );
    }
}

async fn wait_until<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < end, "{what}: not within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Publishes `MESSAGES` keys to a fresh stream, runs two consumers sharing `store`, kills one
/// mid-run, and waits until the broker has nothing left.
async fn run<S: ClaimStore + Clone>(env: &Env, mode: Mode, store: S) -> Run {
    let started = Instant::now();
    let stream = unique_name("dedup_js");
    let table = unique_name("ledger");
    let _cleanup = Cleanup {
        env: env.clone(),
        stream: stream.clone(),
        table: table.clone(),
    };
    let settings = ConsumerSettings {
        ack_wait: ACK_WAIT,
        max_deliver: MAX_DELIVER,
    };
    let broker = Broker::create(&env.nats_url, &stream, settings).await;
    let ledger = Ledger::create(&env.postgres_url, &table).await;
    broker
        .publish_all(keys().into_iter().map(String::into_bytes))
        .await;

    let counts = Arc::new(Counts::default());
    let (stop_tx, stop) = watch::channel(false);
    let mut consumers = Vec::new();
    let mut switches = Vec::new();
    for _ in 0..2 {
        let switch = Arc::new(KillSwitch::default());
        let ctx = Arc::new(Ctx {
            ledger: Ledger::connect(&env.postgres_url, &table).await,
            counts: counts.clone(),
            switch: switch.clone(),
        });
        let consumer = broker.consumer().await;
        let (store, stop) = (store.clone(), stop.clone());
        consumers.push(tokio::spawn(async move {
            match mode {
                Mode::Claims => claims_consumer(consumer, store, ctx, stop).await,
                Mode::MarkOnEmit => mark_on_emit_consumer(consumer, store, ctx, stop).await,
            }
        }));
        switches.push(switch);
    }
    let survivor = consumers.pop().unwrap();
    let (victim, victim_switch) = (consumers.pop().unwrap(), &switches[0]);

    // Kill the first consumer a third of the way in, with claims open (parked before their
    // effect) and none between effect and ACK (see `KillSwitch`).
    wait_until("a third of the messages processed", DEADLINE, || {
        (get(&counts.processed) >= MESSAGES as u64 / 3).then_some(())
    })
    .await;
    victim_switch.arm();
    let (killed_parked, killed_running) = wait_until(
        "the victim idle with claims open",
        Duration::from_secs(10),
        || victim_switch.parked_when_idle(),
    )
    .await;
    victim.abort();
    assert!(victim.await.unwrap_err().is_cancelled());

    let info = broker.wait_drained(DEADLINE).await;
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    // The broker has nothing left; let the survivor finish what it runs, and stop it.
    stop_tx.send(true).unwrap();
    survivor.await.expect("the surviving consumer");
    Run {
        counts,
        ledger: ledger.counts().await,
        killed_parked,
        killed_running,
        elapsed: started.elapsed(),
    }
}

/// Claims: every key's effect applied exactly once, none missing, nothing left on the broker.
async fn claims_apply_every_message_exactly_once<S: ClaimStore + Clone>(env: &Env, store: S) {
    let run = run(env, Mode::Claims, store).await;
    run.print("claims");
    let c = &run.counts;
    let keys = keys();
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !run.ledger.contains_key(*k))
        .collect();
    let repeated: Vec<(&String, &i32)> = run.ledger.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        missing.is_empty(),
        "{} keys lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        repeated.is_empty(),
        "{} keys applied more than once, e.g. {:?}",
        repeated.len(),
        &repeated[..repeated.len().min(5)]
    );
    assert_eq!(run.ledger.len(), MESSAGES, "keys nobody published");
    assert_eq!(get(&c.processed), MESSAGES as u64);
    // Every failure case really happened on the broker.
    assert!(get(&c.redeliveries) > 0, "no redelivery");
    assert!(get(&c.held_back) > 0, "no copy held back (slow handlers)");
    assert!(get(&c.duplicates_acked) > 0, "no duplicate (lost ACKs)");
    assert!(get(&c.failed) > 0, "no failed handler");
    assert!(run.killed_parked > 0, "the kill found no open claim");
    assert_eq!(get(&c.commit_errors), 0);
}

/// Mark-on-emit: a handler that failed after its key was marked makes the redelivery a
/// "duplicate", acked and gone: those messages are lost.
async fn mark_on_emit_loses_messages<S: ClaimStore + Clone>(env: &Env, store: S) {
    let run = run(env, Mode::MarkOnEmit, store).await;
    run.print("mark-on-emit");
    let keys = keys();
    let lost: Vec<&String> = keys
        .iter()
        .filter(|k| !run.ledger.contains_key(*k))
        .collect();
    // The keys whose first delivery failed in a handler. A key whose first delivery went to the
    // killed consumer and never reached its operator (still in the client's pull buffer) is not
    // among them: its redelivery is no first delivery, so it succeeds.
    let failed_keys: Vec<String> = run.counts.failed_keys.lock().unwrap().clone();
    assert!(failed_keys.iter().all(|k| fault_of(k) == Fault::FailFirst));
    println!(
        "mark-on-emit: {} of {MESSAGES} messages lost ({} keys whose first delivery failed, \
         {} handlers running on the killed consumer), although the broker has nothing pending",
        lost.len(),
        failed_keys.len(),
        run.killed_running,
    );
    assert!(!lost.is_empty(), "mark-on-emit lost nothing");
    // Each key whose handler failed is among them: its redelivery was taken for a duplicate.
    for k in &failed_keys {
        assert!(!run.ledger.contains_key(k), "{k} failed but was processed");
    }
    assert!(lost.len() >= failed_keys.len() + run.killed_parked);
    assert!(run.ledger.values().all(|n| *n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(all(server_nats, server_postgres)),
    ignore = "set STREAM_DEDUP_NATS_URL and STREAM_DEDUP_POSTGRES_URL"
)]
async fn claims_with_memory_store() {
    let Some(env) = Env::from_env("claims_with_memory_store") else {
        return;
    };
    claims_apply_every_message_exactly_once(&env, MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(all(server_nats, server_postgres)),
    ignore = "set STREAM_DEDUP_NATS_URL and STREAM_DEDUP_POSTGRES_URL"
)]
async fn mark_on_emit_with_memory_store() {
    let Some(env) = Env::from_env("mark_on_emit_with_memory_store") else {
        return;
    };
    mark_on_emit_loses_messages(&env, MemoryStore::new()).await;
}

/// A Redis store in a namespace of its own, with the URL and the namespace (to delete it after).
#[cfg(feature = "redis")]
async fn redis_store(test: &str) -> Option<(stream_dedup::store::RedisStore, String, String)> {
    let Ok(url) = std::env::var("STREAM_DEDUP_REDIS_URL") else {
        eprintln!("skipped: {test} (STREAM_DEDUP_REDIS_URL is not set)");
        return None;
    };
    let namespace = support::jetstream::unique_name(test);
    let store = stream_dedup::store::RedisStore::connect(&url, &namespace)
        .await
        .expect("connect to Redis");
    Some((store, url, namespace))
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(all(server_redis, server_nats, server_postgres)),
    ignore = "set STREAM_DEDUP_REDIS_URL and STREAM_DEDUP_NATS_URL and STREAM_DEDUP_POSTGRES_URL"
)]
async fn claims_with_redis_store() {
    let Some(env) = Env::from_env("claims_with_redis_store") else {
        return;
    };
    let Some((store, url, namespace)) = redis_store("claims_with_redis_store").await else {
        return;
    };
    claims_apply_every_message_exactly_once(&env, store).await;
    support::redis_server::delete_namespace(&url, &namespace).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(all(server_redis, server_nats, server_postgres)),
    ignore = "set STREAM_DEDUP_REDIS_URL and STREAM_DEDUP_NATS_URL and STREAM_DEDUP_POSTGRES_URL"
)]
async fn mark_on_emit_with_redis_store() {
    let Some(env) = Env::from_env("mark_on_emit_with_redis_store") else {
        return;
    };
    let Some((store, url, namespace)) = redis_store("mark_on_emit_with_redis_store").await else {
        return;
    };
    mark_on_emit_loses_messages(&env, store).await;
    support::redis_server::delete_namespace(&url, &namespace).await;
}

#[test]
fn business_keys_are_total() {
    assert_eq!(business_key(b"order-7/payment"), "order-7/payment");
    let bad = business_key(&[0xff, 0xfe, b'a']);
    assert_eq!(bad, "\u{0}non-utf8:fffe61");
    assert_ne!(bad, business_key(&[0xff, 0xfe]));
}
