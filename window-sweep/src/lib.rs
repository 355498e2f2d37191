//! Choosing a window for [stream-dedup](stream_dedup): replay a workload through a grid of
//! windows and see, for each, what it lets through and what it costs.
//!
//! A window too small lets redeliveries through; one too large holds memory for nothing. The
//! answer depends on your traffic: how many keys arrive while the broker waits to redeliver
//! (`ack_wait`, backoff, `max_deliver`). A [`Sweep`] measures it instead of guessing:
//!
//! 1. A [`Workload`]: a [`SyntheticBroker`] (at-least-once, with lost ACKs, processing
//!    timeouts, `ack_wait` ± jitter, a redelivery delay and `max_deliver`), or a trace you
//!    recorded from your consumer with
//!    [`record_trace`](stream_dedup::trace::TraceStreamExt::record_trace) (stream-dedup's
//!    `trace` feature) and read with [`Workload::from_trace_file`] (CSV `timestamp,key` or
//!    JSON lines).
//! 2. A grid of `max_keys` ([`log_grid`]) × ttls, replayed through the real operator on a paused
//!    tokio clock: hours of traffic in seconds, each delivery at its recorded time.
//! 3. A [`SweepReport`]: per window, duplicates let through, unique messages wrongly dropped
//!    (must be 0), heap bytes held (counted by your allocator), throughput; as a
//!    [table](SweepReport::table), a [CSV](SweepReport::write_csv), an
//!    [SVG plot](SweepReport::svg), and the [smallest window](SweepReport::recommend) under a
//!    leak target.
//!
//! The `window-sweep` binary (`src/main.rs`) is all of it on the command line, run from the
//! workspace:
//!
//! ```text
//! cargo run --release -p window-sweep -- --help
//! cargo run --release -p window-sweep -- --trace my-consumer.csv
//! ```
//!
//! This crate is a tool of the workspace, not published: its dependencies (plotters, clap,
//! serde_json, and tokio's `test-util` for the paused clock) stay out of the library's build.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use window_sweep::{log_grid, Sweep, SyntheticBroker, Workload};
//!
//! // 50 s of traffic at 2000 messages/s; 2% of ACKs lost, redelivered after 5 s ± 1 s.
//! let broker = SyntheticBroker::new()
//!     .rate(2000.0)
//!     .messages(100_000)
//!     .lost_ack(0.02)
//!     .timeouts(0.0)
//!     .ack_wait(Duration::from_secs(5))
//!     .jitter(Duration::from_secs(1))
//!     .max_deliver(2);
//! let workload = Workload::synthetic(&broker);
//! let report = Sweep::new()
//!     .max_keys(log_grid(1_000, 100_000, 1))
//!     .ttls([None, Some(Duration::from_secs(10))])
//!     .run(&workload);
//! println!("{}", report.table(0.01));
//!
//! // About 12,000 messages arrive in the 6 s a redelivery can take: 10k keys is too few.
//! let pick = report.recommend(0.01).unwrap();
//! assert_eq!(pick.max_keys, 100_000);
//! assert!(report.cells.iter().all(|c| c.wrongly_dropped == 0));
//! ```

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

mod engine;
mod error;
mod plot;
mod report;
mod rng;
mod trace_file;
mod units;
mod workload;

pub use self::engine::{Progress, Sweep};
pub use self::error::SweepError;
pub use self::report::{CellResult, SweepReport};
pub use self::trace_file::TraceFormat;
pub use self::units::{
    format_bytes, format_count, format_duration, format_ttl, log_grid, parse_count, parse_duration,
    parse_grid, parse_ttl,
};
pub use self::workload::{Delivery, KeyKind, SyntheticBroker, Workload, WorkloadSummary};
