//! The crate's `tracing` events (documented in the crate docs, "Logging"): what each carries
//! (the window's name, the store, its namespace, counts; never a key), and the limiter that
//! keeps an outage to a few lines instead of one per item.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The target of every event of this crate.
pub(crate) const TARGET: &str = "stream_dedup";

/// At most one warning of a kind per operator (or store) this often; the next one counts
/// what was held back meanwhile.
pub(crate) const EVERY: Duration = Duration::from_secs(10);

/// Where an operator's events come from.
#[derive(Debug)]
pub(crate) struct Origin {
    /// [`Window::name`](crate::Window::name).
    pub(crate) window: Box<str>,
    /// The store's type name without its module path (`RedisStore`, `PostgresStore`).
    pub(crate) store: Box<str>,
    /// [`Store::namespace`](crate::store::Store::namespace), where the store has one.
    pub(crate) namespace: Option<Box<str>>,
}

impl Origin {
    pub(crate) fn new(window: &str, store_type: &str, namespace: Option<&str>) -> Self {
        Origin {
            window: window.into(),
            store: short_type_name(store_type).into(),
            namespace: namespace.map(Into::into),
        }
    }
}

/// `type_name`'s answer without module paths: `a::B<c::D>` is `B<D>`.
pub(crate) fn short_type_name(full: &str) -> String {
    let mut out = String::with_capacity(full.len());
    let mut start = 0;
    for (i, c) in full.char_indices() {
        if !(c.is_alphanumeric() || c == '_' || c == ':') {
            out.push_str(last_segment(&full[start..i]));
            out.push(c);
            start = i + c.len_utf8();
        }
    }
    out.push_str(last_segment(&full[start..]));
    out
}

fn last_segment(path: &str) -> &str {
    path.rsplit("::").next().unwrap_or(path)
}

/// An event of an operator, with the fields every one carries.
macro_rules! op_event {
    ($level:ident, $origin:expr, $($rest:tt)+) => {{
        let origin: &$crate::logging::Origin = $origin;
        tracing::$level!(
            target: $crate::logging::TARGET,
            window = &*origin.window,
            store = &*origin.store,
            namespace = origin.namespace.as_deref(),
            $($rest)+
        )
    }};
}
pub(crate) use op_event;

/// What a run of failures of one kind added up to since its last line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Failed calls (or rounds, or refused commits' batches).
    pub(crate) calls: u64,
    /// Keys in them.
    pub(crate) keys: u64,
    /// Items passed on unchecked (fail open).
    pub(crate) unchecked: u64,
    /// Items withheld (fail closed).
    pub(crate) failed: u64,
}

impl Tally {
    fn add(&mut self, t: Tally) {
        self.calls += t.calls;
        self.keys += t.keys;
        self.unchecked += t.unchecked;
        self.failed += t.failed;
    }
}

/// Rate limit of one kind of warning: the first failure logs at once, then at most one line
/// per [`EVERY`] with everything since the last line; the end of a run of failures logs once
/// (also at most once per `EVERY`) with what was not logged yet.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    warned: Option<Instant>,
    recovered: Option<Instant>,
    pending: Tally,
    failing: bool,
}

fn due(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|last| now.saturating_duration_since(last) >= EVERY)
}

impl Limiter {
    /// Counts a failure; the tally since the last line when a line is due now.
    pub(crate) fn fail(&mut self, now: Instant, t: Tally) -> Option<Tally> {
        self.failing = true;
        self.pending.add(t);
        if due(self.warned, now) {
            self.warned = Some(now);
            Some(std::mem::take(&mut self.pending))
        } else {
            None
        }
    }

    /// A success after failures: what was not logged yet, when a line is due now.
    fn recover(&mut self, now: Instant) -> Option<Tally> {
        if !self.failing || !due(self.recovered, now) {
            return None;
        }
        self.failing = false;
        self.recovered = Some(now);
        Some(std::mem::take(&mut self.pending))
    }

    /// What was not logged yet (at the end).
    fn rest(&mut self) -> Option<Tally> {
        (self.pending.calls > 0).then(|| std::mem::take(&mut self.pending))
    }
}

/// The kinds of warnings an operator rate-limits apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A check (insert or claim) failed for good.
    Check,
    /// A key longer than the store takes.
    KeyTooLong,
    /// A batch of commits failed.
    Commit,
    /// Commits refused: the lease ran out and another claim took the key.
    CommitLost,
    /// Releases failed.
    Release,
    /// A keep-alive round failed.
    Renew,
    /// Keep-alive found keys taken over.
    RenewLost,
    /// Taking back what a dropped operator (or a failed call) had recorded failed.
    TakeBack,
}

const KINDS: usize = 8;

impl Kind {
    /// The `kind` field of its events.
    fn name(self) -> &'static str {
        KIND_NAMES[self as usize]
    }
}

/// One operator's events: its origin, and a limiter per kind of warning. Shared by the
/// operator's driver and its claims' committer; touched only when something failed (a
/// success reads one flag).
#[derive(Debug)]
pub(crate) struct Log {
    pub(crate) origin: Origin,
    limits: [Mutex<Limiter>; KINDS],
    /// Per kind: a run of failures is not over yet (read on every success without a lock).
    failing: [AtomicBool; KINDS],
}

impl Log {
    pub(crate) fn new(origin: Origin) -> Self {
        Log {
            origin,
            limits: Default::default(),
            failing: Default::default(),
        }
    }

