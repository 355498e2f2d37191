//! Claims: an item leaves the operator wrapped in a [`Claim`]; its key is marked done only
//! when the claim is committed, and freed when it is dropped uncommitted.
//!
//! - this file: the [`Claim`] a user holds, and its commit future;
//! - `core`: what a claim operator and its claims share (keys in flight, done keys), and the
//!   claim operators' [`Gate`](crate::pipeline::gate::Gate);
//! - `committer`: the background task that batches commits and releases to the store.

mod committer;
mod core;

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

pub(crate) use self::committer::Committer;
pub(crate) use self::core::{ClaimCore, ClaimGate, KeyTicket};
use crate::pipeline::gate::Held;
use crate::store::{StoreError, Token};

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
