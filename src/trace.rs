//! Recording a trace of your own traffic for the window sweep: `elapsed_ms,key` lines.
//!
//! Put [`record_trace`](TraceStreamExt::record_trace) on the stream your consumer already
//! reads, before `dedup_by_key`. Items pass through unchanged and in order; each item's key is
//! written with the milliseconds since recording started. Replay the file with the window
//! sweep (`cargo run --release -p window-sweep -- --trace trace.csv`, a tool of this
//! repository's workspace) to see which window your traffic needs.
//!
//! Keys can be written hashed ([`TraceWriter::hashed`]): each key's
//! [`Fingerprint`] in hex instead of the key, so the file holds no business
//! data. The sweep needs only to tell keys apart, which fingerprints do.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use futures::{stream, StreamExt};
//! use stream_dedup::trace::{TraceStreamExt, TraceWriter};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> std::io::Result<()> {
//! let deliveries = stream::iter(["order-1", "order-2", "order-1"])
//!     .then(|m| async move {
//!         tokio::time::sleep(Duration::from_millis(20)).await;
//!         m
//!     })
//!     .boxed();
//! // In a consumer: TraceWriter::new(std::fs::File::create("trace.csv")?)
//! let mut recorded = deliveries.record_trace(|m| *m, TraceWriter::new(Vec::new()));
//! let mut seen = Vec::new();
//! while let Some(m) = recorded.next().await {
//!     seen.push(m); // items pass through unchanged
//! }
//! assert_eq!(seen, ["order-1", "order-2", "order-1"]);
//! let (_, writer) = recorded.into_parts();
//! let csv = String::from_utf8(writer.finish()?).unwrap();
//! assert_eq!(csv, "elapsed_ms,key\n20,order-1\n40,order-2\n60,order-1\n");
//! # Ok(())
//! # }
//! ```

use core::fmt::{self, Display, Write as _};
use core::pin::Pin;
use core::task::{Context, Poll};
use std::io::{self, BufWriter, Write};

use futures_core::{FusedStream, Stream};
use pin_project::pin_project;
use tokio::time::Instant;

use crate::fingerprint::Fingerprint;

/// Writes a trace: a header line `elapsed_ms,key`, then one `elapsed_ms,key` line per
/// [`record`](TraceWriter::record), buffered.
///
/// Time is [`tokio::time::Instant`] (the operator's clock) since the writer was created. A key
/// is written with its `Display`; one that contains a `"` is quoted as in CSV (`"a ""b"""`),
/// and one that contains a line break is written hashed, so the file stays one line per
/// delivery.
///
/// Recording never disturbs the traffic: after a write error the writer stops writing and
/// keeps the error for [`error`](TraceWriter::error) and [`finish`](TraceWriter::finish).
///
/// # Examples
///
/// ```
/// use stream_dedup::trace::TraceWriter;
/// use stream_dedup::Fingerprint;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let mut trace = TraceWriter::new(Vec::new()).hashed(true);
/// trace.record("order-1/payment");
/// let text = String::from_utf8(trace.finish().unwrap()).unwrap();
/// assert_eq!(text, format!("elapsed_ms,key\n0,{}\n", Fingerprint::of("order-1/payment")));
/// # }
/// ```
pub struct TraceWriter<W: Write> {
    out: BufWriter<W>,
    start: Instant,
    hashed: bool,
    buf: String,
    lines: u64,
    error: Option<io::Error>,
}

impl<W: Write> fmt::Debug for TraceWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceWriter")
            .field("hashed", &self.hashed)
            .field("lines", &self.lines)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<W: Write> TraceWriter<W> {
    /// A writer to `writer` (buffered here), its clock starting now; keys written as they are.
    pub fn new(writer: W) -> Self {
        let mut out = BufWriter::new(writer);
        let error = out.write_all(b"elapsed_ms,key\n").err();
        TraceWriter {
            out,
            start: Instant::now(),
            hashed: false,
            buf: String::new(),
            lines: 0,
            error,
        }
    }

    /// With `true`, writes each key's [`Fingerprint`] (32 hex digits) instead of the key
    /// (default: `false`).
    pub fn hashed(mut self, hashed: bool) -> Self {
        self.hashed = hashed;
        self
    }

    /// Writes one line: the milliseconds since the writer was created, and `key`.
    pub fn record(&mut self, key: impl Display) {
        if self.error.is_some() {
            return;
        }
        let ms = self.start.elapsed().as_millis();
        self.buf.clear();
        let _ = write!(self.buf, "{key}");
        let result = if self.hashed || self.buf.contains(['\n', '\r']) {
            writeln!(self.out, "{ms},{}", Fingerprint::of(self.buf.as_bytes()))
        } else if self.buf.contains('"') || self.buf.is_empty() {
            writeln!(self.out, "{ms},\"{}\"", self.buf.replace('"', "\"\""))
        } else {
            writeln!(self.out, "{ms},{}", self.buf)
        };
        match result {
            Ok(()) => self.lines += 1,
            Err(e) => self.error = Some(e),
        }
    }

    /// Lines written so far, the header not counted.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// The write error that stopped the recording, if one did.
    pub fn error(&self) -> Option<&io::Error> {
        self.error.as_ref()
    }

    /// Writes out the buffered lines.
    ///
    /// # Errors
    ///
    /// The error that stopped the recording, or the writer's.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.out.flush()
    }

    /// Writes out the buffered lines and returns the writer.
    ///
    /// # Errors
    ///
    /// The error that stopped the recording, or the writer's.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush()?;
        self.out
            .into_inner()
            .map_err(io::IntoInnerError::into_error)
    }
}

