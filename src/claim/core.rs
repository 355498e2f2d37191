//! What a claim operator and its claims share: the keys in flight and the done keys
//! ([`ClaimCore`]), each claim's key side ([`KeyTicket`]), and the claim operators' gate.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::committer::{Committer, Ledger, Settled, or_encoded};
use super::keeper::{self, Renew};
use super::{Settle, Ticket, TxTarget};
use crate::logging::{Kind, op_event};
use crate::pipeline::gate::{Answer, Decided, Gate, Held, Pre};
use crate::stats::{Fate, Recorder, Stats};
use crate::store::{StoreError, Token};
use crate::window::WindowSet;

/// A claim's key side: the key, and what settles it.
pub(crate) struct KeyTicket<K> {
    key: K,
    /// The key's store bytes if the claim request encoded them (empty otherwise).
    bytes: Vec<u8>,
    token: Token,
    core: Arc<ClaimCore<K>>,
}

impl<K> KeyTicket<K> {
    pub(crate) fn new(key: K, bytes: Vec<u8>, token: Token, core: Arc<ClaimCore<K>>) -> Self {
        KeyTicket {
            key,
            bytes,
            token,
            core,
        }
    }
}

impl<K: Hash + Eq + Send + Sync + 'static> Ticket for KeyTicket<K> {
    fn commit(self: Box<Self>) -> Settle {
        let this = *self;
        match &this.core.store {
            // The committer task commits in the store, then here, then answers.
            Some(committer) => committer.commit(&this.core, this.key, this.bytes, this.token),
            None => {
                let result = this
                    .core
                    .lock()
                    .commit_locally(this.key, this.token, Instant::now());
                this.core.changed();
                Settle::Now(result)
            }
        }
    }

    fn release(self: Box<Self>) {
        let this = *self;
        this.core.release(&this.key, this.bytes, this.token);
    }

    fn token(&self) -> Token {
        self.token
    }

    fn tx_target(&self) -> Option<TxTarget> {
        let committer = self.core.store.as_ref()?;
        let key = or_encoded(self.bytes.clone(), committer.encode, &self.key);
        Some(TxTarget {
            store: committer.any_store(),
            in_memory: key.len() > committer.max_key_len(),
            key,
            token: self.token,
            ttl: committer.ttl(),
        })
    }

    fn is_lost(&self) -> bool {
        self.core.is_lost(&self.key, self.token)
    }

    fn beats(&self) -> Option<watch::Receiver<u64>> {
        self.core.beats()
    }

    fn done_in_tx(self: Box<Self>) {
        let this = *self;
        this.core.recorder.committed();
        let now = Instant::now();
        this.core
            .lock()
            .apply(vec![(this.key, this.token, true, now)]);
        this.core.changed();
    }
}

/// Keys in flight, with their claim's token and the end of its lease.
type InFlight<K> = HashMap<K, (Token, Instant), foldhash::fast::RandomState>;

pub(super) struct ClaimState<K> {
    /// Done keys.
    window: WindowSet<K>,
    in_flight: InFlight<K>,
}

impl<K: Hash + Eq> ClaimState<K> {
    /// Marks `key` done, unless another claim holds it now (our lease ran out).
    pub(super) fn commit_locally(
        &mut self,
        key: K,
        token: Token,
        now: Instant,
    ) -> Result<(), StoreError> {
        // One lookup: the key comes back out of the entry.
        let key = match self.in_flight.entry(key) {
            Entry::Occupied(held) => match *held.get() {
                // Our lease ran out and another claim holds the key now: refused, and
                // counted released as a failed store commit is.
                (t, end) if t != token && end > now => {
                    self.window.recorder().released();
                    return Err(StoreError::LeaseLost);
                }
                _ => held.remove_entry().0,
            },
            Entry::Vacant(free) => free.into_key(),
        };
        let t = self.window.at(now);
        self.window.observe_uncounted(key, t);
        self.window.recorder().committed();
        Ok(())
    }

