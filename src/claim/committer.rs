//! The committer: a background task that sends commits and releases to the store in batches,
//! and hands the store's answers to the claims and to the operator's memory.

use std::any::Any;
use std::hash::Hash;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Settle;
use crate::logging::{Kind, Log, op_event};
use crate::store::{ClaimStore, HeldKey, StoreError, Token};

/// A commit the store answered: the key, its claim's token, whether it is done, when.
pub(super) type Settled<K> = (K, Token, bool, Instant);

/// Where the committer reports: the claims' memory (`ClaimCore`), seen through this trait so
/// that the committer depends on nothing above it.
pub(super) trait Ledger<K>: Send + Sync + 'static {
    /// Frees a claim's key that could not be committed (in memory, and in the store).
    fn release(&self, key: &K, bytes: Vec<u8>, token: Token);
    /// Counts the store's answers and queues them for the operator's memory.
    fn settled(&self, settled: Vec<Settled<K>>);
    /// Commits that will never be answered (the runtime shut down): frees their keys in memory.
    fn abandoned(&self, keys: &mut dyn Iterator<Item = (K, Token)>);
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
    store: Arc<dyn ClaimStore>,
    /// The same store, for a transaction to find its own database's store in
    /// (`Claim::commit_with`).
    any: Arc<dyn Any + Send + Sync>,
    ttl: Duration,
    timeout: Duration,
    pub(super) encode: fn(&K, &mut Vec<u8>),
    tx: OnceLock<mpsc::UnboundedSender<Op<K>>>,
    /// The operator's log.
    pub(super) log: Arc<Log>,
}

/// The most operations sent in one round trip.
const MAX_BATCH: usize = 1024;

impl<K> Committer<K> {
    pub(crate) fn new(
        store: Arc<dyn ClaimStore>,
        any: Arc<dyn Any + Send + Sync>,
        ttl: Duration,
        timeout: Duration,
        encode: fn(&K, &mut Vec<u8>),
        log: Arc<Log>,
    ) -> Self {
        Committer {
            store,
            any,
            ttl,
            timeout,
            encode,
            tx: OnceLock::new(),
            log,
        }
    }

    pub(super) fn any_store(&self) -> Arc<dyn Any + Send + Sync> {
        Arc::clone(&self.any)
    }

    pub(super) fn max_key_len(&self) -> usize {
        self.store.max_key_len()
    }

    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Renews the leases of `open` claims in the store: per claim, whether it still holds its
    /// key. A key longer than the store takes was never sent there: renewed in memory alone.
    ///
    /// One call per [`MAX_BATCH`] keys, each sent once the previous one is answered: a store
    /// that runs a call alone (a Redis script) serves the commits sent meanwhile between two
    /// calls, instead of after all of them. A failure is logged (rate-limited); the answers of
    /// the calls before it are kept (the round applies those, and the keys after them keep
    /// their lease until the next round).
    pub(super) async fn renew(
        &self,
        open: &[(K, Token)],
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        let mut answers = Vec::with_capacity(open.len());
        for chunk in open.chunks(MAX_BATCH) {
            match self.renew_in_store(chunk, lease).await {
                Ok(renewed) => answers.extend(renewed),
                Err(e) => {
                    self.log.claims_failed(
                        Kind::Renew,
                        (open.len() - answers.len()) as u64,
                        Some(&e),
                    );
                    return if answers.is_empty() {
                        Err(e)
                    } else {
                        Ok(answers)
                    };
                }
            }
        }
        self.log.answered(Kind::Renew);
        Ok(answers)
    }

    async fn renew_in_store(
        &self,
        open: &[(K, Token)],
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        let max = self.store.max_key_len();
        let mut held = Vec::with_capacity(open.len());
        let mut sent = Vec::with_capacity(open.len());
        for (key, token) in open {
            let bytes = key_bytes(self.encode, key);
            sent.push(bytes.len() <= max);
            if bytes.len() <= max {
                held.push((bytes, *token));
            }
        }
        let n = held.len();
        let answers = match tokio::time::timeout(self.timeout, self.store.renew(held, lease)).await
        {
            Ok(Ok(answers)) if answers.len() == n => answers,
            Ok(Ok(answers)) => {
                return Err(StoreError::backend(
                    "renew leases",
                    format!("{} answers for {n} keys", answers.len()),
                ));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(StoreError::Timeout(self.timeout)),
        };
        let mut answers = answers.into_iter();
        Ok(sent
            .into_iter()
            .map(|sent| !sent || answers.next().unwrap_or(false))
            .collect())
    }

    pub(super) fn release(&self, key: Vec<u8>, token: Token) {
        if key.len() > self.store.max_key_len() {
            // Never sent to the store (its claim passed unchecked): nothing to free there.
            return;
        }
        if let Some(tx) = self.tx.get() {
            let _ = tx.send(Op::Release(key, token));
        } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // No commit yet started the task: release on a task of its own.
            let store = Arc::clone(&self.store);
            let log = Arc::clone(&self.log);
            runtime.spawn(release(store, self.timeout, vec![(key, token)], log));
        }
    }
}

