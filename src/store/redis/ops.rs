//! The calls of [`RedisStore`](super::RedisStore) as pipelines: insert, claim, commit,
//! release and remove, the commands they send, and the parsing of their replies.

use std::io::Write as _;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Cmd, Pipeline, RedisWrite, ToRedisArgs, Value};

use super::cluster::Cluster;
use super::error::{Target, map_error, unexpected};
use super::scripts::{
    COMMIT_SCRIPT, IN_FLIGHT_MAX, KEYS_PER_SCRIPT, RELEASE_SCRIPT, RENEW_SCRIPT, TAKE_BACK_SCRIPT,
    TAKEOVER_SCRIPT, in_flight_prefix, in_flight_value, is_in_flight, refused_positions,
    takeover_answers, token_runs,
};
use crate::store::{ClaimBatch, Claimed, HeldKey, InsertBatch, Inserted, StoreError, Token};

/// Redis refuses a bulk string longer than `proto-max-bulk-len` (512 MiB by default).
pub(super) const MAX_KEY_LEN: usize = 512 * 1024 * 1024;
/// The longest ttl sent to Redis (100 years); Redis refuses an expiry that overflows its clock.
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// The state of a [`RedisStore`](super::RedisStore), shared by its clones.
pub(super) struct Inner {
    pub(super) conn: Conn,
    pub(super) namespace: Box<str>,
    /// `namespace` and `:`, the start of every Redis key of this store.
    pub(super) prefix: Box<[u8]>,
    /// The deadline of one call.
    pub(super) timeout: Duration,
    /// The longest key (without the prefix) that the store takes.
    pub(super) max_key_len: usize,
    /// Where the connection goes, for error messages.
    pub(super) target: Target,
}

/// The connection: to one Redis node (or a proxy), or to a Redis Cluster.
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(Cluster),
}

/// A Redis key as one command argument: the namespace prefix, then the key's bytes, written
/// straight into the command (no buffer of its own).
#[derive(Clone, Copy)]
struct Prefixed<'a>(&'a [u8], &'a [u8]);

impl Prefixed<'_> {
    fn len(self) -> usize {
        self.0.len() + self.1.len()
    }
}

impl ToRedisArgs for Prefixed<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut arg = out.writer_for_next_arg();
        // Writes into the command's own buffer, which cannot fail.
        let _ = arg.write_all(self.0);
        let _ = arg.write_all(self.1);
    }
}

/// An empty `SET` for a key of `key_len` bytes, sized for its arguments (value, `NX`, `GET`,
/// `PX`, ttl): built without a reallocation, as every key of every batch needs one.
fn set_command(key_len: usize) -> Cmd {
    let mut cmd = Cmd::with_capacity(7, key_len + IN_FLIGHT_MAX + 3 + 2 + 3 + 2 + 20);
    cmd.arg("SET");
    cmd
}

/// A claim's ttl in ms for its in-flight value: `0` when the batch gives none.
fn keep_millis(ttl: Duration) -> u64 {
    if ttl.is_zero() { 0 } else { ttl_millis(ttl) }
}

/// The ttl in whole milliseconds, rounded up, between 1 ms and 100 years.
fn ttl_millis(ttl: Duration) -> u64 {
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).clamp(1, MAX_TTL_MS)
}

impl Inner {
    pub(super) async fn insert(&self, batch: InsertBatch) -> Result<Vec<Inserted>, StoreError> {
        const OP: &str = "insert keys";
        if batch.keys.is_empty() {
            return Ok(Vec::new());
        }
        let token = batch.token.to_bytes();
        let ttl = ttl_millis(batch.ttl);
        self.check_keys(&batch.keys)?;
        let keys = &batch.keys;
        let replies = self
            .run(OP, keys, |_, key| {
                let mut cmd = set_command(key.len());
                cmd.arg(key)
                    .arg(&token[..])
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(ttl);
                cmd
            })
            .await?;
        replies
            .into_iter()
            .map(|reply| match reply {
                Value::Nil => Ok(Inserted::New),
                Value::BulkString(held) if held == token => Ok(Inserted::New),
                Value::BulkString(_) => Ok(Inserted::Present),
                other => Err(unexpected(OP, other)),
            })
            .collect()
    }

