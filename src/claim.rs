//! Claims: an item leaves the operator wrapped in a [`Claim`]; its key is marked done only
//! when the claim is committed, and freed when it is dropped uncommitted.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::WindowSet;
use crate::stats::Recorder;
use crate::store::{HeldKey, Store, StoreError, Token};
use crate::stored::driver::{Answer, Fate, Gate, Held, Pre};

/// An item whose key is claimed: in flight until [`commit`](Claim::commit) marks it done, or
/// [`release`](Claim::release) (or a drop) frees it.
///
/// Dereferences to the item. While the claim is open, redelivered copies of its key are held
/// back (neither yielded nor passed to `on_duplicate`): if this claim commits they will be
/// duplicates, if it is released the broker's next delivery is processed.
///
/// Dropping a claim uncommitted — an error returned with `?`, a panic unwinding, a cancelled
/// task — releases its key. Without a runtime to run it on (a drop outside tokio), the store's
/// copy of the key is freed by its lease instead.
#[must_use = "a claim releases its key when dropped: commit it once the item is processed"]
pub struct Claim<T> {
    item: T,
    guard: Guard,
}

/// Releases the key when dropped, unless the ticket was taken (committed or released).
struct Guard(Option<Box<dyn Ticket>>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(ticket) = self.0.take() {
            ticket.release();
        }
    }
}

/// The key side of a claim, with the key's type erased.
trait Ticket: Send + Sync {
    fn commit(self: Box<Self>) -> Settle;
    fn release(self: Box<Self>);
    fn token(&self) -> Token;
}

/// How a commit ends: at once (no store, or no runtime to reach it), or when the committer
/// task has the store's answer.
enum Settle {
    Now(Result<(), StoreError>),
    Later(oneshot::Receiver<Result<(), StoreError>>),
}

impl<T> Claim<T> {
    pub(crate) fn new<K: Hash + Eq + Send + Sync + 'static>(
        item: T,
        held: Held<K>,
        core: Arc<ClaimCore<K>>,
    ) -> Self {
        let Held { key, token, bytes } = held;
        Claim {
            item,
            guard: Guard(Some(Box::new(KeyTicket {
                key,
                bytes,
                token,
                core,
            }))),
        }
    }

    /// Marks the key done, and gives the item back (to ack it): later copies are duplicates
    /// (kept for the window's ttl, and in the store if there is one; the store's commits are
    /// batched with other claims').
    ///
    /// # Errors
    ///
    /// [`StoreError::LeaseLost`] if the lease ran out and another claim took the key (its
    /// result stands); the store's error if it failed. Either way the key is released, so the
    /// broker's redelivery is processed again: do not ack the item.
    ///
    /// Nothing is sent until the returned future is first polled: dropped unpolled, it releases
    /// the key as dropping the claim does.
    pub fn commit(self) -> impl Future<Output = Result<T, StoreError>> {
        // A future of its own instead of an `async fn`: ~48 bytes for a `String` item instead
        // of ~200, which a consumer with thousands of commits in flight moves and stores.
        Committing::Start(self)
    }

    /// Frees the key now (as dropping the claim does), so that the broker's next delivery is
    /// processed, and gives the item back. A store round trip it needs runs in the background.
    pub fn release(self) -> T {
        let Claim { item, guard } = self;
        drop(guard);
        item
    }

    /// The token of the claim (what the store holds for its key while it is in flight).
    pub fn token(&self) -> Token {
        self.guard.0.as_ref().map_or_else(Token::new, |t| t.token())
    }

    /// The item.
    pub fn get_ref(&self) -> &T {
        &self.item
    }
}

/// The future of [`Claim::commit`].
enum Committing<T> {
    /// Not polled yet.
    Start(Claim<T>),
    /// Waiting for the committer task's answer. Outside tokio's coop budget: a batch's answer
    /// makes up to 1,024 commits ready at once, and a consumer that awaits them together
    /// (`buffer_unordered`) would otherwise see all but the first ~128 refused and re-woken,
    /// every batch. A commit completes once, so it cannot starve the task.
    Waiting(
        T,
        tokio::task::coop::Unconstrained<oneshot::Receiver<Result<(), StoreError>>>,
    ),
    /// Answered.
    Done,
}

