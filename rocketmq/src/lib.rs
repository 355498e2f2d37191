//! A RocketMQ push consumer as a [`Stream`](futures_core::Stream) of deliveries that carry
//! their ack, so that `stream-dedup`'s operators chain onto it.
//!
//! The Rust client (`rocketmq-client-rust`) calls a synchronous listener for every message.
//! [`StreamListener`] is that listener: it sends the message into a [`Deliveries`] stream and
//! waits, bounded by an ack timeout, for the [`Delivery`]'s verdict: [`ack`](Delivery::ack)
//! → `ConsumeSuccess`; [`nack`](Delivery::nack), a dropped delivery or the timeout →
//! `ReconsumeLater` (the broker delivers the message again later, through the group's retry
//! topic).
//!
//! ```no_run
//! use std::time::Duration;
//! use futures::StreamExt;
//! use rocketmq_client_rust::{DefaultMQPushConsumer, MQPushConsumer};
//! use stream_dedup::store::RedisStore;
//! use stream_dedup::{DedupStreamExt, Window};
//! use stream_dedup_rocketmq::{ClientHost, ConsumerOptions, Delivery};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let options = ConsumerOptions::new().concurrency(20).ack_timeout(Duration::from_secs(30));
//! let host = ClientHost::start(&options)?;
//! let (listener, deliveries) = options.channel();
//! let mut consumer = options
//!     .configure(DefaultMQPushConsumer::builder(host.client_runtime()))
//!     .consumer_group("payments")
//!     .name_server_addr("127.0.0.1:9876")
//!     .build();
//! consumer.subscribe("orders", "*").await?;
//! consumer.register_message_listener_concurrently(listener);
//! consumer.start().await?;
//!
//! let store = RedisStore::connect("redis://127.0.0.1:6379", "payments").await?;
//! let window = Window::max_keys(100_000)
//!     .ttl(Duration::from_secs(24 * 3600))
//!     .lease(Duration::from_secs(10))
//!     .store(store);
//! deliveries
//!     // The business key: the producer's KEYS, the same in every redelivery.
//!     .claim_by_key(|d: &Delivery| d.keys().unwrap_or_default().to_owned(), window)
//!     .on_duplicate(|d: Delivery| { d.ack(); })   // done already: ack, or it comes back
//!     .on_held_back(|d: Delivery| { d.nack(); })  // its original still runs: let it come back later
//!     .for_each_concurrent(20, |claim| async move {
//!         // process the payment, then:
//!         if let Ok(delivery) = claim.commit().await {
//!             delivery.ack();
//!         }
//!     })
//!     .await;
//! # Ok(())
//! # }
//! ```
//!
//! # Which key, which mode
//!
//! - **Key**: the message's `KEYS` property ([`Delivery::keys`]), set by the producer from the
//!   business data (`{order}/payment`). It survives every redelivery; the `msg_id` does not (a
//!   message that goes through the retry topic comes back with a new one).
//! - **Mode**: claims (`claim_by_key`). RocketMQ redelivers in three ways, and marking a key
//!   on emit (`dedup_by_key`) loses messages in each:
//!   - a message answered `ReconsumeLater` (a failed handler) comes back after its retry
//!     delay: on emit its key is already marked, and the retry is dropped as a duplicate;
//!   - a message whose handler outlasts the ack timeout, or the client's `consume_timeout`,
//!     is sent back while its original still runs; if the original then fails, its failure is
//!     not sent back again (the client already gave the message up), so the copy is the only
//!     chance to process it;
//!   - offsets are persisted every few seconds (`persist_consumer_offset_interval`, 5 s), so a
//!     consumer killed, or a queue moved to another consumer by a rebalance, replays what was
//!     consumed since: duplicates, and copies whose original is still in flight (or died with
//!     its consumer: on emit its key is marked, and the replay is dropped).
//! - **Duplicates** (`on_duplicate`: the key is done): ack them, or they come back.
//! - **Held-back copies** (`on_held_back`: the original is in flight): nack them, never ack:
//!   if the original fails, the copy is what gets processed.
//! - **Lease**: a few seconds. Keep-alive (`Window::keep_alive`, on by default) renews an open
//!   claim's lease while its handler runs, however long, so a copy that arrives meanwhile is
//!   held back, and a killed consumer's keys free up within one lease, well inside RocketMQ's
//!   first retry delay (10 s).

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms,
    clippy::cast_lossless,
    clippy::semicolon_if_nothing_returned,
    clippy::redundant_closure_for_method_calls
)]
#![doc(test(attr(deny(warnings))))]

mod delivery;
mod host;
mod listener;
mod options;

pub use crate::delivery::Delivery;
pub use crate::host::ClientHost;
pub use crate::listener::{Deliveries, ListenerStats, StatsHandle, StreamListener};
pub use crate::options::ConsumerOptions;
