//! Reading a recorded trace: `timestamp,key` lines (CSV) or JSON lines.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use super::SweepError;
use super::workload::{Delivery, Workload};

/// The format of a trace file.
///
/// - **CSV**: one `timestamp,key` line per delivery, as
///   [`TraceWriter`](stream_dedup::trace::TraceWriter) writes it. The timestamp is in milliseconds
///   (since any origin: since the recording started, or since the Unix epoch); the key is the
///   rest of the line after the first comma, taken as it is unless it is quoted (`"a ""b"""`).
///   A first line `timestamp,key` or `elapsed_ms,key`, blank lines and lines starting with `#`
///   are skipped.
/// - **JSON lines**: one object per line with a number `timestamp` (or `elapsed_ms`, in
///   milliseconds) and a `key` (a string or a number).
///
/// Events need not be sorted: the sweep sorts them by time (keeping the order of equal times).
///
/// # Examples
///
/// ```
/// use window_sweep::{TraceFormat, Workload};
///
/// let csv = "elapsed_ms,key\n0,a\n5,b\n30000,a\n";
/// let jsonl = r#"{"timestamp": 0, "key": "a"}
/// {"timestamp": 5, "key": "b"}
/// {"timestamp": 30000, "key": "a"}
/// "#;
/// for (text, format) in [(csv, TraceFormat::Csv), (jsonl, TraceFormat::JsonLines), (jsonl, TraceFormat::Auto)] {
///     let w = Workload::from_trace(text.as_bytes(), format).unwrap();
///     assert_eq!((w.summary().messages, w.summary().redeliveries), (2, 1));
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TraceFormat {
    /// JSON lines if the first line that is not blank starts with `{`, CSV otherwise.
    #[default]
    Auto,
    /// `timestamp,key` lines.
    Csv,
    /// One JSON object per line.
    JsonLines,
}

impl Workload {
    /// Reads a recorded trace. Each distinct key becomes a message; a key seen again is a
    /// redelivery of it.
    ///
    /// # Errors
    ///
    /// A [`SweepError`] naming the line for a line that cannot be read or parsed;
    /// [`SweepError::EmptyTrace`] for a trace without events.
    pub fn from_trace(reader: impl BufRead, format: TraceFormat) -> Result<Self, SweepError> {
        Workload::read_trace("trace".to_owned(), reader, format)
    }

    /// Reads a recorded trace from a file (see [`Workload::from_trace`]); [`TraceFormat::Auto`]
    /// also takes a `.jsonl` or `.ndjson` extension for JSON lines.
    ///
    /// # Errors
    ///
    /// As [`Workload::from_trace`]; a file that cannot be opened is a
    /// [`SweepError::Read`] at line 1.
    pub fn from_trace_file(
        path: impl AsRef<Path>,
        format: TraceFormat,
    ) -> Result<Self, SweepError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| SweepError::Read { line: 1, source })?;
        let format = match (format, path.extension().and_then(|e| e.to_str())) {
            (TraceFormat::Auto, Some("jsonl" | "ndjson")) => TraceFormat::JsonLines,
            (f, _) => f,
        };
        Workload::read_trace(
            format!("trace {}", path.display()),
            BufReader::new(file),
            format,
        )
    }

    fn read_trace(
        name: String,
        mut reader: impl BufRead,
        mut format: TraceFormat,
    ) -> Result<Self, SweepError> {
        let mut ids: HashMap<Box<str>, u32> = HashMap::new();
        let mut texts: Vec<Box<str>> = Vec::new();
        let mut events: Vec<(u64, u32)> = Vec::new();
        let mut line = String::new();
        let mut n = 0u64;
        let mut header_allowed = true;
        loop {
            line.clear();
            n += 1;
            match reader.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(source) => return Err(SweepError::Read { line: n, source }),
            }
            let text = line.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() || text.starts_with('#') {
                continue;
            }
            if format == TraceFormat::Auto {
                format = if text.trim_start().starts_with('{') {
                    TraceFormat::JsonLines
                } else {
                    TraceFormat::Csv
                };
            }
            let parsed = match format {
                TraceFormat::JsonLines => parse_json(text, n)?,
                _ => {
                    if header_allowed && is_header(text) {
                        header_allowed = false;
                        continue;
                    }
                    parse_csv(text, n)?
                }
            };
            header_allowed = false;
            let (at, key) = parsed;
            let id = match ids.get(key.as_ref()) {
                Some(&id) => id,
                None => {
                    let id = u32::try_from(texts.len())
                        .ok()
                        .filter(|&id| id < u32::MAX)
                        .ok_or(SweepError::TooManyKeys)?;
                    let key: Box<str> = key.into();
                    ids.insert(key.clone(), id);
                    texts.push(key);
                    id
                }
            };
            events.push((at, id));
        }
        let origin = events
            .iter()
            .map(|e| e.0)
            .min()
            .ok_or(SweepError::EmptyTrace)?;
        let mut deliveries: Vec<Delivery> = events
            .into_iter()
            .map(|(at, message)| Delivery {
                at_ms: at - origin,
                message,
            })
            .collect();
        deliveries.sort_by_key(|d| d.at_ms);
        drop(ids);
        let messages = texts.len() as u32;
        Ok(Workload::build(name, deliveries, messages, Some(texts)))
    }
}

fn is_header(text: &str) -> bool {
    let first = text
        .split(',')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"');
    matches!(first, "timestamp" | "elapsed_ms" | "ts" | "time")
}

