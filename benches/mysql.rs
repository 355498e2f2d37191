//! `MySqlStore` against the plain alternatives, on the server at `STREAM_DEDUP_MYSQL_URL`
//! (skipped with a message when it is unset), in tables of its own (`stream_dedup_bench`,
//! `stream_dedup_bench_effects`).
//!
//! Workloads: 36-byte keys (UUID-shaped, seeded), either all new (`new keys`: what a store
//! behind the in-memory window mostly sees) or 10% of them repeats of a key seen 1,000–11,000
//! items earlier (`10% repeats`: a redelivery, never in the same batch, but in almost every
//! batch). Every iteration runs in a fresh namespace and deletes its rows afterwards, outside
//! the timing.
//!
//! Group `mysql insert` (20,000 keys per iteration, one call at a time):
//! - `store batch=1000`: `MySqlStore::insert` in batches of 1,000: the prepared upsert, which on
//!   MariaDB 10.5+ answers for every key itself (`RETURNING`); on MySQL, in a batch that met a
//!   key of another request (so in almost every batch of `10% repeats`), then the read-back of
//!   the batch's rows.
//! - `plain INSERT IGNORE batch=1000`: what a consumer writes with sqlx alone: a multi-row
//!   `INSERT IGNORE` of 1,000 rows with bound parameters (a prepared statement, cached),
//!   autocommitted. It answers only how many rows were new, not which.
//! - `plain INSERT IGNORE per key`: one awaited single-row `INSERT IGNORE` per key (on 2,000
//!   keys: it is slow).
//!
//! Group `mysql commit_in` (500 transactions per iteration, one at a time), each `BEGIN`, an
//! effect row (`INSERT INTO stream_dedup_bench_effects …`), `COMMIT`:
//! - `effect alone`: just that.
//! - `effect + commit_in`: the key (claimed beforehand, outside the timing, as the operator
//!   does) marked done by `MySqlStore::commit_in` (one prepared statement) in the same
//!   transaction.
//!
//! `STREAM_DEDUP_MYSQL_URL=mysql://root@127.0.0.1:3306/test cargo bench --features mysql
//! --bench mysql`; figures in the README.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sqlx::{Executor as _, MySqlPool, QueryBuilder};
use stream_dedup::sqlx;
use stream_dedup::store::{ClaimBatch, ClaimStore, Claimed, InsertBatch, MySqlStore, Store, Token};

const KEYS: usize = 20_000;
const PER_KEY: usize = 2_000;
const TRANSACTIONS: usize = 500;
const TTL: Duration = Duration::from_secs(300);
const TABLE: &str = "stream_dedup_bench";
const EFFECTS: &str = "stream_dedup_bench_effects";

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

