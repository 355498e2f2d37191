//! The window sweep, end to end: it finds the window a workload needs, never drops a unique
//! message, and its outputs (CSV, traces) read back.

use std::time::Duration;

use futures::{StreamExt, stream};
use stream_dedup::trace::{TraceStreamExt, TraceWriter};
use stream_dedup::{DedupStreamExt, Fingerprint, Window};
use window_sweep::{
    Delivery, KeyKind, Sweep, SweepError, SweepReport, SyntheticBroker, TraceFormat, Workload,
};

/// 1000 messages/s, evenly spaced; a lost ACK is redelivered exactly 5 s later, once. Between a
/// message and its redelivery come the 5000 messages of those 5 s and at most the redeliveries
/// of the 5000 before: no redelivery is more than 10,000 keys away, and none fewer than 4999
/// (the last 5 s of traffic aside, where fewer new messages arrive).
fn known_broker() -> SyntheticBroker {
    SyntheticBroker::new()
        .rate(1000.0)
        .poisson(false)
        .messages(60_000)
        .lost_ack(0.02)
        .timeouts(0.01)
        .ack_wait(Duration::from_secs(5))
        .jitter(Duration::ZERO)
        .max_deliver(2)
        .seed(7)
}

const BOUND: usize = 10_000;

#[test]
fn zero_leaks_from_the_known_bound_up_and_leaks_well_below() {
    let workload = Workload::synthetic(&known_broker());
    let s = workload.summary();
    assert!(s.redeliveries > 1000, "{s:?}");
    assert!(s.min_max_keys() <= BOUND as u64, "{s:?}");
    assert_eq!(s.max_redelivery_gap, Some(Duration::from_secs(5)));

    let sizes = [500, 1_000, 2_000, BOUND, 20_000, 100_000];
    let report = Sweep::new()
        .max_keys(sizes)
        .ttls([
            None,
            Some(Duration::from_secs(6)),
            Some(Duration::from_secs(600)),
        ])
        .run(&workload);
    assert_eq!(report.cells.len(), sizes.len() * 3);
    for cell in &report.cells {
        assert_eq!(cell.wrongly_dropped, 0, "{cell:?}");
        assert_eq!(cell.redeliveries, s.redeliveries);
        if cell.max_keys >= BOUND {
            assert_eq!(cell.leaked, 0, "{cell:?}");
        } else {
            // Well below the bound (at most 2000 keys for redeliveries ≥ 4999 keys away):
            // everything but the tail leaks.
            assert!(cell.leaked_pct() > 90.0, "{cell:?}");
        }
        if cell.ttl.is_none() {
            assert_eq!(cell.leaked, workload.leaks_without_ttl(cell.max_keys));
        }
    }
    let pick = report.recommend(0.01).unwrap();
    assert_eq!(pick.max_keys, BOUND);
    // With a ttl of 6 s the window holds ~6000 keys instead of 10,000.
    assert_eq!(pick.ttl, Some(Duration::from_secs(6)));
    assert!(pick.peak_keys < 6_500, "{pick:?}");
}

#[test]
fn a_ttl_shorter_than_the_redelivery_gap_leaks_every_redelivery() {
    let workload = Workload::synthetic(&known_broker().messages(20_000));
    let report = Sweep::new()
        .max_keys([100_000])
        .ttls([
            Some(Duration::from_millis(4_999)),
            Some(Duration::from_millis(5_000)),
            Some(Duration::from_millis(5_001)),
        ])
        .run(&workload);
    let leaked: Vec<u64> = report.cells.iter().map(|c| c.leaked).collect();
    let all = workload.summary().redeliveries;
    // A key is forgotten when `ttl` has passed since it was accepted: at exactly 5 s, it is gone.
    assert_eq!(leaked, [all, all, 0]);
}

#[test]
fn every_key_kind_gives_the_same_answer() {
    let workload = Workload::synthetic(&known_broker().messages(20_000));
    let run = |kind| {
        Sweep::new()
            .max_keys([1_000, BOUND])
            .ttls([None, Some(Duration::from_secs(30))])
            .key_kind(kind)
            .throughput(false)
            .run(&workload)
    };
    let u64s = run(KeyKind::U64);
    for kind in [KeyKind::Fingerprint, KeyKind::String] {
        let other = run(kind);
        for (a, b) in u64s.cells.iter().zip(&other.cells) {
            assert_eq!(
                (a.leaked, a.wrongly_dropped, a.evicted),
                (b.leaked, b.wrongly_dropped, b.evicted)
            );
        }
    }
    let fp = run(KeyKind::Fingerprint);
    assert!(fp.fingerprint_collision_bound().unwrap() < 1e-29);
    assert!(u64s.fingerprint_collision_bound().is_none());
}