    pub(super) async fn claim(&self, batch: ClaimBatch) -> Result<Vec<Claimed>, StoreError> {
        const OP: &str = "claim keys";
        if batch.keys.is_empty() {
            return Ok(Vec::new());
        }
        // The lease is what the expiry holds beyond the ttl: the ttl is cut short rather than
        // the lease when the two exceed Redis's longest expiry.
        let lease_ms = ttl_millis(batch.lease);
        let keep = keep_millis(batch.ttl).min(MAX_TTL_MS - lease_ms);
        let px = lease_ms + keep;
        let mine = in_flight_value(batch.token, keep);
        let prefix = in_flight_prefix(batch.token);
        self.check_keys(&batch.keys)?;
        let keys = &batch.keys;
        let replies = self
            .run(OP, keys, |_, key| {
                let mut cmd = set_command(key.len());
                cmd.arg(key)
                    .arg(&mine[..])
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(px);
                cmd
            })
            .await?;
        let mut answers = Vec::with_capacity(replies.len());
        // Keys in flight under another claim: their lease may have run out.
        let mut busy = Vec::new();
        for (i, reply) in replies.into_iter().enumerate() {
            answers.push(match reply {
                Value::Nil => Claimed::Mine,
                // A retry of this request (its first attempt was applied).
                Value::BulkString(held) if held.starts_with(&prefix) => Claimed::Mine,
                Value::BulkString(held) if is_in_flight(&held) => {
                    busy.push(i);
                    Claimed::InFlight
                }
                Value::BulkString(_) => Claimed::Done,
                other => return Err(unexpected(OP, other)),
            });
        }
        if !busy.is_empty() {
            let busy_keys: Vec<Vec<u8>> = busy.iter().map(|&i| keys[i].clone()).collect();
            let replies = self
                .run_scripts(OP, &busy_keys, |range| {
                    let mut cmd = self.script(TAKEOVER_SCRIPT, &busy_keys[range]);
                    cmd.arg(&mine[..]).arg(px);
                    cmd
                })
                .await?;
            for (range, reply) in replies {
                let taken = takeover_answers(OP, reply)?;
                if taken.len() != range.len() {
                    return Err(StoreError::backend(
                        OP,
                        format!("{} answers for {} keys", taken.len(), range.len()),
                    ));
                }
                for (at, answer) in range.zip(taken) {
                    answers[busy[at]] = answer;
                }
            }
        }
        Ok(answers)
    }

    pub(super) async fn commit(
        &self,
        held: Vec<HeldKey>,
        ttl: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        const OP: &str = "commit claims";
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let (keys, tokens): (Vec<Vec<u8>>, Vec<Token>) = held.into_iter().unzip();
        self.check_keys(&keys)?;
        let ttl = ttl_millis(ttl);
        let replies = self
            .run_scripts(OP, &keys, |range| {
                let mut cmd = self.script(COMMIT_SCRIPT, &keys[range.clone()]);
                cmd.arg(ttl);
                for (n, token) in token_runs(&tokens[range]) {
                    cmd.arg(n)
                        .arg(&in_flight_value(token, ttl)[..])
                        .arg(&token.to_bytes()[..]);
                }
                cmd
            })
            .await?;
        let mut answers = vec![true; keys.len()];
        for (range, reply) in replies {
            for at in refused_positions(OP, range, reply)? {
                answers[at] = false;
            }
        }
        Ok(answers)
    }

    pub(super) async fn release(&self, held: Vec<HeldKey>) -> Result<(), StoreError> {
        const OP: &str = "release claims";
        if held.is_empty() {
            return Ok(());
        }
        let (keys, tokens): (Vec<Vec<u8>>, Vec<Token>) = held.into_iter().unzip();
        self.check_keys(&keys)?;
        let replies = self
            .run_scripts(OP, &keys, |range| {
                let mut cmd = self.script(RELEASE_SCRIPT, &keys[range.clone()]);
                for (n, token) in token_runs(&tokens[range]) {
                    cmd.arg(n).arg(&in_flight_prefix(token)[..]);
                }
                cmd
            })
            .await?;
        match replies
            .into_iter()
            .find(|(_, r)| !matches!(r, Value::Int(_)))
        {
            None => Ok(()),
            Some((_, other)) => Err(unexpected(OP, other)),
        }
    }