fn parse_timestamp(s: &str, line: u64) -> Result<u64, SweepError> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    match s.parse::<f64>() {
        Ok(x) if (0.0..1.8e19).contains(&x) => Ok(x as u64),
        _ => Err(SweepError::parse(
            line,
            format!("the timestamp `{s}` is not a number of milliseconds"),
        )),
    }
}

fn parse_csv(text: &str, line: u64) -> Result<(u64, std::borrow::Cow<'_, str>), SweepError> {
    let Some((ts, key)) = text.split_once(',') else {
        return Err(SweepError::parse(
            line,
            format!("expected `timestamp,key`, found `{}`", shorten(text)),
        ));
    };
    let at = parse_timestamp(ts, line)?;
    let key = unquote(key).ok_or_else(|| {
        SweepError::parse(line, format!("unterminated quoted key `{}`", shorten(key)))
    })?;
    if key.is_empty() {
        return Err(SweepError::parse(line, "the key is empty"));
    }
    Ok((at, key))
}

/// The key as written, or the content of a CSV-quoted key (`""` is one `"`); `None` for a
/// quote that is not closed at the end of the line.
fn unquote(key: &str) -> Option<std::borrow::Cow<'_, str>> {
    let Some(inner) = key.strip_prefix('"') else {
        return Some(key.into());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '"' {
            // Inside quotes a quote is written twice.
            if chars.next() != Some('"') {
                return None;
            }
        }
        out.push(c);
    }
    Some(out.into())
}

fn parse_json(text: &str, line: u64) -> Result<(u64, std::borrow::Cow<'_, str>), SweepError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        SweepError::parse(line, format!("invalid JSON at column {}: {e}", e.column()))
    })?;
    let obj = value.as_object().ok_or_else(|| {
        SweepError::parse(line, "expected a JSON object with `timestamp` and `key`")
    })?;
    let ts = obj
        .get("timestamp")
        .or_else(|| obj.get("elapsed_ms"))
        .ok_or_else(|| SweepError::parse(line, "no `timestamp` field"))?;
    let at = match ts {
        serde_json::Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(ms), _) => ms,
            (None, Some(x)) => parse_timestamp(&x.to_string(), line)?,
            _ => return Err(SweepError::parse(line, "the timestamp is not a number")),
        },
        serde_json::Value::String(s) => parse_timestamp(s, line)?,
        _ => {
            return Err(SweepError::parse(
                line,
                format!("the timestamp `{ts}` is not a number of milliseconds"),
            ));
        }
    };
    let key = match obj.get("key") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(SweepError::parse(
                line,
                format!(
                    "the key `{}` is not a string or a number",
                    shorten(&other.to_string())
                ),
            ));
        }
        None => return Err(SweepError::parse(line, "no `key` field")),
    };
    Ok((at, key.into()))
}

fn shorten(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Workload, SweepError> {
        Workload::from_trace(text.as_bytes(), TraceFormat::Auto)
    }

    #[test]
    fn csv_lines() {
        let w = read("# a comment\ntimestamp,key\n\n1000,a,b\n1005,\"x \"\"y\"\"\"\n1010,a,b\n")
            .unwrap();
        assert_eq!(w.messages(), 2);
        assert_eq!(w.key_text(0), "a,b");
        assert_eq!(w.key_text(1), "x \"y\"");
        let at: Vec<u64> = w.deliveries().iter().map(|d| d.at_ms).collect();
        assert_eq!(at, [0, 5, 10]);
    }

    #[test]
    fn unsorted_times_are_sorted() {
        let w = read("20,a\n10,b\n30,a\n").unwrap();
        let got: Vec<(u64, u32)> = w
            .deliveries()
            .iter()
            .map(|d| (d.at_ms, d.message))
            .collect();
        assert_eq!(got, [(0, 1), (10, 0), (20, 0)]);
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("0,a\n1,b\nnope\n", 3, "expected `timestamp,key`"),
            ("0,a\n\n-5,b\n", 3, "not a number"),
            ("0,a\n1,\n", 2, "empty"),
            ("0,a\n1,\"open\n", 2, "unterminated"),
            ("timestamp,key\nelapsed_ms,key\n", 2, "not a number"),
            (
                "{\"timestamp\":1,\"key\":\"a\"}\n{\"timestamp\":2}\n",
                2,
                "no `key`",
            ),
            (
                "{\"timestamp\":1,\"key\":\"a\"}\n{\"key\":\"b\"}\n",
                2,
                "no `timestamp`",
            ),
            (
                "{\"timestamp\":1,\"key\":\"a\"}\n{oops\n",
                2,
                "invalid JSON",
            ),
            ("{\"timestamp\":1,\"key\":[1]}\n", 1, "not a string"),
            ("[1]\n", 1, "expected `timestamp,key`"),
        ];
        for (text, line, words) in cases {
            let err = read(text).unwrap_err();
            assert_eq!(err.line(), Some(line), "{text:?}: {err}");
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("line {line}: ")), "{msg}");
            assert!(msg.contains(words), "{text:?}: {msg}");
        }
        assert!(matches!(read("# nothing\n"), Err(SweepError::EmptyTrace)));
    }

    #[test]
    fn json_lines() {
        let w = read("{\"elapsed_ms\": 3, \"key\": 17}\n{\"timestamp\": 4.5, \"key\": \"17\"}\n")
            .unwrap();
        assert_eq!(w.summary().redeliveries, 1);
        assert_eq!(w.deliveries()[1].at_ms, 1);
    }
}
