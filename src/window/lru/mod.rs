//! The window's data structure: keys in a slab of slots, a `HashTable<u32>` from key to slot,
//! and intrusive doubly linked lists over slot indices for recency (LRU) and, when a ttl is
//! kept from first acceptance, for arrival order.
//!
//! A slot is two parts: its key, in one array, and its bookkeeping (list links and the time
//! stamp), in another, as one record. A configuration pays only for what it uses, since the
//! record's type is picked by the configuration ([`Plain`], [`Refreshed`], [`Timed`]): `u64`
//! keys with no ttl cost 8 (key) + 8 (recency links) bytes a slot; a ttl refreshed on a hit adds
//! a 4-byte stamp; a ttl kept from first acceptance adds the stamp and 8 bytes of arrival links
//! (a 20-byte record). The table costs ~10 bytes a key at a full window (4-byte slot index + 1
//! control byte, at most 7/8 full, rounded to a power of two).
//!
//! The record keeps together what one eviction touches: unlinking the least recently seen key
//! from both lists and reading the next one's stamp is one cache line, where separate arrays
//! were three.
//!
//! A full window evicts on every new key, and finding the victim's table entry is two dependent
//! memory reads (its control group, then the slot index stored at the match). The window
//! therefore looks up the *next* victim's bucket one observation ahead, as a [`VictimHint`]:
//! the next eviction then reads an address it already knows. Each observation does that
//! lookup first, right after hashing its own key and before probing for it, so that the two
//! reads of the table (the next victim's control group and the new key's) are in flight
//! together instead of one after the other; done at the end of the previous observation, the
//! lookup was a cache miss of its own (the `u64_10M` bench: 2.74× the `hashbrown` floor before,
//! 1.98–2.56× after, PERF.md). A hint is only ever a guess that is checked before use; a stale
//! one falls back to the full lookup.

use core::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

use self::list::{ByArrival, ByRecency, Link, List, Meta, NIL, Plain, Refreshed, Timed};
use crate::stats::Observed;

mod list;

/// Asks the CPU to start loading the cache line of `value` without waiting for it.
#[inline(always)]
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    safe_arch::prefetch_t0(value);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Where the next victim's table entry probably is: slot `slot`, at bucket `bucket`.
#[derive(Clone, Copy, Debug)]
struct VictimHint {
    slot: u32,
    bucket: usize,
}

const NO_HINT: VictimHint = VictimHint {
    slot: NIL,
    bucket: 0,
};

/// The bounded LRU / time window. Time is in the caller's units (`u32`, monotone); the caller
/// guarantees `now` never goes backwards and rebases stamps with [`Lru::rebase`] long before a
/// `u32` overflows.
///
/// One [`Core`] per kind of record, picked once from the configuration: the branch on the
/// variant is the same for every call, so it costs nothing measurable.
pub(crate) enum Lru<K> {
    /// No ttl.
    Plain(Core<K, Plain>),
    /// A ttl refreshed on a hit.
    Refreshed(Core<K, Refreshed>),
    /// A ttl from first acceptance.
    Timed(Core<K, Timed>),
}

macro_rules! each {
    ($lru:expr, $core:ident => $body:expr) => {
        match $lru {
            Lru::Plain($core) => $body,
            Lru::Refreshed($core) => $body,
            Lru::Timed($core) => $body,
        }
    };
}

impl<K: Hash + Eq> Lru<K> {
    /// A window of at most `max` keys; with `ttl` (in time units) keys expire, counted from
    /// their first acceptance or, with `refresh`, from their last sighting.
    pub(crate) fn new(max: u32, ttl: Option<u32>, refresh: bool) -> Self {
        match (ttl, refresh) {
            (None, _) => Lru::Plain(Core::new(max, 0)),
            (Some(ttl), true) => Lru::Refreshed(Core::new(max, ttl)),
            (Some(ttl), false) => Lru::Timed(Core::new(max, ttl)),
        }
    }

    pub(crate) fn len(&self) -> usize {
        each!(self, c => c.len as usize)
    }

    /// Looks `key` up at time `now`, after forgetting what expired by then. A hit moves the key
    /// to the most recently seen end (and refreshes its stamp with `refresh`); a miss inserts it,
    /// evicting the least recently seen key when the window is full.
    #[inline]
    pub(crate) fn observe(&mut self, key: K, now: u32) -> Observed {
        each!(self, c => c.observe(key, now))
    }

