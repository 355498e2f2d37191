//! `EmbeddedStore::insert` against the plain alternatives on the same database (fjall), every
//! one with a durable commit (`fsync`) before it answers.
//!
//! Workload: 200,000 36-byte keys (UUID-shaped, seeded), 10% of them repeats of a key seen
//! 1,000–11,000 items earlier (a redelivery, never in the same batch); ttl 300 s. Every
//! iteration runs on a new store in a new temporary directory (`TMPDIR`; it must be on a real
//! disk for `fsync` to mean anything), created and removed outside the timing.
//!
//! - `store batch=N in_flight=M`: `EmbeddedStore::insert` in batches of N, M batches at a time.
//! - `store batch=1000, 10 live buckets`: the same after 100,000 other keys were recorded
//!   (outside the timing) with ttls from 30 s to 300 s, 10,000 keys per ttl, shortest first,
//!   so that every lookup asks ten buckets, as it does once a store has run for a whole ttl.
//! - `plain fjall batch=1000, one keyspace`: what the store costs above the bare database: a
//!   lookup per key and one write batch + `fsync` per 1,000 keys into a single keyspace, with
//!   no tokens, no expiry and no thread hop.
//! - `plain fjall per key`: what a consumer writes without batching: look the key up, insert
//!   it, `fsync`, for each key (on the first 2,000 keys: it is slow).
//!
//! Group `embedded claims`, the same workload (claims with a 30 s lease):
//!
//! - `store insert batch=1000` / `store claim+commit batch=1000`: the store on its own, one call
//!   at a time: `insert` (one `fsync` per batch) against `claim` then `commit` of the keys
//!   claimed (two).
//! - `operator dedup_by_key` / `operator claim_by_key + commit`: the operators as a consumer
//!   uses them (window of 1,000 in front, batches of up to 1,000, 4 calls in flight; the claims
//!   consumer settles up to 1,000 claims at a time, commits batched in the background).
//!
//! Run: `cargo bench --features embedded --bench embedded` (one group:
//! `-- "embedded claims"`).
//!
//! # Measured (2 shared cores, other engineers' builds and benches running; ext4 on a virtual disk)
//!
//! Keys/s, criterion medians; each row is one full run of the command above, so compare within
//! a row (the load, and with it the cost of an `fsync`, changed a lot between runs: load average
//! 3.1–4.7 during run B).
//!
//! | run | store 1000 | store 100 | store 1000 ×4 in flight | store 1000, 10 live buckets | plain fjall 1000, one keyspace | plain fjall per key |
//! |---|---|---|---|---|---|---|
//! | A | 225k | 50k (135k alone) | 205k | 103k | 282k | 5.3k |
//! | B | 150k | 48k | 216k | 105k | 131k | 0.44k |
//!
//! - Batching is the lever: 40–340× one `fsync` per key, on the same database.
//! - The store runs at 80–115% of a bare fjall batch into one keyspace (no tokens, no expiry,
//!   no thread hop): its lookups ask every live bucket, the price of expiry without a scan.
//! - With ten live buckets (a store that has run for a whole ttl) ~100k keys/s: before buckets
//!   were sealed into tables as they fill (`seal` in `src/store/embedded.rs`) this was ~45k.
//! - Batches of 100 pay ten times the `fsync`s; they vary most with the disk's load (50k in a
//!   full run, 135k alone a minute later, 32k alone under load average 6).
//!
//! Claims (`-- "embedded claims"`, two runs, load average 1.0–1.8; keys/s, criterion medians):
//!
//! | run | store insert 1000 | store claim+commit 1000 | operator `dedup_by_key` | operator `claim_by_key` + commit |
//! |---|---|---|---|---|
//! | C | 206k | 59k | 205k | 44k |
//! | D | 252k | 76k | 218k | 62k |
//!
//! - A claimed and committed key costs ~3.3× an inserted one: two `fsync`s per batch instead
//!   of one, two lookups per key (the claim asks the buckets of done keys and of leases, the
//!   commit its lease's bucket) and two writes (the done record, and the tombstone of the
//!   record in flight). Run C was before commits looked in the lease's buckets first.
//! - The same ratio as on Redis (`benches/redis.rs`: 276k against 94k items/s).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use futures::StreamExt;
use stream_dedup::store::{
    ClaimBatch, ClaimStore, Claimed, EmbeddedStore, InsertBatch, Inserted, Store,
};
use stream_dedup::{DedupStreamExt, Window};
use tempfile::TempDir;

