//! The operator against a plain reference model, on random keys, capacities, ttls and gaps
//! (paused tokio time).

use std::time::Duration;

use futures::{StreamExt, stream};
use proptest::prelude::*;
use stream_dedup::{DedupStreamExt, StatsSnapshot, TryDedupStreamExt, Window};

/// The specification, written as plainly as possible: a `Vec` of entries, scanned linearly.
struct Model {
    cap: usize,
    ttl: Option<u64>,
    refresh: bool,
    /// (key, stamp in ms, last seen sequence number)
    entries: Vec<(u8, u64, u64)>,
    seq: u64,
    stats: StatsSnapshot,
}

impl Model {
    fn new(cap: usize, ttl: Option<u64>, refresh: bool) -> Self {
        Model {
            cap,
            ttl,
            refresh,
            entries: Vec::new(),
            seq: 0,
            stats: StatsSnapshot::default(),
        }
    }

    /// Returns whether the item with `key`, arriving at `now` ms, is accepted.
    fn observe(&mut self, key: u8, now: u64) -> bool {
        self.seq += 1;
        if let Some(ttl) = self.ttl {
            let before = self.entries.len();
            self.entries.retain(|&(_, stamp, _)| now - stamp < ttl);
            self.stats.expired += (before - self.entries.len()) as u64;
        }
        let accepted = if let Some(e) = self.entries.iter_mut().find(|e| e.0 == key) {
            e.2 = self.seq;
            if self.refresh {
                e.1 = now;
            }
            self.stats.duplicates += 1;
            false
        } else {
            if self.entries.len() == self.cap {
                let lru = (0..self.entries.len())
                    .min_by_key(|&i| self.entries[i].2)
                    .unwrap();
                self.entries.remove(lru);
                self.stats.evicted += 1;
            }
            self.entries.push((key, now, self.seq));
            self.stats.accepted += 1;
            true
        };
        self.stats.keys = self.entries.len() as u64;
        accepted
    }
}

fn window(cap: usize, ttl: Option<u64>, refresh: bool) -> Window {
    let mut w = Window::max_keys(cap).refresh_on_hit(refresh);
    if let Some(ttl) = ttl {
        w = w.ttl(Duration::from_millis(ttl));
    }
    w
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// (gap before the item in ms, key): small key spaces so that repeats, evictions and expiries
/// all happen often.
fn events() -> impl Strategy<Value = Vec<(u64, u8)>> {
    prop::collection::vec(
        (prop_oneof![3 => Just(0u64), 2 => 0u64..40], 0u8..24),
        0..200,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn operator_matches_model(
        events in events(),
        cap in 1usize..16,
        ttl in prop::option::of(1u64..100),
        refresh in any::<bool>(),
    ) {
        let mut model = Model::new(cap, ttl, refresh);
        let mut now = 0;
        let expected: Vec<(usize, u8)> = events
            .iter()
            .enumerate()
            .filter(|&(_, &(gap, key))| {
                now += gap;
                model.observe(key, now)
            })
            .map(|(i, &(_, key))| (i, key))
            .collect();

        let (got, dropped, stats) = paused_runtime().block_on(async {
            let input = stream::iter(events.clone().into_iter().enumerate()).then(|(i, (gap, key))| async move {
                if gap > 0 {
                    tokio::time::sleep(Duration::from_millis(gap)).await;
                }
                (i, key)
            });
            let mut dropped = Vec::new();
            let unique = input
                .dedup_by_key(|&(_, key)| key, window(cap, ttl, refresh))
                .on_duplicate(|(i, _)| dropped.push(i));
            let stats = unique.stats();
            let got: Vec<(usize, u8)> = unique.collect().await;
            (got, dropped, stats.snapshot())
        });

        prop_assert_eq!(&got, &expected);
        // Every item is either emitted or handed to on_duplicate, in order: nothing is lost.
        let mut all: Vec<usize> = got.iter().map(|&(i, _)| i).chain(dropped.iter().copied()).collect();
        prop_assert!(dropped.windows(2).all(|w| w[0] < w[1]));
        all.sort_unstable();
        prop_assert_eq!(all, (0..events.len()).collect::<Vec<_>>());
        prop_assert_eq!(stats, model.stats);
    }

    /// The try variant: `Err` items pass in place and do not touch the window.
    #[test]
    fn try_operator_matches_model(
        events in prop::collection::vec((any::<bool>(), 0u8..12), 0..150),
        cap in 1usize..10,
    ) {
        let mut model = Model::new(cap, None, false);
        let expected: Vec<Result<u8, u8>> = events
            .iter()
            .filter(|&&(ok, key)| !ok || model.observe(key, 0))
            .map(|&(ok, key)| if ok { Ok(key) } else { Err(key) })
            .collect();
        let input = events.iter().map(|&(ok, key)| if ok { Ok(key) } else { Err(key) });
        let got: Vec<Result<u8, u8>> = futures::executor::block_on(
            stream::iter(input).try_dedup_by_key(|k| *k, Window::max_keys(cap)).collect(),
        );
        prop_assert_eq!(got, expected);
    }
}
