//! What keep-alive costs: `claim_by_key` + `commit` on the Redis at `STREAM_DEDUP_REDIS_URL`
//! (skipped with a message when it is unset), with keep-alive on and off, on the same workload.
//!
//! Workload: 100,000 distinct 36-byte keys (UUID-shaped, seeded). A consumer settles up to
//! 4,000 claims at once (what the operator reads ahead: `batch_size` 1,000 × `max_in_flight`
//! 4); each handler holds its claim for `hold` (a `tokio::time::sleep`: a few ms of I/O, or
//! none), then commits. The lease is 1 s (keep-alive renews every open claim's lease every
//! ~333 ms, in one batched store call per round), or 300 ms (a round every 100 ms) as a
//! harsher case. Every iteration runs in a fresh namespace and deletes its keys afterwards,
//! outside the timing.
//!
//! - `keep_alive=off hold=H lease=L`: the plain alternative, the lease alone.
//! - `keep_alive=on hold=H lease=L`: the same with keep-alive.
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

    let mut group = c.benchmark_group("claims");
    group.sample_size(10);
    group.throughput(Throughput::Elements(KEYS as u64));
    let cases = [
        (Duration::ZERO, Duration::from_secs(1)),
        (Duration::from_millis(5), Duration::from_secs(1)),
        (Duration::from_millis(5), Duration::from_millis(300)),
    ];
    for (hold, lease) in cases {
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
                            let ns = namespace();
                            let store = RedisStore::connect(&url, &ns).await.unwrap();
                            let window = Window::max_keys(1_000)
                                .ttl(TTL)
                                .lease(lease)
                                .keep_alive(keep_alive)
                                .store(store)
                                .batch_size(1_000)
                                .max_in_flight(4)
                                .timeout(Duration::from_secs(10));
                            let start = Instant::now();
                            let claims = futures::stream::iter(keys.iter().cloned())
                                .claim_by_key(|k| k.clone(), window);
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
                            total += start.elapsed();
                            assert_eq!(committed, KEYS);
                            if !keep_alive {
                                assert_eq!(stats.renewed(), 0);
                            }
                            renewed.store(stats.renewed(), Ordering::Relaxed);
                            lost.store(stats.leases_lost(), Ordering::Relaxed);
                            clean(&mut raw.clone(), &ns, &keys).await;
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
