//! Helpers of the RocketMQ tests: the servers' addresses, names of a run's own, a producer,
//! and a consumer that runs a scenario's handlers with claims or with mark-on-emit.

#![allow(dead_code, reason = "each test binary uses a part of the helpers")]

pub mod ledger;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use rocketmq_client_rust::{DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_single::Message;
use stream_dedup::store::RedisStore;
use stream_dedup::{DedupStreamExt, Window};
use stream_dedup_rocketmq::{ClientHost, ConsumerOptions, Delivery, ListenerStats, StatsHandle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

pub use self::ledger::{Ledger, Report};

/// The servers, from the environment; `None` (and a line saying so) without them.
pub fn servers(test: &str) -> Option<(String, String)> {
    let namesrv = std::env::var("STREAM_DEDUP_ROCKETMQ_NAMESRV").ok();
    let redis = std::env::var("STREAM_DEDUP_REDIS_URL").ok();
    match (namesrv, redis) {
        (Some(n), Some(r)) => Some((n, r)),
        (n, r) => {
            let missing: Vec<&str> = [
                n.is_none().then_some("STREAM_DEDUP_ROCKETMQ_NAMESRV"),
                r.is_none().then_some("STREAM_DEDUP_REDIS_URL"),
            ]
            .into_iter()
            .flatten()
            .collect();
            eprintln!("skipped {test}: set {}", missing.join(" and "));
            None
        }
    }
}

/// A name of this run's own (topics, groups, Redis namespaces): runs never meet.
pub fn unique(what: &str) -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("sd_{what}_{}_{millis}", std::process::id())
}

/// Orders `0..n`, keyed `{order}/payment`.
pub fn order_keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{}/payment", 10_000 + i)).collect()
}

/// Publishes one message per key to `topic` (created by the broker on the first send, with 4
/// queues).
pub async fn publish(host: &ClientHost, namesrv: &str, topic: &str, keys: &[String]) {
    let mut producer = DefaultMQProducer::builder(host.client_runtime())
        .producer_group(format!("{topic}_producer"))
        .name_server_addr(namesrv.to_owned())
        .build();
    producer.start().await.expect("start the producer");
    for key in keys {
        let message = Message::builder()
            .topic(topic)
            .key(key.as_str())
            .body_slice(key.as_bytes())
            .build_unchecked();
        producer
            .send_with_timeout(message, 10_000)
            .await
            .expect("send a message");
    }
    producer.shutdown().await;
}

/// Deduplication on the consumer side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `claim_by_key`: a key is done when its claim commits, after the effect.
    Claims,
    /// `dedup_by_key`: a key is marked when its delivery leaves the operator.
    MarkOnEmit,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Claims => "claims",
            Mode::MarkOnEmit => "mark-on-emit",
        }
    }
}

/// What a handler run does.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plan {
    /// How long it works.
    pub work: Duration,
    /// Whether it fails at the end (`ReconsumeLater`) instead of applying its effect.
    pub fail: bool,
    /// Whether it first waits (up to this long) until the consume timeout sent its message
    /// back, so that the copy arrives while it still runs.
    pub until_expired: Option<Duration>,
}

/// A scenario's handler: the plan of a run, from the key and the attempt (1 for the first).
pub type Behaviour = Arc<dyn Fn(&str, u32) -> Plan + Send + Sync>;

/// A consumer's settings.
#[derive(Clone)]
pub struct Setup {
    pub namesrv: String,
    pub redis: String,
    pub topic: String,
    pub group: String,
    /// The Redis namespace of the deduplication store (shared by the group's consumers).
    pub namespace: String,
    pub mode: Mode,
    pub options: ConsumerOptions,
    /// The claims' lease.
    pub lease: Duration,
    /// The client's consume timeout, in minutes (the client's unit).
    pub consume_timeout_minutes: u64,
}

impl Setup {
    pub fn new(namesrv: &str, redis: &str, scenario: &str, mode: Mode) -> Setup {
        let name = unique(&format!("{scenario}_{}", mode.name().replace('-', "_")));
        Setup {
            namesrv: namesrv.to_owned(),
            redis: redis.to_owned(),
            topic: format!("{name}_topic"),
            group: format!("{name}_group"),
            namespace: name,
            mode,
            options: ConsumerOptions::new()
                .concurrency(8)
                .ack_timeout(Duration::from_secs(60)),
            lease: Duration::from_secs(30),
            consume_timeout_minutes: 15,
        }
    }

    /// The window: 100k keys for 5 minutes (what the run leaves in Redis expires with it).
    async fn window(&self) -> (Window, RedisStore) {
        let store = RedisStore::connect(&self.redis, &self.namespace)
            .await
            .expect("connect to Redis");
        let window = Window::max_keys(100_000)
            .ttl(Duration::from_secs(300))
            .lease(self.lease);
        (window, store)
    }
}

