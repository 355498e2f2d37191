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
use crate::store::{StoreError, StoreKey};
use crate::stored::StoreWindow;
use crate::stored::driver::StoreParts;

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
    lease: Duration,
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
            lease: Duration::from_secs(30),
            name: SharedString::const_str("default"),
        }
    }

    /// Forgets each key `ttl` after it was **first accepted** (default: no ttl).
    ///
    /// A duplicate does not extend the ttl unless [`refresh_on_hit`](Window::refresh_on_hit)
    /// is set. A key that arrives after its ttl ran out is accepted again and starts a new ttl.
    ///
    /// Time is read from [`tokio::time::Instant`], so `tokio::time::pause` drives it in tests.
    /// A stream operator reads it for every item, except while items come in less than ~100 µs
    /// apart: then a reading serves a run of up to 64 items, so an item's time may lag by about
    /// that much, and the run ends as soon as the inner stream has to wait. A clock that did not
    /// move between two readings (a paused tokio clock) is read for every item, so a test that
    /// pauses time and advances it between items sees each step. Its
    /// resolution is one millisecond for ttls up
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

    /// How long a claim holds its key if it is neither committed nor released (default: 30 s);
    /// for [`claim_by_key`](crate::DedupStreamExt::claim_by_key) only.
    ///
    /// The lease is what frees the key of a consumer that died (killed, no release) so that
    /// another consumer can take it. Size it above the longest time one item takes to process,
    /// and below the time in which the broker gives up redelivering: for NATS JetStream below
    /// `ack_wait × max_deliver` (each redelivery that arrives while the key is held is held
    /// back, and the broker counts it), for SQS near the visibility timeout, for Kafka near
    /// `max.poll.interval.ms`. Too short, and a slow handler's redelivery is processed
    /// alongside it; too long, and a crashed consumer's messages wait that long.
    ///
    /// # Panics
    ///
    /// If `lease` is zero.
    #[track_caller]
    pub fn lease(mut self, lease: Duration) -> Self {
        assert!(
            !lease.is_zero(),
            "Window::lease: the lease must be longer than zero"
        );
        self.lease = lease;
        self
    }

    /// The claims' lease.
    pub fn lease_duration(&self) -> Duration {
        self.lease
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
    /// The reading that gave `last`: operators hand the same reading to a run of items.
    last_read: Option<Instant>,
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
            last_read: None,
        };
        (clock, ttl_units)
    }

    /// `now` in units, and the shift to apply to the stamps (0 if none).
    #[inline]
    fn units(&mut self, now: Instant) -> (u32, u32) {
        if self.last_read == Some(now) {
            return (self.last, 0);
        }
        self.last_read = Some(now);
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

    /// `now` as this window's time: `None` when it keeps no clock (no ttl). For a caller that
    /// has read the clock already.
    pub(crate) fn at(&self, now: Instant) -> Option<Instant> {
        self.clock.as_ref().map(|_| now)
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

    /// Records `key` like [`observe`](Self::observe) but leaves the verdict uncounted (the
    /// store decides it): `true` when `key` was not in the window.
    pub(crate) fn observe_uncounted(&mut self, key: K, now: Option<Instant>) -> bool {
        let t = self.tick(now);
        let o = self.lru.observe(key, t);
        self.recorder.window_changed(o, self.lru.len());
        !o.duplicate
    }

    pub(crate) fn recorder(&self) -> &Recorder {
        &self.recorder
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

/// How an operator reads the window's clock (only with a ttl): for every item, except while
/// items keep coming faster than [`Ticker::FAST`] apart, when a reading is reused for a run of
/// up to [`Ticker::MAX_RUN`] items.
///
/// A clock read costs more than its own ~20 ns: it orders the CPU's memory reads around it, so
/// the cache misses of consecutive window updates cannot overlap. Reusing a reading over a run
/// removes most of that cost from a busy stream, and the error stays what the rate allows: a run
/// is only allowed after the previous one took under `FAST`, so an item's time lags by about
/// that much. The run ends early whenever the inner stream has to wait (time may pass while
/// nothing is ready). Two equal readings (a paused tokio clock) always mean one read per item:
/// a test that moves a paused clock between items sees every move.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ticker {
    last: Option<Instant>,
    /// Items that may still use `last`.
    left: u8,
    /// The length of the current run.
    run: u8,
}

impl Ticker {
    /// Readings closer together than this let the next one be reused.
    const FAST: Duration = Duration::from_micros(100);
    /// The longest run of items on one reading.
    const MAX_RUN: u8 = 63;

    /// The time for the next item: `None` without a ttl.
    #[inline]
    pub(crate) fn now<K: Hash + Eq>(&mut self, window: &Handle<K>) -> Option<Instant> {
        if self.left > 0 {
            self.left -= 1;
            return self.last;
        }
        let now = window.now()?;
        self.run = match self.last {
            Some(prev) if now > prev && now - prev < Self::FAST => self
                .run
                .saturating_mul(2)
                .saturating_add(1)
                .min(Self::MAX_RUN),
            _ => 0,
        };
        self.left = self.run;
        self.last = Some(now);
        Some(now)
    }

    /// The inner stream had to wait (or the task yielded): read the clock for the next item.
    #[inline]
    pub(crate) fn waited(&mut self) {
        self.left = 0;
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

    pub(crate) fn observe_uncounted(&mut self, key: K, now: Option<Instant>) -> bool {
        match self {
            Handle::Local(set) => set.observe_uncounted(key, now),
            Handle::Shared(shared) => shared.with(|set| set.observe_uncounted(key, now)),
        }
    }

    pub(crate) fn remove(&mut self, key: &K) -> bool {
        match self {
            Handle::Local(set) => set.remove(key),
            Handle::Shared(shared) => shared.with(|set| set.remove(key)),
        }
    }

    /// Runs `f` on the window's recorder (under the lock, for a shared window: its counters
    /// take a single writer).
    pub(crate) fn record(&mut self, f: impl FnOnce(&Recorder)) {
        match self {
            Handle::Local(set) => f(set.recorder()),
            Handle::Shared(shared) => shared.with(|set| f(set.recorder())),
        }
    }
}

/// What an operator gets from its window argument: the in-memory window, and the store behind
/// it if there is one.
#[doc(hidden)]
pub struct Attached<K, E> {
    pub(crate) handle: Handle<K>,
    pub(crate) store: Option<StoreParts<K, E>>,
}

impl<K, E> fmt::Debug for Attached<K, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.handle, f)
    }
}

