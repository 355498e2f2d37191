//! The one loop behind the four adapters. A plain adapter and its `try_` twin are the same
//! [`Core`] over a different stream face (as futures-util builds `MapOk` on `Map`): the twin
//! reads its `TryStream` through [`IntoStream`], takes keys from `Ok` values ([`OkKey`]) and
//! hands hooks the `Ok` values ([`OkHooks`]). Mark on emit and claims differ only in their
//! [`Gate`].

use core::hash::Hash;
use core::pin::Pin;
use core::task::{Context, Poll, ready};
use std::collections::VecDeque;

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

/// What a claim operator does with a copy **held back**: one whose key is in flight under
/// another claim that may still commit or fail. Set with
/// [`ClaimByKey::held_back`](crate::ClaimByKey::held_back).
///
/// Which to pick depends on the broker:
/// - **NATS JetStream** (redelivers what is not acked, by itself): [`Hook`](HeldBack::Hook),
///   and do not ack in the hook; the next delivery is decided then.
/// - **RabbitMQ** (an unacked message sits, using the prefetch, until the channel closes):
///   [`Wait`](HeldBack::Wait), or `Hook` with a nack that requeues in the hook.
/// - **Kafka-style offsets, RocketMQ orderly consumers** (a skipped message is never delivered
///   again): [`WaitInOrder`](HeldBack::WaitInOrder), so that no offset passes a copy whose
///   original may still fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeldBack {
    /// Hand it to the `on_held_back` hook (or yield it as
    /// [`Verdict::HeldBack`](crate::Verdict::HeldBack)), unacked. The default.
    #[default]
    Hook,
    /// Park it until its key settles, then drop it as a duplicate (the original committed) or
    /// yield it as a new claim (the original was released, or its lease ran out). Other items
    /// pass it meanwhile. At most `max_parked` copies wait; more go to the hook. A copy whose
    /// original is another consumer's is asked about again on each keep-alive round.
    Wait {
        /// The most copies parked at once.
        max_parked: usize,
    },
    /// The stream itself waits: nothing after the copy is yielded until its key settles, and
    /// it is then dropped as a duplicate or yielded as a new claim. Commit (or release) each
    /// claim before asking for the next item, or a copy of its key waits for it forever.
    WaitInOrder,
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
    /// What happens to a copy held back.
    held_back: HeldBack,
    /// Copies held back that wait for their key to settle ([`HeldBack::Wait`]).
    parked: VecDeque<St::Item>,
    /// Parked copies whose key may have settled: read before the inner stream.
    refeed: VecDeque<St::Item>,
    /// The copy that the stream waits for ([`HeldBack::WaitInOrder`], no store).
    blocking: Option<St::Item>,
    /// The inner stream has ended (parked copies may still come out).
    inner_done: bool,
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
            held_back: HeldBack::Hook,
            parked: VecDeque::new(),
            refeed: VecDeque::new(),
            blocking: None,
            inner_done: false,
            busy: false,
        }
    }

    /// Sets what happens to a copy held back.
    pub(crate) fn held_back(mut self, policy: HeldBack) -> Self {
        self.held_back = policy;
        if let (HeldBack::WaitInOrder, Some(driver)) = (policy, self.store.as_deref_mut()) {
            driver.wait_in_order();
        }
        self
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
            held_back: self.held_back,
            parked: self.parked,
            refeed: self.refeed,
            blocking: self.blocking,
            inner_done: self.inner_done,
            busy: self.busy,
        }
    }

    pub(crate) fn gate(&self) -> &G {
        &self.gate
    }

    /// Items read but not yet yielded (on the store path, and copies waiting).
    pub(crate) fn queued(&self) -> usize {
        let waiting = self.parked.len() + self.refeed.len() + usize::from(self.blocking.is_some());
        self.store.as_ref().map_or(0, |d| d.queued()) + waiting
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

/// An item the gate or the store path dropped: for the hooks, or to park.
enum Dropped<I> {
    Duplicate(I),
    HeldBack(I),
}

/// The next input: a parked copy whose key settled, then the inner stream. Once the inner
/// stream has ended, copies still parked keep the stream open (`Pending` until they settle).
fn pull<St: Stream>(
    refeed: &mut VecDeque<St::Item>,
    parked: usize,
    inner_done: &mut bool,
    stream: Pin<&mut St>,
    cx: &mut Context<'_>,
) -> Poll<Option<St::Item>> {
    if let Some(item) = refeed.pop_front() {
        return Poll::Ready(Some(item));
    }
    if !*inner_done {
        match stream.poll_next(cx) {
            Poll::Ready(None) => *inner_done = true,
            other => return other,
        }
    }
    if parked == 0 {
        Poll::Ready(None)
    } else {
        Poll::Pending
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
    #[inline]
    pub(crate) fn poll_step(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Step<St::Item, K, E>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        loop {
            // Parked copies go back in once something settled (their originals' keys).
            // A copy whose key is still in flight here stays parked: it would only be held
            // back (and counted) again.
            if !this.parked.is_empty() && this.gate.poll_settled(cx) {
                let (gate, key_of) = (&*this.gate, &mut *this.key_of);
                for item in std::mem::take(this.parked) {
                    let waits = key_of
                        .key_of(&item)
                        .is_some_and(|key| gate.still_in_flight(&key));
                    if waits {
                        this.parked.push_back(item);
                    } else {
                        this.refeed.push_back(item);
                    }
                }
            }
            let parked = this.parked.len();
            let dropped = match this.store.as_deref_mut() {
                Some(driver) => {
                    if *this.busy {
                        *this.done = true;
                        return Poll::Ready(None);
                    }
                    *this.busy = true;
                    let (refeed, inner_done, stream) =
                        (&mut *this.refeed, &mut *this.inner_done, &mut this.stream);
                    let out = driver.poll(
                        this.gate,
                        this.ticker,
                        cx,
                        |cx| pull(refeed, parked, inner_done, stream.as_mut(), cx),
                        |item| this.key_of.key_of(item),
                    );
                    *this.busy = false;
                    match ready!(out) {
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
                        Some(Out::Duplicate(item)) => Dropped::Duplicate(item),
                        Some(Out::HeldBack(item)) => Dropped::HeldBack(item),
                    }
                }
                None => {
                    let item = match this.blocking.take() {
                        // Waiting in order: nothing passes this copy until its key settles.
                        Some(item) if this.gate.poll_settled(cx) => item,
                        Some(item) => {
                            *this.blocking = Some(item);
                            return Poll::Pending;
                        }
                        None => match pull(
                            this.refeed,
                            parked,
                            this.inner_done,
                            this.stream.as_mut(),
                            cx,
                        ) {
                            Poll::Ready(Some(item)) => item,
                            Poll::Ready(None) => {
                                *this.done = true;
                                return Poll::Ready(None);
                            }
                            Poll::Pending => {
                                this.ticker.waited();
                                return Poll::Pending;
                            }
                        },
                    };
                    let Some(key) = this.key_of.key_of(&item) else {
                        return Poll::Ready(Some(Step::Emit(item, None)));
                    };
                    let now = this.ticker.now(|| this.gate.clock());
                    match this.gate.decide(key, now) {
                        Decided::Accept(held) => return Poll::Ready(Some(Step::Emit(item, held))),
                        Decided::Duplicate => Dropped::Duplicate(item),
                        Decided::HeldBack => Dropped::HeldBack(item),
                    }
                }
            };
            match dropped {
                Dropped::Duplicate(item) if X::YIELD => {
                    return Poll::Ready(Some(Step::Duplicate(item)));
                }
                Dropped::Duplicate(item) => this.hooks.duplicate(item),
                Dropped::HeldBack(item) => match *this.held_back {
                    HeldBack::Wait { max_parked } if this.parked.len() < max_parked => {
                        this.parked.push_back(item);
                    }
                    // (With a store, the store path waits in order itself.)
                    HeldBack::WaitInOrder if this.store.is_none() => {
                        *this.blocking = Some(item);
                    }
                    _ if X::YIELD => return Poll::Ready(Some(Step::HeldBack(item))),
                    _ => this.hooks.held_back(item),
                },
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
