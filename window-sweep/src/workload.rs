//! What the sweep replays: deliveries in time order, each carrying its message's id.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::rng::Rng;

/// One delivery of a message by the broker: when it arrives, and which message it is.
///
/// The message id is the ground truth the sweep scores the window against: a delivery whose
/// message already went downstream is a duplicate, any other is a unique message. Ids are
/// dense, `0..messages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Delivery {
    /// Milliseconds since the start of the workload.
    pub at_ms: u64,
    /// The message delivered (its key is derived from it).
    pub message: u32,
}

/// The key type the window holds during a sweep. Memory per key depends on it: measure with the
/// one your consumer uses.
///
/// Reads and prints as `u64`, `fingerprint` or `string`.
///
/// # Examples
///
/// ```
/// use window_sweep::KeyKind;
///
/// assert_eq!("fingerprint".parse::<KeyKind>(), Ok(KeyKind::Fingerprint));
/// assert_eq!(KeyKind::String.to_string(), "string");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyKind {
    /// A `u64` (the message's number): the smallest key, 8 bytes.
    #[default]
    U64,
    /// The [`Fingerprint`](stream_dedup::Fingerprint) of the key's text: 16 bytes, for long keys.
    Fingerprint,
    /// The key's text as an owned `String`: what a `key_fn` that formats or clones a key holds.
    /// Synthetic keys are 36-character UUID strings.
    String,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::U64 => "u64",
            KeyKind::Fingerprint => "fingerprint",
            KeyKind::String => "string",
        })
    }
}

impl FromStr for KeyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "u64" => Ok(KeyKind::U64),
            "fingerprint" => Ok(KeyKind::Fingerprint),
            "string" => Ok(KeyKind::String),
            _ => Err(format!(
                "`{s}` is not a key kind: u64, fingerprint or string"
            )),
        }
    }
}

/// A synthetic at-least-once broker: messages arrive at a rate; a delivery whose ACK is lost, or
/// whose processing outlasts the ack deadline, is delivered again `ack_wait` (± `jitter`, plus
/// `redelivery_delay`) later, up to `max_deliver` deliveries in all.
///
/// The broker is *open loop*: what it redelivers does not depend on what the window decided.
/// Every delivery's ACK may be lost (the consumer acks duplicates in
/// [`on_duplicate`](stream_dedup::DedupByKey::on_duplicate) too); a processing timeout applies
/// to the first delivery, the one that is processed.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use window_sweep::{SyntheticBroker, Workload};
///
/// let broker = SyntheticBroker::new()
///     .rate(500.0)
///     .messages(20_000)
///     .lost_ack(0.02)
///     .ack_wait(Duration::from_secs(10))
///     .jitter(Duration::from_secs(1));
/// let workload = Workload::synthetic(&broker);
/// let summary = workload.summary();
/// assert_eq!(summary.messages, 20_000);
/// assert!(summary.redeliveries > 0);
/// // A redelivery comes about 10 s (about 5000 messages) after its message's previous delivery.
/// assert!(summary.max_redelivery_gap.unwrap() <= Duration::from_secs(11));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticBroker {
    rate: f64,
    messages: u32,
    lost_ack: f64,
    timeouts: f64,
    ack_wait: Duration,
    jitter: Duration,
    redelivery_delay: Duration,
    max_deliver: u32,
    seed: u64,
    poisson: bool,
}

impl Default for SyntheticBroker {
    fn default() -> Self {
        SyntheticBroker::new()
    }
}

impl SyntheticBroker {
    /// A broker with the defaults written on each setter: 1000 messages/s, 1,000,000 messages,
    /// 1% lost ACKs, 0.5% processing timeouts, `ack_wait` 30 s ± 5 s, no extra redelivery
    /// delay, `max_deliver` 5, seed 1, Poisson arrivals.
    pub fn new() -> Self {
        SyntheticBroker {
            rate: 1000.0,
            messages: 1_000_000,
            lost_ack: 0.01,
            timeouts: 0.005,
            ack_wait: Duration::from_secs(30),
            jitter: Duration::from_secs(5),
            redelivery_delay: Duration::ZERO,
            max_deliver: 5,
            seed: 1,
            poisson: true,
        }
    }

