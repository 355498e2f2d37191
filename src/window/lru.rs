//! The window's data structure: keys in a slab of slots, a `HashTable<u32>` from key to slot,
//! and intrusive doubly linked lists over slot indices for recency (LRU) and, when a ttl is
//! kept from first acceptance, for arrival order.
//!
//! Layout is struct-of-arrays so that a configuration pays only for what it uses: `u64` keys
//! with no ttl cost 8 (key) + 8 (recency links) bytes a slot; a ttl adds a 4-byte stamp; a ttl
//! that is not refreshed on a hit adds 8 bytes of arrival links. The table costs ~10 bytes a
//! key at a full window (4-byte slot index + 1 control byte, at most 7/8 full, rounded to a
//! power of two).
//!
//! A full window evicts on every new key, and finding the victim's table entry is two dependent
//! memory reads (its control group, then the slot index stored at the match). The window
//! therefore looks up the *next* victim's bucket right after each change of the LRU front, as
//! a [`VictimHint`]: the next eviction then reads an address it already knows, so that lookup
//! overlaps the new key's own probe instead of following it. A hint is only ever a guess that
//! is checked before use; a stale one falls back to the full lookup.

use core::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

/// "No slot": the end of a list.
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Link {
    prev: u32,
    next: u32,
}

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
};

/// A doubly linked list threaded through a `[Link]`: `front` is the oldest entry (the next to
/// evict or expire), `back` the newest.
#[derive(Clone, Copy, Debug)]
struct List {
    front: u32,
    back: u32,
}

impl List {
    const EMPTY: List = List {
        front: NIL,
        back: NIL,
    };

    fn push_back(&mut self, links: &mut [Link], i: u32) {
        links[i as usize] = Link {
            prev: self.back,
            next: NIL,
        };
        if self.back == NIL {
            self.front = i;
        } else {
            links[self.back as usize].next = i;
        }
        self.back = i;
    }

    fn unlink(&mut self, links: &mut [Link], i: u32) {
        let Link { prev, next } = links[i as usize];
        if prev == NIL {
            self.front = next;
        } else {
            links[prev as usize].next = next;
        }
        if next == NIL {
            self.back = prev;
        } else {
            links[next as usize].prev = prev;
        }
    }

    fn move_to_back(&mut self, links: &mut [Link], i: u32) {
        if self.back != i {
            self.unlink(links, i);
            self.push_back(links, i);
        }
    }
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

/// What [`Lru::observe`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Observed {
    /// The key was in the window: the item is a repeat.
    pub(crate) duplicate: bool,
    /// A new key pushed the least recently seen key out of a full window.
    pub(crate) evicted: bool,
    /// Keys whose ttl ran out before this observation (removed by it).
    pub(crate) expired: u32,
}

/// The bounded LRU / time window. Time is in the caller's units (`u32`, monotone); the caller
/// guarantees `now` never goes backwards and rebases stamps with [`Lru::rebase`] long before a
/// `u32` overflows.
pub(crate) struct Lru<K> {
    keys: Vec<K>,
    recency: Vec<Link>,
    by_recency: List,
    /// Arrival order; empty (never allocated) unless `track_arrival`.
    arrival: Vec<Link>,
    by_arrival: List,
    /// When each slot's key was accepted (or last seen, with refresh); empty without a ttl.
    stamps: Vec<u32>,
    table: HashTable<u32>,
    /// The bucket of the least recently seen key's entry, found ahead of its eviction.
    victim: VictimHint,
    hasher: foldhash::fast::RandomState,
    /// Head of the free-slot list, threaded through `recency[i].next`.
    free: u32,
    len: u32,
    max: u32,
    /// `Some(ttl)` in time units when keys expire.
    ttl: Option<u32>,
    refresh: bool,
    track_arrival: bool,
}