const KEYS: usize = 200_000;
const PER_KEY: usize = 2_000;
const TTL: Duration = Duration::from_secs(300);
const LEASE: Duration = Duration::from_secs(30);

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

    fn uuid(&mut self) -> Vec<u8> {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
        .into_bytes()
    }
}

/// The workload: 36-byte keys, 10% repeats from 1,000–11,000 items back, never two copies of
/// one key in one batch of 1,000 (a batch holds distinct keys: the operator dedups it first).
fn workload() -> Vec<Vec<u8>> {
    let mut rng = Rng(0x5eed);
    let mut keys: Vec<Vec<u8>> = Vec::with_capacity(KEYS);
    let mut batch = std::collections::HashSet::new();
    for i in 0..KEYS {
        if i % 1_000 == 0 {
            batch.clear();
        }
        let key = if i >= 11_000 && rng.next() % 10 == 0 {
            let back = 1_000 + usize::try_from(rng.next() % 10_000).unwrap();
            keys[i - back].clone()
        } else {
            rng.uuid()
        };
        let key = if batch.contains(&key) {
            rng.uuid()
        } else {
            key
        };
        batch.insert(key.clone());
        keys.push(key);
    }
    assert!(keys.iter().all(|k| k.len() == 36));
    keys
}

fn count_new(answers: &[Inserted]) -> usize {
    answers.iter().filter(|&&a| a == Inserted::New).count()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = workload();
    let unique = {
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        sorted.len()
    };

    let mut group = c.benchmark_group("embedded");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(KEYS as u64));

    for (batch, in_flight) in [(1_000, 1), (100, 1), (1_000, 4)] {
        let name = format!("store batch={batch} in_flight={in_flight}");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let dir = TempDir::new().unwrap();
                        let store = EmbeddedStore::open(dir.path(), "bench").unwrap();
                        let start = Instant::now();
                        let new = futures::stream::iter(keys.chunks(batch))
                            .map(|chunk| store.insert(InsertBatch::new(chunk.to_vec(), TTL)))
                            .buffered(in_flight)
                            .fold(0, |new, answers| async move {
                                new + count_new(&answers.expect("insert"))
                            })
                            .await;
                        total += start.elapsed();
                        assert_eq!(new, unique, "every distinct key is new exactly once");
                    }
                    total
                })
            });
        });
    }

    group.bench_function("store batch=1000, 10 live buckets", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = TempDir::new().unwrap();
                    let store = EmbeddedStore::open(dir.path(), "bench").unwrap();
                    let mut rng = Rng(0xb0c4e7);
                    // Oldest first, as a store that ran for a whole ttl has them.
                    for i in 0..100 {
                        let other: Vec<_> = (0..1_000).map(|_| rng.uuid()).collect();
                        let ttl = TTL * (i / 10 + 1) / 10;
                        store.insert(InsertBatch::new(other, ttl)).await.unwrap();
                    }
                    let start = Instant::now();
                    let mut new = 0;
                    for chunk in keys.chunks(1_000) {
                        let answers = store
                            .insert(InsertBatch::new(chunk.to_vec(), TTL))
                            .await
                            .expect("insert");
                        new += count_new(&answers);
                    }
                    total += start.elapsed();
                    assert_eq!(new, unique);
                }
                total
            })
        });
    });

    group.bench_function("plain fjall batch=1000, one keyspace", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = TempDir::new().unwrap();
                let db = Database::builder(dir.path()).open().unwrap();
                let ks = db.keyspace("keys", KeyspaceCreateOptions::default).unwrap();
                let start = Instant::now();
                let mut new = 0;
                for chunk in keys.chunks(1_000) {
                    let mut write = db.batch().durability(None);
                    for key in chunk {
                        if ks.get(key).unwrap().is_none() {
                            write.insert(&ks, key.as_slice(), [1u8]);
                            new += 1;
                        }
                    }
                    write.commit().unwrap();
                    db.persist(PersistMode::SyncAll).unwrap();
                }
                total += start.elapsed();
                assert_eq!(new, unique);
            }
            total
        });
    });

    group.throughput(Throughput::Elements(PER_KEY as u64));
    group.bench_function("plain fjall per key", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = TempDir::new().unwrap();
                let db = Database::builder(dir.path()).open().unwrap();
                let ks = db.keyspace("keys", KeyspaceCreateOptions::default).unwrap();
                let start = Instant::now();
                for key in &keys[..PER_KEY] {
                    let seen = ks.get(key).unwrap().is_some();
                    if !seen {
                        ks.insert(key.as_slice(), [1u8]).unwrap();
                        db.persist(PersistMode::SyncAll).unwrap();
                    }
                    black_box(seen);
                }
                total += start.elapsed();
            }
            total
        });
    });
    group.finish();
}