// The item is only ever moved, never pinned.
impl<T> Unpin for Committing<T> {}

impl<T> Future for Committing<T> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match std::mem::replace(this, Committing::Done) {
                Committing::Start(claim) => {
                    let Claim { item, mut guard } = claim;
                    match guard.0.take().map(Ticket::commit) {
                        None => return Poll::Ready(Ok(item)),
                        Some(Settle::Now(result)) => return Poll::Ready(result.map(|()| item)),
                        Some(Settle::Later(answer)) => {
                            *this =
                                Committing::Waiting(item, tokio::task::coop::unconstrained(answer));
                        }
                    }
                }
                Committing::Waiting(item, mut answer) => {
                    return match Pin::new(&mut answer).poll(cx) {
                        Poll::Pending => {
                            *this = Committing::Waiting(item, answer);
                            Poll::Pending
                        }
                        Poll::Ready(Ok(result)) => Poll::Ready(result.map(|()| item)),
                        Poll::Ready(Err(_)) => Poll::Ready(Err(StoreError::backend(
                            "commit",
                            "the commit task is gone",
                        ))),
                    };
                }
                Committing::Done => {
                    return Poll::Ready(Err(StoreError::backend(
                        "commit",
                        "the commit future was polled after it completed",
                    )));
                }
            }
        }
    }
}

impl<T> Deref for Claim<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.item
    }
}

impl<T> DerefMut for Claim<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.item
    }
}

impl<T: fmt::Debug> fmt::Debug for Claim<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("item", &self.item)
            .field("open", &self.guard.0.is_some())
            .finish()
    }
}

struct KeyTicket<K> {
    key: K,
    /// The key's store bytes if the claim request encoded them (empty otherwise).
    bytes: Vec<u8>,
    token: Token,
    core: Arc<ClaimCore<K>>,
}

impl<K: Hash + Eq + Send + Sync + 'static> Ticket for KeyTicket<K> {
    fn commit(self: Box<Self>) -> Settle {
        let this = *self;
        match &this.core.store {
            // The committer task commits in the store, then here, then answers.
            Some(committer) => committer.commit(&this.core, this.key, this.bytes, this.token),
            None => Settle::Now(this.core.lock().commit_locally(
                this.key,
                this.token,
                Instant::now(),
            )),
        }
    }

    fn release(self: Box<Self>) {
        let this = *self;
        this.core.release(&this.key, this.bytes, this.token);
    }

    fn token(&self) -> Token {
        self.token
    }
}

/// Keys in flight, with their claim's token and the end of its lease.
type InFlight<K> = HashMap<K, (Token, Instant), foldhash::fast::RandomState>;

struct ClaimState<K> {
    /// Done keys.
    window: WindowSet<K>,
    in_flight: InFlight<K>,
}

impl<K: Hash + Eq> ClaimState<K> {
    /// Marks `key` done, unless another claim holds it now (our lease ran out).
    fn commit_locally(&mut self, key: K, token: Token, now: Instant) -> Result<(), StoreError> {
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
    fn release_locally(&mut self, key: &K, token: Token) {
        self.free_locally(key, token);
        self.window.recorder().released();
    }
}

/// A commit the store answered: the key, its claim's token, whether it is done, when.
type Settled<K> = (K, Token, bool, Instant);

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
    recorder: Recorder,
    lease: Duration,
    /// The store path, if there is a store.
    store: Option<Committer<K>>,
}

