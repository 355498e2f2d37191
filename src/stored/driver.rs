//! The store path of the operators: batches of ready items, store calls in flight, verdicts
//! yielded in input order.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use sync_wrapper::SyncWrapper;
use tokio::time::{Sleep, Timeout};

use super::{FailurePolicy, StoreWindow};
use crate::store::{InsertBatch, Inserted, Store, StoreError, StoreFuture};
use crate::window::Handle;

/// What a [`StoreWindow`] hands an operator, with the key's capabilities captured as function
/// pointers so that the operator's own bounds stay `K: Hash + Eq`.
pub(crate) struct StoreParts<K, E> {
    pub(crate) config: StoreWindow,
    pub(crate) encode: fn(&K, &mut Vec<u8>),
    pub(crate) clone_key: fn(&K) -> K,
    pub(crate) convert: fn(StoreError) -> E,
}

/// What the operator does with the next item.
pub(crate) enum Out<T, E> {
    /// Yield it.
    Emit(T),
    /// Hand it to `on_duplicate`.
    Duplicate(T),
    /// Its check failed under fail closed: the error takes its place.
    Failed(E),
}

enum Verdict<E> {
    Accept,
    Duplicate,
    /// Passed unchecked (fail open).
    Unchecked,
    /// Not a keyed item (an `Err` of a try stream): passes untouched.
    Pass,
    Failed(E),
}

struct Entry<T, E> {
    item: T,
    /// `None` while the store's answer is awaited.
    verdict: Option<Verdict<E>>,
}

/// Who waits for one key of a request.
#[derive(Clone, Copy)]
struct Waiter {
    /// The entry's sequence number.
    seq: u64,
    /// The key's index in the request.
    key: u32,
    /// A later copy of the key: a duplicate of whatever the first copy turns out to be.
    copy: bool,
}

/// A store call with its timeout. The wrapper makes the operator `Sync` (the boxed future is
/// only `Send`): it is only ever reached through `&mut`.
type Call = SyncWrapper<Pin<Box<Timeout<StoreFuture<Vec<Inserted>>>>>>;

enum Attempt {
    Calling(Call),
    Backoff(Pin<Box<Sleep>>),
}

struct Request<K> {
    id: u64,
    keys: Vec<K>,
    batch: InsertBatch,
    waiters: Vec<Waiter>,
    retries: u32,
    attempt: Attempt,
}

fn call(store: &Arc<dyn Store>, batch: InsertBatch, timeout: Duration) -> Call {
    SyncWrapper::new(Box::pin(tokio::time::timeout(timeout, store.insert(batch))))
}

impl<K> Request<K> {
    /// Drives the call through timeouts and retries to its final answer.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        config: &StoreWindow,
    ) -> Poll<Result<Vec<Inserted>, StoreError>> {
        loop {
            match &mut self.attempt {
                Attempt::Calling(fut) => {
                    let error = match ready!(fut.get_mut().as_mut().poll(cx)) {
                        Ok(Ok(answers)) if answers.len() == self.keys.len() => {
                            return Poll::Ready(Ok(answers));
                        }
                        Ok(Ok(answers)) => StoreError::backend(
                            "answer for every key",
                            format!("{} answers for {} keys", answers.len(), self.keys.len()),
                        ),
                        Ok(Err(e)) => e,
                        Err(_elapsed) => StoreError::Timeout(config.timeout),
                    };
                    let policy: &FailurePolicy = &config.policy;
                    if !error.is_transient() || self.retries >= policy.retries() {
                        return Poll::Ready(Err(error));
                    }
                    self.retries += 1;
                    let sleep = tokio::time::sleep(policy.backoff(self.retries));
                    self.attempt = Attempt::Backoff(Box::pin(sleep));
                }
                Attempt::Backoff(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    // The same token: keys that the failed attempt recorded count as ours.
                    let batch = self.batch.clone();
                    self.attempt = Attempt::Calling(call(&config.store, batch, config.timeout));
                }
            }
        }
    }
}

