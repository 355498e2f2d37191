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
//! trip). Prints transactions per second of each kind and their ratios to the effect alone, one
//! line per round.
//!
//! `STREAM_DEDUP_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --features
//! postgres --bench postgres_paired` (five rounds).

use std::time::{Duration, Instant};

use sqlx::{Executor as _, PgPool};
use stream_dedup::sqlx;
use stream_dedup::store::{ClaimBatch, ClaimStore, Claimed, PostgresStore};

const TABLE: &str = "stream_dedup_paired";
const EFFECTS: &str = "stream_dedup_paired_effects";
const TTL: Duration = Duration::from_secs(300);
const ROUNDS: usize = 5;
const TRANSACTIONS: usize = 3_000;

async fn round(pool: &PgPool, round: usize) -> f64 {
    let ns = format!("paired-{}-{round}", std::process::id());
    let store = PostgresStore::builder(&ns)
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
        let mut ratios: Vec<f64> = Vec::new();
        for r in 0..ROUNDS {
            ratios.push(round(&pool, r).await);
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "median effect + commit_in / effect alone: {:.0}%",
            100.0 * ratios[ratios.len() / 2]
        );
        let clean = format!("DELETE FROM {TABLE} WHERE namespace LIKE 'paired-%'");
        pool.execute(clean.as_str()).await.expect("clean up");
        pool.execute(format!("DELETE FROM {EFFECTS}").as_str())
            .await
            .expect("clean up");
    });
}
