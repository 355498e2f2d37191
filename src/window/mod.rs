//! The window on its own: its configuration ([`Window`], read back through [`Policy`]), the
//! bounded LRU / time window ([`WindowSet`]), a window shared by several streams
//! ([`SharedWindow`]) and its clock. Nothing here knows about stores or streams.

mod clock;
pub(crate) mod lru;
mod set;
mod shared;

use std::hash::Hash;
use std::time::Duration;

use metrics::SharedString;

pub(crate) use self::clock::Ticker;
pub use self::set::WindowSet;
pub(crate) use self::shared::Handle;
pub use self::shared::SharedWindow;

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
/// assert_eq!(window.policy().max_keys(), 100_000);
/// assert_eq!(window.policy().ttl(), Some(Duration::from_secs(300)));
/// ```
#[derive(Clone, Debug)]
#[must_use = "a Window does nothing until it is given to an operator or built"]
pub struct Window {
    policy: Policy,
}

/// The longest ttl or lease a window keeps: longer ones are clamped to it (100 years), so that
/// no time computed from them can overflow.
pub const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// A [`Window`]'s settings, read back: each getter has the name of the setter that sets it
/// (as moka's `Policy`). From [`Window::policy`], [`WindowSet::policy`] and
/// [`SharedWindow::policy`].
#[derive(Clone, Debug)]
pub struct Policy {
    max_keys: u32,
    ttl: Option<Duration>,
    refresh_on_hit: bool,
    lease: Duration,
    keep_alive: bool,
    name: SharedString,
}

impl Policy {
    /// The most keys the window holds ([`Window::max_keys`]).
    pub fn max_keys(&self) -> usize {
        self.max_keys as usize
    }

    /// The ttl, if one is set ([`Window::ttl`]).
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// Whether a duplicate restarts its key's ttl ([`Window::refresh_on_hit`]).
    pub fn refresh_on_hit(&self) -> bool {
        self.refresh_on_hit
    }

    /// How long a claim holds its key ([`Window::lease`]).
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Whether open claims' leases are renewed ([`Window::keep_alive`]).
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// The `window` label of the metrics ([`Window::name`]).
    pub fn name(&self) -> &str {
        &self.name
    }
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
            policy: Policy {
                max_keys: n as u32,
                ttl: None,
                refresh_on_hit: false,
                lease: Duration::from_secs(30),
                keep_alive: true,
                name: SharedString::const_str("default"),
            },
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
    /// counted as expired) the next time the window is used. A ttl over [`MAX_SPAN`] (100
    /// years) is clamped to it.
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
        self.policy.ttl = Some(ttl.min(MAX_SPAN));
        self
    }

    /// With `true`, a duplicate restarts its key's ttl, so the ttl counts from the key's most
    /// recent sighting instead of its first acceptance (default: `false`).
    ///
    /// A key that keeps being redelivered then stays in the window for as long as it keeps
    /// coming, as Vector's and Flink's dedup users asked for. It has no effect without a ttl.
    /// It also saves 8 bytes a key, since expiry order is then recency order.
    pub fn refresh_on_hit(mut self, refresh: bool) -> Self {
        self.policy.refresh_on_hit = refresh;
        self
    }

    /// How long a claim holds its key if it is neither committed nor released (default: 30 s);
    /// for [`claim_by_key`](crate::DedupStreamExt::claim_by_key) only.
    ///
    /// The lease is what frees the key of a consumer that died (killed, no release) so that
    /// another consumer can take it. With [`keep_alive`](Window::keep_alive) (the default) an
    /// open claim's lease is renewed while it lives, so a few seconds suffice whatever the
    /// handler's time. Without it, size the lease above the longest time one item takes to
    /// process; either way, below the time in which the broker gives up redelivering: for NATS JetStream below
    /// `ack_wait × max_deliver` (each redelivery that arrives while the key is held is held
    /// back, and the broker counts it), for SQS near the visibility timeout, for Kafka near
    /// `max.poll.interval.ms`. Too short, and a slow handler's redelivery is processed
    /// alongside it; too long, and a crashed consumer's messages wait that long. A lease over
    /// [`MAX_SPAN`] (100 years) is clamped to it.
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
        self.policy.lease = lease.min(MAX_SPAN);
        self
    }

    /// With `true` (the default), the leases of open claims are renewed in the background:
    /// a round every third of the lease renews the claims held (since their claim or last
    /// renewal) for a quarter of it or more — a younger claim is renewed at the next round,
    /// with well over a third of its lease left then — checked against each claim's token
    /// (batched calls to the store, if there is one); for
    /// [`claim_by_key`](crate::DedupStreamExt::claim_by_key) only.
    ///
    /// So the [`lease`](Window::lease) can be a few seconds while a handler runs for minutes:
    /// a live consumer's claims stay in flight for as long as they are open, and a dead
    /// consumer's keys free up within one lease. A claim whose renewal finds its key taken over
    /// (its lease ran out anyway: the consumer stalled, or the store was unreachable for a
    /// lease) knows it ([`Claim::is_lost`](crate::Claim::is_lost)), and its commit fails.
    /// Renewals are counted ([`Stats::renewed`](crate::Stats::renewed),
    /// [`Stats::leases_lost`](crate::Stats::leases_lost)), and each round is a beat of
    /// [`Claim::heartbeat`](crate::Claim::heartbeat), on which a consumer extends its broker's
    /// ack deadline. Keep-alive needs a tokio runtime.
    pub fn keep_alive(mut self, keep_alive: bool) -> Self {
        self.policy.keep_alive = keep_alive;
        self
    }

    /// The value of the `window` label on this window's metrics (default: `"default"`).
    ///
    /// Metrics go through the [`metrics`] facade to whatever recorder the application
    /// installed; this crate never installs one. Handles are registered when the window is
    /// built (when the operator is created), so install the recorder before that. The names
    /// are in [`stats`](crate::stats).
    pub fn name(mut self, name: impl Into<SharedString>) -> Self {
        self.policy.name = name.into();
        self
    }

    /// This window's settings.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub(crate) fn into_policy(self) -> Policy {
        self.policy
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
