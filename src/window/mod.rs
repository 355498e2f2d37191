//! The window: its configuration ([`Window`]), the window on its own ([`WindowSet`]) and a
//! window shared by several streams ([`SharedWindow`]).

pub(crate) mod lru;

use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics::SharedString;
use tokio::time::Instant;

use self::lru::Lru;
use crate::stats::{Recorder, Stats};

/// How many keys a window remembers, and for how long.
///
/// A window is always bounded: it holds at most [`max_keys`](Window::max_keys) keys, forgetting
/// the **least recently seen** key to make room for a new one, and with a
/// [`ttl`](Window::ttl) it also forgets each key that long after it was first accepted.
///
/// Pass it to [`dedup_by_key`](crate::DedupStreamExt::dedup_by_key) for a window of the
/// stream's own, or turn it into a [`SharedWindow`] with [`shared`](Window::shared) for a window
/// several streams agree on.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use stream_dedup::Window;
///
/// let window = Window::max_keys(100_000)
///     .ttl(Duration::from_secs(300))
///     .name("orders");
/// assert_eq!(window.capacity(), 100_000);
/// assert_eq!(window.time_to_live(), Some(Duration::from_secs(300)));
/// ```
#[derive(Clone, Debug)]
pub struct Window {
    max_keys: u32,
    ttl: Option<Duration>,
    refresh_on_hit: bool,
    name: SharedString,
}

/// The largest `max_keys`: slot indices are `u32`, one value is reserved.
const MAX_KEYS: usize = u32::MAX as usize - 1;

impl Window {
    /// A window that remembers at most `n` distinct keys, with no ttl, no refresh on hit, and
    /// the metrics label `window="default"`.
    ///
    /// Memory grows with the keys actually held, up to `n`; it is never allocated ahead.
    ///
    /// # Panics
    ///
    /// If `n` is 0 or larger than `u32::MAX - 1`.
    #[track_caller]
    pub fn max_keys(n: usize) -> Self {
        assert!(
            n > 0,
            "Window::max_keys: the window must hold at least one key"
        );
        assert!(
            n <= MAX_KEYS,
            "Window::max_keys: at most {MAX_KEYS} keys, got {n}"
        );
        Window {
            max_keys: n as u32,
            ttl: None,
            refresh_on_hit: false,
            name: SharedString::const_str("default"),
        }
    }

    /// Forgets each key `ttl` after it was **first accepted** (default: no ttl).
    ///
    /// A duplicate does not extend the ttl unless [`refresh_on_hit`](Window::refresh_on_hit)
    /// is set. A key that arrives after its ttl ran out is accepted again and starts a new ttl.
    ///
    /// Time is read from [`tokio::time::Instant`], once per poll of the stream, so
    /// `tokio::time::pause` drives it in tests. Its resolution is one millisecond for ttls up
    /// to about 12 days, and `ttl / 2^30` beyond that. Keys that ran out are dropped (and
    /// counted as expired) the next time the window is used.
    ///
    /// # Panics
    ///
    /// If `ttl` is shorter than one millisecond.
    #[track_caller]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        assert!(
            ttl >= Duration::from_millis(1),
            "Window::ttl: the ttl must be at least 1 ms, got {ttl:?}"
        );
        self.ttl = Some(ttl);
        self
    }

    /// With `true`, a duplicate restarts its key's ttl, so the ttl counts from the key's most
    /// recent sighting instead of its first acceptance (default: `false`).
    ///
    /// A key that keeps being redelivered then stays in the window for as long as it keeps
    /// coming, as Vector's and Flink's dedup users asked for. It has no effect without a ttl.
    /// It also saves 8 bytes a key, since expiry order is then recency order.
    pub fn refresh_on_hit(mut self, refresh: bool) -> Self {
        self.refresh_on_hit = refresh;
        self
    }

    /// The value of the `window` label on this window's metrics (default: `"default"`).
    ///
    /// Metrics go through the [`metrics`] facade to whatever recorder the application
    /// installed; this crate never installs one. Handles are registered when the window is
    /// built (when the operator is created), so install the recorder before that. The names
    /// are in [`stats`](crate::stats).
    pub fn name(mut self, name: impl Into<SharedString>) -> Self {
        self.name = name.into();
        self
    }

    /// The most keys this window holds.
    pub fn capacity(&self) -> usize {
        self.max_keys as usize
    }

    /// The ttl, if one is set.
    pub fn time_to_live(&self) -> Option<Duration> {
        self.ttl
    }

    /// Builds a window that several streams can share: clone the handle and give one clone to
    /// each [`dedup_by_key`](crate::DedupStreamExt::dedup_by_key).
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stream_dedup::{DedupStreamExt, Window};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let window = Window::max_keys(1_000).shared();
    /// let a: Vec<u32> = stream::iter([1, 2, 3]).dedup_by_key(|n| *n, window.clone()).collect().await;
    /// let b: Vec<u32> = stream::iter([2, 3, 4]).dedup_by_key(|n| *n, window.clone()).collect().await;
    /// assert_eq!((a, b), (vec![1, 2, 3], vec![4]));
    /// assert_eq!(window.stats().duplicates(), 2);
    /// # }
    /// ```
    pub fn shared<K: Hash + Eq>(self) -> SharedWindow<K> {
        SharedWindow::new(self)
    }

    /// Builds the window on its own, for code that is not a stream (see [`WindowSet`]).
    pub fn build<K: Hash + Eq>(self) -> WindowSet<K> {
        WindowSet::new(self)
    }
}

