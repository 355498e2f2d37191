//! RocketMQ's redeliveries against a real name server and broker, each scenario run twice side
//! by side: with claims (`claim_by_key` on a Redis store), which must apply every effect
//! exactly once, and with mark-on-emit (`dedup_by_key` on the same store), to show what it
//! loses. Every run is checked per key against a ledger of deliveries and effects, and its
//! figures are printed (`cargo test -p stream-dedup-rocketmq -- --nocapture`).
//!
//! The scenarios run in parallel in this one binary: the consume-timeout one alone waits over
//! two minutes (the client counts its consume timeout in minutes and scans for expired
//! messages once per timeout).
//!
//! Needs `STREAM_DEDUP_ROCKETMQ_NAMESRV` (`.ci/rocketmq.sh` starts a name server and a
//! broker) and `STREAM_DEDUP_REDIS_URL`; without them each test says that it skipped.

mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use stream_dedup_rocketmq::{ClientHost, ConsumerOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::{Instant, sleep};

use support::{Behaviour, Consumer, Ledger, Mode, Plan, Report, Setup};

/// How long no delivery must arrive, once everything expected came back, before a run ends.
const QUIET: Duration = Duration::from_secs(3);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The order number of a key `{10000 + i}/payment`: `i`.
fn index(key: &str) -> usize {
    key.split('/')
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(usize::MAX, |n| n - 10_000)
}

async fn publish(setup: &Setup, keys: &[String]) {
    let host = ClientHost::start(&ConsumerOptions::new()).expect("a client runtime");
    support::publish(&host, &setup.namesrv, &setup.topic, keys).await;
    host.shutdown().await;
}

/// Publishes `keys`, consumes them with one consumer until the run settles, and reports.
async fn one_consumer(
    setup: Setup,
    keys: Vec<String>,
    behaviour: Behaviour,
    limit: Duration,
) -> Report {
    publish(&setup, &keys).await;
    let ledger = Arc::new(Ledger::default());
    let consumer = Consumer::start(&setup, ledger.clone(), behaviour).await;
    let n = keys.len();
    let claims = setup.mode == Mode::Claims;
    // With claims every key ends with an effect; on emit, lost keys never do.
    let settled = support::settle(&ledger, QUIET, limit, |l| {
        l.delivered_keys(1) == n && (!claims || l.effected() == n)
    })
    .await;
    let listener = consumer.stop().await;
    let report = ledger.report(&keys);
    println!(
        "{} ({}{}): listener answered {} ConsumeSuccess, {} ReconsumeLater ({} past the ack timeout)\n{report}",
        setup.mode.name(),
        setup.topic,
        if settled { "" } else { ", did NOT settle" },
        listener.succeeded,
        listener.reconsumed,
        listener.timed_out,
    );
    report
}

fn assert_exactly_once(report: &Report) {
    assert!(report.lost.is_empty(), "claims lost messages: {report}");
    assert!(
        report.doubled.is_empty(),
        "claims doubled effects: {report}"
    );
    assert_eq!(report.counts.effects as usize, report.messages, "{report}");
}

/// A failed handler answers `ReconsumeLater`: the message goes to the group's retry topic and
/// comes back after its delay level (3 + the times it came back already: 10 s, then 30 s).
/// One order in 10 fails once, one in 20 twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(server_rocketmq, server_redis)),
    ignore = "set STREAM_DEDUP_ROCKETMQ_NAMESRV and STREAM_DEDUP_REDIS_URL"
)]
async fn reconsume_later_comes_back_after_its_delay_level() {
    let Some((namesrv, redis)) =
        support::servers("reconsume_later_comes_back_after_its_delay_level")
    else {
        return;
    };
    let keys = support::order_keys(100);
    let behaviour: Behaviour = Arc::new(|key, attempt| {
        let i = index(key);
        Plan {
            work: ms(20),
            fail: (i.is_multiple_of(10) && attempt == 1) || (i.is_multiple_of(20) && attempt == 2),
            ..Plan::default()
        }
    });
    let limit = Duration::from_secs(150);
    let (claims, on_emit) = tokio::join!(
        one_consumer(
            Setup::new(&namesrv, &redis, "reconsume", Mode::Claims),
            keys.clone(),
            behaviour.clone(),
            limit
        ),
        one_consumer(
            Setup::new(&namesrv, &redis, "reconsume", Mode::MarkOnEmit),
            keys.clone(),
            behaviour,
            limit
        ),
    );
    assert_exactly_once(&claims);
    assert_eq!(
        claims.counts.after_failure, 15,
        "10 first failures, 5 second: {claims}"
    );
    // On emit the key is marked when the failing run starts: the retry is a "duplicate".
    assert_eq!(
        on_emit.lost.len(),
        10,
        "mark-on-emit loses every failed order: {on_emit}"
    );
    assert!(on_emit.doubled.is_empty(), "{on_emit}");
}

