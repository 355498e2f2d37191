//! A simulated at-least-once broker, and a consumer that drops its redeliveries.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! The broker delivers each message and waits for its ACK; when none arrives within the ack
//! deadline it delivers the message again. Both classic causes happen here:
//!
//! - **lost ACK**: the consumer processed the message and acked it, the ACK never arrived;
//! - **processing timeout**: the handler took longer than the ack deadline, so the broker
//!   redelivered while the first copy was still being processed.
//!
//! The consumer chains `dedup_by_key` on the message's *business key* (order + action, which
//! every redelivery keeps; the broker's delivery attempt changes) and acks the duplicates it
//! drops. Time is tokio's paused clock and randomness a seeded RNG: the run takes well under a
//! second of real time and prints the same numbers every time.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use stream_dedup::{DedupStreamExt, Window};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_stream::wrappers::UnboundedReceiverStream;

const MESSAGES: u64 = 1_000;
const ACK_DEADLINE: Duration = Duration::from_secs(1);
/// The broker keeps at most this many unacknowledged messages out at once.
const MAX_IN_FLIGHT: usize = 16;
/// Chance that the network drops an ACK.
const ACK_LOSS: f64 = 0.05;
/// Chance that the handler is slower than the ack deadline.
const SLOW: f64 = 0.03;

/// A delivery: the broker's message number (what an ACK names) and the payload.
#[derive(Debug)]
struct Msg {
    seq: u64,
    /// The business key: order id + action, the same in every redelivery.
    key: String,
}

/// What the simulation knows and the broker does not: why a message had to be redelivered.
#[derive(Default)]
struct Ledger {
    in_progress: HashSet<u64>,
    ack_lost: HashSet<u64>,
    redelivered: HashMap<&'static str, u64>,
    processed: HashMap<String, u32>,
}

/// The consumer's side of the network: ACKs go to the broker, or get lost.
struct Network<'a> {
    acks: UnboundedSender<u64>,
    rng: &'a RefCell<StdRng>,
    ledger: &'a RefCell<Ledger>,
}

impl Network<'_> {
    fn ack(&self, seq: u64) {
        if self.rng.borrow_mut().random_bool(ACK_LOSS) {
            self.ledger.borrow_mut().ack_lost.insert(seq);
        } else {
            let _ = self.acks.send(seq);
        }
    }
}

/// Publishes `MESSAGES` messages and redelivers each one until an ACK for it arrives.
async fn broker(
    deliveries: UnboundedSender<Msg>,
    mut acks: UnboundedReceiver<u64>,
    ledger: &RefCell<Ledger>,
) {
    let key = |seq: u64| {
        format!(
            "order-{}/{}",
            10_000 + seq / 2,
            ["payment", "shipment"][seq as usize % 2]
        )
    };
    // Unacknowledged messages: seq -> ack deadline.
    let mut pending: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut next = 0;
    loop {
        while next < MESSAGES && pending.len() < MAX_IN_FLIGHT {
            let _ = deliveries.send(Msg {
                seq: next,
                key: key(next),
            });
            pending.insert(next, Instant::now() + ACK_DEADLINE);
            next += 1;
        }
        let Some(&deadline) = pending.values().min() else {
            return; // everything published and acknowledged; dropping `deliveries` ends the stream
        };
        tokio::select! {
            biased; // poll in the written order, not at random: the run is reproducible
            Some(seq) = acks.recv() => { pending.remove(&seq); } // acks are per message: any copy's ACK settles it
            () = sleep_until(deadline) => {
                let now = Instant::now();
                for (&seq, deadline) in pending.iter_mut().filter(|(_, d)| **d <= now) {
                    let mut ledger = ledger.borrow_mut();
                    let cause = if ledger.ack_lost.remove(&seq) {
                        "lost ACK"
                    } else if ledger.in_progress.contains(&seq) {
                        "processing timeout"
                    } else {
                        "not yet received" // stays 0: the consumer keeps up
                    };
                    *ledger.redelivered.entry(cause).or_default() += 1;
                    *deadline = now + ACK_DEADLINE;
                    let _ = deliveries.send(Msg { seq, key: key(seq) });
                }
            }
        }
    }
}

/// The consumer's work on one message: 5-100 ms, now and then longer than the ack deadline.
async fn handle(m: Msg, rng: &RefCell<StdRng>, ledger: &RefCell<Ledger>, net: &Network<'_>) {
    let millis = {
        let mut rng = rng.borrow_mut();
        if rng.random_bool(SLOW) {
            rng.random_range(1_200..2_500)
        } else {
            rng.random_range(5..100)
        }
    };
    ledger.borrow_mut().in_progress.insert(m.seq);
    sleep(Duration::from_millis(millis)).await;
    let mut ledger = ledger.borrow_mut();
    ledger.in_progress.remove(&m.seq);
    *ledger.processed.entry(m.key).or_default() += 1;
    drop(ledger);
    net.ack(m.seq); // after a slow run this ACK is late: the broker already redelivered
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let rng = RefCell::new(StdRng::seed_from_u64(7));
    let ledger = RefCell::new(Ledger::default());
    let (delivery_tx, delivery_rx) = mpsc::unbounded_channel();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let net = Network {
        acks: ack_tx,
        rng: &rng,
        ledger: &ledger,
    };
    let mut arrived = 0;

    // The consumer: every delivery, redeliveries included, minus the keys already processed.
    let unique = UnboundedReceiverStream::new(delivery_rx)
        .inspect(|_| arrived += 1)
        .dedup_by_key(
            |m: &Msg| m.key.clone(),
            Window::max_keys(100_000).ttl(Duration::from_secs(300)),
        )
        // A dropped redelivery must still be acked, or the broker sends it again and again.
        // (Its original may still be running: acking now is what marking on emit means.)
        .on_duplicate(|m: Msg| net.ack(m.seq));
    let stats = unique.stats();

    let consume = unique.for_each_concurrent(64, |m| handle(m, &rng, &ledger, &net));
    let started = Instant::now();
    tokio::join!(broker(delivery_tx, ack_rx, &ledger), consume);

    let ledger = ledger.into_inner();
    let redeliveries: u64 = ledger.redelivered.values().sum();
    let processed: u32 = ledger.processed.values().sum();
    println!("messages published     {MESSAGES}");
    println!("deliveries arrived     {arrived}");
    for cause in ["lost ACK", "processing timeout", "not yet received"] {
        let n = ledger.redelivered.get(cause).copied().unwrap_or(0);
        println!("  redelivered, {cause:<19} {n}");
    }
    println!("duplicates dropped     {}", stats.duplicates());
    println!("messages processed     {processed}");
    println!("simulated time         {:.1?}", started.elapsed());

    assert_eq!(arrived, MESSAGES + redeliveries, "every delivery arrived");
    assert_eq!(
        stats.duplicates(),
        redeliveries,
        "every redelivery was dropped"
    );
    assert_eq!(
        ledger.processed.len() as u64,
        MESSAGES,
        "no message was lost"
    );
    assert!(
        ledger.processed.values().all(|&n| n == 1),
        "no message was processed twice"
    );
    println!("every message processed exactly once, none lost");
}