/// Turns a `tokio` [`Instant`] into the window's `u32` time units, monotone, moving its epoch
/// forward (and asking for a rebase of the stamps) long before a `u32` could overflow.
#[derive(Debug)]
struct Clock {
    epoch: Instant,
    unit_ms: u64,
    last: u32,
}

/// Stamps are rebased when time passes this many units since the epoch...
const REBASE_AT: u64 = 1 << 31;
/// ...by this much, so a live stamp (younger than the ttl, at most `2^30` units) stays exact.
const REBASE_BY: u32 = 1 << 30;

impl Clock {
    /// Picks a unit of 1 ms, or coarser so that the ttl fits in `2^30` units. Returns the clock
    /// and the ttl in its units.
    fn new(ttl: Duration) -> (Clock, u32) {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let unit_ms = ttl_ms.div_ceil(u64::from(REBASE_BY)).max(1);
        let ttl_units = u32::try_from(ttl_ms.div_ceil(unit_ms)).unwrap_or(REBASE_BY);
        let clock = Clock {
            epoch: Instant::now(),
            unit_ms,
            last: 0,
        };
        (clock, ttl_units)
    }

    /// `now` in units, and the shift to apply to the stamps (0 if none).
    #[inline]
    fn units(&mut self, now: Instant) -> (u32, u32) {
        let elapsed = now.saturating_duration_since(self.epoch);
        let ms = elapsed
            .as_secs()
            .saturating_mul(1000)
            .saturating_add(u64::from(elapsed.subsec_millis()));
        let mut t = if self.unit_ms == 1 {
            ms
        } else {
            ms / self.unit_ms
        };
        let mut shift = 0;
        if t >= REBASE_AT {
            // Everything older than the ttl is gone; move the epoch so that `t` is small again.
            // A stamp older than the shift saturates to 0, which is still older than the ttl.
            let by = t - u64::from(REBASE_BY);
            self.epoch += Duration::from_millis(by.saturating_mul(self.unit_ms));
            t -= by;
            shift = u32::try_from(by).unwrap_or(u32::MAX);
            self.last = self.last.saturating_sub(shift);
        }
        let t = (t as u32).max(self.last);
        self.last = t;
        (t, shift)
    }
}

/// A [`Window`] on its own: the bounded LRU / time window that the stream operators use,
/// for code that is not a stream (a consumer loop, a batch job, a benchmark).
///
/// # Examples
///
/// ```
/// use stream_dedup::Window;
///
/// let mut seen = Window::max_keys(2).build();
/// assert!(seen.insert("a"));
/// assert!(seen.insert("b"));
/// assert!(!seen.insert("a")); // a repeat; "b" is now the least recently seen
/// assert!(seen.insert("c")); // the window is full: "b" is forgotten
/// assert!(seen.insert("b"));
/// assert_eq!(seen.stats().evicted(), 2);
/// ```
pub struct WindowSet<K> {
    lru: Lru<K>,
    clock: Option<Clock>,
    recorder: Recorder,
}

