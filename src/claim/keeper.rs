//! Keep-alive: a background task per claim operator renews the leases of its open claims every
//! third of the lease, and beats a [`Heartbeat`] on each round.

use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::core::ClaimCore;

/// The shortest pause between two rounds.
const MIN_EVERY: Duration = Duration::from_millis(1);

/// Starts `core`'s keep-alive task if it keeps leases alive and has none yet (on a tokio
/// runtime; outside one, leases are not renewed).
pub(super) fn ensure_started<K: Hash + Eq + Send + Sync + 'static>(core: &Arc<ClaimCore<K>>) {
    if !core.keep_alive() || core.keeper_started() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if !core.start_keeper() {
        return; // another thread won the race
    }
    let weak = Arc::downgrade(core);
    let every = (core.lease() / 3).max(MIN_EVERY);
    runtime.spawn(async move {
        let mut rounds = tokio::time::interval_at(Instant::now() + every, every);
        rounds.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            rounds.tick().await;
            // Weak: the task ends with the operator and its last claim.
            let Some(core) = weak.upgrade() else {
                break;
            };
            core.renew_open_claims().await;
        }
    });
}

/// The beat of a claim operator's keep-alive: [`tick`](Heartbeat::tick) returns after each
/// round that renewed the leases of its open claims (every third of the lease), so that a
/// consumer extends its broker's ack deadline on the same beat (JetStream's
/// `AckKind::Progress`, SQS's visibility timeout). From [`Claim::heartbeat`](crate::Claim::heartbeat).
///
/// # Examples
///
/// A handler slower than the broker's deadline, telling the broker it is still working:
///
/// ```no_run
/// # async fn handle(_: &str) {}
/// # async fn progress(_: &str) {}
/// # async fn example(claim: stream_dedup::Claim<String>) -> Result<(), stream_dedup::store::StoreError> {
/// let mut beat = claim.heartbeat();
/// let work = handle(&claim);
/// tokio::pin!(work);
/// loop {
///     tokio::select! {
///         () = &mut work => break,
///         Some(()) = beat.tick() => progress(&claim).await, // e.g. msg.ack_with(AckKind::Progress)
///     }
/// }
/// claim.commit().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Heartbeat {
    beats: Option<watch::Receiver<u64>>,
}

impl Heartbeat {
    pub(super) fn new(beats: Option<watch::Receiver<u64>>) -> Self {
        Heartbeat { beats }
    }

    /// Waits for the next round of keep-alive; `None` once there will be none (keep-alive is
    /// off, or the operator and its other claims are gone).
    pub async fn tick(&mut self) -> Option<()> {
        let beats = self.beats.as_mut()?;
        match beats.changed().await {
            Ok(()) => Some(()),
            Err(_) => {
                self.beats = None;
                None
            }
        }
    }
}
