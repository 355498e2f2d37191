//! Keep-alive: a background task per claim operator renews the leases of its open claims every
//! third of the lease (those held for a quarter of it or more: the others are not due yet), and
//! beats a [`Heartbeat`] on each round.

use std::future::Future;
use std::pin::Pin;
use std::sync::Weak;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

/// The shortest pause between two rounds.
const MIN_EVERY: Duration = Duration::from_millis(1);

/// What keep-alive renews: a claim operator's core, seen through this trait so that the
/// keeper depends on nothing above it.
pub(super) trait Renew: Send + Sync + 'static {
    /// One round: renews the leases of the open claims that are due, then beats.
    fn renew_round(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// Spawns the keep-alive task of `core` on `runtime`: a round every third of `lease`, until
/// `core` is gone.
pub(super) fn spawn(runtime: &tokio::runtime::Handle, core: Weak<dyn Renew>, lease: Duration) {
    let every = (lease / 3).max(MIN_EVERY);
    runtime.spawn(async move {
        let mut rounds = tokio::time::interval_at(Instant::now() + every, every);
        rounds.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            rounds.tick().await;
            // Weak: the task ends with the operator and its last claim.
            let Some(core) = core.upgrade() else {
                break;
            };
            core.renew_round().await;
        }
    });
}

/// The beat of a claim operator's keep-alive: [`tick`](Heartbeat::tick) returns after each
/// round of keep-alive, every third of the lease (whether or not a claim was due), so that a
/// consumer extends its broker's ack deadline on the same beat (JetStream's
/// `AckKind::Progress`, SQS's visibility timeout). From [`Claim::heartbeat`](crate::Claim::heartbeat).
///
/// # Examples
///
/// A handler slower than the broker's deadline, telling the broker it is still working:
///
/// ```no_run
/// # #![allow(dead_code)]
/// # async fn handle(_: &str) {}
/// # async fn progress(_: &str) {}
/// # async fn example(claim: stream_dedup::Claim<String>) -> Result<(), stream_dedup::store::StoreError> {
/// let mut beat = claim.heartbeat();
/// {
///     let work = handle(&claim);
///     tokio::pin!(work);
///     loop {
///         tokio::select! {
///             () = &mut work => break,
///             Some(()) = beat.tick() => progress(&claim).await, // msg.ack_with(AckKind::Progress)
///         }
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
