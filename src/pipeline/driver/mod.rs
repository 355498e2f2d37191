//! The store path of the operators: batches of ready items, store calls in flight, verdicts
//! yielded in input order. One driver serves mark-on-emit (`insert`) and claims (`claim`); a
//! [`Gate`] is the in-memory side that answers what it can without I/O.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::time::Instant;

use super::Settings;
use super::call::{Backend, Call, Wakeup};
use super::gate::{Answer, Gate, Held, Pre};
use crate::logging::{Kind, Log, Tally, op_event};
use crate::stats::Fate;
use crate::store::{StoreError, Token};
use crate::window::Ticker;

mod give_back;

pub(crate) use give_back::ReleaseFn;

/// What a [`StoreWindow`](super::StoreWindow) hands an operator, with the key's capabilities
/// captured as function pointers so that the operator's own bounds stay `K: Hash + Eq`.
pub(crate) struct StoreParts<K, E> {
    pub(crate) backend: Backend,
    pub(crate) settings: Settings,
    pub(crate) encode: fn(&K, &mut Vec<u8>),
    pub(crate) clone_key: fn(&K) -> K,
    pub(crate) convert: fn(StoreError) -> E,
    /// Where failures and batches are logged.
    pub(crate) log: Arc<Log>,
}

/// What the operator does with the next item.
pub(crate) enum Out<T, K, E> {
    /// Yield it (with a claim mode's claim when the store claimed it).
    Emit(T, Option<Held<K>>),
    /// Hand it to `on_duplicate`.
    Duplicate(T),
    /// Its key is in flight elsewhere: neither processed nor a duplicate.
    HeldBack(T),
    /// Its check failed under fail closed: the error takes its place (with the item, for an
    /// adapter that hands it back).
    Failed(T, E),
}

enum Verdict<K, E> {
    Accept(Option<Held<K>>),
    Duplicate,
    HeldBack,
    /// Passed unchecked (fail open), with a claim mode's key and token.
    Unchecked(Option<Held<K>>),
    /// Not a keyed item (an `Err` of a try stream): passes untouched.
    Pass,
    Failed(E),
}

struct Entry<T, K, E> {
    item: T,
    /// `None` while the store's answer is awaited.
    verdict: Option<Verdict<K, E>>,
}

/// Who waits for one key of a request.
#[derive(Clone, Copy)]
struct Waiter {
    /// The entry's sequence number.
    seq: u64,
    /// The key's index in the request.
    key: u32,
    /// A later copy of the key: it follows whatever the first copy turns out to be.
    copy: bool,
}

/// A store call being put together.
struct Batch<K> {
    id: u64,
    keys: Vec<K>,
    encoded: Vec<Vec<u8>>,
    waiters: Vec<Waiter>,
}

impl<K> Batch<K> {
    fn new(id: u64) -> Self {
        Batch {
            id,
            keys: Vec::new(),
            encoded: Vec::new(),
            waiters: Vec::new(),
        }
    }
}

struct Request<K> {
    id: u64,
    keys: Vec<K>,
    encoded: Vec<Vec<u8>>,
    waiters: Vec<Waiter>,
    call: Call,
    /// When the call started, if its debug event will be logged.
    started: Option<Instant>,
}

/// The store path's state, owned by one operator.
pub(crate) struct Driver<T, K, E> {
    parts: StoreParts<K, E>,
    /// Items in input order, from sequence number `front_seq` on.
    queue: VecDeque<Entry<T, K, E>>,
    front_seq: u64,
    requests: Vec<Request<K>>,
    /// What the calls in flight wake.
    wakeup: Arc<Wakeup>,
    next_request: u64,
    /// Keys whose first copy awaits the store: where to find its answer.
    pending: HashMap<K, (u64, u32), foldhash::fast::RandomState>,
    inner_done: bool,
    /// Reusable buffer for encoding one key.
    scratch: Vec<u8>,
    /// A copy held back waits at the front, and nothing passes it, until its key settles.
    wait_in_order: bool,
    /// The front item is such a copy.
    front_waits: bool,
    /// Claims: frees the keys this operator holds without having handed them out (in the
    /// claims' memory and in the store). Without it (mark on emit) the driver takes them back
    /// from the store itself.
    release: Option<ReleaseFn<K>>,
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
    pub(crate) fn new(mut parts: StoreParts<K, E>) -> Self {
        // The store's own limit wins over a longer one of the window's.
        let store_max = parts.backend.max_key_len();
        parts.settings.max_key_len = parts.settings.max_key_len.min(store_max);
        Driver {
            wakeup: Wakeup::new(),
            parts,
            queue: VecDeque::new(),
            front_seq: 0,
            requests: Vec::new(),
            next_request: 0,
            pending: HashMap::default(),
            inner_done: false,
            scratch: Vec::new(),
            wait_in_order: false,
            front_waits: false,
            release: None,
        }
    }