    fn limiter(&self, kind: Kind) -> std::sync::MutexGuard<'_, Limiter> {
        self.limits[kind as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a failure of `kind`; the tally to log when a line is due now.
    pub(crate) fn fail(&self, kind: Kind, t: Tally) -> Option<Tally> {
        self.failing[kind as usize].store(true, Ordering::Relaxed);
        self.limiter(kind).fail(Instant::now(), t)
    }

    /// A success of `kind`: after failures, what they left unlogged, when a line is due now.
    pub(crate) fn succeeded(&self, kind: Kind) -> Option<Tally> {
        if !self.failing[kind as usize].load(Ordering::Relaxed) {
            return None;
        }
        let mut limiter = self.limiter(kind);
        let rest = limiter.recover(Instant::now());
        if rest.is_some() {
            self.failing[kind as usize].store(false, Ordering::Relaxed);
        }
        rest
    }

    /// A check (a store call of the driver) failed for good: `unchecked` of its items passed
    /// on unchecked (fail open), `failed` were withheld (fail closed).
    pub(crate) fn check_failed(&self, kind: Kind, t: Tally, open: bool, error: &dyn fmt::Display) {
        let Some(t) = self.fail(kind, t) else {
            return;
        };
        let what = match (kind, open) {
            (Kind::KeyTooLong, true) => {
                "key longer than the store takes: its item passed on unchecked (fail open)"
            }
            (Kind::KeyTooLong, false) => {
                "key longer than the store takes: its item is withheld (fail closed)"
            }
            (_, true) => "store call failed: its items passed on unchecked (fail open)",
            (_, false) => "store call failed: its items are withheld (fail closed)",
        };
        op_event!(
            warn,
            &self.origin,
            kind = kind.name(),
            calls = t.calls,
            keys = t.keys,
            unchecked = t.unchecked,
            failed = t.failed,
            error = %error,
            "{what}"
        );
    }

    /// A store call of `kind` answered: after failures, says so (once per [`EVERY`]).
    pub(crate) fn answered(&self, kind: Kind) {
        if let Some(t) = self.succeeded(kind) {
            op_event!(
                info,
                &self.origin,
                kind = kind.name(),
                calls = t.calls,
                keys = t.keys,
                unchecked = t.unchecked,
                failed = t.failed,
                "the store answers again (the counts: failures since the last warning)"
            );
        }
    }

    /// A failure of the claims' store calls (`Commit`, `Release`, `Renew`), of a take-back
    /// (`TakeBack`), or lost leases (`CommitLost`, `RenewLost`), `keys` keys, rate-limited.
    pub(crate) fn claims_failed(&self, kind: Kind, keys: u64, error: Option<&dyn fmt::Display>) {
        let t = Tally {
            calls: 1,
            keys,
            ..Tally::default()
        };
        let Some(t) = self.fail(kind, t) else {
            return;
        };
        let what = match kind {
            Kind::Commit => "commits failed: their claims are released, and fail",
            Kind::CommitLost => "commits refused: the lease ran out and another claim took the key",
            Kind::Release => "releases failed: the keys stay in flight until their lease ends",
            Kind::Renew => "keep-alive failed: the leases of open claims were not renewed",
            Kind::RenewLost => {
                "leases lost: keep-alive found keys of open claims taken by another claim"
            }
            Kind::TakeBack => {
                "take-backs failed: keys recorded for items never handed out stay marked until \
                 their ttl (or lease) ends"
            }
            Kind::Check | Kind::KeyTooLong => "store call failed",
        };
        match error {
            Some(error) => op_event!(
                warn,
                &self.origin,
                kind = kind.name(),
                calls = t.calls,
                keys = t.keys,
                error = %error,
                "{what}"
            ),
            None => op_event!(
                warn,
                &self.origin,
                kind = kind.name(),
                calls = t.calls,
                keys = t.keys,
                "{what}"
            ),
        }
    }
}

/// The end of the operator: what the limiters held back is logged.
impl Drop for Log {
    fn drop(&mut self) {
        for (i, limiter) in self.limits.iter_mut().enumerate() {
            let limiter = limiter.get_mut().unwrap_or_else(PoisonError::into_inner);
            if let Some(t) = limiter.rest() {
                op_event!(
                    warn,
                    &self.origin,
                    calls = t.calls,
                    keys = t.keys,
                    unchecked = t.unchecked,
                    failed = t.failed,
                    kind = KIND_NAMES[i],
                    "failures since the last warning, as the operator ends"
                );
            }
        }
    }
}

/// [`Kind`]s by index, as the `kind` field names them.
const KIND_NAMES: [&str; KINDS] = [
    "check",
    "key_too_long",
    "commit",
    "commit_lost",
    "release",
    "renew",
    "renew_lost",
    "take_back",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names() {
        assert_eq!(
            short_type_name("stream_dedup::store::redis::RedisStore"),
            "RedisStore"
        );
        assert_eq!(
            short_type_name("faulty::FaultyStore<stream_dedup::store::memory::MemoryStore>"),
            "FaultyStore<MemoryStore>"
        );
        assert_eq!(
            short_type_name("alloc::sync::Arc<dyn a::B + Send>"),
            "Arc<dyn B + Send>"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_of_failures_logs_a_few_lines() {
        let mut l = Limiter::default();
        let one = Tally {
            calls: 1,
            keys: 10,
            unchecked: 10,
            failed: 0,
        };
        assert_eq!(l.fail(Instant::now(), one), Some(one));
        let mut lines = 1;
        for _ in 0..999 {
            tokio::time::advance(Duration::from_millis(50)).await;
            if let Some(t) = l.fail(Instant::now(), one) {
                lines += 1;
                assert!(t.calls > 1, "{t:?}");
            }
        }
        // 50 s of failures: one line at once, then one per 10 s.
        assert_eq!(lines, 5);
        let rest = l.recover(Instant::now()).expect("a recovery line");
        assert_eq!(rest.keys, rest.calls * 10);
        assert_eq!(l.recover(Instant::now()), None);
        assert_eq!(l.rest(), None);
    }
}