    pub(super) async fn renew(
        &self,
        held: Vec<HeldKey>,
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        const OP: &str = "renew leases";
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let (keys, tokens): (Vec<Vec<u8>>, Vec<Token>) = held.into_iter().unzip();
        self.check_keys(&keys)?;
        let lease = ttl_millis(lease);
        let replies = self
            .run_scripts(OP, &keys, |range| {
                let mut cmd = self.script(RENEW_SCRIPT, &keys[range.clone()]);
                cmd.arg(lease);
                for (n, token) in token_runs(&tokens[range]) {
                    cmd.arg(n).arg(&in_flight_prefix(token)[..]);
                }
                cmd
            })
            .await?;
        let mut answers = Vec::with_capacity(keys.len());
        for (range, reply) in replies {
            let Value::Array(items) = reply else {
                return Err(unexpected(OP, reply));
            };
            if items.len() != range.len() {
                return Err(StoreError::backend(
                    OP,
                    format!("{} answers for {} keys", items.len(), range.len()),
                ));
            }
            for item in items {
                answers.push(match item {
                    Value::Int(1) => true,
                    Value::Int(0) => false,
                    other => return Err(unexpected(OP, other)),
                });
            }
        }
        Ok(answers)
    }

    pub(super) async fn take_back(&self, held: Vec<HeldKey>) -> Result<(), StoreError> {
        const OP: &str = "take back keys";
        if held.is_empty() {
            return Ok(());
        }
        let (keys, tokens): (Vec<Vec<u8>>, Vec<Token>) = held.into_iter().unzip();
        self.check_keys(&keys)?;
        let replies = self
            .run_scripts(OP, &keys, |range| {
                let mut cmd = self.script(TAKE_BACK_SCRIPT, &keys[range.clone()]);
                for (n, token) in token_runs(&tokens[range]) {
                    cmd.arg(n).arg(&token.to_bytes()[..]);
                }
                cmd
            })
            .await?;
        match replies
            .into_iter()
            .find(|(_, r)| !matches!(r, Value::Int(_)))
        {
            None => Ok(()),
            Some((_, other)) => Err(unexpected(OP, other)),
        }
    }

    /// The longest key this store takes: the builder's limit, at most Redis's less the
    /// namespace prefix.
    pub(super) fn max_key_len(&self) -> usize {
        self.max_key_len
    }

    pub(super) async fn remove(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        const OP: &str = "remove keys";
        if keys.is_empty() {
            return Ok(());
        }
        self.check_keys(&keys)?;
        let replies = self
            .run(OP, &keys, |_, key| {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(key);
                cmd
            })
            .await?;
        match replies.into_iter().find(|r| !matches!(r, Value::Int(_))) {
            None => Ok(()),
            Some(other) => Err(unexpected(OP, other)),
        }
    }

    /// Fails if a key is longer than [`max_key_len`](Self::max_key_len) (the operators never
    /// send one: they give its item alone the failure policy).
    fn check_keys(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let max = self.max_key_len;
        match keys.iter().find(|key| key.len() > max) {
            Some(key) => Err(StoreError::KeyTooLong {
                len: key.len(),
                max,
            }),
            None => Ok(()),
        }
    }

    /// `EVAL script` on `keys` (prefixed), sized for them; the caller adds the arguments.
    fn script(&self, script: &str, keys: &[Vec<u8>]) -> Cmd {
        let bytes: usize = keys.iter().map(|k| self.prefix.len() + k.len()).sum();
        let mut cmd = Cmd::with_capacity(keys.len() + 8, bytes + script.len() + 256);
        cmd.arg("EVAL").arg(script).arg(keys.len());
        for key in keys {
            cmd.arg(self.prefixed(key));
        }
        cmd
    }

    /// `key` as its Redis key: the prefix, then the key's bytes.
    fn prefixed<'a>(&'a self, key: &'a [u8]) -> Prefixed<'a> {
        Prefixed(&self.prefix, key)
    }

    /// The Redis keys, each in a buffer of its own (to route them on a Cluster).
    fn full_keys(&self, keys: &[Vec<u8>]) -> Vec<Vec<u8>> {
        keys.iter()
            .map(|key| {
                let mut full = Vec::with_capacity(self.prefix.len() + key.len());
                full.extend_from_slice(&self.prefix);
                full.extend_from_slice(key);
                full
            })
            .collect()
    }

