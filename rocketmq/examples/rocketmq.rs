//! A RocketMQ push consumer that pays each order exactly once, whatever the broker redelivers.
//!
//! ```text
//! .ci/rocketmq.sh start            # or any name server and broker; prints the address
//! cargo run -p stream-dedup-rocketmq --example rocketmq
//! ```
//!
//! It publishes 200 orders, each keyed `{order}/payment` (the message's `KEYS`: the same in
//! every redelivery, while the `msg_id` changes), to a topic of its own, and consumes them
//! with claims on a Redis store:
//!
//! - **a failed handler** (1 order in 20, on its first try) releases its claim and answers
//!   `ReconsumeLater`: the broker sends the order back through the group's retry topic 10 s
//!   later, and it is processed then;
//! - **a handler slower than the consume timeout** (1 in 25, 20 s on its first try, against
//!   an ack timeout of 5 s) makes the listener answer `ReconsumeLater` while it still runs:
//!   the copy comes back 10 s later, is **held back** (its key is in flight: answered
//!   `ReconsumeLater` again, never acked), and comes back once more 30 s later, when the
//!   original has committed: a **duplicate**, acked as a success; two slow orders (50 and
//!   150) also fail after their copy was held back: their original's failure is not sent
//!   back (the listener gave it up already), and the held-back copy is the one that is paid;
//! - every effect is applied before its claim commits, and acked after: **exactly once**.
//!
//! The run takes about a minute (RocketMQ's retry delays: 10 s, then 30 s). It prints what it
//! saw and exits non-zero if an order was lost or paid twice. `STREAM_DEDUP_ROCKETMQ_NAMESRV`
//! (default `127.0.0.1:9876`) names the name server, `STREAM_DEDUP_REDIS_URL` (default
//! `redis://127.0.0.1:6379`) the Redis (≥ 7.0) that the consumers share.
//!
//! RocketMQ's own `consume_timeout` counts whole minutes and is enforced by a scan once per
//! timeout; the stream's ack timeout ([`ConsumerOptions::ack_timeout`]) is the one that counts
//! here, and it redelivers in the same way: `ReconsumeLater` while the handler runs.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rocketmq_client_rust::{DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_single::Message;
use stream_dedup::store::RedisStore;
use stream_dedup::{DedupStreamExt, Window};
use stream_dedup_rocketmq::{ClientHost, ConsumerOptions, Delivery};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep};

