//! Counters a caller can read while a stream runs, mirrored to the `metrics` facade.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use metrics::{Counter, Gauge, SharedString};

/// Name of the counter of items accepted (first seen, passed downstream).
pub const ACCEPTED_TOTAL: &str = "stream_dedup_accepted_total";
/// Name of the counter of items dropped as duplicates.
pub const DUPLICATES_TOTAL: &str = "stream_dedup_duplicates_total";
/// Name of the counter of keys forgotten because the window was full.
pub const EVICTED_TOTAL: &str = "stream_dedup_evicted_total";
/// Name of the counter of keys forgotten because their ttl ran out.
pub const EXPIRED_TOTAL: &str = "stream_dedup_expired_total";
/// Name of the counter of items passed on unchecked because the store failed (fail open).
pub const UNCHECKED_TOTAL: &str = "stream_dedup_unchecked_total";
/// Name of the counter of store calls that failed (after any retries).
pub const STORE_ERRORS_TOTAL: &str = "stream_dedup_store_errors_total";
/// Name of the counter of copies held back because their key was in flight (claims).
pub const HELD_BACK_TOTAL: &str = "stream_dedup_held_back_total";
/// Name of the counter of claims committed.
pub const COMMITTED_TOTAL: &str = "stream_dedup_committed_total";
/// Name of the counter of claims released (dropped or released uncommitted).
pub const RELEASED_TOTAL: &str = "stream_dedup_released_total";
/// Name of the counter of open claims' leases renewed by keep-alive.
pub const RENEWED_TOTAL: &str = "stream_dedup_renewed_total";
/// Name of the counter of open claims whose key another claim took over (found by keep-alive).
pub const LEASES_LOST_TOTAL: &str = "stream_dedup_leases_lost_total";
/// Name of the gauge of keys the window holds.
pub const KEYS: &str = "stream_dedup_keys";
/// Name of the label that carries [`Window::name`](crate::Window::name) on every metric.
pub const WINDOW_LABEL: &str = "window";

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    evicted: AtomicU64,
    expired: AtomicU64,
    keys: AtomicU64,
    unchecked: AtomicU64,
    store_errors: AtomicU64,
    held_back: AtomicU64,
    committed: AtomicU64,
    released: AtomicU64,
    renewed: AtomicU64,
    lost: AtomicU64,
}

/// A live view of one window's counters, cheap to clone and to read from any thread.
///
/// Every operator and every [`SharedWindow`](crate::SharedWindow) has one. Reads are
/// `Relaxed`: each number is exact once the stream is idle, and never more than a few items
/// behind while it runs.
///
/// # Examples
///
/// ```
/// use futures::{stream, StreamExt};
/// use stream_dedup::{DedupStreamExt, Window};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let unique = stream::iter([1, 2, 1, 3, 2]).dedup_by_key(|n| *n, Window::max_keys(100));
/// let stats = unique.stats();
/// let out: Vec<_> = unique.collect().await;
/// assert_eq!(out, [1, 2, 3]);
/// assert_eq!((stats.accepted(), stats.duplicates(), stats.keys()), (3, 2, 3));
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Stats(Arc<Counters>);

impl Stats {
    /// Items accepted: their key was not in the window, so they went downstream.
    pub fn accepted(&self) -> u64 {
        self.0.accepted.load(Relaxed)
    }

    /// Items dropped because their key was in the window.
    pub fn duplicates(&self) -> u64 {
        self.0.duplicates.load(Relaxed)
    }

    /// Keys forgotten to make room for a new key in a full window (least recently seen first).
    pub fn evicted(&self) -> u64 {
        self.0.evicted.load(Relaxed)
    }

    /// Keys forgotten because their ttl ran out.
    pub fn expired(&self) -> u64 {
        self.0.expired.load(Relaxed)
    }

    /// Keys the window holds now.
    pub fn keys(&self) -> u64 {
        self.0.keys.load(Relaxed)
    }

    /// Items passed on without a verdict because the store failed and the policy is fail open
    /// (at-least-once is kept; such an item may be a duplicate).
    pub fn unchecked(&self) -> u64 {
        self.0.unchecked.load(Relaxed)
    }

    /// Store calls that failed, after any retries.
    pub fn store_errors(&self) -> u64 {
        self.0.store_errors.load(Relaxed)
    }

