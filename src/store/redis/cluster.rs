//! Redis Cluster: the hash slot of each key (CRC16), the slot map read from the cluster, and
//! one pipeline per node, with the keys that were redirected sent again one by one.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, ServerErrorKind, Value};

use super::error::{Target, map_error};
use crate::store::StoreError;

/// Redis Cluster's number of hash slots.
const SLOTS: usize = 16384;

/// A Redis Cluster connection, with the slot map that routes the pipelines.
pub(super) struct Cluster {
    conn: ClusterConnection,
    /// The slot map as last read; `None` until the first call and after a redirect.
    slots: Mutex<Option<Arc<SlotMap>>>,
}

impl Cluster {
    /// `conn`, with no slot map yet (it is read on the first call).
    pub(super) fn new(conn: ClusterConnection) -> Cluster {
        Cluster {
            conn,
            slots: Mutex::new(None),
        }
    }

    /// One pipeline per node, concurrently; redirected keys again one by one.
    pub(super) async fn run(
        &self,
        op: &'static str,
        keys: &[Vec<u8>],
        cmd: &impl Fn(usize, &[u8]) -> Cmd,
        timeout: Duration,
        target: &Target,
    ) -> Result<Vec<Value>, StoreError> {
        let map = self.slot_map(timeout, target).await?;
        let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); map.nodes];
        let mut one_by_one = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match map.node_of(key_slot(key)) {
                Some(node) => per_node[node].push(i),
                None => one_by_one.push(i),
            }
        }

        let pipelines = per_node.iter().filter(|ks| !ks.is_empty()).map(|ks| {
            let mut pipe = Pipeline::with_capacity(ks.len());
            for &i in ks {
                pipe.add_command(cmd(i, &keys[i]));
            }
            // Every key of `ks` is on the node of its first key, by our slot map.
            let route = Route::with_key(&keys[ks[0]], SlotAddr::Master);
            let mut conn = self.conn.clone();
            async move {
                let replies = conn
                    .route_pipeline(
                        pipe,
                        0,
                        ks.len(),
                        SingleNodeRoutingInfo::SpecificNode(route),
                    )
                    .await;
                (ks, replies)
            }
        });
        let mut replies: Vec<Option<Value>> = (0..keys.len()).map(|_| None).collect();
        for (ks, answer) in join_all(pipelines).await {
            let answer = match answer {
                Ok(answer) => answer,
                // redis-rs re-sends a whole pipeline to the node a redirect names; keys of
                // other slots bounce, and the redirect comes back as the pipeline's error.
                Err(e) if is_redirect_error(&e) => {
                    one_by_one.extend_from_slice(ks);
                    continue;
                }
                Err(e) => return Err(map_error(op, e, timeout, target)),
            };
            if answer.len() != ks.len() {
                return Err(StoreError::backend(
                    op,
                    format!(
                        "a node sent {} replies to {} commands",
                        answer.len(),
                        ks.len()
                    ),
                ));
            }
            for (&i, reply) in ks.iter().zip(answer) {
                if is_redirect(&reply) {
                    one_by_one.push(i);
                } else {
                    replies[i] = Some(reply);
                }
            }
        }

        if !one_by_one.is_empty() {
            // The slot map is out of date (slots moving, or a failover): read it again next
            // time, and let redis-rs's routing follow the redirects for these keys now.
            *self.slots.lock().unwrap_or_else(PoisonError::into_inner) = None;
            let singles = one_by_one.into_iter().map(|i| {
                let cmd = cmd(i, &keys[i]);
                let mut conn = self.conn.clone();
                async move { (i, cmd.query_async::<Value>(&mut conn).await) }
            });
            for (i, reply) in join_all(singles).await {
                replies[i] = Some(reply.map_err(|e| map_error(op, e, timeout, target))?);
            }
        }
        replies
            .into_iter()
            .map(|r| r.ok_or_else(|| StoreError::backend(op, "a key got no reply")))
            .collect()
    }

    /// The slot map, read with `CLUSTER SLOTS` when there is none.
    async fn slot_map(
        &self,
        timeout: Duration,
        target: &Target,
    ) -> Result<Arc<SlotMap>, StoreError> {
        const OP: &str = "read the cluster's slot map";
        if let Some(map) = &*self.slots.lock().unwrap_or_else(PoisonError::into_inner) {
            return Ok(Arc::clone(map));
        }
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let reply = self
            .conn
            .clone()
            .route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await
            .map_err(|e| map_error(OP, e, timeout, target))?;
        let map = Arc::new(SlotMap::parse(&reply).map_err(|e| StoreError::backend(OP, e))?);
        *self.slots.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&map));
        Ok(map)
    }
}