impl<K: Hash + Eq + Send + 'static> Committer<K> {
    /// The channel to the task, started on first use; `None` outside a tokio runtime.
    fn sender<L: Ledger<K>>(&self, ledger: &Arc<L>) -> Option<&mpsc::UnboundedSender<Op<K>>> {
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
                log: Arc::clone(&self.log),
                // Weak: the core owns the sender, and the task ends when the sender is gone.
                ledger: Arc::downgrade(ledger) as Weak<dyn Ledger<K>>,
            };
            runtime.spawn(task.run(rx));
            tx
        }))
    }

    pub(super) fn commit<L: Ledger<K>>(
        &self,
        ledger: &Arc<L>,
        key: K,
        bytes: Vec<u8>,
        token: Token,
    ) -> Settle {
        let Some(tx) = self.sender(ledger) else {
            ledger.release(&key, bytes, token);
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
                    ledger.release(&key, bytes, token);
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
    store: Arc<dyn ClaimStore>,
    ttl: Duration,
    timeout: Duration,
    pub(super) encode: fn(&K, &mut Vec<u8>),
    log: Arc<Log>,
    ledger: Weak<dyn Ledger<K>>,
}

impl<K: Hash + Eq + Send + 'static> Task<K> {
    async fn run(self, rx: mpsc::UnboundedReceiver<Op<K>>) {
        let task = Arc::new(self);
        let mut rx = Inbox {
            rx,
            ledger: Weak::clone(&task.ledger),
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
                    ledger: Weak::clone(&task.ledger),
                };
                batches.spawn(Arc::clone(&task).commit(commits));
            }
            if !releases.is_empty() {
                let log = Arc::clone(&task.log);
                batches.spawn(release(
                    Arc::clone(&task.store),
                    task.timeout,
                    releases,
                    log,
                ));
            }
        }
        while batches.join_next().await.is_some() {}
    }

    /// Commits one batch in the store, hands the answers to memory, and answers each claim.
    async fn commit(self: Arc<Self>, mut commits: Unsettled<K>) {
        let max = self.store.max_key_len();
        let mut held: Vec<HeldKey> = Vec::with_capacity(commits.commits.len());
        // Which commits go to the store: a key longer than the store takes was never sent to
        // it (its claim passed unchecked, in memory only), so it is done in memory alone and
        // cannot fail the batch for the others.
        let mut sent = Vec::with_capacity(commits.commits.len());
        for (key, bytes, token, _) in &mut commits.commits {
            let bytes = or_encoded(std::mem::take(bytes), self.encode, key);
            sent.push(bytes.len() <= max);
            if bytes.len() <= max {
                held.push((bytes, *token));
            }
        }
        let n = held.len();
        let started = Instant::now();
        let answers = if n == 0 {
            Ok(Vec::new())
        } else {
            match tokio::time::timeout(self.timeout, self.store.commit(held, self.ttl)).await {
                Ok(Ok(answers)) if answers.len() == n => Ok(answers),
                Ok(Ok(answers)) => Err(StoreError::backend(
                    "commit",
                    format!("{} answers for {n} keys", answers.len()),
                )),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(StoreError::Timeout(self.timeout)),
            }
        };
        // One result per commit, in order; those done in memory alone cannot fail.
        let results: Vec<Result<(), StoreError>> = match &answers {
            Ok(answers) => {
                let mut answers = answers.iter();
                sent.iter()
                    .map(|&sent| match sent {
                        false => Ok(()),
                        true if answers.next() == Some(&true) => Ok(()),
                        true => Err(StoreError::LeaseLost),
                    })
                    .collect()
            }
            Err(e) => sent
                .iter()
                .map(|&sent| if sent { Err(e.clone()) } else { Ok(()) })
                .collect(),
        };
        self.log_commits(n, &answers, started);
        let failed = self.settle(std::mem::take(&mut commits.commits), results);
        if !failed.is_empty() {
            let log = Arc::clone(&self.log);
            release(Arc::clone(&self.store), self.timeout, failed, log).await;
        }
    }

    /// A batch of `n` commits sent to the store: its failure or refusals as warnings
    /// (rate-limited), its answers as a debug event.
    fn log_commits(&self, n: usize, answers: &Result<Vec<bool>, StoreError>, started: Instant) {
        if n == 0 {
            return;
        }
        match answers {
            Err(e) => self.log.claims_failed(Kind::Commit, n as u64, Some(e)),
            Ok(answers) => {
                self.log.answered(Kind::Commit);
                let lost = answers.iter().filter(|&&done| !done).count();
                if lost > 0 {
                    self.log.claims_failed(Kind::CommitLost, lost as u64, None);
                }
                op_event!(
                    debug,
                    &self.log.origin,
                    commits = n,
                    committed = n - lost,
                    lost,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "commits answered"
                );
            }
        }
    }
}