impl<K: Hash + Eq> ClaimCore<K> {
    pub(crate) fn new(window: WindowSet<K>, lease: Duration, store: Option<Committer<K>>) -> Self {
        ClaimCore {
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
    fn lock(&self) -> MutexGuard<'_, ClaimState<K>> {
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
    fn settle(&self, settled: Vec<Settled<K>>) {
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
    }

    pub(crate) fn stats(&self) -> crate::Stats {
        self.lock().window.stats()
    }

    /// Claims `key` in memory (no store, or a store that failed open) from `now` on.
    pub(crate) fn claim_locally(&self, key: K, token: Token, now: Instant) {
        let lease_end = now + self.lease;
        self.lock().in_flight.insert(key, (token, lease_end));
    }

    /// Frees a key this operator may hold but never handed out (it is being dropped): not a
    /// claim anyone saw, so not counted as released.
    pub(crate) fn release_unhanded(&self, key: &K, token: Token) {
        self.lock().free_locally(key, token);
        self.release_in_store(key, Vec::new(), token);
    }

    /// Frees a claim's key; `bytes` are its store bytes if known (empty: encoded here).
    fn release(&self, key: &K, bytes: Vec<u8>, token: Token) {
        self.lock().release_locally(key, token);
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

    /// Counts an item's fate. No lock: these counters are written only here, by the operator
    /// (the committer task and dropped claims count commits and releases, with atomic adds).
    pub(crate) fn count(&self, fate: Fate) {
        let r = &self.recorder;
        match fate {
            Fate::Accepted => r.verdict(true),
            Fate::Duplicate => r.verdict(false),
            Fate::HeldBack => r.held_back(),
            Fate::Unchecked => r.unchecked(),
            Fate::StoreError => r.store_error(),
        }
    }
}

/// The claim operators' gate: memory knows in-flight and done keys.
pub(crate) struct ClaimGate<'a, K> {
    pub(crate) core: &'a ClaimCore<K>,
    pub(crate) clone_key: fn(&K) -> K,
}

impl<K: Hash + Eq> Gate<K> for ClaimGate<'_, K> {
    fn now(&self) -> Option<Instant> {
        Some(Instant::now())
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
}

enum Op<K> {
    /// A claim's key, its store bytes (empty: not encoded yet), its token, where the answer
    /// goes.
    Commit(K, Vec<u8>, Token, oneshot::Sender<Result<(), StoreError>>),
    Release(Vec<u8>, Token),
}

/// Sends commits and releases to the store from a background task, in batches: the commits
/// (and releases) queued while one round trip runs go together in the next. The task counts
/// the answers and queues them for the operator's state (one short lock per batch), so a
/// commit costs its caller a channel send and a wake-up.
pub(crate) struct Committer<K> {
    store: Arc<dyn Store>,
    ttl: Duration,
    timeout: Duration,
    encode: fn(&K, &mut Vec<u8>),
    tx: OnceLock<mpsc::UnboundedSender<Op<K>>>,
}

/// The most operations sent in one round trip.
const MAX_BATCH: usize = 1024;

impl<K> Committer<K> {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        ttl: Duration,
        timeout: Duration,
        encode: fn(&K, &mut Vec<u8>),
    ) -> Self {
        Committer {
            store,
            ttl,
            timeout,
            encode,
            tx: OnceLock::new(),
        }
    }

    fn release(&self, key: Vec<u8>, token: Token) {
        if let Some(tx) = self.tx.get() {
            let _ = tx.send(Op::Release(key, token));
        } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // No commit yet started the task: release on a task of its own.
            let store = Arc::clone(&self.store);
            runtime.spawn(release(store, self.timeout, vec![(key, token)]));
        }
    }
}

