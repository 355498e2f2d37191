//! The window's clock: tokio time in the window's `u32` units ([`Clock`]), and how an operator
//! reads it ([`Ticker`]). Every operator reads time through a `Ticker`.

use std::time::Duration;

use tokio::time::Instant;

/// Turns a `tokio` [`Instant`] into the window's `u32` time units, monotone, moving its epoch
/// forward (and asking for a rebase of the stamps) long before a `u32` could overflow.
#[derive(Debug)]
pub(super) struct Clock {
    epoch: Instant,
    unit_ms: u64,
    last: u32,
    /// The reading that gave `last`: operators hand the same reading to a run of items.
    last_read: Option<Instant>,
}

/// Stamps are rebased when time passes this many units since the epoch...
const REBASE_AT: u64 = 1 << 31;
/// ...by this much, so a live stamp (younger than the ttl, at most `2^30` units) stays exact.
const REBASE_BY: u32 = 1 << 30;

impl Clock {
    /// Picks a unit of 1 ms, or coarser so that the ttl fits in `2^30` units. Returns the clock
    /// and the ttl in its units.
    pub(super) fn new(ttl: Duration) -> (Clock, u32) {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let unit_ms = ttl_ms.div_ceil(u64::from(REBASE_BY)).max(1);
        let ttl_units = u32::try_from(ttl_ms.div_ceil(unit_ms)).unwrap_or(REBASE_BY);
        let clock = Clock {
            epoch: Instant::now(),
            unit_ms,
            last: 0,
            last_read: None,
        };
        (clock, ttl_units)
    }

    /// `now` in units, and the shift to apply to the stamps (0 if none).
    #[inline]
    pub(super) fn units(&mut self, now: Instant) -> (u32, u32) {
        if self.last_read == Some(now) {
            return (self.last, 0);
        }
        self.last_read = Some(now);
        let elapsed = now.saturating_duration_since(self.epoch);
        let ms = elapsed
            .as_secs()
            .saturating_mul(1000)
            .saturating_add(u64::from(elapsed.subsec_millis()));
        let mut t = if self.unit_ms == 1 {
            ms
        } else {
            ms / self.unit_ms
        };
        let mut shift = 0;
        if t >= REBASE_AT {
            // Everything older than the ttl is gone; move the epoch so that `t` is small again.
            // A stamp older than the shift saturates to 0, which is still older than the ttl.
            let by = t - u64::from(REBASE_BY);
            self.epoch += Duration::from_millis(by.saturating_mul(self.unit_ms));
            t -= by;
            shift = u32::try_from(by).unwrap_or(u32::MAX);
            self.last = self.last.saturating_sub(shift);
        }
        let t = (t as u32).max(self.last);
        self.last = t;
        (t, shift)
    }
}

/// How an operator reads the window's clock (only with a ttl): for every item, except while
/// items keep coming faster than [`Ticker::FAST`] apart, when a reading is reused for a run of
/// up to [`Ticker::MAX_RUN`] items.
///
/// A clock read costs more than its own ~20 ns: it orders the CPU's memory reads around it, so
/// the cache misses of consecutive window updates cannot overlap. Reusing a reading over a run
/// removes most of that cost from a busy stream, and the error stays what the rate allows: a run
/// is only allowed after the previous one took under `FAST`, so an item's time lags by about
/// that much. The run ends early whenever the inner stream has to wait (time may pass while
/// nothing is ready). Two equal readings (a paused tokio clock) always mean one read per item:
/// a test that moves a paused clock between items sees every move.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ticker {
    last: Option<Instant>,
    /// Items that may still use `last`.
    left: u8,
    /// The length of the current run.
    run: u8,
}

impl Ticker {
    /// Readings closer together than this let the next one be reused.
    const FAST: Duration = Duration::from_micros(100);
    /// The longest run of items on one reading.
    const MAX_RUN: u8 = 63;

    /// The time for the next item, from `read` (the window's clock: `None` when it keeps
    /// none) unless a reading can be reused.
    #[inline]
    pub(crate) fn now(&mut self, read: impl FnOnce() -> Option<Instant>) -> Option<Instant> {
        if self.left > 0 {
            self.left -= 1;
            return self.last;
        }
        let now = read()?;
        self.run = match self.last {
            Some(prev) if now > prev && now - prev < Self::FAST => self
                .run
                .saturating_mul(2)
                .saturating_add(1)
                .min(Self::MAX_RUN),
            _ => 0,
        };
        self.left = self.run;
        self.last = Some(now);
        Some(now)
    }

    /// The inner stream had to wait (or the task yielded): read the clock for the next item.
    #[inline]
    pub(crate) fn waited(&mut self) {
        self.left = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_rebases_before_overflow() {
        let (mut clock, ttl) = Clock::new(Duration::from_millis(10));
        assert_eq!(ttl, 10);
        let start = clock.epoch;
        let (t, shift) = clock.units(start + Duration::from_millis(5));
        assert_eq!((t, shift), (5, 0));
        let far = start + Duration::from_millis(REBASE_AT + 7);
        let (t, shift) = clock.units(far);
        assert_eq!(u64::from(t) + u64::from(shift), REBASE_AT + 7);
        assert!(u64::from(t) < REBASE_AT);
        // Monotone: an earlier instant reads as the latest one.
        assert_eq!(clock.units(far - Duration::from_millis(3)).0, t);
    }

    #[test]
    fn long_ttls_use_coarser_units() {
        let (clock, ttl) = Clock::new(Duration::from_secs(365 * 24 * 3600));
        assert!(clock.unit_ms > 1);
        assert!(ttl <= REBASE_BY);
    }

    #[tokio::test(start_paused = true)]
    async fn ticker_reads_a_still_clock_for_every_item() {
        let window = || Some(Instant::now());
        let mut ticker = Ticker::default();
        let t0 = ticker.now(window).expect("a ttl reads the clock");
        for _ in 0..200 {
            // Equal readings never start a run...
            assert_eq!(ticker.now(window), Some(t0));
        }
        // ...so a step of the paused clock is seen by the very next item.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(ticker.now(window), Some(t0 + Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn ticker_reuses_readings_only_while_items_come_fast() {
        let window = || Some(Instant::now());
        let mut ticker = Ticker::default();
        let step = Duration::from_micros(1);
        let mut reads = 0;
        let mut last = None;
        for _ in 0..1_000 {
            tokio::time::advance(step).await;
            let now = ticker.now(window);
            if now != last {
                reads += 1;
                last = now;
            }
        }
        // Runs double up to 64 items a reading: 1 + 2 + 4 + ... then 64 at a time.
        assert!(
            (16..=25).contains(&reads),
            "{reads} readings for 1,000 fast items"
        );
        // The lag is bounded by one run of fast items.
        let lag = tokio::time::Instant::now() - last.expect("read");
        assert!(lag < step * u32::from(Ticker::MAX_RUN + 1), "{lag:?}");

        // A slow pair of readings ends the runs: every item reads again.
        tokio::time::advance(Ticker::FAST).await;
        ticker.waited();
        ticker.now(window);
        for _ in 0..10 {
            tokio::time::advance(Ticker::FAST).await;
            assert_eq!(ticker.now(window), Some(tokio::time::Instant::now()));
        }

        // A wait of the inner stream ends a run at once.
        for _ in 0..100 {
            tokio::time::advance(step).await;
            ticker.now(window);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        ticker.waited();
        assert_eq!(ticker.now(window), Some(tokio::time::Instant::now()));
    }

    #[test]
    fn ticker_never_reads_without_a_ttl() {
        assert_eq!(Ticker::default().now(|| None), None);
    }
}
