use core::fmt;
use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};
use std::sync::Arc;

use futures_core::{FusedStream, Stream};
use pin_project::pin_project;

use super::core::{Core, Plain, Step, Yield};
use crate::claim::{Claim, ClaimGate};
use crate::stats::Stats;
use crate::store::StoreError;

/// A delivery with its verdict: what [`ClaimByKey::verdicts`](crate::ClaimByKey::verdicts) and
/// [`TryClaimByKey::verdicts`](crate::TryClaimByKey::verdicts) yield, every delivery in input
/// order, so that a consumer settles each with `.await` (an ack, a nack) and back-pressure
/// instead of in a synchronous hook.
#[must_use = "a delivery must be settled: acked, nacked, or its claim committed"]
pub enum Verdict<T, E = StoreError> {
    /// New: process it, then commit the claim (or commit it in the effect's transaction with
    /// [`Claim::commit_with`]), then ack.
    Claimed(Claim<T>),
    /// Its key is done: the original was processed. Ack it.
    Duplicate(T),
    /// Its key is in flight under another claim that may still fail: do not ack it. Leave it
    /// to a broker that redelivers unacked messages by itself (NATS JetStream), or nack it with
    /// requeue (RabbitMQ), so that it is delivered again and decided then.
    HeldBack(T),
    /// The store failed for it under [`FailurePolicy::fail_closed`](crate::FailurePolicy):
    /// it was not checked. Nack it (the broker redelivers it) or retry it.
    Failed(T, E),
}

impl<T: fmt::Debug, E: fmt::Debug> fmt::Debug for Verdict<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Claimed(claim) => f.debug_tuple("Claimed").field(claim).finish(),
            Verdict::Duplicate(item) => f.debug_tuple("Duplicate").field(item).finish(),
            Verdict::HeldBack(item) => f.debug_tuple("HeldBack").field(item).finish(),
            Verdict::Failed(item, e) => f.debug_tuple("Failed").field(item).field(e).finish(),
        }
    }
}

impl<T, E> Verdict<T, E> {
    /// The delivery, whatever its verdict (a claim's item; a claim is released by this).
    pub fn into_item(self) -> T {
        match self {
            Verdict::Claimed(claim) => claim.release(),
            Verdict::Duplicate(item) | Verdict::HeldBack(item) | Verdict::Failed(item, _) => item,
        }
    }

    /// The delivery, whatever its verdict.
    pub fn item(&self) -> &T {
        match self {
            Verdict::Claimed(claim) => claim.get_ref(),
            Verdict::Duplicate(item) | Verdict::HeldBack(item) | Verdict::Failed(item, _) => item,
        }
    }
}

/// Stream for the [`verdicts`](crate::ClaimByKey::verdicts) method of `ClaimByKey`.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct ClaimVerdicts<St: Stream, F, K> {
    #[pin]
    core: Core<St, Plain<F>, ClaimGate<K>, Yield, K, StoreError>,
}

impl<St: Stream, F, K> ClaimVerdicts<St, F, K> {
    pub(crate) fn new(core: Core<St, Plain<F>, ClaimGate<K>, Yield, K, StoreError>) -> Self {
        ClaimVerdicts { core }
    }

    /// This operator's counters.
    pub fn stats(&self) -> Stats {
        self.core.gate().core.stats()
    }

    delegate_access_inner!(St);
}

impl<St: Stream + fmt::Debug, F, K> fmt::Debug for ClaimVerdicts<St, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimVerdicts")
            .field("stream", self.core.get_ref())
            .field("stats", &self.core.gate().core.stats())
            .field("queued", &self.core.queued())
            .finish_non_exhaustive()
    }
}

impl<St, F, K> Stream for ClaimVerdicts<St, F, K>
where
    St: Stream,
    F: FnMut(&St::Item) -> K,
    K: Hash + Eq + Send + Sync + 'static,
{
    type Item = Verdict<St::Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        let step = ready!(this.core.as_mut().poll_step(cx));
        Poll::Ready(step.map(|step| match step {
            Step::Emit(item, held) => {
                let core = Arc::clone(&this.core.as_ref().get_ref().gate().core);
                Verdict::Claimed(Claim::new(item, held, core))
            }
            Step::Duplicate(item) => Verdict::Duplicate(item),
            Step::HeldBack(item) => Verdict::HeldBack(item),
            Step::Failed(item, e) => Verdict::Failed(item, e),
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Every delivery comes out, with its verdict.
        let (lower, upper) = self.core.size_hint();
        (lower, upper)
    }
}

impl<St, F, K> FusedStream for ClaimVerdicts<St, F, K>
where
    St: Stream,
    F: FnMut(&St::Item) -> K,
    K: Hash + Eq + Send + Sync + 'static,
{
    fn is_terminated(&self) -> bool {
        self.core.is_done()
    }
}
