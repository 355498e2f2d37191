//! The on-disk format: the format marker, stored keys, records (done or in flight) and the
//! buckets' names and widths. Golden tests pin it.

/// The keyspace that marks a directory as this crate's store.
pub(super) const MARKER_KEYSPACE: &str = "stream-dedup";
pub(super) const MARKER_KEY: &[u8] = b"format";
/// The marker of a store whose records are all done (24-byte values): every store that never
/// held a claim in flight, and every store written before claims existed.
pub(super) const FORMAT_1: &[u8] = b"stream-dedup embedded 1";
/// The marker of a store that may hold records in flight (25-byte values). Written with the
/// first claim, so that a version of this crate that knows only format 1 refuses the store at
/// open instead of failing on a record it cannot read. Changes whenever the format changes.
pub(super) const FORMAT_2: &[u8] = b"stream-dedup embedded 2";
/// Bucket keyspaces are named `{BUCKET_PREFIX}{namespace}#{exp}#{index}`.
const BUCKET_PREFIX: &str = "dedup#";
/// The byte before each key (fjall refuses empty keys; it leaves room for other records).
const KEY_TAG: u8 = 0;
/// A done record: token (16 bytes) + expiry in ms (8 bytes).
const DONE_LEN: usize = 24;
/// A record in flight: [`IN_FLIGHT_TAG`] + token (16 bytes) + end of the lease in ms (8 bytes).
const IN_FLIGHT_LEN: usize = 1 + DONE_LEN;
/// The first byte of a record in flight (`c`, as `RedisStore` marks its claims).
const IN_FLIGHT_TAG: u8 = b'c';
pub(super) const MAX_NAMESPACE_LEN: usize = 128;
/// The narrowest bucket: 2^10 ms = 1.024 s.
const MIN_BUCKET_EXP: u32 = 10;
/// Buckets per ttl (before rounding the width down to a power of two).
const BUCKETS_PER_TTL: u64 = 8;

pub(super) fn stored_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    out.push(KEY_TAG);
    out.extend_from_slice(key);
    out
}

/// What a key's record says: done or in flight, by which token, until when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Record {
    /// In flight (claimed, not yet committed); otherwise done.
    pub(super) in_flight: bool,
    pub(super) token: u128,
    /// The end of the ttl (done) or of the lease (in flight), in ms since the Unix epoch.
    pub(super) expires_ms: u64,
}

impl Record {
    pub(super) fn done(token: u128, expires_ms: u64) -> Record {
        Record {
            in_flight: false,
            token,
            expires_ms,
        }
    }

    pub(super) fn in_flight(token: u128, expires_ms: u64) -> Record {
        Record {
            in_flight: true,
            token,
            expires_ms,
        }
    }

    /// 24 bytes (done, the format of every version) or 25 (in flight).
    pub(super) fn encode(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(IN_FLIGHT_LEN);
        if self.in_flight {
            out.push(IN_FLIGHT_TAG);
        }
        out.extend_from_slice(&self.token.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out
    }

    /// The record, or `None` for a value this crate did not write.
    pub(super) fn decode(value: &[u8]) -> Option<Record> {
        let (in_flight, rest) = match value.len() {
            DONE_LEN => (false, value),
            IN_FLIGHT_LEN if value.first() == Some(&IN_FLIGHT_TAG) => (true, value.get(1..)?),
            _ => return None,
        };
        let token = u128::from_be_bytes(rest.get(..16)?.try_into().ok()?);
        let expires_ms = u64::from_be_bytes(rest.get(16..DONE_LEN)?.try_into().ok()?);
        Some(Record {
            in_flight,
            token,
            expires_ms,
        })
    }
}

/// One bucket: the keys whose expiry time lies in `[index << exp, (index + 1) << exp)` ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct BucketId {
    pub(super) exp: u32,
    pub(super) index: u64,
}

impl BucketId {
    /// The bucket of a done key: about an eighth of its ttl wide.
    pub(super) fn for_key(expires_ms: u64, ttl_ms: u64) -> BucketId {
        BucketId::of_width(expires_ms, ttl_ms / BUCKETS_PER_TTL)
    }

    /// The bucket of a key in flight: about one lease wide, so that the short-lived leases
    /// keep two or three buckets live, not a dozen more for every lookup to ask.
    pub(super) fn for_lease(expires_ms: u64, lease_ms: u64) -> BucketId {
        BucketId::of_width(expires_ms, lease_ms)
    }

    /// The bucket of `expires_ms` among buckets `width_ms` wide, rounded down to a power of two
    /// (at least 2^[`MIN_BUCKET_EXP`] ms).
    fn of_width(expires_ms: u64, width_ms: u64) -> BucketId {
        let exp = width_ms
            .checked_ilog2()
            .unwrap_or(0)
            .clamp(MIN_BUCKET_EXP, 62);
        BucketId {
            exp,
            index: expires_ms >> exp,
        }
    }

