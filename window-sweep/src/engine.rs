//! The sweep: every window of the grid, replayed through the real operator on a paused clock.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::future::poll_fn;
use std::hash::Hash;
use std::hint::black_box;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_core::Stream;
use tokio::time::{Instant, Sleep};

use super::report::SweepReport;
use super::workload::{Delivery, KeyKind, Workload};
use super::{CellResult, log_grid};
use stream_dedup::{DedupStreamExt, Fingerprint, Window};

/// A grid of windows (`max_keys` × `ttl`) to replay a [`Workload`] through, and how to
/// measure them.
///
/// For each window, [`run`](Sweep::run) replays every delivery through
/// [`dedup_by_key`](stream_dedup::DedupStreamExt::dedup_by_key) on a current-thread tokio runtime
/// whose clock is paused (`start_paused`): each delivery waits
/// `sleep_until(start + at_ms)`, and the paused clock jumps straight to it, so an hour of
/// traffic replays in seconds with the window seeing exactly the recorded times. It counts,
/// from the deliveries' message ids:
///
/// - **leaked**: duplicates the window let through (a delivery that went downstream after an
///   earlier delivery of its message did);
/// - **wrongly dropped**: deliveries dropped although no delivery of their message had gone
///   downstream (a unique message lost). It must be 0; only a key collision could make it
///   otherwise;
/// - **heap bytes** held by the window once the replay is over, when a
///   [`heap_bytes`](Sweep::heap_bytes) probe is given: the allocator's live bytes after the
///   replay minus before the operator was built (nothing else allocates in between);
/// - **throughput** of the window: the same deliveries, at the same times, through a fresh
///   [`WindowSet::insert_at`](stream_dedup::WindowSet::insert_at), timed on the wall clock. The
///   operator's own replay cannot give it: on a paused clock its time goes into tokio's timer
///   (each new millisecond parks the runtime and moves the clock), many times the cost of the
///   window. The two passes must agree on every counter (checked in debug builds).
///
/// Keys are computed ahead (a table per message), so throughput is the window's alone.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use window_sweep::{Sweep, SyntheticBroker, Workload};
///
/// let broker = SyntheticBroker::new()
///     .rate(1000.0)
///     .messages(20_000)
///     .ack_wait(Duration::from_secs(2))
///     .jitter(Duration::from_millis(200));
/// let workload = Workload::synthetic(&broker);
/// let report = Sweep::new()
///     .max_keys([100, 10_000])
///     .ttls([None, Some(Duration::from_secs(60))])
///     .run(&workload);
/// assert_eq!(report.cells.len(), 4);
/// for cell in &report.cells {
///     assert_eq!(cell.wrongly_dropped, 0);
///     // 2 s of traffic is about 2000 keys: 100 keys miss the redeliveries, 10k catch them.
///     assert_eq!(cell.leaked == 0, cell.max_keys == 10_000, "{cell:?}");
/// }
/// ```
pub struct Sweep {
    max_keys: Vec<usize>,
    ttls: Vec<Option<Duration>>,
    refresh_on_hit: bool,
    key_kind: KeyKind,
    heap: Option<Box<dyn Fn() -> usize + Send + Sync>>,
    throughput: bool,
}

impl fmt::Debug for Sweep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sweep")
            .field("max_keys", &self.max_keys)
            .field("ttls", &self.ttls)
            .field("refresh_on_hit", &self.refresh_on_hit)
            .field("key_kind", &self.key_kind)
            .field("heap_bytes", &self.heap.is_some())
            .field("throughput", &self.throughput)
            .finish()
    }
}

impl Default for Sweep {
    fn default() -> Self {
        Sweep::new()
    }
}

/// Where a sweep is, passed to the callback of [`Sweep::run_with_progress`] after each window.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Progress<'a> {
    /// Windows measured so far, this one included.
    pub done: usize,
    /// Windows in the grid.
    pub total: usize,
    /// The window just measured.
    pub cell: &'a CellResult,
    /// Wall-clock time since the sweep started.
    pub elapsed: Duration,
}

impl Progress<'_> {
    /// The time the rest of the grid should take, at the pace so far.
    pub fn remaining(&self) -> Duration {
        let per = self.elapsed.as_secs_f64() / self.done.max(1) as f64;
        Duration::from_secs_f64(per * (self.total - self.done) as f64)
    }
}