/// A handler that outlasts the consumer's consume timeout (1 minute, the client's smallest)
/// has its message sent back by the client's periodic scan while it still runs: the copy
/// arrives (10 s later) while the key is in flight and is held back; once the original
/// settles it comes back as a duplicate (the original succeeded) or is processed (the
/// original failed: the client no longer sends that failure back, so the copy is the only
/// chance). Four slow orders, two of which fail after their copy arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(server_rocketmq, server_redis)),
    ignore = "set STREAM_DEDUP_ROCKETMQ_NAMESRV and STREAM_DEDUP_REDIS_URL"
)]
async fn a_copy_sent_back_by_the_consume_timeout_is_held_back_while_the_original_runs() {
    let Some((namesrv, redis)) = support::servers(
        "a_copy_sent_back_by_the_consume_timeout_is_held_back_while_the_original_runs",
    ) else {
        return;
    };
    let keys = support::order_keys(40);
    let behaviour: Behaviour = Arc::new(|key, attempt| {
        let i = index(key);
        if i.is_multiple_of(10) && attempt == 1 {
            Plan {
                // The scan runs once a minute and sends back what ran over a minute: the
                // copy comes within ~2 min 10 s.
                until_expired: Some(Duration::from_secs(200)),
                work: Duration::from_secs(2),
                fail: i % 20 == 10,
            }
        } else {
            Plan {
                work: ms(20),
                ..Plan::default()
            }
        }
    });
    let setup = |mode| {
        let mut s = Setup::new(&namesrv, &redis, "expiry", mode);
        s.consume_timeout_minutes = 1;
        // The listener waits past the consume timeout (the client's scan, not the ack
        // timeout, sends the message back), and the claims outlive the slow handlers.
        s.options = ConsumerOptions::new()
            .concurrency(8)
            .ack_timeout(Duration::from_secs(240));
        s.lease = Duration::from_secs(270);
        s
    };
    let limit = Duration::from_secs(360);
    let (claims, on_emit) = tokio::join!(
        one_consumer(setup(Mode::Claims), keys.clone(), behaviour.clone(), limit),
        one_consumer(setup(Mode::MarkOnEmit), keys.clone(), behaviour, limit),
    );
    assert_exactly_once(&claims);
    assert_eq!(
        claims.counts.after_timeout, 4,
        "each slow order was sent back: {claims}"
    );
    assert!(
        claims.counts.held_back >= 4,
        "the copies were held back: {claims}"
    );
    assert_eq!(on_emit.counts.after_timeout, 4, "{on_emit}");
    // On emit the copy is a "duplicate" and is acked; the original then fails: lost.
    assert_eq!(
        on_emit.lost.len(),
        2,
        "mark-on-emit loses the slow orders that failed: {on_emit}"
    );
    assert!(on_emit.doubled.is_empty(), "{on_emit}");
}

/// The environment of the killed consumer process.
const CHILD_ENV: &str = "STREAM_DEDUP_ROCKETMQ_TEST_CHILD";

