//! `MySqlStore` against the plain alternatives, **paired**: the variants alternate transaction
//! by transaction (batch by batch) within one run, so that a busy machine (other builds, other
//! clients of the same server, a disk whose flushes slow down) weighs on them alike. On a
//! shared machine criterion's runs of one function after the other (`benches/mysql.rs`) can
//! differ by 2× from one function to the next; these ratios hold within a few points.
//!
//! On the server at `STREAM_DEDUP_MYSQL_URL` (skipped with a message when it is unset), in
//! tables of its own (`stream_dedup_paired`, `stream_dedup_paired_effects`), rows deleted at
//! the end. Prints one line per measurement:
//!
//! - `tx`: 3,000 transactions, each `BEGIN`, an effect row (`INSERT` into a table with an
//!   `AUTO_INCREMENT` key), `COMMIT`; one in three also marks its key (claimed beforehand) done
//!   with `MySqlStore::commit_in`, and one in three sends a `SELECT 1` instead: the least that
//!   any statement added to the transaction costs (a round trip). Transactions per second of
//!   each kind.
//! - `tx of 10`: as many keys in transactions of ten effects each, alternating between the
//!   effects alone and the effects plus one `MySqlStore::commit_all_in` of their ten keys (what
//!   `Claim::commit_all_with` sends).
//! - `batch`: 20,000 keys (36 bytes, 10% repeats of a key seen 1,000–11,000 keys earlier, as
//!   in `benches/mysql.rs`) in batches of 1,000, each batch sent three times in turn:
//!   `MySqlStore::insert` as it is, the same store answering as on MySQL (the upsert, then the
//!   read-back when a key is held by another request; the `testing` feature's switch), and a
//!   plain multi-row `INSERT IGNORE` with bound parameters. Keys per second of each.
//!
//! `STREAM_DEDUP_MYSQL_URL=mysql://root@127.0.0.1:3306/test cargo bench --features
//! mysql,testing --bench mysql_paired` (five rounds of each).

use std::time::{Duration, Instant};

use sqlx::{Executor as _, MySqlPool, QueryBuilder};
use stream_dedup::sqlx;
use stream_dedup::store::{
    ClaimBatch, ClaimStore, Claimed, InsertBatch, MySqlStore, MySqlStoreBuilder, Store, Token,
};

const TABLE: &str = "stream_dedup_paired";
const EFFECTS: &str = "stream_dedup_paired_effects";
const TTL: Duration = Duration::from_secs(300);
const ROUNDS: usize = 5;
const TRANSACTIONS: usize = 3_000;
const KEYS: usize = 20_000;
/// Effects per transaction in the rounds of several messages per transaction.
const PER_TX: usize = 10;

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

/// 36-byte keys; 10% of them (from the 11,000th) repeat a key from 1,000–11,000 keys back.
fn workload(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed);
    let mut keys: Vec<Vec<u8>> = Vec::with_capacity(n);
    for i in 0..n {
        if i >= 11_000 && rng.next() % 10 == 0 {
            let back = 1_000 + usize::try_from(rng.next() % 10_000).unwrap();
            keys.push(keys[i - back].clone());
        } else {
            let (a, b) = (rng.next(), rng.next());
            keys.push(format!("{a:016x}-{b:016x}-xxx").into_bytes());
        }
    }
    keys
}

fn builder(namespace: &str) -> MySqlStoreBuilder {
    MySqlStore::builder(namespace)
        .table(TABLE)
        .timeout(Duration::from_secs(30))
        .no_background_purge()
}

/// A store in namespace `ns` and [`TRANSACTIONS`] keys (of generator `seed`) claimed in it,
/// with their token.
async fn claimed(pool: &MySqlPool, ns: &str, seed: u64) -> (MySqlStore, Vec<Vec<u8>>, Token) {
    let store = builder(ns).pool(pool.clone());
    let keys: Vec<Vec<u8>> = workload(TRANSACTIONS, seed);
    let batch = ClaimBatch::new(keys.clone(), Duration::from_secs(600));
    let token = batch.token;
    let claimed = store.claim(batch).await.expect("claim");
    assert!(claimed.iter().all(|c| *c == Claimed::Mine));
    (store, keys, token)
}

/// Effect alone and effect + `commit_in`, alternating.
async fn transactions(pool: &MySqlPool, round: usize) {
    let ns = format!("paired-{}-tx-{round}", std::process::id());
    let (store, keys, token) = claimed(pool, &ns, 7 + round as u64).await;
    let effect = format!("INSERT INTO {EFFECTS} (k, amount) VALUES (?, ?)");
    let mut took = [Duration::ZERO; 3];
    for (i, key) in keys.iter().enumerate() {
        let kind = i % 3;
        let start = Instant::now();
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query(&effect)
            .bind(key.as_slice())
            .bind(i as i64)
            .execute(&mut *tx)
            .await
            .expect("effect");
        match kind {
            1 => {
                let held = store.commit_in(&mut tx, key, token, TTL).await;
                assert!(held.expect("commit_in"));
            }
            2 => {
                sqlx::query("SELECT 1")
                    .execute(&mut *tx)
                    .await
                    .expect("SELECT 1");
            }
            _ => {}
        }
        tx.commit().await.expect("commit");
        took[kind] += start.elapsed();
    }
    let tps = |d: Duration| (TRANSACTIONS / 3) as f64 / d.as_secs_f64();
    let (alone, with, trivial) = (tps(took[0]), tps(took[1]), tps(took[2]));
    println!(
        "tx: effect alone {alone:.0} tx/s, effect + commit_in {with:.0} tx/s = {:.0}%, \
         effect + SELECT 1 {trivial:.0} tx/s = {:.0}%",
        100.0 * with / alone,
        100.0 * trivial / alone
    );
}