/// The workload: 36-byte keys; with `repeats`, 10% of them repeat a key from 1,000–11,000
/// items back.
fn workload(n: usize, repeats: bool) -> Vec<Vec<u8>> {
    let mut rng = Rng(if repeats { 0x5eed } else { 0xf00d });
    let mut keys: Vec<Vec<u8>> = Vec::with_capacity(n);
    for i in 0..n {
        if repeats && i >= 11_000 && rng.next() % 10 == 0 {
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

/// Deletes the rows of `namespace` (outside the timing).
async fn clean(pool: &MySqlPool, namespace: &str) {
    sqlx::query(&format!("DELETE FROM {TABLE} WHERE namespace = ?"))
        .bind(namespace.as_bytes())
        .execute(pool)
        .await
        .expect("clean up");
}

/// One multi-row `INSERT IGNORE` of `keys`: the plain batched alternative.
async fn insert_ignore(pool: &MySqlPool, namespace: &str, keys: &[Vec<u8>], token: &[u8]) -> u64 {
    let mut q = QueryBuilder::new(format!(
        "INSERT IGNORE INTO {TABLE} (namespace, k, token, done, expires_at) "
    ));
    let ttl_us = TTL.as_micros() as u64;
    q.push_values(keys, |mut row, key| {
        row.push_bind(namespace.as_bytes())
            .push_bind(key.as_slice())
            .push_bind(token)
            .push("1")
            .push("UTC_TIMESTAMP(6) + INTERVAL ")
            .push_bind_unseparated(ttl_us)
            .push_unseparated(" MICROSECOND");
    });
    q.build()
        .persistent(true)
        .execute(pool)
        .await
        .expect("insert ignore")
        .rows_affected()
}

fn bench(c: &mut Criterion) {
    let Ok(url) = std::env::var("STREAM_DEDUP_MYSQL_URL") else {
        eprintln!("skipped: the MySQL benches (STREAM_DEDUP_MYSQL_URL is not set)");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = workload(KEYS, true);
    let unique = workload(KEYS, false);
    let store = rt
        .block_on(
            MySqlStore::builder("bench")
                .table(TABLE)
                .timeout(Duration::from_secs(30))
                .connect(&url),
        )
        .expect("connect");
    let pool = rt.block_on(MySqlPool::connect(&url)).expect("connect");
    rt.block_on(
        pool.execute(
            format!(
                "CREATE TABLE IF NOT EXISTS {EFFECTS} (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
             k VARBINARY(64) NOT NULL, amount BIGINT NOT NULL) ENGINE = InnoDB"
            )
            .as_str(),
        ),
    )
    .expect("create the effects table");
    let token = Token::new().to_bytes();

    let mut group = c.benchmark_group("mysql insert");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(KEYS as u64));

    group.bench_function("store batch=1000, 10% repeats", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let ns = namespace();
                    let store = MySqlStore::builder(&ns)
                        .table(TABLE)
                        .timeout(Duration::from_secs(30))
                        .no_background_purge()
                        .pool(store.pool().clone());
                    let start = Instant::now();
                    for chunk in keys.chunks(1_000) {
                        let batch = InsertBatch::new(chunk.to_vec(), TTL);
                        black_box(store.insert(batch).await.expect("insert"));
                    }
                    took += start.elapsed();
                    clean(&pool, &ns).await;
                }
                took
            })
        });
    });

    group.bench_function("plain INSERT IGNORE batch=1000, 10% repeats", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let ns = namespace();
                    let start = Instant::now();
                    for chunk in keys.chunks(1_000) {
                        black_box(insert_ignore(&pool, &ns, chunk, &token).await);
                    }
                    took += start.elapsed();
                    clean(&pool, &ns).await;
                }
                took
            })
        });
    });

    group.bench_function("store batch=1000, new keys", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let ns = namespace();
                    let store = MySqlStore::builder(&ns)
                        .table(TABLE)
                        .timeout(Duration::from_secs(30))
                        .no_background_purge()
                        .pool(store.pool().clone());
                    let start = Instant::now();
                    for chunk in unique.chunks(1_000) {
                        let batch = InsertBatch::new(chunk.to_vec(), TTL);
                        black_box(store.insert(batch).await.expect("insert"));
                    }
                    took += start.elapsed();
                    clean(&pool, &ns).await;
                }
                took
            })
        });
    });

    group.bench_function("plain INSERT IGNORE batch=1000, new keys", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let ns = namespace();
                    let start = Instant::now();
                    for chunk in unique.chunks(1_000) {
                        black_box(insert_ignore(&pool, &ns, chunk, &token).await);
                    }
                    took += start.elapsed();
                    clean(&pool, &ns).await;
                }
                took
            })
        });
    });

    group.throughput(Throughput::Elements(PER_KEY as u64));
    group.bench_function("plain INSERT IGNORE per key", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let ns = namespace();
                    let start = Instant::now();
                    for key in &keys[..PER_KEY] {
                        black_box(
                            insert_ignore(&pool, &ns, std::slice::from_ref(key), &token).await,
                        );
                    }
                    took += start.elapsed();
                    clean(&pool, &ns).await;
                }
                took
            })
        });
    });
    group.finish();

    let mut group = c.benchmark_group("mysql commit_in");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(TRANSACTIONS as u64));
    let effect = format!("INSERT INTO {EFFECTS} (k, amount) VALUES (?, ?)");
    let keys = &keys[..TRANSACTIONS];

    group.bench_function("effect alone", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    for (i, key) in keys.iter().enumerate() {
                        let mut tx = pool.begin().await.unwrap();
                        sqlx::query(&effect)
                            .bind(key.as_slice())
                            .bind(i as i64)
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                        tx.commit().await.unwrap();
                    }
                    took += start.elapsed();
                    pool.execute(format!("DELETE FROM {EFFECTS}").as_str())
                        .await
                        .unwrap();
                }
                took
            })
        });
    });

    group.bench_function("effect + commit_in", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let ns = namespace();
                    let store = MySqlStore::builder(&ns)
                        .table(TABLE)
                        .timeout(Duration::from_secs(30))
                        .no_background_purge()
                        .pool(pool.clone());
                    let batch = ClaimBatch::new(keys.to_vec(), Duration::from_secs(60));
                    let token = batch.token;
                    let claimed = store.claim(batch).await.unwrap();
                    assert!(claimed.iter().all(|c| *c == Claimed::Mine));
                    let start = Instant::now();
                    for (i, key) in keys.iter().enumerate() {
                        let mut tx = pool.begin().await.unwrap();
                        sqlx::query(&effect)
                            .bind(key.as_slice())
                            .bind(i as i64)
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                        let held = store.commit_in(&mut tx, key, token, TTL).await.unwrap();
                        assert!(held);
                        tx.commit().await.unwrap();
                    }
                    took += start.elapsed();
                    pool.execute(format!("DELETE FROM {EFFECTS}").as_str())
                        .await
                        .unwrap();
                    clean(&pool, &ns).await;
                }
                took
            })
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
