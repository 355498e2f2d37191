use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;

use std::time::Duration;

use super::{
    ClaimBatch, ClaimStore, Claimed, HeldKey, InsertBatch, Inserted, Store, StoreFuture, Token,
};

/// A store in this process's memory: keys with a ttl in a map, shared by every clone.
///
/// It survives nothing, so it adds nothing to the window in production; it exists for tests
/// (it is the reference the other stores are checked against) and for trying the store path
/// with no server. Expiry reads [`tokio::time::Instant`], so a paused clock drives it.
/// Expired keys are dropped when their key is asked about again, and in a sweep whenever the
/// map has doubled since the last one, so memory stays proportional to the live keys.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use stream_dedup::store::{InsertBatch, Inserted, MemoryStore, Store};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let ttl = Duration::from_secs(60);
/// let first = store.insert(InsertBatch::new(vec![b"a".to_vec()], ttl)).await?;
/// let again = store.insert(InsertBatch::new(vec![b"a".to_vec(), b"b".to_vec()], ttl)).await?;
/// assert_eq!(first, [Inserted::New]);
/// assert_eq!(again, [Inserted::Present, Inserted::New]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<Vec<u8>, Entry>,
    /// Map size after the last sweep; the next sweep runs when it has doubled.
    swept_at: usize,
}

#[derive(Debug)]
struct Entry {
    expires: Instant,
    token: Token,
    /// Committed (or inserted); `false` while a claim holds it.
    done: bool,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many keys it holds, expired ones included until they are swept.
    pub fn len(&self) -> usize {
        self.lock().keys.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Drops expired keys whenever the map has doubled since the last sweep.
    fn sweep(&mut self, now: Instant) {
        if self.keys.len() >= 2 * self.swept_at.max(1024) {
            self.keys.retain(|_, e| e.expires > now);
            self.swept_at = self.keys.len();
        }
    }

    /// The live entry of `key`, if any.
    fn live(&mut self, key: &[u8], now: Instant) -> Option<&mut Entry> {
        self.keys.get_mut(key).filter(|e| e.expires > now)
    }
}

/// `now + d`, or a time too far ahead to matter when that overflows (a ttl of `u64::MAX`
/// seconds).
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl Store for MemoryStore {
    fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.sweep(now);
        let entry = Entry {
            expires: later(now, batch.ttl),
            token: batch.token,
            done: true,
        };
        let answers = batch
            .keys
            .into_iter()
            .map(|key| match inner.live(&key, now) {
                Some(e) if e.token == batch.token && e.done => Inserted::New,
                Some(_) => Inserted::Present,
                None => {
                    inner.keys.insert(key, Entry { ..entry });
                    Inserted::New
                }
            })
            .collect();
        Box::pin(std::future::ready(Ok(answers)))
    }

    fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
        let mut inner = self.lock();
        for key in &keys {
            inner.keys.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        let now = Instant::now();
        let mut inner = self.lock();
        for (key, token) in keys {
            if inner.live(&key, now).is_some_and(|e| e.token == token) {
                inner.keys.remove(&key);
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

impl ClaimStore for MemoryStore {
    fn claim(&self, batch: ClaimBatch) -> StoreFuture<Vec<Claimed>> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.sweep(now);
        let answers = batch
            .keys
            .into_iter()
            .map(|key| match inner.live(&key, now) {
                Some(e) if e.done => Claimed::Done,
                Some(e) if e.token == batch.token => Claimed::Mine,
                Some(_) => Claimed::InFlight,
                None => {
                    let entry = Entry {
                        expires: later(now, batch.lease),
                        token: batch.token,
                        done: false,
                    };
                    inner.keys.insert(key, entry);
                    Claimed::Mine
                }
            })
            .collect();
        Box::pin(std::future::ready(Ok(answers)))
    }

    fn commit(&self, keys: Vec<HeldKey>, ttl: Duration) -> StoreFuture<Vec<bool>> {
        let now = Instant::now();
        let mut inner = self.lock();
        let answers = keys
            .into_iter()
            .map(|(key, token)| {
                let done = Entry {
                    expires: later(now, ttl),
                    token,
                    done: true,
                };
                match inner.live(&key, now) {
                    Some(e) if e.token == token => {
                        *e = done;
                        true
                    }
                    Some(_) => false,
                    None => {
                        inner.keys.insert(key, done);
                        true
                    }
                }
            })
            .collect();
        Box::pin(std::future::ready(Ok(answers)))
    }

    fn renew(&self, keys: Vec<HeldKey>, lease: Duration) -> StoreFuture<Vec<bool>> {
        let now = Instant::now();
        let mut inner = self.lock();
        let answers = keys
            .into_iter()
            .map(|(key, token)| match inner.live(&key, now) {
                Some(e) if !e.done && e.token == token => {
                    e.expires = later(now, lease);
                    true
                }
                _ => false,
            })
            .collect();
        Box::pin(std::future::ready(Ok(answers)))
    }

    fn release(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
        let now = Instant::now();
        let mut inner = self.lock();
        for (key, token) in keys {
            if inner
                .live(&key, now)
                .is_some_and(|e| !e.done && e.token == token)
            {
                inner.keys.remove(&key);
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }
}
