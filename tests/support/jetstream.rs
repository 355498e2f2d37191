//! A real NATS JetStream broker and a PostgreSQL side-effect ledger, for the JetStream proof
//! (`tests/jetstream.rs`).
//!
//! Both are reached through `STREAM_DEDUP_NATS_URL` (e.g. `nats://127.0.0.1:4222`) and
//! `STREAM_DEDUP_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`); when either
//! is unset, [`Env::from_env`] says the test skipped and returns `None`.
//!
//! Every run uses a stream and a table of its own (pid + random suffix), and a [`Cleanup`]
//! guard deletes them when it is dropped, also when the test panics.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, consumer::PullConsumer, stream};
use tokio::time::Instant;

/// Where the servers are.
#[derive(Clone, Debug)]
pub struct Env {
    pub nats_url: String,
    pub postgres_url: String,
}

impl Env {
    /// Both URLs, or `None` (and a line saying the test skipped) when one is unset.
    pub fn from_env(test: &str) -> Option<Env> {
        let nats = std::env::var("STREAM_DEDUP_NATS_URL").ok();
        let pg = std::env::var("STREAM_DEDUP_POSTGRES_URL").ok();
        match (nats, pg) {
            (Some(nats_url), Some(postgres_url)) => Some(Env {
                nats_url,
                postgres_url,
            }),
            _ => {
                eprintln!(
                    "{test}: skipped (set STREAM_DEDUP_NATS_URL and STREAM_DEDUP_POSTGRES_URL to run it)"
                );
                None
            }
        }
    }
}

/// A name no other run uses: `prefix_<pid>_<random>` (valid as a JetStream stream name and
/// as a PostgreSQL identifier).
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// The business key carried by a payload. Total: a payload that is not UTF-8 gets a key of
/// its own (its bytes in hex), never a panic, and never the key of a valid payload.
pub fn business_key(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(key) => key.to_owned(),
        Err(_) => {
            let mut key = String::from("\u{0}non-utf8:");
            for b in payload {
                key.push_str(&format!("{b:02x}"));
            }
            key
        }
    }
}

/// The settings of the consumer under test.
#[derive(Clone, Copy, Debug)]
pub struct ConsumerSettings {
    pub ack_wait: Duration,
    pub max_deliver: i64,
}

/// One fresh stream with one durable pull consumer.
pub struct Broker {
    pub js: jetstream::Context,
    pub stream: String,
    pub subject: String,
    pub durable: String,
    url: String,
}

impl Broker {
    /// Creates the stream `name` (memory storage, subject `name.orders`) and the durable pull
    /// consumer `name_worker` on it.
    pub async fn create(url: &str, name: &str, settings: ConsumerSettings) -> Broker {
        let js = jetstream::new(connect(url).await);
        let subject = format!("{name}.orders");
        let stream = js
            .create_stream(stream::Config {
                name: name.to_owned(),
                subjects: vec![subject.clone()],
                storage: stream::StorageType::Memory,
                ..Default::default()
            })
            .await
            .expect("create the stream");
        let durable = format!("{name}_worker");
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(durable.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: settings.ack_wait,
                max_deliver: settings.max_deliver,
                // Held-back copies stay unacked for a while: leave room for all of them.
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await
            .expect("create the consumer");
        Broker {
            js,
            stream: name.to_owned(),
            subject,
            durable,
            url: url.to_owned(),
        }
    }

    /// Publishes one message per payload and waits for the stream to have stored them all.
    pub async fn publish_all(&self, payloads: impl IntoIterator<Item = Vec<u8>>) {
        let mut acks = Vec::new();
        for payload in payloads {
            let ack = self
                .js
                .publish(self.subject.clone(), payload.into())
                .await
                .expect("publish");
            acks.push(ack);
        }
        for ack in acks {
            ack.await.expect("the stream stored the message");
        }
    }

    /// The consumer, through a connection of its own (each consumer of the test is a separate
    /// client, as separate processes would be).
    pub async fn consumer(&self) -> PullConsumer {
        let js = jetstream::new(connect(&self.url).await);
        js.get_stream(&self.stream)
            .await
            .expect("get the stream")
            .get_consumer(&self.durable)
            .await
            .expect("get the consumer")
    }

    /// The consumer's info now.
    pub async fn info(&self) -> consumer::Info {
        self.js
            .get_stream(&self.stream)
            .await
            .expect("get the stream")
            .consumer_info(&self.durable)
            .await
            .expect("consumer info")
    }

    /// Polls the consumer's info until the broker has nothing left for it: nothing pending
    /// delivery and nothing delivered but unacked. Panics after `deadline`.
    pub async fn wait_drained(&self, deadline: Duration) -> consumer::Info {
        let end = Instant::now() + deadline;
        loop {
            let info = self.info().await;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return info;
            }
            assert!(
                Instant::now() < end,
                "the broker still has messages after {deadline:?}: num_pending {}, num_ack_pending {}",
                info.num_pending,
                info.num_ack_pending
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Connects to NATS, or panics with a clear message.
pub async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to NATS at {url}: {e}"))
}

/// The side effect of processing a message: one row per key in PostgreSQL, counting how many
/// times the key's effect was applied. Each effect is its own (durable) transaction.
pub struct Ledger {
    /// A few connections, used in turn, so that concurrent handlers do not queue behind one.
    connections: Vec<(tokio_postgres::Client, tokio_postgres::Statement)>,
    next: AtomicUsize,
    table: String,
}

/// Connections per [`Ledger`].
const CONNECTIONS: usize = 4;

impl Ledger {
    /// Creates the table (if absent) and connects.
    pub async fn create(url: &str, table: &str) -> Ledger {
        connect_postgres(url)
            .await
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, n INTEGER NOT NULL)"
            ))
            .await
            .expect("create the ledger table");
        Self::connect(url, table).await
    }

