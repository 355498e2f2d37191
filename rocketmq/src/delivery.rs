//! One delivered message and its pending verdict.

use std::fmt;

use rocketmq_model::common::message::message_ext::MessageExt;
use tokio::sync::oneshot;

/// What the consumer answers for a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Consumed: the listener returns `ConsumeSuccess`.
    Ack,
    /// Not consumed: the listener returns `ReconsumeLater`.
    Nack,
}

/// A message delivered by the push consumer, carrying its ack.
///
/// The client's listener waits while the delivery is out: [`ack`](Delivery::ack) makes it
/// return `ConsumeSuccess`; [`nack`](Delivery::nack), dropping the delivery unanswered, or
/// the [ack timeout](crate::ConsumerOptions::ack_timeout) passing makes it return
/// `ReconsumeLater`, and the broker delivers the message again later (through the group's
/// retry topic, after a delay that grows with each attempt).
///
/// The business key to deduplicate on is [`keys`](Delivery::keys) (the producer's `KEYS`
/// property): it is the same in every redelivery, while [`msg_id`](MessageExt::msg_id) is
/// new each time a message goes through the retry topic.
#[must_use = "a delivery dropped unanswered is redelivered: ack or nack it"]
pub struct Delivery {
    message: MessageExt,
    verdict: Option<oneshot::Sender<Verdict>>,
}

impl Delivery {
    pub(crate) fn new(message: MessageExt) -> (Delivery, oneshot::Receiver<Verdict>) {
        let (tx, rx) = oneshot::channel();
        let delivery = Delivery {
            message,
            verdict: Some(tx),
        };
        (delivery, rx)
    }

    /// The message.
    pub fn message(&self) -> &MessageExt {
        &self.message
    }

    /// The message's `KEYS` property (the producer's keys, space-separated when there are
    /// several), if it has one: the business key, the same in every redelivery.
    pub fn keys(&self) -> Option<&str> {
        self.message.properties().get("KEYS").map(AsRef::as_ref)
    }

    /// How many times the message went back to the broker before this delivery (0 for a
    /// first delivery, and for a replay from an unpersisted offset).
    pub fn reconsume_times(&self) -> i32 {
        self.message.reconsume_times()
    }

    /// Whether the listener still waits for this delivery's verdict (`false` once the ack
    /// timeout passed: the broker will deliver the message again).
    pub fn is_waiting(&self) -> bool {
        self.verdict.as_ref().is_some_and(|tx| !tx.is_closed())
    }

    /// Acks the message: the listener returns `ConsumeSuccess` (with a batch, once every
    /// message of it is acked). Returns `false` if the listener no longer waited (its ack
    /// timeout passed, or the consumer shut down): the broker will deliver the message again.
    pub fn ack(mut self) -> bool {
        self.answer(Verdict::Ack)
    }

    /// Asks for a redelivery: the listener returns `ReconsumeLater`, and the broker delivers
    /// the message again after its retry delay. Returns `false` if the listener no longer
    /// waited (the message will be delivered again anyway).
    pub fn nack(mut self) -> bool {
        self.answer(Verdict::Nack)
    }

    /// Gives the message back without answering: as a drop, the listener returns
    /// `ReconsumeLater`.
    pub fn into_message(mut self) -> MessageExt {
        self.verdict = None;
        std::mem::take(&mut self.message)
    }

    fn answer(&mut self, verdict: Verdict) -> bool {
        self.verdict
            .take()
            .is_some_and(|tx| tx.send(verdict).is_ok())
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.message.topic().as_str())
            .field("keys", &self.keys())
            .field("msg_id", &self.message.msg_id().as_str())
            .field("queue_id", &self.message.queue_id())
            .field("queue_offset", &self.message.queue_offset())
            .field("reconsume_times", &self.reconsume_times())
            .field("waiting", &self.is_waiting())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocketmq_model::common::message::message_single::Message;

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

    #[test]
    fn ack_and_nack_answer_the_waiting_listener() {
        let (d, mut rx) = Delivery::new(message("12345/payment"));
        assert_eq!(d.keys(), Some("12345/payment"));
        assert!(d.is_waiting());
        assert!(d.ack());
        assert_eq!(rx.try_recv(), Ok(Verdict::Ack));

        let (d, mut rx) = Delivery::new(message("12346/payment"));
        assert!(d.nack());
        assert_eq!(rx.try_recv(), Ok(Verdict::Nack));
    }

    #[test]
    fn a_dropped_delivery_closes_its_verdict_unanswered() {
        let (d, mut rx) = Delivery::new(message("12345/payment"));
        drop(d);
        assert!(rx.try_recv().is_err());
        let (d, mut rx) = Delivery::new(message("12345/payment"));
        let m = d.into_message();
        assert_eq!(m.topic().as_str(), "orders");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn an_answer_after_the_listener_gave_up_reports_false() {
        let (d, rx) = Delivery::new(message("12345/payment"));
        drop(rx);
        assert!(!d.is_waiting());
        assert!(!d.ack());
    }
}
