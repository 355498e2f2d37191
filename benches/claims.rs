//! What keep-alive costs: `claim_by_key` + `commit` on the Redis at `STREAM_DEDUP_REDIS_URL`
//! (skipped with a message when it is unset), with keep-alive on and off, on the same workload.
//!
//! Workload: 100,000 distinct 36-byte keys (UUID-shaped, seeded). A consumer settles up to
//! 4,000 claims at once (what the operator reads ahead: `batch_size` 1,000 × `max_in_flight`
//! 4); each handler holds its claim for `hold` (a `tokio::time::sleep`: a few ms of I/O, or
//! none), then commits. The lease is 1 s (keep-alive makes a round every ~333 ms and renews
//! the claims due then: those held, since their claim or last renewal, for a quarter of the
//! lease), or 300 ms (a round every 100 ms) as a harsher case. With handlers of 5 ms no claim
//! is due (it is committed long before a quarter of its lease), so the last case holds each
//! claim 50 ms with a 150 ms lease: every claim is renewed, about once, and the ratio is what
//! the renewals that are needed cost. Every iteration runs in a fresh namespace and deletes
//! its keys afterwards, outside the timing.
//!
//! - `keep_alive=off hold=H lease=L`: the plain alternative, the lease alone.
//! - `keep_alive=on hold=H lease=L`: the same with keep-alive.
//!
//! Criterion measures each function on its own, one after the other, and the machine drifts
//! between them (other builds on a shared VM moved one function by 1.8× between two runs). So
//! the bench first measures each case **interleaved**: off, on, off, on, … on the same workload
//! (`STREAM_DEDUP_BENCH_PAIRS` pairs, 8 by default, after one pair of warm-up; `0` skips it),
//! and prints the median of each side and their ratio (on / off, in keys/s), the median of
//! the pairs' ratios (each pair run back to back: the least touched by drift) with the lowest
//! and highest (the noise), and the leases renewed per iteration, so that a keep-alive that
//! got cheaper by renewing nothing shows.
//!
//! ```text
//! STREAM_DEDUP_REDIS_URL=redis://127.0.0.1:6379 cargo bench --features redis --bench claims
//! ```
//!
//! Figures: PERF.md, "Keep-alive".

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use stream_dedup::store::RedisStore;
use stream_dedup::{DedupStreamExt, Window};

const KEYS: usize = 100_000;
const TTL: Duration = Duration::from_secs(300);
/// Claims a consumer settles at once.
const CONCURRENCY: usize = 4_000;

/// splitmix64: a seeded, dependency-free generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `KEYS` distinct UUID-shaped keys.
fn workload() -> Vec<String> {
    let mut rng = Rng(0x5eed_0014);
    let keys: Vec<String> = (0..KEYS)
        .map(|_| {
            let (a, b) = (rng.next(), rng.next());
            format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                a >> 32,
                (a >> 16) & 0xffff,
                a & 0xffff,
                b >> 48,
                b & 0xffff_ffff_ffff
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), KEYS, "distinct keys");
    keys
}

fn namespace() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "bench-claims-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes `keys` under `namespace` (outside the timing).
async fn clean(conn: &mut MultiplexedConnection, namespace: &str, keys: &[String]) {
    for chunk in keys.chunks(1_000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("UNLINK")
                .arg(format!("{namespace}:{key}"))
                .ignore();
        }
        pipe.exec_async(conn).await.expect("clean up");
    }
}

/// The cases: (hold, lease). The last holds every claim past a quarter of its lease, so that
/// keep-alive renews each (about once): what the renewals that are needed cost.
const CASES: [(Duration, Duration); 4] = [
    (Duration::ZERO, Duration::from_secs(1)),
    (Duration::from_millis(5), Duration::from_secs(1)),
    (Duration::from_millis(5), Duration::from_millis(300)),
    (Duration::from_millis(50), Duration::from_millis(150)),
];

/// What one iteration took, and what keep-alive did in it.
struct Run {
    elapsed: Duration,
    renewed: u64,
    lost: u64,
}

