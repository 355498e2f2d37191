//! The in-memory window against the plain loops a user would write instead, in one run.
//!
//! Workload (issue 2, "Speed and memory"): keys from a seeded RNG, ~10% of the items are
//! redeliveries of a key seen within the last 10,000 items, the rest are fresh random keys;
//! window `max_keys(1_000_000)` with a 300 s ttl; one thread. Keys are generated once, outside
//! the timing. Every benchmark returns the number of accepted items, and every variant whose
//! semantics agree on this workload is checked to accept the same number.
//!
//! ```text
//! cargo bench --bench window
//! ```
//!
//! Beyond the variants the issue names, the `u64` group has three that explain the numbers:
//! the hand loop reading the clock once per 1,000 keys, the operator without a ttl (no clock
//! read at all) and the FIFO window with a ttl (a clock read per item, as any ttl needs).
//!
//! moka is left out: ~3,000 ns/item (0.3 M items/s in `shared/MEASURED.md`), and with its
//! default TinyLFU policy it catches only ~20% of the redeliveries (a frequency-based cache
//! rejects keys seen once, and every key of a dedup window is seen once).

use std::collections::VecDeque;
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use futures::executor::block_on;
use futures::{StreamExt, stream};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use stream_dedup::{DedupStreamExt, Fingerprint, Window};
use tokio::time::Instant;

/// Items in the `u64` workload.
const U64_ITEMS: usize = 10_000_000;
/// Items in the UUID workload: enough to run the 1M-key window full and evicting for most of
/// the run (~3.6M distinct keys), small enough that an iteration of the slowest variant stays
/// around a second.
const UUID_ITEMS: usize = 4_000_000;
/// Keys the window remembers.
const WINDOW_KEYS: usize = 1_000_000;
/// A redelivery repeats a key seen within this many items.
const LOOKBACK: usize = 10_000;
/// One item in this many is a redelivery.
const REDELIVERY_ONE_IN: u32 = 10;
const SEED: u64 = 0x5EED_DED0;

fn window() -> Window {
    Window::max_keys(WINDOW_KEYS).ttl(Duration::from_secs(300))
}

/// `n` keys: a fresh one from `fresh`, or (one time in ten) a copy of one of the last
/// `LOOKBACK` keys.
fn workload<K: Clone>(n: usize, mut fresh: impl FnMut(&mut StdRng) -> K) -> Vec<K> {
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut keys: Vec<K> = Vec::with_capacity(n);
    for i in 0..n {
        let key = if i > 0 && rng.random_ratio(1, REDELIVERY_ONE_IN) {
            let back = rng.random_range(1..=i.min(LOOKBACK));
            keys[i - back].clone()
        } else {
            fresh(&mut rng)
        };
        keys.push(key);
    }
    keys
}