impl Sweep {
    /// A sweep with the default grid: `max_keys` 1k, 3k, 10k, … 1M (two a decade) × ttl none,
    /// 30 s, 1 min, 5 min; ttls kept from first acceptance; `u64` keys; throughput measured;
    /// memory not measured (give a probe with [`heap_bytes`](Sweep::heap_bytes)).
    pub fn new() -> Self {
        Sweep {
            max_keys: log_grid(1_000, 1_000_000, 2),
            ttls: vec![
                None,
                Some(Duration::from_secs(30)),
                Some(Duration::from_secs(60)),
                Some(Duration::from_secs(300)),
            ],
            refresh_on_hit: false,
            key_kind: KeyKind::U64,
            heap: None,
            throughput: true,
        }
    }

    /// The window sizes to try (sorted here); [`log_grid`] spaces them on a log scale.
    ///
    /// # Panics
    ///
    /// If `sizes` is empty, or one is 0 or above [`Window::max_keys`]' limit.
    #[track_caller]
    pub fn max_keys(mut self, sizes: impl IntoIterator<Item = usize>) -> Self {
        let mut sizes: Vec<usize> = sizes.into_iter().collect();
        sizes.sort_unstable();
        sizes.dedup();
        assert!(!sizes.is_empty(), "Sweep::max_keys: no window size");
        for &n in &sizes {
            // Checks the size the way the window will.
            let _ = Window::max_keys(n);
        }
        self.max_keys = sizes;
        self
    }

    /// The ttls to try; `None` is a window without one.
    ///
    /// # Panics
    ///
    /// If `ttls` is empty or a ttl is shorter than 1 ms.
    #[track_caller]
    pub fn ttls(mut self, ttls: impl IntoIterator<Item = Option<Duration>>) -> Self {
        let mut ttls: Vec<Option<Duration>> = ttls.into_iter().collect();
        ttls.sort_unstable();
        ttls.dedup();
        assert!(
            !ttls.is_empty(),
            "Sweep::ttls: no ttl (use `None` for none)"
        );
        for ttl in ttls.iter().flatten() {
            let _ = Window::max_keys(1).ttl(*ttl);
        }
        self.ttls = ttls;
        self
    }

    /// Sweeps windows with [`Window::refresh_on_hit`] (default: `false`).
    pub fn refresh_on_hit(mut self, refresh: bool) -> Self {
        self.refresh_on_hit = refresh;
        self
    }

    /// The key type the windows hold (default: [`KeyKind::U64`]).
    pub fn key_kind(mut self, kind: KeyKind) -> Self {
        self.key_kind = kind;
        self
    }

    /// Measures the heap bytes each window holds with `probe`, which returns the bytes the
    /// process has allocated now: a counting global allocator's, such as
    /// `|| ALLOC.allocated()` with the `cap` crate's `Cap<System>` (see the `window-sweep`
    /// binary, `src/main.rs`). Default: not measured.
    ///
    /// The count is exact only if nothing else allocates while a window is replayed: run the
    /// sweep on its own, not beside other threads that allocate.
    pub fn heap_bytes(mut self, probe: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        self.heap = Some(Box::new(probe));
        self
    }

    /// Whether to time each window's throughput (default: `true`).
    pub fn throughput(mut self, measure: bool) -> Self {
        self.throughput = measure;
        self
    }

    /// Replays `workload` through every window of the grid, ttl by ttl, smallest window first.
    ///
    /// # Panics
    ///
    /// If called from within a tokio runtime: each window is replayed on a runtime of its own,
    /// which cannot block inside another. From async code, run the sweep in
    /// [`spawn_blocking`](tokio::task::spawn_blocking) (a `Sweep` and a `Workload` are `Send`).
    pub fn run(&self, workload: &Workload) -> SweepReport {
        self.run_with_progress(workload, |_| {})
    }