    /// Connections to an existing ledger (each consumer has its own).
    pub async fn connect(url: &str, table: &str) -> Ledger {
        let mut connections = Vec::new();
        for _ in 0..CONNECTIONS {
            let client = connect_postgres(url).await;
            let apply = client
                .prepare(&format!(
                    "INSERT INTO {table} (key, n) VALUES ($1, 1) \
                     ON CONFLICT (key) DO UPDATE SET n = {table}.n + 1"
                ))
                .await
                .expect("prepare the ledger insert");
            connections.push((client, apply));
        }
        Ledger {
            connections,
            next: AtomicUsize::new(0),
            table: table.to_owned(),
        }
    }

    /// Applies the effect of `key` once.
    pub async fn apply(&self, key: &str) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        let (client, apply) = &self.connections[i];
        client
            .execute(apply, &[&key])
            .await
            .expect("apply the effect");
    }

    /// Every key with how many times its effect was applied.
    pub async fn counts(&self) -> HashMap<String, i32> {
        self.connections[0]
            .0
            .query(&format!("SELECT key, n FROM {}", self.table), &[])
            .await
            .expect("read the ledger")
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }
}

async fn connect_postgres(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {url:?}: {e}"));
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("ledger connection: {e}");
        }
    });
    client
}

/// Deletes the stream and drops the table when dropped, also when the test panics. It runs
/// on a thread of its own with a runtime of its own, so it works from any drop site.
pub struct Cleanup {
    pub env: Env,
    pub stream: String,
    pub table: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let env = self.env.clone();
        let (stream, table) = (self.stream.clone(), self.table.clone());
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup");
            rt.block_on(async move {
                let nats = async {
                    let client = async_nats::ConnectOptions::new()
                        .connection_timeout(Duration::from_secs(2))
                        .connect(env.nats_url.as_str())
                        .await
                        .map_err(|e| e.to_string())?;
                    let js = jetstream::new(client);
                    js.delete_stream(&stream)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                };
                if let Err(e) = nats.await {
                    eprintln!("cleanup: deleting the stream {stream}: {e}");
                }
                let pg = async {
                    let (client, connection) =
                        tokio_postgres::connect(&env.postgres_url, tokio_postgres::NoTls)
                            .await
                            .map_err(|e| e.to_string())?;
                    tokio::spawn(connection);
                    client
                        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
                        .await
                        .map_err(|e| e.to_string())
                };
                if let Err(e) = pg.await {
                    eprintln!("cleanup: dropping the table {table}: {e}");
                }
            });
        });
        let _ = done.join();
    }
}