    /// The first moment (ms) after every expiry time of this bucket.
    pub(super) fn end_ms(self) -> u64 {
        self.index.saturating_add(1).saturating_mul(1 << self.exp)
    }

    pub(super) fn name(self, namespace: &str) -> String {
        format!("{BUCKET_PREFIX}{namespace}#{}#{}", self.exp, self.index)
    }

    pub(super) fn parse(name: &str, namespace: &str) -> Option<BucketId> {
        let rest = name.strip_prefix(BUCKET_PREFIX)?.strip_prefix(namespace)?;
        let (exp, index) = rest.strip_prefix('#')?.split_once('#')?;
        let id = BucketId {
            exp: exp.parse().ok()?,
            index: index.parse().ok()?,
        };
        (id.name(namespace) == name).then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The on-disk format: these must never change without a new format marker.
    #[test]
    fn golden_format() {
        assert_eq!(FORMAT_1, b"stream-dedup embedded 1");
        assert_eq!(FORMAT_2, b"stream-dedup embedded 2");
        assert_eq!(stored_key(b""), [0]);
        assert_eq!(stored_key(b"ab"), [0, b'a', b'b']);
        let token = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10_u128;
        let expires = 0x1122_3344_5566_7788;
        // Done: the format 1 value, unchanged.
        let done = Record::done(token, expires).encode();
        assert_eq!(
            done,
            [
                1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, //
                0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88
            ]
        );
        assert_eq!(Record::decode(&done), Some(Record::done(token, expires)));
        // In flight: `c`, then the same.
        let in_flight = Record::in_flight(token, expires).encode();
        assert_eq!(in_flight[0], b'c');
        assert_eq!(in_flight[1..], done[..]);
        assert_eq!(
            Record::decode(&in_flight),
            Some(Record::in_flight(token, expires))
        );
        // Anything else is not a record.
        assert_eq!(Record::decode(&done[..23]), None);
        assert_eq!(Record::decode(&[0; 25]), None);
        assert_eq!(Record::decode(&[b'c'; 26]), None);
        assert_eq!(Record::decode(&[]), None);
        let id = BucketId::for_key(1_700_000_000_000, 300_000);
        assert_eq!(id.exp, 15); // 300 s / 8 = 37.5 s → 32.768 s
        assert_eq!(id.name("orders"), "dedup#orders#15#51879882");
        assert_eq!(
            BucketId::parse("dedup#orders#15#51879882", "orders"),
            Some(id)
        );
    }

    #[test]
    fn bucket_widths() {
        // Short ttls share the narrowest bucket.
        assert_eq!(BucketId::for_key(5_000, 0).exp, MIN_BUCKET_EXP);
        assert_eq!(BucketId::for_key(5_000, 300).exp, MIN_BUCKET_EXP);
        assert_eq!(BucketId::for_key(5_000, 8_191).exp, MIN_BUCKET_EXP);
        assert_eq!(BucketId::for_key(5_000, 16_384).exp, 11);
        // A day: 3 h → 2^23 ms ≈ 2.3 h.
        assert_eq!(BucketId::for_key(5_000, 86_400_000).exp, 23);
        // The largest ttl does not overflow.
        let huge = BucketId::for_key(u64::MAX, u64::MAX);
        assert_eq!(huge.exp, 60);
        assert_eq!(huge.end_ms(), u64::MAX);
        // Every key of a bucket expires before the bucket ends.
        for expires in [0, 1, 1023, 1024, 1_700_000_000_123] {
            let id = BucketId::for_key(expires, 60_000);
            assert!(id.index << id.exp <= expires && expires < id.end_ms());
            let id = BucketId::for_lease(expires, 30_000);
            assert!(id.index << id.exp <= expires && expires < id.end_ms());
        }
        // A lease's bucket is about one lease wide: 30 s → 2^14 ms ≈ 16.4 s, so two or three
        // are live; short leases share the narrowest bucket.
        assert_eq!(BucketId::for_lease(5_000, 30_000).exp, 14);
        assert_eq!(BucketId::for_lease(5_000, 0).exp, MIN_BUCKET_EXP);
        assert_eq!(BucketId::for_lease(5_000, 300).exp, MIN_BUCKET_EXP);
        assert_eq!(BucketId::for_lease(u64::MAX, u64::MAX).end_ms(), u64::MAX);
    }

    #[test]
    fn bucket_names_belong_to_one_namespace() {
        let id = BucketId { exp: 12, index: 7 };
        assert_eq!(BucketId::parse(&id.name("a"), "a"), Some(id));
        assert_eq!(BucketId::parse(&id.name("a.b"), "a"), None);
        assert_eq!(BucketId::parse(&id.name("a"), "a.b"), None);
        assert_eq!(BucketId::parse("dedup#a#12#07", "a"), None);
        assert_eq!(BucketId::parse("dedup#a#12", "a"), None);
        assert_eq!(BucketId::parse("stream-dedup", "a"), None);
    }
}