/// Which node (an index) serves each hash slot, from `CLUSTER SLOTS`.
#[derive(Debug)]
struct SlotMap {
    /// Per slot, the node's index, or `u16::MAX` when no node serves it.
    owner: Vec<u16>,
    /// How many nodes.
    nodes: usize,
}

impl SlotMap {
    /// Parses the reply of `CLUSTER SLOTS`: `[[start, end, [host, port, ..], replicas..], ..]`.
    fn parse(reply: &Value) -> Result<SlotMap, String> {
        let bad = || format!("unexpected reply to CLUSTER SLOTS: {reply:?}");
        let Value::Array(ranges) = reply else {
            return Err(bad());
        };
        let mut owner = vec![u16::MAX; SLOTS];
        let mut nodes: Vec<(Vec<u8>, i64)> = Vec::new();
        for range in ranges {
            let Value::Array(range) = range else {
                return Err(bad());
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
                (range.first(), range.get(1), range.get(2))
            else {
                return Err(bad());
            };
            let host = match primary.first() {
                Some(Value::BulkString(host)) => host.clone(),
                Some(Value::SimpleString(host)) => host.clone().into_bytes(),
                _ => return Err(bad()),
            };
            let Some(Value::Int(port)) = primary.get(1) else {
                return Err(bad());
            };
            let node = (host, *port);
            let index = match nodes.iter().position(|n| *n == node) {
                Some(index) => index,
                None => {
                    nodes.push(node);
                    nodes.len() - 1
                }
            };
            let index = u16::try_from(index).map_err(|_| bad())?;
            let (Ok(start), Ok(end)) = (usize::try_from(*start), usize::try_from(*end)) else {
                return Err(bad());
            };
            if start > end || end >= SLOTS {
                return Err(bad());
            }
            owner[start..=end].fill(index);
        }
        Ok(SlotMap {
            owner,
            nodes: nodes.len(),
        })
    }

    fn node_of(&self, slot: u16) -> Option<usize> {
        match self.owner[usize::from(slot)] {
            u16::MAX => None,
            node => Some(usize::from(node)),
        }
    }
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the bytes between
/// the first `{` and the next `}`, when not empty) or of the whole key, modulo 16384.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(tagged) % (SLOTS as u16)
}

/// CRC16-CCITT (XMODEM), as Redis Cluster uses it.
fn crc16(bytes: &[u8]) -> u16 {
    const TABLE: [u16; 256] = {
        let mut table = [0u16; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = (i as u16) << 8;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ TABLE[usize::from(((crc >> 8) as u8) ^ b)]
    })
}

/// A node's answer that the key lives elsewhere (or is moving) right now.
fn is_redirect(reply: &Value) -> bool {
    matches!(reply, Value::ServerError(e) if e.kind().is_some_and(is_redirect_kind))
}

fn is_redirect_error(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::Server(kind) if is_redirect_kind(kind))
}

fn is_redirect_kind(kind: ServerErrorKind) -> bool {
    matches!(
        kind,
        ServerErrorKind::Moved | ServerErrorKind::Ask | ServerErrorKind::TryAgain
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Checked with `CLUSTER KEYSLOT` on a Redis 7.0 cluster node.
        let cases: [(&[u8], u16); 10] = [
            (b"foo", 12182),
            (b"somekey", 11058),
            (b"{user1000}.following", 3443),
            (b"a{}b", 13694),
            (b"ns:{x}y{z}", 16287),
            (b"x", 16287),
            (b"", 0),
            (b"ns:{}{a}", 5014),
            (b"ns:{a", 9629),
            (b"\xff\xfe", 3374),
        ];
        for (key, slot) in cases {
            assert_eq!(key_slot(key), slot, "{key:?}");
        }
        assert_eq!(crc16(b"123456789"), 0x31c3);
    }

    #[test]
    fn slot_map_from_cluster_slots() {
        let node = |port| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range =
            |start, end, port| Value::Array(vec![Value::Int(start), Value::Int(end), node(port)]);
        let reply = Value::Array(vec![
            range(0, 5460, 7000),
            range(5461, 10922, 7001),
            range(10923, 16382, 7000),
        ]);
        let map = SlotMap::parse(&reply).unwrap();
        assert_eq!(map.nodes, 2);
        assert_eq!(map.node_of(0), Some(0));
        assert_eq!(map.node_of(5461), Some(1));
        assert_eq!(map.node_of(16382), Some(0));
        assert_eq!(map.node_of(16383), None);
        assert!(SlotMap::parse(&Value::Okay).is_err());
        assert!(SlotMap::parse(&Value::Array(vec![range(5, 16384, 7000)])).is_err());
    }
}
