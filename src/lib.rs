//! Drop redelivered messages from async streams, inline.
//!
//! Message brokers (Kafka, RocketMQ, NATS JetStream, RabbitMQ, SQS) deliver **at least
//! once**: a lost ACK or a consumer slower than the ack deadline makes the broker send a
//! message again. `stream-dedup` drops those repeats before your processing sees them, with
//! one stream operator and bounded memory:
//!
//! ```
//! use std::time::Duration;
//! use futures::{stream, StreamExt};
//! use stream_dedup::{DedupStreamExt, Window};
//!
//! #[derive(Debug, PartialEq)]
//! struct Msg {
//!     order: u64,
//!     action: &'static str,
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let deliveries = stream::iter([
//!     Msg { order: 12345, action: "payment" },
//!     Msg { order: 12346, action: "payment" },
//!     Msg { order: 12345, action: "payment" }, // redelivered: its ACK was lost
//! ]);
//! let window = Window::max_keys(100_000).ttl(Duration::from_secs(300));
//! let mut unique = deliveries
//!     .dedup_by_key(|m| (m.order, m.action), window)
//!     .on_duplicate(|m| println!("dropped a redelivery of {m:?}"));
//!
//! while let Some(msg) = unique.next().await {
//!     println!("processing {msg:?}");
//! }
//! assert_eq!(unique.stats().duplicates(), 1);
//! # }
//! ```
//!
//! - [`DedupStreamExt::dedup_by_key`] on every [`Stream`](futures_core::Stream) and
//!   [`TryDedupStreamExt::try_dedup_by_key`] on every
//!   [`TryStream`](futures_core::TryStream) (`Err` items pass through untouched). Items pass
//!   through unchanged and in order.
//! - The [`Window`] is always bounded: at most [`max_keys`](Window::max_keys) keys, least
//!   recently seen forgotten first, and optionally a [`ttl`](Window::ttl) from first
//!   acceptance. Memory never grows with the length of the stream.
//! - Dropped duplicates go to an [`on_duplicate`](DedupByKey::on_duplicate) hook, where a
//!   consumer acks them.
//! - Counters ([`Stats`]) readable while the stream runs, and the same through the
//!   [`metrics`] facade (names in [`stats`]).
//! - One window can serve several streams: [`Window::shared`].
//! - Long keys can be replaced by a stable 128-bit [`Fingerprint`].
//!
//! Use a **business key** that survives a failure (order + action), not the broker's delivery
//! id, which changes on every redelivery.
//!
//! # Time
//!
//! Ttls are measured with [`tokio::time::Instant`], so `tokio::time::pause()` drives them in
//! tests. The clock is read for every item, except that a busy stream (items less than ~100 µs
//! apart, none waited for) shares one reading over runs of up to 64 items; see [`Window::ttl`]. The operators need no tokio runtime to run
//! (any executor polls them), and inside one they spend tokio's cooperative budget on each
//! dropped item, so a long run of duplicates never starves the other tasks.
//!
//! # Feature flags
//!
//! | Feature | Description | Default |
//! |---|---|---|
//! | `uuid` | [`StoreKey`](store::StoreKey) for `uuid::Uuid` | no |
//! | `redis` | `store::RedisStore`: a store on Redis ≥ 7.0 or Redis Cluster, shared by consumers on many machines (redis-rs, tokio) | no |
//! | `trace` | [`trace`]: `record_trace` / `TraceWriter`, to record `elapsed_ms,key` lines from a live stream (no extra dependency) | no |
//! | `sweep` | [`sweep`]: replay a synthetic broker or a recorded trace through a grid of windows on a paused clock; table, CSV, SVG plot (tokio `test-util`, serde_json, plotters; clap and cap for `examples/window_sweep.rs`); implies `trace` | no |
//! | `mysql` | `store::MySqlStore`: a store in a MySQL 8 / MariaDB table (sqlx, tokio), claims, and `commit_in` inside the application's transaction; re-exports [`sqlx`] | no |
//! | `embedded` | `store::EmbeddedStore`: a store in a local directory that survives restarts (fjall; needs Rust 1.90) | no |
//!
//! # Minimum supported Rust version
//!
//! Rust 1.85 (edition 2024).

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
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod macros;

mod claim;
mod claim_by_key;
mod dedup_by_key;
mod ext;
mod fingerprint;
mod hook;
pub mod stats;
pub mod store;
mod stored;
mod try_claim_by_key;
mod try_dedup_by_key;
mod window;

pub use self::claim::Claim;
pub use self::claim_by_key::ClaimByKey;
#[cfg(feature = "sweep")]
#[cfg_attr(docsrs, doc(cfg(feature = "sweep")))]
pub mod sweep;
#[cfg(feature = "trace")]
#[cfg_attr(docsrs, doc(cfg(feature = "trace")))]
pub mod trace;

pub use self::dedup_by_key::DedupByKey;
pub use self::ext::{DedupStreamExt, TryDedupStreamExt};
pub use self::fingerprint::Fingerprint;
pub use self::hook::{DropDuplicates, OnDuplicate};
pub use self::stats::{Stats, StatsSnapshot};
pub use self::stored::{FailurePolicy, StoreWindow};
pub use self::try_claim_by_key::TryClaimByKey;
pub use self::try_dedup_by_key::TryDedupByKey;
pub use self::window::{IntoClaimWindow, IntoWindow, SharedWindow, Window, WindowSet};

#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use sqlx;
