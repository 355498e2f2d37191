//! The one loop behind the four adapters. A plain adapter and its `try_` twin are the same
//! [`Core`] over a different stream face (as futures-util builds `MapOk` on `Map`): the twin
//! reads its `TryStream` through [`IntoStream`], takes keys from `Ok` values ([`OkKey`]) and
//! hands hooks the `Ok` values ([`OkHooks`]). Mark on emit and claims differ only in their
//! [`Gate`].

use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};

use futures_core::{Stream, TryStream};
use pin_project::pin_project;

use crate::hook::OnDuplicate;
use crate::pipeline::driver::{Driver, Out, ReleaseFn, StoreParts};
use crate::pipeline::gate::{Decided, Gate, Held};
use crate::window::Ticker;

/// How an operator reads an item's key: `None` for an item that passes untouched (an `Err`).
pub(crate) trait KeyOf<I> {
    type Key;
    fn key_of(&mut self, item: &I) -> Option<Self::Key>;
}

/// The key function of a plain adapter: every item has a key.
#[derive(Clone, Copy)]
pub(crate) struct Plain<F>(pub(crate) F);

impl<T, K, F: FnMut(&T) -> K> KeyOf<T> for Plain<F> {
    type Key = K;

    #[inline]
    fn key_of(&mut self, item: &T) -> Option<K> {
        Some((self.0)(item))
    }
}

/// The key function of a `try_` adapter: `Ok` values have a key, `Err`s pass.
#[derive(Clone, Copy)]
pub(crate) struct OkKey<F>(pub(crate) F);

impl<T, E, K, F: FnMut(&T) -> K> KeyOf<Result<T, E>> for OkKey<F> {
    type Key = K;

    #[inline]
    fn key_of(&mut self, item: &Result<T, E>) -> Option<K> {
        item.as_ref().ok().map(&mut self.0)
    }
}

/// Where dropped items go: duplicates (the key is done) and held-back copies (the key is in
/// flight under a claim).
pub(crate) trait Hooks<I> {
    /// Dropped items are not handed to hooks but yielded by the core ([`Step::Duplicate`],
    /// [`Step::HeldBack`]): the verdict adapters.
    const YIELD: bool = false;
    fn duplicate(&mut self, item: I);
    fn held_back(&mut self, item: I);
}

/// The verdict adapters' hooks: none, every item is yielded with its verdict.
pub(crate) struct Yield;

impl<I> Hooks<I> for Yield {
    const YIELD: bool = true;

    // Never called: the core yields instead.
    fn duplicate(&mut self, _: I) {}

    fn held_back(&mut self, _: I) {}
}

/// Mark on emit: one hook for both (a held-back copy only comes from a store where claims and
/// mark on emit share a namespace).
pub(crate) struct DupHook<H>(pub(crate) H);

impl<T, H: OnDuplicate<T>> Hooks<T> for DupHook<H> {
    #[inline]
    fn duplicate(&mut self, item: T) {
        self.0.on_duplicate(item);
    }

    #[inline]
    fn held_back(&mut self, item: T) {
        self.0.on_duplicate(item);
    }
}

/// Claims: a hook for duplicates and one for held-back copies.
pub(crate) struct ClaimHooks<H, B> {
    pub(crate) duplicate: H,
    pub(crate) held_back: B,
}

impl<T, H: OnDuplicate<T>, B: OnDuplicate<T>> Hooks<T> for ClaimHooks<H, B> {
    fn duplicate(&mut self, item: T) {
        self.duplicate.on_duplicate(item);
    }

    fn held_back(&mut self, item: T) {
        self.held_back.on_duplicate(item);
    }
}

/// A `try_` adapter's hooks see the `Ok` values (an `Err` is never dropped).
pub(crate) struct OkHooks<X>(pub(crate) X);

impl<T, E, X: Hooks<T>> Hooks<Result<T, E>> for OkHooks<X> {
    #[inline]
    fn duplicate(&mut self, item: Result<T, E>) {
        if let Ok(v) = item {
            self.0.duplicate(v);
        }
    }

    #[inline]
    fn held_back(&mut self, item: Result<T, E>) {
        if let Ok(v) = item {
            self.0.held_back(v);
        }
    }
}

