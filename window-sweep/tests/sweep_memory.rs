//! The sweep's heap measurement, with a counting allocator (alone in its test binary: the
//! count is process-wide, so no other test may allocate beside it).

use std::alloc::System;
use std::time::Duration;

use cap::Cap;
use window_sweep::{KeyKind, Sweep, SyntheticBroker, Workload};

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

#[test]
fn heap_bytes_grow_with_the_window_and_match_the_layout() {
    let workload = Workload::synthetic(
        &SyntheticBroker::new()
            .messages(200_000)
            .rate(5000.0)
            .ack_wait(Duration::from_secs(2)),
    );
    let sweep = |kind| {
        Sweep::new()
            .max_keys([1, 1_000, 10_000, 100_000])
            .ttls([None, Some(Duration::from_secs(3600))])
            .key_kind(kind)
            .throughput(false)
            .heap_bytes(|| ALLOC.allocated())
            .run(&workload)
    };
    let u64s = sweep(KeyKind::U64);
    for c in &u64s.cells {
        let bytes = c.heap_bytes.unwrap();
        if c.max_keys == 1 {
            // An empty-ish window: its counters and a few small vectors.
            assert!(bytes < 1024, "{c:?}");
            continue;
        }
        let per_key = c.bytes_per_key().unwrap();
        // u64 key 8 + recency links 8 + table ~5-10; with a ttl, +4 stamp +8 arrival links.
        let (lo, hi) = if c.ttl.is_none() {
            (16.0, 40.0)
        } else {
            (28.0, 56.0)
        };
        assert!((lo..hi).contains(&per_key), "{per_key} B/key: {c:?}");
    }
    let strings = sweep(KeyKind::String);
    for (u, s) in u64s
        .cells
        .iter()
        .zip(&strings.cells)
        .filter(|(u, _)| u.max_keys >= 1000)
    {
        // A 36-byte UUID `String` adds its 24-byte header (less the u64) and a 36-byte
        // allocation (rounded up by the allocator, not here: `Cap` counts what was asked).
        let extra = s.bytes_per_key().unwrap() - u.bytes_per_key().unwrap();
        assert!((40.0..70.0).contains(&extra), "{extra}: {u:?} {s:?}");
    }
}
