//! A ledger of every delivery and every effect, per key: what the tests check and print.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Why a copy of a message is expected back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// Its handler failed: `ReconsumeLater`.
    Failed,
    /// It was held back (its key in flight): `ReconsumeLater`.
    HeldBack,
}

#[derive(Debug, Default)]
struct KeyState {
    deliveries: u32,
    effects: u32,
    handler_runs: u32,
    /// Copies expected back from the retry topic, oldest first, with why.
    expected: VecDeque<Cause>,
    /// When a copy came back that no answer of ours asked for: the client's consume-timeout
    /// scan sent the message back while a handler still ran.
    expired_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Print every event as a line (`@@ event key`), for a parent process to replay.
    echo: bool,
    keys: HashMap<String, KeyState>,
    counts: Counts,
    last_delivery: Option<Instant>,
    /// Handlers running.
    running: u64,
}

/// The figures of a run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Every delivery, redeliveries included.
    pub deliveries: u64,
    /// First deliveries of a key.
    pub first: u64,
    /// Redeliveries from the retry topic after a handler failed.
    pub after_failure: u64,
    /// Redeliveries from the retry topic after a held-back copy was answered `ReconsumeLater`.
    pub after_hold_back: u64,
    /// Redeliveries from the retry topic that no answer asked for: the consume timeout.
    pub after_timeout: u64,
    /// Deliveries of a key seen before that did not come from the retry topic: a replay from
    /// an offset that was not persisted (a killed consumer, a rebalanced queue).
    pub replays: u64,
    /// Copies dropped as duplicates (and acked).
    pub duplicates: u64,
    /// Copies held back (and answered `ReconsumeLater`).
    pub held_back: u64,
    /// Handler runs that failed (answered `ReconsumeLater`).
    pub failures: u64,
    /// Effects applied.
    pub effects: u64,
    /// Claims whose commit failed after their effect.
    pub commit_errors: u64,
}

/// Every delivery and effect of one run, per key.
#[derive(Debug, Default)]
pub struct Ledger(Mutex<Inner>);

impl Ledger {
    /// A ledger that also prints every event on stdout, for [`Ledger::replay`] in another
    /// process.
    pub fn echoing() -> Ledger {
        Ledger(Mutex::new(Inner {
            echo: true,
            ..Inner::default()
        }))
    }

    /// Applies an event line printed by an echoing ledger; `false` if it is not one.
    pub fn replay(&self, line: &str) -> bool {
        let mut words = line.split_whitespace();
        if words.next() != Some("@@") {
            return false;
        }
        match (words.next(), words.next(), words.next()) {
            (Some("delivered"), Some(key), Some(times)) => {
                self.delivered(key, times.parse().unwrap_or(0));
            }
            (Some("duplicate"), _, _) => self.duplicate(),
            (Some("held"), Some(key), _) => self.held_back(key),
            (Some("started"), Some(key), _) => {
                self.started(key);
            }
            (Some("failed"), Some(key), _) => self.failed(key, Instant::now()),
            (Some("effect"), Some(key), _) => self.effect(key),
            (Some("commit_error"), _, _) => self.commit_error(),
            _ => return false,
        }
        true
    }