    /// Whether `key` is in the window (without touching its recency). Expired keys that have not
    /// been swept yet are not reported.
    pub(crate) fn contains(&self, key: &K, now: u32) -> bool {
        each!(self, c => c.contains(key, now))
    }

    /// Forgets `key`; returns whether it was there.
    pub(crate) fn remove(&mut self, key: &K) -> bool {
        each!(self, c => c.remove(key))
    }

    /// Forgets every key.
    pub(crate) fn clear(&mut self) {
        each!(self, c => c.clear());
    }

    /// Removes every key whose ttl ran out by `now`; returns how many.
    pub(crate) fn expire(&mut self, now: u32) -> u32 {
        each!(self, c => c.expire(now))
    }

    /// Subtracts `shift` from every stamp (saturating): the caller moved its epoch forward.
    pub(crate) fn rebase(&mut self, shift: u32) {
        each!(self, c => c.rebase(shift));
    }

    #[cfg(test)]
    fn check(&self) {
        each!(self, c => c.check());
    }
}

/// The window over records of type `M`.
pub(crate) struct Core<K, M> {
    keys: Vec<K>,
    metas: Vec<M>,
    by_recency: List,
    /// Arrival order; stays empty unless the records have arrival links.
    by_arrival: List,
    table: HashTable<u32>,
    /// The bucket of the least recently seen key's entry, found ahead of its eviction.
    victim: VictimHint,
    /// The same for the key after it, one eviction ahead.
    next_victim: VictimHint,
    hasher: foldhash::fast::RandomState,
    /// Head of the free-slot list, threaded through the recency links' `next`.
    free: u32,
    len: u32,
    max: u32,
    /// The ttl in time units (unused without one).
    ttl: u32,
}

impl<K: Hash + Eq, M: Meta> Core<K, M> {
    fn new(max: u32, ttl: u32) -> Self {
        debug_assert!(max > 0 && max < NIL);
        Core {
            keys: Vec::new(),
            metas: Vec::new(),
            by_recency: List::EMPTY,
            by_arrival: List::EMPTY,
            table: HashTable::new(),
            victim: NO_HINT,
            next_victim: NO_HINT,
            hasher: foldhash::fast::RandomState::default(),
            free: NIL,
            len: 0,
            max,
            ttl,
        }
    }

    #[inline]
    fn observe(&mut self, key: K, now: u32) -> Observed {
        let expired = self.expire(now);
        let hash = self.hasher.hash_one(&key);
        self.aim_at_victim();
        let (keys, metas) = (&self.keys, &self.metas);
        // A candidate's record is fetched alongside its key: on a hit it is read next, to move
        // the key to the back of the LRU order.
        let found = self.table.find(hash, |&i| {
            if let Some(meta) = metas.get(i as usize) {
                prefetch(meta);
            }
            keys[i as usize] == key
        });
        if let Some(&i) = found {
            self.by_recency.move_to_back(&mut self.metas, ByRecency, i);
            if M::REFRESH {
                self.metas[i as usize].set_stamp(now);
            }
            return Observed {
                duplicate: true,
                evicted: false,
                expired,
            };
        }
        let evicted = self.insert_new(key, hash, now);
        Observed {
            duplicate: false,
            evicted,
            expired,
        }
    }

    fn contains(&self, key: &K, now: u32) -> bool {
        let hash = self.hasher.hash_one(key);
        match self.table.find(hash, |&i| self.keys[i as usize] == *key) {
            Some(&i) => !self.is_expired(i, now),
            None => false,
        }
    }

    fn remove(&mut self, key: &K) -> bool {
        let hash = self.hasher.hash_one(key);
        let keys = &self.keys;
        match self.table.find_entry(hash, |&i| keys[i as usize] == *key) {
            Ok(entry) => {
                let (i, _) = entry.remove();
                self.unlink_and_free(i);
                true
            }
            Err(_) => false,
        }
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.metas.clear();
        self.table.clear();
        self.by_recency = List::EMPTY;
        self.by_arrival = List::EMPTY;
        self.free = NIL;
        self.len = 0;
        self.victim = NO_HINT;
        self.next_victim = NO_HINT;
    }