/// A [`TryStream`] read as a `Stream` of `Result`s (futures-util's `IntoStream`).
#[pin_project]
#[derive(Debug)]
pub(crate) struct IntoStream<St>(#[pin] pub(crate) St);

impl<St: TryStream> Stream for IntoStream<St> {
    type Item = Result<St::Ok, St::Error>;

    #[inline]
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.project().0.try_poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

/// What the core hands its adapter.
pub(crate) enum Step<I, K, E> {
    /// An item to yield, with its claim on a claim gate.
    Emit(I, Option<Held<K>>),
    /// Fail closed: the store's error takes the place of the item it concerns.
    Failed(I, E),
    /// A duplicate (only with [`Hooks::YIELD`]).
    Duplicate(I),
    /// A copy held back (only with [`Hooks::YIELD`]).
    HeldBack(I),
}

/// The operator loop: pulls items, decides them in memory or through the store path, hands
/// dropped ones to the hooks, and yields the rest in input order.
#[pin_project]
pub(crate) struct Core<St: Stream, KF, G, X, K, E> {
    #[pin]
    stream: St,
    key_of: KF,
    gate: G,
    ticker: Ticker,
    /// The store path; `None` for an in-memory window (the fast path).
    store: Option<Box<Driver<St::Item, K, E>>>,
    hooks: X,
    /// The stream ended (inner stream done, or closed by the adapter).
    done: bool,
    /// Inside the store path's poll. Still set when a poll starts, the last one unwound (a
    /// panic in the key function or the inner stream): the store path's state is not to be
    /// trusted, so the stream ends instead of waiting on it.
    busy: bool,
}

impl<St: Stream, KF, G, X, K: Hash + Eq, E> Core<St, KF, G, X, K, E> {
    pub(crate) fn new(
        stream: St,
        key_of: KF,
        gate: G,
        store: Option<StoreParts<K, E>>,
        hooks: X,
    ) -> Self {
        Core {
            stream,
            key_of,
            gate,
            ticker: Ticker::default(),
            store: store.map(|parts| Box::new(Driver::new(parts))),
            hooks,
            done: false,
            busy: false,
        }
    }

    /// Sets what frees the keys the store path claimed but never handed out, when the operator
    /// is dropped.
    pub(crate) fn release_on_drop(mut self, release: Option<ReleaseFn<K>>) -> Self {
        if let (Some(driver), Some(release)) = (self.store.as_deref_mut(), release) {
            driver.release_on_drop(release);
        }
        self
    }
}

impl<St: Stream, KF, G, X, K, E> Core<St, KF, G, X, K, E> {
    /// The same core with other hooks.
    pub(crate) fn map_hooks<Y>(self, f: impl FnOnce(X) -> Y) -> Core<St, KF, G, Y, K, E> {
        Core {
            stream: self.stream,
            key_of: self.key_of,
            gate: self.gate,
            ticker: self.ticker,
            store: self.store,
            hooks: f(self.hooks),
            done: self.done,
            busy: self.busy,
        }
    }

    pub(crate) fn gate(&self) -> &G {
        &self.gate
    }

    /// Items read but not yet yielded (on the store path).
    pub(crate) fn queued(&self) -> usize {
        self.store.as_ref().map_or(0, |d| d.queued())
    }

    /// Whether the stream has ended.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// Ends the stream (fail closed with no error channel).
    pub(crate) fn close(self: Pin<&mut Self>) {
        *self.project().done = true;
    }

    /// `(0, upper + queued)`: any number of items may be duplicates, so no lower bound; never
    /// more than the input plus what the store path holds.
    pub(crate) fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            return (0, Some(0));
        }
        let upper = self.stream.size_hint().1;
        (0, upper.and_then(|n| n.checked_add(self.queued())))
    }

    pub(crate) fn get_ref(&self) -> &St {
        &self.stream
    }

    pub(crate) fn get_mut(&mut self) -> &mut St {
        &mut self.stream
    }

    pub(crate) fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut St> {
        self.project().stream
    }

    pub(crate) fn into_inner(self) -> St {
        self.stream
    }
}

impl<St, KF, G, X, K, E> Core<St, KF, G, X, K, E>
where
    St: Stream,
    KF: KeyOf<St::Item, Key = K>,
    G: Gate<K>,
    X: Hooks<St::Item>,
    K: Hash + Eq,
{
    /// The next item to yield (or error to yield, under fail closed).
    pub(crate) fn poll_step(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Step<St::Item, K, E>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.store.as_deref_mut() {
                Some(driver) => {
                    if *this.busy {
                        *this.done = true;
                        return Poll::Ready(None);
                    }
                    *this.busy = true;
                    let out = driver.poll(
                        this.gate,
                        this.ticker,
                        cx,
                        |cx| this.stream.as_mut().poll_next(cx),
                        |item| this.key_of.key_of(item),
                    );
                    *this.busy = false;
                    let out = ready!(out);
                    match out {
                        None => {
                            *this.done = true;
                            return Poll::Ready(None);
                        }
                        Some(Out::Emit(item, held)) => {
                            return Poll::Ready(Some(Step::Emit(item, held)));
                        }
                        Some(Out::Failed(item, e)) => {
                            return Poll::Ready(Some(Step::Failed(item, e)));
                        }
                        Some(Out::Duplicate(item)) if X::YIELD => {
                            return Poll::Ready(Some(Step::Duplicate(item)));
                        }
                        Some(Out::HeldBack(item)) if X::YIELD => {
                            return Poll::Ready(Some(Step::HeldBack(item)));
                        }
                        Some(Out::Duplicate(item)) => this.hooks.duplicate(item),
                        Some(Out::HeldBack(item)) => this.hooks.held_back(item),
                    }
                }
                None => {
                    let item = match this.stream.as_mut().poll_next(cx) {
                        Poll::Ready(Some(item)) => item,
                        Poll::Ready(None) => {
                            *this.done = true;
                            return Poll::Ready(None);
                        }
                        Poll::Pending => {
                            this.ticker.waited();
                            return Poll::Pending;
                        }
                    };
                    let Some(key) = this.key_of.key_of(&item) else {
                        return Poll::Ready(Some(Step::Emit(item, None)));
                    };
                    let now = this.ticker.now(|| this.gate.clock());
                    match this.gate.decide(key, now) {
                        Decided::Accept(held) => return Poll::Ready(Some(Step::Emit(item, held))),
                        Decided::Duplicate if X::YIELD => {
                            return Poll::Ready(Some(Step::Duplicate(item)));
                        }
                        Decided::HeldBack if X::YIELD => {
                            return Poll::Ready(Some(Step::HeldBack(item)));
                        }
                        Decided::Duplicate => this.hooks.duplicate(item),
                        Decided::HeldBack => this.hooks.held_back(item),
                    }
                }
            }
            // A long run of dropped items from an always-ready stream must not starve the other
            // tasks of the executor: each one spends a unit of tokio's coop budget.
            match tokio::task::coop::poll_proceed(cx) {
                Poll::Ready(restore) => restore.made_progress(),
                Poll::Pending => {
                    this.ticker.waited();
                    return Poll::Pending;
                }
            }
        }
    }
}