/// Claims against the insert path, on the same workload, every call durable.
fn claims(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = workload();
    let unique = {
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        sorted.len()
    };
    let mut group = c.benchmark_group("embedded claims");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(KEYS as u64));

    // The store on its own, one call at a time: `insert` (one fsync per batch) against `claim`
    // then `commit` of the keys claimed (two).
    group.bench_function("store insert batch=1000", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = TempDir::new().unwrap();
                    let store = EmbeddedStore::open(dir.path(), "bench").unwrap();
                    let start = Instant::now();
                    let mut new = 0;
                    for chunk in keys.chunks(1_000) {
                        let batch = InsertBatch::new(chunk.to_vec(), TTL);
                        new += count_new(&store.insert(batch).await.expect("insert"));
                    }
                    total += start.elapsed();
                    assert_eq!(new, unique);
                }
                total
            })
        });
    });
    group.bench_function("store claim+commit batch=1000", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = TempDir::new().unwrap();
                    let store = EmbeddedStore::open(dir.path(), "bench").unwrap();
                    let start = Instant::now();
                    let mut committed = 0;
                    for chunk in keys.chunks(1_000) {
                        let batch = ClaimBatch::new(chunk.to_vec(), LEASE);
                        let token = batch.token;
                        let answers = store.claim(batch).await.expect("claim");
                        let mine: Vec<_> = chunk
                            .iter()
                            .zip(answers)
                            .filter(|(_, a)| *a == Claimed::Mine)
                            .map(|(k, _)| (k.clone(), token))
                            .collect();
                        let done = store.commit(mine, TTL).await.expect("commit");
                        committed += done.iter().filter(|&&d| d).count();
                    }
                    total += start.elapsed();
                    assert_eq!(committed, unique);
                }
                total
            })
        });
    });

    // The operators, as a consumer uses them: a small window in front (the store decides),
    // batches of up to 1,000, 4 calls in flight; the claims consumer settles up to 1,000
    // claims at a time, and the commits are batched in the background.
    let strings: Vec<String> = keys
        .iter()
        .map(|k| String::from_utf8(k.clone()).expect("UUID text"))
        .collect();
    let operator_window = |store: EmbeddedStore| {
        Window::max_keys(1_000)
            .ttl(TTL)
            .store(store)
            .batch_size(1_000)
            .max_in_flight(4)
            .timeout(Duration::from_secs(30))
    };
    group.bench_function("operator dedup_by_key", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = TempDir::new().unwrap();
                    let store = EmbeddedStore::open(dir.path(), "bench").unwrap();
                    let start = Instant::now();
                    let accepted = futures::stream::iter(strings.iter().cloned())
                        .dedup_by_key(|k| k.clone(), operator_window(store))
                        .count()
                        .await;
                    total += start.elapsed();
                    assert_eq!(accepted, unique);
                }
                total
            })
        });
    });
    group.bench_function("operator claim_by_key + commit", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = TempDir::new().unwrap();
                    let store = EmbeddedStore::open(dir.path(), "bench").unwrap();
                    let start = Instant::now();
                    let committed = futures::stream::iter(strings.iter().cloned())
                        .claim_by_key(|k| k.clone(), operator_window(store))
                        .map(|claim| async move { claim.commit().await.expect("commit") })
                        .buffer_unordered(1_000)
                        .count()
                        .await;
                    total += start.elapsed();
                    assert_eq!(committed, unique);
                }
                total
            })
        });
    });
    group.finish();
}

criterion_group!(benches, bench, claims);
criterion_main!(benches);