/// Adds [`record_trace`](TraceStreamExt::record_trace) to every [`Stream`].
pub trait TraceStreamExt: Stream {
    /// Writes each item's key to `writer` with its time, passing the item through unchanged.
    ///
    /// When the stream ends the writer is flushed; [`RecordTrace::into_parts`] gives it back
    /// to [`finish`](TraceWriter::finish). Writes are buffered and blocking: record to a local
    /// file. See the [module docs](crate::trace) for an example.
    fn record_trace<F, K, W>(self, key_fn: F, writer: TraceWriter<W>) -> RecordTrace<Self, F, W>
    where
        Self: Sized,
        F: FnMut(&Self::Item) -> K,
        K: Display,
        W: Write,
    {
        RecordTrace {
            stream: self,
            key_fn,
            writer,
        }
    }
}

impl<St: Stream + ?Sized> TraceStreamExt for St {}

/// Stream for the [`record_trace`](TraceStreamExt::record_trace) method.
#[pin_project]
#[must_use = "streams do nothing unless polled"]
pub struct RecordTrace<St, F, W: Write> {
    #[pin]
    stream: St,
    key_fn: F,
    writer: TraceWriter<W>,
}

impl<St: fmt::Debug, F, W: Write> fmt::Debug for RecordTrace<St, F, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordTrace")
            .field("stream", &self.stream)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl<St, F, W: Write> RecordTrace<St, F, W> {
    /// The trace writer (to read [`lines`](TraceWriter::lines) or
    /// [`error`](TraceWriter::error) while the stream runs).
    pub fn writer(&self) -> &TraceWriter<W> {
        &self.writer
    }

    /// Acquires a reference to the underlying stream that this combinator is pulling from.
    pub fn get_ref(&self) -> &St {
        &self.stream
    }

    /// Acquires a mutable reference to the underlying stream that this combinator is pulling
    /// from. Items pulled from it directly are not recorded.
    pub fn get_mut(&mut self) -> &mut St {
        &mut self.stream
    }

    /// Acquires a pinned mutable reference to the underlying stream that this combinator is
    /// pulling from. Items pulled from it directly are not recorded.
    pub fn get_pin_mut(self: Pin<&mut Self>) -> Pin<&mut St> {
        self.project().stream
    }

    /// Consumes this combinator, returning the underlying stream (the writer is dropped, which
    /// flushes it and ignores errors; use [`into_parts`](RecordTrace::into_parts) to see them).
    pub fn into_inner(self) -> St {
        self.stream
    }

    /// Consumes this combinator, returning the underlying stream and the trace writer.
    pub fn into_parts(self) -> (St, TraceWriter<W>) {
        (self.stream, self.writer)
    }
}

impl<St, F, K, W> Stream for RecordTrace<St, F, W>
where
    St: Stream,
    F: FnMut(&St::Item) -> K,
    K: Display,
    W: Write,
{
    type Item = St::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<St::Item>> {
        let this = self.project();
        let next = core::task::ready!(this.stream.poll_next(cx));
        match &next {
            Some(item) => this.writer.record((this.key_fn)(item)),
            None => {
                if let Err(e) = this.writer.out.flush() {
                    this.writer.error.get_or_insert(e);
                }
            }
        }
        Poll::Ready(next)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Every item passes through.
        self.stream.size_hint()
    }
}

impl<St, F, K, W> FusedStream for RecordTrace<St, F, W>
where
    St: FusedStream,
    F: FnMut(&St::Item) -> K,
    K: Display,
    W: Write,
{
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that fails after `ok` bytes.
    #[derive(Debug)]
    struct Failing {
        ok: usize,
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::other("disk full"));
            }
            let n = buf.len().min(self.ok);
            self.ok -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn escapes_odd_keys() {
        let mut t = TraceWriter::new(Vec::new());
        t.record("a,b");
        t.record("say \"hi\"");
        t.record("two\nlines");
        t.record("");
        tokio::time::advance(std::time::Duration::from_millis(1500)).await;
        t.record(42);
        assert_eq!(t.lines(), 5);
        let text = String::from_utf8(t.finish().unwrap()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "0,a,b");
        assert_eq!(lines[2], "0,\"say \"\"hi\"\"\"");
        assert_eq!(lines[3], format!("0,{}", Fingerprint::of("two\nlines")));
        assert_eq!(lines[4], "0,\"\"");
        assert_eq!(lines[5], "1500,42");
    }

    #[test]
    fn a_write_error_stops_recording_and_is_kept() {
        let mut t = TraceWriter::new(Failing { ok: 20 });
        for i in 0..10_000 {
            t.record(i);
        }
        assert!(t.error().is_some());
        assert!(t.lines() < 10_000);
        assert_eq!(t.finish().unwrap_err().to_string(), "disk full");
    }
}