/// A consumer killed (SIGKILL) before its first offset persist (10 s after it starts, then
/// every 5 s): the next consumer of the group starts from the last persisted offset, here the
/// first one, and every message is replayed. 95 orders were processed and committed, 5 were
/// still running (their claims in flight: the replays are held back until the lease frees
/// them; on emit their keys are marked: the replays are dropped and acked, and they are
/// lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(server_rocketmq, server_redis)),
    ignore = "set STREAM_DEDUP_ROCKETMQ_NAMESRV and STREAM_DEDUP_REDIS_URL"
)]
async fn a_consumer_killed_before_its_offsets_were_persisted_is_replayed() {
    let Some((namesrv, redis)) =
        support::servers("a_consumer_killed_before_its_offsets_were_persisted_is_replayed")
    else {
        return;
    };
    let (claims, on_emit) = tokio::join!(
        killed_then_replayed(Setup::new(&namesrv, &redis, "kill", Mode::Claims)),
        killed_then_replayed(Setup::new(&namesrv, &redis, "kill", Mode::MarkOnEmit)),
    );
    assert_exactly_once(&claims);
    assert_eq!(
        claims.counts.replays, 100,
        "every message was replayed: {claims}"
    );
    assert_eq!(on_emit.counts.replays, 100, "{on_emit}");
    assert_eq!(
        on_emit.lost.len(),
        5,
        "mark-on-emit loses the orders in flight: {on_emit}"
    );
    assert!(on_emit.doubled.is_empty(), "{on_emit}");
}

async fn killed_then_replayed(mut setup: Setup) -> Report {
    setup.lease = Duration::from_secs(10);
    let keys = support::order_keys(100);
    publish(&setup, &keys).await;
    let ledger = Arc::new(Ledger::default());

    // The first consumer: this test binary again, running `killed_consumer_process`.
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--ignored",
            "--exact",
            "killed_consumer_process",
            "--nocapture",
        ])
        .env(
            CHILD_ENV,
            format!(
                "{} {} {} {} {}",
                setup.namesrv,
                setup.redis,
                setup.topic,
                setup.group,
                setup.mode.name()
            ),
        )
        .env("STREAM_DEDUP_ROCKETMQ_TEST_NAMESPACE", &setup.namespace)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the consumer process");
    let started = Instant::now();
    let mut lines = BufReader::new(child.stdout.take().expect("its stdout")).lines();
    // Until 95 effects and the 5 slow handlers started, then a moment (the last commits).
    let slow = |key: &str| index(key).is_multiple_of(20);
    let (mut effects, mut slow_started) = (0, 0);
    while effects < 95 || slow_started < 5 {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the consumer process reports within a minute")
            .expect("its stdout")
            .expect("the consumer process exited early");
        if ledger.replay(&line) {
            let mut words = line.split_whitespace().skip(1);
            match (words.next(), words.next()) {
                (Some("effect"), _) => effects += 1,
                (Some("started"), Some(key)) if slow(key) => slow_started += 1,
                _ => {}
            }
        }
    }
    sleep(ms(300)).await;
    child.start_kill().expect("kill the consumer process");
    let _ = child.wait().await;
    let killed_after = started.elapsed();
    // Events printed before the kill and not read yet.
    while let Ok(Some(line)) = lines.next_line().await {
        ledger.replay(&line);
    }
    ledger.forget_running();

    // The next consumer of the group.
    let fast: Behaviour = Arc::new(|_, _| Plan {
        work: ms(10),
        ..Plan::default()
    });
    let consumer = Consumer::start(&setup, ledger.clone(), fast).await;
    let claims = setup.mode == Mode::Claims;
    // Every key is replayed; with claims every key ends with an effect.
    let settled = support::settle(&ledger, QUIET, Duration::from_secs(150), |l| {
        l.delivered_keys(2) == keys.len() && (!claims || l.effected() == keys.len())
    })
    .await;
    let listener = consumer.stop().await;
    let report = ledger.report(&keys);
    println!(
        "{} ({}{}): first consumer killed {killed_after:.1?} after it started; the next one \
         answered {} ConsumeSuccess, {} ReconsumeLater\n{report}",
        setup.mode.name(),
        setup.topic,
        if settled { "" } else { ", did NOT settle" },
        listener.succeeded,
        listener.reconsumed,
    );
    assert!(
        killed_after < Duration::from_secs(10),
        "the consumer must be killed before its first offset persist (10 s)"
    );
    report
}

