//! A store that fails on command, in front of a real `MemoryStore`: for the failure paths of
//! the operator (store down, store slow, applied-then-timed-out).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stream_dedup::store::{
    InsertBatch, Inserted, MemoryStore, Store, StoreError, StoreFuture, Token,
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

impl Store for FaultyStore {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.tokens.lock().unwrap().push(batch.token);
        let mode = *self.mode.lock().unwrap();
        let inner = self.inner.clone();
        Box::pin(async move {
            match mode {
                Mode::Up => inner.insert(batch).await,
                Mode::Down => Err(StoreError::unavailable("connection refused (test)")),
                Mode::Hang => std::future::pending().await,
                Mode::Slow(d) => {
                    tokio::time::sleep(d).await;
                    inner.insert(batch).await
                }
                Mode::ApplyThenHang => {
                    let _ = inner.insert(batch).await;
                    std::future::pending().await
                }
            }
        })
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        self.inner.remove(keys)
    }
}
