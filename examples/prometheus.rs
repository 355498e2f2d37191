//! A consumer whose counters Prometheus scrapes: `metrics-exporter-prometheus` serves
//! `/metrics`, and every metric of `stream_dedup::stats` is there with its `window` label.
//!
//! ```text
//! cargo run --example prometheus                     # http://127.0.0.1:9898/metrics, until Ctrl-C
//! cargo run --example prometheus -- 0.0.0.0:9100 60  # another address; stop after 60 s
//! curl -s http://127.0.0.1:9898/metrics | grep stream_dedup
//! ```
//!
//! The address may also come from `METRICS_ADDR`, the run time in seconds from `RUN_SECONDS`.
//! The README's "Metrics" table says what each metric means and which alert to put on it.
//!
//! A simulated broker, in real time, publishes ~500 orders a second and redelivers each one
//! that was not acked within its ack deadline. The first delivery of an order now and then
//! meets a fault:
//!
//! - its ACK is lost: the redelivery is a **duplicate** (acked in `on_duplicate`);
//! - its handler is slower than the ack deadline: the redelivery arrives while the claim is
//!   open and is **held back** (not acked: if the claim fails, that copy gets processed);
//! - its handler fails: the claim is dropped, so its key is **released**, and the
//!   redelivery is processed.
//!
//! The consumer claims each order's key through a small window (256 keys, about half a second
//! of traffic, so keys are **evicted** and the store answers the later repeats) with a
//! `MemoryStore` behind it. Every 20 seconds the store is down for 2 (a simulated outage):
//! under fail open, items pass **unchecked** and the **store errors** climb, which is what
//! the alert on `stream_dedup_unchecked_total` catches.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder};
use stream_dedup::store::{
    ClaimBatch, ClaimStore, Claimed, HeldKey, InsertBatch, Inserted, MemoryStore, Store,
    StoreError, StoreFuture,
};
use stream_dedup::{DedupStreamExt, StatsSnapshot, Window};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::time::{Instant, MissedTickBehavior, interval, sleep};
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Where `/metrics` is served unless an argument or `METRICS_ADDR` says otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9898";
/// The window's name: the value of the `window` label on every metric.
pub const WINDOW: &str = "orders";

/// One order published every this long.
const PUBLISH_EVERY: Duration = Duration::from_millis(2);
/// The broker redelivers a message not acked within this.
const ACK_DEADLINE: Duration = Duration::from_millis(400);
/// How long a slow handler takes: longer than `ACK_DEADLINE`.
const SLOW: Duration = Duration::from_millis(700);
/// The store's outages: down for `OUTAGE_FOR` out of every `OUTAGE_EVERY`.
const OUTAGE_EVERY: Duration = Duration::from_secs(20);
const OUTAGE_FOR: Duration = Duration::from_secs(2);

/// What the command line and the environment ask for.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    /// Where to serve `/metrics`.
    pub addr: SocketAddr,
    /// Stop after this long (`None`: at Ctrl-C).
    pub run_for: Option<Duration>,
}

