//! A store that fails on command, in front of a real `MemoryStore`: for the failure paths of
//! the operator (store down, store slow, applied-then-timed-out).

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
}

#[derive(Clone, Debug)]
pub struct FaultyStore {
    pub inner: MemoryStore,
    mode: Arc<Mutex<Mode>>,
    pub calls: Arc<AtomicUsize>,
    pub tokens: Arc<Mutex<Vec<Token>>>,
}

impl FaultyStore {
    pub fn new() -> Self {
        FaultyStore {
            inner: MemoryStore::new(),
            mode: Arc::new(Mutex::new(Mode::Up)),
            calls: Arc::default(),
            tokens: Arc::default(),
        }
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl FaultyStore {
    /// Runs `op` (a call on the inner store) as the current mode says.
    fn faulty<T: Send + 'static>(&self, op: StoreFuture<T>) -> StoreFuture<T> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mode = *self.mode.lock().unwrap();
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
            }
        })
    }
}

/// The inner store's call is made lazily, so that a `Down` store applies nothing.
fn lazy<T: Send + 'static>(f: impl FnOnce() -> StoreFuture<T> + Send + 'static) -> StoreFuture<T> {
    Box::pin(async move { f().await })
}

impl Store for FaultyStore {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        self.tokens.lock().unwrap().push(batch.token);
        let inner = self.inner.clone();
        self.faulty(lazy(move || inner.insert(batch)))
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        let inner = self.inner.clone();
        self.faulty(lazy(move || inner.remove(keys)))
    }

    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        let inner = self.inner.clone();
        self.faulty(lazy(move || inner.take_back(keys)))
    }
}

impl ClaimStore for FaultyStore {
    fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>> {
        self.tokens.lock().unwrap().push(batch.token);
        let inner = self.inner.clone();
        self.faulty(lazy(move || inner.claim(batch)))
    }

    fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>> {
        let inner = self.inner.clone();
        self.faulty(lazy(move || inner.commit(keys, ttl)))
    }

    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        let inner = self.inner.clone();
        self.faulty(lazy(move || inner.release(keys)))
    }
}