    /// Records what the store answered for commits: done keys into the window, refused ones
    /// freed.
    fn apply(&mut self, settled: Vec<Settled<K>>) {
        for (key, token, done, now) in settled {
            // (Counted by the committer task, when it answered.)
            if !done {
                self.free_locally(&key, token);
                continue;
            }
            let key = match self.in_flight.entry(key) {
                Entry::Occupied(held) => match *held.get() {
                    // Another claim of this operator took the key here after our lease ran
                    // out (the store's lease ended first): it stays in flight, and its own
                    // commit or release settles it.
                    (other, end) if other != token && end > now => continue,
                    _ => held.remove_entry().0,
                },
                Entry::Vacant(free) => free.into_key(),
            };
            // At the time of the store's answer, not of this lock.
            let t = self.window.at(now);
            self.window.observe_uncounted(key, t);
        }
    }

    /// Frees `key` if this claim still holds it in memory.
    fn free_locally(&mut self, key: &K, token: Token) {
        if self.in_flight.get(key).is_some_and(|&(t, _)| t == token) {
            self.in_flight.remove(key);
        }
    }

    /// A claim the caller had is given up uncommitted: its key is freed here if it still holds
    /// it, and it counts as released either way (its lease may have run out and another claim
    /// may hold the key now).
    pub(super) fn release_locally(&mut self, key: &K, token: Token) {
        self.free_locally(key, token);
        self.window.recorder().released();
    }
}

/// What a claim operator and its claims share.
pub(crate) struct ClaimCore<K> {
    state: Mutex<ClaimState<K>>,
    /// Commits the store answered, recorded in memory by the next taker of `state` (the
    /// operator, as it reads its next item): the committer task, on another thread, neither
    /// waits for `state` nor touches its tables, and the keys are freed on the thread that
    /// made them.
    settled: Mutex<Vec<Settled<K>>>,
    /// Whether `settled` holds anything (read without its lock on every `lock`).
    has_settled: AtomicBool,
    /// The window's counters, for the committer task to count commits as it answers them.
    pub(super) recorder: Recorder,
    lease: Duration,
    /// The store path, if there is a store.
    store: Option<Committer<K>>,
    /// Copies keys for keep-alive's rounds.
    clone_key: fn(&K) -> K,
    keep_alive: bool,
    keeper_started: AtomicBool,
    /// Counts keep-alive's rounds, for the claims' heartbeats.
    beat: watch::Sender<u64>,
    /// Counts changes that may settle a copy held back (a commit, a release, a lost lease, a
    /// keep-alive round), and wakes the operator waiting for one.
    changes: AtomicU64,
    watcher: Mutex<Option<Waker>>,
}

impl<K> ClaimCore<K> {
    /// The counters, read without a lock (commits the store answered but the operator has
    /// not recorded yet are counted already).
    pub(crate) fn stats(&self) -> Stats {
        self.recorder.stats().clone()
    }

    pub(super) fn keeper_started(&self) -> bool {
        self.keeper_started.load(Ordering::Acquire)
    }

    /// Marks keep-alive started; `false` if it already was.
    fn start_keeper(&self) -> bool {
        !self.keeper_started.swap(true, Ordering::AcqRel)
    }

    /// Something that may settle a held-back copy happened: wakes the operator if it waits.
    pub(super) fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        let waker = self
            .watcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether anything changed since `seen` (updated); else registers `cx`'s waker for the
    /// next change.
    pub(crate) fn poll_changed(&self, seen: &mut u64, cx: &mut Context<'_>) -> bool {
        let now = self.changes.load(Ordering::Acquire);
        if now != *seen {
            *seen = now;
            return true;
        }
        *self.watcher.lock().unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
        // A change between the load and the registration is not lost.
        let now = self.changes.load(Ordering::Acquire);
        if now != *seen {
            *seen = now;
            return true;
        }
        false
    }

    /// A receiver of keep-alive's beats (`None` with keep-alive off).
    pub(super) fn beats(&self) -> Option<watch::Receiver<u64>> {
        self.keep_alive.then(|| self.beat.subscribe())
    }
}

