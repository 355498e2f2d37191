//! A store that fails on command, in front of a real store (`MemoryStore` by default, or any
//! other): for the failure paths of the operator (store down, store slow, applied then timed
//! out, answered late). A mode holds until changed, or each call takes the next mode of a plan.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stream_dedup::store::{
    ClaimBatch, ClaimStore, Claimed, HeldKey, InsertBatch, Inserted, MemoryStore, Store,
    StoreError, StoreFuture, Token,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answer normally.
    Up,
    /// Refuse every call (connection refused).
    Down,
    /// Never answer.
    Hang,
    /// Answer after this long.
    Slow(Duration),
    /// Record the keys, then never answer (a timeout that was applied anyway).
    ApplyThenHang,
    /// Record the keys, answer after this long (later than a short timeout: applied, then
    /// timed out, then the answer arrives to nobody).
    ApplyThenSlow(Duration),
}

#[derive(Clone, Debug)]
pub struct FaultyStore<S = MemoryStore> {
    pub inner: S,
    mode: Arc<Mutex<Mode>>,
    plan: Arc<Mutex<VecDeque<Mode>>>,
    pub calls: Arc<AtomicUsize>,
    pub tokens: Arc<Mutex<Vec<Token>>>,
}

impl FaultyStore {
    pub fn new() -> Self {
        FaultyStore::wrap(MemoryStore::new())
    }
}

impl<S> FaultyStore<S> {
    /// `inner`, failing on command.
    pub fn wrap(inner: S) -> Self {
        FaultyStore {
            inner,
            mode: Arc::new(Mutex::new(Mode::Up)),
            plan: Arc::default(),
            calls: Arc::default(),
            tokens: Arc::default(),
        }
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// The next calls take these modes, one each, before the mode set with `set` applies again.
    pub fn plan(&self, modes: impl IntoIterator<Item = Mode>) {
        self.plan.lock().unwrap().extend(modes);
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Runs `op` (a call on the inner store) as the current mode says.
    fn faulty<T: Send + 'static>(&self, op: StoreFuture<T>) -> StoreFuture<T> {
        self.faulty_as(op, false)
    }

    /// Runs `op` as the next mode of the plan says (inserts and claims), or the current mode.
    fn faulty_as<T: Send + 'static>(&self, op: StoreFuture<T>, planned: bool) -> StoreFuture<T> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let planned = if planned {
            self.plan.lock().unwrap().pop_front()
        } else {
            None
        };
        let mode = planned.unwrap_or_else(|| *self.mode.lock().unwrap());
        Box::pin(async move {
            match mode {
                Mode::Up => op.await,
                Mode::Down => Err(StoreError::unavailable("connection refused (test)")),
                Mode::Hang => std::future::pending().await,
                Mode::Slow(d) => {
                    tokio::time::sleep(d).await;
                    op.await
                }
                Mode::ApplyThenHang => {
                    let _ = op.await;
                    std::future::pending().await
                }
                Mode::ApplyThenSlow(d) => {
                    let answer = op.await;
                    tokio::time::sleep(d).await;
                    answer
                }
            }
        })
    }
}

/// The inner store's call is made lazily, so that a `Down` store applies nothing.
fn lazy<T: Send + 'static>(f: impl FnOnce() -> StoreFuture<T> + Send + 'static) -> StoreFuture<T> {
    Box::pin(async move { f().await })
}

impl<S: Store + Clone> Store for FaultyStore<S> {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        self.tokens.lock().unwrap().push(batch.token);
        let inner = self.inner.clone();
        self.faulty_as(lazy(move || inner.insert(batch)), true)
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        let inner = self.inner.clone();
        self.faulty(lazy(move || inner.remove(keys)))
    }

    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        // Not faulty: the checks read the store through take-backs that must land.
        self.inner.take_back(keys)
    }

    fn max_key_len(&self) -> usize {
        self.inner.max_key_len()
    }
}

impl<S: ClaimStore + Clone> ClaimStore for FaultyStore<S> {
    fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>> {
        self.tokens.lock().unwrap().push(batch.token);
        let inner = self.inner.clone();
        self.faulty_as(lazy(move || inner.claim(batch)), true)
    }

    fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>> {
        let inner = self.inner.clone();
        self.faulty(lazy(move || inner.commit(keys, ttl)))
    }

    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        let inner = self.inner.clone();
        self.faulty(lazy(move || inner.release(keys)))
    }

    fn renew(&self, keys: Vec<HeldKey>, lease: Duration) -> StoreFuture<Vec<bool>> {
        let inner = self.inner.clone();
        self.faulty(lazy(move || inner.renew(keys, lease)))
    }
}
