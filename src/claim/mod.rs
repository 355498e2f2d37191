//! Claims: an item leaves the operator wrapped in a [`Claim`]; its key is marked done only
//! when the claim is committed, and freed when it is dropped uncommitted.
//!
//! - this file: the [`Claim`] a user holds, and its commit future;
//! - `core`: what a claim operator and its claims share (keys in flight, done keys), and the
//!   claim operators' [`Gate`](crate::pipeline::gate::Gate);
//! - `committer`: the background task that batches commits and releases to the store.

mod committer;
mod core;
mod keeper;

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::any::Any;
use std::time::Duration;

use tokio::sync::oneshot;

pub(crate) use self::committer::Committer;
pub(crate) use self::core::{ClaimCore, ClaimGate, KeyTicket};
pub use self::keeper::Heartbeat;
use crate::pipeline::gate::Held;
use crate::store::{ClaimTransaction, HeldKey, StoreError, Token};

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
pub(crate) trait Ticket: Send + Sync {
    fn commit(self: Box<Self>) -> Settle;
    fn release(self: Box<Self>);
    fn token(&self) -> Token;
    /// Whether the claim no longer holds its key (its lease ran out, or it was taken over).
    fn is_lost(&self) -> bool;
    /// Keep-alive's beats (`None` with keep-alive off).
    fn beats(&self) -> Option<tokio::sync::watch::Receiver<u64>>;
    /// What a commit inside the caller's transaction needs (`None` with no store behind the
    /// window).
    fn tx_target(&self) -> Option<TxTarget>;
    /// The key was marked done by the caller's transaction, which committed: done in memory.
    fn done_in_tx(self: Box<Self>);
}

/// A claim's key as a transaction marks it done.
pub(crate) struct TxTarget {
    pub(crate) store: Arc<dyn Any + Send + Sync>,
    pub(crate) key: Vec<u8>,
    pub(crate) token: Token,
    pub(crate) ttl: Duration,
    /// The key is longer than the store takes: its claim was never sent there.
    pub(crate) in_memory: bool,
}

/// A failed commit, with the item it concerns, so that the consumer can nack it (or retry).
///
/// Its [`error`](CommitError::error) says why; the claim's key was released either way, so
/// the broker's redelivery is processed. Converts into a [`StoreError`] with `?`.
pub struct CommitError<T> {
    item: T,
    error: StoreError,
}

impl<T> CommitError<T> {
    pub(crate) fn new(item: T, error: StoreError) -> Self {
        CommitError { item, error }
    }

    /// Why the commit failed.
    pub fn error(&self) -> &StoreError {
        &self.error
    }

    /// The item the claim held.
    pub fn item(&self) -> &T {
        &self.item
    }

    /// The item the claim held.
    pub fn into_item(self) -> T {
        self.item
    }

    /// The item and the error.
    pub fn into_parts(self) -> (T, StoreError) {
        (self.item, self.error)
    }
}

impl<T> fmt::Debug for CommitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommitError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for CommitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the claim could not be committed: {}", self.error)
    }
}

impl<T> std::error::Error for CommitError<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<T> From<CommitError<T>> for StoreError {
    fn from(e: CommitError<T>) -> Self {
        e.error
    }
}

/// How a commit ends: at once (no store, or no runtime to reach it), or when the committer
/// task has the store's answer.
pub(crate) enum Settle {
    Now(Result<(), StoreError>),
    Later(oneshot::Receiver<Result<(), StoreError>>),
}