    #[inline]
    fn expire(&mut self, now: u32) -> u32 {
        if !M::TTL {
            return 0;
        }
        let mut expired = 0;
        loop {
            // With refresh the LRU order is the expiry order; otherwise arrival order is.
            let front = if M::REFRESH {
                self.by_recency.front
            } else {
                self.by_arrival.front
            };
            if front == NIL || !self.is_expired(front, now) {
                return expired;
            }
            self.remove_slot(front);
            expired += 1;
        }
    }

    fn rebase(&mut self, shift: u32) {
        if M::TTL {
            for m in &mut self.metas {
                m.set_stamp(m.stamp().saturating_sub(shift));
            }
        }
    }

    #[inline]
    fn is_expired(&self, i: u32, now: u32) -> bool {
        M::TTL && now.saturating_sub(self.metas[i as usize].stamp()) >= self.ttl
    }

    /// Links slot `i` in as the newest of both lists.
    #[inline]
    fn link_newest(&mut self, i: u32) {
        self.by_recency.push_back(&mut self.metas, ByRecency, i);
        self.by_arrival.push_back(&mut self.metas, ByArrival, i);
    }

    /// Inserts a key known to be absent; returns whether a key was evicted for it.
    fn insert_new(&mut self, key: K, hash: u64, now: u32) -> bool {
        let (i, evicted) = if self.free != NIL {
            let i = self.free;
            self.free = self.metas[i as usize].recency().next;
            self.keys[i as usize] = key;
            self.metas[i as usize] = M::fresh(now);
            (i, false)
        } else if self.keys.len() < self.max as usize {
            self.grow_slots();
            let i = self.keys.len() as u32;
            self.keys.push(key);
            self.metas.push(M::fresh(now));
            (i, false)
        } else {
            // Full: the least recently seen key makes room; its slot takes the new key.
            let i = self.by_recency.front;
            self.evict(i);
            self.free = self.metas[i as usize].recency().next;
            self.keys[i as usize] = key;
            self.metas[i as usize] = M::fresh(now);
            (i, true)
        };
        self.link_newest(i);
        if self.table.len() == self.table.capacity() {
            self.grow_table();
        }
        let (keys, hasher) = (&self.keys, &self.hasher);
        self.table
            .insert_unique(hash, i, |&j| hasher.hash_one(&keys[j as usize]));
        self.len += 1;
        evicted
    }

    /// In a full window, makes sure the hint names the least recently seen key, and starts
    /// fetching what the next evictions will read. Called at the start of each observation,
    /// on the state the previous one left, so that its read of the table overlaps the probe
    /// for the new key.
    ///
    /// The evictions are software-pipelined: the key and record of the third victim in line are
    /// prefetched; the second one's key, by then in cache, is hashed, its control group read and
    /// the slot index at the matching bucket prefetched; when it becomes the next victim that
    /// guess is ready, and its eviction checks the index (another key can share the control
    /// byte) without waiting on memory. Prefetches are hints that never fault.
    #[inline]
    fn aim_at_victim(&mut self) {
        if self.len != self.max {
            return;
        }
        let front = self.by_recency.front;
        if self.victim.slot != front {
            self.victim = if self.next_victim.slot == front {
                self.next_victim
            } else {
                self.hint(front)
            };
        }
        let second = self.metas[front as usize].newer();
        if second != NIL && self.next_victim.slot != second {
            self.next_victim = self.hint(second);
            let third = self.metas[second as usize].newer();
            if let (Some(key), Some(meta)) = (
                self.keys.get(third as usize),
                self.metas.get(third as usize),
            ) {
                prefetch(key);
                prefetch(meta);
            }
        }
    }

    /// The first bucket of slot `i`'s probe sequence with a matching control byte, its slot
    /// index prefetched.
    #[inline]
    fn hint(&self, i: u32) -> VictimHint {
        let hash = self.hasher.hash_one(&self.keys[i as usize]);
        match self.table.iter_hash_buckets(hash).next() {
            Some(bucket) => {
                if let Some(index) = self.table.get_bucket(bucket) {
                    prefetch(index);
                }
                VictimHint { slot: i, bucket }
            }
            None => NO_HINT,
        }
    }