impl<K: Hash + Eq + Send + 'static> Committer<K> {
    /// The channel to the task, started on first use; `None` outside a tokio runtime.
    fn sender(&self, core: &Arc<ClaimCore<K>>) -> Option<&mpsc::UnboundedSender<Op<K>>> {
        if let Some(tx) = self.tx.get() {
            return Some(tx);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let task = Task {
                store: Arc::clone(&self.store),
                ttl: self.ttl,
                timeout: self.timeout,
                encode: self.encode,
                // Weak: the core owns the sender, and the task ends when the sender is gone.
                core: Arc::downgrade(core),
            };
            runtime.spawn(task.run(rx));
            tx
        }))
    }

    fn commit(&self, core: &Arc<ClaimCore<K>>, key: K, bytes: Vec<u8>, token: Token) -> Settle {
        let Some(tx) = self.sender(core) else {
            core.release(&key, bytes, token);
            return Settle::Now(Err(StoreError::backend(
                "commit",
                "no tokio runtime to commit on",
            )));
        };
        let (reply, answer) = oneshot::channel();
        match tx.send(Op::Commit(key, bytes, token, reply)) {
            Ok(()) => Settle::Later(answer),
            Err(mpsc::error::SendError(op)) => {
                if let Op::Commit(key, bytes, token, _) = op {
                    core.release(&key, bytes, token);
                }
                Settle::Now(Err(StoreError::backend(
                    "commit",
                    "the commit task is gone",
                )))
            }
        }
    }
}

/// Batches of commits and releases settled at once: while one waits on the store, the next
/// is already on its way.
const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// The committer's background task.
struct Task<K> {
    store: Arc<dyn Store>,
    ttl: Duration,
    timeout: Duration,
    encode: fn(&K, &mut Vec<u8>),
    core: Weak<ClaimCore<K>>,
}

impl<K: Hash + Eq + Send + 'static> Task<K> {
    async fn run(self, rx: mpsc::UnboundedReceiver<Op<K>>) {
        let task = Arc::new(self);
        let mut rx = Inbox {
            rx,
            core: Weak::clone(&task.core),
        };
        let mut batches = tokio::task::JoinSet::new();
        let mut ops = Vec::new();
        loop {
            while batches.try_join_next().is_some() {}
            if batches.len() >= MAX_BATCHES_IN_FLIGHT {
                batches.join_next().await;
                continue;
            }
            if rx.rx.recv_many(&mut ops, MAX_BATCH).await == 0 {
                break;
            }
            let mut commits = Vec::with_capacity(ops.len());
            let mut releases: Vec<HeldKey> = Vec::new();
            for op in ops.drain(..) {
                match op {
                    Op::Commit(key, bytes, token, reply) => {
                        commits.push((key, bytes, token, reply));
                    }
                    Op::Release(key, token) => releases.push((key, token)),
                }
            }
            if !commits.is_empty() {
                // Guarded from here: a batch cut off before its first poll frees its keys too.
                let commits = Unsettled {
                    commits,
                    core: Weak::clone(&task.core),
                };
                batches.spawn(Arc::clone(&task).commit(commits));
            }
            if !releases.is_empty() {
                batches.spawn(release(Arc::clone(&task.store), task.timeout, releases));
            }
        }
        while batches.join_next().await.is_some() {}
    }

    /// Commits one batch in the store, hands the answers to memory, and answers each claim.
    async fn commit(self: Arc<Self>, mut commits: Unsettled<K>) {
        let held: Vec<HeldKey> = commits
            .commits
            .iter_mut()
            .map(|(key, bytes, token, _)| {
                (or_encoded(std::mem::take(bytes), self.encode, key), *token)
            })
            .collect();
        let n = held.len();
        let answers = match self.store.as_claim_store() {
            None => Err(StoreError::ClaimsUnsupported),
            Some(claims) => {
                match tokio::time::timeout(self.timeout, claims.commit(held, self.ttl)).await {
                    Ok(Ok(answers)) if answers.len() == n => Ok(answers),
                    Ok(Ok(answers)) => Err(StoreError::backend(
                        "commit",
                        format!("{} answers for {n} keys", answers.len()),
                    )),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(StoreError::Timeout(self.timeout)),
                }
            }
        };
        let failed = self.settle(std::mem::take(&mut commits.commits), &answers);
        if !failed.is_empty() {
            release(Arc::clone(&self.store), self.timeout, failed).await;
        }
    }
}

