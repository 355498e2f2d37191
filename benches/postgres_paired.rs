//! `Claim::commit_with`'s statement on PostgreSQL against the effect alone, **paired**: the two
//! kinds of transaction alternate one by one within a run, so that a busy machine (other
//! builds, a disk whose flushes slow down) weighs on both alike, where criterion's runs of one
//! function after the other (`benches/postgres.rs`, group `postgres commit_with`) can differ by
//! 2× from one function to the next.
//!
//! On the server at `STREAM_DEDUP_POSTGRES_URL` (skipped with a message when it is unset), in
//! tables of its own (`stream_dedup_paired`, `stream_dedup_paired_effects`), rows deleted at
//! the end. Each round: 3,000 transactions, each `BEGIN`, an effect row (`INSERT` into a table
//! with a `bigserial` key), `COMMIT`; one in three also marks its key (claimed beforehand) done
//! with `PostgresStore::commit_in`, the statement `commit_with` sends, and one in three sends a
//! `SELECT 1` instead: the least that any statement added to the transaction costs (a round
//! trip). Then as many keys in transactions of ten effects each, alternating between the
//! effects alone and the effects plus one `PostgresStore::commit_all_in` of their ten keys (what
//! `Claim::commit_all_with` sends). Prints transactions per second of each kind and their
//! ratios, two lines per round.
//!
//! `STREAM_DEDUP_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --features
//! postgres --bench postgres_paired` (five rounds).

use std::time::{Duration, Instant};

use sqlx::{Executor as _, PgPool};
use stream_dedup::sqlx;
use stream_dedup::store::{ClaimBatch, ClaimStore, Claimed, PostgresStore, Token};

const TABLE: &str = "stream_dedup_paired";
const EFFECTS: &str = "stream_dedup_paired_effects";
const TTL: Duration = Duration::from_secs(300);
const ROUNDS: usize = 5;
const TRANSACTIONS: usize = 3_000;
/// Effects per transaction in the rounds of several messages per transaction.
const PER_TX: usize = 10;

/// A store in namespace `ns` and [`TRANSACTIONS`] keys claimed in it, with their token.
async fn claimed(pool: &PgPool, ns: &str) -> (PostgresStore, Vec<Vec<u8>>, Token) {
    let store = PostgresStore::builder(ns)
        .table(TABLE)
        .statement_timeout(Duration::from_secs(30))
        .no_purge()
        .pool(pool.clone())
        .await
        .expect("store");
    let keys: Vec<Vec<u8>> = (0..TRANSACTIONS)
        .map(|i| format!("{ns}-{i:08}-{:0>16}", i * 7919).into_bytes())
        .collect();
    let batch = ClaimBatch::new(keys.clone(), Duration::from_secs(600));
    let token = batch.token;
    let claimed = store.claim(batch).await.expect("claim");
    assert!(claimed.iter().all(|c| *c == Claimed::Mine));
    (store, keys, token)
}

async fn round(pool: &PgPool, round: usize) -> f64 {
    let ns = format!("paired-{}-{round}", std::process::id());
    let (store, keys, token) = claimed(pool, &ns).await;
    let effect = format!("INSERT INTO {EFFECTS} (k, amount) VALUES ($1, $2)");
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
    let ratio = with / alone;
    println!(
        "tx: effect alone {alone:.0} tx/s, effect + commit_in {with:.0} tx/s = {:.0}%, \
         effect + SELECT 1 {trivial:.0} tx/s = {:.0}%",
        100.0 * ratio,
        100.0 * trivial / alone
    );
    ratio
}

/// Transactions of [`PER_TX`] effects each, alternating between the effects alone and the
/// effects plus one `commit_all_in` of their keys (what `Claim::commit_all_with` sends);
/// answers the ratio of transactions per second.
async fn round_of_several(pool: &PgPool, round: usize) -> f64 {
    let ns = format!("paired-{}-several-{round}", std::process::id());
    let (store, keys, token) = claimed(pool, &ns).await;
    let effect = format!("INSERT INTO {EFFECTS} (k, amount) VALUES ($1, $2)");
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
    let ratio = with / alone;
    println!(
        "tx of {PER_TX}: effects alone {alone:.0} tx/s, effects + commit_all_in {with:.0} tx/s \
         = {:.0}%",
        100.0 * ratio
    );
    ratio
}

fn main() {
    let Ok(url) = std::env::var("STREAM_DEDUP_POSTGRES_URL") else {
        eprintln!("skipped: the paired PostgreSQL bench (STREAM_DEDUP_POSTGRES_URL is not set)");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = PgPool::connect(&url).await.expect("connect");
        let effects = format!(
            "CREATE TABLE IF NOT EXISTS {EFFECTS} (id bigserial PRIMARY KEY, k bytea NOT NULL, \
             amount bigint NOT NULL)"
        );
        pool.execute(effects.as_str())
            .await
            .expect("create the effects table");
        let (mut ratios, mut several): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
        for r in 0..ROUNDS {
            ratios.push(round(&pool, r).await);
            several.push(round_of_several(&pool, r).await);
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            100.0 * v[v.len() / 2]
        };
        println!(
            "median effect + commit_in / effect alone: {:.0}%; {PER_TX} effects + commit_all_in \
             / {PER_TX} effects alone: {:.0}%",
            median(ratios),
            median(several)
        );
        let clean = format!("DELETE FROM {TABLE} WHERE namespace LIKE 'paired-%'");
        pool.execute(clean.as_str()).await.expect("clean up");
        pool.execute(format!("DELETE FROM {EFFECTS}").as_str())
            .await
            .expect("clean up");
    });
}
