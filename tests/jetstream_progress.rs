//! The proof against a real NATS JetStream broker (issue 14): a handler three times slower than
//! the consumer's `ack_wait` is never redelivered when it sends `AckKind::Progress` on every
//! beat of its claim's keep-alive ([`Claim::heartbeat`]), while the claims' lease stays short
//! (1 s). And the control: the same handler without progress acks is redelivered.
//!
//! Needs `STREAM_DEDUP_NATS_URL`; skips without it. Runs with a `MemoryStore` and, with the
//! `redis` feature and `STREAM_DEDUP_REDIS_URL`, a `RedisStore`.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::Message;
use futures::{StreamExt, TryStreamExt};
use stream_dedup::store::{ClaimStore, MemoryStore};
use stream_dedup::{Claim, Stats, TryDedupStreamExt, Window};
use support::jetstream::{Broker, ConsumerSettings, business_key, unique_name};

/// Messages published, one business key each, all processed at once.
const MESSAGES: usize = 20;
/// The broker redelivers a message not acked (nor progressed) within this.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// Every handler takes this long: three times `ACK_WAIT`.
const HANDLER: Duration = Duration::from_secs(3);
/// The claims' lease: as short as `ACK_WAIT`, renewed by keep-alive every third of it.
const LEASE: Duration = Duration::from_secs(1);
/// Store calls wait this long before the failure policy applies (a loaded CI machine).
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the broker may take to have nothing left.
const DEADLINE: Duration = Duration::from_secs(30);

/// The NATS URL, or `None` (and a line saying the test skipped).
fn nats_url(test: &str) -> Option<String> {
    let url = std::env::var("STREAM_DEDUP_NATS_URL").ok();
    if url.is_none() {
        eprintln!("{test}: skipped (set STREAM_DEDUP_NATS_URL to run it)");
    }
    url
}

/// What one run saw.
#[derive(Debug, Default)]
struct Seen {
    /// Business key → the `delivered` count of each delivery of it, in arrival order.
    deliveries: HashMap<String, Vec<i64>>,
    /// Business key → how many times its handler finished (the effect).
    processed: HashMap<String, u32>,
    /// Progress acks sent.
    progress: u64,
}

impl Seen {
    fn redeliveries(&self) -> usize {
        self.deliveries
            .values()
            .flatten()
            .filter(|delivered| **delivered > 1)
            .count()
    }
}

/// Runs one consumer over `MESSAGES` fresh messages until the broker has nothing left: every
/// handler takes `HANDLER`; with `progress`, it sends `AckKind::Progress` on every heartbeat.
async fn run<S: ClaimStore + Clone>(url: &str, store: S, progress: bool) -> (Seen, Stats) {
    let name = unique_name("stream_dedup_progress");
    let broker = Broker::create(
        url,
        &name,
        ConsumerSettings {
            ack_wait: ACK_WAIT,
            // The control is redelivered every `ACK_WAIT` while its handler runs.
            max_deliver: 20,
        },
    )
    .await;
    broker
        .publish_all((0..MESSAGES).map(|n| format!("order-{n}/payment").into_bytes()))
        .await;

    let window = Window::max_keys(10_000)
        .ttl(Duration::from_secs(3_600))
        .lease(LEASE)
        .keep_alive(true)
        .store(store)
        .timeout(STORE_TIMEOUT);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let consumer = broker.consumer().await;
    let on_delivery = seen.clone();
    let claims = consumer
        .messages()
        .await
        .expect("pull messages")
        .map_err(async_nats::Error::from)
        .inspect_ok(move |m: &Message| {
            let delivered = m.info().map_or(1, |info| info.delivered);
            on_delivery
                .lock()
                .unwrap()
                .deliveries
                .entry(business_key(&m.payload))
                .or_default()
                .push(delivered);
        })
        .try_claim_by_key(|m: &Message| business_key(&m.payload), window)
        .on_duplicate(|m: Message| {
            tokio::spawn(async move {
                let _ = m.ack().await;
            });
        });
    // Held back (the control's redeliveries while the original runs): left unacked, the
    // broker redelivers it by itself.
    let stats = claims.stats();

    let drained = {
        let broker = &broker;
        async move {
            // Let the first deliveries arrive before asking whether anything is left.
            tokio::time::sleep(ACK_WAIT).await;
            broker.wait_drained(DEADLINE).await;
        }
    };
    claims
        .take_until(drained)
        .for_each_concurrent(None, |claim| {
            let seen = seen.clone();
            async move {
                let claim: Claim<Message> = claim.expect("consumer stream");
                handle(&claim, progress, &seen).await;
                let message = claim.commit().await.expect("commit");
                message.ack().await.expect("ack");
            }
        })
        .await;
    let _ = broker.js.delete_stream(&name).await;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    (seen, stats)
}

