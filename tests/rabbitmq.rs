//! The proof against a real RabbitMQ broker (issue 14), through lapin: copies published while
//! their original is still being processed are held back, and with [`HeldBack::Wait`] they wait
//! for it, with no nack in user code:
//! - the original commits: the copy is acked as a duplicate (from the `on_duplicate` hook, or
//!   with `.await` from [`verdicts`](stream_dedup::TryClaimByKey::verdicts)); nothing stays
//!   unacked while the channel is open, and each effect happens once;
//! - the original fails (released, and nacked without requeue): the waiting copy becomes a new
//!   claim and is processed, once;
//! - the control: with the default [`HeldBack::Hook`] and nothing done in the hook, the copy
//!   stays unacked for as long as the channel is open (RabbitMQ never redelivers it by
//!   itself), which is why `Wait` exists.
//!
//! "Unacked" is read from the broker twice: live, with `rabbitmqctl` when it can be run on
//! this machine, and by closing the consumer's channel (RabbitMQ requeues what it left
//! unacked) and counting the queue's ready messages.
//!
//! Needs `STREAM_DEDUP_AMQP_URL` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`); skips
//! without it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use stream_dedup::store::MemoryStore;
use stream_dedup::{Claim, HeldBack, IntoClaimWindow, Stats, TryDedupStreamExt, Verdict, Window};
use tokio::sync::watch;
use tokio::time::Instant;

/// The consumer stream's error: lapin's, or the store's.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Business keys per scenario: each published once as an original and once as a copy.
const KEYS: usize = 40;
/// How long the broker may take to reach the state a scenario waits for.
const DEADLINE: Duration = Duration::from_secs(30);

/// The AMQP URL, or `None` (and a line saying the test skipped).
fn amqp_url(test: &str) -> Option<String> {
    let url = std::env::var("STREAM_DEDUP_AMQP_URL").ok();
    if url.is_none() {
        eprintln!("{test}: skipped (set STREAM_DEDUP_AMQP_URL to run it)");
    }
    url
}

/// The business key of a delivery: its body up to `|` (`order-7|copy` → `order-7`). Total.
fn business_key(data: &[u8]) -> Vec<u8> {
    data.split(|b| *b == b'|')
        .next()
        .unwrap_or_default()
        .to_vec()
}

/// Whether a delivery is the copy (published second) of its key.
fn is_copy(data: &[u8]) -> bool {
    data.ends_with(b"|copy")
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|n| format!("order-{n}")).collect()
}

/// A queue of this run's own on a RabbitMQ broker, deleted on drop of the test (by `delete`).
struct Rabbit {
    connection: Connection,
    queue: String,
}

impl Rabbit {
    async fn create(url: &str, test: &str) -> Rabbit {
        let connection = Connection::connect(
            url,
            ConnectionProperties::default()
                .with_executor(tokio_executor_trait::Tokio::current())
                .with_reactor(tokio_reactor_trait::Tokio::current()),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ at {url}: {e}"));
        let queue = format!(
            "stream_dedup_{test}_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let channel = connection.create_channel().await.expect("channel");
        channel
            .queue_declare(
                &queue,
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare the queue");
        let _ = channel.close(200, "declared").await;
        Rabbit { connection, queue }
    }

    /// Publishes `bodies` to the queue and waits for the broker's confirms.
    async fn publish(&self, bodies: impl IntoIterator<Item = String>) {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let mut confirms = Vec::new();
        for body in bodies {
            confirms.push(
                channel
                    .basic_publish(
                        "",
                        &self.queue,
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default(),
                    )
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            assert!(
                confirm.await.expect("confirm").is_ack(),
                "the broker took it"
            );
        }
        let _ = channel.close(200, "published").await;
    }

    /// A channel of its own with room for every message, and a consumer on it.
    async fn consume(&self) -> (Channel, lapin::Consumer) {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .basic_qos(4 * KEYS as u16, BasicQosOptions::default())
            .await
            .expect("prefetch");
        let consumer = channel
            .basic_consume(
                &self.queue,
                "stream-dedup-test",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        (channel, consumer)
    }

    /// Messages ready for delivery (not counting those delivered and unacked).
    async fn ready(&self) -> u32 {
        let channel = self.connection.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                &self.queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = channel.close(200, "counted").await;
        queue.message_count()
    }

    /// Waits until the queue has `n` messages ready.
    async fn wait_ready(&self, n: u32) {
        wait_until(&format!("{n} messages ready"), async || {
            (self.ready().await == n).then_some(())
        })
        .await;
    }

    /// Messages delivered and not acked, live from `rabbitmqctl` (`None` when it cannot be run
    /// here: another machine, no rights).
    async fn unacked(&self) -> Option<u64> {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages_unacknowledged",
            ])
            .output()
            .await
            .ok()
            .filter(|out| out.status.success())?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(self.queue.as_str()))
                    .then(|| fields.next()?.parse().ok())
                    .flatten()
            })
    }