    /// One script command per chunk of [`KEYS_PER_SCRIPT`] keys (per key on a Cluster), made
    /// by `cmd` from the chunk's range, pipelined; the replies in order, one per command.
    async fn run_scripts(
        &self,
        op: &'static str,
        keys: &[Vec<u8>],
        cmd: impl Fn(std::ops::Range<usize>) -> Cmd,
    ) -> Result<Vec<(std::ops::Range<usize>, Value)>, StoreError> {
        let manager = match &self.conn {
            Conn::Single(manager) => manager,
            // The keys of one script call must share a slot: one call per key.
            Conn::Cluster(cluster) => {
                let full = self.full_keys(keys);
                let replies = cluster
                    .run(
                        op,
                        &full,
                        &|i, _: &[u8]| cmd(i..i + 1),
                        self.timeout,
                        &self.target,
                    )
                    .await?;
                let replies = self.replies(op, replies, keys.len())?;
                return Ok(replies
                    .into_iter()
                    .enumerate()
                    .map(|(i, reply)| (i..i + 1, reply))
                    .collect());
            }
        };
        let ranges: Vec<_> = (0..keys.len())
            .step_by(KEYS_PER_SCRIPT)
            .map(|start| start..keys.len().min(start + KEYS_PER_SCRIPT))
            .collect();
        let mut pipe = Pipeline::with_capacity(ranges.len());
        for range in &ranges {
            pipe.add_command(cmd(range.clone()));
        }
        pipe.ignore_errors();
        // Commits and releases compare tokens, so sending them again is safe.
        let replies = self.send(op, manager, &pipe).await?;
        let replies = self.replies(op, replies, ranges.len())?;
        Ok(ranges.into_iter().zip(replies).collect())
    }

    /// Sends `pipe` through the connection manager, once more if the connection was found
    /// broken (closed while idle, Redis restarted: the manager has started a new one). Every
    /// caller's commands are safe to repeat.
    async fn send(
        &self,
        op: &'static str,
        manager: &ConnectionManager,
        pipe: &Pipeline,
    ) -> Result<Vec<Value>, StoreError> {
        let mut conn = manager.clone();
        match pipe.query_async::<Vec<Value>>(&mut conn).await {
            Ok(replies) => Ok(replies),
            Err(e) if e.is_io_error() && !e.is_timeout() => pipe
                .query_async::<Vec<Value>>(&mut conn)
                .await
                .map_err(|e| map_error(op, e, self.timeout, &self.target)),
            Err(e) => Err(map_error(op, e, self.timeout, &self.target)),
        }
    }

    /// `expected` replies, each an error if Redis answered one.
    fn replies(
        &self,
        op: &'static str,
        replies: Vec<Value>,
        expected: usize,
    ) -> Result<Vec<Value>, StoreError> {
        if replies.len() != expected {
            return Err(StoreError::backend(
                op,
                format!(
                    "Redis sent {} replies to {expected} commands",
                    replies.len()
                ),
            ));
        }
        replies
            .into_iter()
            .map(|reply| match reply {
                Value::ServerError(e) => Err(map_error(op, e.into(), self.timeout, &self.target)),
                reply => Ok(reply),
            })
            .collect()
    }

    /// Sends `cmd(i, key)` for every key, pipelined, and returns the replies in the order of
    /// the keys. A reply that is a Redis error fails the call.
    async fn run(
        &self,
        op: &'static str,
        keys: &[Vec<u8>],
        cmd: impl Fn(usize, Prefixed<'_>) -> Cmd,
    ) -> Result<Vec<Value>, StoreError> {
        let replies = match &self.conn {
            Conn::Single(manager) => {
                let mut pipe = Pipeline::with_capacity(keys.len());
                for (i, key) in keys.iter().enumerate() {
                    pipe.add_command(cmd(i, self.prefixed(key)));
                }
                pipe.ignore_errors();
                // Safe to repeat: a key that holds this request's token answers `New`, and
                // `DEL` of a deleted key does nothing.
                self.send(op, manager, &pipe).await?
            }
            Conn::Cluster(cluster) => {
                let full = self.full_keys(keys);
                let cmd = |i: usize, _: &[u8]| cmd(i, self.prefixed(&keys[i]));
                cluster
                    .run(op, &full, &cmd, self.timeout, &self.target)
                    .await?
            }
        };
        self.replies(op, replies, keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_rounded_up_and_bounded() {
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::from_nanos(1)), 1);
        assert_eq!(ttl_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_millis(Duration::from_secs(300)), 300_000);
        assert_eq!(ttl_millis(Duration::MAX), MAX_TTL_MS);
    }
}