/// The consumer process that `a_consumer_killed_before_its_offsets_were_persisted_is_replayed`
/// starts and kills: it consumes, printing every event of its ledger; orders `i.is_multiple_of(20)`
/// take two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the consumer process of a_consumer_killed_before_its_offsets_were_persisted_is_replayed"]
async fn killed_consumer_process() {
    let env = std::env::var(CHILD_ENV).expect("run by the kill test only");
    let words: Vec<&str> = env.split_whitespace().collect();
    let [namesrv, redis, topic, group, mode] = words[..] else {
        panic!("malformed {CHILD_ENV}: {env}");
    };
    let mode = if mode == Mode::Claims.name() {
        Mode::Claims
    } else {
        Mode::MarkOnEmit
    };
    let mut setup = Setup::new(namesrv, redis, "kill", mode);
    setup.topic = topic.to_owned();
    setup.group = group.to_owned();
    setup.namespace =
        std::env::var("STREAM_DEDUP_ROCKETMQ_TEST_NAMESPACE").expect("the store's namespace");
    setup.lease = Duration::from_secs(10);
    setup.options = ConsumerOptions::new()
        .concurrency(10)
        .ack_timeout(Duration::from_secs(180));
    let behaviour: Behaviour = Arc::new(|key, _| Plan {
        work: if index(key).is_multiple_of(20) {
            Duration::from_secs(120)
        } else {
            ms(10)
        },
        ..Plan::default()
    });
    let _consumer = Consumer::start(&setup, Arc::new(Ledger::echoing()), behaviour).await;
    sleep(Duration::from_secs(120)).await; // killed long before
}

/// Two consumers in one group: the second joins while the first is busy, the broker tells
/// the first, and the four queues are split between them. The queues that move are consumed
/// again by the second from their last persisted offset: copies of messages the first one
/// had in flight (held back) or had done (duplicates). One order in 25 fails once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(server_rocketmq, server_redis)),
    ignore = "set STREAM_DEDUP_ROCKETMQ_NAMESRV and STREAM_DEDUP_REDIS_URL"
)]
async fn a_second_consumer_joining_rebalances_the_queues() {
    let Some((namesrv, redis)) =
        support::servers("a_second_consumer_joining_rebalances_the_queues")
    else {
        return;
    };
    let (claims, on_emit) = tokio::join!(
        two_consumers(Setup::new(&namesrv, &redis, "rebalance", Mode::Claims)),
        two_consumers(Setup::new(&namesrv, &redis, "rebalance", Mode::MarkOnEmit)),
    );
    assert_exactly_once(&claims);
    assert_eq!(
        on_emit.lost.len(),
        16,
        "mark-on-emit loses every failed order: {on_emit}"
    );
    assert!(on_emit.doubled.is_empty(), "{on_emit}");
}

async fn two_consumers(setup: Setup) -> Report {
    let keys = support::order_keys(400);
    publish(&setup, &keys).await;
    let ledger = Arc::new(Ledger::default());
    // One order in 10 takes 2 s on its first try: when the queues move, such a message pins
    // its queue's offset on the first consumer, and the second consumer starts there.
    let behaviour: Behaviour = Arc::new(|key, attempt| {
        let i = index(key);
        Plan {
            work: if i % 10 == 5 && attempt == 1 {
                Duration::from_secs(2)
            } else {
                ms(100)
            },
            fail: i.is_multiple_of(25) && attempt == 1,
            ..Plan::default()
        }
    });
    let first = Consumer::start(&setup, ledger.clone(), behaviour.clone()).await;
    // The second joins once the first is well under way.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger.counts().effects < 60 && Instant::now() < deadline {
        sleep(ms(50)).await;
    }
    let joined_at = ledger.counts().effects;
    let second = Consumer::start(&setup, ledger.clone(), behaviour).await;
    let claims = setup.mode == Mode::Claims;
    let settled = support::settle(&ledger, QUIET, Duration::from_secs(150), |l| {
        l.delivered_keys(1) == keys.len() && (!claims || l.effected() == keys.len())
    })
    .await;
    let (a, b) = tokio::join!(first.stop(), second.stop());
    let report = ledger.report(&keys);
    println!(
        "{} ({}{}): the second consumer joined after {joined_at} effects; ConsumeSuccess \
         {} + {}, ReconsumeLater {} + {}\n{report}",
        setup.mode.name(),
        setup.topic,
        if settled { "" } else { ", did NOT settle" },
        a.succeeded,
        b.succeeded,
        a.reconsumed,
        b.reconsumed,
    );
    assert!(
        a.succeeded > 0 && b.succeeded > 0,
        "both consumers consumed: the queues were split"
    );
    report
}