    fn echo(&self, inner: &Inner, event: &str, key: &str, extra: &str) {
        if inner.echo {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "@@ {event} {key} {extra}");
            let _ = out.flush();
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A delivery arrived (before any deduplication).
    pub fn delivered(&self, key: &str, reconsume_times: i32) {
        let mut inner = self.inner();
        self.echo(&inner, "delivered", key, &reconsume_times.to_string());
        let Inner {
            keys,
            counts,
            last_delivery,
            ..
        } = &mut *inner;
        *last_delivery = Some(Instant::now());
        counts.deliveries += 1;
        let state = keys.entry(key.to_owned()).or_default();
        state.deliveries += 1;
        if reconsume_times > 0 {
            match state.expected.pop_front() {
                Some(Cause::Failed) => counts.after_failure += 1,
                Some(Cause::HeldBack) => counts.after_hold_back += 1,
                None => {
                    counts.after_timeout += 1;
                    state.expired_at = Some(Instant::now());
                }
            }
        } else if state.deliveries > 1 {
            counts.replays += 1;
            // A replay means that the queue moved (or its consumer died): the client drops the
            // answers for a queue it no longer owns, so the copies that earlier answers asked
            // for may never come. This copy stands for them.
            state.expected.clear();
        } else {
            counts.first += 1;
        }
    }

    /// A copy was dropped as a duplicate (and acked).
    pub fn duplicate(&self) {
        let mut inner = self.inner();
        self.echo(&inner, "duplicate", "-", "");
        inner.counts.duplicates += 1;
    }

    /// A copy was held back (and answered `ReconsumeLater`: it comes back).
    pub fn held_back(&self, key: &str) {
        let mut inner = self.inner();
        self.echo(&inner, "held", key, "");
        inner.counts.held_back += 1;
        let state = inner.keys.entry(key.to_owned()).or_default();
        state.expected.push_back(Cause::HeldBack);
    }

    /// A handler starts on `key`; returns its attempt (1 for the first run) and start time.
    pub fn started(&self, key: &str) -> (u32, Instant) {
        let mut inner = self.inner();
        self.echo(&inner, "started", key, "");
        inner.running += 1;
        let state = inner.keys.entry(key.to_owned()).or_default();
        state.handler_runs += 1;
        (state.handler_runs, Instant::now())
    }

    /// A handler that started at `started` failed (answered `ReconsumeLater`). The copy comes
    /// back, unless the consume timeout sent the message back after the handler started: the
    /// client then ignores the answer (that copy is the one that comes back).
    pub fn failed(&self, key: &str, started: Instant) {
        let mut inner = self.inner();
        self.echo(&inner, "failed", key, "");
        inner.counts.failures += 1;
        inner.running = inner.running.saturating_sub(1);
        let state = inner.keys.entry(key.to_owned()).or_default();
        if state.expired_at.is_none_or(|t| t < started) {
            state.expected.push_back(Cause::Failed);
        }
    }

    /// Whether a copy of `key` came back by the consume timeout since `since`.
    pub fn expired_since(&self, key: &str, since: Instant) -> bool {
        self.inner()
            .keys
            .get(key)
            .and_then(|s| s.expired_at)
            .is_some_and(|t| t >= since)
    }

    /// The effect of `key` was applied.
    pub fn effect(&self, key: &str) {
        let mut inner = self.inner();
        self.echo(&inner, "effect", key, "");
        inner.counts.effects += 1;
        inner.running = inner.running.saturating_sub(1);
        inner.keys.entry(key.to_owned()).or_default().effects += 1;
    }

    /// A claim's commit failed after its effect.
    pub fn commit_error(&self) {
        let mut inner = self.inner();
        self.echo(&inner, "commit_error", "-", "");
        inner.counts.commit_errors += 1;
    }

    /// The figures so far.
    pub fn counts(&self) -> Counts {
        self.inner().counts
    }

    /// How many keys have an effect.
    pub fn effected(&self) -> usize {
        self.inner().keys.values().filter(|s| s.effects > 0).count()
    }

    /// How many keys were delivered at least `times` times.
    pub fn delivered_keys(&self, times: u32) -> usize {
        self.inner()
            .keys
            .values()
            .filter(|s| s.deliveries >= times)
            .count()
    }

    /// Handlers running.
    pub fn running(&self) -> u64 {
        self.inner().running
    }

    /// Forgets the handlers that were running: their process was killed.
    pub fn forget_running(&self) {
        self.inner().running = 0;
    }

    /// Copies expected back that did not arrive yet.
    pub fn expected_back(&self) -> usize {
        self.inner().keys.values().map(|s| s.expected.len()).sum()
    }

    /// Time since the last delivery.
    pub fn quiet_for(&self) -> Duration {
        self.inner()
            .last_delivery
            .map_or(Duration::MAX, |t| t.elapsed())
    }

    /// The outcome for `keys` (every key published).
    pub fn report(&self, keys: &[String]) -> Report {
        let inner = self.inner();
        let mut lost = Vec::new();
        let mut doubled = BTreeMap::new();
        for key in keys {
            match inner.keys.get(key).map_or(0, |s| s.effects) {
                0 => lost.push(key.clone()),
                1 => {}
                n => {
                    doubled.insert(key.clone(), n);
                }
            }
        }
        Report {
            messages: keys.len(),
            counts: inner.counts,
            lost,
            doubled,
        }
    }
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Report {
    pub messages: usize,
    pub counts: Counts,
    /// Keys without an effect.
    pub lost: Vec<String>,
    /// Keys with more than one effect, and how many.
    pub doubled: BTreeMap<String, u32>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(f, "  messages published          {}", self.messages)?;
        writeln!(f, "  deliveries                  {}", c.deliveries)?;
        writeln!(f, "    first deliveries          {}", c.first)?;
        writeln!(
            f,
            "    redelivered, handler failed (ReconsumeLater)     {}",
            c.after_failure
        )?;
        writeln!(
            f,
            "    redelivered, held back (ReconsumeLater)          {}",
            c.after_hold_back
        )?;
        writeln!(
            f,
            "    redelivered, consume timeout (original running)  {}",
            c.after_timeout
        )?;
        writeln!(
            f,
            "    replayed (offset not persisted: killed, moved)   {}",
            c.replays
        )?;
        writeln!(f, "  duplicates dropped (acked)  {}", c.duplicates)?;
        writeln!(f, "  held back                   {}", c.held_back)?;
        writeln!(f, "  handler failures            {}", c.failures)?;
        writeln!(f, "  effects applied             {}", c.effects)?;
        if c.commit_errors > 0 {
            writeln!(f, "  commits failed              {}", c.commit_errors)?;
        }
        write!(
            f,
            "  lost {}, doubled {}",
            self.lost.len(),
            self.doubled.len()
        )?;
        if !self.lost.is_empty() {
            write!(f, " (lost: {})", sample(self.lost.iter()))?;
        }
        if !self.doubled.is_empty() {
            write!(f, " (doubled: {})", sample(self.doubled.keys()))?;
        }
        Ok(())
    }
}

fn sample<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    let keys: Vec<&str> = keys.map(String::as_str).collect();
    let mut s = keys.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if keys.len() > 5 {
        s.push_str(", …");
    }
    s
}
