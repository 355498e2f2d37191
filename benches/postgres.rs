//! `PostgresStore` against the plain alternatives, on the PostgreSQL at
//! `STREAM_DEDUP_POSTGRES_URL` (skipped with a message when it is unset), in tables of the
//! bench's own (`stream_dedup_bench`, `stream_dedup_bench_effects`), dropped at the end.
//!
//! Workload: 20,000 36-byte keys (UUID-shaped, seeded), 10% of them repeats of a key seen
//! 1,000–11,000 items earlier (a redelivery). Every iteration deletes its rows afterwards,
//! outside the timing.
//!
//! - `store insert batch=1000`: `PostgresStore::insert`, one batch at a time, through the
//!   store's pool.
//! - `plain unnest ON CONFLICT DO NOTHING batch=1000`: what a consumer writes by hand, in a
//!   loop on one sqlx connection: `INSERT … SELECT … FROM unnest($keys) ON CONFLICT DO NOTHING
//!   RETURNING key` into the same table (the same columns and indexes), with no token, no
//!   takeover of expired rows, no sorting.
//! - `plain INSERT per key`: one awaited `INSERT … ON CONFLICT DO NOTHING RETURNING key` per
//!   key (on the first 2,000 keys: it is slow).
//! - `tx effect`: a transaction per key that writes one effect row and commits; `tx effect +
//!   commit_in`: the same with the key committed inside it (`PostgresStore::commit_in`; the
//!   keys are claimed beforehand, outside the timing). 1,000 transactions on one connection.
//!
//! Group `postgres commit_with`, what a consumer of the inbox pattern runs per message, 1,000
//! messages one after the other on the store's pool (claims taken beforehand by a
//! `claim_by_key` operator, outside the timing):
//!
//! - `tx effect`: `BEGIN`, one effect row, `COMMIT` — the plain alternative, without the key.
//! - `tx effect + commit_with`: the same transaction, the claim committed inside it with
//!   `Claim::commit_with` (the issue's bar: at least 80% of `tx effect`).
//! - `tx effect, then commit`: the effect's transaction, then `Claim::commit` awaited (the
//!   two steps `commit_with` replaces; for reference).
//!
//! ```text
//! STREAM_DEDUP_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench --features postgres --bench postgres
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::{StreamExt, stream};
use stream_dedup::sqlx::{self, Connection, PgConnection};
use stream_dedup::store::{
    ClaimBatch, ClaimStore, Claimed, InsertBatch, Inserted, PostgresStore, Store, Token,
};
use stream_dedup::{Claim, DedupStreamExt, Window};

const KEYS: usize = 20_000;
const PER_KEY: usize = 2_000;
const TRANSACTIONS: usize = 1_000;
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

async fn clean(conn: &mut PgConnection, namespace: &str) {
    sqlx::query(&format!("DELETE FROM {TABLE} WHERE namespace = $1"))
        .bind(namespace)
        .execute(conn)
        .await
        .expect("clean up");
}

async fn store(url: &str, namespace: &str) -> PostgresStore {
    PostgresStore::builder(namespace)
        .table(TABLE)
        .statement_timeout(Duration::from_secs(10))
        .no_purge()
        .connect(url)
        .await
        .expect("connect")
}

