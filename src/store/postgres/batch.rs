//! A batch's keys in the order the statements lock them, and their answers back in input order.

use std::cmp::Ordering;

use crate::store::Token;

/// The distinct keys of a batch, sorted as PostgreSQL sorts `bytea` (bytewise, then shorter
/// first: the same order as Rust's `[u8]`), with, for every input key, where it went.
///
/// Sorted so that two batches with keys in common lock their rows in the same order (no
/// deadlock); distinct because `ON CONFLICT DO UPDATE` cannot touch one row twice in a
/// statement. Equal keys in one batch (the operator never sends them) share one answer.
#[derive(Debug)]
pub(super) struct Sorted<'a> {
    /// The distinct keys, sorted.
    pub(super) keys: Vec<&'a [u8]>,
    /// For each distinct key, the indices into `tokens` that went with it (commit and release:
    /// one key held under two tokens is sent once per token).
    slot_of: Vec<u32>,
}

impl<'a> Sorted<'a> {
    /// Sorts and deduplicates `keys`.
    pub(super) fn new(keys: impl ExactSizeIterator<Item = &'a [u8]>) -> Sorted<'a> {
        let mut order: Vec<(&'a [u8], u32)> = keys.zip(0u32..).collect();
        order.sort_unstable();
        let mut sorted = Sorted {
            keys: Vec::with_capacity(order.len()),
            slot_of: vec![0; order.len()],
        };
        for (key, input) in order {
            if sorted.keys.last() != Some(&key) {
                sorted.keys.push(key);
            }
            sorted.slot_of[input as usize] = (sorted.keys.len() - 1) as u32;
        }
        sorted
    }

    /// Where `key` is among the distinct keys.
    pub(super) fn position(&self, key: &[u8]) -> Option<usize> {
        self.keys.binary_search(&key).ok()
    }

    /// Per input key, its distinct key's answer.
    pub(super) fn answers<T: Copy>(&self, per_key: &[T]) -> Vec<T> {
        self.slot_of.iter().map(|&s| per_key[s as usize]).collect()
    }
}

/// `keys` with their tokens, sorted by key then token, each pair once: the rows a commit or a
/// release names. Their answers come back through `slot_of`, as for [`Sorted`].
#[derive(Debug)]
pub(super) struct SortedHeld<'a> {
    /// The distinct (key, token) pairs, sorted.
    pub(super) pairs: Vec<(&'a [u8], u128)>,
    slot_of: Vec<u32>,
}

impl<'a> SortedHeld<'a> {
    pub(super) fn new(held: impl ExactSizeIterator<Item = (&'a [u8], u128)>) -> SortedHeld<'a> {
        let mut order: Vec<((&'a [u8], u128), u32)> = held.zip(0u32..).collect();
        order.sort_unstable();
        let mut sorted = SortedHeld {
            pairs: Vec::with_capacity(order.len()),
            slot_of: vec![0; order.len()],
        };
        for (pair, input) in order {
            if sorted.pairs.last() != Some(&pair) {
                sorted.pairs.push(pair);
            }
            sorted.slot_of[input as usize] = (sorted.pairs.len() - 1) as u32;
        }
        sorted
    }

    /// Whether two pairs name the same key (under two tokens): one statement cannot commit
    /// both, so they go in separate statements.
    pub(super) fn has_repeated_keys(&self) -> bool {
        self.pairs.windows(2).any(|w| w[0].0 == w[1].0)
    }

    /// The pairs split into runs with no key twice: the first pair of each key, then the
    /// second, and so on (each run sorted by key).
    pub(super) fn rounds(&self) -> Vec<Vec<usize>> {
        let mut rounds: Vec<Vec<usize>> = Vec::new();
        let mut round = 0;
        for (i, pair) in self.pairs.iter().enumerate() {
            round = match i.checked_sub(1).map(|p| self.pairs[p].0.cmp(pair.0)) {
                Some(Ordering::Equal) => round + 1,
                _ => 0,
            };
            if rounds.len() <= round {
                rounds.push(Vec::new());
            }
            rounds[round].push(i);
        }
        rounds
    }

    /// The keys and tokens of the pairs at `at` (indices into `pairs`), as the statements'
    /// two array parameters.
    pub(super) fn columns(&self, at: impl Iterator<Item = usize>) -> (Vec<&'a [u8]>, Vec<String>) {
        at.map(|i| {
            let (key, token) = self.pairs[i];
            (key, Token::from_u128(token).to_string())
        })
        .unzip()
    }

    /// Per input pair, its distinct pair's answer.
    pub(super) fn answers<T: Copy>(&self, per_pair: &[T]) -> Vec<T> {
        self.slot_of.iter().map(|&s| per_pair[s as usize]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_distinct_and_back_in_order() {
        let input: Vec<&[u8]> = vec![b"b", b"a", b"", b"b", b"ab", b"\xff", b"a\x00"];
        let s = Sorted::new(input.iter().copied());
        let want: Vec<&[u8]> = vec![b"", b"a", b"a\x00", b"ab", b"b", b"\xff"];
        assert_eq!(s.keys, want);
        // Each input key gets its own distinct key's answer.
        let per_key: Vec<&[u8]> = s.keys.clone();
        assert_eq!(s.answers(&per_key), input);
        assert_eq!(s.position(b"ab"), Some(3));
        assert_eq!(s.position(b"zz"), None);
    }

    #[test]
    fn held_keys_under_two_tokens_go_in_two_rounds() {
        let held: Vec<(&[u8], u128)> = vec![(b"k", 2), (b"j", 1), (b"k", 1), (b"k", 2), (b"l", 3)];
        let s = SortedHeld::new(held.iter().copied());
        assert_eq!(
            s.pairs,
            [
                (&b"j"[..], 1),
                (&b"k"[..], 1),
                (&b"k"[..], 2),
                (&b"l"[..], 3)
            ]
        );
        assert!(s.has_repeated_keys());
        assert_eq!(s.rounds(), [vec![0, 1, 3], vec![2]]);
        let per_pair: Vec<usize> = (0..s.pairs.len()).collect();
        assert_eq!(s.answers(&per_pair), [2, 0, 1, 2, 3]);
        let single = SortedHeld::new([(&b"x"[..], 1u128)].into_iter());
        assert!(!single.has_repeated_keys());
        assert_eq!(single.rounds(), [vec![0]]);
    }
}