    /// New messages per second (default: 1000).
    ///
    /// # Panics
    ///
    /// If `per_sec` is not a positive finite number.
    #[track_caller]
    pub fn rate(mut self, per_sec: f64) -> Self {
        assert!(
            per_sec.is_finite() && per_sec > 0.0,
            "SyntheticBroker::rate: need a positive rate, got {per_sec}"
        );
        self.rate = per_sec;
        self
    }

    /// How many distinct messages (keys) the broker sends (default: 1,000,000).
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    #[track_caller]
    pub fn messages(mut self, n: u32) -> Self {
        assert!(
            n > 0,
            "SyntheticBroker::messages: need at least one message"
        );
        self.messages = n;
        self
    }

    /// The share of deliveries whose ACK is lost on the way back (default: 0.01).
    ///
    /// # Panics
    ///
    /// If `share` is not within `0.0..=1.0`.
    #[track_caller]
    pub fn lost_ack(mut self, share: f64) -> Self {
        assert!(
            (0.0..=1.0).contains(&share),
            "SyntheticBroker::lost_ack: a share within 0..=1, got {share}"
        );
        self.lost_ack = share;
        self
    }

    /// The share of messages whose processing outlasts the ack deadline (default: 0.005).
    ///
    /// # Panics
    ///
    /// If `share` is not within `0.0..=1.0`.
    #[track_caller]
    pub fn timeouts(mut self, share: f64) -> Self {
        assert!(
            (0.0..=1.0).contains(&share),
            "SyntheticBroker::timeouts: a share within 0..=1, got {share}"
        );
        self.timeouts = share;
        self
    }

    /// How long the broker waits for an ACK before it redelivers (default: 30 s).
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Each redelivery comes up to this much earlier or later than `ack_wait` says, uniformly
    /// (default: 5 s).
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// An extra delay before each redelivery, as a broker's backoff or a queue's delay level
    /// adds (default: none).
    pub fn redelivery_delay(mut self, delay: Duration) -> Self {
        self.redelivery_delay = delay;
        self
    }

    /// The most deliveries of one message, the first included (default: 5, NATS JetStream's
    /// `max_deliver` in the test this crate was measured with).
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    #[track_caller]
    pub fn max_deliver(mut self, n: u32) -> Self {
        assert!(n > 0, "SyntheticBroker::max_deliver: at least one delivery");
        self.max_deliver = n;
        self
    }

    /// The seed of the broker's randomness: the same seed gives the same workload
    /// (default: 1).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// With `true` (the default), messages arrive as a Poisson process at the rate; with
    /// `false`, evenly spaced.
    pub fn poisson(mut self, poisson: bool) -> Self {
        self.poisson = poisson;
        self
    }

    fn describe(&self) -> String {
        format!(
            "synthetic broker: {} messages at {}/s ({}), lost ACKs {}%, timeouts {}%, \
             ack_wait {} ± {}, redelivery delay {}, max_deliver {}, seed {}",
            super::format_count(u64::from(self.messages)),
            self.rate,
            if self.poisson { "Poisson" } else { "even" },
            self.lost_ack * 100.0,
            self.timeouts * 100.0,
            super::format_duration(self.ack_wait),
            super::format_duration(self.jitter),
            super::format_duration(self.redelivery_delay),
            self.max_deliver,
            self.seed,
        )
    }

    fn generate(&self) -> Vec<Delivery> {
        let mut rng = Rng::new(self.seed);
        let gap_ms = 1000.0 / self.rate;
        let redeliver_share = (self.lost_ack + self.timeouts).min(1.0);
        let expected = f64::from(self.messages) * (1.0 + 1.2 * redeliver_share);
        let mut out = Vec::with_capacity(expected as usize + 16);
        let wait_ms = self.ack_wait.as_secs_f64() * 1e3 + self.redelivery_delay.as_secs_f64() * 1e3;
        let jitter_ms = self.jitter.as_secs_f64() * 1e3;
        let mut t = 0.0f64;
        for message in 0..self.messages {
            if message > 0 {
                t += if self.poisson {
                    -gap_ms * (1.0 - rng.unit()).ln()
                } else {
                    gap_ms
                };
            }
            let mut at = t as u64;
            out.push(Delivery { at_ms: at, message });
            for k in 1..self.max_deliver {
                let p = if k == 1 {
                    redeliver_share
                } else {
                    self.lost_ack
                };
                if rng.unit() >= p {
                    break;
                }
                let j = if jitter_ms > 0.0 {
                    (rng.unit() * 2.0 - 1.0) * jitter_ms
                } else {
                    0.0
                };
                at += (wait_ms + j).round().max(1.0) as u64;
                out.push(Delivery { at_ms: at, message });
            }
        }
        out.sort_by_key(|d| d.at_ms);
        out
    }
}

