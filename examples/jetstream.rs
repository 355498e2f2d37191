//! A NATS JetStream pull consumer that drops redelivered messages with claims.
//!
//! The consumer has a short `ack_wait` (1 s), so the broker redelivers what is not acked in
//! time. Slow handlers take three times that; each tells the broker it is still working with
//! an `AckKind::Progress` on every beat of its claim's keep-alive (`Claim::heartbeat`), so it
//! is never redelivered, while the claims' lease stays short (2 s, renewed in the background).
//! A message whose ACK was lost comes back after it was processed (a duplicate: acked and
//! dropped). A key is marked done only when its claim commits, after the processing, so a
//! handler that fails never turns the redelivery into a "duplicate": nothing is lost.
//!
//! The example publishes a few hundred orders to a stream of its own, consumes them with
//! simulated lost ACKs and slow handlers, prints what happened, and deletes the stream.
//!
//! ```text
//! cargo run --example jetstream --features redis
//! ```
//!
//! It needs a NATS server with JetStream (`nats-server -js`) and Redis ≥ 7.0, which the
//! consumers share: `NATS_URL` defaults to `nats://127.0.0.1:4222`, `REDIS_URL` to
//! `redis://127.0.0.1:6379`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, Message, stream};
use futures::{StreamExt, TryStreamExt};
use stream_dedup::store::RedisStore;
use stream_dedup::{TryDedupStreamExt, Window};

/// Orders published.
const MESSAGES: usize = 300;
/// The broker redelivers a message that was not acked within this.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// Deliveries of a message before the broker gives up on it.
const MAX_DELIVER: i64 = 10;
/// How long a slow handler takes: three times `ACK_WAIT`.
const SLOW: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let client = match async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(url.as_str())
        .await
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!(
                "cannot reach NATS at {url}: {e}\n\
                 start a server with JetStream (`nats-server -js`), or set NATS_URL"
            );
            std::process::exit(1);
        }
    };
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let name = format!("stream_dedup_example_{}", std::process::id());
    // The store that every consumer of these orders shares, on every machine: the keys in
    // flight and done. Its namespace is this run's, so that runs do not meet.
    let store = match RedisStore::connect(&redis_url, &name).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!(
                "cannot reach Redis at {redis_url}: {e}\nstart redis-server, or set REDIS_URL"
            );
            std::process::exit(1);
        }
    };
    let js = jetstream::new(client);
    let result = run(&js, &name, store).await;
    // The stream is this run's own: delete it, whatever happened.
    let _ = js.delete_stream(&name).await;
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// What happened, counted.
#[derive(Default)]
struct Counts {
    deliveries: AtomicU64,
    redeliveries: AtomicU64,
    duplicates: AtomicU64,
    held_back: AtomicU64,
    lost_acks: AtomicU64,
    slow: AtomicU64,
    /// Progress acks sent by slow handlers.
    progress: AtomicU64,
    /// Redeliveries of the slow handlers' messages.
    slow_redelivered: AtomicU64,
}