#[test]
fn the_csv_parses_back() {
    let workload = Workload::synthetic(&known_broker().messages(10_000));
    let report = Sweep::new()
        .max_keys([1_000, 3_000, BOUND])
        .ttls([None, Some(Duration::from_secs(30))])
        .refresh_on_hit(true)
        .run(&workload);
    let mut csv = Vec::new();
    report.write_csv(&mut csv).unwrap();
    let rows = SweepReport::read_csv(&csv[..]).unwrap();
    assert_eq!(rows.len(), report.cells.len());
    for (row, cell) in rows.iter().zip(&report.cells) {
        // Everything but the replay's wall time, which the CSV does not keep.
        let mut cell = cell.clone();
        cell.replay_secs = 0.0;
        assert_eq!(row, &cell);
    }
    // The table and the plot are drawn from the same cells.
    assert_eq!(report.table(0.01).lines().count(), 2 + rows.len());
    let svg = report.svg(0.01).unwrap();
    assert!(svg.contains("ttl 30s (refresh)"));
}

#[test]
fn a_malformed_trace_line_is_an_error_naming_the_line() {
    let csv = "elapsed_ms,key\n0,a\n12,b\n\n12.5.1,c\n";
    let err = Workload::from_trace(csv.as_bytes(), TraceFormat::Auto).unwrap_err();
    assert!(matches!(err, SweepError::Parse { line: 5, .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "line 5: the timestamp `12.5.1` is not a number of milliseconds"
    );

    let jsonl = "{\"timestamp\": 0, \"key\": \"a\"}\n{\"timestamp\": 1, \"key\": \"b\"\n";
    let err = Workload::from_trace(jsonl.as_bytes(), TraceFormat::JsonLines).unwrap_err();
    assert_eq!(err.line(), Some(2));
    assert!(err.to_string().starts_with("line 2: invalid JSON"), "{err}");

    let dir = std::env::temp_dir().join(format!("stream-dedup-sweep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trace.jsonl");
    std::fs::write(&path, "{\"timestamp\": 0, \"key\": \"a\"}\nnot json\n").unwrap();
    let err = Workload::from_trace_file(&path, TraceFormat::Auto).unwrap_err();
    assert_eq!(err.line(), Some(2), "{err}");
    let missing = Workload::from_trace_file(dir.join("nope.csv"), TraceFormat::Auto).unwrap_err();
    assert!(matches!(missing, SweepError::Read { line: 1, .. }));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A trace recorded with `record_trace` from a stream on a paused clock replays to the same
/// answer as the deliveries themselves, with keys plain or hashed.
#[test]
fn a_recorded_trace_replays_like_the_live_stream() {
    let workload = Workload::synthetic(&known_broker().messages(8_000));
    let deliveries: Vec<Delivery> = workload.deliveries().to_vec();
    for hashed in [false, true] {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let (passed, writer) = runtime.block_on(async {
            let start = tokio::time::Instant::now();
            let live = stream::iter(deliveries.clone()).then(|d| async move {
                tokio::time::sleep_until(start + Duration::from_millis(d.at_ms)).await;
                d
            });
            let recorded = live.boxed().record_trace(
                |d| format!("order-{}/payment", d.message),
                TraceWriter::new(Vec::new()).hashed(hashed),
            );
            // The live consumer dedups after recording, as it would in production.
            let mut unique = recorded.dedup_by_key(|d| d.message, Window::max_keys(BOUND));
            let mut passed = 0;
            while unique.next().await.is_some() {
                passed += 1;
            }
            (passed, unique.into_inner().into_parts().1)
        });
        assert_eq!(passed, 8_000);
        assert_eq!(writer.lines(), deliveries.len() as u64);
        let csv = writer.finish().unwrap();
        let text = std::str::from_utf8(&csv).unwrap();
        let first = text.lines().nth(1).unwrap();
        if hashed {
            assert_eq!(first, format!("0,{}", Fingerprint::of("order-0/payment")));
        } else {
            assert_eq!(first, "0,order-0/payment");
        }

        let replayed = Workload::from_trace(&csv[..], TraceFormat::Csv).unwrap();
        assert_eq!(replayed.summary(), workload.summary());
        let times: Vec<u64> = replayed.deliveries().iter().map(|d| d.at_ms).collect();
        let want: Vec<u64> = deliveries
            .iter()
            .map(|d| d.at_ms - deliveries[0].at_ms)
            .collect();
        assert_eq!(times, want);
        let sweep = || {
            Sweep::new()
                .max_keys([1_000, BOUND])
                .ttls([None])
                .throughput(false)
        };
        let a = sweep().run(&workload);
        let b = sweep().key_kind(KeyKind::String).run(&replayed);
        let leaks = |r: &SweepReport| r.cells.iter().map(|c| c.leaked).collect::<Vec<_>>();
        assert_eq!(leaks(&a), leaks(&b));
        assert!(leaks(&a)[0] > 0);
        // The live operator dropped every redelivery with the window the sweep says suffices.
        assert_eq!(leaks(&a)[1], 0);
    }
}

/// From async code the sweep runs in `spawn_blocking`.
#[tokio::test]
async fn runs_from_async_code_in_spawn_blocking() {
    let workload = Workload::synthetic(&known_broker().messages(5_000));
    let sweep = Sweep::new().max_keys([BOUND]).ttls([None]).heap_bytes(|| 0);
    let report = tokio::task::spawn_blocking(move || sweep.run(&workload))
        .await
        .unwrap();
    assert_eq!(report.cells[0].leaked, 0);
}