impl<K: Hash + Eq> WindowSet<K> {
    /// An empty window with `window`'s settings. Registers its metrics with the recorder
    /// installed now.
    pub fn new(window: Window) -> Self {
        let (clock, ttl) = match window.ttl {
            Some(ttl) => {
                let (clock, ttl) = Clock::new(ttl);
                (Some(clock), Some(ttl))
            }
            None => (None, None),
        };
        WindowSet {
            lru: Lru::new(window.max_keys, ttl, window.refresh_on_hit),
            clock,
            recorder: Recorder::new(&window.name),
        }
    }

    /// Records `key`; returns `true` if it was new (accept the item), `false` if it was in the
    /// window (a duplicate). Like [`HashSet::insert`](std::collections::HashSet::insert), but
    /// bounded. With a ttl, reads the time now.
    pub fn insert(&mut self, key: K) -> bool {
        let now = self.now();
        self.observe(key, now)
    }

    /// [`insert`](WindowSet::insert) at a given time, for replaying recorded traffic. Times
    /// must not go backwards: an earlier time than one already seen counts as that one.
    pub fn insert_at(&mut self, key: K, now: Instant) -> bool {
        self.observe(key, Some(now))
    }

    /// Whether `key` is in the window now, without counting it as seen.
    pub fn contains(&mut self, key: &K) -> bool {
        let t = self.tick(self.now());
        self.lru.contains(key, t)
    }

    /// Forgets `key`, so that its next item is accepted; returns whether it was there.
    pub fn remove(&mut self, key: &K) -> bool {
        let removed = self.lru.remove(key);
        self.recorder.set_keys(self.lru.len());
        removed
    }

    /// Forgets every key.
    pub fn clear(&mut self) {
        self.lru.clear();
        self.recorder.set_keys(0);
    }

    /// Drops the keys whose ttl has run out by now (it also happens on every insert).
    pub fn expire(&mut self) {
        let t = self.tick(self.now());
        let n = self.lru.expire(t);
        self.recorder.expired(n, self.lru.len());
    }

    /// How many keys the window holds (expired keys count until they are dropped).
    pub fn len(&self) -> usize {
        self.lru.len()
    }

    /// Whether the window holds no key.
    pub fn is_empty(&self) -> bool {
        self.lru.len() == 0
    }

    /// This window's counters.
    pub fn stats(&self) -> Stats {
        self.recorder.stats().clone()
    }

    /// The time to use for the next observations: `None` without a ttl (no clock read).
    #[inline]
    pub(crate) fn now(&self) -> Option<Instant> {
        self.clock.as_ref().map(|_| Instant::now())
    }

    #[inline]
    fn tick(&mut self, now: Option<Instant>) -> u32 {
        match (&mut self.clock, now) {
            (Some(clock), Some(now)) => {
                let (t, shift) = clock.units(now);
                if shift > 0 {
                    self.lru.rebase(shift);
                }
                t
            }
            _ => 0,
        }
    }

    /// The operators' hot path: `true` when `key` is new.
    #[inline]
    pub(crate) fn observe(&mut self, key: K, now: Option<Instant>) -> bool {
        let t = self.tick(now);
        let o = self.lru.observe(key, t);
        self.recorder.observed(o, self.lru.len());
        !o.duplicate
    }
}

impl<K> fmt::Debug for WindowSet<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowSet")
            .field("stats", self.recorder.stats())
            .finish_non_exhaustive()
    }
}

/// A window that several streams share, for instance the partitions of one topic consumed by
/// several tasks. Cheap to clone: every clone is the same window.
///
/// Each item locks the window briefly; a stream with a window of its own
/// ([`Window`] passed directly) takes no lock.
///
/// Build it with [`Window::shared`].
pub struct SharedWindow<K> {
    inner: Arc<Mutex<WindowSet<K>>>,
    stats: Stats,
    ttl: bool,
}

impl<K: Hash + Eq> SharedWindow<K> {
    fn new(window: Window) -> Self {
        let ttl = window.ttl.is_some();
        let set = WindowSet::new(window);
        SharedWindow {
            stats: set.stats(),
            inner: Arc::new(Mutex::new(set)),
            ttl,
        }
    }