    /// Removes slot `i` (the least recently seen) through the victim hint when it is right,
    /// else by the full lookup.
    #[inline]
    fn evict(&mut self, i: u32) {
        let VictimHint { slot, bucket } = self.victim;
        // Slot indices in the table are unique, so a bucket holding `i` is `i`'s entry.
        if slot == i && self.table.get_bucket(bucket) == Some(&i) {
            if let Ok(entry) = self.table.get_bucket_entry(bucket) {
                entry.remove();
                self.unlink_and_free(i);
                return;
            }
        }
        self.remove_slot(i);
    }

    /// Removes slot `i` from the table and the lists, and puts it on the free list.
    fn remove_slot(&mut self, i: u32) {
        let hash = self.hasher.hash_one(&self.keys[i as usize]);
        if let Ok(entry) = self.table.find_entry(hash, |&j| j == i) {
            entry.remove();
        }
        self.unlink_and_free(i);
    }

    fn unlink_and_free(&mut self, i: u32) {
        if self.victim.slot == i {
            self.victim = NO_HINT;
        }
        if self.next_victim.slot == i {
            self.next_victim = NO_HINT;
        }
        self.by_recency.unlink(&mut self.metas, ByRecency, i);
        self.by_arrival.unlink(&mut self.metas, ByArrival, i);
        *self.metas[i as usize].recency() = Link {
            prev: NIL,
            next: self.free,
        };
        self.free = i;
        self.len -= 1;
    }

    /// Grows the slot arrays to at most `max` slots, exactly: a full window holds no slack.
    fn grow_slots(&mut self) {
        let len = self.keys.len();
        if len < self.keys.capacity() {
            return;
        }
        let target = (len * 2).max(16).min(self.max as usize);
        let extra = target - len;
        self.keys.reserve_exact(extra);
        self.metas.reserve_exact(extra);
    }

    /// Rebuilds the table with room to spare, never beyond what `max` keys need. hashbrown
    /// would grow by itself, but when deletions leave tombstones in a table that is more than
    /// half full it doubles the allocation; rebuilding at the same size keeps memory bounded.
    #[cold]
    fn grow_table(&mut self) {
        let len = self.table.len();
        let target = (len * 2).max(16).min(self.max as usize).max(len + 1);
        let mut table = HashTable::with_capacity(target);
        let (keys, hasher) = (&self.keys, &self.hasher);
        for j in self.table.drain() {
            table.insert_unique(hasher.hash_one(&keys[j as usize]), j, |&j| {
                hasher.hash_one(&keys[j as usize])
            });
        }
        self.table = table;
        self.victim = NO_HINT; // every entry moved
        self.next_victim = NO_HINT;
    }