async fn run(
    js: &jetstream::Context,
    name: &str,
    store: RedisStore,
) -> Result<(), async_nats::Error> {
    // A stream, and a durable pull consumer with a short ack_wait.
    let subject = format!("{name}.orders");
    let stream = js
        .create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;
    let consumer: PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(format!("{name}_worker")),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_deliver: MAX_DELIVER,
            ..Default::default()
        })
        .await?;

    // Each message carries a business key: it survives a redelivery, unlike a delivery id.
    let mut acks = Vec::new();
    for n in 0..MESSAGES {
        let payload = format!("order-{n}/payment");
        acks.push(js.publish(subject.clone(), payload.into()).await?);
    }
    for ack in acks {
        ack.await?;
    }
    println!("published {MESSAGES} orders to {subject}");

    let window = Window::max_keys(100_000)
        .ttl(Duration::from_secs(3_600))
        // A claim whose consumer died (no release) frees its key after the lease. Keep-alive
        // (on by default) renews the leases of open claims every third of it, so it can be
        // short whatever the handler's time: below ack_wait × max_deliver (10 s).
        .lease(Duration::from_secs(2))
        .store(store);

    let counts = Arc::new(Counts::default());
    let processed: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (c, d, h) = (counts.clone(), counts.clone(), counts.clone());
    let claims = consumer
        .messages()
        .await?
        // The stream's error type must take the store's errors too: a boxed error does.
        .map_err(async_nats::Error::from)
        .inspect_ok(move |m: &Message| {
            c.deliveries.fetch_add(1, Relaxed);
            if m.info().is_ok_and(|info| info.delivered > 1) {
                c.redeliveries.fetch_add(1, Relaxed);
                if faults(&String::from_utf8_lossy(&m.payload)).0 {
                    c.slow_redelivered.fetch_add(1, Relaxed);
                }
            }
        })
        // The business key is the payload. The key function must not fail: taking the
        // payload's bytes (not a `str`) makes any payload a key, UTF-8 or not.
        .try_claim_by_key(|m: &Message| m.payload.to_vec(), window)
        // The key is done: this is a repeat of a processed message. Ack it, or the broker
        // redelivers it again (the hook is synchronous: spawn the ack).
        .on_duplicate(move |m: Message| {
            d.duplicates.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let _ = m.ack().await;
            });
        })
        // The key is in flight (the original is still being processed): do NOT ack. If the
        // original fails, the broker's next delivery is the one that gets processed. (With
        // progress acks, the slow handlers' messages are not redelivered while they run.)
        .on_held_back(move |_m: Message| {
            h.held_back.fetch_add(1, Relaxed);
        });
    let stats = claims.stats();

    // Consume until the broker has nothing left for this consumer.
    let drained = {
        let consumer = consumer.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                match consumer.get_info().await {
                    Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => break,
                    _ => {}
                }
            }
        }
    };
    claims
        .take_until(drained)
        .for_each_concurrent(64, |claim| {
            let (counts, processed) = (counts.clone(), processed.clone());
            async move {
                let claim = match claim {
                    Ok(claim) => claim,
                    Err(e) => return eprintln!("consumer: {e}"),
                };
                let key = String::from_utf8_lossy(&claim.payload).into_owned();
                let first = claim.info().is_ok_and(|info| info.delivered == 1);
                let (slow, lose_ack) = faults(&key);
                if first && slow {
                    // Three times slower than ack_wait: on every beat of keep-alive (a third
                    // of the lease), tell the broker the handler is still working, or it
                    // redelivers meanwhile.
                    counts.slow.fetch_add(1, Relaxed);
                    let mut beat = claim.heartbeat();
                    let work = tokio::time::sleep(SLOW);
                    tokio::pin!(work);
                    loop {
                        tokio::select! {
                            () = &mut work => break,
                            Some(()) = beat.tick() => {
                                if let Err(e) = claim.ack_with(AckKind::Progress).await {
                                    eprintln!("progress ack failed: {e}");
                                }
                                counts.progress.fetch_add(1, Relaxed);
                            }
                        }
                    }
                }
                // Process the order (here: count it).
                *processed.lock().unwrap().entry(key).or_default() += 1;
                // The key is done only now. (Returning before this line, by an error or a
                // panic, drops the claim: the key is released and the redelivery processed.)
                let message = match claim.commit().await {
                    Ok(message) => message,
                    // Not done (e.g. the lease ran out): don't ack, the broker redelivers.
                    Err(e) => return eprintln!("commit failed: {e}"),
                };
                if first && lose_ack {
                    // The ACK never reaches the broker: it redelivers, and the copy is a
                    // duplicate (acked in on_duplicate).
                    counts.lost_acks.fetch_add(1, Relaxed);
                } else if let Err(e) = message.ack().await {
                    eprintln!("ack failed (the broker will redeliver): {e}");
                }
            }
        })
        .await;

    let processed = processed.lock().unwrap();
    let once = processed.values().filter(|n| **n == 1).count();
    println!(
        "simulated: {} slow handlers ({SLOW:?}, 3 × ack_wait; {} progress acks sent, \
         redelivered {} times), {} lost ACKs",
        counts.slow.load(Relaxed),
        counts.progress.load(Relaxed),
        counts.slow_redelivered.load(Relaxed),
        counts.lost_acks.load(Relaxed)
    );
    println!(
        "deliveries {}, redeliveries {}, duplicates dropped (acked) {}, held back {}, \
         messages processed {}",
        counts.deliveries.load(Relaxed),
        counts.redeliveries.load(Relaxed),
        counts.duplicates.load(Relaxed),
        counts.held_back.load(Relaxed),
        processed.values().sum::<u32>(),
    );
    println!(
        "{once} of {MESSAGES} orders processed exactly once (claims committed: {}, duplicates: {}, held back: {})",
        stats.committed(),
        stats.duplicates(),
        stats.held_back()
    );
    Ok(())
}

/// The simulated faults of an order's first delivery, from its key: about 1 in 16 is slow,
/// 1 in 10 loses its ACK (never both: one needs an even hash, the other an odd one).
fn faults(key: &str) -> (bool, bool) {
    // FNV-1a: a stable hash, so every run has the same faults.
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (h % 16 == 0, h % 10 == 1)
}
