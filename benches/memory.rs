//! Heap bytes per remembered key at a full 1,000,000-key window, counted by a counting
//! allocator, against the plain structures a user would reach for instead.
//!
//! ```text
//! cargo bench --bench memory
//! ```
//!
//! Each window is fed 3,000,000 distinct keys (so it filled and then evicted ~2M keys), and the
//! heap it holds then (allocated after minus allocated before) is divided by the keys it holds.
//! A last check feeds one window 10,000,000 distinct keys and compares its heap after 5M and
//! after 10M: a bounded window must not grow once full.

use std::alloc::System;
use std::collections::VecDeque;
use std::iter;
use std::num::NonZeroUsize;
use std::time::Duration;

use cap::Cap;
use futures::executor::block_on;
use futures::{Stream, StreamExt, stream};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use stream_dedup::{DedupStreamExt, Fingerprint, Window};
use tokio::time::Instant;

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

const WINDOW_KEYS: usize = 1_000_000;
/// Distinct keys fed to each bounded window: well past full.
const FED: usize = 3_000_000;
const TTL: Duration = Duration::from_secs(300);
const SEED: u64 = 0x5EED_DED0;

/// Bytes allocated on the heap now, by everything.
fn heap() -> usize {
    ALLOC.allocated()
}

/// Distinct random `u64` keys (a collision among a few million is vanishingly unlikely).
fn u64_keys() -> impl Iterator<Item = u64> {
    let mut rng = StdRng::seed_from_u64(SEED);
    iter::repeat_with(move || rng.random::<u64>())
}

/// Distinct random UUID-formatted 36-byte strings.
fn uuid_keys() -> impl Iterator<Item = String> {
    let mut rng = StdRng::seed_from_u64(SEED);
    iter::repeat_with(move || {
        let hex = format!("{:032x}", rng.random::<u128>());
        format!(
            "{}-{}-4{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[13..16],
            &hex[16..20],
            &hex[20..]
        )
    })
}

/// One row of the table: the heap a structure holds for the keys it remembers.
struct Row {
    name: &'static str,
    keys: usize,
    bytes: usize,
    target: &'static str,
}

impl Row {
    fn per_key(&self) -> f64 {
        self.bytes as f64 / self.keys as f64
    }
}

/// Pulls `n` items through an operator; every key is distinct, so each is accepted.
fn feed<S: Stream + Unpin>(unique: &mut S, n: usize) {
    assert_eq!(block_on(unique.by_ref().take(n).count()), n);
}

/// Builds an operator over the distinct keys of `source`, feeds it `FED` items, and measures
/// the heap it holds.
fn operator<T, K, I, F>(
    name: &'static str,
    target: &'static str,
    window: Window,
    source: I,
    key_fn: F,
) -> Row
where
    I: Iterator<Item = T>,
    F: FnMut(&T) -> K,
    K: std::hash::Hash + Eq,
{
    let before = heap();
    let mut unique = stream::iter(source).dedup_by_key(key_fn, window);
    feed(&mut unique, FED);
    let bytes = heap() - before;
    let keys = unique.stats().keys() as usize;
    assert_eq!(keys, WINDOW_KEYS);
    assert_eq!(unique.stats().evicted() as usize, FED - WINDOW_KEYS);
    Row {
        name,
        keys,
        bytes,
        target,
    }
}