/// Facts about a workload that tell which window it needs, computed once from its deliveries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkloadSummary {
    /// Distinct messages (keys).
    pub messages: u64,
    /// Deliveries, redeliveries included.
    pub deliveries: u64,
    /// Deliveries of a message that was delivered before: what a perfect window drops.
    pub redeliveries: u64,
    /// From the first delivery to the last.
    pub duration: Duration,
    /// The most distinct other keys seen between a redelivery and its message's previous
    /// delivery (the LRU "reuse distance"). A window of more keys than this and no ttl catches
    /// every redelivery; see [`Workload::leaks_without_ttl`]. `None` without redeliveries.
    pub max_reuse_distance: Option<u64>,
    /// The longest time from a message's first delivery to one of its redeliveries: a ttl
    /// longer than this (kept from first acceptance) expires no key too early.
    pub max_redelivery_age: Option<Duration>,
    /// The longest time between two consecutive deliveries of one message: with
    /// [`refresh_on_hit`](stream_dedup::Window::refresh_on_hit), a ttl longer than this suffices.
    pub max_redelivery_gap: Option<Duration>,
}

impl WorkloadSummary {
    /// The smallest `max_keys` whose window (without a ttl) catches every redelivery:
    /// [`max_reuse_distance`](WorkloadSummary::max_reuse_distance) + 1, or 1 without
    /// redeliveries.
    pub fn min_max_keys(&self) -> u64 {
        self.max_reuse_distance.map_or(1, |d| d + 1)
    }
}

/// What a sweep replays: a time-ordered list of [`Delivery`]s, from a [`SyntheticBroker`], a
/// recorded trace ([`Workload::from_trace`]) or your own list ([`Workload::from_deliveries`]).
pub struct Workload {
    name: String,
    deliveries: Vec<Delivery>,
    messages: u32,
    /// The key text of each message of a trace; synthetic keys are generated.
    texts: Option<Vec<Box<str>>>,
    seed: u64,
    summary: WorkloadSummary,
    /// Reuse distance of every redelivery, sorted.
    distances: Vec<u32>,
}

