use core::fmt;
use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};
use std::sync::Arc;

use futures_core::{FusedStream, Stream};
use pin_project::pin_project;

use super::claim_verdicts::ClaimVerdicts;
use super::core::{ClaimHooks, Core, HeldBack, Plain, Step, Yield};
use crate::attach::ClaimAttached;
use crate::claim::{Claim, ClaimGate};
use crate::hook::{DropDuplicates, OnDuplicate};
use crate::stats::Stats;
use crate::store::StoreError;

/// Stream for the [`claim_by_key`](crate::DedupStreamExt::claim_by_key) method.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct ClaimByKey<St: Stream, F, K, H = DropDuplicates, B = DropDuplicates> {
    #[pin]
    core: Core<St, Plain<F>, ClaimGate<K>, ClaimHooks<H, B>, K, StoreError>,
    /// The error that ended the stream under fail closed.
    error: Option<StoreError>,
}

impl<St: Stream, F, K, H, B> fmt::Debug for ClaimByKey<St, F, K, H, B>
where
    St: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimByKey")
            .field("stream", self.core.get_ref())
            .field("stats", &self.core.gate().core.stats())
            .field("queued", &self.core.queued())
            .finish_non_exhaustive()
    }
}

impl<St: Stream, F, K: Hash + Eq + Send + 'static> ClaimByKey<St, F, K> {
    pub(crate) fn new(stream: St, key_fn: F, window: ClaimAttached<K, StoreError>) -> Self {
        let hooks = ClaimHooks {
            duplicate: DropDuplicates,
            held_back: DropDuplicates,
        };
        let (parts, release) = window.store.unzip();
        ClaimByKey {
            core: Core::new(stream, Plain(key_fn), window.gate, parts, hooks)
                .release_on_drop(release),
            error: None,
        }
    }
}

impl<St: Stream, F, K, H, B> ClaimByKey<St, F, K, H, B> {
    /// Calls `hook` with every item dropped because its key is **done** (committed), in order.
    /// Acking it there is always safe: the original was processed.
    pub fn on_duplicate<G>(self, hook: G) -> ClaimByKey<St, F, K, G, B>
    where
        G: OnDuplicate<St::Item>,
    {
        ClaimByKey {
            core: self.core.map_hooks(|h| ClaimHooks {
                duplicate: hook,
                held_back: h.held_back,
            }),
            error: self.error,
        }
    }

    /// Calls `hook` with every copy held back because its key is **in flight** under another
    /// claim. Do not ack it: if the original fails, the broker's next delivery is the one
    /// that gets processed (counted in [`Stats::held_back`]).
    pub fn on_held_back<G>(self, hook: G) -> ClaimByKey<St, F, K, H, G>
    where
        G: OnDuplicate<St::Item>,
    {
        ClaimByKey {
            core: self.core.map_hooks(|h| ClaimHooks {
                duplicate: h.duplicate,
                held_back: hook,
            }),
            error: self.error,
        }
    }

    /// Yields every delivery with its [`Verdict`](crate::Verdict) instead of dropping duplicates and held-back
    /// copies into hooks (any hook set before is dropped): a consumer then acks duplicates with
    /// `.await`, with back-pressure and their errors in hand. Under fail closed, a store
    /// failure is [`Verdict::Failed`](crate::Verdict::Failed) with the item, and the stream goes on.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stream_dedup::{DedupStreamExt, Verdict, Window};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), stream_dedup::store::StoreError> {
    /// # async fn ack(_: &str) {}
    /// let mut deliveries = stream::iter(["a", "b", "a"])
    ///     .claim_by_key(|m| *m, Window::max_keys(1_000))
    ///     .verdicts();
    /// let mut processed = Vec::new();
    /// while let Some(verdict) = deliveries.next().await {
    ///     match verdict {
    ///         Verdict::Claimed(claim) => {
    ///             processed.push(*claim);
    ///             let msg = claim.commit().await?;
    ///             ack(msg).await;
    ///         }
    ///         Verdict::Duplicate(msg) => ack(msg).await,
    ///         Verdict::HeldBack(_) | Verdict::Failed(..) => {} // leave it to the broker
    ///     }
    /// }
    /// assert_eq!(processed, ["a", "b"]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn verdicts(self) -> ClaimVerdicts<St, F, K> {
        ClaimVerdicts::new(self.core.map_hooks(|_| Yield))
    }

    /// What to do with a copy held back (its key is in flight under another claim): hand it
    /// to the hook (the default), park it until its key settles, or wait in order. See
    /// [`HeldBack`] for which suits which broker.
    ///
    /// # Panics
    ///
    /// If `policy` is [`HeldBack::Wait`] with `max_parked` 0.
    #[track_caller]
    pub fn held_back(self, policy: HeldBack) -> Self
    where
        K: Hash + Eq,
    {
        assert!(
            !matches!(policy, HeldBack::Wait { max_parked: 0 }),
            "held_back: HeldBack::Wait needs room for at least one copy"
        );
        ClaimByKey {
            core: self.core.held_back(policy),
            error: self.error,
        }
    }

    /// This operator's counters.
    pub fn stats(&self) -> Stats {
        self.core.gate().core.stats()
    }

    /// The store error that ended this stream under
    /// [`FailurePolicy::fail_closed`](crate::FailurePolicy::fail_closed).
    pub fn store_error(&self) -> Option<&StoreError> {
        self.error.as_ref()
    }

    delegate_access_inner!(St);
}

impl<St, F, K, H, B> Stream for ClaimByKey<St, F, K, H, B>
where
    St: Stream,
    F: FnMut(&St::Item) -> K,
    K: Hash + Eq + Send + Sync + 'static,
    H: OnDuplicate<St::Item>,
    B: OnDuplicate<St::Item>,
{
    type Item = Claim<St::Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            let step = match ready!(this.core.as_mut().poll_step(cx)) {
                Some(Step::Emit(item, held)) => {
                    let core = Arc::clone(&this.core.as_ref().get_ref().gate().core);
                    Some(Claim::new(item, held, core))
                }
                Some(Step::Failed(_, e)) => {
                    *this.error = Some(e);
                    this.core.close();
                    None
                }
                // Only with `Hooks::YIELD`, which this adapter's hooks are not.
                Some(Step::Duplicate(_) | Step::HeldBack(_)) => continue,
                None => None,
            };
            return Poll::Ready(step);
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.core.size_hint()
    }
}

impl<St, F, K, H, B> FusedStream for ClaimByKey<St, F, K, H, B>
where
    St: Stream,
    F: FnMut(&St::Item) -> K,
    K: Hash + Eq + Send + Sync + 'static,
    H: OnDuplicate<St::Item>,
    B: OnDuplicate<St::Item>,
{
    fn is_terminated(&self) -> bool {
        self.core.is_done()
    }
}
