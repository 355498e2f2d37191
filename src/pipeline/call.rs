//! One store call of the driver, through its timeout and retries ([`Call`]), and the waker the
//! calls in flight share ([`Wakeup`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;

use sync_wrapper::SyncWrapper;
use tokio::time::{Sleep, Timeout};

use super::Settings;
use super::gate::Answer;
use crate::logging::{Kind, Log};
use crate::store::{
    ClaimBatch, ClaimStore, Claimed, HeldKey, InsertBatch, Inserted, Store, StoreError,
    StoreFuture, Token,
};

/// Which store operation a driver calls, on which store.
#[derive(Clone)]
pub(crate) enum Backend {
    /// `Store::insert` with the window's ttl (mark on emit).
    Insert(Arc<dyn Store>),
    /// `ClaimStore::claim` with this lease.
    Claim {
        store: Arc<dyn ClaimStore>,
        lease: Duration,
    },
}

impl Backend {
    /// Whether this backend hands out claims.
    pub(crate) fn claims(&self) -> bool {
        matches!(self, Backend::Claim { .. })
    }

    fn store(&self) -> &dyn Store {
        match self {
            Backend::Insert(store) => &**store,
            Backend::Claim { store, .. } => &**store,
        }
    }

    /// The longest key the store takes.
    pub(crate) fn max_key_len(&self) -> usize {
        self.store().max_key_len()
    }

    /// Takes back `keys` (each still held by its token) in the background: see
    /// [`run_detached`]. It gets the call timeout, but at least [`TAKE_BACK_TIMEOUT`]: nobody
    /// waits for it, and one given up leaves its keys marked for their ttl (a busy store that
    /// answers a little late must still take them back).
    /// A take-back that fails or is given up is a `take_back` warning of `log`.
    pub(crate) fn take_back(&self, keys: Vec<HeldKey>, timeout: Duration, log: Arc<Log>) {
        if keys.is_empty() {
            return;
        }
        let n = keys.len() as u64;
        let timeout = timeout.max(TAKE_BACK_TIMEOUT);
        let call = self.store().take_back(keys);
        run_detached(Box::pin(async move {
            let error = match tokio::time::timeout(timeout, call).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e,
                Err(_) => StoreError::Timeout(timeout),
            };
            log.claims_failed(Kind::TakeBack, n, Some(&error));
            Err(error)
        }));
    }

    fn call(&self, ttl: Duration, keys: Vec<Vec<u8>>, token: Token) -> StoreCall {
        match self {
            Backend::Insert(store) => {
                let fut = store.insert(InsertBatch::new(keys, ttl).with_token(token));
                Box::pin(async move {
                    let answers = fut.await?;
                    Ok(answers
                        .into_iter()
                        .map(|a| match a {
                            Inserted::New => Answer::New,
                            Inserted::Present => Answer::Present,
                        })
                        .collect())
                })
            }
            Backend::Claim { store, lease } => {
                let batch = ClaimBatch::new(keys, *lease)
                    .with_token(token)
                    .with_ttl(ttl);
                let fut = store.claim(batch);
                Box::pin(async move {
                    let answers = fut.await?;
                    Ok(answers
                        .into_iter()
                        .map(|a| match a {
                            Claimed::Mine => Answer::New,
                            Claimed::Done => Answer::Present,
                            Claimed::InFlight => Answer::InFlight,
                        })
                        .collect())
                })
            }
        }
    }
}

/// Runs a store call nobody waits for (a take-back as an operator is dropped, or after a call
/// failed for good): polled once at once, inside the tokio runtime if there is one (so a store
/// that starts its work when first polled has started it before the operator is gone), then
/// spawned to its end (`call` bounds itself with a timeout). Nobody sees its result (`call`
/// logs its own failure): a key left marked expires with its ttl. Outside a tokio runtime
/// nothing can run it; the keys expire.
pub(crate) fn run_detached(mut call: StoreFuture<()>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let mut cx = Context::from_waker(Waker::noop());
    if call.as_mut().poll(&mut cx).is_pending() {
        runtime.spawn(async move {
            let _ = call.await;
        });
    }
}