impl<T> Claim<T> {
    /// A claim on `held`'s key, or (`None`, an item that had no key to claim) a claim whose
    /// commit and release have nothing to do.
    pub(crate) fn new<K: Hash + Eq + Send + Sync + 'static>(
        item: T,
        held: Option<Held<K>>,
        core: Arc<ClaimCore<K>>,
    ) -> Self {
        let ticket = held.map(|Held { key, token, bytes }| -> Box<dyn Ticket> {
            core.ensure_keeper();
            Box::new(KeyTicket::new(key, bytes, token, core))
        });
        Claim {
            item,
            guard: Guard(ticket),
        }
    }

    /// Marks the key done, and gives the item back (to ack it): later copies are duplicates
    /// (kept for the window's ttl, and in the store if there is one; the store's commits are
    /// batched with other claims').
    ///
    /// This is a step of its own, after the effect: a consumer that dies between its effect
    /// and this commit has applied the effect, and the broker's redelivery applies it again.
    /// Where the effect is a database write, [`commit_with`](Claim::commit_with) closes that
    /// gap.
    ///
    /// # Errors
    ///
    /// A [`CommitError`] that gives the item back, with [`StoreError::LeaseLost`] if the lease
    /// ran out and another claim took the key (its result stands), or the store's error if it
    /// failed. Either way the key is released, so the broker's redelivery is processed again:
    /// do not ack the item (nack it, if the broker wants that).
    ///
    /// Nothing is sent until the returned future is first polled: dropped unpolled, it releases
    /// the key as dropping the claim does.
    pub fn commit(self) -> impl Future<Output = Result<T, CommitError<T>>> {
        // A future of its own instead of an `async fn`: ~48 bytes for a `String` item instead
        // of ~200, which a consumer with thousands of commits in flight moves and stores.
        Committing::Start(self)
    }

    /// Marks the key done **inside `tx`**, the caller's own database transaction in which the
    /// business effect was written, then commits `tx`, and only then marks the key done in
    /// memory and gives the item back, ready to ack. The effect and the mark commit or roll
    /// back together: exactly-once effects.
    ///
    /// The claim must still hold its key (in flight with this claim's token, or free: a claim
    /// that passed unchecked while the store was down has no row). If its lease ran out and
    /// another claim took the key, `tx` is rolled back — the effect too — and the error is
    /// [`StoreError::LeaseLost`]. Any failure rolls `tx` back and releases the key, so the
    /// broker's redelivery is processed. If the `COMMIT` itself fails, or this future is
    /// dropped while it runs, its outcome is unknown: the release then compares the token and
    /// frees only a row still in flight, so a transaction that did commit keeps its key done.
    ///
    /// `tx` is a `sqlx::Transaction<'_, Postgres>` with a `PostgresStore` behind the window
    /// (feature `postgres`), or a `sqlx::Transaction<'_, MySql>` with a `MySqlStore` (feature
    /// `mysql`); see [`ClaimTransaction`].
    ///
    /// # Errors
    ///
    /// A [`CommitError`] that gives the item back: [`StoreError::LeaseLost`],
    /// [`StoreError::NotTransactional`] (`tx` is not a transaction of the claim's store), or the
    /// database's error.
    pub fn commit_with<'c, Tx>(
        self,
        tx: Tx,
    ) -> impl Future<Output = Result<T, CommitError<T>>> + Send + 'c
    where
        Tx: ClaimTransaction + 'c,
        T: Send + 'c,
    {
        let Claim { item, guard } = self;
        commit_in_tx(item, guard, tx)
    }

    /// [`commit_with`](Claim::commit_with) for several claims at once: marks every claim's key
    /// done **inside `tx`**, the transaction in which the effects of all their items were
    /// written, then commits `tx`, then marks the keys done in memory and gives the items back
    /// in the order of `claims`, ready to ack. For consumers that write the effects of several
    /// messages in one transaction, which `commit_with` (one claim per transaction) cannot
    /// commit: the keys of one window's claims are marked by one statement (on MySQL, one per
    /// read-ahead batch that claimed them).
    ///
    /// Every claim must still hold its key; if one does not (its lease ran out and another
    /// claim took it), `tx` is rolled back — every effect — and the error is
    /// [`StoreError::LeaseLost`]. As with `commit_with`, any failure rolls `tx` back and
    /// releases every key; an unknown outcome of the `COMMIT` frees only keys still in flight.
    ///
    /// # Errors
    ///
    /// A [`CommitError`] that gives every item back (in the order of `claims`), with the
    /// errors of [`commit_with`](Claim::commit_with).
    pub fn commit_all_with<'c, Tx>(
        claims: impl IntoIterator<Item = Claim<T>>,
        tx: Tx,
    ) -> impl Future<Output = Result<Vec<T>, CommitError<Vec<T>>>> + Send + 'c
    where
        Tx: ClaimTransaction + 'c,
        T: Send + 'c,
    {
        let (items, guards): (Vec<T>, Vec<Guard>) =
            claims.into_iter().map(|c| (c.item, c.guard)).unzip();
        commit_all_in_tx(items, guards, tx)
    }

    /// Frees the key now (as dropping the claim does), so that the broker's next delivery is
    /// processed, and gives the item back. A store round trip it needs runs in the background.
    pub fn release(self) -> T {
        let Claim { item, guard } = self;
        drop(guard);
        item
    }

    /// Whether this claim no longer holds its key: its lease ran out (keep-alive off, or the
    /// store unreachable for a whole lease), or keep-alive found the key taken over by another
    /// claim. Its commit will fail with [`StoreError::LeaseLost`]; stop working on it if you
    /// can. `false` for a claim with no key to hold.
    pub fn is_lost(&self) -> bool {
        self.guard.0.as_ref().is_some_and(|t| t.is_lost())
    }

    /// The beat of keep-alive, to extend the broker's ack deadline while this claim's handler
    /// runs; see [`Heartbeat`] and [`Window::keep_alive`](crate::Window::keep_alive).
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat::new(self.guard.0.as_ref().and_then(|t| t.beats()))
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

