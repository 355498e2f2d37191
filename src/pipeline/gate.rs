//! The in-memory side of an operator: a [`Gate`] answers what memory can, before (or instead
//! of) the store. Mark-on-emit's gate is the window [`Handle`]; claims have theirs in
//! `crate::claim`.

use std::hash::Hash;
use std::task::Context;

use tokio::time::Instant;

use crate::stats::Fate;
use crate::store::Token;
use crate::window::Handle;

/// A store's answer for one key, in either mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Recorded (insert) or claimed (claims) for this request.
    New,
    /// Already recorded / done: a duplicate.
    Present,
    /// Held by another claim's lease.
    InFlight,
}

/// What the in-memory side says before the store is asked.
pub(crate) enum Pre {
    Duplicate,
    HeldBack,
    Ask,
}

/// A claim a claim gate hands out: the key, its claim's token, and the key's store bytes when
/// they were encoded for the store already (empty otherwise), so that the commit does not
/// encode the key again.
pub(crate) struct Held<K> {
    pub(crate) key: K,
    pub(crate) token: Token,
    pub(crate) bytes: Vec<u8>,
}

/// An item's fate decided by memory alone (an operator with no store).
pub(crate) enum Decided<K> {
    /// Pass it on (with a claim gate's claim).
    Accept(Option<Held<K>>),
    Duplicate,
    HeldBack,
}

/// The in-memory side of an operator.
pub(crate) trait Gate<K> {
    /// Reads the clock, or `None` when this gate needs no time (a window without a ttl). The
    /// operators read it through a [`Ticker`](crate::window::Ticker).
    fn clock(&self) -> Option<Instant>;
    /// Decides `key` with no store, and counts the fate (the operator's fast path).
    fn decide(&mut self, key: K, now: Option<Instant>) -> Decided<K>;
    /// Answers `key` from memory if it can (`clone_key` copies a key it must keep).
    fn pre(&mut self, key: &K, now: Option<Instant>, clone_key: fn(&K) -> K) -> Pre;
    /// The store answered for every key of one request (first copies only), in order.
    fn answered(&mut self, keys: &[K], answers: &[Answer], token: Token, now: Option<Instant>);
    /// The store failed for `key` (first copies only), under fail open or closed; `token` is
    /// the request's (a claim passed on unchecked keeps it).
    fn failed(&mut self, key: &K, open: bool, token: Token, now: Option<Instant>);
    /// Counts an item's fate when it leaves the store path.
    fn count(&mut self, fate: Fate);
    /// Whether something that may settle a held-back copy happened since the last call (a
    /// commit, a release, a keep-alive round); else registers `cx`'s waker for it. Mark on emit
    /// never waits for one.
    fn poll_settled(&mut self, cx: &mut Context<'_>) -> bool;
    /// Whether a copy of `key` parked to wait still has to: its key is still in flight under
    /// a claim of this operator (so it is not decided, nor counted, again yet).
    fn still_in_flight(&self, _key: &K) -> bool {
        false
    }
}

/// Mark on emit: the window records a key as its item is accepted.
impl<K: Hash + Eq> Gate<K> for Handle<K> {
    #[inline]
    fn clock(&self) -> Option<Instant> {
        self.now()
    }

    #[inline]
    fn decide(&mut self, key: K, now: Option<Instant>) -> Decided<K> {
        if self.observe(key, now) {
            Decided::Accept(None)
        } else {
            Decided::Duplicate
        }
    }

    fn pre(&mut self, key: &K, now: Option<Instant>, clone_key: fn(&K) -> K) -> Pre {
        // Recorded in memory at once; the store decides the verdict.
        if self.observe_uncounted(clone_key(key), now) {
            Pre::Ask
        } else {
            Pre::Duplicate
        }
    }

    fn answered(&mut self, _: &[K], _: &[Answer], _: Token, _: Option<Instant>) {}

    fn failed(&mut self, key: &K, open: bool, _token: Token, _now: Option<Instant>) {
        if !open {
            // Forget the key, so that the broker's redelivery is checked again.
            self.remove(key);
        }
    }

    fn count(&mut self, fate: Fate) {
        // A copy in flight under a claim (modes mixed in one namespace) counts as a duplicate
        // here: mark on emit has no held-back counter.
        let fate = match fate {
            Fate::HeldBack => Fate::Duplicate,
            other => other,
        };
        self.record(|r| r.fate(fate));
    }

    fn poll_settled(&mut self, _: &mut Context<'_>) -> bool {
        false
    }
}