impl<K: Hash + Eq> Task<K> {
    /// Hands the store's answers to the operator's state (recorded there by its next lock) and
    /// answers each claim; returns the keys to free in the store.
    fn settle(
        &self,
        commits: Vec<Commit<K>>,
        answers: &Result<Vec<bool>, StoreError>,
    ) -> Vec<HeldKey> {
        let now = Instant::now();
        let mut failed: Vec<HeldKey> = Vec::new();
        let mut settled = Vec::with_capacity(commits.len());
        let mut replies = Vec::with_capacity(commits.len());
        for (i, (key, _, token, reply)) in commits.into_iter().enumerate() {
            let result = match answers {
                Ok(answers) if answers[i] => Ok(()),
                // Not done: free the key (here and, if still ours, in the store).
                answer => {
                    failed.push((key_bytes(self.encode, &key), token));
                    match answer {
                        Err(e) => Err(e.clone()),
                        Ok(_) => Err(StoreError::LeaseLost),
                    }
                }
            };
            settled.push((key, token, result.is_ok(), now));
            replies.push((reply, result));
        }
        // Queued and counted before any claim hears its answer.
        if let Some(core) = self.core.upgrade() {
            for &(_, _, done, _) in &settled {
                if done {
                    core.recorder.committed();
                } else {
                    core.recorder.released();
                }
            }
            core.settle(settled);
        }
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        failed
    }
}

/// Commits not answered yet. Dropped with some left (the runtime shut down while the store
/// call ran), it frees their keys in memory, so that redeliveries are processed; the store's
/// copies are freed by their lease. Their callers get "the commit task is gone".
struct Unsettled<K: Hash + Eq> {
    commits: Vec<Commit<K>>,
    core: Weak<ClaimCore<K>>,
}

impl<K: Hash + Eq> Drop for Unsettled<K> {
    fn drop(&mut self) {
        if self.commits.is_empty() {
            return;
        }
        if let Some(core) = self.core.upgrade() {
            let mut state = core.lock();
            for (key, _, token, _) in self.commits.drain(..) {
                state.release_locally(&key, token);
            }
        }
    }
}

/// The committer's channel. Dropped with commits still queued (the runtime shut down), it frees
/// their keys in memory, as [`Unsettled`] does for a batch.
struct Inbox<K: Hash + Eq> {
    rx: mpsc::UnboundedReceiver<Op<K>>,
    core: Weak<ClaimCore<K>>,
}

impl<K: Hash + Eq> Drop for Inbox<K> {
    fn drop(&mut self) {
        let Some(core) = self.core.upgrade() else {
            return;
        };
        let mut state = core.lock();
        while let Ok(op) = self.rx.try_recv() {
            if let Op::Commit(key, _, token, _) = op {
                state.release_locally(&key, token);
            }
        }
    }
}

/// `key`'s store bytes ([`StoreKey::key_bytes`](crate::store::StoreKey::key_bytes) through the
/// operator's encoder, since the claim types do not carry the `StoreKey` bound).
fn key_bytes<K>(encode: fn(&K, &mut Vec<u8>), key: &K) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode(key, &mut bytes);
    bytes
}

/// A commit waiting in the committer: the key, its store bytes (taken when the batch is sent),
/// its claim's token, where the answer goes.
type Commit<K> = (K, Vec<u8>, Token, oneshot::Sender<Result<(), StoreError>>);

/// `bytes` if the claim kept them, else `key` encoded now.
fn or_encoded<K>(bytes: Vec<u8>, encode: fn(&K, &mut Vec<u8>), key: &K) -> Vec<u8> {
    if bytes.is_empty() {
        key_bytes(encode, key)
    } else {
        bytes
    }
}

/// Releases one batch. A failed release is harmless: the key's lease frees it.
async fn release(store: Arc<dyn Store>, timeout: Duration, releases: Vec<HeldKey>) {
    if let Some(claims) = store.as_claim_store() {
        let _ = tokio::time::timeout(timeout, claims.release(releases)).await;
    }
}
