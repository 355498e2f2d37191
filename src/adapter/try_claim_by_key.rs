use core::fmt;
use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};
use std::sync::Arc;

use futures_core::{FusedStream, Stream, TryStream};
use pin_project::pin_project;

use super::core::{ClaimHooks, Core, HeldBack, IntoStream, OkHooks, OkKey, Step, Yield};
use super::try_claim_verdicts::TryClaimVerdicts;
use crate::attach::ClaimAttached;
use crate::claim::{Claim, ClaimGate};
use crate::hook::{DropDuplicates, OnDuplicate};
use crate::stats::Stats;

/// The core of a `TryClaimByKey`: the `Ok` face of `ClaimByKey`'s.
type TryClaimCore<St, F, K, H, B> = Core<
    IntoStream<St>,
    OkKey<F>,
    ClaimGate<K>,
    OkHooks<ClaimHooks<H, B>>,
    K,
    <St as TryStream>::Error,
>;

/// Stream for the [`try_claim_by_key`](crate::TryDedupStreamExt::try_claim_by_key) method.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct TryClaimByKey<St: TryStream, F, K, H = DropDuplicates, B = DropDuplicates> {
    #[pin]
    core: TryClaimCore<St, F, K, H, B>,
}

impl<St: TryStream, F, K, H, B> fmt::Debug for TryClaimByKey<St, F, K, H, B>
where
    St: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TryClaimByKey")
            .field("stream", &self.core.get_ref().0)
            .field("stats", &self.core.gate().core.stats())
            .field("queued", &self.core.queued())
            .finish_non_exhaustive()
    }
}

impl<St: TryStream, F, K: Hash + Eq + Send + 'static> TryClaimByKey<St, F, K> {
    pub(crate) fn new(stream: St, key_fn: F, window: ClaimAttached<K, St::Error>) -> Self {
        let hooks = OkHooks(ClaimHooks {
            duplicate: DropDuplicates,
            held_back: DropDuplicates,
        });
        let (parts, release) = window.store.unzip();
        TryClaimByKey {
            core: Core::new(IntoStream(stream), OkKey(key_fn), window.gate, parts, hooks)
                .release_on_drop(release),
        }
    }
}

impl<St: TryStream, F, K, H, B> TryClaimByKey<St, F, K, H, B> {
    /// Calls `hook` with every item dropped because its key is **done** (committed), in order.
    /// Acking it there is always safe: the original was processed.
    pub fn on_duplicate<G>(self, hook: G) -> TryClaimByKey<St, F, K, G, B>
    where
        G: OnDuplicate<St::Ok>,
    {
        TryClaimByKey {
            core: self.core.map_hooks(|OkHooks(h)| {
                OkHooks(ClaimHooks {
                    duplicate: hook,
                    held_back: h.held_back,
                })
            }),
        }
    }

    /// Calls `hook` with every copy held back because its key is **in flight** under another
    /// claim. Do not ack it: if the original fails, the broker's next delivery is the one
    /// that gets processed (counted in [`Stats::held_back`]).
    pub fn on_held_back<G>(self, hook: G) -> TryClaimByKey<St, F, K, H, G>
    where
        G: OnDuplicate<St::Ok>,
    {
        TryClaimByKey {
            core: self.core.map_hooks(|OkHooks(h)| {
                OkHooks(ClaimHooks {
                    duplicate: h.duplicate,
                    held_back: hook,
                })
            }),
        }
    }

    /// Yields every delivery with its [`Verdict`](crate::Verdict) instead of dropping
    /// duplicates and held-back copies into hooks (any hook set before is dropped); `Err` items
    /// of the inner stream pass untouched, and a store failure under fail closed is
    /// [`Verdict::Failed`](crate::Verdict::Failed) with the item. See
    /// [`ClaimByKey::verdicts`](crate::ClaimByKey::verdicts).
    pub fn verdicts(self) -> TryClaimVerdicts<St, F, K> {
        TryClaimVerdicts::new(self.core.map_hooks(|_| Yield))
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
        TryClaimByKey {
            core: self.core.held_back(policy),
        }
    }

    /// This operator's counters.
    pub fn stats(&self) -> Stats {
        self.core.gate().core.stats()
    }

    delegate_access_inner!(St, try);
}

impl<St, F, K, H, B> Stream for TryClaimByKey<St, F, K, H, B>
where
    St: TryStream,
    F: FnMut(&St::Ok) -> K,
    K: Hash + Eq + Send + Sync + 'static,
    H: OnDuplicate<St::Ok>,
    B: OnDuplicate<St::Ok>,
{
    type Item = Result<Claim<St::Ok>, St::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            let step = match ready!(this.core.as_mut().poll_step(cx)) {
                Some(Step::Emit(Ok(item), held)) => {
                    let core = Arc::clone(&this.core.as_ref().get_ref().gate().core);
                    Some(Ok(Claim::new(item, held, core)))
                }
                Some(Step::Emit(Err(e), _) | Step::Failed(_, e)) => Some(Err(e)),
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

impl<St, F, K, H, B> FusedStream for TryClaimByKey<St, F, K, H, B>
where
    St: TryStream,
    F: FnMut(&St::Ok) -> K,
    K: Hash + Eq + Send + Sync + 'static,
    H: OnDuplicate<St::Ok>,
    B: OnDuplicate<St::Ok>,
{
    fn is_terminated(&self) -> bool {
        self.core.is_done()
    }
}