fn bench(c: &mut Criterion) {
    let Ok(url) = std::env::var("STREAM_DEDUP_POSTGRES_URL") else {
        eprintln!("skipped: the PostgreSQL benches (STREAM_DEDUP_POSTGRES_URL is not set)");
        return;
    };
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
    let mut admin = rt.block_on(PgConnection::connect(&url)).unwrap();
    rt.block_on(async {
        // Creates the store's table (with its indexes), which the plain loops use too.
        drop(store(&url, "setup").await);
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {EFFECTS} (key bytea NOT NULL, amount bigint NOT NULL)"
        ))
        .execute(&mut admin)
        .await
        .unwrap();
    });

    let mut group = c.benchmark_group("postgres");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));

    group.throughput(Throughput::Elements(KEYS as u64));
    group.bench_function("store insert batch=1000", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                // One store, its pool warmed up, as a consumer keeps it.
                let ns = namespace();
                let store = store(&url, &ns).await;
                store.remove(vec![b"warm".to_vec()]).await.unwrap();
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let mut new = 0;
                    for chunk in keys.chunks(1_000) {
                        let answers = store
                            .insert(InsertBatch::new(chunk.to_vec(), TTL))
                            .await
                            .expect("insert");
                        new += answers.iter().filter(|&&a| a == Inserted::New).count();
                    }
                    total += start.elapsed();
                    assert_eq!(new, unique, "every distinct key is new exactly once");
                    clean(&mut admin, &ns).await;
                }
                total
            })
        });
    });

    let plain_batch = format!(
        "INSERT INTO {TABLE} (namespace, key, token, done, expires_at, purge_at) \
         SELECT $1, k, $2::uuid, true, now() + interval '300 seconds', now() + interval '300 seconds' \
         FROM unnest($3::bytea[]) AS k ON CONFLICT DO NOTHING RETURNING key"
    );
    group.bench_function("plain unnest ON CONFLICT DO NOTHING batch=1000", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut conn = PgConnection::connect(&url).await.unwrap();
                let ns = namespace();
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let token = Token::new().to_string();
                    let start = Instant::now();
                    let mut new = 0;
                    for chunk in keys.chunks(1_000) {
                        let rows: Vec<Vec<u8>> = sqlx::query_scalar(&plain_batch)
                            .bind(&ns)
                            .bind(&token)
                            .bind(chunk)
                            .fetch_all(&mut conn)
                            .await
                            .expect("insert");
                        new += rows.len();
                        black_box(rows);
                    }
                    total += start.elapsed();
                    assert_eq!(new, unique);
                    clean(&mut admin, &ns).await;
                }
                total
            })
        });
    });

    group.throughput(Throughput::Elements(PER_KEY as u64));
    let plain_one = format!(
        "INSERT INTO {TABLE} (namespace, key, token, done, expires_at, purge_at) \
         VALUES ($1, $3, $2::uuid, true, now() + interval '300 seconds', now() + interval '300 seconds') \
         ON CONFLICT DO NOTHING RETURNING key"
    );
    group.bench_function("plain INSERT per key", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut conn = PgConnection::connect(&url).await.unwrap();
                let ns = namespace();
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let token = Token::new().to_string();
                    let start = Instant::now();
                    for key in &keys[..PER_KEY] {
                        let row: Option<Vec<u8>> = sqlx::query_scalar(&plain_one)
                            .bind(&ns)
                            .bind(&token)
                            .bind(key)
                            .fetch_optional(&mut conn)
                            .await
                            .expect("insert");
                        black_box(row);
                    }
                    total += start.elapsed();
                    clean(&mut admin, &ns).await;
                }
                total
            })
        });
    });

    // Transactions per second: the effect alone, and with the claim committed inside.
    group.throughput(Throughput::Elements(TRANSACTIONS as u64));
    let effect = format!("INSERT INTO {EFFECTS} (key, amount) VALUES ($1, $2)");
    for with_commit in [false, true] {
        let name = if with_commit {
            "tx effect + commit_in"
        } else {
            "tx effect"
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut conn = PgConnection::connect(&url).await.unwrap();
                    let ns = namespace();
                    let store = store(&url, &ns).await;
                    let batch = &keys[..TRANSACTIONS];
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let claim = ClaimBatch::new(batch.to_vec(), TTL).with_ttl(TTL);
                        let token = claim.token;
                        let claimed = store.claim(claim).await.expect("claim");
                        assert!(claimed.iter().all(|&c| c == Claimed::Mine));
                        let start = Instant::now();
                        for (i, key) in batch.iter().enumerate() {
                            let mut tx = conn.begin().await.expect("begin");
                            sqlx::query(&effect)
                                .bind(key)
                                .bind(i as i64)
                                .execute(&mut *tx)
                                .await
                                .expect("effect");
                            if with_commit {
                                let held = store
                                    .commit_in(&mut tx, key, token, TTL)
                                    .await
                                    .expect("commit_in");
                                assert!(held);
                            }
                            tx.commit().await.expect("commit");
                        }
                        total += start.elapsed();
                        clean(&mut admin, &ns).await;
                        sqlx::query(&format!("TRUNCATE {EFFECTS}"))
                            .execute(&mut admin)
                            .await
                            .unwrap();
                    }
                    total
                })
            });
        });
    }
    group.finish();

    commit_with_group(c, &rt, &url, &keys[..TRANSACTIONS], &mut admin);

    rt.block_on(async {
        for table in [TABLE, EFFECTS] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                .execute(&mut admin)
                .await
                .unwrap();
        }
    });
}