/// A random UUID in its 36-byte text form (`xxxxxxxx-xxxx-4xxx-xxxx-xxxxxxxxxxxx`).
fn uuid(rng: &mut StdRng) -> String {
    let hex = format!("{:032x}", rng.random::<u128>());
    format!(
        "{}-{}-4{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Distinct keys in `keys`: what every exact dedup variant must accept on this workload (a
/// repeat always falls within the last 10,000 items, so within any 1M-key window).
fn distinct<K: std::hash::Hash + Eq>(keys: &[K]) -> usize {
    keys.iter().collect::<hashbrown::HashSet<_>>().len()
}

fn u64_10m(c: &mut Criterion) {
    let keys = workload(U64_ITEMS, |rng| rng.random::<u64>());
    let expected = distinct(&keys);
    let check = |n: usize| {
        assert_eq!(n, expected, "accepted count differs from the distinct keys");
        black_box(n)
    };

    let mut group = c.benchmark_group("u64_10M");
    group
        .throughput(Throughput::Elements(U64_ITEMS as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));

    // (a) The operator, driven as a `Stream`.
    group.bench_function("operator", |b| {
        b.iter(|| {
            let unique = stream::iter(keys.iter().copied()).dedup_by_key(|k| *k, window());
            check(block_on(unique.count()))
        });
    });

    // (b) The same window structure in a hand-written loop: the adapter's own overhead.
    group.bench_function("window_set_loop", |b| {
        b.iter(|| {
            let mut set = window().build::<u64>();
            check(keys.iter().filter(|&&k| set.insert(k)).count())
        });
    });

    // (b2) The hand loop reading the clock once per 1,000 keys instead of once per key
    // (`insert_at`): the structure's own cost, without a clock read serialising every item.
    group.bench_function("window_set_loop_clock_per_1k", |b| {
        b.iter(|| {
            let mut set = window().build::<u64>();
            let mut accepted = 0;
            for chunk in keys.chunks(1_000) {
                let now = Instant::now();
                accepted += chunk.iter().filter(|&&k| set.insert_at(k, now)).count();
            }
            check(accepted)
        });
    });

    // (a2) The operator with no ttl: it never reads the clock.
    group.bench_function("operator_no_ttl", |b| {
        b.iter(|| {
            let window = Window::max_keys(WINDOW_KEYS);
            let unique = stream::iter(keys.iter().copied()).dedup_by_key(|k| *k, window);
            check(block_on(unique.count()))
        });
    });

    // (c) The floor: an unbounded set (foldhash), which never forgets and never evicts.
    group.bench_function("hashbrown_unbounded", |b| {
        b.iter(|| {
            let mut set = hashbrown::HashSet::<u64>::new();
            check(keys.iter().filter(|&&k| set.insert(k)).count())
        });
    });

    // (d) `lru::LruCache`, the plain get-else-put loop.
    group.bench_function("lru_crate", |b| {
        b.iter(|| {
            let mut cache = lru::LruCache::<u64, ()>::new(NonZeroUsize::new(WINDOW_KEYS).unwrap());
            let mut accepted = 0;
            for &k in &keys {
                if cache.get(&k).is_none() {
                    cache.put(k, ());
                    accepted += 1;
                }
            }
            check(accepted)
        });
    });

    // (e) A set + `VecDeque` FIFO window: forgets the oldest accepted key, not the least
    // recently seen, which on this workload accepts the same items.
    group.bench_function("hashset_vecdeque_fifo", |b| {
        b.iter(|| {
            let mut set = hashbrown::HashSet::<u64>::new();
            let mut order = VecDeque::new();
            let mut accepted = 0;
            for &k in &keys {
                if set.insert(k) {
                    if order.len() == WINDOW_KEYS {
                        let oldest = order.pop_front().unwrap();
                        set.remove(&oldest);
                    }
                    order.push_back(k);
                    accepted += 1;
                }
            }
            check(accepted)
        });
    });

    // (e2) The same FIFO window with a ttl, as a hand-written loop has to do it: an arrival
    // time per key (one clock read per item) and the expired keys dropped from the front.
    group.bench_function("hashset_vecdeque_fifo_ttl", |b| {
        let ttl = Duration::from_secs(300);
        b.iter(|| {
            let mut set = hashbrown::HashSet::<u64>::new();
            let mut order = VecDeque::<(u64, Instant)>::new();
            let mut accepted = 0;
            for &k in &keys {
                let now = Instant::now();
                while let Some(&(old, at)) = order.front() {
                    if now.duration_since(at) < ttl {
                        break;
                    }
                    set.remove(&old);
                    order.pop_front();
                }
                if set.insert(k) {
                    if order.len() == WINDOW_KEYS {
                        let (oldest, _) = order.pop_front().unwrap();
                        set.remove(&oldest);
                    }
                    order.push_back((k, now));
                    accepted += 1;
                }
            }
            check(accepted)
        });
    });
    group.finish();
}

fn uuid_4m(c: &mut Criterion) {
    let keys = workload(UUID_ITEMS, uuid);
    assert!(keys.iter().all(|k| k.len() == 36));
    let expected = distinct(&keys);
    let check = |n: usize| {
        assert_eq!(n, expected, "accepted count differs from the distinct keys");
        black_box(n)
    };
    // Each item is a `&str` into the received data (a message id read from its payload):
    // the consumer owns its messages, so what the operator costs is the key and the window.
    let items = || keys.iter().map(String::as_str);

    let mut group = c.benchmark_group("uuid_4M");
    group
        .throughput(Throughput::Elements(UUID_ITEMS as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));

    // (a) The operator with the exact key: an owned copy of the string per item.
    group.bench_function("operator_exact", |b| {
        b.iter(|| {
            let unique = stream::iter(items()).dedup_by_key(|s: &&str| s.to_string(), window());
            check(block_on(unique.count()))
        });
    });

    // (b) The operator with the opt-in 128-bit fingerprint as the key.
    group.bench_function("operator_fingerprint", |b| {
        b.iter(|| {
            let unique = stream::iter(items()).dedup_by_key(|s| Fingerprint::of(s), window());
            check(block_on(unique.count()))
        });
    });

    // (c) The same window of fingerprints in a hand-written loop.
    group.bench_function("window_set_loop_fingerprint", |b| {
        b.iter(|| {
            let mut set = window().build::<Fingerprint>();
            check(items().filter(|s| set.insert(Fingerprint::of(s))).count())
        });
    });

    // (e) For scale, the `u64` operator on a workload of this group's shape (same length,
    // same redelivery pattern): what the fingerprint path is held against, within one group.
    let u64_keys = workload(UUID_ITEMS, |rng| rng.random::<u64>());
    let u64_expected = distinct(&u64_keys);
    group.bench_function("operator_u64_same_shape", |b| {
        b.iter(|| {
            let unique = stream::iter(u64_keys.iter().copied()).dedup_by_key(|k| *k, window());
            let n = block_on(unique.count());
            assert_eq!(n, u64_expected);
            black_box(n)
        });
    });

    // (d) The floor: an unbounded set of owned strings.
    group.bench_function("hashbrown_unbounded_string", |b| {
        b.iter(|| {
            let mut set = hashbrown::HashSet::<String>::new();
            check(
                items()
                    .filter(|s| !set.contains(*s) && set.insert(s.to_string()))
                    .count(),
            )
        });
    });
    group.finish();
}

criterion_group!(benches, u64_10m, uuid_4m);
criterion_main!(benches);
