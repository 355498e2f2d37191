//! Counters through the `metrics` facade, seen by metrics-util's debugging recorder.

use std::time::Duration;

use futures::{StreamExt, stream};
use metrics::with_local_recorder;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use stream_dedup::{DedupStreamExt, Window, stats};

#[tokio::test(start_paused = true)]
async fn counters_reach_the_recorder_with_the_window_label() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let window = Window::max_keys(2)
        .ttl(Duration::from_secs(5))
        .name("orders");
    // Handles are registered when the operator is built: inside the recorder's scope.
    let unique = with_local_recorder(&recorder, || {
        stream::iter([1, 2, 1, 3, 1, 4])
            .then(|k| async move {
                if k == 4 {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                }
                k
            })
            .dedup_by_key(|k| *k, window)
    });
    let out: Vec<u32> = unique.collect().await;
    assert_eq!(out, [1, 2, 3, 4]);

    let mut seen = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let labels: Vec<_> = key
            .key()
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        assert_eq!(
            labels,
            [(stats::WINDOW_LABEL.to_owned(), "orders".to_owned())]
        );
        seen.insert(key.key().name().to_owned(), value);
    }
    assert_eq!(seen[stats::ACCEPTED_TOTAL], DebugValue::Counter(4));
    assert_eq!(seen[stats::DUPLICATES_TOTAL], DebugValue::Counter(2));
    assert_eq!(seen[stats::EVICTED_TOTAL], DebugValue::Counter(1));
    assert_eq!(seen[stats::EXPIRED_TOTAL], DebugValue::Counter(2));
    assert_eq!(seen[stats::KEYS], DebugValue::Gauge(1.0.into()));
}