impl<K, E> From<Handle<K>> for Attached<K, E> {
    fn from(handle: Handle<K>) -> Self {
        Attached {
            handle,
            store: None,
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
/// [`SharedWindow`] (or a reference to one), a [`WindowSet`] built earlier, or a
/// [`StoreWindow`] (a window with a store behind it).
///
/// `E` is the error type that a store failure becomes under
/// [`FailurePolicy::fail_closed`](crate::FailurePolicy::fail_closed): the stream's error type
/// for [`try_dedup_by_key`](crate::TryDedupStreamExt::try_dedup_by_key), which must implement
/// `From<StoreError>` to take a `StoreWindow`.
///
/// This trait is sealed; it cannot be implemented outside this crate.
pub trait IntoWindow<K, E = StoreError>: sealed::Sealed {
    #[doc(hidden)]
    fn into_window(self) -> Attached<K, E>;
}

impl sealed::Sealed for Window {}
impl<K: Hash + Eq, E> IntoWindow<K, E> for Window {
    fn into_window(self) -> Attached<K, E> {
        Handle::Local(WindowSet::new(self)).into()
    }
}

impl<K> sealed::Sealed for WindowSet<K> {}
impl<K: Hash + Eq, E> IntoWindow<K, E> for WindowSet<K> {
    fn into_window(self) -> Attached<K, E> {
        Handle::Local(self).into()
    }
}

impl<K> sealed::Sealed for SharedWindow<K> {}
impl<K: Hash + Eq, E> IntoWindow<K, E> for SharedWindow<K> {
    fn into_window(self) -> Attached<K, E> {
        Handle::Shared(self).into()
    }
}

impl<K> sealed::Sealed for &SharedWindow<K> {}
impl<K: Hash + Eq, E> IntoWindow<K, E> for &SharedWindow<K> {
    fn into_window(self) -> Attached<K, E> {
        Handle::Shared(self.clone()).into()
    }
}

impl sealed::Sealed for StoreWindow {}
impl<K, E> IntoWindow<K, E> for StoreWindow
where
    K: Hash + Eq + Clone + StoreKey,
    E: From<StoreError>,
{
    fn into_window(self) -> Attached<K, E> {
        Attached {
            handle: Handle::Local(WindowSet::new(self.window.clone())),
            store: Some(StoreParts {
                config: self,
                encode: <K as StoreKey>::write_key,
                clone_key: <K as Clone>::clone,
                convert: E::from,
            }),
        }
    }
}

/// What a claim operator gets from its window argument.
#[doc(hidden)]
pub struct ClaimAttached<K, E> {
    pub(crate) set: WindowSet<K>,
    pub(crate) lease: Duration,
    pub(crate) store: Option<StoreParts<K, E>>,
}

impl<K, E> fmt::Debug for ClaimAttached<K, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.set, f)
    }
}

