use core::fmt;

/// The seed of every fingerprint. Fixed forever: fingerprints are stable across processes,
/// machines and versions of this crate.
const SEED: u64 = 0;

/// A stable 128-bit hash of a key's bytes (XXH3-128, seed 0), to use as the key in place of a
/// long one.
///
/// A 36-byte UUID string costs the window ~70 bytes of heap and a 36-byte hash per lookup;
/// its fingerprint costs 16 bytes and hashes as one `u128`. Two distinct keys share a
/// fingerprint with probability about `n² / 2¹²⁹` among `n` keys (below 10⁻¹⁸ for a billion
/// keys): such a collision would drop a new message as a duplicate, so the fingerprint is
/// opt-in.
///
/// # Examples
///
/// ```
/// use futures::{stream, StreamExt};
/// use stream_dedup::{DedupStreamExt, Fingerprint, Window};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let ids = ["6f1c4a52-6a5e-4f7b-9a43-2a4f4f7f6b10", "0c0ffee0-0000-4000-8000-000000000000"];
/// let unique: Vec<_> = stream::iter([ids[0], ids[1], ids[0]])
///     .dedup_by_key(|id| Fingerprint::of(id), Window::max_keys(1_000_000))
///     .collect()
///     .await;
/// assert_eq!(unique, [ids[0], ids[1]]);
/// assert_eq!(Fingerprint::of("a"), Fingerprint::of(b"a"));
/// # }
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(u128);

impl Fingerprint {
    /// The fingerprint of `bytes`.
    #[inline]
    pub fn of(bytes: impl AsRef<[u8]>) -> Self {
        Fingerprint(xxhash_rust::xxh3::xxh3_128_with_seed(bytes.as_ref(), SEED))
    }

    /// The fingerprint as a number.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// The fingerprint's 16 bytes, big-endian (the order its hex form is written in).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({:032x})", self.0)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the fingerprint: it must never change, since stores will keep it.
    #[test]
    fn golden() {
        assert_eq!(
            Fingerprint::of("").to_string(),
            "99aa06d3014798d86001c324468d497f"
        );
        // Reference values from the xxHash reference implementation (python `xxhash`).
        assert_eq!(
            Fingerprint::of("12345/payment").to_string(),
            "17359ce8a9895c026270bec12d26edcc"
        );
        assert_eq!(
            Fingerprint::of(b"6f1c4a52-6a5e-4f7b-9a43-2a4f4f7f6b10").as_u128(),
            0x17203985b48c81c2cc59383730a65386
        );
        assert_eq!(
            Fingerprint::of("a").to_bytes()[..],
            Fingerprint::of("a").as_u128().to_be_bytes()
        );
    }
}