    /// Checks, while the consumer's channel is open, that `n` messages are unacked (when
    /// `rabbitmqctl` can tell; it is read a few times, as its figures lag a little).
    async fn expect_unacked(&self, n: u64) {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match self.unacked().await {
                None => {
                    eprintln!("rabbitmqctl cannot be run here: unacked checked on close only");
                    return;
                }
                Some(unacked) if unacked == n => return,
                Some(unacked) => assert!(
                    Instant::now() < end,
                    "unacked, live: {unacked}, expected {n}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn delete(self) {
        let channel = self.connection.create_channel().await.expect("channel");
        let _ = channel
            .queue_delete(&self.queue, QueueDeleteOptions::default())
            .await;
        let _ = self.connection.close(200, "done").await;
    }
}

async fn wait_until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < end, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a scenario saw.
#[derive(Debug, Default)]
struct Counts {
    /// Handlers started.
    started: AtomicU64,
    /// Copies delivered.
    copies: AtomicU64,
    /// Duplicates acked.
    duplicates_acked: AtomicU64,
    /// Copies handed to `on_held_back`.
    held_back: AtomicU64,
    /// Claims committed and acked.
    acked: AtomicU64,
    /// Originals that failed (released, nacked).
    failed: AtomicU64,
    /// Business key → effects applied, and by which delivery (`true`: the copy).
    effects: Mutex<HashMap<Vec<u8>, Vec<bool>>>,
}

impl Counts {
    fn summary(&self) -> String {
        format!(
            "handlers {}, copies delivered {}, duplicates acked {}, to on_held_back {}, \
             claims acked {}, originals failed {}",
            get(&self.started),
            get(&self.copies),
            get(&self.duplicates_acked),
            get(&self.held_back),
            get(&self.acked),
            get(&self.failed)
        )
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

/// How a scenario's handlers behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handler {
    /// Process, commit, ack.
    Succeed,
    /// An original fails: its claim is dropped (the key released) and it is nacked without
    /// requeue; a copy is processed.
    FailOriginals,
}

/// One handler: waits for the gate (so that the copies arrive while it runs), then processes
/// or fails.
async fn handle(
    claim: Claim<Delivery>,
    handler: Handler,
    gate: watch::Receiver<bool>,
    counts: &Counts,
) {
    counts.started.fetch_add(1, Relaxed);
    let mut gate = gate;
    let _ = gate.wait_for(|open| *open).await;
    if handler == Handler::FailOriginals && !is_copy(&claim.data) {
        let delivery = claim.release();
        delivery
            .nack(BasicNackOptions {
                requeue: false,
                ..Default::default()
            })
            .await
            .expect("nack");
        counts.failed.fetch_add(1, Relaxed);
        return;
    }
    counts
        .effects
        .lock()
        .unwrap()
        .entry(business_key(&claim.data))
        .or_default()
        .push(is_copy(&claim.data));
    let delivery = claim.commit().await.expect("commit");
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    counts.acked.fetch_add(1, Relaxed);
}

/// How the consumer takes its verdicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    /// `on_duplicate` (a spawned ack) and `on_held_back` hooks.
    Hooks,
    /// `verdicts()`: duplicates acked with `.await`.
    Verdicts,
}

/// Consumes the queue with claims and `policy` until the future that `until` makes of the
/// operator's counters resolves, with the consumer's channel open until then.
#[allow(clippy::too_many_arguments)]
async fn consume<W, U, Fut>(
    rabbit: &Rabbit,
    window: W,
    policy: HeldBack,
    api: Api,
    handler: Handler,
    gate: watch::Receiver<bool>,
    counts: Arc<Counts>,
    until: U,
) -> (Channel, Stats)
where
    W: IntoClaimWindow<Vec<u8>, BoxError>,
    U: FnOnce(Stats) -> Fut,
    Fut: Future<Output = ()>,
{
    let (channel, consumer) = rabbit.consume().await;
    let delivered = counts.clone();
    let claims = consumer
        .map_err(BoxError::from)
        .inspect_ok(move |d: &Delivery| {
            if is_copy(&d.data) {
                delivered.copies.fetch_add(1, Relaxed);
            }
        })
        .try_claim_by_key(|d: &Delivery| business_key(&d.data), window)
        .held_back(policy);
    let stats = claims.stats();
    let until = until(stats.clone());
    match api {
        Api::Hooks => {
            let (dups, held) = (counts.clone(), counts.clone());
            claims
                // The original committed: ack the copy (a sync hook: spawn the ack).
                .on_duplicate(move |d: Delivery| {
                    let dups = dups.clone();
                    tokio::spawn(async move {
                        d.ack(BasicAckOptions::default()).await.expect("ack");
                        dups.duplicates_acked.fetch_add(1, Relaxed);
                    });
                })
                // Nothing done here (with `Wait`, only copies beyond `max_parked` come here).
                .on_held_back(move |_: Delivery| {
                    held.held_back.fetch_add(1, Relaxed);
                })
                .take_until(until)
                .for_each_concurrent(None, |claim| {
                    let (counts, gate) = (counts.clone(), gate.clone());
                    async move {
                        let claim = claim.expect("consumer stream");
                        handle(claim, handler, gate, &counts).await;
                    }
                })
                .await;
        }
        Api::Verdicts => {
            claims
                .verdicts()
                .take_until(until)
                .for_each_concurrent(None, |verdict| {
                    let (counts, gate) = (counts.clone(), gate.clone());
                    async move {
                        match verdict.expect("consumer stream") {
                            Verdict::Claimed(claim) => handle(claim, handler, gate, &counts).await,
                            // The original committed: ack with `.await`, its error in hand.
                            Verdict::Duplicate(d) => {
                                d.ack(BasicAckOptions::default()).await.expect("ack");
                                counts.duplicates_acked.fetch_add(1, Relaxed);
                            }
                            Verdict::HeldBack(_) => {
                                counts.held_back.fetch_add(1, Relaxed);
                            }
                            Verdict::Failed(_, e) => panic!("store failed: {e}"),
                        }
                    }
                })
                .await;
        }
    }
    (channel, stats)
}

fn window() -> Window {
    Window::max_keys(10_000)
        .ttl(Duration::from_secs(3_600))
        .lease(Duration::from_secs(2))
}

/// Publishes the originals; once their handlers all wait at the gate, publishes a copy of each
/// and waits until the operator has held every copy back (unacked, as are the originals).
async fn copies_while_originals_run(rabbit: &Rabbit, counts: &Counts, stats: &Stats) {
    wait_until("every original claimed", async || {
        (get(&counts.started) == KEYS as u64).then_some(())
    })
    .await;
    // The producer retries: a copy of every key while its original is in process.
    rabbit
        .publish(keys().into_iter().map(|k| format!("{k}|copy")))
        .await;
    wait_until("every copy delivered", async || {
        (get(&counts.copies) == KEYS as u64).then_some(())
    })
    .await;
    // Held back: none claimed. (A parked copy is counted again each time it is asked about.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(stats.held_back() >= KEYS as u64);
    assert_eq!(get(&counts.started), KEYS as u64, "no copy claimed");
    rabbit.wait_ready(0).await;
    rabbit.expect_unacked(2 * KEYS as u64).await;
}

/// The scenario with `HeldBack::Wait`: the copies wait for their originals, which then commit
/// (or fail, by `handler`). Every delivery is settled (acked, or an original nacked) with the
/// consumer's channel still open, and closing it requeues nothing.
async fn wait_for_originals<W>(
    url: &str,
    test: &str,
    window: W,
    api: Api,
    handler: Handler,
) -> (Arc<Counts>, Stats)
where
    W: IntoClaimWindow<Vec<u8>, BoxError>,
{
    let rabbit = Rabbit::create(url, test).await;
    rabbit
        .publish(keys().into_iter().map(|k| format!("{k}|original")))
        .await;
    let counts = Arc::new(Counts::default());
    let (open, gate) = watch::channel(false);
    let script = |stats: Stats| {
        let (rabbit, counts) = (&rabbit, counts.clone());
        async move {
            copies_while_originals_run(rabbit, &counts, &stats).await;
            open.send_replace(true);
            wait_until("every delivery settled", async || {
                let settled =
                    get(&counts.acked) + get(&counts.duplicates_acked) + get(&counts.failed);
                (settled == 2 * KEYS as u64).then_some(())
            })
            .await;
            // With the consumer's channel still open: nothing is left unacked, or ready.
            rabbit.expect_unacked(0).await;
            assert_eq!(rabbit.ready().await, 0);
        }
    };
    let (channel, stats) = consume(
        &rabbit,
        window,
        HeldBack::Wait { max_parked: 1_000 },
        api,
        handler,
        gate,
        counts.clone(),
        script,
    )
    .await;
    // Closing the channel requeues whatever it left unacked: nothing.
    channel.close(200, "done").await.expect("close the channel");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rabbit.ready().await, 0, "nothing was left unacked");
    println!(
        "{test}: {}; operator: {:?}",
        counts.summary(),
        stats.snapshot()
    );
    rabbit.delete().await;
    (counts, stats)
}

/// Each key's effect happened once, by the original (`false`) or the copy (`true`).
fn assert_once_by(counts: &Counts, by_copy: bool) {
    let effects = counts.effects.lock().unwrap();
    assert_eq!(effects.len(), KEYS, "every key processed: {effects:?}");
    for (key, by) in effects.iter() {
        assert_eq!(
            by,
            &[by_copy],
            "{}: processed once, by the {}",
            String::from_utf8_lossy(key),
            if by_copy { "copy" } else { "original" }
        );
    }
}

/// The copies wait for their originals and are acked as duplicates from `on_duplicate`; no
/// nack in user code, nothing stays unacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_amqp), ignore = "set STREAM_DEDUP_AMQP_URL")]
async fn waiting_copies_are_acked_as_duplicates() {
    let test = "waiting_copies_are_acked_as_duplicates";
    let Some(url) = amqp_url(test) else {
        return;
    };
    let (counts, stats) =
        wait_for_originals(&url, test, window(), Api::Hooks, Handler::Succeed).await;
    assert_once_by(&counts, false);
    assert_eq!(get(&counts.duplicates_acked), KEYS as u64);
    assert_eq!(get(&counts.held_back), 0, "no copy went to the hook");
    assert_eq!(stats.duplicates(), KEYS as u64);
    assert_eq!(stats.committed(), KEYS as u64);
}

/// The same through `verdicts()`, with a store (the store path parks the copies): the
/// duplicates are acked with `.await`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_amqp), ignore = "set STREAM_DEDUP_AMQP_URL")]
async fn verdicts_ack_waiting_copies_with_await() {
    let test = "verdicts_ack_waiting_copies_with_await";
    let Some(url) = amqp_url(test) else {
        return;
    };
    let window = window().store(MemoryStore::new());
    let (counts, stats) =
        wait_for_originals(&url, test, window, Api::Verdicts, Handler::Succeed).await;
    assert_once_by(&counts, false);
    assert_eq!(get(&counts.duplicates_acked), KEYS as u64);
    assert_eq!(get(&counts.held_back), 0, "no copy was yielded held back");
    assert_eq!(stats.committed(), KEYS as u64);
}

/// The originals fail (released, nacked without requeue: the broker drops them): each waiting
/// copy becomes a new claim and is processed, once. Nothing is lost, though the broker will
/// never deliver the originals again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_amqp), ignore = "set STREAM_DEDUP_AMQP_URL")]
async fn a_released_original_hands_its_key_to_the_waiting_copy() {
    let test = "a_released_original_hands_its_key_to_the_waiting_copy";
    let Some(url) = amqp_url(test) else {
        return;
    };
    let (counts, stats) =
        wait_for_originals(&url, test, window(), Api::Verdicts, Handler::FailOriginals).await;
    assert_once_by(&counts, true);
    assert_eq!(get(&counts.failed), KEYS as u64);
    assert_eq!(get(&counts.duplicates_acked), 0);
    assert_eq!(stats.released(), KEYS as u64);
    assert_eq!(stats.committed(), KEYS as u64);
}

/// The same with a Redis store.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(server_redis, server_amqp)),
    ignore = "set STREAM_DEDUP_REDIS_URL and STREAM_DEDUP_AMQP_URL"
)]
async fn a_released_original_hands_its_key_to_the_waiting_copy_redis() {
    let test = "a_released_original_hands_its_key_to_the_waiting_copy_redis";
    let Some(url) = amqp_url(test) else {
        return;
    };
    let Ok(redis_url) = std::env::var("STREAM_DEDUP_REDIS_URL") else {
        eprintln!("{test}: skipped (set STREAM_DEDUP_REDIS_URL to run it)");
        return;
    };
    let namespace = format!(
        "{test}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let store = stream_dedup::store::RedisStore::connect(&redis_url, &namespace)
        .await
        .expect("connect to Redis");
    let (counts, _) = wait_for_originals(
        &url,
        test,
        window().store(store),
        Api::Hooks,
        Handler::FailOriginals,
    )
    .await;
    assert_once_by(&counts, true);
}

/// The control: with the default policy (`HeldBack::Hook`) and nothing done in the hook, the
/// copies stay unacked as long as the channel is open: RabbitMQ does not deliver them again by
/// itself (they hold the prefetch), and they come back only when the channel closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(server_amqp), ignore = "set STREAM_DEDUP_AMQP_URL")]
async fn with_the_hook_policy_and_no_nack_a_held_back_copy_stays_unacked() {
    let test = "with_the_hook_policy_and_no_nack_a_held_back_copy_stays_unacked";
    let Some(url) = amqp_url(test) else {
        return;
    };
    let rabbit = Rabbit::create(&url, test).await;
    rabbit
        .publish(keys().into_iter().map(|k| format!("{k}|original")))
        .await;
    let counts = Arc::new(Counts::default());
    let (open, gate) = watch::channel(false);
    let script = |stats: Stats| {
        let (rabbit, counts) = (&rabbit, counts.clone());
        async move {
            copies_while_originals_run(rabbit, &counts, &stats).await;
            open.send_replace(true);
            wait_until("every original acked", async || {
                (get(&counts.acked) == KEYS as u64).then_some(())
            })
            .await;
            // The broker has nothing more to deliver, and delivers nothing again.
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(rabbit.ready().await, 0);
            assert_eq!(stats.accepted() + stats.held_back(), 2 * KEYS as u64);
            assert_eq!(get(&counts.copies), KEYS as u64, "no copy delivered again");
            // The copies: delivered, never acked.
            rabbit.expect_unacked(KEYS as u64).await;
        }
    };
    let (channel, stats) = consume(
        &rabbit,
        window(),
        HeldBack::Hook,
        Api::Hooks,
        Handler::Succeed,
        gate,
        counts.clone(),
        script,
    )
    .await;
    assert_eq!(
        get(&counts.held_back),
        KEYS as u64,
        "every copy went to the hook"
    );
    assert_eq!(get(&counts.duplicates_acked), 0);
    assert_once_by(&counts, false);
    // Closing the channel gives the copies back to the queue: they were unacked all along.
    channel.close(200, "done").await.expect("close the channel");
    rabbit.wait_ready(KEYS as u32).await;
    println!(
        "{test}: {}; operator: {:?}",
        counts.summary(),
        stats.snapshot()
    );
    rabbit.delete().await;
}