impl<K: Hash + Eq> ClaimCore<K> {
    pub(crate) fn new(
        window: WindowSet<K>,
        store: Option<Committer<K>>,
        clone_key: fn(&K) -> K,
    ) -> Self {
        let lease = window.policy().lease();
        let keep_alive = window.policy().keep_alive();
        ClaimCore {
            clone_key,
            keep_alive,
            keeper_started: AtomicBool::new(false),
            beat: watch::Sender::new(0),
            changes: AtomicU64::new(0),
            watcher: Mutex::new(None),
            recorder: window.recorder().clone(),
            state: Mutex::new(ClaimState {
                window,
                in_flight: HashMap::default(),
            }),
            settled: Mutex::new(Vec::new()),
            has_settled: AtomicBool::new(false),
            lease,
            store,
        }
    }

    /// The state, with the commits settled so far recorded.
    pub(super) fn lock(&self) -> MutexGuard<'_, ClaimState<K>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Acquire: pairs with the committer's release, which it makes before it answers the
        // commit, so that whatever runs after a commit returned finds the key done.
        if self.has_settled.load(Ordering::Acquire) {
            let settled = {
                let mut queue = self.settled.lock().unwrap_or_else(PoisonError::into_inner);
                self.has_settled.store(false, Ordering::Relaxed);
                std::mem::take(&mut *queue)
            };
            state.apply(settled);
        }
        state
    }

    /// Queues commits the store answered, for [`lock`](Self::lock) to record.
    pub(super) fn settle(&self, settled: Vec<Settled<K>>) {
        if settled.is_empty() {
            return;
        }
        let mut queue = self.settled.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.is_empty() {
            *queue = settled;
        } else {
            queue.extend(settled);
        }
        self.has_settled.store(true, Ordering::Release);
        drop(queue);
        self.changed();
    }

    /// Claims `key` in memory (no store, or a store that failed open) from `now` on.
    pub(crate) fn claim_locally(&self, key: K, token: Token, now: Instant) {
        let lease_end = now + self.lease;
        self.lock().in_flight.insert(key, (token, lease_end));
    }

    /// Frees a key this operator may hold but never handed out (it is being dropped): not a
    /// claim anyone saw, so not counted as released.
    pub(crate) fn release_unhanded(&self, key: &K, bytes: Vec<u8>, token: Token) {
        self.lock().free_locally(key, token);
        self.release_in_store(key, bytes, token);
    }

    /// Frees a claim's key; `bytes` are its store bytes if known (empty: encoded here).
    pub(super) fn release(&self, key: &K, bytes: Vec<u8>, token: Token) {
        self.lock().release_locally(key, token);
        self.changed();
        self.release_in_store(key, bytes, token);
    }

    fn release_in_store(&self, key: &K, bytes: Vec<u8>, token: Token) {
        if let Some(committer) = &self.store {
            committer.release(or_encoded(bytes, committer.encode, key), token);
        }
    }

    /// The in-memory verdict for `key`: held back while in flight, a duplicate when done.
    pub(crate) fn pre(&self, key: &K, now: Instant, clone_key: fn(&K) -> K) -> Pre {
        let mut state = self.lock();
        match state.in_flight.get(key) {
            Some(&(_, end)) if end > now => return Pre::HeldBack,
            Some(_) => {
                state.in_flight.remove(key);
            }
            None => {}
        }
        if state.window.contains(key) {
            // A hit counts as seen (LRU order).
            let t = state.window.at(now);
            state.window.observe_uncounted(clone_key(key), t);
            Pre::Duplicate
        } else {
            Pre::Ask
        }
    }

    /// Whether the claim of `key` with `token` no longer holds it in memory: its lease ran out
    /// (not renewed), or keep-alive found it taken over.
    pub(super) fn is_lost(&self, key: &K, token: Token) -> bool {
        let now = Instant::now();
        !self
            .lock()
            .in_flight
            .get(key)
            .is_some_and(|&(t, end)| t == token && end > now)
    }

    /// One round of keep-alive: renews the lease of every key this operator holds in flight
    /// (open claims, and claims read ahead) that is due, in memory and in the store (batched,
    /// token-checked calls). A key the store no longer renews keeps the rest of its lease here
    /// (its commit may have raced the round); if the store still refuses it once that lease has
    /// run out, it is lost: freed here, so that its claim knows and its commit fails.
    pub(super) async fn renew_open_claims(&self) {
        let now = Instant::now();
        // Due: a key held (since its claim or last renewal) for a quarter of its lease or more.
        // Rounds come every third of the lease: a key skipped now is renewed at the next round,
        // with over five twelfths of its lease left; one renewed at the last round is due again
        // (a twelfth of slack for late rounds). A key whose lease ran out here (the store was
        // unreachable) is due too: if nobody took it, it stays ours. Only due keys are copied.
        let due = now.checked_add(self.lease - self.lease / 4);
        let open: Vec<(K, Token)> = self
            .lock()
            .in_flight
            .iter()
            .filter(|&(_, &(_, end))| due.is_none_or(|due| end <= due))
            .map(|(key, &(token, _))| ((self.clone_key)(key), token))
            .collect();
        if !open.is_empty() {
            let answers = match &self.store {
                None => Ok(vec![true; open.len()]),
                Some(committer) => committer.renew(&open, self.lease).await,
            };
            // A store that fails leaves the leases as they were: renewed at the next round,
            // or run out.
            let Ok(answers) = answers else {
                return;
            };
            let end = now + self.lease;
            let (mut renewed, mut lost) = (0, 0);
            let mut state = self.lock();
            for ((key, token), mine) in open.into_iter().zip(answers) {
                let Entry::Occupied(mut held) = state.in_flight.entry(key) else {
                    continue; // settled meanwhile
                };
                if held.get().0 != token {
                    continue;
                }
                if mine {
                    held.get_mut().1 = end;
                    renewed += 1;
                } else if held.get().1 <= now {
                    // Not renewed, and its lease here has run out: lost.
                    held.remove();
                    lost += 1;
                }
                // Otherwise not renewed, but not lost yet: the claim's own commit may have
                // reached the store before this round (the key is done by its token), or
                // the key went free there and nobody took it (its commit still succeeds).
                // Its lease here runs out unless a later round renews it; if another claim
                // did take it, that round finds it lost.
            }
            drop(state);
            self.recorder.kept_alive(renewed, lost);
            if let Some(committer) = &self.store {
                let log = &committer.log;
                if lost > 0 {
                    log.claims_failed(Kind::RenewLost, lost, None);
                }
                op_event!(
                    debug,
                    &log.origin,
                    renewed,
                    lost,
                    "keep-alive renewed the leases of open claims"
                );
            }
        }
        self.beat.send_modify(|n| *n = n.wrapping_add(1));
        // A round may have freed keys (lost), and a copy held back for a claim of another
        // consumer is asked about again on this beat.
        self.changed();
    }

    /// Counts an item's fate. No lock: these counters are written only here, by the operator
    /// (the committer task and dropped claims count commits and releases, with atomic adds).
    pub(crate) fn count(&self, fate: Fate) {
        self.recorder.fate(fate);
    }
}

