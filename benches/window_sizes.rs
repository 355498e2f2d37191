//! What a window costs as it grows: throughput of `dedup_by_key` at 1k … 10M keys, without and
//! with a ttl, against `lru::LruCache` (the plain alternative a user would write) at the same
//! sizes. Each window is filled first (a full window evicts on every new key, its steady
//! state), then timed on further keys.
//!
//! Keys are `u64`; the pattern is the synthetic broker's default: 1.5% of items are
//! redeliveries (1% lost ACKs, 0.5% timeouts) arriving 30 s ± 5 s later at 1000 messages/s,
//! i.e. 25k–35k new keys after their original. Windows below 25k keys let them all through
//! (every item is then a miss: an insert and an eviction); from 35k on, they catch all.
//!
//! ```text
//! cargo bench --bench window_sizes
//! ```

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::Stream;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use stream_dedup::{DedupStreamExt, Window};

const SIZES: [usize; 5] = [1_000, 10_000, 100_000, 1_000_000, 10_000_000];
/// Items per timed iteration.
const CHUNK: u64 = 10_000;
/// Length of the repeating redelivery pattern (a power of two).
const PATTERN: usize = 1 << 20;

/// For each item, 0 for a new key, or how many new keys ago the redelivered key was new.
fn pattern() -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(42);
    (0..PATTERN)
        .map(|_| {
            if rng.random_bool(0.015) {
                rng.random_range(25_000..=35_000)
            } else {
                0
            }
        })
        .collect()
}

/// An endless stream of keys following the pattern, which yields `budget` keys and then
/// returns `Pending` until given more.
struct Keys<'a> {
    pattern: &'a [u32],
    i: usize,
    newest: u64,
    budget: u64,
}

impl<'a> Keys<'a> {
    fn new(pattern: &'a [u32]) -> Self {
        Keys {
            pattern,
            i: 0,
            newest: 1 << 40,
            budget: 0,
        }
    }

    #[inline]
    fn next_key(&mut self) -> u64 {
        let gap = self.pattern[self.i & (PATTERN - 1)];
        self.i += 1;
        if gap == 0 {
            self.newest += 1;
            self.newest
        } else {
            self.newest - u64::from(gap)
        }
    }
}

impl Stream for Keys<'_> {
    type Item = u64;

    #[inline]
    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<u64>> {
        let this = self.get_mut();
        if this.budget == 0 {
            return Poll::Pending;
        }
        this.budget -= 1;
        Poll::Ready(Some(this.next_key()))
    }
}

/// Polls the operator until its source has used up its budget, dropping what it lets through.
fn drain<S: Stream<Item = u64> + Unpin>(op: &mut S) {
    let mut cx = Context::from_waker(Waker::noop());
    while let Poll::Ready(Some(k)) = Pin::new(&mut *op).poll_next(&mut cx) {
        black_box(k);
    }
}

fn window_sizes(c: &mut Criterion) {
    let pattern = pattern();
    let mut group = c.benchmark_group("window_sizes");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(CHUNK));

    for &n in &SIZES {
        for ttl in [None, Some(Duration::from_secs(300))] {
            let name = if ttl.is_some() {
                "dedup_by_key+ttl"
            } else {
                "dedup_by_key"
            };
            let window = match ttl {
                Some(ttl) => Window::max_keys(n).ttl(ttl),
                None => Window::max_keys(n),
            };
            let mut op = Keys::new(&pattern).dedup_by_key(|k| *k, window);
            // Fill the window, and a little more so that it is evicting.
            let fill = n as u64 + 100_000;
            op.get_mut().budget = fill;
            drain(&mut op);
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        op.get_mut().budget = CHUNK;
                        drain(&mut op);
                    }
                    start.elapsed()
                });
            });
        }

        let mut keys = Keys::new(&pattern);
        let mut lru = lru::LruCache::<u64, ()>::new(NonZeroUsize::new(n).unwrap());
        let step = |keys: &mut Keys<'_>, lru: &mut lru::LruCache<u64, ()>| {
            let k = keys.next_key();
            if lru.get(&k).is_none() {
                lru.put(k, ());
                black_box(k);
            }
        };
        for _ in 0..n + 100_000 {
            step(&mut keys, &mut lru);
        }
        group.bench_function(BenchmarkId::new("lru::LruCache", n), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters * CHUNK {
                    step(&mut keys, &mut lru);
                }
                start.elapsed()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, window_sizes);
criterion_main!(benches);
