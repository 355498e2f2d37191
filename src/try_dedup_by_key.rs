use core::fmt;
use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};

use futures_core::{FusedStream, Stream, TryStream};
use pin_project::pin_project;

use crate::hook::{DropDuplicates, OnDuplicate};
use crate::stats::Stats;
use crate::stored::driver::{Driver, Mode, Out};
use crate::window::{Attached, Handle, Ticker};

/// The store path of a try stream: its items are `Result`s, its failures become its errors.
type TryDriver<St, K> =
    Driver<Result<<St as TryStream>::Ok, <St as TryStream>::Error>, K, <St as TryStream>::Error>;

/// Stream for the [`try_dedup_by_key`](crate::TryDedupStreamExt::try_dedup_by_key) method.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct TryDedupByKey<St: TryStream, F, K, H = DropDuplicates> {
    #[pin]
    stream: St,
    key_fn: F,
    window: Handle<K>,
    ticker: Ticker,
    /// The store path; `None` for an in-memory window (the fast path).
    store: Option<Box<TryDriver<St, K>>>,
    on_duplicate: H,
}

impl<St, F, K, H> fmt::Debug for TryDedupByKey<St, F, K, H>
where
    St: TryStream + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TryDedupByKey")
            .field("stream", &self.stream)
            .field("window", &self.window)
            .field("queued", &self.store.as_ref().map_or(0, |d| d.queued()))
            .finish_non_exhaustive()
    }
}

impl<St: TryStream, F, K: Hash + Eq> TryDedupByKey<St, F, K> {
    pub(crate) fn new(stream: St, key_fn: F, window: Attached<K, St::Error>) -> Self {
        TryDedupByKey {
            stream,
            key_fn,
            window: window.handle,
            ticker: Ticker::default(),
            store: window
                .store
                .map(|parts| Box::new(Driver::new(parts, Mode::Insert))),
            on_duplicate: DropDuplicates,
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
            stream: self.stream,
            key_fn: self.key_fn,
            window: self.window,
            ticker: self.ticker,
            store: self.store,
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

    delegate_access_inner!(stream, St);
}

impl<St, F, K, H> Stream for TryDedupByKey<St, F, K, H>
where
    St: TryStream,
    F: FnMut(&St::Ok) -> K,
    K: Hash + Eq,
    H: OnDuplicate<St::Ok>,
{
    type Item = Result<St::Ok, St::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if let Some(driver) = this.store.as_deref_mut() {
            loop {
                let out = ready!(driver.poll(
                    this.window,
                    cx,
                    |cx| this.stream.as_mut().try_poll_next(cx),
                    |item| item.as_ref().ok().map(|v| (this.key_fn)(v)),
                ));
                match out {
                    None => return Poll::Ready(None),
                    Some(Out::Emit(item, _)) => return Poll::Ready(Some(item)),
                    Some(Out::Failed(e)) => return Poll::Ready(Some(Err(e))),
                    Some(Out::Duplicate(item) | Out::HeldBack(item)) => {
                        if let Ok(v) = item {
                            this.on_duplicate.on_duplicate(v);
                        }
                    }
                }
                ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
            }
        }
        loop {
            let item = match this.stream.as_mut().try_poll_next(cx) {
                Poll::Ready(Some(Ok(item))) => item,
                Poll::Ready(other) => return Poll::Ready(other),
                Poll::Pending => {
                    this.ticker.waited();
                    return Poll::Pending;
                }
            };
            let now = this.ticker.now(this.window);
            if this.window.observe((this.key_fn)(&item), now) {
                return Poll::Ready(Some(Ok(item)));
            }
            this.on_duplicate.on_duplicate(item);
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

impl<St, F, K, H> FusedStream for TryDedupByKey<St, F, K, H>
where
    St: TryStream + FusedStream,
    F: FnMut(&St::Ok) -> K,
    K: Hash + Eq,
    H: OnDuplicate<St::Ok>,
{
    fn is_terminated(&self) -> bool {
        match &self.store {
            None => self.stream.is_terminated(),
            Some(driver) => driver.is_done(),
        }
    }
}