impl fmt::Debug for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workload")
            .field("name", &self.name)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl Workload {
    /// The deliveries of a synthetic broker.
    pub fn synthetic(broker: &SyntheticBroker) -> Self {
        let mut w = Workload::build(broker.describe(), broker.generate(), broker.messages, None);
        w.seed = broker.seed;
        w
    }

    /// A workload of your own: `deliveries` (sorted here by time, keeping the order of equal
    /// times) of messages numbered `0..n`.
    ///
    /// # Panics
    ///
    /// If a message id is `u32::MAX`.
    ///
    /// # Examples
    ///
    /// ```
    /// use window_sweep::{Delivery, Workload};
    ///
    /// let d = |at_ms, message| Delivery { at_ms, message };
    /// let w = Workload::from_deliveries("three messages", vec![d(0, 0), d(1, 1), d(2, 2), d(9, 0)]);
    /// assert_eq!(w.summary().redeliveries, 1);
    /// assert_eq!(w.summary().max_reuse_distance, Some(2)); // keys 1 and 2 came in between
    /// assert_eq!(w.leaks_without_ttl(2), 1);
    /// assert_eq!(w.leaks_without_ttl(3), 0);
    /// ```
    #[track_caller]
    pub fn from_deliveries(name: impl Into<String>, mut deliveries: Vec<Delivery>) -> Self {
        deliveries.sort_by_key(|d| d.at_ms);
        let max = deliveries.iter().map(|d| d.message).max();
        assert!(
            max != Some(u32::MAX),
            "Workload::from_deliveries: message ids are below u32::MAX"
        );
        let messages = max.map_or(0, |m| m + 1);
        Workload::build(name.into(), deliveries, messages, None)
    }

    pub(crate) fn build(
        name: String,
        deliveries: Vec<Delivery>,
        messages: u32,
        texts: Option<Vec<Box<str>>>,
    ) -> Self {
        let (summary, distances) = summarize(&deliveries, messages);
        Workload {
            name,
            deliveries,
            messages,
            texts,
            seed: 0,
            summary,
            distances,
        }
    }

    /// What the workload is (the broker's settings, or the trace's file).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The deliveries, in time order.
    pub fn deliveries(&self) -> &[Delivery] {
        &self.deliveries
    }

    /// How many distinct messages (keys) there are; ids run `0..messages`.
    pub fn messages(&self) -> u32 {
        self.messages
    }

    /// Facts about the workload: counts, and the window it needs.
    pub fn summary(&self) -> &WorkloadSummary {
        &self.summary
    }

    /// How many redeliveries a window of `max_keys` keys **without a ttl** lets through,
    /// computed from the reuse distances (an LRU of `n` keys catches a repeat exactly when fewer
    /// than `n` other keys came since its last sighting), without replaying anything. The sweep
    /// must agree with it; it is also a quick first answer.
    pub fn leaks_without_ttl(&self, max_keys: usize) -> u64 {
        let n = u32::try_from(max_keys).unwrap_or(u32::MAX);
        let caught = self.distances.partition_point(|&d| d < n);
        (self.distances.len() - caught) as u64
    }

    /// The key text of `message`: the trace's key, or a UUID string derived from the broker's
    /// seed for a synthetic workload.
    ///
    /// # Examples
    ///
    /// ```
    /// use window_sweep::{SyntheticBroker, Workload};
    ///
    /// let w = Workload::synthetic(&SyntheticBroker::new().messages(10));
    /// assert_eq!(w.key_text(3).len(), 36);
    /// assert_ne!(w.key_text(3), w.key_text(4));
    /// ```
    pub fn key_text(&self, message: u32) -> Cow<'_, str> {
        match &self.texts {
            Some(texts) => Cow::Borrowed(&texts[message as usize]),
            None => {
                let mut r = Rng::new(self.seed ^ u64::from(message).rotate_left(32));
                let (a, b) = (r.next_u64(), r.next_u64());
                Cow::Owned(format!(
                    "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                    a >> 32,
                    (a >> 16) & 0xffff,
                    a & 0xfff,
                    0x8000 | ((b >> 48) & 0x3fff),
                    b & 0xffff_ffff_ffff
                ))
            }
        }
    }
}

/// A Fenwick tree of counts over delivery positions.
struct Fenwick(Vec<i32>);

impl Fenwick {
    fn add(&mut self, i: usize, v: i32) {
        let mut i = i + 1;
        while i < self.0.len() {
            self.0[i] += v;
            i += i & i.wrapping_neg();
        }
    }

    /// Sum over positions `0..i`.
    fn prefix(&self, i: usize) -> i64 {
        let mut i = i;
        let mut s = 0i64;
        while i > 0 {
            s += i64::from(self.0[i]);
            i &= i - 1;
        }
        s
    }
}

