//! The inbox pattern: a RabbitMQ consumer whose effect is a PostgreSQL write, applied exactly
//! once.
//!
//! Each order message pays the order: a row in `payments`, a table with no unique constraint
//! of its own. The payment is written in a transaction, and the claim on the order's key is
//! committed **in that transaction** with [`Claim::commit_with`](stream_dedup::Claim::commit_with):
//! the payment and "this order is done" commit together or not at all. The message is acked
//! only after that. A consumer that dies before the commit leaves nothing behind (the broker
//! redelivers, the redelivery pays); one that dies after it leaves the key done (the
//! redelivery is a duplicate, acked and dropped).
//!
//! The example publishes orders, some of them several times (a producer's retries), to a
//! queue of its own; two consumers share the queue and one `PostgresStore` namespace; some
//! payments fail the first time (rolled back, nacked, redelivered, paid then). It prints what
//! it saw and exits non-zero if any order was paid twice, or not at all. It drops its queue,
//! its table and its keys at the end.
//!
//! ```text
//! cargo run --example postgres_inbox --features postgres
//! ```
//!
//! `STREAM_DEDUP_POSTGRES_URL` defaults to `postgres://postgres@127.0.0.1:5432/test`,
//! `STREAM_DEDUP_AMQP_URL` to `amqp://guest:guest@127.0.0.1:5672/%2f`.

use std::collections::HashSet;
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
use stream_dedup::sqlx::{self, PgPool};
use stream_dedup::store::PostgresStore;
use stream_dedup::{HeldBack, TryDedupStreamExt, Verdict, Window};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Orders published (each once, some of them again).
const ORDERS: u64 = 200;
/// A consumer stops when the queue has been quiet this long.
const QUIET: Duration = Duration::from_secs(2);

/// What the consumers saw.
#[derive(Default)]
struct Counts {
    paid: AtomicU64,
    duplicates: AtomicU64,
    held_back: AtomicU64,
    failed: AtomicU64,
}