impl<K: Hash + Eq> Lru<K> {
    pub(crate) fn new(max: u32, ttl: Option<u32>, refresh: bool) -> Self {
        debug_assert!(max > 0 && max < NIL);
        Lru {
            keys: Vec::new(),
            recency: Vec::new(),
            by_recency: List::EMPTY,
            arrival: Vec::new(),
            by_arrival: List::EMPTY,
            stamps: Vec::new(),
            table: HashTable::new(),
            victim: NO_HINT,
            hasher: foldhash::fast::RandomState::default(),
            free: NIL,
            len: 0,
            max,
            ttl,
            refresh,
            track_arrival: ttl.is_some() && !refresh,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    /// Looks `key` up at time `now`, after forgetting what expired by then. A hit moves the key
    /// to the most recently seen end (and refreshes its stamp with `refresh`); a miss inserts it,
    /// evicting the least recently seen key when the window is full.
    #[inline]
    pub(crate) fn observe(&mut self, key: K, now: u32) -> Observed {
        let expired = self.expire(now);
        let hash = self.hasher.hash_one(&key);
        let keys = &self.keys;
        if let Some(&i) = self.table.find(hash, |&i| keys[i as usize] == key) {
            self.by_recency.move_to_back(&mut self.recency, i);
            if self.refresh && self.ttl.is_some() {
                self.stamps[i as usize] = now;
            }
            self.aim_at_victim();
            return Observed {
                duplicate: true,
                evicted: false,
                expired,
            };
        }
        let evicted = self.insert_new(key, hash, now);
        self.aim_at_victim();
        Observed {
            duplicate: false,
            evicted,
            expired,
        }
    }

    /// Whether `key` is in the window (without touching its recency). Expired keys that have not
    /// been swept yet are not reported.
    pub(crate) fn contains(&self, key: &K, now: u32) -> bool {
        let hash = self.hasher.hash_one(key);
        match self.table.find(hash, |&i| self.keys[i as usize] == *key) {
            Some(&i) => !self.is_expired(i, now),
            None => false,
        }
    }

    /// Forgets `key`; returns whether it was there.
    pub(crate) fn remove(&mut self, key: &K) -> bool {
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

    /// Forgets every key.
    pub(crate) fn clear(&mut self) {
        self.keys.clear();
        self.recency.clear();
        self.arrival.clear();
        self.stamps.clear();
        self.table.clear();
        self.by_recency = List::EMPTY;
        self.by_arrival = List::EMPTY;
        self.free = NIL;
        self.len = 0;
        self.victim = NO_HINT;
    }

    /// Removes every key whose ttl ran out by `now`; returns how many.
    #[inline]
    pub(crate) fn expire(&mut self, now: u32) -> u32 {
        if self.ttl.is_none() {
            return 0;
        }
        let mut expired = 0;
        loop {
            let front = if self.track_arrival {
                self.by_arrival.front
            } else {
                self.by_recency.front
            };
            if front == NIL || !self.is_expired(front, now) {
                return expired;
            }
            self.remove_slot(front);
            expired += 1;
        }
    }

    /// Subtracts `shift` from every stamp (saturating): the caller moved its epoch forward.
    pub(crate) fn rebase(&mut self, shift: u32) {
        for s in &mut self.stamps {
            *s = s.saturating_sub(shift);
        }
    }

    fn is_expired(&self, i: u32, now: u32) -> bool {
        match self.ttl {
            Some(ttl) => now.saturating_sub(self.stamps[i as usize]) >= ttl,
            None => false,
        }
    }

    /// Inserts a key known to be absent; returns whether a key was evicted for it.
    fn insert_new(&mut self, key: K, hash: u64, now: u32) -> bool {
        let (i, evicted) = if self.free != NIL {
            let i = self.free;
            self.free = self.recency[i as usize].next;
            self.keys[i as usize] = key;
            if self.ttl.is_some() {
                self.stamps[i as usize] = now;
            }
            (i, false)
        } else if self.keys.len() < self.max as usize {
            self.grow_slots();
            let i = self.keys.len() as u32;
            self.keys.push(key);
            self.recency.push(UNLINKED);
            if self.track_arrival {
                self.arrival.push(UNLINKED);
            }
            if self.ttl.is_some() {
                self.stamps.push(now);
            }
            (i, false)
        } else {
            // Full: the least recently seen key makes room; its slot takes the new key.
            let i = self.by_recency.front;
            self.evict(i);
            self.free = self.recency[i as usize].next;
            self.keys[i as usize] = key;
            if self.ttl.is_some() {
                self.stamps[i as usize] = now;
            }
            (i, true)
        };
        self.by_recency.push_back(&mut self.recency, i);
        if self.track_arrival {
            self.by_arrival.push_back(&mut self.arrival, i);
        }
        if self.table.len() == self.table.capacity() {
            self.grow_table();
        }
        let (keys, hasher) = (&self.keys, &self.hasher);
        self.table
            .insert_unique(hash, i, |&j| hasher.hash_one(&keys[j as usize]));
        self.len += 1;
        evicted
    }

    /// In a full window, finds the bucket of the least recently seen key's table entry unless
    /// the hint already names it. Reads only the control bytes: the slot index stored at the
    /// bucket is checked when the hint is used.
    #[inline]
    fn aim_at_victim(&mut self) {
        let front = self.by_recency.front;
        if self.len == self.max && self.victim.slot != front {
            let hash = self.hasher.hash_one(&self.keys[front as usize]);
            if let Some(bucket) = self.table.iter_hash_buckets(hash).next() {
                self.victim = VictimHint {
                    slot: front,
                    bucket,
                };
            }
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
        self.by_recency.unlink(&mut self.recency, i);
        if self.track_arrival {
            self.by_arrival.unlink(&mut self.arrival, i);
        }
        self.recency[i as usize] = Link {
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
        self.recency.reserve_exact(extra);
        if self.track_arrival {
            self.arrival.reserve_exact(extra);
        }
        if self.ttl.is_some() {
            self.stamps.reserve_exact(extra);
        }
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
    }

    /// Checks every invariant; for tests.
    #[cfg(test)]
    fn check(&self) {
        let mut seen = 0;
        let mut i = self.by_recency.front;
        let mut prev = NIL;
        while i != NIL {
            assert_eq!(self.recency[i as usize].prev, prev);
            let hash = self.hasher.hash_one(&self.keys[i as usize]);
            assert_eq!(self.table.find(hash, |&j| j == i), Some(&i));
            prev = i;
            i = self.recency[i as usize].next;
            seen += 1;
        }
        assert_eq!(self.by_recency.back, prev);
        assert_eq!(seen, self.len);
        assert_eq!(self.table.len(), self.len as usize);
        assert!(self.len <= self.max);
        assert!(self.keys.capacity() <= self.max as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut w = Lru::new(3, Some(100), false);
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

    #[test]
    fn eviction_through_stale_and_fresh_victim_hints() {
        let mut w = Lru::new(64, None, false);
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
                    i = w.recency[i as usize].next;
                }
            }
        }
        w.check();
        // In a full window the hint names the next victim, at the bucket of its entry.
        w.observe(1_000, 0);
        assert_eq!(w.len(), 64);
        let front = w.by_recency.front;
        assert_eq!(w.victim.slot, front);
        assert_eq!(w.table.get_bucket(w.victim.bucket), Some(&front));
    }

    #[test]
    fn churn_keeps_invariants_and_capacity() {
        let mut w = Lru::new(1000, Some(500), false);
        for t in 0..100_000u64 {
            w.observe(t % 1777, (t / 7) as u32);
        }
        w.check();
        assert!(w.keys.capacity() <= 1000);
    }
}
