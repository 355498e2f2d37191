//! The store pipeline: a window with a store behind it ([`StoreWindow`], its
//! [`FailurePolicy`]), and the driver that batches ready items into store calls, keeps a
//! bounded number in flight, retries, and yields verdicts in input order.

pub(crate) mod call;
pub(crate) mod driver;
pub(crate) mod gate;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::store::Store;
use crate::window::Window;

/// A [`Window`] with a [`Store`] behind it, made by [`Window::store`]. The stream operators
/// take it where they take a `Window`.
///
/// The in-memory window answers the repeats it remembers with no I/O; the store decides the
/// rest. The operator takes the items that are ready now (up to
/// [`batch_size`](StoreWindow::batch_size), never waiting to fill a batch), asks the store
/// about their keys in one call, keeps up to [`max_in_flight`](StoreWindow::max_in_flight)
/// calls running, and yields in input order. Two copies of a key in one batch, or in two
/// batches in flight, count once: the later copy waits for the earlier one's verdict.
///
/// Mark on emit: a key counts as recorded for the stream once its item is emitted. The store is
/// asked (and records the key) when the item is read, so that the answer is ready when it
/// leaves; an operator dropped before it emits items it read ahead (`take`, `select!`, a
/// cancelled task, shutdown) takes their keys back from the store with its batches' tokens,
/// and so does a call that fails for good under fail closed. When the store fails or does not
/// answer within the [`timeout`](StoreWindow::timeout), the [`FailurePolicy`] decides.
///
/// A crash (`kill -9`) takes nothing back: up to `batch_size × (max_in_flight + 1)` items read
/// ahead (1,280 with the defaults) can stay recorded until their ttl, and the broker's
/// redeliveries of them are dropped. Lower [`batch_size`](StoreWindow::batch_size) and
/// [`max_in_flight`](StoreWindow::max_in_flight) to bound that, or use claims
/// ([`claim_by_key`](crate::DedupStreamExt::claim_by_key)), whose keys a crash leaves in flight
/// only until their lease ends.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use futures::{stream, StreamExt};
/// use stream_dedup::store::MemoryStore;
/// use stream_dedup::{DedupStreamExt, Window};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MemoryStore::new(); // in production: an embedded file, Redis, ...
/// let window = || Window::max_keys(1_000).ttl(Duration::from_secs(3600)).store(store.clone());
/// // Two consumers with windows of their own agree through the store.
/// let a: Vec<u64> = stream::iter([1, 2, 3]).dedup_by_key(|k| *k, window()).collect().await;
/// let b: Vec<u64> = stream::iter([3, 4, 1]).dedup_by_key(|k| *k, window()).collect().await;
/// assert_eq!((a, b), (vec![1, 2, 3], vec![4]));
/// # }
/// ```
///
/// The store's type `S` is kept, so that what it offers is known at compile time:
/// [`claim_by_key`](crate::DedupStreamExt::claim_by_key) takes a `StoreWindow<S>` only when
/// `S` implements [`ClaimStore`](crate::store::ClaimStore).
#[must_use = "a StoreWindow does nothing until it is given to an operator"]
pub struct StoreWindow<S> {
    pub(crate) window: Window,
    pub(crate) store: Arc<S>,
    pub(crate) settings: Settings,
}

/// A [`StoreWindow`]'s settings for the driver, apart from the store.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// How long the store keeps a key.
    pub(crate) ttl: Duration,
    pub(crate) batch_size: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) timeout: Duration,
    pub(crate) max_key_len: usize,
    pub(crate) policy: FailurePolicy,
}

impl<S> Clone for StoreWindow<S> {
    fn clone(&self) -> Self {
        StoreWindow {
            window: self.window.clone(),
            store: Arc::clone(&self.store),
            settings: self.settings,
        }
    }
}

impl Window {
    /// Puts `store` behind this window. Keys are kept in the store for the window's
    /// [`ttl`](Window::ttl); a window without a ttl gets [`DEFAULT_STORE_TTL`] (24 hours), in
    /// memory and in the store, since a store must know when to forget a key.
    ///
    /// Defaults: [`batch_size`](StoreWindow::batch_size) 256,
    /// [`max_in_flight`](StoreWindow::max_in_flight) 4, [`timeout`](StoreWindow::timeout)
    /// 250 ms, [`max_key_len`](StoreWindow::max_key_len) 64 KiB, and
    /// [`FailurePolicy::fail_open`].
    pub fn store<S: Store>(self, store: S) -> StoreWindow<S> {
        let window = match self.policy().ttl() {
            Some(_) => self,
            None => self.ttl(DEFAULT_STORE_TTL),
        };
        let ttl = window.policy().ttl().unwrap_or(DEFAULT_STORE_TTL);
        StoreWindow {
            window,
            store: Arc::new(store),
            settings: Settings {
                ttl,
                batch_size: 256,
                max_in_flight: 4,
                timeout: Duration::from_millis(250),
                max_key_len: 64 * 1024,
                policy: FailurePolicy::fail_open(),
            },
        }
    }
}

