//! The client's listener and the stream it feeds.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use rocketmq_client_rust::{
    ClientResult, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus,
    MessageListenerConcurrently,
};
use rocketmq_model::common::message::message_ext::MessageExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

use crate::delivery::{Delivery, Verdict};

/// The listener to register on a `DefaultMQPushConsumer`
/// (`register_message_listener_concurrently`): it sends every message into its
/// [`Deliveries`] stream and waits for the verdict.
///
/// The client calls it on a blocking thread of its runtime, one call per batch of messages
/// (one message with the default batch size). It returns `ConsumeSuccess` once every message
/// of the batch is [acked](Delivery::ack), and `ReconsumeLater` as soon as one is nacked or
/// dropped, when the [ack timeout](crate::ConsumerOptions::ack_timeout) passes, or when the
/// stream is gone.
///
/// Made by [`ConsumerOptions::channel`](crate::ConsumerOptions::channel).
pub struct StreamListener {
    tx: mpsc::Sender<Delivery>,
    ack_timeout: Duration,
    counters: Arc<Counters>,
}

/// A stream of the push consumer's [`Delivery`]s, each carrying its ack; any `stream-dedup`
/// operator chains onto it.
///
/// Made by [`ConsumerOptions::channel`](crate::ConsumerOptions::channel). A delivery whose
/// listener stopped waiting before the stream yielded it (its ack timeout passed while it sat
/// in the channel: the broker will deliver it again) is skipped and counted in
/// [`ListenerStats::skipped`]. The stream ends when the listener is dropped (the consumer shut
/// down).
#[must_use = "streams do nothing unless polled"]
pub struct Deliveries {
    rx: mpsc::Receiver<Delivery>,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    succeeded: AtomicU64,
    reconsumed: AtomicU64,
    timed_out: AtomicU64,
    skipped: AtomicU64,
}

/// What the listener did so far, counted per listener call (a batch of messages, one message
/// with the default batch size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListenerStats {
    /// Messages sent into the stream.
    pub delivered: u64,
    /// Calls answered `ConsumeSuccess`.
    pub succeeded: u64,
    /// Calls answered `ReconsumeLater` (nacked, dropped, timed out or no stream).
    pub reconsumed: u64,
    /// Of `reconsumed`: calls whose ack timeout passed.
    pub timed_out: u64,
    /// Deliveries the stream skipped because their listener had stopped waiting.
    pub skipped: u64,
}

pub(crate) fn channel(capacity: usize, ack_timeout: Duration) -> (StreamListener, Deliveries) {
    let (tx, rx) = mpsc::channel(capacity);
    let counters = Arc::new(Counters::default());
    let listener = StreamListener {
        tx,
        ack_timeout,
        counters: counters.clone(),
    };
    (listener, Deliveries { rx, counters })
}

impl StreamListener {
    /// Sends `messages` into the stream and waits for their verdicts, at most until the ack
    /// timeout. `true` if every message was acked.
    fn deliver(&self, messages: &[&MessageExt]) -> bool {
        let deadline = Instant::now() + self.ack_timeout;
        // The client calls listeners on its runtime's blocking pool, whose threads know their
        // runtime: wait on it, with its timer. Called anywhere else, there is nothing to wait
        // with, and the messages come back later.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let wait = async {
            let mut verdicts = Vec::with_capacity(messages.len());
            for message in messages {
                let (delivery, verdict) = Delivery::new((*message).clone());
                if self.tx.send(delivery).await.is_err() {
                    return false; // the stream is gone
                }
                self.counters.delivered.fetch_add(1, Relaxed);
                verdicts.push(verdict);
            }
            for verdict in verdicts {
                if verdict.await != Ok(Verdict::Ack) {
                    return false; // nacked, or dropped unanswered
                }
            }
            true
        };
        match runtime.block_on(timeout_at(deadline, wait)) {
            Ok(acked) => acked,
            Err(_elapsed) => {
                self.counters.timed_out.fetch_add(1, Relaxed);
                false
            }
        }
    }
}

impl MessageListenerConcurrently for StreamListener {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        Ok(if self.deliver(msgs) {
            self.counters.succeeded.fetch_add(1, Relaxed);
            ConsumeConcurrentlyStatus::ConsumeSuccess
        } else {
            self.counters.reconsumed.fetch_add(1, Relaxed);
            ConsumeConcurrentlyStatus::ReconsumeLater
        })
    }
}

impl Deliveries {
    /// What the listener did so far.
    pub fn stats(&self) -> ListenerStats {
        self.counters.snapshot()
    }

    /// A handle that reads the same counters after the stream was moved into an operator.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.counters.clone())
    }

    /// Stops accepting deliveries: the listener answers every later call `ReconsumeLater` at
    /// once. The deliveries already in the channel are still yielded.
    pub fn close(&mut self) {
        self.rx.close();
    }
}

impl Stream for Deliveries {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            match self.rx.poll_recv(cx) {
                // Its listener gave up: the broker delivers the message again; processing
                // this copy now would race that one.
                Poll::Ready(Some(delivery)) if !delivery.is_waiting() => {
                    self.counters.skipped.fetch_add(1, Relaxed);
                    drop(delivery.into_message());
                }
                other => return other,
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Queued deliveries may be skipped, and the consumer delivers until it shuts down.
        (0, None)
    }
}

/// Reads a [`Deliveries`] stream's [`ListenerStats`] from anywhere.
#[derive(Debug, Clone)]
pub struct StatsHandle(Arc<Counters>);

impl StatsHandle {
    /// What the listener did so far.
    pub fn get(&self) -> ListenerStats {
        self.0.snapshot()
    }
}

