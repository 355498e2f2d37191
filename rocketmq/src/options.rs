//! How many listener calls wait at once, and for how long.

use std::time::Duration;

use rocketmq_client_rust::DefaultMQPushConsumerBuilder;
use rocketmq_runtime::RuntimeConfig;

use crate::listener::{self, Deliveries, StreamListener};

/// The most listener calls that may wait at once (the client accepts up to 1,000 consume
/// threads; the runtime up to 512 blocking threads, shared with its other lanes).
const MAX_CONCURRENCY: usize = 400;
/// Blocking slots of the listeners' lane beyond `concurrency`, for the client's other calls on
/// it (`consumeMessageDirectly` from the console, transaction checks).
const LANE_HEADROOM: usize = 4;
/// How much longer than the ack timeout the lane lets a call run: the listener returns first.
const LANE_GRACE: Duration = Duration::from_secs(5);
/// The runtime's ceiling on blocking threads (`rocketmq-runtime` 1.0 rejects more).
const MAX_BLOCKING_THREADS: usize = 512;

/// How the push consumer's listener and the client runtime it runs on are sized.
///
/// The client calls the listener on a bounded blocking lane of its runtime
/// (`rocketmq-runtime`'s metadata-I/O lane: by default twice the CPU count, 4 on two cores,
/// with a 30 s limit per call and a 5 s limit in its queue), while the consumer's own limit is
/// `consume_thread_min` (20 by default). A listener that waits for its stream's ack holds a
/// slot of that lane: with the defaults the 5th waiting call queues, and after 5 s fails, and
/// the client answers `ReconsumeLater`: a redelivery that nothing in the consumer asked for.
/// These options size both sides together:
///
/// - [`runtime_config`](ConsumerOptions::runtime_config) (used by
///   [`ClientHost`](crate::ClientHost)) gives the lane `concurrency` slots (plus a few) and
///   lets a call run the ack timeout;
/// - [`configure`](ConsumerOptions::configure) sets the consumer's `consume_thread_min` and
///   `consume_thread_max` to `concurrency`, and its batch size to 1;
/// - [`channel`](ConsumerOptions::channel) makes the listener and its stream.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use stream_dedup_rocketmq::ConsumerOptions;
///
/// let options = ConsumerOptions::new()
///     .concurrency(32)
///     .ack_timeout(Duration::from_secs(60));
/// let config = options.runtime_config("payments");
/// assert!(config.blocking_lane_policies.metadata_io.max_concurrency >= 32);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct ConsumerOptions {
    concurrency: usize,
    ack_timeout: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            concurrency: 20,
            ack_timeout: Duration::from_secs(30),
        }
    }
}

impl ConsumerOptions {
    /// The defaults: 20 listener calls at once (the client's default `consume_thread_min`),
    /// an ack timeout of 30 s.
    pub fn new() -> Self {
        ConsumerOptions::default()
    }

    /// How many listener calls may wait for their ack at once: how many messages the stream
    /// can have out (default: 20).
    ///
    /// # Panics
    ///
    /// If `n` is 0 or above 400.
    #[track_caller]
    pub fn concurrency(mut self, n: usize) -> Self {
        assert!(
            (1..=MAX_CONCURRENCY).contains(&n),
            "ConsumerOptions::concurrency: {n} is not within 1..={MAX_CONCURRENCY}"
        );
        self.concurrency = n;
        self
    }

