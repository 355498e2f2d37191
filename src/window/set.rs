//! [`WindowSet`]: the bounded LRU / time window, with its clock and its counters.

use std::fmt;
use std::hash::Hash;

use tokio::time::Instant;

use super::clock::Clock;
use super::lru::Lru;
use super::{Policy, Window};
use crate::stats::{Recorder, Stats};

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
    policy: Policy,
}

impl<K: Hash + Eq> WindowSet<K> {
    /// An empty window with `window`'s settings. Registers its metrics with the recorder
    /// installed now.
    pub fn new(window: Window) -> Self {
        let policy = window.into_policy();
        let (clock, ttl) = match policy.ttl {
            Some(ttl) => {
                let (clock, ttl) = Clock::new(ttl);
                (Some(clock), Some(ttl))
            }
            None => (None, None),
        };
        WindowSet {
            lru: Lru::new(policy.max_keys, ttl, policy.refresh_on_hit),
            clock,
            recorder: Recorder::new(&policy.name),
            policy,
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

    /// This window's settings.
    pub fn policy(&self) -> &Policy {
        &self.policy
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