const ORDERS: usize = 200;
/// The stream's consume timeout: a listener call answers `ReconsumeLater` after this.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a slow handler takes on its first try: past the ack timeout and the retry delay
/// (10 s), so that the copy arrives while it still runs.
const SLOW: Duration = Duration::from_secs(20);

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What the consumer saw, counted.
#[derive(Default)]
struct Seen {
    deliveries: u64,
    first: u64,
    held_back: u64,
    duplicates: u64,
    failures: u64,
    slow: u64,
    /// Orders paid, and how many times: the effect.
    paid: HashMap<String, u32>,
    /// Keys whose held-back copy has not come back yet.
    awaited: HashSet<String>,
    seen: HashSet<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<bool, Error> {
    let namesrv = std::env::var("STREAM_DEDUP_ROCKETMQ_NAMESRV")
        .unwrap_or_else(|_| "127.0.0.1:9876".to_owned());
    let redis = std::env::var("STREAM_DEDUP_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let name = format!("stream_dedup_example_{}", std::process::id());
    let topic = format!("{name}_orders");

    // The client runs on a runtime of its own, whose listener lane fits the waiting calls.
    let options = ConsumerOptions::new()
        .concurrency(20)
        .ack_timeout(ACK_TIMEOUT);
    let host = ClientHost::start(&options)?;
    let result = consume(&host, &namesrv, &redis, &name, &topic, &options).await;
    host.shutdown().await;
    result
}

async fn consume(
    host: &ClientHost,
    namesrv: &str,
    redis: &str,
    name: &str,
    topic: &str,
    options: &ConsumerOptions,
) -> Result<bool, Error> {
    let store = RedisStore::connect(redis, name)
        .await
        .map_err(|e| format!("cannot reach Redis at {redis}: {e} (set STREAM_DEDUP_REDIS_URL)"))?;

    // Publish the orders (the broker creates the topic, with 4 queues).
    let mut producer = DefaultMQProducer::builder(host.client_runtime())
        .producer_group(format!("{name}_producer"))
        .name_server_addr(namesrv.to_owned())
        .build();
    producer.start().await?;
    for order in 0..ORDERS {
        let key = format!("{}/payment", 10_000 + order);
        let message = Message::builder()
            .topic(topic)
            .key(key.as_str())
            .body_slice(key.as_bytes())
            .build_unchecked();
        producer.send_with_timeout(message, 10_000).await.map_err(|e| {
            format!("cannot publish to the name server at {namesrv}: {e} (set STREAM_DEDUP_ROCKETMQ_NAMESRV)")
        })?;
    }
    producer.shutdown().await;
    println!("published {ORDERS} orders to {topic}");

    // The consumer: its listener feeds `deliveries`.
    let (listener, deliveries) = options.channel();
    let listener_stats = deliveries.stats_handle();
    let mut consumer = options
        .configure(DefaultMQPushConsumer::builder(host.client_runtime()))
        .consumer_group(format!("{name}_payments"))
        .name_server_addr(namesrv.to_owned())
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .build();
    consumer.subscribe(topic, "*").await?;
    consumer.register_message_listener_concurrently(listener);

    let seen = Arc::new(Mutex::new(Seen::default()));
    let window = Window::max_keys(100_000)
        // A key stays done for 10 minutes (longer than any redelivery here); then it expires
        // from the window and from Redis.
        .ttl(Duration::from_secs(600))
        // A claim whose consumer died frees its key after the lease; keep-alive (on by
        // default) renews an open claim's lease while its handler runs, however slow.
        .lease(Duration::from_secs(10))
        .store(store);
    let (s, d, h) = (seen.clone(), seen.clone(), seen.clone());
    let (end, ended) = oneshot::channel::<()>();
    let claims = deliveries
        // Until the consumer has shut down (its runtime may hold the listener until it stops).
        .take_until(ended)
        .inspect(move |delivery: &Delivery| {
            let mut s = s.lock().expect("not poisoned");
            s.deliveries += 1;
            let key = key(delivery).to_owned();
            s.awaited.remove(&key);
            if s.seen.insert(key) {
                s.first += 1;
            }
        })
        // The business key, not the msg_id (which a redelivery changes).
        .claim_by_key(|delivery: &Delivery| key(delivery).to_owned(), window)
        // Paid already: ack the copy as a success, or it comes back again.
        .on_duplicate(move |delivery: Delivery| {
            d.lock().expect("not poisoned").duplicates += 1;
            delivery.ack();
        })
        // Its original still runs: never ack (if it fails, this copy is what gets paid).
        .on_held_back(move |delivery: Delivery| {
            let mut h = h.lock().expect("not poisoned");
            h.held_back += 1;
            h.awaited.insert(key(&delivery).to_owned());
            delivery.nack();
        });
    let stats = claims.stats();
    consumer.start().await?;
    let started = Instant::now();

    let processing = tokio::spawn({
        let seen = seen.clone();
        claims.for_each_concurrent(None, move |claim| {
            let seen = seen.clone();
            async move {
                let key = key(&claim).to_owned();
                let order = order(&key);
                // A first delivery (a copy from the retry topic has reconsume_times > 0).
                let first_try = claim.reconsume_times() == 0;
                if first_try && order.is_multiple_of(25) {
                    seen.lock().expect("not poisoned").slow += 1;
                    sleep(SLOW).await; // past the ack timeout: the broker redelivers meanwhile
                } else {
                    sleep(Duration::from_millis(20)).await;
                }
                if first_try && order % 20 == 10 {
                    // The payment service failed: release the key, let the broker retry.
                    seen.lock().expect("not poisoned").failures += 1;
                    claim.release().nack();
                    return;
                }
                // The effect: pay the order (here, count it).
                *seen
                    .lock()
                    .expect("not poisoned")
                    .paid
                    .entry(key)
                    .or_default() += 1;
                match claim.commit().await {
                    // Done: ack (after a slow run the listener stopped waiting; the held-back
                    // copy will be acked as a duplicate instead).
                    Ok(delivery) => {
                        delivery.ack();
                    }
                    // Not done: the broker redelivers and the order is paid again; this is
                    // the window that a transaction with the payment closes.
                    Err(e) => eprintln!("commit failed: {e}"),
                }
            }
        })
    });

    // Until every order is paid and every held-back copy came back (as a duplicate).
    let deadline = started + Duration::from_secs(180);
    loop {
        sleep(Duration::from_millis(500)).await;
        let s = seen.lock().expect("not poisoned");
        if (s.paid.len() == ORDERS && s.awaited.is_empty()) || Instant::now() > deadline {
            break;
        }
    }
    consumer.shutdown().await;
    let _ = end.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), processing).await;

    let s = seen.lock().expect("not poisoned");
    let listener = listener_stats.get();
    let lost = (0..ORDERS)
        .filter(|i| !s.paid.contains_key(&format!("{}/payment", 10_000 + i)))
        .count();
    let doubled = s.paid.values().filter(|n| **n > 1).count();
    let redeliveries = s.deliveries - s.first;
    println!(
        "simulated: {} slow handlers (past the {ACK_TIMEOUT:?} ack timeout), {} failures",
        s.slow, s.failures
    );
    println!("orders published             {ORDERS}");
    println!("deliveries                   {}", s.deliveries);
    println!("  redeliveries               {redeliveries}");
    println!(
        "    processed (a failed try) {}",
        redeliveries - s.held_back - s.duplicates
    );
    println!("    held back (original ran) {}", s.held_back);
    println!("    duplicates (acked)       {}", s.duplicates);
    println!(
        "listener                     {} ConsumeSuccess, {} ReconsumeLater ({} past the ack timeout)",
        listener.succeeded, listener.reconsumed, listener.timed_out
    );
    println!("claims committed             {}", stats.committed());
    println!(
        "orders paid                  {}",
        s.paid.values().sum::<u32>()
    );
    println!("elapsed                      {:.1?}", started.elapsed());
    if lost == 0 && doubled == 0 {
        println!("every order paid exactly once, none lost");
        Ok(true)
    } else {
        println!("LOST {lost}, PAID TWICE {doubled}");
        Ok(false)
    }
}

/// The delivery's business key (the `KEYS` property).
fn key(delivery: &Delivery) -> &str {
    delivery.keys().unwrap_or_default()
}

/// The order number of a key `{10000 + order}/payment`.
fn order(key: &str) -> usize {
    key.split('/')
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(0, |n| n.saturating_sub(10_000))
}
