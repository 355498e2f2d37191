use core::fmt;
use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};

use futures_core::{FusedStream, Stream};
use pin_project::pin_project;

use super::core::{Core, DupHook, Plain, Step};
use crate::attach::Attached;
use crate::hook::{DropDuplicates, OnDuplicate};
use crate::stats::Stats;
use crate::store::StoreError;
use crate::window::Handle;

/// Stream for the [`dedup_by_key`](crate::DedupStreamExt::dedup_by_key) method.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct DedupByKey<St: Stream, F, K, H = DropDuplicates> {
    #[pin]
    core: Core<St, Plain<F>, Handle<K>, DupHook<H>, K, StoreError>,
    /// The error that ended the stream under fail closed.
    error: Option<StoreError>,
}

impl<St, F, K, H> fmt::Debug for DedupByKey<St, F, K, H>
where
    St: Stream + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupByKey")
            .field("stream", self.core.get_ref())
            .field("window", self.core.gate())
            .field("queued", &self.core.queued())
            .finish_non_exhaustive()
    }
}

impl<St: Stream, F, K: Hash + Eq> DedupByKey<St, F, K> {
    pub(crate) fn new(stream: St, key_fn: F, window: Attached<K, StoreError>) -> Self {
        let hooks = DupHook(DropDuplicates);
        DedupByKey {
            core: Core::new(stream, Plain(key_fn), window.handle, window.store, hooks),
            error: None,
        }
    }
}

impl<St: Stream, F, K, H> DedupByKey<St, F, K, H> {
    /// Calls `hook` with every item dropped as a duplicate, in order (replacing any earlier
    /// hook). A broker consumer acks duplicates here, or the broker redelivers them again.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stream_dedup::{DedupStreamExt, Window};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut acked = Vec::new();
    /// let unique: Vec<_> = stream::iter([1, 2, 1, 1])
    ///     .dedup_by_key(|n| *n, Window::max_keys(10))
    ///     .on_duplicate(|n| acked.push(n))
    ///     .collect()
    ///     .await;
    /// assert_eq!((unique, acked), (vec![1, 2], vec![1, 1]));
    /// # }
    /// ```
    pub fn on_duplicate<G>(self, hook: G) -> DedupByKey<St, F, K, G>
    where
        G: OnDuplicate<St::Item>,
    {
        DedupByKey {
            core: self.core.map_hooks(|_| DupHook(hook)),
            error: self.error,
        }
    }

    /// This operator's counters (for a shared window: the window's, over all its streams).
    pub fn stats(&self) -> Stats
    where
        K: Hash + Eq,
    {
        self.core.gate().stats()
    }

    /// The store error that ended this stream, under
    /// [`FailurePolicy::fail_closed`](crate::FailurePolicy::fail_closed) (a plain stream has
    /// no error channel; [`try_dedup_by_key`](crate::TryDedupStreamExt::try_dedup_by_key)
    /// yields the error instead).
    pub fn store_error(&self) -> Option<&StoreError> {
        self.error.as_ref()
    }

    delegate_access_inner!(St);
}

impl<St, F, K, H> Stream for DedupByKey<St, F, K, H>
where
    St: Stream,
    F: FnMut(&St::Item) -> K,
    K: Hash + Eq,
    H: OnDuplicate<St::Item>,
{
    type Item = St::Item;

    #[inline]
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<St::Item>> {
        let mut this = self.project();
        loop {
            let step = match ready!(this.core.as_mut().poll_step(cx)) {
                Some(Step::Emit(item, _)) => Some(item),
                Some(Step::Failed(_, e)) => {
                    // Fail closed with no error channel: the stream ends here.
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

impl<St, F, K, H> FusedStream for DedupByKey<St, F, K, H>
where
    St: Stream,
    F: FnMut(&St::Item) -> K,
    K: Hash + Eq,
    H: OnDuplicate<St::Item>,
{
    fn is_terminated(&self) -> bool {
        self.core.is_done()
    }
}