/// One iteration: every key claimed, held for `hold`, committed; in a fresh namespace, whose
/// keys are deleted afterwards (outside the timing).
async fn run_once(
    url: &str,
    keys: &[String],
    raw: &MultiplexedConnection,
    hold: Duration,
    lease: Duration,
    keep_alive: bool,
) -> Run {
    let ns = namespace();
    let store = RedisStore::connect(url, &ns).await.unwrap();
    let window = Window::max_keys(1_000)
        .ttl(TTL)
        .lease(lease)
        .keep_alive(keep_alive)
        .store(store)
        .batch_size(1_000)
        .max_in_flight(4)
        .timeout(Duration::from_secs(10));
    let start = Instant::now();
    let claims = futures::stream::iter(keys.iter().cloned()).claim_by_key(|k| k.clone(), window);
    let stats = claims.stats();
    let committed = claims
        .map(|claim| async move {
            if !hold.is_zero() {
                tokio::time::sleep(hold).await;
            }
            claim.commit().await.expect("commit")
        })
        .buffer_unordered(CONCURRENCY)
        .count()
        .await;
    let elapsed = start.elapsed();
    assert_eq!(committed, KEYS);
    if !keep_alive {
        assert_eq!(stats.renewed(), 0);
    }
    clean(&mut raw.clone(), &ns, keys).await;
    Run {
        elapsed,
        renewed: stats.renewed(),
        lost: stats.leases_lost(),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Each case off and on in turn, `pairs` times after a warm-up pair: medians, ratio, renewals.
fn interleaved(
    rt: &tokio::runtime::Runtime,
    url: &str,
    keys: &[String],
    raw: &MultiplexedConnection,
) {
    let pairs: usize = std::env::var("STREAM_DEDUP_BENCH_PAIRS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8);
    if pairs == 0 {
        return;
    }
    eprintln!("claims, interleaved (off, on, off, on, …), {pairs} pairs per case:");
    eprintln!(
        "| case | off | on | on / off | pairs' on / off: median, lowest–highest | renewed per iteration (on) | lost |"
    );
    eprintln!("|---|---:|---:|---:|---:|---:|---:|");
    for (hold, lease) in CASES {
        let (mut off, mut on, mut renewed, mut lost) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for pair in 0..=pairs {
            let a = rt.block_on(run_once(url, keys, raw, hold, lease, false));
            let b = rt.block_on(run_once(url, keys, raw, hold, lease, true));
            if pair == 0 {
                continue; // warm-up
            }
            off.push(KEYS as f64 / a.elapsed.as_secs_f64());
            on.push(KEYS as f64 / b.elapsed.as_secs_f64());
            renewed.push(b.renewed as f64);
            lost += b.lost;
        }
        let ratios: Vec<f64> = off.iter().zip(&on).map(|(a, b)| b / a).collect();
        let (off, on) = (median(off), median(on));
        eprintln!(
            "| hold {hold:?}, lease {lease:?} | {:.1}k/s | {:.1}k/s | {:.0}% | {:.0}%, {:.0}–{:.0}% | {:.0} (median; {:.0}–{:.0}) | {lost} |",
            off / 1e3,
            on / 1e3,
            100.0 * on / off,
            100.0 * median(ratios.clone()),
            100.0 * ratios.iter().copied().fold(f64::INFINITY, f64::min),
            100.0 * ratios.iter().copied().fold(0.0, f64::max),
            median(renewed.clone()),
            renewed.iter().copied().fold(f64::INFINITY, f64::min),
            renewed.iter().copied().fold(0.0, f64::max),
        );
    }
}

fn bench(c: &mut Criterion) {
    let Ok(url) = std::env::var("STREAM_DEDUP_REDIS_URL") else {
        eprintln!("skipped: the claims benches (STREAM_DEDUP_REDIS_URL is not set)");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = workload();
    let client = redis::Client::open(url.as_str()).unwrap();
    let raw = rt
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();

    interleaved(&rt, &url, &keys, &raw);

    let mut group = c.benchmark_group("claims");
    group.sample_size(10);
    group.throughput(Throughput::Elements(KEYS as u64));
    for (hold, lease) in CASES {
        // Off and on one after the other, so that the machine's drift touches both alike.
        for keep_alive in [false, true] {
            let name = format!(
                "keep_alive={} hold={hold:?} lease={lease:?}",
                if keep_alive { "on" } else { "off" }
            );
            let (renewed, lost) = (AtomicU64::new(0), AtomicU64::new(0));
            group.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let run = run_once(&url, &keys, &raw, hold, lease, keep_alive).await;
                            total += run.elapsed;
                            renewed.store(run.renewed, Ordering::Relaxed);
                            lost.store(run.lost, Ordering::Relaxed);
                        }
                        total
                    })
                });
            });
            eprintln!(
                "{name}: {} leases renewed, {} counted lost in the last iteration",
                renewed.load(Ordering::Relaxed),
                lost.load(Ordering::Relaxed)
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
