//! `RedisStore::insert` against the plain alternatives, on the Redis at
//! `STREAM_DEDUP_REDIS_URL` (skipped with a message when it is unset).
//!
//! Workload: 200,000 36-byte keys (UUID-shaped, seeded), 10% of them repeats of a key seen
//! 1,000–11,000 items earlier (a redelivery, never in the same batch). Every iteration runs in
//! a fresh namespace and deletes its keys afterwards, outside the timing.
//!
//! - `store batch=N in_flight=M`: `RedisStore::insert` in batches of N, M batches at a time.
//! - `plain pipeline batch=1000`: redis-rs pipelines of `SET key 1 NX PX ttl` (no token, no
//!   answer per key beyond OK/nil): what the store adds to a bare pipeline.
//! - `plain SET NX PX per key`: one awaited command per key, what a consumer writes without
//!   batching (on the first 20,000 keys: it is slow).
//!
//! The runtime is tokio's multi-threaded one (as `#[tokio::main]` makes), or the
//! single-threaded one with `STREAM_DEDUP_BENCH_RUNTIME=current_thread`.
//!
//! Compare with Redis's own ceiling on the same server, right after:
//! `redis-benchmark -p PORT -n 200000 -r 100000000 -c 50 -P 16 SET key:__rand_int__ 1 NX PX 300000`.
//!
//! # Measured (2 shared cores; Redis 7.0.15 on loopback)
//!
//! 2026-11-29, multi-threaded runtime, three rounds of `cargo bench --features redis --bench
//! redis -- 'store batch=1000 in_flight=4|store batch=100 in_flight=16|per key|operator'`,
//! each followed by the `redis-benchmark` command above; keys/s (criterion medians):
//!
//! | round | store 1000×4 | store 100×16 | per key | redis-benchmark | dedup_by_key | claim_by_key + commit |
//! |---|---|---|---|---|---|---|
//! | 1 | 355k | 376k | 13.0k | 376k | 300k | 134k |
//! | 2 | 297k | 312k | 13.3k | 335k | 269k | 117k |
//! | 3 | 347k | 339k | 13.9k | 360k | 269k | 111k |
//! | 4 | 310k | 307k | | 269k | | |
//! | 5 | 270k | 276k | | 240k | | |
//!
//! (rounds 4 and 5: `-- 'store batch'` only). Store over `redis-benchmark`: 89–115%; batched over per key: 23–29×; claims over
//! `dedup_by_key`: 41–45%. Redis's own accounting (`INFO commandstats`, `INFO cpu`) during the
//! operators: `dedup_by_key` costs Redis ~2.5–5 µs of CPU per key, `claim_by_key` + `commit`
//! ~7–10 µs (the claim's `SET NX` as much as an insert, plus the commit script's `SET …
//! GET` per key at ~3.4 µs inside Lua against ~1.3 µs for the same command sent plainly), and
//! the consumer side ~2.3–3.4 µs against ~5–9 µs; client and server share the two cores.
//!
//! Later on 2026-11-29 (a new VM; the commit script answers only refused keys), `-- operator`,
//! claims of `dedup_by_key`: 203k of 487k (42%), 211k of 443k (48%), 217k of 413k (53%), 161k
//! of 385k (42%), 154k of 377k (41%); the same day before that change 170k of 345k (49%), 154k
//! of 330k (47%), 177k of 419k (42%). The two benches run one after the other, and the
//! machine's speed drifts between them: run in the other order the claims bench gave 204k and
//! `dedup_by_key` 483k; alone, the claims bench gave 231k. On the final code (a claim takes its
//! key from the request instead of a clone): 184k of 463k (40%), 180k of 346k (52%), 165k of
//! 286k (58%); after the review's fixes 168k of 404k (42%), 160k of 403k (40%).
//!
//! On a later VM of 2026-11-29 (every figure ~2× slower), before commits kept the key's expiry:
//! 96k of 194k (49%); after it (`SET … GET KEEPTTL`), 111k of 208k (53%) and 103k of 206k
//! (50%); with a claim keeping its store bytes, 126k of 265k (47%) and 132k of 246k (54%);
//! with the committer no longer taking the operator's lock as well, 130k of 274k (47%), 128k
//! of 246k (52%), 133k of 277k (48%); after the review's fixes 120k of 248k (48%), 129k of
//! 234k (55%), 124k of 263k (47%), 133k of 281k (47%); with the smaller commit future, 128k of
//! 264k (49%), 129k of 263k (49%), 127k of 257k (50%).
//!
//! On a still later VM of 2026-11-29 (AMD EPYC, ~4× faster): claims of `dedup_by_key` 459k of
//! 884k (52%), 440k of 782k (56%), 451k of 854k (53%), 482k of 713k (68%); after the operator
//! stopped polling its store calls on every poll (a consumer's `buffer_unordered` polled each
//! claim call ~1.8 times per key), 448k of 805k (56%), 433k of 787k (55%), 444k of 779k (57%),
//! and in a full run 453k of 831k (54%), the store at 798k (1,000 × 4) and 842k (100 × 16)
//! against 755k for `redis-benchmark`, 17.2k per key; on the single-threaded runtime 457k of
//! 823k (56%) and 448k of 775k (58%). Interleaved runs of the binaries before and after that
//! change: 55.7%, 52.3%, 55.4% before, 53.2%, 52.6%, 51.5% after (Redis saturates first).
//!
//! 2026-11-28 (before the commit script's single `SET` per key and the committer's batched
//! bookkeeping): store 319–371k, redis-benchmark 265–539k (69%, 108%, 132%), operators
//! `dedup_by_key` 306–405k, claims 110–154k (31–50%).
//!
//! Earlier (before the SET commands were sized up front): store 271–461k, per key 27–42k,
//! redis-benchmark 222–362k on the multi-threaded runtime; 46–74k per key on the
//! single-threaded one, where no wake-up crosses threads.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use stream_dedup::DedupStreamExt;
use stream_dedup::store::{InsertBatch, Inserted, RedisStore, Store};