impl<K: Hash + Eq + 'static> Task<K> {
    /// Hands the store's answers to the operator's state (recorded there by its next lock) and
    /// answers each claim; returns the keys to free in the store.
    fn settle(
        &self,
        commits: Vec<Commit<K>>,
        results: Vec<Result<(), StoreError>>,
    ) -> Vec<HeldKey> {
        let now = Instant::now();
        let mut failed: Vec<HeldKey> = Vec::new();
        let mut settled = Vec::with_capacity(commits.len());
        let mut replies = Vec::with_capacity(commits.len());
        for ((key, _, token, reply), result) in commits.into_iter().zip(results) {
            if result.is_err() {
                // Not done: free the key (here and, if still ours, in the store).
                failed.push((key_bytes(self.encode, &key), token));
            }
            settled.push((key, token, result.is_ok(), now));
            replies.push((reply, result));
        }
        // Queued and counted before any claim hears its answer.
        if let Some(ledger) = self.ledger.upgrade() {
            ledger.settled(settled);
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
struct Unsettled<K: 'static> {
    commits: Vec<Commit<K>>,
    ledger: Weak<dyn Ledger<K>>,
}

impl<K: 'static> Drop for Unsettled<K> {
    fn drop(&mut self) {
        if self.commits.is_empty() {
            return;
        }
        if let Some(ledger) = self.ledger.upgrade() {
            ledger.abandoned(
                &mut self
                    .commits
                    .drain(..)
                    .map(|(key, _, token, _)| (key, token)),
            );
        }
    }
}

/// The committer's channel. Dropped with commits still queued (the runtime shut down), it frees
/// their keys in memory, as [`Unsettled`] does for a batch.
struct Inbox<K: 'static> {
    rx: mpsc::UnboundedReceiver<Op<K>>,
    ledger: Weak<dyn Ledger<K>>,
}

impl<K: 'static> Drop for Inbox<K> {
    fn drop(&mut self) {
        let Some(ledger) = self.ledger.upgrade() else {
            return;
        };
        let rx = &mut self.rx;
        ledger.abandoned(&mut std::iter::from_fn(|| {
            loop {
                match rx.try_recv().ok()? {
                    Op::Commit(key, _, token, _) => return Some((key, token)),
                    Op::Release(..) => {}
                }
            }
        }));
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
pub(super) fn or_encoded<K>(bytes: Vec<u8>, encode: fn(&K, &mut Vec<u8>), key: &K) -> Vec<u8> {
    if bytes.is_empty() {
        key_bytes(encode, key)
    } else {
        bytes
    }
}

/// Releases one batch. A failed release leaves its keys in flight until their lease ends
/// (logged, rate-limited).
async fn release(
    store: Arc<dyn ClaimStore>,
    timeout: Duration,
    releases: Vec<HeldKey>,
    log: Arc<Log>,
) {
    let n = releases.len();
    let error = match tokio::time::timeout(timeout, store.release(releases)).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(_) => StoreError::Timeout(timeout),
    };
    log.claims_failed(Kind::Release, n as u64, Some(&error));
}