    /// Makes a copy held back wait at the front, in order, until its key settles.
    pub(crate) fn wait_in_order(&mut self) {
        self.wait_in_order = true;
    }

    /// Sets what frees unhanded claims when the operator is dropped.
    pub(crate) fn release_on_drop(&mut self, release: ReleaseFn<K>) {
        self.release = Some(release);
    }

    /// The next item's fate. `pull` polls the inner stream; `key_of` gives an item's key, or
    /// `None` for an item that passes untouched.
    // Out of line: inlined, the store path's code would crowd the in-memory operator's loop,
    // which shares one `poll_step` with it (callgrind: ~2 M instructions per 300k items
    // fewer; a call per item costs nothing next to a store's round trip).
    #[inline(never)]
    pub(crate) fn poll<G, P, KF>(
        &mut self,
        gate: &mut G,
        ticker: &mut Ticker,
        cx: &mut Context<'_>,
        mut pull: P,
        mut key_of: KF,
    ) -> Poll<Option<Out<T, K, E>>>
    where
        G: Gate<K>,
        P: FnMut(&mut Context<'_>) -> Poll<Option<T>>,
        KF: FnMut(&T) -> Option<K>,
    {
        loop {
            let mut progress = false;
            if self.front_waits && gate.poll_settled(cx) {
                self.front_waits = false;
                self.reask_front(gate, ticker, &mut key_of);
                progress = true;
            }
            if let Some(out) = self.pop_decided(gate) {
                return Poll::Ready(Some(out));
            }
            if self.is_done() {
                return Poll::Ready(None);
            }
            progress |= self.drive(gate, ticker, cx);
            let settings = &self.parts.settings;
            let room = settings
                .batch_size
                .saturating_mul(settings.max_in_flight.saturating_add(1));
            if !self.inner_done
                && self.requests.len() < settings.max_in_flight
                && self.queue.len() < room
            {
                progress |= self.fill(gate, ticker, cx, &mut pull, &mut key_of);
            }
            if !progress {
                ticker.waited();
                // The inner stream has registered the task's waker; the calls in flight wake
                // `Wakeup`, which `drive` pointed at the task's waker.
                return Poll::Pending;
            }
        }
    }

    fn pop_decided<G: Gate<K>>(&mut self, gate: &mut G) -> Option<Out<T, K, E>> {
        let front = self.queue.front_mut()?;
        if self.wait_in_order && matches!(front.verdict, Some(Verdict::HeldBack)) {
            // Counted once, as it starts to wait; decided again once its key settles.
            if !self.front_waits {
                gate.count(Fate::HeldBack);
            }
            front.verdict = None;
            self.front_waits = true;
            return None;
        }
        front.verdict.as_ref()?;
        let entry = self.queue.pop_front()?;
        self.front_seq += 1;
        Some(match entry.verdict? {
            Verdict::Accept(claim) => {
                gate.count(Fate::Accepted);
                Out::Emit(entry.item, claim)
            }
            Verdict::Duplicate => {
                gate.count(Fate::Duplicate);
                Out::Duplicate(entry.item)
            }
            Verdict::HeldBack => {
                gate.count(Fate::HeldBack);
                Out::HeldBack(entry.item)
            }
            Verdict::Unchecked(claim) => {
                gate.count(Fate::Unchecked);
                Out::Emit(entry.item, claim)
            }
            Verdict::Pass => Out::Emit(entry.item, None),
            Verdict::Failed(e) => Out::Failed(entry.item, e),
        })
    }

    /// Polls every call in flight if one of them woke the operator (or is new); applies the
    /// answers of those that finished.
    fn drive<G: Gate<K>>(
        &mut self,
        gate: &mut G,
        ticker: &mut Ticker,
        cx: &mut Context<'_>,
    ) -> bool {
        if self.requests.is_empty() {
            return false;
        }
        self.wakeup.register(cx.waker());
        if !self.wakeup.take() {
            return false;
        }
        let waker = Waker::from(Arc::clone(&self.wakeup));
        let mut calls = Context::from_waker(&waker);
        let mut progress = false;
        let mut i = 0;
        while i < self.requests.len() {
            let r = &mut self.requests[i];
            let (backend, settings) = (&self.parts.backend, &self.parts.settings);
            match r.call.poll(&mut calls, backend, settings, &r.encoded) {
                Poll::Pending => i += 1,
                Poll::Ready(result) => {
                    let request = self.requests.swap_remove(i);
                    let now = ticker.now(|| gate.clock());
                    self.resolve(gate, request, result, now);
                    progress = true;
                }
            }
        }
        progress
    }

    fn resolve<G: Gate<K>>(
        &mut self,
        gate: &mut G,
        request: Request<K>,
        result: Result<Vec<Answer>, StoreError>,
        now: Option<Instant>,
    ) {
        let Request {
            keys: request_keys,
            encoded,
            waiters,
            call,
            started,
            ..
        } = request;
        let token = call.token;
        // The call is over: dropping it cancels whatever of it has not started at the store
        // (a store that can), before a take-back below could be overtaken by it.
        drop(call);
        for key in &request_keys {
            self.pending.remove(key);
        }
        let open = self.parts.settings.policy.is_fail_open();
        let claims = self.parts.backend.claims();
        let asked = request_keys.len();
        match &result {
            Ok(answers) => {
                gate.answered(&request_keys, answers, token, now);
                self.parts.log.answered(Kind::Check);
                self.log_answers(answers, started);
            }
            Err(_) => {
                gate.count(Fate::StoreError);
                for key in &request_keys {
                    gate.failed(key, open, token, now);
                }
            }
        }
        // An accepted item takes its key and store bytes from the request (each key has one
        // first copy): a claim commits or releases with them, and a mark is taken back with them
        // if the operator is dropped before it emits the item.
        let mut keys: Vec<Option<(K, Vec<u8>)>> =
            request_keys.into_iter().zip(encoded).map(Some).collect();
        let (mut unchecked, mut failed) = (0, 0);
        for w in waiters {
            let answer = result.as_ref().map(|answers| answers[w.key as usize]);
            let mut claim = || {
                keys.get_mut(w.key as usize)
                    .and_then(Option::take)
                    .map(|(key, bytes)| Held { key, token, bytes })
            };
            let verdict = match answer {
                // A copy of a key whose first copy was accepted: a duplicate, or with claims
                // (where the first is now in flight, unfinished) held back.
                Ok(Answer::New) if w.copy && claims => Verdict::HeldBack,
                Ok(Answer::New | Answer::Present) if w.copy => Verdict::Duplicate,
                // (A key taken twice cannot happen; its item would be held back, not lost.)
                Ok(Answer::New) if claims => {
                    claim().map_or(Verdict::HeldBack, |c| Verdict::Accept(Some(c)))
                }
                Ok(Answer::New) => Verdict::Accept(claim()),
                Ok(Answer::Present) => Verdict::Duplicate,
                Ok(Answer::InFlight) => Verdict::HeldBack,
                Err(_) if open && w.copy && claims => Verdict::HeldBack,
                Err(_) if open && w.copy => Verdict::Duplicate,
                Err(_) if open && claims => {
                    claim().map_or(Verdict::HeldBack, |c| Verdict::Unchecked(Some(c)))
                }
                Err(_) if open => Verdict::Unchecked(claim()),
                Err(e) => Verdict::Failed((self.parts.convert)(e.clone())),
            };
            match verdict {
                Verdict::Unchecked(_) => unchecked += 1,
                Verdict::Failed(_) => failed += 1,
                _ => {}
            }
            let at = (w.seq - self.front_seq) as usize;
            if let Some(entry) = self.queue.get_mut(at) {
                entry.verdict = Some(verdict);
            }
        }
        if result.is_err() && !open {
            // Fail closed: none of these items is passed on, but the call may have been
            // applied after its timeout. Take its keys back, so that the broker's redelivery is
            // processed (a write still on its way to the store can land after this).
            let back: Vec<_> = keys
                .into_iter()
                .flatten()
                .map(|(_, bytes)| (bytes, token))
                .collect();
            self.parts.backend.take_back(
                back,
                self.parts.settings.timeout,
                Arc::clone(&self.parts.log),
            );
        }
        // Logged once the keys are on their way back.
        if let Err(e) = &result {
            let t = Tally {
                calls: 1,
                keys: asked as u64,
                unchecked,
                failed,
            };
            self.parts.log.check_failed(Kind::Check, t, open, e);
        }
    }

    /// The debug event of a store call that answered.
    fn log_answers(&self, answers: &[Answer], started: Option<Instant>) {
        let Some(started) = started else {
            return;
        };
        let (mut new, mut present, mut in_flight) = (0u64, 0u64, 0u64);
        for a in answers {
            match a {
                Answer::New => new += 1,
                Answer::Present => present += 1,
                Answer::InFlight => in_flight += 1,
            }
        }
        op_event!(
            debug,
            &self.parts.log.origin,
            keys = answers.len(),
            new,
            present,
            in_flight,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "store call answered"
        );
    }

    /// Reads the items the inner stream has ready (up to a batch), decides what memory can,
    /// and sends the rest to the store in one call. Returns whether anything happened.
    fn fill<G, P, KF>(
        &mut self,
        gate: &mut G,
        ticker: &mut Ticker,
        cx: &mut Context<'_>,
        pull: &mut P,
        key_of: &mut KF,
    ) -> bool
    where
        G: Gate<K>,
        P: FnMut(&mut Context<'_>) -> Poll<Option<T>>,
        KF: FnMut(&T) -> Option<K>,
    {
        let now = ticker.now(|| gate.clock());
        let mut batch = Batch::new(self.next_request);
        let mut progress = false;
        for _ in 0..self.parts.settings.batch_size {
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
                Some(key) => self.route(gate, key, seq, now, &mut batch),
            };
            self.queue.push_back(Entry { item, verdict });
        }
        self.launch(batch);
        progress
    }

    /// Decides `key` (of the item at `seq`) from memory, or adds it to `batch` for the store
    /// (`None`: the store's answer will decide). A copy of a key that awaits the store follows
    /// the first copy's answer.
    fn route<G: Gate<K>>(
        &mut self,
        gate: &mut G,
        key: K,
        seq: u64,
        now: Option<Instant>,
        batch: &mut Batch<K>,
    ) -> Option<Verdict<K, E>> {
        if let Some(&(request, index)) = self.pending.get(&key) {
            let waiter = Waiter {
                seq,
                key: index,
                copy: true,
            };
            match self.requests.iter_mut().find(|r| r.id == request) {
                Some(r) => r.waiters.push(waiter),
                None => batch.waiters.push(waiter), // the batch being built
            }
            return None;
        }
        match gate.pre(&key, now, self.parts.clone_key) {
            Pre::Duplicate => Some(Verdict::Duplicate),
            Pre::HeldBack => Some(Verdict::HeldBack),
            Pre::Ask => {
                self.scratch.clear();
                (self.parts.encode)(&key, &mut self.scratch);
                let max = self.parts.settings.max_key_len;
                if self.scratch.len() > max {
                    let e = StoreError::KeyTooLong {
                        len: self.scratch.len(),
                        max,
                    };
                    return Some(self.refuse_key(gate, key, e, now));
                }
                if batch.keys.is_empty() {
                    // Sized once for the batch (items are ready now).
                    let room = self.parts.settings.batch_size.min(256);
                    batch.keys.reserve(room);
                    batch.encoded.reserve(room);
                    batch.waiters.reserve(room);
                }
                let index = batch.keys.len() as u32;
                self.pending
                    .insert((self.parts.clone_key)(&key), (batch.id, index));
                batch.encoded.push(self.scratch.clone());
                batch.keys.push(key);
                batch.waiters.push(Waiter {
                    seq,
                    key: index,
                    copy: false,
                });
                None
            }
        }
    }

    /// Sends `batch` to the store, if it holds any key.
    fn launch(&mut self, batch: Batch<K>) {
        if batch.keys.is_empty() {
            return;
        }
        // A new call is polled (started) by the next `drive`.
        self.wakeup.mark();
        self.requests.push(Request {
            id: batch.id,
            call: Call::start(&self.parts.backend, &self.parts.settings, &batch.encoded),
            keys: batch.keys,
            encoded: batch.encoded,
            waiters: batch.waiters,
            started: tracing::enabled!(target: crate::logging::TARGET, tracing::Level::DEBUG)
                .then(Instant::now),
        });
        self.next_request += 1;
    }

    /// The front item is a copy held back that waits in order: once something settled, it is
    /// decided again (from memory, or by a new store call).
    fn reask_front<G, KF>(&mut self, gate: &mut G, ticker: &mut Ticker, key_of: &mut KF)
    where
        G: Gate<K>,
        KF: FnMut(&T) -> Option<K>,
    {
        let Some(key) = self.queue.front().and_then(|e| key_of(&e.item)) else {
            return;
        };
        let now = ticker.now(|| gate.clock());
        let mut batch = Batch::new(self.next_request);
        let verdict = self.route(gate, key, self.front_seq, now, &mut batch);
        if let Some(front) = self.queue.front_mut() {
            front.verdict = verdict;
        }
        self.launch(batch);
    }

    /// A key the store is not asked about: the failure policy decides, with no retry.
    fn refuse_key<G: Gate<K>>(
        &mut self,
        gate: &mut G,
        key: K,
        e: StoreError,
        now: Option<Instant>,
    ) -> Verdict<K, E> {
        let open = self.parts.settings.policy.is_fail_open();
        let token = Token::new();
        gate.failed(&key, open, token, now);
        let t = Tally {
            calls: 1,
            keys: 1,
            unchecked: u64::from(open),
            failed: u64::from(!open),
        };
        self.parts.log.check_failed(Kind::KeyTooLong, t, open, &e);
        if open {
            let claims = self.parts.backend.claims();
            Verdict::Unchecked(claims.then_some(Held {
                key,
                token,
                bytes: Vec::new(),
            }))
        } else {
            Verdict::Failed((self.parts.convert)(e))
        }
    }
}