    /// [`run`](Sweep::run), calling `progress` after each window (to print where the sweep is).
    ///
    /// # Panics
    ///
    /// As [`run`](Sweep::run).
    pub fn run_with_progress(
        &self,
        workload: &Workload,
        mut progress: impl FnMut(&Progress<'_>),
    ) -> SweepReport {
        let cells = match self.key_kind {
            KeyKind::U64 => {
                self.run_keys(workload, &|d: Delivery| u64::from(d.message), &mut progress)
            }
            KeyKind::Fingerprint => {
                let keys: Vec<Fingerprint> = (0..workload.messages())
                    .map(|m| Fingerprint::of(workload.key_text(m).as_bytes()))
                    .collect();
                self.run_keys(
                    workload,
                    &|d: Delivery| keys[d.message as usize],
                    &mut progress,
                )
            }
            KeyKind::String => {
                let keys: Vec<Cow<'_, str>> = (0..workload.messages())
                    .map(|m| workload.key_text(m))
                    .collect();
                self.run_keys(
                    workload,
                    &|d: Delivery| String::from(&*keys[d.message as usize]),
                    &mut progress,
                )
            }
        };
        SweepReport::new(workload, self.key_kind, cells)
    }

    fn run_keys<K: Hash + Eq>(
        &self,
        workload: &Workload,
        key_of: &impl Fn(Delivery) -> K,
        progress: &mut dyn FnMut(&Progress<'_>),
    ) -> Vec<CellResult> {
        let truth = Truth::new(workload.messages());
        let total = self.ttls.len() * self.max_keys.len();
        let started = std::time::Instant::now();
        let mut cells = Vec::with_capacity(total);
        for &ttl in &self.ttls {
            for &max_keys in &self.max_keys {
                cells.push(self.run_cell(workload, max_keys, ttl, key_of, &truth));
                progress(&Progress {
                    done: cells.len(),
                    total,
                    cell: cells.last().expect("just pushed"),
                    elapsed: started.elapsed(),
                });
            }
        }
        cells
    }

    fn window(&self, max_keys: usize, ttl: Option<Duration>) -> Window {
        let window = Window::max_keys(max_keys).refresh_on_hit(self.refresh_on_hit);
        match ttl {
            Some(ttl) => window.ttl(ttl),
            None => window,
        }
    }

    fn run_cell<K: Hash + Eq>(
        &self,
        workload: &Workload,
        max_keys: usize,
        ttl: Option<Duration>,
        key_of: &impl Fn(Delivery) -> K,
        truth: &Truth,
    ) -> CellResult {
        truth.clear();
        let deliveries = workload.deliveries();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread tokio runtime with a paused clock");
        runtime.block_on(async {
            let start = Instant::now();
            let source = Replay::new(deliveries, start);
            let wrongly_dropped = Cell::new(0u64);
            // Everything the replay needs is allocated above: from here on, the only
            // allocations are the window's (and, for string keys, each key, which the window
            // keeps when it accepts it).
            let before = self.heap.as_ref().map(|probe| probe());
            let operator = source
                .dedup_by_key(|d: &Delivery| key_of(*d), self.window(max_keys, ttl))
                .on_duplicate(|d: Delivery| {
                    if !truth.get(d.message) {
                        wrongly_dropped.set(wrongly_dropped.get() + 1);
                    }
                });
            let mut operator = pin!(operator);
            let stats = operator.stats();
            let (mut leaked, mut peak_keys) = (0u64, 0u64);
            let clock = std::time::Instant::now();
            while let Some(d) = poll_fn(|cx| operator.as_mut().poll_next(cx)).await {
                if truth.set(d.message) {
                    leaked += 1;
                }
                peak_keys = peak_keys.max(stats.keys());
            }
            let replay_secs = clock.elapsed().as_secs_f64();
            let heap_bytes = match (&self.heap, before) {
                (Some(probe), Some(before)) => Some(probe().saturating_sub(before) as u64),
                _ => None,
            };
            let stats = stats.snapshot();

            let items_per_sec = self.throughput.then(|| {
                let mut set = self.window(max_keys, ttl).build::<K>();
                let start = Instant::now();
                let clock = std::time::Instant::now();
                for d in deliveries {
                    black_box(set.insert_at(key_of(*d), start + Duration::from_millis(d.at_ms)));
                }
                let secs = clock.elapsed().as_secs_f64().max(1e-9);
                debug_assert_eq!(
                    set.stats().snapshot(),
                    stats,
                    "the operator and insert_at disagree on {max_keys} keys, ttl {ttl:?}"
                );
                deliveries.len() as f64 / secs
            });

            CellResult {
                max_keys,
                ttl,
                refresh_on_hit: self.refresh_on_hit,
                key_kind: self.key_kind,
                deliveries: deliveries.len() as u64,
                redeliveries: workload.summary().redeliveries,
                leaked,
                wrongly_dropped: wrongly_dropped.get(),
                heap_bytes,
                peak_keys,
                evicted: stats.evicted,
                expired: stats.expired,
                replay_secs,
                items_per_sec,
            }
        })
    }
}

/// Which messages went downstream: one bit each.
struct Truth(Vec<Cell<u64>>);

impl Truth {
    fn new(messages: u32) -> Self {
        Truth(
            (0..(messages as usize).div_ceil(64))
                .map(|_| Cell::new(0))
                .collect(),
        )
    }

    fn clear(&self) {
        for word in &self.0 {
            word.set(0);
        }
    }

    fn get(&self, message: u32) -> bool {
        self.0[message as usize / 64].get() & (1 << (message % 64)) != 0
    }

    /// Marks `message` as gone downstream; returns whether it already was.
    fn set(&self, message: u32) -> bool {
        let word = &self.0[message as usize / 64];
        let bit = 1 << (message % 64);
        let was = word.get() & bit != 0;
        word.set(word.get() | bit);
        was
    }
}

/// The deliveries as a stream, each one when the (paused) clock reaches its time.
struct Replay<'a> {
    deliveries: &'a [Delivery],
    next: usize,
    start: Instant,
    reached_ms: u64,
    sleep: Pin<Box<Sleep>>,
}

impl<'a> Replay<'a> {
    fn new(deliveries: &'a [Delivery], start: Instant) -> Self {
        Replay {
            deliveries,
            next: 0,
            start,
            reached_ms: 0,
            sleep: Box::pin(tokio::time::sleep_until(start)),
        }
    }
}

impl Stream for Replay<'_> {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = self.get_mut();
        let Some(&d) = this.deliveries.get(this.next) else {
            return Poll::Ready(None);
        };
        if d.at_ms > this.reached_ms {
            let deadline = this.start + Duration::from_millis(d.at_ms);
            if this.sleep.deadline() != deadline {
                this.sleep.as_mut().reset(deadline);
            }
            ready!(this.sleep.as_mut().poll(cx));
            this.reached_ms = d.at_ms;
        }
        this.next += 1;
        Poll::Ready(Some(d))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.deliveries.len() - self.next;
        (n, Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SyntheticBroker;

    fn workload() -> Workload {
        Workload::synthetic(
            &SyntheticBroker::new()
                .messages(30_000)
                .rate(2000.0)
                .lost_ack(0.03)
                .timeouts(0.02)
                .ack_wait(Duration::from_secs(1))
                .jitter(Duration::from_millis(300))
                .max_deliver(4),
        )
    }

    /// Without a ttl the operator is an exact LRU: its leaks are the reuse-distance prediction.
    #[test]
    fn no_ttl_leaks_match_the_lru_prediction() {
        let w = workload();
        let report = Sweep::new()
            .max_keys(log_grid(100, 10_000, 3))
            .ttls([None])
            .run(&w);
        for cell in &report.cells {
            assert_eq!(cell.leaked, w.leaks_without_ttl(cell.max_keys), "{cell:?}");
            assert_eq!(cell.wrongly_dropped, 0);
            assert_eq!(cell.expired, 0);
        }
        assert!(report.cells[0].leaked > 0);
        assert_eq!(report.cells.last().unwrap().leaked, 0);
    }

    /// With a ttl (and with refresh) the replay through the operator and `insert_at` agree
    /// (the debug assertion in `run_cell`), and a ttl shorter than every redelivery catches none.
    #[test]
    fn ttls_on_the_paused_clock() {
        let w = workload();
        let age = w.summary().max_redelivery_age.unwrap();
        for refresh in [false, true] {
            let report = Sweep::new()
                .max_keys([50_000])
                .ttls([
                    Some(Duration::from_millis(100)),
                    Some(age + Duration::from_millis(1)),
                ])
                .refresh_on_hit(refresh)
                .key_kind(KeyKind::Fingerprint)
                .run(&w);
            let [short, long] = &report.cells[..] else {
                panic!()
            };
            assert_eq!(short.leaked, w.summary().redeliveries, "{short:?}");
            assert_eq!(long.leaked, 0, "{long:?}");
            assert!(short.expired > 0);
        }
    }

    #[test]
    fn string_keys_and_progress() {
        let w = Workload::synthetic(
            &SyntheticBroker::new()
                .messages(2000)
                .ack_wait(Duration::from_millis(500)),
        );
        let mut seen = Vec::new();
        let report = Sweep::new()
            .max_keys([10, 5000])
            .ttls([None])
            .key_kind(KeyKind::String)
            .throughput(false)
            .run_with_progress(&w, |p| seen.push((p.done, p.total)));
        assert_eq!(seen, [(1, 2), (2, 2)]);
        assert!(
            report
                .cells
                .iter()
                .all(|c| c.items_per_sec.is_none() && c.heap_bytes.is_none())
        );
        assert_eq!(report.cells[1].leaked, 0);
    }
}