impl Options {
    /// `[ADDR] [SECONDS]` from `args`, else `METRICS_ADDR` and `RUN_SECONDS` from `env`.
    pub fn parse(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let addr = args
            .first()
            .cloned()
            .or_else(|| env("METRICS_ADDR"))
            .unwrap_or_else(|| DEFAULT_ADDR.to_owned());
        let addr = addr
            .parse()
            .map_err(|e| format!("the address {addr:?} is not IP:PORT: {e}"))?;
        let run_for = match args.get(1).cloned().or_else(|| env("RUN_SECONDS")) {
            None => None,
            Some(s) => Some(Duration::from_secs_f64(
                s.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| format!("the run time {s:?} is not a number of seconds"))?,
            )),
        };
        Ok(Options { addr, run_for })
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match Options::parse(&args, |name| std::env::var(name).ok()) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{e}\nusage: prometheus [IP:PORT] [SECONDS]");
            std::process::exit(2);
        }
    };
    // The recorder must be installed before the operator is built: an operator registers its
    // metrics with the recorder installed at that moment.
    if let Err(e) = serve(options.addr) {
        eprintln!("cannot serve /metrics on {}: {e}", options.addr);
        std::process::exit(1);
    }
    match options.run_for {
        Some(d) => println!("serving http://{}/metrics for {d:?}", options.addr),
        None => println!("serving http://{}/metrics until Ctrl-C", options.addr),
    }
    let stop = async move {
        match options.run_for {
            Some(d) => sleep(d).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    let summary = consume(stop).await;
    println!("{summary}");
}

/// Installs the Prometheus recorder and serves `/metrics` on `addr` (from a task of the
/// current tokio runtime).
pub fn serve(addr: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new().with_http_listener(addr).install()
}

/// What a run did, counted by the simulation and by the operator.
#[derive(Debug)]
pub struct Summary {
    /// Orders published.
    pub published: u64,
    /// Deliveries, redeliveries included.
    pub deliveries: u64,
    /// Orders processed.
    pub processed: u64,
    /// Orders processed more than once (passed unchecked during an outage).
    pub processed_twice: u64,
    /// The operator's counters.
    pub stats: StatsSnapshot,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "published {}, deliveries {}, processed {} ({} more than once, while the store was \
             down)\naccepted {}, duplicates {}, held back {}, committed {}, released {}, \
             unchecked {}, store errors {}, evicted {}, expired {}, keys {}",
            self.published,
            self.deliveries,
            self.processed,
            self.processed_twice,
            s.accepted,
            s.duplicates,
            s.held_back,
            s.committed,
            s.released,
            s.unchecked,
            s.store_errors,
            s.evicted,
            s.expired,
            s.keys
        )
    }
}

/// A delivery: the broker's message number (what an ACK names) and the business key.
#[derive(Debug)]
struct Msg {
    seq: u64,
    key: String,
    /// The broker's delivery count (1: the first delivery).
    delivered: u32,
}

/// Runs the broker and the consumer until `stop` completes, then lets the broker finish the
/// messages it has out, and counts.
pub async fn consume(stop: impl Future<Output = ()> + Send + 'static) -> Summary {
    let (delivery_tx, delivery_rx) = mpsc::unbounded_channel();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let deliveries = Arc::new(AtomicU64::new(0));
    let processed: Arc<Mutex<HashMap<String, u32>>> = Arc::default();

    let store = Outage::new(MemoryStore::new());
    tokio::spawn(store.clone().schedule());
    let window = Window::max_keys(256)
        .ttl(Duration::from_secs(600))
        .name(WINDOW)
        // A claim whose consumer died frees its key after this: longer than the slowest
        // handler.
        .lease(Duration::from_secs(5))
        .store(store);

    let counted = deliveries.clone();
    let duplicate_acks = ack_tx.clone();
    let claims = UnboundedReceiverStream::new(delivery_rx)
        .inspect(move |_: &Msg| {
            counted.fetch_add(1, Relaxed);
        })
        .claim_by_key(|m: &Msg| m.key.clone(), window)
        // The key is done: a repeat of a processed order. Ack it, or it comes back.
        .on_duplicate(move |m: Msg| {
            let _ = duplicate_acks.send(m.seq);
        })
        // The key is in flight: do not ack; if that claim fails, this copy's redelivery
        // is processed.
        .on_held_back(|_m: Msg| {});
    let stats = claims.stats();

    let consumer = claims.for_each_concurrent(256, |claim| {
        let (acks, processed) = (ack_tx.clone(), processed.clone());
        async move {
            let (slow, fails, ack_lost) = faults(&claim);
            if slow {
                sleep(SLOW).await;
            }
            if fails {
                return; // an error: the claim is dropped, its key released
            }
            *processed
                .lock()
                .unwrap()
                .entry(claim.key.clone())
                .or_default() += 1;
            match claim.commit().await {
                Ok(m) if !ack_lost => {
                    let _ = acks.send(m.seq);
                }
                Ok(_) => {}  // the ACK is lost on the way: the broker redelivers
                Err(_) => {} // not marked done (store down): no ack, the broker redelivers
            }
        }
    });
    let broker = tokio::spawn(broker(delivery_tx, ack_rx, stop));
    consumer.await;
    let published = broker.await.unwrap_or(0);

    let processed = processed.lock().unwrap();
    Summary {
        published,
        deliveries: deliveries.load(Relaxed),
        processed: processed.len() as u64,
        processed_twice: processed.values().filter(|n| **n > 1).count() as u64,
        stats: stats.snapshot(),
    }
}