impl<K: Hash + Eq + Send + Sync + 'static> ClaimCore<K> {
    /// Starts keep-alive if it is on and not running yet (on a tokio runtime; outside one,
    /// leases are not renewed): at the first claim, or when a copy held back starts to wait.
    pub(crate) fn ensure_keeper(self: &Arc<Self>) {
        if !self.keep_alive || self.keeper_started() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.start_keeper() {
            let core: Weak<dyn Renew> = Arc::downgrade(self) as _;
            keeper::spawn(&runtime, core, self.lease);
        }
    }
}

impl<K: Hash + Eq + Send + Sync + 'static> Renew for ClaimCore<K> {
    fn renew_round(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.renew_open_claims())
    }
}

impl<K: Hash + Eq + Send + 'static> Ledger<K> for ClaimCore<K> {
    fn release(&self, key: &K, bytes: Vec<u8>, token: Token) {
        ClaimCore::release(self, key, bytes, token);
    }

    fn settled(&self, settled: Vec<Settled<K>>) {
        for &(_, _, done, _) in &settled {
            if done {
                self.recorder.committed();
            } else {
                self.recorder.released();
            }
        }
        self.settle(settled);
    }

    fn abandoned(&self, keys: &mut dyn Iterator<Item = (K, Token)>) {
        let mut state = self.lock();
        for (key, token) in keys {
            state.release_locally(&key, token);
        }
        drop(state);
        self.changed();
    }
}

