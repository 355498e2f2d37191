use core::hash::Hash;

use futures_core::{Stream, TryStream};

use crate::adapter::{ClaimByKey, DedupByKey, TryClaimByKey, TryDedupByKey};
use crate::attach::{IntoClaimWindow, IntoWindow};

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
        DedupByKey::new(self, key_fn, window.attach())
    }

    /// Like [`dedup_by_key`](DedupStreamExt::dedup_by_key), but each item leaves wrapped in a
    /// [`Claim`](crate::Claim), and its key is marked as seen only when the claim is
    /// **committed**: a claim dropped uncommitted (an error, a panic, a crash) frees the key,
    /// so the broker's redelivery is processed instead of dropped. No message is lost.
    ///
    /// A key is free, **in flight** (claimed, with a [`lease`](crate::Window::lease)) or
    /// **done** (committed, kept for the window's ttl). A copy whose key is done is a
    /// duplicate (`on_duplicate`: safe to ack); a copy whose key is in flight is held back
    /// (`on_held_back`: do not ack; the broker will deliver it again).
    ///
    /// `window` is a [`Window`](crate::Window), or a [`StoreWindow`](crate::StoreWindow)
    /// whose store offers claims ([`ClaimStore`](crate::store::ClaimStore), checked at compile
    /// time), so that consumers in many processes share the states.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stream_dedup::{DedupStreamExt, Window};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), stream_dedup::store::StoreError> {
    /// let deliveries = stream::iter(["a", "b", "a", "b"]);
    /// let mut claims = deliveries.claim_by_key(|m| *m, Window::max_keys(1_000));
    /// let first = claims.next().await.unwrap();   // "a"
    /// let second = claims.next().await.unwrap();  // "b"
    /// second.release();                           // processing "b" failed
    /// first.commit().await?;                      // "a" is done
    /// let third = claims.next().await.unwrap();   // the redelivered "a" is dropped,
    /// assert_eq!(*third, "b");                    // the redelivered "b" is processed
    /// third.commit().await?;
    /// assert!(claims.next().await.is_none());
    /// # Ok(())
    /// # }
    /// ```
    fn claim_by_key<K, F, W>(self, key_fn: F, window: W) -> ClaimByKey<Self, F, K>
    where
        Self: Sized,
        F: FnMut(&Self::Item) -> K,
        K: Hash + Eq + Clone + Send + Sync + 'static,
        W: IntoClaimWindow<K>,
    {
        ClaimByKey::new(self, key_fn, window.attach_claims())
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
        TryDedupByKey::new(self, key_fn, window.attach())
    }

    /// Like [`claim_by_key`](DedupStreamExt::claim_by_key) for a stream of `Result`s: `Ok`
    /// items are claimed, `Err` items pass through untouched and in place. Under
    /// [`FailurePolicy::fail_closed`](crate::FailurePolicy::fail_closed) a store failure is
    /// yielded in place of the items it concerns, converted into the stream's error type.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use stream_dedup::{TryDedupStreamExt, Window};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let deliveries = stream::iter([Ok(1), Err("decode error"), Ok(1)]);
    /// let mut claims = deliveries.try_claim_by_key(|n: &u32| *n, Window::max_keys(100));
    /// let claim = claims.next().await.unwrap()?;
    /// assert_eq!(*claim, 1);
    /// assert_eq!(claims.next().await.unwrap().unwrap_err(), "decode error");
    /// claim.commit().await?;
    /// assert!(claims.next().await.is_none()); // the second 1 was a duplicate
    /// # Ok(())
    /// # }
    /// ```
    fn try_claim_by_key<K, F, W>(self, key_fn: F, window: W) -> TryClaimByKey<Self, F, K>
    where
        Self: Sized,
        F: FnMut(&Self::Ok) -> K,
        K: Hash + Eq + Clone + Send + Sync + 'static,
        W: IntoClaimWindow<K, Self::Error>,
    {
        TryClaimByKey::new(self, key_fn, window.attach_claims())
    }
}

impl<St: TryStream + ?Sized> TryDedupStreamExt for St {}