impl Counters {
    fn snapshot(&self) -> ListenerStats {
        ListenerStats {
            delivered: self.delivered.load(Relaxed),
            succeeded: self.succeeded.load(Relaxed),
            reconsumed: self.reconsumed.load(Relaxed),
            timed_out: self.timed_out.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
        }
    }
}

impl fmt::Debug for StreamListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamListener")
            .field("ack_timeout", &self.ack_timeout)
            .field("stats", &self.counters.snapshot())
            .finish()
    }
}

impl fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deliveries")
            .field("queued", &self.rx.len())
            .field("stats", &self.counters.snapshot())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use rocketmq_model::common::message::message_queue::MessageQueue;
    use rocketmq_model::common::message::message_single::Message;

    use super::*;

    fn message(keys: &str) -> MessageExt {
        let mut m = MessageExt::default();
        m.set_message_inner(
            Message::builder()
                .topic("orders")
                .key(keys)
                .body_slice(b"{}")
                .build_unchecked(),
        );
        m
    }

    /// Calls the listener as the client does: on a blocking thread of a runtime.
    async fn call(listener: &Arc<StreamListener>, keys: &[&str]) -> ConsumeConcurrentlyStatus {
        let listener = listener.clone();
        let messages: Vec<MessageExt> = keys.iter().map(|k| message(k)).collect();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&MessageExt> = messages.iter().collect();
            let context = ConsumeConcurrentlyContext::new(MessageQueue::default());
            listener
                .consume_message(&refs, &context)
                .expect("the listener never fails")
        })
        .await
        .expect("the listener call")
    }

    #[tokio::test]
    async fn each_verdict_becomes_the_listeners_answer() {
        let (listener, mut deliveries) = channel(4, Duration::from_secs(10));
        let listener = Arc::new(listener);
        let answers = tokio::spawn({
            let listener = listener.clone();
            async move {
                let mut answers = Vec::new();
                for keys in ["acked", "nacked", "dropped"] {
                    answers.push(call(&listener, &[keys]).await);
                }
                answers
            }
        });
        for _ in 0..3 {
            let d = deliveries.next().await.expect("a delivery");
            match d.keys() {
                Some("acked") => assert!(d.ack()),
                Some("nacked") => assert!(d.nack()),
                _ => drop(d),
            }
        }
        use ConsumeConcurrentlyStatus::{ConsumeSuccess, ReconsumeLater};
        assert_eq!(
            answers.await.expect("the calls"),
            [ConsumeSuccess, ReconsumeLater, ReconsumeLater]
        );
        let stats = deliveries.stats();
        assert_eq!(
            (stats.delivered, stats.succeeded, stats.reconsumed),
            (3, 1, 2)
        );
    }

    #[tokio::test]
    async fn a_batch_succeeds_only_when_every_message_is_acked() {
        let (listener, mut deliveries) = channel(4, Duration::from_secs(10));
        let listener = Arc::new(listener);
        let all = tokio::spawn({
            let listener = listener.clone();
            async move { call(&listener, &["a", "b"]).await }
        });
        deliveries.next().await.expect("a").ack();
        deliveries.next().await.expect("b").ack();
        assert_eq!(
            all.await.expect("the call"),
            ConsumeConcurrentlyStatus::ConsumeSuccess
        );

        let one_nacked = tokio::spawn({
            let listener = listener.clone();
            async move { call(&listener, &["c", "d"]).await }
        });
        deliveries.next().await.expect("c").ack();
        deliveries.next().await.expect("d").nack();
        assert_eq!(
            one_nacked.await.expect("the call"),
            ConsumeConcurrentlyStatus::ReconsumeLater
        );
    }

    #[tokio::test]
    async fn past_the_ack_timeout_the_listener_answers_reconsume_later_and_the_copy_is_skipped() {
        let (listener, mut deliveries) = channel(4, Duration::from_millis(200));
        let listener = Arc::new(listener);
        // Nobody reads the stream while the call waits.
        let status = call(&listener, &["slow"]).await;
        assert_eq!(status, ConsumeConcurrentlyStatus::ReconsumeLater);
        assert_eq!(deliveries.stats().timed_out, 1);
        // The stale delivery is skipped; the next one is yielded.
        let next = tokio::spawn({
            let listener = listener.clone();
            async move { call(&listener, &["next"]).await }
        });
        let d = deliveries.next().await.expect("a delivery");
        assert_eq!(d.keys(), Some("next"));
        assert!(d.ack());
        assert_eq!(
            next.await.expect("the call"),
            ConsumeConcurrentlyStatus::ConsumeSuccess
        );
        assert_eq!(deliveries.stats().skipped, 1);
    }

    #[tokio::test]
    async fn without_a_stream_every_call_is_reconsumed_later() {
        let (listener, deliveries) = channel(4, Duration::from_secs(10));
        drop(deliveries);
        let status = call(&Arc::new(listener), &["orphan"]).await;
        assert_eq!(status, ConsumeConcurrentlyStatus::ReconsumeLater);
    }

    #[test]
    fn called_outside_a_runtime_the_listener_answers_reconsume_later() {
        let (listener, _deliveries) = channel(4, Duration::from_secs(10));
        let m = message("k");
        let context = ConsumeConcurrentlyContext::new(MessageQueue::default());
        let status = listener.consume_message(&[&m], &context).expect("no error");
        assert_eq!(status, ConsumeConcurrentlyStatus::ReconsumeLater);
    }

    #[tokio::test]
    async fn the_stream_ends_when_the_listener_is_dropped() {
        let (listener, mut deliveries) = channel(4, Duration::from_secs(10));
        drop(listener);
        assert!(deliveries.next().await.is_none());
    }
}