/// A running consumer: a push consumer, and the task that consumes its stream.
pub struct Consumer {
    host: ClientHost,
    consumer: DefaultMQPushConsumer,
    task: JoinHandle<()>,
    stats: StatsHandle,
    /// Ends the stream (the client may hold its listener until its runtime stops).
    end: oneshot::Sender<()>,
}

impl Consumer {
    /// Starts a consumer of `setup.topic` in `setup.group` that runs `behaviour` and records
    /// everything in `ledger`.
    pub async fn start(setup: &Setup, ledger: Arc<Ledger>, behaviour: Behaviour) -> Consumer {
        let host = ClientHost::start(&setup.options).expect("start a client runtime");
        let (listener, deliveries) = setup.options.channel();
        let stats = deliveries.stats_handle();
        let mut consumer = setup
            .options
            .configure(DefaultMQPushConsumer::builder(host.client_runtime()))
            .consumer_group(setup.group.clone())
            .name_server_addr(setup.namesrv.clone())
            .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
            .consume_timeout(setup.consume_timeout_minutes)
            .build();
        consumer
            .subscribe(&setup.topic, "*")
            .await
            .expect("subscribe");
        consumer.register_message_listener_concurrently(listener);

        let (end, ended) = oneshot::channel::<()>();
        let recorded = {
            let ledger = ledger.clone();
            deliveries
                .take_until(ended)
                .inspect(move |d: &Delivery| ledger.delivered(key(d), d.reconsume_times()))
        };
        let (window, store) = setup.window().await;
        let task = match setup.mode {
            Mode::Claims => {
                let (dup, held) = (ledger.clone(), ledger.clone());
                let claims = recorded
                    .claim_by_key(|d: &Delivery| key(d).to_owned(), window.store(store))
                    .on_duplicate(move |d: Delivery| {
                        dup.duplicate();
                        d.ack();
                    })
                    .on_held_back(move |d: Delivery| {
                        held.held_back(key(&d));
                        d.nack();
                    });
                tokio::spawn(claims.for_each_concurrent(None, move |claim| {
                    let (ledger, behaviour) = (ledger.clone(), behaviour.clone());
                    async move {
                        let key = key(&claim).to_owned();
                        if run(&key, &ledger, &behaviour).await {
                            match claim.commit().await {
                                Ok(d) => {
                                    d.ack();
                                }
                                Err(_) => ledger.commit_error(),
                            }
                        } else {
                            claim.release().nack();
                        }
                    }
                }))
            }
            Mode::MarkOnEmit => {
                let dup = ledger.clone();
                let unique = recorded
                    .dedup_by_key(|d: &Delivery| key(d).to_owned(), window.store(store))
                    .on_duplicate(move |d: Delivery| {
                        dup.duplicate();
                        d.ack();
                    });
                tokio::spawn(unique.for_each_concurrent(None, move |d| {
                    let (ledger, behaviour) = (ledger.clone(), behaviour.clone());
                    async move {
                        let key = key(&d).to_owned();
                        if run(&key, &ledger, &behaviour).await {
                            d.ack();
                        } else {
                            d.nack();
                        }
                    }
                }))
            }
        };
        consumer.start().await.expect("start the consumer");
        Consumer {
            host,
            consumer,
            task,
            stats,
            end,
        }
    }

    /// What the listener did.
    pub fn listener_stats(&self) -> ListenerStats {
        self.stats.get()
    }

    /// Shuts the consumer down, waits for its handlers, stops its runtime.
    pub async fn stop(self) -> ListenerStats {
        let Consumer {
            host,
            mut consumer,
            task,
            stats,
            end,
        } = self;
        consumer.shutdown().await;
        let _ = end.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        host.shutdown().await;
        stats.get()
    }
}

/// The delivery's business key.
pub fn key(d: &Delivery) -> &str {
    d.keys().unwrap_or_default()
}

/// Runs one handler: `true` if it applied its effect.
async fn run(key: &str, ledger: &Ledger, behaviour: &Behaviour) -> bool {
    let (attempt, started) = ledger.started(key);
    let plan = behaviour(key, attempt);
    if let Some(limit) = plan.until_expired {
        let deadline = Instant::now() + limit;
        while !ledger.expired_since(key, started) && Instant::now() < deadline {
            sleep(Duration::from_millis(100)).await;
        }
    }
    sleep(plan.work).await;
    if plan.fail {
        ledger.failed(key, started);
        false
    } else {
        ledger.effect(key);
        true
    }
}

/// Waits until `done` holds, no handler runs, every copy expected back arrived, and no
/// delivery came for `quiet`; at most `limit`. Returns whether it settled.
pub async fn settle(
    ledger: &Ledger,
    quiet: Duration,
    limit: Duration,
    done: impl Fn(&Ledger) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done(ledger)
            && ledger.running() == 0
            && ledger.expected_back() == 0
            && ledger.quiet_for() >= quiet
        {
            return true;
        }
        sleep(Duration::from_millis(200)).await;
    }
    false
}

/// A boxed future, for scenarios run side by side.
pub type Run = Pin<Box<dyn Future<Output = Report> + Send>>;