/// Transactions of [`PER_TX`] effects each, alternating between the effects alone and the
/// effects plus one `commit_all_in` of their keys (what `Claim::commit_all_with` sends).
async fn transactions_of_several(pool: &MySqlPool, round: usize) {
    let ns = format!("paired-{}-several-{round}", std::process::id());
    let (store, keys, token) = claimed(pool, &ns, 11 + round as u64).await;
    let effect = format!("INSERT INTO {EFFECTS} (k, amount) VALUES (?, ?)");
    let mut took = [Duration::ZERO; 2];
    for (i, chunk) in keys.chunks(PER_TX).enumerate() {
        let kind = i % 2;
        let start = Instant::now();
        let mut tx = pool.begin().await.expect("begin");
        for key in chunk {
            sqlx::query(&effect)
                .bind(key.as_slice())
                .bind(i as i64)
                .execute(&mut *tx)
                .await
                .expect("effect");
        }
        if kind == 1 {
            let held: Vec<_> = chunk.iter().map(|k| (k.clone(), token)).collect();
            let marked = store.commit_all_in(&mut tx, &held, TTL).await;
            assert!(marked.expect("commit_all_in"));
        }
        tx.commit().await.expect("commit");
        took[kind] += start.elapsed();
    }
    let tps = |d: Duration| (TRANSACTIONS / PER_TX / 2) as f64 / d.as_secs_f64();
    let (alone, with) = (tps(took[0]), tps(took[1]));
    println!(
        "tx of {PER_TX}: effects alone {alone:.0} tx/s, effects + commit_all_in {with:.0} tx/s \
         = {:.0}%",
        100.0 * with / alone
    );
}

/// The store (as it is, and as on MySQL) and a plain `INSERT IGNORE`, batch by batch in turn.
async fn batches(pool: &MySqlPool, keys: &[Vec<u8>], round: usize) {
    let ns = format!("paired-{}-batch-{round}", std::process::id());
    let store = builder(&ns).pool(pool.clone());
    let read_back = builder(&format!("{ns}-read-back"))
        .without_returning()
        .pool(pool.clone());
    let plain = format!("{ns}-plain");
    let token = Token::new().to_bytes();
    let mut took = [Duration::ZERO; 3];
    for chunk in keys.chunks(1_000) {
        for (i, store) in [&store, &read_back].into_iter().enumerate() {
            let start = Instant::now();
            let batch = InsertBatch::new(chunk.to_vec(), TTL);
            std::hint::black_box(store.insert(batch).await.expect("insert"));
            took[i] += start.elapsed();
        }
        let start = Instant::now();
        let mut q = QueryBuilder::new(format!(
            "INSERT IGNORE INTO {TABLE} (namespace, k, token, done, expires_at) "
        ));
        q.push_values(chunk, |mut row, key| {
            row.push_bind(plain.as_bytes())
                .push_bind(key.as_slice())
                .push_bind(&token[..])
                .push("1")
                .push("UTC_TIMESTAMP(6) + INTERVAL ")
                .push_bind_unseparated(TTL.as_micros() as u64)
                .push_unseparated(" MICROSECOND");
        });
        let done = q.build().persistent(true).execute(pool).await;
        std::hint::black_box(done.expect("insert ignore"));
        took[2] += start.elapsed();
    }
    let kps = |d: Duration| keys.len() as f64 / d.as_secs_f64();
    let (mine, back, bare) = (kps(took[0]), kps(took[1]), kps(took[2]));
    println!(
        "batch: store {mine:.0} keys/s = {:.0}%, store as on MySQL (read-back) {back:.0} = {:.0}%, \
         plain INSERT IGNORE {bare:.0}",
        100.0 * mine / bare,
        100.0 * back / bare
    );
}

fn main() {
    let Ok(url) = std::env::var("STREAM_DEDUP_MYSQL_URL") else {
        eprintln!("skipped: the paired MySQL benches (STREAM_DEDUP_MYSQL_URL is not set)");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = MySqlPool::connect(&url).await.expect("connect");
        let effects = format!(
            "CREATE TABLE IF NOT EXISTS {EFFECTS} (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
             k VARBINARY(64) NOT NULL, amount BIGINT NOT NULL) ENGINE = InnoDB"
        );
        pool.execute(effects.as_str())
            .await
            .expect("create the effects table");
        let keys = workload(KEYS, 0x5eed);
        for round in 0..ROUNDS {
            transactions(&pool, round).await;
            transactions_of_several(&pool, round).await;
            batches(&pool, &keys, round).await;
        }
        let clean = format!("DELETE FROM {TABLE} WHERE namespace LIKE 'paired-%'");
        pool.execute(clean.as_str()).await.expect("clean up");
        pool.execute(format!("DELETE FROM {EFFECTS}").as_str())
            .await
            .expect("clean up");
    });
}
