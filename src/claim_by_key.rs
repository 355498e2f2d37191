use core::fmt;
use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};
use std::sync::Arc;

use futures_core::{FusedStream, Stream};
use pin_project::pin_project;
use tokio::time::Instant;

use crate::claim::{Claim, ClaimCore, ClaimGate, Committer};
use crate::hook::{DropDuplicates, OnDuplicate};
use crate::stats::Stats;
use crate::store::{StoreError, Token};
use crate::stored::driver::{Driver, Fate, Held, Mode, Out, Pre};
use crate::window::ClaimAttached;

/// Stream for the [`claim_by_key`](crate::DedupStreamExt::claim_by_key) method.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct ClaimByKey<St: Stream, F, K, H = DropDuplicates, B = DropDuplicates> {
    #[pin]
    stream: St,
    key_fn: F,
    core: Arc<ClaimCore<K>>,
    /// The store path; `None` for an in-memory window.
    store: Option<Box<Driver<St::Item, K, StoreError>>>,
    on_duplicate: H,
    on_held_back: B,
    /// The error that ended the stream under fail closed.
    error: Option<StoreError>,
    done: bool,
}

/// A claim operator's shared core and its store path.
pub(crate) type ClaimParts<T, K, E> = (Arc<ClaimCore<K>>, Option<Box<Driver<T, K, E>>>);

/// Builds the shared core (and the store path) of a claim operator.
pub(crate) fn claim_parts<T, K, E>(window: ClaimAttached<K, E>) -> ClaimParts<T, K, E>
where
    K: Hash + Eq + Send + 'static,
{
    let lease = window.lease;
    let committer = window.store.as_ref().map(|parts| {
        Committer::new(
            Arc::clone(&parts.config.store),
            parts.config.ttl,
            parts.config.timeout,
            parts.encode,
        )
    });
    let core = Arc::new(ClaimCore::new(window.set, lease, committer));
    let driver = window.store.map(|parts| {
        let mut driver = Box::new(Driver::new(parts, Mode::Claim { lease }));
        let owner = Arc::clone(&core);
        driver.release_on_drop(Box::new(move |key, token| {
            owner.release_unhanded(key, token);
        }));
        driver
    });
    (core, driver)
}

impl<St: Stream, F, K: Hash + Eq, H, B> fmt::Debug for ClaimByKey<St, F, K, H, B>
where
    St: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimByKey")
            .field("stream", &self.stream)
            .field("stats", &self.core.stats())
            .finish_non_exhaustive()
    }
}

impl<St: Stream, F, K: Hash + Eq + Send + 'static> ClaimByKey<St, F, K> {
    pub(crate) fn new(stream: St, key_fn: F, window: ClaimAttached<K, StoreError>) -> Self {
        let (core, store) = claim_parts(window);
        ClaimByKey {
            stream,
            key_fn,
            core,
            store,
            on_duplicate: DropDuplicates,
            on_held_back: DropDuplicates,
            error: None,
            done: false,
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
            stream: self.stream,
            key_fn: self.key_fn,
            core: self.core,
            store: self.store,
            on_duplicate: hook,
            on_held_back: self.on_held_back,
            error: self.error,
            done: self.done,
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
            stream: self.stream,
            key_fn: self.key_fn,
            core: self.core,
            store: self.store,
            on_duplicate: self.on_duplicate,
            on_held_back: hook,
            error: self.error,
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

    /// The store error that ended this stream under
    /// [`FailurePolicy::fail_closed`](crate::FailurePolicy::fail_closed).
    pub fn store_error(&self) -> Option<&StoreError> {
        self.error.as_ref()
    }

    delegate_access_inner!(stream, St);
}

/// The in-memory claim path: one item's fate with no store.
pub(crate) fn claim_in_memory<T, K: Hash + Eq + Clone, E>(
    core: &ClaimCore<K>,
    item: T,
    key: K,
) -> Out<T, K, E> {
    let now = Instant::now();
    match core.pre(&key, now, K::clone) {
        Pre::Duplicate => Out::Duplicate(item),
        Pre::HeldBack => Out::HeldBack(item),
        Pre::Ask => {
            let token = Token::new();
            core.claim_locally(key.clone(), token, now);
            Out::Emit(
                item,
                Some(Held {
                    key,
                    token,
                    bytes: Vec::new(),
                }),
            )
        }
    }
}

impl<St, F, K, H, B> Stream for ClaimByKey<St, F, K, H, B>
where
    St: Stream,
    F: FnMut(&St::Item) -> K,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    H: OnDuplicate<St::Item>,
    B: OnDuplicate<St::Item>,
{
    type Item = Claim<St::Item>;

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
                        |cx| this.stream.as_mut().poll_next(cx),
                        |item| Some((this.key_fn)(item)),
                    ))
                }
                None => match ready!(this.stream.as_mut().poll_next(cx)) {
                    Some(item) => {
                        let key = (this.key_fn)(&item);
                        let out = claim_in_memory(this.core, item, key);
                        this.core.count(match &out {
                            Out::Emit(..) => Fate::Accepted,
                            Out::Duplicate(_) => Fate::Duplicate,
                            _ => Fate::HeldBack,
                        });
                        Some(out)
                    }
                    None => None,
                },
            };
            match out {
                None => {
                    *this.done = true;
                    return Poll::Ready(None);
                }
                Some(Out::Emit(item, Some(held))) => {
                    return Poll::Ready(Some(Claim::new(item, held, Arc::clone(this.core))));
                }
                // Every keyed item of a claim operator carries its claim.
                Some(Out::Emit(_, None)) => {}
                Some(Out::Duplicate(item)) => this.on_duplicate.on_duplicate(item),
                Some(Out::HeldBack(item)) => this.on_held_back.on_duplicate(item),
                Some(Out::Failed(e)) => {
                    *this.error = Some(e);
                    *this.done = true;
                    return Poll::Ready(None);
                }
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

impl<St, F, K, H, B> FusedStream for ClaimByKey<St, F, K, H, B>
where
    St: Stream,
    F: FnMut(&St::Item) -> K,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    H: OnDuplicate<St::Item>,
    B: OnDuplicate<St::Item>,
{
    fn is_terminated(&self) -> bool {
        self.done
    }
}