/// The store path's state, owned by one operator.
pub(crate) struct Driver<T, K, E> {
    parts: StoreParts<K, E>,
    /// Items in input order, from sequence number `front_seq` on.
    queue: VecDeque<Entry<T, E>>,
    front_seq: u64,
    requests: Vec<Request<K>>,
    next_request: u64,
    /// Keys whose first copy awaits the store: where to find its answer.
    pending: HashMap<K, (u64, u32), foldhash::fast::RandomState>,
    inner_done: bool,
    /// Reusable buffer for encoding one key.
    scratch: Vec<u8>,
}

impl<T, K, E> Driver<T, K, E> {
    /// Items held (read, not yet yielded).
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether the inner stream ended and every item was yielded.
    pub(crate) fn is_done(&self) -> bool {
        self.inner_done && self.queue.is_empty()
    }
}

impl<T, K: Hash + Eq, E> Driver<T, K, E> {
    pub(crate) fn new(parts: StoreParts<K, E>) -> Self {
        Driver {
            parts,
            queue: VecDeque::new(),
            front_seq: 0,
            requests: Vec::new(),
            next_request: 0,
            pending: HashMap::default(),
            inner_done: false,
            scratch: Vec::new(),
        }
    }

    /// The next item's fate. `pull` polls the inner stream; `key_of` gives an item's key, or
    /// `None` for an item that passes untouched.
    pub(crate) fn poll<P, KF>(
        &mut self,
        window: &mut Handle<K>,
        cx: &mut Context<'_>,
        mut pull: P,
        mut key_of: KF,
    ) -> Poll<Option<Out<T, E>>>
    where
        P: FnMut(&mut Context<'_>) -> Poll<Option<T>>,
        KF: FnMut(&T) -> Option<K>,
    {
        loop {
            if let Some(out) = self.pop_decided(window) {
                return Poll::Ready(Some(out));
            }
            if self.is_done() {
                return Poll::Ready(None);
            }
            let mut progress = self.drive(window, cx);
            let config = &self.parts.config;
            let room = config.batch_size * (config.max_in_flight + 1);
            if !self.inner_done
                && self.requests.len() < config.max_in_flight
                && self.queue.len() < room
            {
                progress |= self.fill(window, cx, &mut pull, &mut key_of);
            }
            if !progress {
                // The inner stream and every call in flight have registered the waker.
                return Poll::Pending;
            }
        }
    }

    fn pop_decided(&mut self, window: &mut Handle<K>) -> Option<Out<T, E>> {
        self.queue.front()?.verdict.as_ref()?;
        let entry = self.queue.pop_front()?;
        self.front_seq += 1;
        let verdict = entry.verdict?;
        Some(match verdict {
            Verdict::Accept => {
                window.record(|r| r.verdict(true));
                Out::Emit(entry.item)
            }
            Verdict::Duplicate => {
                window.record(|r| r.verdict(false));
                Out::Duplicate(entry.item)
            }
            Verdict::Unchecked => {
                window.record(crate::stats::Recorder::unchecked);
                Out::Emit(entry.item)
            }
            Verdict::Pass => Out::Emit(entry.item),
            Verdict::Failed(e) => Out::Failed(e),
        })
    }

    /// Polls every call in flight; applies the answers of those that finished.
    fn drive(&mut self, window: &mut Handle<K>, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut i = 0;
        while i < self.requests.len() {
            match self.requests[i].poll(cx, &self.parts.config) {
                Poll::Pending => i += 1,
                Poll::Ready(result) => {
                    let request = self.requests.swap_remove(i);
                    self.resolve(window, request, result);
                    progress = true;
                }
            }
        }
        progress
    }

    fn resolve(
        &mut self,
        window: &mut Handle<K>,
        request: Request<K>,
        result: Result<Vec<Inserted>, StoreError>,
    ) {
        for key in &request.keys {
            self.pending.remove(key);
        }
        let open = self.parts.config.policy.is_fail_open();
        if result.is_err() {
            window.record(crate::stats::Recorder::store_error);
            if !open {
                // Forget the keys, so that the broker's redelivery is checked again.
                for key in &request.keys {
                    window.remove(key);
                }
            }
        }
        for w in request.waiters {
            let verdict = match &result {
                _ if w.copy && (open || result.is_ok()) => Verdict::Duplicate,
                Ok(answers) => match answers[w.key as usize] {
                    Inserted::New => Verdict::Accept,
                    Inserted::Present => Verdict::Duplicate,
                },
                Err(_) if open => Verdict::Unchecked,
                Err(e) => Verdict::Failed((self.parts.convert)(e.clone())),
            };
            let at = (w.seq - self.front_seq) as usize;
            if let Some(entry) = self.queue.get_mut(at) {
                entry.verdict = Some(verdict);
            }
        }
    }

    /// Reads the items the inner stream has ready (up to a batch), decides what memory can,
    /// and sends the rest to the store in one call. Returns whether anything happened.
    fn fill<P, KF>(
        &mut self,
        window: &mut Handle<K>,
        cx: &mut Context<'_>,
        pull: &mut P,
        key_of: &mut KF,
    ) -> bool
    where
        P: FnMut(&mut Context<'_>) -> Poll<Option<T>>,
        KF: FnMut(&T) -> Option<K>,
    {
        let now = window.now();
        let id = self.next_request;
        let mut keys = Vec::new();
        let mut encoded = Vec::new();
        let mut waiters = Vec::new();
        let mut progress = false;
        for _ in 0..self.parts.config.batch_size {
            let item = match pull(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    self.inner_done = true;
                    progress = true;
                    break;
                }
                Poll::Ready(Some(item)) => item,
            };
            progress = true;
            let seq = self.front_seq + self.queue.len() as u64;
            let verdict = match key_of(&item) {
                None => Some(Verdict::Pass),
                Some(key) => {
                    if let Some(&(request, index)) = self.pending.get(&key) {
                        let waiter = Waiter {
                            seq,
                            key: index,
                            copy: true,
                        };
                        match self.requests.iter_mut().find(|r| r.id == request) {
                            Some(r) => r.waiters.push(waiter),
                            None => waiters.push(waiter), // the batch being built
                        }
                        None
                    } else if !window.observe_uncounted((self.parts.clone_key)(&key), now) {
                        Some(Verdict::Duplicate)
                    } else {
                        self.scratch.clear();
                        (self.parts.encode)(&key, &mut self.scratch);
                        if self.scratch.len() > self.parts.config.max_key_len {
                            let e = StoreError::KeyTooLong {
                                len: self.scratch.len(),
                                max: self.parts.config.max_key_len,
                            };
                            Some(self.refuse_key(window, &key, e))
                        } else {
                            let index = keys.len() as u32;
                            self.pending
                                .insert((self.parts.clone_key)(&key), (id, index));
                            encoded.push(self.scratch.clone());
                            keys.push(key);
                            waiters.push(Waiter {
                                seq,
                                key: index,
                                copy: false,
                            });
                            None
                        }
                    }
                }
            };
            self.queue.push_back(Entry { item, verdict });
        }
        if !keys.is_empty() {
            let config = &self.parts.config;
            let batch = InsertBatch::new(encoded, config.ttl);
            self.requests.push(Request {
                id,
                attempt: Attempt::Calling(call(&config.store, batch.clone(), config.timeout)),
                keys,
                batch,
                waiters,
                retries: 0,
            });
            self.next_request += 1;
        }
        progress
    }

    /// A key the store is not asked about: the failure policy decides, with no retry.
    fn refuse_key(&mut self, window: &mut Handle<K>, key: &K, e: StoreError) -> Verdict<E> {
        if self.parts.config.policy.is_fail_open() {
            Verdict::Unchecked
        } else {
            window.remove(key);
            Verdict::Failed((self.parts.convert)(e))
        }
    }
}