/// The faults of an order's first delivery, from its number: 1 in 20 handlers is slow, 1 in
/// 50 fails, 1 in 20 ACKs is lost. Redeliveries meet none.
fn faults(m: &Msg) -> (bool, bool, bool) {
    if m.delivered > 1 {
        return (false, false, false);
    }
    // A multiplicative hash: a stable, well-mixed pattern of faults.
    let h = m.seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    (h % 20 == 0, h % 50 == 1, h % 20 == 2)
}

/// Publishes an order every `PUBLISH_EVERY` until `stop`, redelivers each one until an ACK
/// for it arrives, and ends (dropping `deliveries`, which ends the consumer's stream) once all
/// are acked or after a last minute. Returns how many orders it published.
async fn broker(
    deliveries: UnboundedSender<Msg>,
    mut acks: UnboundedReceiver<u64>,
    stop: impl Future<Output = ()>,
) -> u64 {
    let key = |seq: u64| format!("order-{seq}/payment");
    // Unacknowledged messages: seq -> (deadline, deliveries so far).
    let mut pending: BTreeMap<u64, (Instant, u32)> = BTreeMap::new();
    let mut tick = interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut next = 0;
    let mut stopped = false;
    let mut give_up = Instant::now();
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop, if !stopped => {
                stopped = true;
                give_up = Instant::now() + Duration::from_secs(60);
            }
            Some(seq) = acks.recv() => {
                pending.remove(&seq);
            }
            now = tick.tick() => {
                if stopped && (pending.is_empty() || now >= give_up) {
                    return next;
                }
                if !stopped {
                    pending.insert(next, (now + ACK_DEADLINE, 1));
                    let _ = deliveries.send(Msg { seq: next, key: key(next), delivered: 1 });
                    next += 1;
                }
                for (&seq, (deadline, delivered)) in pending.iter_mut() {
                    if *deadline <= now {
                        *deadline = now + ACK_DEADLINE;
                        *delivered += 1;
                        let _ = deliveries.send(Msg { seq, key: key(seq), delivered: *delivered });
                    }
                }
            }
        }
    }
}

/// A store that is down now and then: every call fails while `down` is set. (A real
/// outage: Redis restarting, a network partition.)
#[derive(Clone, Debug)]
struct Outage<S> {
    inner: S,
    down: Arc<AtomicBool>,
}

impl<S> Outage<S> {
    fn new(inner: S) -> Self {
        Outage {
            inner,
            down: Arc::default(),
        }
    }

    /// Down for `OUTAGE_FOR` at the end of every `OUTAGE_EVERY`.
    async fn schedule(self) {
        loop {
            sleep(OUTAGE_EVERY - OUTAGE_FOR).await;
            self.down.store(true, Relaxed);
            sleep(OUTAGE_FOR).await;
            self.down.store(false, Relaxed);
        }
    }

    fn call<T: Send + 'static>(&self, op: impl FnOnce(&S) -> StoreFuture<T>) -> StoreFuture<T> {
        if self.down.load(Relaxed) {
            Box::pin(async {
                Err(StoreError::unavailable(
                    "connection refused (simulated outage)",
                ))
            })
        } else {
            op(&self.inner)
        }
    }
}

impl<S: Store> Store for Outage<S> {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        self.call(|s| s.insert(batch))
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        self.call(|s| s.remove(keys))
    }

    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        self.call(|s| s.take_back(keys))
    }

    fn max_key_len(&self) -> usize {
        self.inner.max_key_len()
    }
}

impl<S: ClaimStore> ClaimStore for Outage<S> {
    fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>> {
        self.call(|s| s.claim(batch))
    }

    fn commit(&self, keys: Vec<HeldKey>, ttl: std::time::Duration) -> StoreFuture<Vec<bool>> {
        self.call(|s| s.commit(keys, ttl))
    }

    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        self.call(|s| s.release(keys))
    }

    fn renew(&self, keys: Vec<HeldKey>, lease: std::time::Duration) -> StoreFuture<Vec<bool>> {
        self.call(|s| s.renew(keys, lease))
    }
}