/// What [`claim_by_key`](crate::DedupStreamExt::claim_by_key) accepts as its window: a
/// [`Window`], or a [`StoreWindow`] whose store offers claims
/// ([`ClaimStore`](crate::store::ClaimStore)).
///
/// This trait is sealed; it cannot be implemented outside this crate.
pub trait IntoClaimWindow<K, E = StoreError>: sealed::Sealed {
    #[doc(hidden)]
    #[track_caller]
    fn into_claim_window(self) -> ClaimAttached<K, E>;
}

impl<K: Hash + Eq, E> IntoClaimWindow<K, E> for Window {
    fn into_claim_window(self) -> ClaimAttached<K, E> {
        ClaimAttached {
            lease: self.lease,
            set: WindowSet::new(self),
            store: None,
        }
    }
}

impl<K, E> IntoClaimWindow<K, E> for StoreWindow
where
    K: Hash + Eq + Clone + StoreKey,
    E: From<StoreError>,
{
    #[track_caller]
    fn into_claim_window(self) -> ClaimAttached<K, E> {
        assert!(
            self.store.as_claim_store().is_some(),
            "claim_by_key: the store {:?} does not offer claims (Store::as_claim_store is None)",
            self.store
        );
        ClaimAttached {
            lease: self.window.lease,
            set: WindowSet::new(self.window.clone()),
            store: Some(StoreParts {
                config: self,
                encode: <K as StoreKey>::write_key,
                clone_key: <K as Clone>::clone,
                convert: E::from,
            }),
        }
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

    #[tokio::test(start_paused = true)]
    async fn ticker_reads_a_still_clock_for_every_item() {
        let window = Handle::Local(
            Window::max_keys(10)
                .ttl(Duration::from_secs(1))
                .build::<u64>(),
        );
        let mut ticker = Ticker::default();
        let t0 = ticker.now(&window).expect("a ttl reads the clock");
        for _ in 0..200 {
            // Equal readings never start a run...
            assert_eq!(ticker.now(&window), Some(t0));
        }
        // ...so a step of the paused clock is seen by the very next item.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(ticker.now(&window), Some(t0 + Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn ticker_reuses_readings_only_while_items_come_fast() {
        let window = Handle::Local(
            Window::max_keys(10)
                .ttl(Duration::from_secs(1))
                .build::<u64>(),
        );
        let mut ticker = Ticker::default();
        let step = Duration::from_micros(1);
        let mut reads = 0;
        let mut last = None;
        for _ in 0..1_000 {
            tokio::time::advance(step).await;
            let now = ticker.now(&window);
            if now != last {
                reads += 1;
                last = now;
            }
        }
        // Runs double up to 64 items a reading: 1 + 2 + 4 + ... then 64 at a time.
        assert!(
            (16..=25).contains(&reads),
            "{reads} readings for 1,000 fast items"
        );
        // The lag is bounded by one run of fast items.
        let lag = tokio::time::Instant::now() - last.expect("read");
        assert!(lag < step * u32::from(Ticker::MAX_RUN + 1), "{lag:?}");

        // A slow pair of readings ends the runs: every item reads again.
        tokio::time::advance(Ticker::FAST).await;
        ticker.waited();
        ticker.now(&window);
        for _ in 0..10 {
            tokio::time::advance(Ticker::FAST).await;
            assert_eq!(ticker.now(&window), Some(tokio::time::Instant::now()));
        }

        // A wait of the inner stream ends a run at once.
        for _ in 0..100 {
            tokio::time::advance(step).await;
            ticker.now(&window);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        ticker.waited();
        assert_eq!(ticker.now(&window), Some(tokio::time::Instant::now()));
    }

    #[test]
    fn ticker_never_reads_without_a_ttl() {
        let window = Handle::Local(Window::max_keys(10).build::<u64>());
        assert_eq!(Ticker::default().now(&window), None);
    }
}