#[tokio::main]
async fn main() {
    let pg_url = std::env::var("STREAM_DEDUP_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let amqp_url = std::env::var("STREAM_DEDUP_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let pool = match PgPool::connect(&pg_url).await {
        Ok(pool) => pool,
        Err(e) => fail(&format!("cannot reach PostgreSQL at {pg_url}: {e}")),
    };
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    let amqp = match Connection::connect(&amqp_url, props).await {
        Ok(conn) => conn,
        Err(e) => fail(&format!("cannot reach RabbitMQ at {amqp_url}: {e}")),
    };
    // This run's queue, table and namespace, so that runs never meet.
    let run = std::process::id();
    let queue = format!("stream-dedup-inbox-{run}");
    let payments = format!("stream_dedup_example_payments_{run}");
    let namespace = format!("inbox-example-{run}");

    let result = inbox(&amqp, &pool, &queue, &payments, &namespace).await;

    // Clean up, whatever happened.
    if let Ok(channel) = amqp.create_channel().await {
        let _ = channel
            .queue_delete(&queue, QueueDeleteOptions::default())
            .await;
    }
    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {payments}"))
        .execute(&pool)
        .await;
    let _ = sqlx::query("DELETE FROM stream_dedup_keys WHERE namespace = $1")
        .bind(&namespace)
        .execute(&pool)
        .await;
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => fail(&format!("error: {e}")),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(1);
}

/// Publishes, consumes with two consumers, checks the payments: `Ok(false)` if an order was
/// paid twice or not at all.
async fn inbox(
    amqp: &Connection,
    pool: &PgPool,
    queue: &str,
    payments: &str,
    namespace: &str,
) -> Result<bool, BoxError> {
    // The business table, as an application has it: no unique constraint on the order.
    sqlx::query(&format!(
        "CREATE TABLE {payments} (order_id text NOT NULL, amount_cents bigint NOT NULL, \
         paid_by int NOT NULL, paid_at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(pool)
    .await?;

    let published = publish(amqp, queue).await?;
    println!("published {published} messages for {ORDERS} orders");

    // The keys live next to the payments, in the same database (and the same pool).
    let store = PostgresStore::from_pool(pool.clone(), namespace).await?;
    let counts = Arc::new(Counts::default());
    // Orders whose first payment attempt fails (a gateway timeout, say).
    let flaky: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut consumers = Vec::new();
    for id in 0..2 {
        let channel = amqp.create_channel().await?;
        let store = store.clone();
        let (pool, payments) = (pool.clone(), payments.to_owned());
        let (counts, flaky, queue) = (Arc::clone(&counts), Arc::clone(&flaky), queue.to_owned());
        consumers.push(tokio::spawn(async move {
            consume(
                id, channel, &queue, store, &pool, &payments, &counts, &flaky,
            )
            .await
        }));
    }
    for consumer in consumers {
        consumer.await??;
    }

    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT order_id, count(*) FROM {payments} GROUP BY order_id ORDER BY order_id"
    ))
    .fetch_all(pool)
    .await?;
    let twice: Vec<&(String, i64)> = rows.iter().filter(|(_, n)| *n > 1).collect();
    let missing = ORDERS - rows.len() as u64;
    println!(
        "paid {} orders ({} payments); acked {} duplicates; requeued {} copies held back while \
         the other consumer had them, and {} failed payments (rolled back, redelivered, paid)",
        rows.len(),
        counts.paid.load(Relaxed),
        counts.duplicates.load(Relaxed),
        counts.held_back.load(Relaxed),
        counts.failed.load(Relaxed),
    );
    if !twice.is_empty() || missing > 0 {
        eprintln!("FAILED: paid twice: {twice:?}; never paid: {missing}");
        return Ok(false);
    }
    println!("ok: every order paid exactly once");
    Ok(true)
}

/// Publishes every order once, and every third and every seventh again, with publisher
/// confirms; answers how many messages.
async fn publish(amqp: &Connection, queue: &str) -> Result<u64, BoxError> {
    let channel = amqp.create_channel().await?;
    channel
        .queue_declare(queue, QueueDeclareOptions::default(), FieldTable::default())
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut messages = Vec::new();
    for order in 0..ORDERS {
        messages.push(order);
    }
    messages.extend((0..ORDERS).filter(|o| o % 3 == 0));
    messages.extend((0..ORDERS).filter(|o| o % 7 == 0));
    for &order in &messages {
        let body = format!("order-{order:05}:{}", (order + 1) * 100);
        channel
            .basic_publish(
                "",
                queue,
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await?
            .await?;
    }
    Ok(messages.len() as u64)
}

/// The order's id and amount, from `order-00042:4300`.
fn parse(delivery: &Delivery) -> Option<(&str, i64)> {
    let body = std::str::from_utf8(&delivery.data).ok()?;
    let (id, amount) = body.split_once(':')?;
    Some((id, amount.parse().ok()?))
}

/// The key of a delivery: its order id (a malformed body is its own key; it fails later).
fn order_key(delivery: &Delivery) -> String {
    match parse(delivery) {
        Some((id, _)) => id.to_owned(),
        None => String::from_utf8_lossy(&delivery.data).into_owned(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    id: i32,
    channel: Channel,
    queue: &str,
    store: PostgresStore,
    pool: &PgPool,
    payments: &str,
    counts: &Counts,
    flaky: &Mutex<HashSet<String>>,
) -> Result<(), BoxError> {
    channel.basic_qos(16, BasicQosOptions::default()).await?;
    let deliveries = channel
        .basic_consume(
            queue,
            &format!("inbox-{id}"),
            BasicConsumeOptions::default(), // manual acks
            FieldTable::default(),
        )
        .await?
        .map_err(BoxError::from);
    let window = Window::max_keys(10_000)
        .ttl(Duration::from_secs(24 * 60 * 60))
        .store(store)
        .timeout(Duration::from_secs(2));
    let mut verdicts = std::pin::pin!(
        deliveries
            .try_claim_by_key(order_key, window)
            // RabbitMQ keeps an unacked message until it is acked or nacked: a copy whose
            // original is in flight here waits for it (then a duplicate, or a new claim).
            .held_back(HeldBack::Wait { max_parked: 64 })
            .verdicts()
    );
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    while let Ok(Some(verdict)) = tokio::time::timeout(QUIET, verdicts.next()).await {
        match verdict? {
            Verdict::Claimed(claim) => {
                let Some((order, amount)) = parse(&claim) else {
                    eprintln!("malformed message dropped: {:?}", claim.data);
                    let delivery = claim.commit().await?;
                    delivery.ack(BasicAckOptions::default()).await?;
                    continue;
                };
                let order = order.to_owned();
                // The effect and the key, in one transaction.
                let mut tx = pool.begin().await?;
                sqlx::query(&format!(
                    "INSERT INTO {payments} (order_id, amount_cents, paid_by) VALUES ($1, $2, $3)"
                ))
                .bind(&order)
                .bind(amount)
                .bind(id)
                .execute(&mut *tx)
                .await?;
                if order.ends_with('5') && flaky.lock().unwrap().insert(order.clone()) {
                    // The payment fails: dropping `tx` rolls it back, releasing the claim
                    // frees the key, and the nack makes the broker deliver it again.
                    counts.failed.fetch_add(1, Relaxed);
                    drop(tx);
                    let delivery = claim.release();
                    delivery.nack(requeue).await?;
                    continue;
                }
                match claim.commit_with(tx).await {
                    Ok(delivery) => {
                        counts.paid.fetch_add(1, Relaxed);
                        delivery.ack(BasicAckOptions::default()).await?;
                    }
                    Err(e) => {
                        // Rolled back, key released: let the broker deliver it again.
                        eprintln!("consumer {id}: {order} not paid: {}", e.error());
                        e.into_item().nack(requeue).await?;
                    }
                }
            }
            Verdict::Duplicate(delivery) => {
                counts.duplicates.fetch_add(1, Relaxed);
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Verdict::HeldBack(delivery) => {
                // In flight at the other consumer, or too many parked: later.
                counts.held_back.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
                delivery.nack(requeue).await?;
            }
            Verdict::Failed(delivery, e) => {
                eprintln!("consumer {id}: store failed: {e}");
                delivery.nack(requeue).await?;
            }
        }
    }
    Ok(())
}
