use core::fmt;
use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};

use futures_core::{FusedStream, Stream, TryStream};
use pin_project::pin_project;

use super::core::{Core, DupHook, IntoStream, OkHooks, OkKey, Step};
use crate::attach::Attached;
use crate::hook::{DropDuplicates, OnDuplicate};
use crate::stats::Stats;
use crate::window::Handle;

/// The core of a `TryDedupByKey`: the `Ok` face of `DedupByKey`'s.
type TryDedupCore<St, F, K, H> =
    Core<IntoStream<St>, OkKey<F>, Handle<K>, OkHooks<DupHook<H>>, K, <St as TryStream>::Error>;

/// Stream for the [`try_dedup_by_key`](crate::TryDedupStreamExt::try_dedup_by_key) method.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct TryDedupByKey<St: TryStream, F, K, H = DropDuplicates> {
    #[pin]
    core: TryDedupCore<St, F, K, H>,
}

impl<St, F, K, H> fmt::Debug for TryDedupByKey<St, F, K, H>
where
    St: TryStream + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TryDedupByKey")
            .field("stream", &self.core.get_ref().0)
            .field("window", self.core.gate())
            .field("queued", &self.core.queued())
            .finish_non_exhaustive()
    }
}

impl<St: TryStream, F, K: Hash + Eq> TryDedupByKey<St, F, K> {
    pub(crate) fn new(stream: St, key_fn: F, window: Attached<K, St::Error>) -> Self {
        let hooks = OkHooks(DupHook(DropDuplicates));
        TryDedupByKey {
            core: Core::new(
                IntoStream(stream),
                OkKey(key_fn),
                window.handle,
                window.store,
                hooks,
            ),
        }
    }
}

impl<St: TryStream, F, K, H> TryDedupByKey<St, F, K, H> {
    /// Calls `hook` with the `Ok` value of every item dropped as a duplicate, in order
    /// (replacing any earlier hook). `Err` items are never dropped, so never reach it.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stream_dedup::{TryDedupStreamExt, Window};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut dropped = 0;
    /// let out: Vec<Result<u8, &str>> = stream::iter([Ok(1), Ok(1), Err("bad"), Ok(2)])
    ///     .try_dedup_by_key(|n| *n, Window::max_keys(10))
    ///     .on_duplicate(|_n| dropped += 1)
    ///     .collect()
    ///     .await;
    /// assert_eq!(out, [Ok(1), Err("bad"), Ok(2)]);
    /// assert_eq!(dropped, 1);
    /// # }
    /// ```
    pub fn on_duplicate<G>(self, hook: G) -> TryDedupByKey<St, F, K, G>
    where
        G: OnDuplicate<St::Ok>,
    {
        TryDedupByKey {
            core: self.core.map_hooks(|_| OkHooks(DupHook(hook))),
        }
    }

    /// This operator's counters (for a shared window: the window's, over all its streams).
    pub fn stats(&self) -> Stats
    where
        K: Hash + Eq,
    {
        self.core.gate().stats()
    }

    delegate_access_inner!(St, try);
}

impl<St, F, K, H> Stream for TryDedupByKey<St, F, K, H>
where
    St: TryStream,
    F: FnMut(&St::Ok) -> K,
    K: Hash + Eq,
    H: OnDuplicate<St::Ok>,
{
    type Item = Result<St::Ok, St::Error>;

    #[inline]
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            let step = match ready!(this.core.as_mut().poll_step(cx)) {
                Some(Step::Emit(item, _)) => Some(item),
                Some(Step::Failed(_, e)) => Some(Err(e)),
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

impl<St, F, K, H> FusedStream for TryDedupByKey<St, F, K, H>
where
    St: TryStream,
    F: FnMut(&St::Ok) -> K,
    K: Hash + Eq,
    H: OnDuplicate<St::Ok>,
{
    fn is_terminated(&self) -> bool {
        self.core.is_done()
    }
}
