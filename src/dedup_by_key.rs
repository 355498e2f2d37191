use core::fmt;
use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};

use futures_core::{FusedStream, Stream};
use pin_project::pin_project;

use crate::hook::{DropDuplicates, OnDuplicate};
use crate::stats::Stats;
use crate::store::StoreError;
use crate::stored::driver::{Driver, Mode, Out};
use crate::window::{Attached, Handle, Ticker};

/// Stream for the [`dedup_by_key`](crate::DedupStreamExt::dedup_by_key) method.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct DedupByKey<St: Stream, F, K, H = DropDuplicates> {
    #[pin]
    stream: St,
    key_fn: F,
    window: Handle<K>,
    ticker: Ticker,
    /// The store path; `None` for an in-memory window (the fast path).
    store: Option<Box<Driver<St::Item, K, StoreError>>>,
    on_duplicate: H,
    /// The error that ended the stream under fail closed.
    error: Option<StoreError>,
}

impl<St, F, K, H> fmt::Debug for DedupByKey<St, F, K, H>
where
    St: Stream + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupByKey")
            .field("stream", &self.stream)
            .field("window", &self.window)
            .field("queued", &self.store.as_ref().map_or(0, |d| d.queued()))
            .finish_non_exhaustive()
    }
}

impl<St: Stream, F, K: Hash + Eq> DedupByKey<St, F, K> {
    pub(crate) fn new(stream: St, key_fn: F, window: Attached<K, StoreError>) -> Self {
        DedupByKey {
            stream,
            key_fn,
            window: window.handle,
            ticker: Ticker::default(),
            store: window
                .store
                .map(|parts| Box::new(Driver::new(parts, Mode::Insert))),
            on_duplicate: DropDuplicates,
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
            stream: self.stream,
            key_fn: self.key_fn,
            window: self.window,
            ticker: self.ticker,
            store: self.store,
            on_duplicate: hook,
            error: self.error,
        }
    }

    /// This operator's counters (for a shared window: the window's, over all its streams).
    pub fn stats(&self) -> Stats
    where
        K: Hash + Eq,
    {
        self.window.stats()
    }

    /// The store error that ended this stream, under
    /// [`FailurePolicy::fail_closed`](crate::FailurePolicy::fail_closed) (a plain stream has
    /// no error channel; [`try_dedup_by_key`](crate::TryDedupStreamExt::try_dedup_by_key)
    /// yields the error instead).
    pub fn store_error(&self) -> Option<&StoreError> {
        self.error.as_ref()
    }

    delegate_access_inner!(stream, St);
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
        if let Some(driver) = this.store.as_deref_mut() {
            if this.error.is_some() {
                return Poll::Ready(None);
            }
            loop {
                let out = ready!(driver.poll(
                    this.window,
                    cx,
                    |cx| this.stream.as_mut().poll_next(cx),
                    |item| Some((this.key_fn)(item)),
                ));
                match out {
                    None => return Poll::Ready(None),
                    Some(Out::Emit(item, _)) => return Poll::Ready(Some(item)),
                    Some(Out::Duplicate(item) | Out::HeldBack(item)) => {
                        this.on_duplicate.on_duplicate(item);
                    }
                    Some(Out::Failed(e)) => {
                        // Fail closed with no error channel: the stream ends here.
                        *this.error = Some(e);
                        return Poll::Ready(None);
                    }
                }
                ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
            }
        }
        loop {
            let item = match this.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => item,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    this.ticker.waited();
                    return Poll::Pending;
                }
            };
            let now = this.ticker.now(this.window);
            if this.window.observe((this.key_fn)(&item), now) {
                return Poll::Ready(Some(item));
            }
            this.on_duplicate.on_duplicate(item);
            // A long run of duplicates from an always-ready stream must not starve the other
            // tasks of the executor: each one skipped spends a unit of tokio's coop budget.
            match tokio::task::coop::poll_proceed(cx) {
                Poll::Ready(restore) => restore.made_progress(),
                Poll::Pending => {
                    this.ticker.waited();
                    return Poll::Pending;
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Any number of items may be duplicates, so no lower bound; never more than the input
        // plus what the store path holds.
        let queued = self.store.as_ref().map_or(0, |d| d.queued());
        let upper = self.stream.size_hint().1;
        (0, upper.and_then(|n| n.checked_add(queued)))
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
        match &self.store {
            None => self.stream.is_terminated(),
            Some(driver) => self.error.is_some() || driver.is_done(),
        }
    }
}
