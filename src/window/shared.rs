//! [`SharedWindow`], a window several streams share, and [`Handle`], an operator's window of its
//! own or a shared one.

use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;

use super::{Policy, Window, WindowSet};
use crate::stats::{Recorder, Stats};

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
    policy: Policy,
}

impl<K: Hash + Eq> SharedWindow<K> {
    pub(super) fn new(window: Window) -> Self {
        let set = WindowSet::new(window);
        SharedWindow {
            stats: set.stats(),
            policy: set.policy().clone(),
            inner: Arc::new(Mutex::new(set)),
        }
    }

    /// This window's settings.
    pub fn policy(&self) -> &Policy {
        &self.policy
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
        self.policy.ttl.is_some().then(Instant::now)
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
            policy: self.policy.clone(),
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
#[allow(
    clippy::large_enum_variant,
    reason = "the local window is inline so that the hot path follows no pointer"
)]
pub(crate) enum Handle<K> {
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

impl<K> fmt::Debug for Handle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Handle::Local(set) => fmt::Debug::fmt(set, f),
            Handle::Shared(shared) => fmt::Debug::fmt(shared, f),
        }
    }
}