    /// The window's counters, summed over every stream that uses it.
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// Runs `f` on the window (locked for the duration), e.g. to [`remove`](WindowSet::remove)
    /// a key or read its [`len`](WindowSet::len).
    ///
    /// # Examples
    ///
    /// ```
    /// use stream_dedup::Window;
    ///
    /// let window = Window::max_keys(10).shared();
    /// window.with(|w| w.insert(7));
    /// assert!(window.with(|w| w.remove(&7)));
    /// ```
    pub fn with<R>(&self, f: impl FnOnce(&mut WindowSet<K>) -> R) -> R {
        // A panic in a user's `Hash` or `Eq` can poison the lock; the window is still usable
        // (at worst it forgot a key, which lets a duplicate through and loses nothing).
        let mut set = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut set)
    }

    #[inline]
    pub(crate) fn now(&self) -> Option<Instant> {
        self.ttl.then(Instant::now)
    }

    #[inline]
    pub(crate) fn observe(&self, key: K, now: Option<Instant>) -> bool {
        self.with(|set| set.observe(key, now))
    }
}

impl<K> Clone for SharedWindow<K> {
    fn clone(&self) -> Self {
        SharedWindow {
            inner: Arc::clone(&self.inner),
            stats: self.stats.clone(),
            ttl: self.ttl,
        }
    }
}

impl<K> fmt::Debug for SharedWindow<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedWindow")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Where an operator keeps its keys: a window of its own, or a shared one.
#[doc(hidden)]
#[allow(
    clippy::large_enum_variant,
    reason = "the local window is inline so that the hot path follows no pointer"
)]
pub enum Handle<K> {
    Local(WindowSet<K>),
    Shared(SharedWindow<K>),
}

impl<K: Hash + Eq> Handle<K> {
    #[inline]
    pub(crate) fn now(&self) -> Option<Instant> {
        match self {
            Handle::Local(set) => set.now(),
            Handle::Shared(shared) => shared.now(),
        }
    }

    #[inline]
    pub(crate) fn observe(&mut self, key: K, now: Option<Instant>) -> bool {
        match self {
            Handle::Local(set) => set.observe(key, now),
            Handle::Shared(shared) => shared.observe(key, now),
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        match self {
            Handle::Local(set) => set.stats(),
            Handle::Shared(shared) => shared.stats(),
        }
    }
}

impl<K> fmt::Debug for Handle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Handle::Local(set) => fmt::Debug::fmt(set, f),
            Handle::Shared(shared) => fmt::Debug::fmt(shared, f),
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// What an operator accepts as its window: a [`Window`] (a window of the stream's own), a
/// [`SharedWindow`] (or a reference to one), or a [`WindowSet`] built earlier.
///
/// This trait is sealed; it cannot be implemented outside this crate.
pub trait IntoWindow<K>: sealed::Sealed {
    #[doc(hidden)]
    fn into_handle(self) -> Handle<K>;
}

impl sealed::Sealed for Window {}
impl<K: Hash + Eq> IntoWindow<K> for Window {
    fn into_handle(self) -> Handle<K> {
        Handle::Local(WindowSet::new(self))
    }
}

impl<K> sealed::Sealed for WindowSet<K> {}
impl<K: Hash + Eq> IntoWindow<K> for WindowSet<K> {
    fn into_handle(self) -> Handle<K> {
        Handle::Local(self)
    }
}

impl<K> sealed::Sealed for SharedWindow<K> {}
impl<K: Hash + Eq> IntoWindow<K> for SharedWindow<K> {
    fn into_handle(self) -> Handle<K> {
        Handle::Shared(self)
    }
}

impl<K> sealed::Sealed for &SharedWindow<K> {}
impl<K: Hash + Eq> IntoWindow<K> for &SharedWindow<K> {
    fn into_handle(self) -> Handle<K> {
        Handle::Shared(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_rebases_before_overflow() {
        let (mut clock, ttl) = Clock::new(Duration::from_millis(10));
        assert_eq!(ttl, 10);
        let start = clock.epoch;
        let (t, shift) = clock.units(start + Duration::from_millis(5));
        assert_eq!((t, shift), (5, 0));
        let far = start + Duration::from_millis(REBASE_AT + 7);
        let (t, shift) = clock.units(far);
        assert_eq!(u64::from(t) + u64::from(shift), REBASE_AT + 7);
        assert!(u64::from(t) < REBASE_AT);
        // Monotone: an earlier instant reads as the latest one.
        assert_eq!(clock.units(far - Duration::from_millis(3)).0, t);
    }

    #[test]
    fn long_ttls_use_coarser_units() {
        let (clock, ttl) = Clock::new(Duration::from_secs(365 * 24 * 3600));
        assert!(clock.unit_ms > 1);
        assert!(ttl <= REBASE_BY);
    }
}
