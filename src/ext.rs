use core::hash::Hash;

use futures_core::{Stream, TryStream};

use crate::window::IntoWindow;
use crate::{DedupByKey, TryDedupByKey};

/// Adds [`dedup_by_key`](DedupStreamExt::dedup_by_key) to every [`Stream`].
pub trait DedupStreamExt: Stream {
    /// Drops every item whose key is still in `window`, passing the others through unchanged
    /// and in order.
    ///
    /// Unlike [`Vec::dedup_by_key`], which drops only *adjacent* repeats, this drops repeats
    /// anywhere within the window: a bounded LRU of at most [`Window::max_keys`] keys, with an
    /// optional ttl. `key_fn` borrows each item and returns its key; the key is recorded when
    /// the item leaves the operator. A hit counts as "seen" for LRU order.
    ///
    /// `window` is a [`Window`] (a window of this stream's own; no lock is taken) or a
    /// [`SharedWindow`](crate::SharedWindow) that several streams share.
    ///
    /// [`Window`]: crate::Window
    /// [`Window::max_keys`]: crate::Window::max_keys
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, StreamExt};
    /// use stream_dedup::{DedupStreamExt, Window};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let deliveries = stream::iter(["order-1", "order-2", "order-1", "order-3", "order-2"]);
    /// let window = Window::max_keys(100_000).ttl(Duration::from_secs(300));
    /// let unique: Vec<_> = deliveries.dedup_by_key(|m| *m, window).collect().await;
    /// assert_eq!(unique, ["order-1", "order-2", "order-3"]);
    /// # }
    /// ```
    fn dedup_by_key<K, F, W>(self, key_fn: F, window: W) -> DedupByKey<Self, F, K>
    where
        Self: Sized,
        F: FnMut(&Self::Item) -> K,
        K: Hash + Eq,
        W: IntoWindow<K>,
    {
        DedupByKey::new(self, key_fn, window.into_window())
    }
}

impl<St: Stream + ?Sized> DedupStreamExt for St {}

/// Adds [`try_dedup_by_key`](TryDedupStreamExt::try_dedup_by_key) to every [`TryStream`].
pub trait TryDedupStreamExt: TryStream {
    /// Like [`dedup_by_key`](DedupStreamExt::dedup_by_key) for a stream of `Result`s: `Ok`
    /// items are deduplicated by the key of their value, `Err` items pass through untouched
    /// and in place.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stream_dedup::{TryDedupStreamExt, Window};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let deliveries = stream::iter([Ok(7), Err("decode error"), Ok(7), Ok(8)]);
    /// let unique: Vec<Result<u32, &str>> =
    ///     deliveries.try_dedup_by_key(|id| *id, Window::max_keys(10_000)).collect().await;
    /// assert_eq!(unique, [Ok(7), Err("decode error"), Ok(8)]);
    /// # }
    /// ```
    fn try_dedup_by_key<K, F, W>(self, key_fn: F, window: W) -> TryDedupByKey<Self, F, K>
    where
        Self: Sized,
        F: FnMut(&Self::Ok) -> K,
        K: Hash + Eq,
        W: IntoWindow<K, Self::Error>,
    {
        TryDedupByKey::new(self, key_fn, window.into_window())
    }
}

impl<St: TryStream + ?Sized> TryDedupStreamExt for St {}
