//! Where the CPU goes per key: `dedup_by_key` against `claim_by_key` + `commit` on Redis, with
//! the consumer's CPU (`/proc/self/stat`, Linux) and the Redis server's (`INFO cpu`: the whole
//! server, so run it on an otherwise idle Redis).
//!
//! ```sh
//! STREAM_DEDUP_REDIS_URL=redis://127.0.0.1:6379 cargo run --release --features redis --example redis_cpu -- 3
//! ```
//!
//! A second argument (`dedup` or `claims`) runs one mode only, e.g. under `perf record`.
//!
//! The workload is the Redis bench's shape: 200,000 36-byte keys, 10% of them repeats of a key
//! seen 1,000–11,000 items earlier; a 1,000-key window in front, batches of 1,000, four in
//! flight; claims settled 4,000 at a time. Each run uses a namespace of its own and deletes
//! its keys afterwards.

use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use stream_dedup::store::RedisStore;
use stream_dedup::{DedupStreamExt, Window};

/// This process's user + system CPU in seconds (0 where `/proc` is missing).
fn own_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which ends with ')'): utime and stime are the 12th and
    // 13th, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// The Redis server's user + system CPU in seconds.
async fn redis_cpu(conn: &mut MultiplexedConnection) -> redis::RedisResult<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    Ok(info
        .lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum())
}

/// 200,000 keys, 10% repeats from 1,000–11,000 items back (splitmix64, seeded).
fn workload() -> Vec<String> {
    let mut state: u64 = 0x5EED;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut keys: Vec<String> = Vec::with_capacity(200_000);
    for i in 0..200_000 {
        let r = next();
        let key = if i >= 11_000 && r % 10 == 0 {
            keys[i - 1_000 - (r / 10 % 10_000) as usize].clone()
        } else {
            format!("{:016x}-{:019x}", r, next() >> 1)
        };
        keys.push(key);
    }
    keys
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Ok(url) = std::env::var("STREAM_DEDUP_REDIS_URL") else {
        eprintln!("set STREAM_DEDUP_REDIS_URL (e.g. redis://127.0.0.1:6379)");
        return Ok(());
    };
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // An optional second argument runs one mode only (`dedup` or `claims`), for a profiler.
    let only = std::env::args().nth(2);
    let mut raw = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let keys = workload();
    let n = keys.len() as f64;
    println!("mode    keys/s   client µs/key   Redis µs/key");
    for round in 0..rounds {
        for claims in [false, true] {
            let mode = if claims { "claims" } else { "dedup" };
            if only.as_deref().is_some_and(|o| o != mode) {
                continue;
            }
            let namespace = format!("redis-cpu-{}-{round}-{claims}", std::process::id());
            let store = RedisStore::connect(&url, &namespace).await?;
            let window = Window::max_keys(1_000)
                .ttl(Duration::from_secs(300))
                .store(store)
                .batch_size(1_000)
                .max_in_flight(4)
                .timeout(Duration::from_secs(10));
            let (client0, redis0, start) = (own_cpu(), redis_cpu(&mut raw).await?, Instant::now());
            let items = futures::stream::iter(keys.iter().cloned());
            if claims {
                items
                    .claim_by_key(|k| k.clone(), window)
                    .map(|claim| async move { claim.commit().await })
                    .buffer_unordered(4_000)
                    .for_each(|committed| async move {
                        if let Err(e) = committed {
                            eprintln!("commit failed: {e}");
                        }
                    })
                    .await;
            } else {
                items.dedup_by_key(|k| k.clone(), window).count().await;
            }
            let wall = start.elapsed().as_secs_f64();
            let (client1, redis1) = (own_cpu(), redis_cpu(&mut raw).await?);
            println!(
                "{:6} {:7.0}k {:13.2} {:14.2}",
                mode,
                n / wall / 1e3,
                (client1 - client0) / n * 1e6,
                (redis1 - redis0) / n * 1e6,
            );
            // In chunks: one pipeline of 200,000 commands can outlast the connection's
            // response timeout on a slow machine.
            for chunk in keys.chunks(1_000) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("UNLINK")
                        .arg(format!("{namespace}:{key}"))
                        .ignore();
                }
                pipe.exec_async(&mut raw).await?;
            }
        }
    }
    Ok(())
}