/// Counts, ages, and the reuse distance of every redelivery: the distinct keys seen since its
/// message's previous delivery, found with one marker per key at its latest position.
fn summarize(deliveries: &[Delivery], messages: u32) -> (WorkloadSummary, Vec<u32>) {
    const NONE: u32 = u32::MAX;
    let mut last = vec![NONE; messages as usize];
    let mut first_ms = vec![0u64; messages as usize];
    let mut marks = Fenwick(vec![0; deliveries.len() + 1]);
    let mut distances = Vec::new();
    let (mut max_age, mut max_gap) = (None::<u64>, None::<u64>);
    let mut seen = 0u64;
    for (j, d) in deliveries.iter().enumerate() {
        let m = d.message as usize;
        let i = last[m];
        if i == NONE {
            seen += 1;
            first_ms[m] = d.at_ms;
        } else {
            let i = i as usize;
            let between = marks.prefix(j) - marks.prefix(i + 1);
            distances.push(u32::try_from(between).unwrap_or(u32::MAX));
            marks.add(i, -1);
            let age = d.at_ms - first_ms[m];
            let gap = d.at_ms - deliveries[i].at_ms;
            max_age = Some(max_age.map_or(age, |a| a.max(age)));
            max_gap = Some(max_gap.map_or(gap, |g| g.max(gap)));
        }
        marks.add(j, 1);
        last[m] = j as u32;
    }
    distances.sort_unstable();
    let summary = WorkloadSummary {
        messages: seen,
        deliveries: deliveries.len() as u64,
        redeliveries: distances.len() as u64,
        duration: Duration::from_millis(match (deliveries.first(), deliveries.last()) {
            (Some(a), Some(b)) => b.at_ms - a.at_ms,
            _ => 0,
        }),
        max_reuse_distance: distances.last().map(|&d| u64::from(d)),
        max_redelivery_age: max_age.map(Duration::from_millis),
        max_redelivery_gap: max_gap.map(Duration::from_millis),
    };
    (summary, distances)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The reuse distances against a direct count of the distinct keys in between.
    #[test]
    fn reuse_distances_match_brute_force() {
        let mut r = Rng::new(5);
        let deliveries: Vec<Delivery> = (0..3000u64)
            .map(|t| Delivery {
                at_ms: t,
                message: (r.next_u64() % 300) as u32,
            })
            .collect();
        let (_, got) = summarize(&deliveries, 300);
        let mut want = Vec::new();
        for (j, d) in deliveries.iter().enumerate() {
            if let Some(i) = deliveries[..j].iter().rposition(|e| e.message == d.message) {
                let between: HashSet<u32> =
                    deliveries[i + 1..j].iter().map(|e| e.message).collect();
                want.push(between.len() as u32);
            }
        }
        want.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn broker_is_deterministic_and_bounded() {
        let broker = SyntheticBroker::new()
            .messages(5000)
            .rate(100.0)
            .lost_ack(0.1)
            .timeouts(0.1)
            .ack_wait(Duration::from_secs(2))
            .jitter(Duration::from_millis(500))
            .redelivery_delay(Duration::from_secs(1))
            .max_deliver(3);
        let a = broker.generate();
        assert_eq!(a, broker.generate());
        assert_ne!(a, broker.clone().seed(2).generate());
        assert!(a.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        let w = Workload::synthetic(&broker);
        let s = w.summary();
        assert_eq!(s.messages, 5000);
        // About 20% first redeliveries, 10% of those again.
        assert!((900..1300).contains(&s.redeliveries), "{s:?}");
        let gap = s.max_redelivery_gap.unwrap();
        assert!(gap >= Duration::from_millis(2500) && gap <= Duration::from_millis(3500));
        assert!(s.max_redelivery_age.unwrap() <= Duration::from_secs(7));
        for m in 0..5000 {
            let n = a.iter().filter(|d| d.message == m).count();
            assert!((1..=3).contains(&n));
        }
    }

    #[test]
    fn even_arrivals_without_jitter_have_exact_gaps() {
        let broker = SyntheticBroker::new()
            .messages(2000)
            .rate(1000.0)
            .poisson(false)
            .lost_ack(0.05)
            .timeouts(0.0)
            .ack_wait(Duration::from_millis(300))
            .jitter(Duration::ZERO)
            .max_deliver(2);
        let w = Workload::synthetic(&broker);
        let s = w.summary();
        assert_eq!(s.max_redelivery_gap, Some(Duration::from_millis(300)));
        // 300 new messages in between, and the few redeliveries of the 300 before.
        let d = s.max_reuse_distance.unwrap();
        assert!((299..330).contains(&d), "{d}");
        assert_eq!(w.leaks_without_ttl(s.min_max_keys() as usize), 0);
        // All but the last few (after the traffic stopped) are more than 100 keys away.
        let leaks = w.leaks_without_ttl(100);
        assert!(
            leaks < s.redeliveries && leaks * 10 > s.redeliveries * 9,
            "{leaks}"
        );
    }

    #[test]
    fn key_kinds_parse() {
        for k in [KeyKind::U64, KeyKind::Fingerprint, KeyKind::String] {
            assert_eq!(k.to_string().parse::<KeyKind>(), Ok(k));
        }
        assert!("u32".parse::<KeyKind>().is_err());
    }
}