const KEYS: usize = 200_000;
const PER_KEY: usize = 20_000;
const TTL: Duration = Duration::from_secs(300);
/// Claims a consumer settles at once in the claims bench: what the operator reads ahead
/// (`batch_size` 1,000 × `max_in_flight` 4), as a consumer with that many messages unacked.
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

/// The workload: 36-byte keys, 10% repeats from 1,000–11,000 items back.
fn workload() -> Vec<Vec<u8>> {
    let mut rng = Rng(0x5eed);
    let mut keys: Vec<Vec<u8>> = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
        if i >= 11_000 && rng.next() % 10 == 0 {
            let back = 1_000 + usize::try_from(rng.next() % 10_000).unwrap();
            keys.push(keys[i - back].clone());
        } else {
            let (a, b) = (rng.next(), rng.next());
            let key = format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                a >> 32,
                (a >> 16) & 0xffff,
                a & 0xffff,
                b >> 48,
                b & 0xffff_ffff_ffff
            );
            keys.push(key.into_bytes());
        }
    }
    assert!(keys.iter().all(|k| k.len() == 36));
    keys
}

fn namespace() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "bench-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes `keys` under `namespace` (outside the timing).
async fn clean(conn: &mut MultiplexedConnection, namespace: &str, keys: &[Vec<u8>]) {
    for chunk in keys.chunks(1_000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            let mut full = format!("{namespace}:").into_bytes();
            full.extend_from_slice(key);
            pipe.cmd("UNLINK").arg(full).ignore();
        }
        pipe.exec_async(conn).await.expect("clean up");
    }
}

