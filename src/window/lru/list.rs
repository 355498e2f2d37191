//! A slot's bookkeeping record ([`Plain`], [`Refreshed`], [`Timed`]: each configuration pays
//! only for what it uses) and the intrusive doubly linked lists over slot indices that order
//! the slots by recency and by arrival.

/// "No slot": the end of a list.
pub(super) const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Link {
    pub(super) prev: u32,
    pub(super) next: u32,
}

pub(super) const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
};

/// A slot's bookkeeping record.
pub(crate) trait Meta: Copy {
    /// Keys carry a stamp and expire.
    const TTL: bool;
    /// A hit refreshes the stamp (else keys are also kept in arrival order).
    const REFRESH: bool;
    /// A fresh record, unlinked, stamped `stamp` (ignored without a ttl).
    fn fresh(stamp: u32) -> Self;
    fn recency(&mut self) -> &mut Link;
    /// The next more recently seen slot.
    fn newer(&self) -> u32;
    /// The arrival links; `None` when the record has none.
    fn arrival(&mut self) -> Option<&mut Link>;
    /// The stamp; 0 without a ttl.
    fn stamp(&self) -> u32;
    fn set_stamp(&mut self, stamp: u32);
}

/// No ttl: recency links only (8 bytes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plain {
    recency: Link,
}

/// A ttl refreshed on every hit: the LRU order is also the expiry order (12 bytes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Refreshed {
    recency: Link,
    stamp: u32,
}

/// A ttl from first acceptance: keys expire in arrival order, kept by a second list (20 bytes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timed {
    recency: Link,
    arrival: Link,
    stamp: u32,
}

impl Meta for Plain {
    fn newer(&self) -> u32 {
        self.recency.next
    }
    const TTL: bool = false;
    const REFRESH: bool = false;
    fn fresh(_: u32) -> Self {
        Plain { recency: UNLINKED }
    }
    fn recency(&mut self) -> &mut Link {
        &mut self.recency
    }
    fn arrival(&mut self) -> Option<&mut Link> {
        None
    }
    fn stamp(&self) -> u32 {
        0
    }
    fn set_stamp(&mut self, _: u32) {}
}

impl Meta for Refreshed {
    fn newer(&self) -> u32 {
        self.recency.next
    }
    const TTL: bool = true;
    const REFRESH: bool = true;
    fn fresh(stamp: u32) -> Self {
        Refreshed {
            recency: UNLINKED,
            stamp,
        }
    }
    fn recency(&mut self) -> &mut Link {
        &mut self.recency
    }
    fn arrival(&mut self) -> Option<&mut Link> {
        None
    }
    fn stamp(&self) -> u32 {
        self.stamp
    }
    fn set_stamp(&mut self, stamp: u32) {
        self.stamp = stamp;
    }
}

impl Meta for Timed {
    fn newer(&self) -> u32 {
        self.recency.next
    }
    const TTL: bool = true;
    const REFRESH: bool = false;
    fn fresh(stamp: u32) -> Self {
        Timed {
            recency: UNLINKED,
            arrival: UNLINKED,
            stamp,
        }
    }
    fn recency(&mut self) -> &mut Link {
        &mut self.recency
    }
    fn arrival(&mut self) -> Option<&mut Link> {
        Some(&mut self.arrival)
    }
    fn stamp(&self) -> u32 {
        self.stamp
    }
    fn set_stamp(&mut self, stamp: u32) {
        self.stamp = stamp;
    }
}

/// Which links of a record a [`List`] goes through.
pub(super) trait Field<M>: Copy {
    fn link(self, meta: &mut M) -> Option<&mut Link>;
}

#[derive(Clone, Copy, Debug)]
pub(super) struct ByRecency;

#[derive(Clone, Copy, Debug)]
pub(super) struct ByArrival;

impl<M: Meta> Field<M> for ByRecency {
    #[inline]
    fn link(self, meta: &mut M) -> Option<&mut Link> {
        Some(meta.recency())
    }
}

impl<M: Meta> Field<M> for ByArrival {
    #[inline]
    fn link(self, meta: &mut M) -> Option<&mut Link> {
        meta.arrival()
    }
}

/// A doubly linked list threaded through the records' `F` links: `front` is the oldest entry
/// (the next to evict or expire), `back` the newest. On records without such links every
/// operation does nothing.
#[derive(Clone, Copy, Debug)]
pub(super) struct List {
    pub(super) front: u32,
    pub(super) back: u32,
}

impl List {
    pub(super) const EMPTY: List = List {
        front: NIL,
        back: NIL,
    };

    #[inline]
    pub(super) fn push_back<M, F: Field<M>>(&mut self, metas: &mut [M], field: F, i: u32) {
        let Some(link) = field.link(&mut metas[i as usize]) else {
            return;
        };
        *link = Link {
            prev: self.back,
            next: NIL,
        };
        if self.back == NIL {
            self.front = i;
        } else if let Some(back) = field.link(&mut metas[self.back as usize]) {
            back.next = i;
        }
        self.back = i;
    }

    #[inline]
    pub(super) fn unlink<M, F: Field<M>>(&mut self, metas: &mut [M], field: F, i: u32) {
        let Some(&mut Link { prev, next }) = field.link(&mut metas[i as usize]) else {
            return;
        };
        if prev == NIL {
            self.front = next;
        } else if let Some(link) = field.link(&mut metas[prev as usize]) {
            link.next = next;
        }
        if next == NIL {
            self.back = prev;
        } else if let Some(link) = field.link(&mut metas[next as usize]) {
            link.prev = prev;
        }
    }

    #[inline]
    pub(super) fn move_to_back<M, F: Field<M>>(&mut self, metas: &mut [M], field: F, i: u32) {
        if self.back != i {
            self.unlink(metas, field, i);
            self.push_back(metas, field, i);
        }
    }
}