fn main() {
    let mut rows = Vec::new();

    rows.push(operator(
        "operator, `u64`, ttl",
        "≤ 40",
        Window::max_keys(WINDOW_KEYS).ttl(TTL),
        u64_keys(),
        |k| *k,
    ));

    let before = heap();
    let mut set = Window::max_keys(WINDOW_KEYS).ttl(TTL).build::<u64>();
    for k in u64_keys().take(FED) {
        assert!(set.insert(k));
    }
    rows.push(Row {
        name: "`WindowSet<u64>`, ttl",
        keys: set.len(),
        bytes: heap() - before,
        target: "≤ 40",
    });
    drop(set);

    rows.push(operator(
        "operator, `u64`, no ttl",
        "",
        Window::max_keys(WINDOW_KEYS),
        u64_keys(),
        |k| *k,
    ));
    rows.push(operator(
        "operator, `u64`, ttl + `refresh_on_hit`",
        "",
        Window::max_keys(WINDOW_KEYS).ttl(TTL).refresh_on_hit(true),
        u64_keys(),
        |k| *k,
    ));
    rows.push(operator(
        "operator, UUID `String` (exact), ttl",
        "",
        Window::max_keys(WINDOW_KEYS).ttl(TTL),
        uuid_keys(),
        |s: &String| s.clone(),
    ));
    rows.push(operator(
        "operator, UUID `Fingerprint`, ttl",
        "≤ 1.5× the `u64` row",
        Window::max_keys(WINDOW_KEYS).ttl(TTL),
        uuid_keys(),
        |s| Fingerprint::of(s),
    ));

    // Baselines.
    let before = heap();
    let mut set = hashbrown::HashSet::<u64>::new();
    for k in u64_keys().take(WINDOW_KEYS) {
        assert!(set.insert(k));
    }
    rows.push(Row {
        name: "unbounded `hashbrown::HashSet<u64>` (1M inserts)",
        keys: set.len(),
        bytes: heap() - before,
        target: "the floor",
    });
    drop(set);

    let before = heap();
    let mut cache = lru::LruCache::<u64, ()>::new(NonZeroUsize::new(WINDOW_KEYS).unwrap());
    for k in u64_keys().take(FED) {
        if cache.get(&k).is_none() {
            cache.put(k, ());
        }
    }
    rows.push(Row {
        name: "`lru::LruCache<u64, ()>`",
        keys: cache.len(),
        bytes: heap() - before,
        target: "",
    });
    drop(cache);

    let before = heap();
    let mut set = hashbrown::HashSet::<u64>::new();
    let mut order = VecDeque::new();
    for k in u64_keys().take(FED) {
        if set.insert(k) {
            if order.len() == WINDOW_KEYS {
                set.remove(&order.pop_front().unwrap());
            }
            order.push_back(k);
        }
    }
    rows.push(Row {
        name: "`hashbrown::HashSet<u64>` + `VecDeque` FIFO",
        keys: set.len(),
        bytes: heap() - before,
        target: "",
    });
    drop((set, order));

    let before = heap();
    let mut set = hashbrown::HashSet::<u64>::new();
    let mut order = VecDeque::<(u64, Instant)>::new();
    for k in u64_keys().take(FED) {
        let now = Instant::now();
        if set.insert(k) {
            if order.len() == WINDOW_KEYS {
                set.remove(&order.pop_front().unwrap().0);
            }
            order.push_back((k, now));
        }
    }
    rows.push(Row {
        name: "`hashbrown::HashSet<u64>` + `VecDeque<(u64, Instant)>` FIFO with ttl",
        keys: set.len(),
        bytes: heap() - before,
        target: "",
    });
    drop((set, order));

    println!("Heap held at a full {WINDOW_KEYS}-key window after {FED} distinct keys:\n");
    println!("| structure | keys held | heap bytes | bytes/key | target |");
    println!("|---|---:|---:|---:|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {} |",
            r.name,
            r.keys,
            r.bytes,
            r.per_key(),
            r.target
        );
    }

    // Bounded: the heap of a full window does not grow with the length of the stream.
    let before = heap();
    let mut unique =
        stream::iter(u64_keys()).dedup_by_key(|k| *k, Window::max_keys(WINDOW_KEYS).ttl(TTL));
    feed(&mut unique, 5_000_000);
    let at_5m = heap() - before;
    feed(&mut unique, 5_000_000);
    let at_10m = heap() - before;
    println!(
        "\nBounded: operator `u64` ttl, heap after 5M distinct keys {at_5m} B, after 10M {at_10m} B \
         (grew by {} B)",
        at_10m as i64 - at_5m as i64
    );
    assert_eq!(at_5m, at_10m, "the heap of a full window grew");
}