fn bench(c: &mut Criterion) {
    let Ok(url) = std::env::var("STREAM_DEDUP_REDIS_URL") else {
        eprintln!("skipped: the Redis benches (STREAM_DEDUP_REDIS_URL is not set)");
        return;
    };
    // The runtime a consumer gets from `#[tokio::main]`; `STREAM_DEDUP_BENCH_RUNTIME=
    // current_thread` for the single-threaded one (faster for one awaited command per key:
    // no wake-up crosses threads).
    let current_thread =
        std::env::var("STREAM_DEDUP_BENCH_RUNTIME").as_deref() == Ok("current_thread");
    let rt = if current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()
    .unwrap();
    eprintln!(
        "runtime: {}",
        if current_thread {
            "current_thread"
        } else {
            "multi_thread"
        }
    );
    let keys = workload();
    let unique = {
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        sorted.len()
    };
    let client = redis::Client::open(url.as_str()).unwrap();
    let raw = rt
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();

    let mut group = c.benchmark_group("redis");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));

    group.throughput(Throughput::Elements(KEYS as u64));
    for (batch, in_flight) in [(1_000, 1), (100, 1), (1_000, 4), (100, 16)] {
        let name = format!("store batch={batch} in_flight={in_flight}");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let ns = namespace();
                        let store = RedisStore::builder(&ns)
                            .timeout(Duration::from_secs(10))
                            .connect(&url)
                            .await
                            .unwrap();
                        let start = Instant::now();
                        let new = futures::stream::iter(keys.chunks(batch))
                            .map(|chunk| store.insert(InsertBatch::new(chunk.to_vec(), TTL)))
                            .buffered(in_flight)
                            .fold(0, |new, answers| async move {
                                let answers = answers.expect("insert");
                                new + answers.iter().filter(|&&a| a == Inserted::New).count()
                            })
                            .await;
                        total += start.elapsed();
                        assert_eq!(new, unique, "every distinct key is new exactly once");
                        clean(&mut raw.clone(), &ns, &keys).await;
                    }
                    total
                })
            });
        });
    }

    group.bench_function("plain pipeline batch=1000", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let ns = namespace();
                    let mut conn = raw.clone();
                    let start = Instant::now();
                    for chunk in keys.chunks(1_000) {
                        let mut pipe = redis::pipe();
                        for key in chunk {
                            let mut full = format!("{ns}:").into_bytes();
                            full.extend_from_slice(key);
                            pipe.cmd("SET")
                                .arg(full)
                                .arg(1)
                                .arg("NX")
                                .arg("PX")
                                .arg(300_000);
                        }
                        let replies: Vec<Option<String>> =
                            pipe.query_async(&mut conn).await.unwrap();
                        black_box(replies);
                    }
                    total += start.elapsed();
                    clean(&mut conn, &ns, &keys).await;
                }
                total
            })
        });
    });

    // The operators, as a consumer uses them: the in-memory window in front (small, so the
    // store decides), ready items batched, calls in flight, items in order.
    let strings: Vec<String> = keys
        .iter()
        .map(|k| String::from_utf8(k.clone()).expect("UUID text"))
        .collect();
    let operator_window = |store: RedisStore| {
        stream_dedup::Window::max_keys(1_000)
            .ttl(TTL)
            .store(store)
            .batch_size(1_000)
            .max_in_flight(4)
            .timeout(Duration::from_secs(10))
    };
    group.bench_function("operator dedup_by_key", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let ns = namespace();
                    let store = RedisStore::connect(&url, &ns).await.unwrap();
                    let start = Instant::now();
                    let accepted = futures::stream::iter(strings.iter().cloned())
                        .dedup_by_key(|k| k.clone(), operator_window(store))
                        .count()
                        .await;
                    total += start.elapsed();
                    assert_eq!(accepted, unique);
                    clean(&mut raw.clone(), &ns, &keys).await;
                }
                total
            })
        });
    });
    // Claims: each item is claimed (in batches), handed out, and committed (commits batched in
    // the background); the consumer settles up to `CONCURRENCY` claims at a time, as a consumer that
    // processes messages concurrently does.
    group.bench_function("operator claim_by_key + commit", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let ns = namespace();
                    let store = RedisStore::connect(&url, &ns).await.unwrap();
                    let start = Instant::now();
                    let committed = futures::stream::iter(strings.iter().cloned())
                        .claim_by_key(|k| k.clone(), operator_window(store))
                        .map(|claim| async move { claim.commit().await.expect("commit") })
                        .buffer_unordered(CONCURRENCY)
                        .count()
                        .await;
                    total += start.elapsed();
                    assert_eq!(committed, unique);
                    clean(&mut raw.clone(), &ns, &keys).await;
                }
                total
            })
        });
    });

    group.throughput(Throughput::Elements(PER_KEY as u64));
    group.bench_function("plain SET NX PX per key", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let ns = namespace();
                    let mut conn = raw.clone();
                    let start = Instant::now();
                    for key in &keys[..PER_KEY] {
                        let mut full = format!("{ns}:").into_bytes();
                        full.extend_from_slice(key);
                        let reply: Option<String> = redis::cmd("SET")
                            .arg(full)
                            .arg(1)
                            .arg("NX")
                            .arg("PX")
                            .arg(300_000)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        black_box(reply);
                    }
                    total += start.elapsed();
                    clean(&mut conn, &ns, &keys[..PER_KEY]).await;
                }
                total
            })
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