/// [`Claim::commit_with`]. `guard` releases the key if this future is dropped, or fails.
async fn commit_in_tx<T, Tx: ClaimTransaction>(
    item: T,
    mut guard: Guard,
    mut tx: Tx,
) -> Result<T, CommitError<T>> {
    let Some(target) = guard.0.as_ref().map(|t| t.tx_target()) else {
        // A claim with no key to claim (an `Err` item's): nothing to mark.
        return match tx.commit().await {
            Ok(()) => Ok(item),
            Err(e) => Err(CommitError::new(item, e)),
        };
    };
    let Some(target) = target else {
        let _ = tx.rollback().await;
        let e = StoreError::NotTransactional("this claim's window has no store behind it");
        return Err(CommitError::new(item, e));
    };
    if !target.in_memory {
        let marked = tx
            .mark_done(&*target.store, &target.key, target.token, target.ttl)
            .await;
        let error = match marked {
            Ok(true) => None,
            Ok(false) => Some(StoreError::LeaseLost),
            Err(e) => Some(e),
        };
        if let Some(e) = error {
            let _ = tx.rollback().await;
            drop(guard); // releases the key
            return Err(CommitError::new(item, e));
        }
    }
    match tx.commit().await {
        Ok(()) => {
            if let Some(ticket) = guard.0.take() {
                ticket.done_in_tx();
            }
            Ok(item)
        }
        // The outcome is unknown: the release frees the key only if it is still in flight
        // with this claim's token, not if the transaction committed after all.
        Err(e) => Err(CommitError::new(item, e)),
    }
}

/// [`Claim::commit_all_with`]. `guards` release their keys if this future is dropped, or
/// fails.
async fn commit_all_in_tx<T, Tx: ClaimTransaction>(
    items: Vec<T>,
    mut guards: Vec<Guard>,
    mut tx: Tx,
) -> Result<Vec<T>, CommitError<Vec<T>>> {
    // The keys to mark, per store and ttl (one statement each; one group for the claims of
    // one window), groups in the order of their first claim.
    type Group = (Arc<dyn Any + Send + Sync>, Duration, Vec<HeldKey>);
    let mut groups: Vec<Group> = Vec::new();
    for ticket in guards.iter().filter_map(|g| g.0.as_ref()) {
        let Some(target) = ticket.tx_target() else {
            let _ = tx.rollback().await;
            let e = StoreError::NotTransactional("a claim's window has no store behind it");
            return Err(CommitError::new(items, e));
        };
        if target.in_memory {
            continue;
        }
        let same = |g: &&mut Group| Arc::ptr_eq(&g.0, &target.store) && g.1 == target.ttl;
        match groups.iter_mut().find(same) {
            Some(group) => group.2.push((target.key, target.token)),
            None => groups.push((target.store, target.ttl, vec![(target.key, target.token)])),
        }
    }
    for (store, ttl, keys) in &groups {
        let error = match tx.mark_all_done(&**store, keys, *ttl).await {
            Ok(true) => None,
            Ok(false) => Some(StoreError::LeaseLost),
            Err(e) => Some(e),
        };
        if let Some(e) = error {
            let _ = tx.rollback().await;
            drop(guards); // releases the keys
            return Err(CommitError::new(items, e));
        }
    }
    match tx.commit().await {
        Ok(()) => {
            for ticket in guards.iter_mut().filter_map(|g| g.0.take()) {
                ticket.done_in_tx();
            }
            Ok(items)
        }
        // The outcome is unknown: the releases free only keys still in flight with their
        // claims' tokens, not those of a transaction that committed after all.
        Err(e) => Err(CommitError::new(items, e)),
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
    type Output = Result<T, CommitError<T>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match std::mem::replace(this, Committing::Done) {
                Committing::Start(claim) => {
                    let Claim { item, mut guard } = claim;
                    match guard.0.take().map(Ticket::commit) {
                        None => return Poll::Ready(Ok(item)),
                        Some(Settle::Now(result)) => {
                            return Poll::Ready(match result {
                                Ok(()) => Ok(item),
                                Err(e) => Err(CommitError::new(item, e)),
                            });
                        }
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
                        Poll::Ready(Ok(Ok(()))) => Poll::Ready(Ok(item)),
                        Poll::Ready(Ok(Err(e))) => Poll::Ready(Err(CommitError::new(item, e))),
                        Poll::Ready(Err(_)) => Poll::Ready(Err(CommitError::new(
                            item,
                            StoreError::backend("commit", "the commit task is gone"),
                        ))),
                    };
                }
                // As every future may: the item was handed out with the answer.
                Committing::Done => panic!("`Claim::commit` future polled after completion"),
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