    /// Copies held back because their key was in flight under another claim (claims only):
    /// neither yielded nor passed to `on_duplicate`, so the broker delivers them again.
    pub fn held_back(&self) -> u64 {
        self.0.held_back.load(Relaxed)
    }

    /// Claims committed (claims only).
    pub fn committed(&self) -> u64 {
        self.0.committed.load(Relaxed)
    }

    /// Claims released uncommitted: by `release`, a drop, or a commit that failed (claims
    /// only).
    pub fn released(&self) -> u64 {
        self.0.released.load(Relaxed)
    }

    /// Leases of open claims renewed by keep-alive ([`Window::keep_alive`](crate::Window::keep_alive)),
    /// one per key and round.
    pub fn renewed(&self) -> u64 {
        self.0.renewed.load(Relaxed)
    }

    /// Open claims whose key another claim took over (their lease had run out): found by
    /// keep-alive; their commits fail with `LeaseLost`.
    pub fn leases_lost(&self) -> u64 {
        self.0.lost.load(Relaxed)
    }

    /// All counters at once.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted(),
            duplicates: self.duplicates(),
            evicted: self.evicted(),
            expired: self.expired(),
            keys: self.keys(),
            unchecked: self.unchecked(),
            store_errors: self.store_errors(),
            held_back: self.held_back(),
            committed: self.committed(),
            released: self.released(),
            renewed: self.renewed(),
            leases_lost: self.leases_lost(),
        }
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.snapshot(), f)
    }
}

/// The counters of [`Stats`] read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// See [`Stats::accepted`].
    pub accepted: u64,
    /// See [`Stats::duplicates`].
    pub duplicates: u64,
    /// See [`Stats::evicted`].
    pub evicted: u64,
    /// See [`Stats::expired`].
    pub expired: u64,
    /// See [`Stats::keys`].
    pub keys: u64,
    /// See [`Stats::unchecked`].
    pub unchecked: u64,
    /// See [`Stats::store_errors`].
    pub store_errors: u64,
    /// See [`Stats::held_back`].
    pub held_back: u64,
    /// See [`Stats::committed`].
    pub committed: u64,
    /// See [`Stats::released`].
    pub released: u64,
    /// See [`Stats::renewed`].
    pub renewed: u64,
    /// See [`Stats::leases_lost`].
    pub leases_lost: u64,
}

/// The writing side: owned by exactly one window, which is only ever written through `&mut`
/// (directly, or under the shared window's mutex). With a single writer a plain load + store
/// is an exact increment and costs no locked instruction on the hot path. The claim counters
/// (`committed`, `released`) are the exception: a claim operator's committer task counts them
/// from its own thread through a clone, so they are atomic increments. A claim operator counts
/// each item's fate (accepted, duplicate, held back, unchecked, store error) through its own
/// clone without the claims' lock: it is the only writer of those counters, while the window's
/// (evicted, expired, keys) are written under the lock.
#[derive(Clone)]
pub(crate) struct Recorder {
    counters: Stats,
    accepted: Counter,
    duplicates: Counter,
    evicted: Counter,
    expired: Counter,
    keys: Gauge,
    unchecked: Counter,
    store_errors: Counter,
    held_back: Counter,
    committed: Counter,
    released: Counter,
    renewed: Counter,
    lost: Counter,
}

/// What one observation did to the window (the window reports it; the recorder counts it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Observed {
    /// The key was in the window: the item is a repeat.
    pub(crate) duplicate: bool,
    /// A new key pushed the least recently seen key out of a full window.
    pub(crate) evicted: bool,
    /// Keys whose ttl ran out before this observation (removed by it).
    pub(crate) expired: u32,
}

/// How an item left an operator: each is counted by [`Recorder::fate`], in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    Accepted,
    Duplicate,
    HeldBack,
    Unchecked,
    StoreError,
}

#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed) + n, Relaxed);
}