/// The least time a take-back is given before it is abandoned (see [`Backend::take_back`]).
pub(crate) const TAKE_BACK_TIMEOUT: Duration = Duration::from_secs(5);

type StoreCall = Pin<Box<dyn Future<Output = Result<Vec<Answer>, StoreError>> + Send>>;

/// A store call with its timeout. The wrapper makes the operator `Sync` (the boxed future is
/// only `Send`): it is only ever reached through `&mut`.
type Timed = SyncWrapper<Pin<Box<Timeout<StoreCall>>>>;

enum Attempt {
    Calling(Timed),
    Backoff(Pin<Box<Sleep>>),
}

/// One request's store call: its attempts, under the timeout, with the failure policy's
/// retries. Every attempt sends the same token.
pub(crate) struct Call {
    pub(crate) token: Token,
    retries: u32,
    attempt: Attempt,
}

impl Call {
    /// Starts the first attempt for the encoded `keys`.
    pub(crate) fn start(backend: &Backend, settings: &Settings, keys: &[Vec<u8>]) -> Call {
        let token = Token::new();
        Call {
            token,
            retries: 0,
            attempt: attempt(backend, settings, keys, token),
        }
    }

    /// Drives the call through timeouts and retries to its final answer, one per key.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        backend: &Backend,
        settings: &Settings,
        keys: &[Vec<u8>],
    ) -> Poll<Result<Vec<Answer>, StoreError>> {
        loop {
            match &mut self.attempt {
                Attempt::Calling(fut) => {
                    let error = match ready!(fut.get_mut().as_mut().poll(cx)) {
                        Ok(Ok(answers)) if answers.len() == keys.len() => {
                            return Poll::Ready(Ok(answers));
                        }
                        Ok(Ok(answers)) => StoreError::backend(
                            "answer for every key",
                            format!("{} answers for {} keys", answers.len(), keys.len()),
                        ),
                        Ok(Err(e)) => e,
                        Err(_elapsed) => StoreError::Timeout(settings.timeout),
                    };
                    let policy = &settings.policy;
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
                    self.attempt = attempt(backend, settings, keys, self.token);
                }
            }
        }
    }
}

/// One attempt at a request: the store call under the configured timeout.
fn attempt(backend: &Backend, settings: &Settings, keys: &[Vec<u8>], token: Token) -> Attempt {
    let fut = backend.call(settings.ttl, keys.to_vec(), token);
    Attempt::Calling(SyncWrapper::new(Box::pin(tokio::time::timeout(
        settings.timeout,
        fut,
    ))))
}

/// The waker the calls in flight see: it notes that one of them has something to say, then
/// wakes the operator's task. The operator polls its calls only after such a wake-up (or a new
/// call), not each time its consumer polls it; a consumer that polls the operator once per
/// finished commit polled every call about twice per key before.
pub(crate) struct Wakeup {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wakeup {
    pub(crate) fn new() -> Arc<Wakeup> {
        Arc::new(Wakeup {
            woken: AtomicBool::new(false),
            task: Mutex::new(None),
        })
    }

    /// Makes `waker` the one to wake (when it is not already).
    pub(crate) fn register(&self, waker: &Waker) {
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if !task.as_ref().is_some_and(|t| t.will_wake(waker)) {
            let old = task.replace(waker.clone());
            drop(task);
            drop(old); // outside the lock: dropping a waker runs the executor's code
        }
    }

    /// Marks the calls as having something to say (a new call must be polled to start).
    pub(crate) fn mark(&self) {
        self.woken.store(true, Ordering::Relaxed);
    }

    /// Whether a call woke the operator since the last look; clears the mark.
    pub(crate) fn take(&self) -> bool {
        // Acquire: pairs with the wake-up's release. A wake-up after this swap sets the flag
        // again and wakes the task (registered before), so none is lost.
        self.woken.swap(false, Ordering::Acquire)
    }
}

impl Wake for Wakeup {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Release: what the call did before waking is seen by the poll that reads the flag.
        self.woken.store(true, Ordering::Release);
        // Woken outside the lock: an executor may do anything in `wake`.
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}
