use core::fmt;
use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};

use futures_core::{FusedStream, Stream};
use pin_project::pin_project;

use crate::hook::{DropDuplicates, OnDuplicate};
use crate::stats::Stats;
use crate::window::Handle;

/// Stream for the [`dedup_by_key`](crate::DedupStreamExt::dedup_by_key) method.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct DedupByKey<St, F, K, H = DropDuplicates> {
    #[pin]
    stream: St,
    key_fn: F,
    window: Handle<K>,
    on_duplicate: H,
}

impl<St, F, K, H> fmt::Debug for DedupByKey<St, F, K, H>
where
    St: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupByKey")
            .field("stream", &self.stream)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl<St, F, K> DedupByKey<St, F, K> {
    pub(crate) fn new(stream: St, key_fn: F, window: Handle<K>) -> Self {
        DedupByKey {
            stream,
            key_fn,
            window,
            on_duplicate: DropDuplicates,
        }
    }
}

impl<St, F, K, H> DedupByKey<St, F, K, H> {
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
        St: Stream,
        G: OnDuplicate<St::Item>,
    {
        DedupByKey {
            stream: self.stream,
            key_fn: self.key_fn,
            window: self.window,
            on_duplicate: hook,
        }
    }

    /// This operator's counters (for a shared window: the window's, over all its streams).
    pub fn stats(&self) -> Stats
    where
        K: Hash + Eq,
    {
        self.window.stats()
    }

    /// Acquires a reference to the underlying stream that this combinator is pulling from.
    pub fn get_ref(&self) -> &St {
        &self.stream
    }

    /// Acquires a mutable reference to the underlying stream that this combinator is pulling
    /// from. It is inadvisable to pull items from it directly: they would bypass the window.
    pub fn get_mut(&mut self) -> &mut St {
        &mut self.stream
    }

    /// Acquires a pinned mutable reference to the underlying stream that this combinator is
    /// pulling from. It is inadvisable to pull items from it directly.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut St> {
        self.project().stream
    }

    /// Consumes this combinator, returning the underlying stream (the window is dropped).
    pub fn into_inner(self) -> St {
        self.stream
    }
}

impl<St, F, K, H> Stream for DedupByKey<St, F, K, H>
where
    St: Stream,
    F: FnMut(&St::Item) -> K,
    K: Hash + Eq,
    H: OnDuplicate<St::Item>,
{
    type Item = St::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<St::Item>> {
        let mut this = self.project();
        // One clock read per poll (none without a ttl): the items of one poll share a time.
        let now = this.window.now();
        loop {
            let Some(item) = ready!(this.stream.as_mut().poll_next(cx)) else {
                return Poll::Ready(None);
            };
            if this.window.observe((this.key_fn)(&item), now) {
                return Poll::Ready(Some(item));
            }
            this.on_duplicate.on_duplicate(item);
            // A long run of duplicates from an always-ready stream must not starve the other
            // tasks of the executor: each one skipped spends a unit of tokio's coop budget.
            ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Any number of items may be duplicates, so no lower bound; never more than the input.
        (0, self.stream.size_hint().1)
    }
}

impl<St, F, K, H> FusedStream for DedupByKey<St, F, K, H>
where
    St: FusedStream,
    F: FnMut(&St::Item) -> K,
    K: Hash + Eq,
    H: OnDuplicate<St::Item>,
{
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated()
    }
}
