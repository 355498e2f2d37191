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
//! # Logging
//!
//! The operators emit [`tracing`] events with the target `stream_dedup`; your subscriber picks
//! what to keep (with `tracing-subscriber`: `RUST_LOG=stream_dedup=info`). With no subscriber
//! interested, an event costs a check of one flag. The in-memory path (no store) emits none.
//!
//! **Warnings** mark a failure that weakens a guarantee. They are rate-limited per operator and
//! kind: the first at once, then at most one every 10 seconds, each counting everything since
//! the one before (an outage logs a few lines, not one per item). The end of a run of failures
//! is said once, at `info` ("the store answers again", with what the last warning did not
//! count), and an operator that ends logs what it still held back.
//!
//! | `kind` | when | what it means |
//! |---|---|---|
//! | `check` | a store call (insert, claim) failed for good, after its retries | fail open: `unchecked` items passed without a check, a duplicate among them may be processed; fail closed: `failed` items were withheld (yielded as errors) |
//! | `key_too_long` | a key was longer than the store takes | as `check`, for that one item |
//! | `commit` | a batch of commits failed | those claims are released, their commits return the error |
//! | `commit_lost` | the store refused commits | the lease ran out and another claim took the key: its effect may run twice |
//! | `release` | releases failed | the keys stay in flight until their lease ends; their redeliveries are held back meanwhile |
//! | `renew` | a keep-alive round failed | the open claims' leases were not renewed: they run out unless a later round succeeds |
//! | `renew_lost` | keep-alive found keys taken by another claim | those claims are lost; their commits will fail |
//! | `take_back` | giving back the keys of items read ahead but never handed out (an operator dropped, a call failed for good) failed | those keys stay marked until their ttl (or lease) ends: their redeliveries are dropped, or held back, until then |
//!
//! `PostgresStore` also warns when it finds a connection lost and sends the statement again
//! on another one (fields `operation`, `attempt`, `connections_lost`; at most one line per 10
//! seconds). `PostgresStore` and `MySqlStore` warn when a round of their background purge
//! fails (at most one line per purge interval). redis-rs reconnects by itself without telling: a Redis outage shows as `check`
//! warnings, then "the store answers again".
//!
//! **Debug** events, one per batch: "store call answered" (`keys`, `new`, `present`,
//! `in_flight`, `elapsed_ms`), "commits answered" (`commits`, `committed`, `lost`,
//! `elapsed_ms`), and one per keep-alive round (`renewed`, `lost`).
//!
//! **Fields** to filter on: `window` ([`Window::name`]), `store` (the store's type name without
//! its path: `RedisStore`, `PostgresStore`, …), `namespace`
//! ([`Store::namespace`](store::Store::namespace), when the store has one), `kind`, and the
//! counts `calls`, `keys`, `unchecked`, `failed`; `error` is the store error's message. No
//! event carries a key's bytes (keys can hold personal data), a URL or a password; the crate's
//! stores put neither in their error messages (a store of your own answers for its own).
//!
//! # Feature flags
//!
//! | Feature | Description | Default |
//! |---|---|---|
//! | `uuid` | [`StoreKey`](store::StoreKey) for `uuid::Uuid` | no |
//! | `redis` | `store::RedisStore`: a store on Redis ≥ 7.0 or Redis Cluster, shared by consumers on many machines (redis-rs, tokio) | no |
//! | `redis-tls` | `rediss://` URLs for `store::RedisStore`: redis-rs's rustls support with the ring provider and the system's root certificates; implies `redis` | no |
//! | `postgres` | `store::PostgresStore`: a store in a PostgreSQL table, for consumers whose business data lives there (sqlx 0.8, tokio); sqlx re-exported as `stream_dedup::sqlx` | no |
//! | `mysql` | `store::MySqlStore`: a store in a MySQL 8 / MariaDB table, for consumers whose business data lives there (sqlx 0.8, tokio); sqlx re-exported as `stream_dedup::sqlx` | no |
//! | `testing` | `stream_dedup::testing`: the store conformance suite (`store_suite!`, `claim_suite!`), to prove a store of your own | no |
//! | `trace` | `stream_dedup::trace`: `record_trace` / `TraceWriter`, to record `elapsed_ms,key` lines from a live stream for the window sweep (`window-sweep`, a tool of this repository's workspace); no extra dependency | no |
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

// The layers, bottom to top, are in ARCHITECTURE.md; each imports only from those below it.
mod adapter;
mod attach;
mod claim;
mod ext;
mod fingerprint;
mod hook;
mod logging;
mod pipeline;
pub mod stats;
pub mod store;
/// The sqlx this crate was built with, so that your transactions and pools are the very types
/// the SQL stores take.
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "mysql"))))]
pub use sqlx;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
#[cfg(feature = "trace")]
#[cfg_attr(docsrs, doc(cfg(feature = "trace")))]
pub mod trace;
mod window;

pub use self::adapter::{
    ClaimByKey, ClaimVerdicts, DedupByKey, HeldBack, TryClaimByKey, TryClaimVerdicts,
    TryDedupByKey, Verdict,
};
pub use self::attach::{IntoClaimWindow, IntoWindow};
pub use self::claim::{Claim, CommitError, Heartbeat};
pub use self::ext::{DedupStreamExt, TryDedupStreamExt};
pub use self::fingerprint::Fingerprint;
pub use self::hook::{DropDuplicates, OnDuplicate};
pub use self::pipeline::{DEFAULT_STORE_TTL, FailurePolicy, MAX_BACKOFF, StoreWindow};
pub use self::stats::{Stats, StatsSnapshot};
pub use self::window::{MAX_SPAN, Policy, SharedWindow, Window, WindowSet};