impl Recorder {
    /// Registers the metrics under `name` with whatever recorder is installed now.
    pub(crate) fn new(name: &SharedString) -> Self {
        let label = [(WINDOW_LABEL, name.clone())];
        Recorder {
            counters: Stats::default(),
            accepted: metrics::counter!(ACCEPTED_TOTAL, &label),
            duplicates: metrics::counter!(DUPLICATES_TOTAL, &label),
            evicted: metrics::counter!(EVICTED_TOTAL, &label),
            expired: metrics::counter!(EXPIRED_TOTAL, &label),
            keys: metrics::gauge!(KEYS, &label),
            unchecked: metrics::counter!(UNCHECKED_TOTAL, &label),
            store_errors: metrics::counter!(STORE_ERRORS_TOTAL, &label),
            held_back: metrics::counter!(HELD_BACK_TOTAL, &label),
            committed: metrics::counter!(COMMITTED_TOTAL, &label),
            released: metrics::counter!(RELEASED_TOTAL, &label),
            renewed: metrics::counter!(RENEWED_TOTAL, &label),
            lost: metrics::counter!(LEASES_LOST_TOTAL, &label),
        }
    }

    pub(crate) fn stats(&self) -> &Stats {
        &self.counters
    }

    #[inline]
    pub(crate) fn observed(&self, o: Observed, keys: usize) {
        self.verdict(!o.duplicate);
        self.window_changed(o, keys);
    }

    /// Counts an item's fate.
    #[inline]
    pub(crate) fn fate(&self, fate: Fate) {
        match fate {
            Fate::Accepted => self.verdict(true),
            Fate::Duplicate => self.verdict(false),
            Fate::HeldBack => self.held_back(),
            Fate::Unchecked => self.unchecked(),
            Fate::StoreError => self.store_error(),
        }
    }

    /// An item was accepted (`true`) or dropped as a duplicate (`false`).
    #[inline]
    pub(crate) fn verdict(&self, accepted: bool) {
        let c = &self.counters.0;
        if accepted {
            bump(&c.accepted, 1);
            self.accepted.increment(1);
        } else {
            bump(&c.duplicates, 1);
            self.duplicates.increment(1);
        }
    }

    /// An item passed unchecked (fail open).
    pub(crate) fn unchecked(&self) {
        bump(&self.counters.0.unchecked, 1);
        self.unchecked.increment(1);
    }

    /// A copy was held back (claims).
    pub(crate) fn held_back(&self) {
        bump(&self.counters.0.held_back, 1);
        self.held_back.increment(1);
    }

    /// A claim was committed.
    pub(crate) fn committed(&self) {
        self.counters.0.committed.fetch_add(1, Relaxed);
        self.committed.increment(1);
    }

    /// A claim was released uncommitted.
    pub(crate) fn released(&self) {
        self.counters.0.released.fetch_add(1, Relaxed);
        self.released.increment(1);
    }

    /// Keep-alive renewed `renewed` leases and found `lost` taken over.
    pub(crate) fn kept_alive(&self, renewed: u64, lost: u64) {
        if renewed > 0 {
            self.counters.0.renewed.fetch_add(renewed, Relaxed);
            self.renewed.increment(renewed);
        }
        if lost > 0 {
            self.counters.0.lost.fetch_add(lost, Relaxed);
            self.lost.increment(lost);
        }
    }

    /// A store call failed for good.
    pub(crate) fn store_error(&self) {
        bump(&self.counters.0.store_errors, 1);
        self.store_errors.increment(1);
    }

    /// Evictions and expiries of one observation, and the new key count.
    #[inline]
    pub(crate) fn window_changed(&self, o: Observed, keys: usize) {
        let c = &self.counters.0;
        if o.evicted {
            bump(&c.evicted, 1);
            self.evicted.increment(1);
        }
        if o.expired > 0 {
            bump(&c.expired, u64::from(o.expired));
            self.expired.increment(u64::from(o.expired));
        }
        self.set_keys(keys);
    }

    pub(crate) fn expired(&self, n: u32, keys: usize) {
        if n > 0 {
            bump(&self.counters.0.expired, u64::from(n));
            self.expired.increment(u64::from(n));
            self.set_keys(keys);
        }
    }

    #[inline]
    pub(crate) fn set_keys(&self, keys: usize) {
        let keys = keys as u64;
        if self.counters.0.keys.load(Relaxed) != keys {
            self.counters.0.keys.store(keys, Relaxed);
            self.keys.set(keys as f64);
        }
    }
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Recorder").field(&self.counters).finish()
    }
}