    /// How long a listener call waits for its delivery's ack, from the moment the client
    /// calls it, before it answers `ReconsumeLater` (default: 30 s).
    ///
    /// This is the consumer's effective consume timeout: a handler slower than this has its
    /// message redelivered while it still runs (with claims, the copy is held back). Keep it
    /// below the consumer's `consume_timeout` (minutes; 15 by default), or the client's
    /// periodic scan sends the message back first, in the same way.
    ///
    /// # Panics
    ///
    /// If `timeout` is zero.
    #[track_caller]
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "ConsumerOptions::ack_timeout: the timeout must be longer than zero"
        );
        self.ack_timeout = timeout;
        self
    }

    /// The configured concurrency.
    pub fn concurrency_limit(&self) -> usize {
        self.concurrency
    }

    /// The configured ack timeout.
    pub fn ack_timeout_duration(&self) -> Duration {
        self.ack_timeout
    }

    /// A `rocketmq-runtime` configuration (the defaults for this machine, named
    /// `thread_name`) whose listener lane has room for `concurrency` waiting calls, each
    /// allowed to run the ack timeout.
    pub fn runtime_config(&self, thread_name: &str) -> RuntimeConfig {
        let mut config = RuntimeConfig {
            thread_name: thread_name.to_owned(),
            ..RuntimeConfig::default()
        };
        let lane = &mut config.blocking_lane_policies.metadata_io;
        let slots = self.concurrency + LANE_HEADROOM;
        let added = slots.saturating_sub(lane.max_concurrency);
        lane.max_concurrency = lane.max_concurrency.max(slots);
        lane.max_queue_depth = lane.max_queue_depth.max(slots);
        lane.task_timeout = lane.task_timeout.max(self.ack_timeout + LANE_GRACE);
        // The lanes share one global budget of blocking threads: grow it by the slots added,
        // and to all the lanes' slots, so that busy other lanes never keep a listener waiting.
        let lanes = &config.blocking_lane_policies;
        let all = lanes.storage_io.max_concurrency
            + lanes.metadata_io.max_concurrency
            + lanes.cpu_crypto.max_concurrency;
        config.max_blocking_threads = (config.max_blocking_threads + added)
            .max(all)
            .min(MAX_BLOCKING_THREADS);
        config
    }

    /// Sets the consumer's `consume_thread_min` and `consume_thread_max` to `concurrency`
    /// (the client runs at most `consume_thread_min` listener calls at once) and its batch
    /// size to one message per call.
    pub fn configure(&self, builder: DefaultMQPushConsumerBuilder) -> DefaultMQPushConsumerBuilder {
        // Within the client's 1..=1000: `concurrency` is at most 400.
        let threads = u32::try_from(self.concurrency).unwrap_or(u32::MAX);
        builder
            .consume_thread_min(threads)
            .consume_thread_max(threads)
            .consume_message_batch_max_size(1)
    }

    /// The listener to register on the consumer, and the stream of its deliveries.
    ///
    /// The channel between them holds `concurrency` deliveries: every listener call that
    /// waits has room for its message, so a call never waits to send, only for its verdict.
    pub fn channel(&self) -> (StreamListener, Deliveries) {
        listener::channel(self.concurrency, self.ack_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_lane_has_room_for_every_waiting_call() {
        let options = ConsumerOptions::new()
            .concurrency(64)
            .ack_timeout(Duration::from_secs(200));
        let config = options.runtime_config("test");
        let lane = &config.blocking_lane_policies.metadata_io;
        assert_eq!(lane.max_concurrency, 64 + LANE_HEADROOM);
        assert!(lane.max_queue_depth >= 64 + LANE_HEADROOM);
        assert_eq!(lane.task_timeout, Duration::from_secs(205));
        let lanes = &config.blocking_lane_policies;
        let total = lanes.storage_io.max_concurrency
            + lanes.metadata_io.max_concurrency
            + lanes.cpu_crypto.max_concurrency;
        assert!(
            config.max_blocking_threads >= total.min(MAX_BLOCKING_THREADS),
            "{} blocking threads for {total} lane slots",
            config.max_blocking_threads
        );
        config.validate().expect("a valid runtime configuration");
    }

    #[test]
    #[should_panic(expected = "ConsumerOptions::concurrency: 0 is not within 1..=400")]
    fn zero_concurrency_panics() {
        let _ = ConsumerOptions::new().concurrency(0);
    }

    #[test]
    #[should_panic(expected = "ConsumerOptions::ack_timeout")]
    fn a_zero_ack_timeout_panics() {
        let _ = ConsumerOptions::new().ack_timeout(Duration::ZERO);
    }
}
