use core::fmt;
use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};
use std::sync::Arc;

use futures_core::{FusedStream, Stream, TryStream};
use pin_project::pin_project;

use crate::claim::{Claim, ClaimCore, ClaimGate};
use crate::claim_by_key::{claim_in_memory, claim_parts};
use crate::hook::{DropDuplicates, OnDuplicate};
use crate::stats::Stats;
use crate::stored::driver::{Driver, Fate, Out};
use crate::window::ClaimAttached;

/// The store path of a try stream of claims.
type TryClaimDriver<St, K> =
    Driver<Result<<St as TryStream>::Ok, <St as TryStream>::Error>, K, <St as TryStream>::Error>;

/// Stream for the [`try_claim_by_key`](crate::TryDedupStreamExt::try_claim_by_key) method.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct TryClaimByKey<St: TryStream, F, K, H = DropDuplicates, B = DropDuplicates> {
    #[pin]
    stream: St,
    key_fn: F,
    core: Arc<ClaimCore<K>>,
    /// The store path; `None` for an in-memory window.
    store: Option<Box<TryClaimDriver<St, K>>>,
    on_duplicate: H,
    on_held_back: B,
    done: bool,
}

impl<St: TryStream, F, K: Hash + Eq, H, B> fmt::Debug for TryClaimByKey<St, F, K, H, B>
where
    St: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TryClaimByKey")
            .field("stream", &self.stream)
            .field("stats", &self.core.stats())
            .finish_non_exhaustive()
    }
}

impl<St: TryStream, F, K: Hash + Eq + Send + 'static> TryClaimByKey<St, F, K> {
    pub(crate) fn new(stream: St, key_fn: F, window: ClaimAttached<K, St::Error>) -> Self {
        let (core, store) = claim_parts(window);
        TryClaimByKey {
            stream,
            key_fn,
            core,
            store,
            on_duplicate: DropDuplicates,
            on_held_back: DropDuplicates,
            done: false,
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
            stream: self.stream,
            key_fn: self.key_fn,
            core: self.core,
            store: self.store,
            on_duplicate: hook,
            on_held_back: self.on_held_back,
            done: self.done,
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
            stream: self.stream,
            key_fn: self.key_fn,
            core: self.core,
            store: self.store,
            on_duplicate: self.on_duplicate,
            on_held_back: hook,
            done: self.done,
        }
    }

    /// This operator's counters.
    pub fn stats(&self) -> Stats
    where
        K: Hash + Eq,
    {
        self.core.stats()
    }

    delegate_access_inner!(stream, St);
}

impl<St, F, K, H, B> Stream for TryClaimByKey<St, F, K, H, B>
where
    St: TryStream,
    F: FnMut(&St::Ok) -> K,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    H: OnDuplicate<St::Ok>,
    B: OnDuplicate<St::Ok>,
{
    type Item = Result<Claim<St::Ok>, St::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if *this.done {
                return Poll::Ready(None);
            }
            let out = match this.store.as_deref_mut() {
                Some(driver) => {
                    let mut gate = ClaimGate {
                        core: this.core,
                        clone_key: K::clone,
                    };
                    ready!(driver.poll(
                        &mut gate,
                        cx,
                        |cx| this.stream.as_mut().try_poll_next(cx),
                        |item| item.as_ref().ok().map(|v| (this.key_fn)(v)),
                    ))
                }
                None => match ready!(this.stream.as_mut().try_poll_next(cx)) {
                    Some(Ok(item)) => {
                        let key = (this.key_fn)(&item);
                        let out = claim_in_memory(this.core, Ok(item), key);
                        this.core.count(match &out {
                            Out::Emit(..) => Fate::Accepted,
                            Out::Duplicate(_) => Fate::Duplicate,
                            _ => Fate::HeldBack,
                        });
                        Some(out)
                    }
                    Some(Err(e)) => Some(Out::Emit(Err(e), None)),
                    None => None,
                },
            };
            match out {
                None => {
                    *this.done = true;
                    return Poll::Ready(None);
                }
                Some(Out::Emit(Ok(item), Some(held))) => {
                    let claim = Claim::new(item, held, Arc::clone(this.core));
                    return Poll::Ready(Some(Ok(claim)));
                }
                Some(Out::Emit(Err(e), _)) => return Poll::Ready(Some(Err(e))),
                // Every keyed item of a claim operator carries its claim.
                Some(Out::Emit(Ok(_), None)) => {}
                Some(Out::Duplicate(item)) => {
                    if let Ok(item) = item {
                        this.on_duplicate.on_duplicate(item);
                    }
                }
                Some(Out::HeldBack(item)) => {
                    if let Ok(item) = item {
                        this.on_held_back.on_duplicate(item);
                    }
                }
                Some(Out::Failed(e)) => return Poll::Ready(Some(Err(e))),
            }
            ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Any number of items may be duplicates, so no lower bound.
        if self.done {
            return (0, Some(0));
        }
        let queued = self.store.as_ref().map_or(0, |d| d.queued());
        let upper = self.stream.size_hint().1;
        (0, upper.and_then(|n| n.checked_add(queued)))
    }
}

impl<St, F, K, H, B> FusedStream for TryClaimByKey<St, F, K, H, B>
where
    St: TryStream,
    F: FnMut(&St::Ok) -> K,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    H: OnDuplicate<St::Ok>,
    B: OnDuplicate<St::Ok>,
{
    fn is_terminated(&self) -> bool {
        self.done
    }
}