    /// Checks every invariant; for tests.
    #[cfg(test)]
    fn check(&self) {
        let mut metas = self.metas.clone();
        for field in [0, 1] {
            let (list, enabled) = if field == 0 {
                (self.by_recency, true)
            } else {
                (self.by_arrival, M::TTL && !M::REFRESH)
            };
            if !enabled {
                assert_eq!((list.front, list.back), (NIL, NIL));
                continue;
            }
            let link = |metas: &mut [M], i: u32| -> Link {
                if field == 0 {
                    *metas[i as usize].recency()
                } else {
                    *metas[i as usize].arrival().expect("arrival links")
                }
            };
            let mut seen = 0;
            let mut i = list.front;
            let mut prev = NIL;
            let mut last_stamp = 0;
            while i != NIL {
                assert_eq!(link(&mut metas, i).prev, prev);
                let hash = self.hasher.hash_one(&self.keys[i as usize]);
                assert_eq!(self.table.find(hash, |&j| j == i), Some(&i));
                if field == 1 {
                    // Arrival order is stamp order.
                    assert!(metas[i as usize].stamp() >= last_stamp);
                    last_stamp = metas[i as usize].stamp();
                }
                prev = i;
                i = link(&mut metas, i).next;
                seen += 1;
            }
            assert_eq!(list.back, prev);
            assert_eq!(seen, self.len);
        }
        assert_eq!(self.table.len(), self.len as usize);
        assert!(self.len <= self.max);
        assert!(self.keys.capacity() <= self.max as usize);
        assert!(self.metas.capacity() <= self.max as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_stay_small() {
        assert_eq!(size_of::<Plain>(), 8);
        assert_eq!(size_of::<Refreshed>(), 12);
        assert_eq!(size_of::<Timed>(), 20);
    }

    #[test]
    fn evicts_least_recently_seen() {
        let mut w = Lru::new(2, None, false);
        assert!(!w.observe(1u64, 0).duplicate);
        assert!(!w.observe(2, 0).duplicate);
        assert!(w.observe(1, 0).duplicate); // 2 is now least recently seen
        let o = w.observe(3, 0);
        assert!(!o.duplicate && o.evicted);
        assert!(w.observe(1, 0).duplicate);
        assert!(!w.observe(2, 0).duplicate);
        w.check();
    }

    #[test]
    fn ttl_counts_from_first_acceptance() {
        let mut w = Lru::new(10, Some(10), false);
        assert!(!w.observe(1u64, 0).duplicate);
        assert!(w.observe(1, 9).duplicate);
        let o = w.observe(1, 10);
        assert_eq!((o.duplicate, o.expired), (false, 1));
        w.check();
    }

    #[test]
    fn refresh_extends_ttl() {
        let mut w = Lru::new(10, Some(10), true);
        w.observe(1u64, 0);
        assert!(w.observe(1, 9).duplicate);
        assert!(w.observe(1, 18).duplicate);
        assert!(!w.observe(1, 28).duplicate);
        w.check();
    }

    #[test]
    fn remove_and_reuse_slots() {
        for refresh in [false, true] {
            let mut w = Lru::new(3, Some(100), refresh);
            for k in 0..3u64 {
                w.observe(k, 0);
            }
            assert!(w.remove(&1));
            assert!(!w.remove(&1));
            assert_eq!(w.len(), 2);
            assert!(!w.observe(7, 1).evicted);
            assert!(w.contains(&7, 1) && !w.contains(&1, 1));
            w.check();
            w.clear();
            assert_eq!(w.len(), 0);
            w.check();
        }
    }

    #[test]
    fn eviction_through_stale_and_fresh_victim_hints() {
        let mut w = Core::<u64, Plain>::new(64, 0);
        let mut model = std::collections::VecDeque::new(); // least recently seen first
        let mut x = 1u64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = x % 200;
            if step % 97 == 0 {
                // Remove the hinted victim behind the window's back: the hint goes stale.
                let front = w.by_recency.front;
                if front != NIL {
                    let k = w.keys[front as usize];
                    assert!(w.remove(&k));
                    model.retain(|&m| m != k);
                }
            }
            let o = w.observe(key, 0);
            let pos = model.iter().position(|&m| m == key);
            assert_eq!(o.duplicate, pos.is_some());
            if let Some(p) = pos {
                model.remove(p);
            } else if model.len() == 64 {
                model.pop_front();
            }
            model.push_back(key);
            if step % 1000 == 0 {
                w.check();
                let mut i = w.by_recency.front;
                for &m in &model {
                    assert_eq!(w.keys[i as usize], m);
                    i = w.metas[i as usize].recency().next;
                }
            }
        }
        w.check();
        // In a full window the hint names the next victim, at a bucket of its probe sequence
        // (its entry's, unless another key shares the control byte: then the full lookup). An
        // observation aims first, at what the previous one left.
        w.observe(1_000, 0);
        assert_eq!(w.len, 64);
        w.aim_at_victim();
        let front = w.by_recency.front;
        assert_eq!(w.victim.slot, front);
        let hash = w.hasher.hash_one(w.keys[front as usize]);
        assert!(
            w.table
                .iter_hash_buckets(hash)
                .any(|b| b == w.victim.bucket)
        );
    }

    #[test]
    fn churn_keeps_invariants_and_capacity() {
        for (ttl, refresh) in [(None, false), (Some(500), false), (Some(500), true)] {
            let mut w = Lru::new(1000, ttl, refresh);
            for t in 0..100_000u64 {
                w.observe(t % 1777, (t / 7) as u32);
                if t % 10_000 == 0 {
                    w.check();
                }
            }
            w.check();
            assert!(w.len() <= 1000);
        }
    }
}