/// The slow handler: `HANDLER` of work, with a progress ack on every beat of keep-alive.
async fn handle(claim: &Claim<Message>, progress: bool, seen: &Mutex<Seen>) {
    let mut beat = claim.heartbeat();
    let work = tokio::time::sleep(HANDLER);
    tokio::pin!(work);
    loop {
        tokio::select! {
            () = &mut work => break,
            Some(()) = beat.tick(), if progress => {
                claim
                    .ack_with(AckKind::Progress)
                    .await
                    .expect("progress ack");
                seen.lock().unwrap().progress += 1;
            }
        }
    }
    assert!(!claim.is_lost(), "keep-alive holds the claim's key");
    *seen
        .lock()
        .unwrap()
        .processed
        .entry(business_key(&claim.payload))
        .or_default() += 1;
}

async fn progress_acks_prevent_redelivery<S: ClaimStore + Clone>(url: &str, store: S) {
    let (seen, stats) = run(url, store, true).await;
    println!(
        "with progress acks: {} progress acks, deliveries {:?}, stats {:?}",
        seen.progress,
        seen.deliveries.values().map(Vec::len).sum::<usize>(),
        stats.snapshot()
    );
    assert_eq!(seen.processed.len(), MESSAGES, "every message processed");
    assert!(
        seen.processed.values().all(|n| *n == 1),
        "every message processed once: {:?}",
        seen.processed
    );
    assert_eq!(seen.deliveries.len(), MESSAGES);
    for (key, deliveries) in &seen.deliveries {
        assert_eq!(deliveries, &[1], "{key}: delivered once, never again");
    }
    assert_eq!(seen.redeliveries(), 0);
    // About three beats per handler (every third of the 1 s lease, for 3 s).
    assert!(
        seen.progress >= 2 * MESSAGES as u64,
        "progress acks sent: {}",
        seen.progress
    );
    assert!(stats.renewed() > 0, "keep-alive renewed the short leases");
    assert_eq!(stats.leases_lost(), 0);
    assert_eq!(stats.committed(), MESSAGES as u64);
    assert_eq!(stats.held_back(), 0, "no copy to hold back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_nats), ignore = "set STREAM_DEDUP_NATS_URL")]
async fn a_slow_handler_with_progress_acks_is_never_redelivered() {
    let Some(url) = nats_url("a_slow_handler_with_progress_acks_is_never_redelivered") else {
        return;
    };
    progress_acks_prevent_redelivery(&url, MemoryStore::new()).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(server_redis, server_nats)),
    ignore = "set STREAM_DEDUP_REDIS_URL and STREAM_DEDUP_NATS_URL"
)]
async fn a_slow_handler_with_progress_acks_is_never_redelivered_redis() {
    let test = "a_slow_handler_with_progress_acks_is_never_redelivered_redis";
    let Some(url) = nats_url(test) else {
        return;
    };
    let Ok(redis_url) = std::env::var("STREAM_DEDUP_REDIS_URL") else {
        eprintln!("{test}: skipped (set STREAM_DEDUP_REDIS_URL to run it)");
        return;
    };
    let namespace = unique_name(test);
    let store = stream_dedup::store::RedisStore::connect(&redis_url, &namespace)
        .await
        .expect("connect to Redis");
    progress_acks_prevent_redelivery(&url, store).await;
    support::redis_server::delete_namespace(&redis_url, &namespace).await;
}

/// The control: the same handler without progress acks is redelivered while it runs (the test
/// above can fail). Claims still keep its effect to once: the copies are held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_nats), ignore = "set STREAM_DEDUP_NATS_URL")]
async fn without_progress_acks_the_slow_handler_is_redelivered() {
    let Some(url) = nats_url("without_progress_acks_the_slow_handler_is_redelivered") else {
        return;
    };
    let (seen, stats) = run(&url, MemoryStore::new(), false).await;
    println!(
        "without progress acks: redeliveries {}, stats {:?}",
        seen.redeliveries(),
        stats.snapshot()
    );
    assert_eq!(seen.progress, 0);
    assert!(
        seen.deliveries
            .values()
            .all(|d| d.iter().any(|delivered| *delivered > 1)),
        "every message redelivered while its handler ran: {:?}",
        seen.deliveries
    );
    assert!(stats.held_back() > 0, "the redeliveries were held back");
    assert!(
        seen.processed.values().all(|n| *n == 1),
        "claims keep the effect to once: {:?}",
        seen.processed
    );
}