/// The claim operators' gate: memory knows in-flight and done keys.
pub(crate) struct ClaimGate<K> {
    pub(crate) core: Arc<ClaimCore<K>>,
    pub(crate) clone_key: fn(&K) -> K,
    /// The last change of the core this gate saw (for held-back copies that wait).
    pub(crate) seen: u64,
}

impl<K: Hash + Eq + Send + Sync + 'static> Gate<K> for ClaimGate<K> {
    fn clock(&self) -> Option<Instant> {
        Some(Instant::now())
    }

    fn decide(&mut self, key: K, now: Option<Instant>) -> Decided<K> {
        let now = now.unwrap_or_else(Instant::now);
        let decided = match self.core.pre(&key, now, self.clone_key) {
            Pre::Duplicate => Decided::Duplicate,
            Pre::HeldBack => Decided::HeldBack,
            Pre::Ask => {
                let token = Token::new();
                self.core.claim_locally((self.clone_key)(&key), token, now);
                Decided::Accept(Some(Held {
                    key,
                    token,
                    bytes: Vec::new(),
                }))
            }
        };
        self.core.count(match &decided {
            Decided::Accept(_) => Fate::Accepted,
            Decided::Duplicate => Fate::Duplicate,
            Decided::HeldBack => Fate::HeldBack,
        });
        decided
    }

    fn pre(&mut self, key: &K, now: Option<Instant>, clone_key: fn(&K) -> K) -> Pre {
        self.core
            .pre(key, now.unwrap_or_else(Instant::now), clone_key)
    }

    /// One lock for the whole request, not one per key.
    fn answered(&mut self, keys: &[K], answers: &[Answer], token: Token, now: Option<Instant>) {
        let now = now.unwrap_or_else(Instant::now);
        let lease_end = now + self.core.lease;
        let mut state = self.core.lock();
        let mut t = None;
        for (key, &answer) in keys.iter().zip(answers) {
            match answer {
                // Also in flight here: a copy read while it is gets held back without asking
                // the store again (the store would answer the same).
                Answer::New => {
                    state
                        .in_flight
                        .insert((self.clone_key)(key), (token, lease_end));
                }
                Answer::Present => {
                    let at = *t.get_or_insert_with(|| state.window.at(now));
                    state.window.observe_uncounted((self.clone_key)(key), at);
                }
                Answer::InFlight => {}
            }
        }
    }

    fn failed(&mut self, key: &K, open: bool, token: Token, now: Option<Instant>) {
        if open {
            // Passed on unchecked: still a claim, in memory at least.
            let now = now.unwrap_or_else(Instant::now);
            self.core.claim_locally((self.clone_key)(key), token, now);
        }
    }

    fn count(&mut self, fate: Fate) {
        self.core.count(fate);
    }

    fn poll_settled(&mut self, cx: &mut Context<'_>) -> bool {
        // A copy waits: keep-alive's rounds ask about it again even with no claim open here.
        self.core.ensure_keeper();
        self.core.poll_changed(&mut self.seen, cx)
    }

    fn still_in_flight(&self, key: &K) -> bool {
        let now = Instant::now();
        self.core
            .lock()
            .in_flight
            .get(key)
            .is_some_and(|&(_, end)| end > now)
    }
}
