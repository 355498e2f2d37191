use std::io;

/// What can go wrong reading a trace or a sweep's CSV, or drawing the plot.
///
/// Every error about a line of input names that line (1-based), so a malformed trace is a
/// message to fix the file, never a panic.
///
/// # Examples
///
/// ```
/// use window_sweep::{SweepError, TraceFormat, Workload};
///
/// let trace = "elapsed_ms,key\n0,order-1\nsoon,order-2\n";
/// let err = Workload::from_trace(trace.as_bytes(), TraceFormat::Auto).unwrap_err();
/// assert_eq!(err.line(), Some(3));
/// assert!(err.to_string().starts_with("line 3:"));
/// assert!(matches!(err, SweepError::Parse { line: 3, .. }));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SweepError {
    /// A line that is not what the format says (a trace line, or a row of a sweep's CSV).
    #[error("line {line}: {reason}")]
    Parse {
        /// The line, counted from 1.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The input could not be read.
    #[error("line {line}: cannot read: {source}")]
    Read {
        /// The line being read, counted from 1.
        line: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The trace holds no event.
    #[error("the trace holds no event")]
    EmptyTrace,
    /// The trace holds more distinct keys than the sweep numbers (`u32::MAX`).
    #[error("the trace holds more than {} distinct keys", u32::MAX)]
    TooManyKeys,
    /// The plot could not be drawn.
    #[error("drawing the plot: {0}")]
    Plot(String),
}

impl SweepError {
    /// The line (counted from 1) that the error is about, if it is about one.
    pub fn line(&self) -> Option<u64> {
        match self {
            SweepError::Parse { line, .. } | SweepError::Read { line, .. } => Some(*line),
            _ => None,
        }
    }

    pub(crate) fn parse(line: u64, reason: impl Into<String>) -> Self {
        SweepError::Parse {
            line,
            reason: reason.into(),
        }
    }
}