/// The longest first wait between retries ([`FailurePolicy::retry`]): one hour.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60 * 60);

/// The ttl a [`StoreWindow`] gives its keys when its [`Window`] has none: 24 hours.
pub const DEFAULT_STORE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

impl<S> StoreWindow<S> {
    /// The window in front of the store.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The most items taken into one store call (default 256). The operator never waits to
    /// fill a batch: it takes what the stream has ready.
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    #[track_caller]
    pub fn batch_size(mut self, n: usize) -> Self {
        assert!(
            n > 0,
            "StoreWindow::batch_size: a batch holds at least one item"
        );
        self.settings.batch_size = n;
        self
    }

    /// The most store calls running at once (default 4). Items wait in the operator, in
    /// order, while their calls run; at most `batch_size × (max_in_flight + 1)` of them.
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    #[track_caller]
    pub fn max_in_flight(mut self, n: usize) -> Self {
        assert!(
            n > 0,
            "StoreWindow::max_in_flight: at least one call must be allowed"
        );
        self.settings.max_in_flight = n;
        self
    }

    /// How long one store call may take before it counts as failed (default 250 ms). A call
    /// that timed out may still have been applied; a retry sends the same [`Token`] so that
    /// the store recognises its own keys.
    ///
    /// [`Token`]: crate::store::Token
    ///
    /// # Panics
    ///
    /// If `timeout` is zero (every call would fail).
    #[track_caller]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "StoreWindow::timeout: the timeout must be longer than zero"
        );
        self.settings.timeout = timeout;
        self
    }

    /// Keys longer than this many bytes (encoded), or than the store's own limit
    /// ([`Store::max_key_len`](crate::store::Store::max_key_len)), are not sent to the store
    /// (default 64 KiB):
    /// their items get the failure policy with
    /// [`StoreError::KeyTooLong`](crate::store::StoreError::KeyTooLong), with no retry, and
    /// the rest of their batch is unaffected. Use a [`Fingerprint`](crate::Fingerprint) for
    /// long keys.
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.settings.max_key_len = bytes;
        self
    }

    /// What to do when the store fails (default: [`FailurePolicy::fail_open`]).
    pub fn on_failure(mut self, policy: FailurePolicy) -> Self {
        self.settings.policy = policy;
        self
    }
}

impl<S: fmt::Debug> fmt::Debug for StoreWindow<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        f.debug_struct("StoreWindow")
            .field("window", &self.window)
            .field("store", &self.store)
            .field("batch_size", &s.batch_size)
            .field("max_in_flight", &s.max_in_flight)
            .field("timeout", &s.timeout)
            .field("max_key_len", &s.max_key_len)
            .field("policy", &s.policy)
            .finish()
    }
}

/// What the operator does with an item whose store call failed (an error, or no answer within
/// the timeout), after any retries.
///
/// - **Fail open** (the default): the item passes on unchecked and is counted
///   ([`Stats::unchecked`](crate::Stats::unchecked)). At-least-once is kept; a duplicate may
///   slip through while the store is down.
/// - **Fail closed**: the item is not passed on. `try_dedup_by_key` yields the error in its
///   place (converted into the stream's error type); `dedup_by_key`, which has no error
///   channel, ends the stream there and keeps the error
///   ([`DedupByKey::store_error`](crate::DedupByKey::store_error)). The key is forgotten, so
///   the broker's redelivery of the item is checked again: nothing is dropped silently.
///
/// Either can first [`retry`](FailurePolicy::retry) transient failures with exponential
/// backoff. Later items keep flowing while a call waits to be retried, but are yielded only
/// after it (input order).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use stream_dedup::FailurePolicy;
///
/// let policy = FailurePolicy::fail_closed().retry(3, Duration::from_millis(50));
/// assert!(!policy.is_fail_open());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct FailurePolicy {
    open: bool,
    retries: u32,
    backoff: Duration,
}

impl FailurePolicy {
    /// Pass items on unchecked when the store fails (no retry).
    pub fn fail_open() -> Self {
        FailurePolicy {
            open: true,
            retries: 0,
            backoff: Duration::ZERO,
        }
    }

    /// Withhold items, and yield the error or end the stream, when the store fails (no retry).
    pub fn fail_closed() -> Self {
        FailurePolicy {
            open: false,
            ..Self::fail_open()
        }
    }

    /// Retries a transient failure up to `attempts` times, waiting `backoff`, then twice that,
    /// and so on (capped at 32 × `backoff`), before falling back to open or closed. A backoff
    /// over [`MAX_BACKOFF`] (one hour) is clamped to it.
    pub fn retry(mut self, attempts: u32, backoff: Duration) -> Self {
        self.retries = attempts;
        self.backoff = backoff.min(MAX_BACKOFF);
        self
    }

    /// Whether the fallback is fail open.
    pub fn is_fail_open(&self) -> bool {
        self.open
    }

    /// How long to wait before retry number `attempt` (1-based).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        self.backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(5))
    }

    pub(crate) fn retries(&self) -> u32 {
        self.retries
    }
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self::fail_open()
    }
}