/// How a bench of `postgres commit_with` ends each message's transaction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// `COMMIT`, the key left alone.
    EffectOnly,
    /// `Claim::commit_with(tx)`.
    CommitWith,
    /// `COMMIT`, then `Claim::commit()` awaited.
    ThenCommit,
}

/// 1,000 claims on `keys`, from a `claim_by_key` operator of its own on `store` (so that no
/// key is done in its memory), held open; keep-alive off, the lease long enough.
async fn claims(store: &PostgresStore, keys: &[Vec<u8>]) -> Vec<Claim<Vec<u8>>> {
    let window = Window::max_keys(10_000)
        .ttl(TTL)
        .lease(TTL)
        .keep_alive(false)
        .store(store.clone())
        .batch_size(1_000)
        .timeout(Duration::from_secs(10));
    let claims: Vec<Claim<Vec<u8>>> = stream::iter(keys.to_vec())
        .claim_by_key(|k: &Vec<u8>| k.clone(), window)
        .collect()
        .await;
    assert_eq!(claims.len(), keys.len(), "every key claimed");
    claims
}

fn commit_with_group(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    url: &str,
    keys: &[Vec<u8>],
    admin: &mut PgConnection,
) {
    let mut group = c.benchmark_group("postgres commit_with");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(keys.len() as u64));
    let effect = format!("INSERT INTO {EFFECTS} (key, amount) VALUES ($1, $2)");
    for (name, ending) in [
        ("tx effect", Ending::EffectOnly),
        ("tx effect + commit_with", Ending::CommitWith),
        ("tx effect, then commit", Ending::ThenCommit),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let ns = namespace();
                    let store = store(url, &ns).await;
                    let pool = store.pool().clone();
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        // The plain alternative has no claims: only its transactions run.
                        let mut claims = match ending {
                            Ending::EffectOnly => Vec::new(),
                            _ => claims(&store, keys).await,
                        }
                        .into_iter();
                        let start = Instant::now();
                        for (i, key) in keys.iter().enumerate() {
                            let mut tx = pool.begin().await.expect("begin");
                            sqlx::query(&effect)
                                .bind(key)
                                .bind(i as i64)
                                .execute(&mut *tx)
                                .await
                                .expect("effect");
                            if ending == Ending::EffectOnly {
                                tx.commit().await.expect("commit");
                                continue;
                            }
                            let claim = claims.next().expect("a claim per key");
                            debug_assert_eq!(&*claim, key);
                            match ending {
                                Ending::EffectOnly => unreachable!(),
                                Ending::CommitWith => {
                                    black_box(claim.commit_with(tx).await.expect("commit_with"));
                                }
                                Ending::ThenCommit => {
                                    tx.commit().await.expect("commit");
                                    black_box(claim.commit().await.expect("commit the claim"));
                                }
                            }
                        }
                        total += start.elapsed();
                        clean(admin, &ns).await;
                        sqlx::query(&format!("TRUNCATE {EFFECTS}"))
                            .execute(&mut *admin)
                            .await
                            .unwrap();
                    }
                    total
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
