use core::fmt;
use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};
use std::sync::Arc;

use futures_core::{FusedStream, Stream, TryStream};
use pin_project::pin_project;

use super::claim_verdicts::Verdict;
use super::core::{Core, IntoStream, OkKey, Step, Yield};
use crate::claim::{Claim, ClaimGate};
use crate::stats::Stats;

/// The core of a `TryClaimVerdicts`.
type TryVerdictCore<St, F, K> =
    Core<IntoStream<St>, OkKey<F>, ClaimGate<K>, Yield, K, <St as TryStream>::Error>;

/// Stream for the [`verdicts`](crate::TryClaimByKey::verdicts) method of `TryClaimByKey`.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct TryClaimVerdicts<St: TryStream, F, K> {
    #[pin]
    core: TryVerdictCore<St, F, K>,
}

impl<St: TryStream, F, K> TryClaimVerdicts<St, F, K> {
    pub(crate) fn new(core: TryVerdictCore<St, F, K>) -> Self {
        TryClaimVerdicts { core }
    }

    /// This operator's counters.
    pub fn stats(&self) -> Stats {
        self.core.gate().core.stats()
    }

    delegate_access_inner!(St, try);
}

impl<St: TryStream + fmt::Debug, F, K> fmt::Debug for TryClaimVerdicts<St, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TryClaimVerdicts")
            .field("stream", &self.core.get_ref().0)
            .field("stats", &self.core.gate().core.stats())
            .field("queued", &self.core.queued())
            .finish_non_exhaustive()
    }
}

impl<St, F, K> Stream for TryClaimVerdicts<St, F, K>
where
    St: TryStream,
    F: FnMut(&St::Ok) -> K,
    K: Hash + Eq + Send + Sync + 'static,
{
    /// `Err` items of the inner stream pass untouched; store failures are
    /// [`Verdict::Failed`], with the item.
    type Item = Result<Verdict<St::Ok, St::Error>, St::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        let step = ready!(this.core.as_mut().poll_step(cx));
        Poll::Ready(step.map(|step| match step {
            Step::Emit(Ok(item), held) => {
                let core = Arc::clone(&this.core.as_ref().get_ref().gate().core);
                Ok(Verdict::Claimed(Claim::new(item, held, core)))
            }
            Step::Duplicate(Ok(item)) => Ok(Verdict::Duplicate(item)),
            Step::HeldBack(Ok(item)) => Ok(Verdict::HeldBack(item)),
            Step::Failed(Ok(item), e) => Ok(Verdict::Failed(item, e)),
            // An `Err` of the inner stream is never keyed, so only ever emitted.
            Step::Emit(Err(e), _)
            | Step::Duplicate(Err(e))
            | Step::HeldBack(Err(e))
            | Step::Failed(Err(e), _) => Err(e),
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.core.size_hint()
    }
}

impl<St, F, K> FusedStream for TryClaimVerdicts<St, F, K>
where
    St: TryStream,
    F: FnMut(&St::Ok) -> K,
    K: Hash + Eq + Send + Sync + 'static,
{
    fn is_terminated(&self) -> bool {
        self.core.is_done()
    }
}
