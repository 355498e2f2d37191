//! A sweep's results: one [`CellResult`] per window, the table, the CSV and the pick.

use std::fmt::Write as _;
use std::io::{self, BufRead, Write};
use std::time::Duration;

use super::workload::{KeyKind, Workload, WorkloadSummary};
use super::{SweepError, format_bytes, format_count, format_ttl};

/// What one window (one `max_keys` and ttl) did with the workload.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct CellResult {
    /// The window's `max_keys`.
    pub max_keys: usize,
    /// The window's ttl (`None`: no ttl).
    pub ttl: Option<Duration>,
    /// Whether a hit restarted the key's ttl.
    pub refresh_on_hit: bool,
    /// The key type the window held.
    pub key_kind: KeyKind,
    /// Deliveries replayed.
    pub deliveries: u64,
    /// Deliveries of an already delivered message (what a perfect window drops).
    pub redeliveries: u64,
    /// Duplicates let through: deliveries that went downstream after their message already
    /// had.
    pub leaked: u64,
    /// Deliveries dropped although their message had not gone downstream: lost messages. 0
    /// unless keys collide.
    pub wrongly_dropped: u64,
    /// Heap bytes the window held at the end of the replay (`None`: not measured).
    pub heap_bytes: Option<u64>,
    /// The most keys the window held at once.
    pub peak_keys: u64,
    /// Keys forgotten because the window was full.
    pub evicted: u64,
    /// Keys forgotten because their ttl ran out.
    pub expired: u64,
    /// Wall-clock seconds the replay through the operator took (mostly tokio's timer).
    pub replay_secs: f64,
    /// Deliveries a second through the window alone (`None`: not measured).
    pub items_per_sec: Option<f64>,
}

impl CellResult {
    /// Duplicates let through, in percent of the redeliveries (0 without redeliveries).
    pub fn leaked_pct(&self) -> f64 {
        if self.redeliveries == 0 {
            0.0
        } else {
            self.leaked as f64 * 100.0 / self.redeliveries as f64
        }
    }

    /// Heap bytes per key at the window's fullest.
    pub fn bytes_per_key(&self) -> Option<f64> {
        self.heap_bytes
            .filter(|_| self.peak_keys > 0)
            .map(|b| b as f64 / self.peak_keys as f64)
    }
}

/// The results of a [`Sweep`](super::Sweep): the workload it replayed and one [`CellResult`]
/// per window, ttl by ttl, smallest window first.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SweepReport {
    /// What the workload was.
    pub workload: String,
    /// Its counts, and the window it needs.
    pub summary: WorkloadSummary,
    /// The key type the windows held.
    pub key_kind: KeyKind,
    /// One result per window.
    pub cells: Vec<CellResult>,
}

/// The CSV's columns, in order.
const COLUMNS: [&str; 15] = [
    "max_keys",
    "ttl_ms",
    "refresh_on_hit",
    "key_kind",
    "deliveries",
    "redeliveries",
    "leaked",
    "leaked_pct",
    "wrongly_dropped",
    "heap_bytes",
    "bytes_per_key",
    "peak_keys",
    "evicted",
    "expired",
    "items_per_sec",
];

impl SweepReport {
    pub(crate) fn new(workload: &Workload, key_kind: KeyKind, cells: Vec<CellResult>) -> Self {
        SweepReport {
            workload: workload.name().to_owned(),
            summary: workload.summary().clone(),
            key_kind,
            cells,
        }
    }

    /// The smallest window whose leak is at most `target_pct` percent of the redeliveries
    /// (and that dropped no unique message): the smallest `max_keys`, then the least heap, then
    /// the fewest keys held (a shorter ttl holds fewer). `None` if no window of the grid is
    /// good enough.
    pub fn recommend(&self, target_pct: f64) -> Option<&CellResult> {
        self.cells
            .iter()
            .filter(|c| c.wrongly_dropped == 0 && c.leaked_pct() <= target_pct)
            .min_by(|a, b| {
                a.max_keys
                    .cmp(&b.max_keys)
                    .then(a.heap_bytes.cmp(&b.heap_bytes))
                    .then(a.peak_keys.cmp(&b.peak_keys))
                    .then(a.ttl.cmp(&b.ttl))
            })
    }

    /// An upper bound on the probability that two of the workload's keys share a
    /// [`Fingerprint`](stream_dedup::Fingerprint) (`n² / 2¹²⁹` for `n` keys), when the windows held
    /// fingerprints. A collision would drop a unique message.
    pub fn fingerprint_collision_bound(&self) -> Option<f64> {
        (self.key_kind == KeyKind::Fingerprint).then(|| {
            let n = self.summary.messages as f64;
            n * n / 2f64.powi(129)
        })
    }

    /// The results as a table (Markdown, aligned so that it reads on a terminal too), the
    /// window [`recommend`](SweepReport::recommend)ed for `target_pct` marked with `◀`.
    ///
    /// Columns: ttl, `max_keys`, duplicates leaked (count, and % of redeliveries), unique
    /// messages wrongly dropped, heap bytes held and bytes per key at the window's fullest,
    /// peak keys held, keys evicted and expired, and the window's throughput in millions of
    /// deliveries a second.
    pub fn table(&self, target_pct: f64) -> String {
        let pick = self.recommend(target_pct);
        let header = [
            "ttl",
            "max_keys",
            "leaked",
            "leaked %",
            "uniques dropped",
            "heap",
            "B/key",
            "peak keys",
            "evicted",
            "expired",
            "M/s",
            "",
        ];
        let mut rows: Vec<[String; 12]> = Vec::new();
        for c in &self.cells {
            let ttl = if c.refresh_on_hit && c.ttl.is_some() {
                format!("{} (refresh)", format_ttl(c.ttl))
            } else {
                format_ttl(c.ttl)
            };
            rows.push([
                ttl,
                format_count(c.max_keys as u64),
                c.leaked.to_string(),
                format_pct(c.leaked_pct()),
                c.wrongly_dropped.to_string(),
                c.heap_bytes.map_or_else(|| "-".to_owned(), format_bytes),
                c.bytes_per_key()
                    .map_or_else(|| "-".to_owned(), |b| format!("{b:.1}")),
                c.peak_keys.to_string(),
                c.evicted.to_string(),
                c.expired.to_string(),
                c.items_per_sec
                    .map_or_else(|| "-".to_owned(), |r| format!("{:.1}", r / 1e6)),
                if pick.is_some_and(|p| std::ptr::eq(p, c)) {
                    "◀".to_owned()
                } else {
                    String::new()
                },
            ]);
        }
        let mut widths = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[&str]| {
            out.push('|');
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                let pad = w - cell.chars().count();
                // Text columns to the left, numbers to the right.
                if i == 0 || i == cells.len() - 1 {
                    let _ = write!(out, " {cell}{} |", " ".repeat(pad));
                } else {
                    let _ = write!(out, " {}{cell} |", " ".repeat(pad));
                }
            }
            out.push('\n');
        };
        line(&mut out, &header);
        out.push('|');
        for (i, w) in widths.iter().enumerate() {
            let dashes = "-".repeat(*w);
            if i == 0 || i == widths.len() - 1 {
                let _ = write!(out, " {dashes} |");
            } else {
                let _ = write!(out, " {}: |", &dashes[1..]);
            }
        }
        out.push('\n');
        for row in &rows {
            let cells: Vec<&str> = row.iter().map(String::as_str).collect();
            line(&mut out, &cells);
        }
        out
    }

    /// Writes the results as CSV: a header line, then one line per window with the columns
    /// `max_keys, ttl_ms` (empty: no ttl), `refresh_on_hit, key_kind, deliveries,
    /// redeliveries, leaked, leaked_pct, wrongly_dropped, heap_bytes, bytes_per_key,
    /// peak_keys, evicted, expired, items_per_sec` (empty: not measured).
    ///
    /// # Errors
    ///
    /// The writer's.
    pub fn write_csv(&self, mut w: impl Write) -> io::Result<()> {
        writeln!(w, "{}", COLUMNS.join(","))?;
        for c in &self.cells {
            let opt = |v: Option<String>| v.unwrap_or_default();
            writeln!(
                w,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                c.max_keys,
                opt(c.ttl.map(|t| t.as_millis().to_string())),
                c.refresh_on_hit,
                c.key_kind,
                c.deliveries,
                c.redeliveries,
                c.leaked,
                c.leaked_pct(),
                c.wrongly_dropped,
                opt(c.heap_bytes.map(|b| b.to_string())),
                opt(c.bytes_per_key().map(|b| b.to_string())),
                c.peak_keys,
                c.evicted,
                c.expired,
                opt(c.items_per_sec.map(|r| r.to_string())),
            )?;
        }
        Ok(())
    }

    /// Reads back the rows that [`write_csv`](SweepReport::write_csv) wrote.
    ///
    /// The derived columns (`leaked_pct`, `bytes_per_key`) are checked for being numbers and
    /// otherwise recomputed; `replay_secs` is not in the CSV and reads as 0.
    ///
    /// # Errors
    ///
    /// A [`SweepError`] naming the line that cannot be read or parsed.
    ///
    /// # Examples
    ///
    /// ```
    /// use window_sweep::{Sweep, SweepReport, SyntheticBroker, Workload};
    ///
    /// let workload = Workload::synthetic(&SyntheticBroker::new().messages(5000));
    /// let report = Sweep::new().max_keys([1000]).ttls([None]).throughput(false).run(&workload);
    /// let mut csv = Vec::new();
    /// report.write_csv(&mut csv).unwrap();
    /// let rows = SweepReport::read_csv(&csv[..]).unwrap();
    /// assert_eq!(rows[0].leaked, report.cells[0].leaked);
    ///
    /// let err = SweepReport::read_csv(&b"max_keys\n"[..]).unwrap_err();
    /// assert_eq!(err.line(), Some(1));
    /// ```
    pub fn read_csv(reader: impl BufRead) -> Result<Vec<CellResult>, SweepError> {
        let mut out = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let n = i as u64 + 1;
            let line = line.map_err(|source| SweepError::Read { line: n, source })?;
            if n == 1 {
                if line.trim_end() != COLUMNS.join(",") {
                    return Err(SweepError::parse(
                        n,
                        format!("expected the header `{}`", COLUMNS.join(",")),
                    ));
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            out.push(parse_row(&line, n)?);
        }
        Ok(out)
    }
}

fn parse_row(line: &str, n: u64) -> Result<CellResult, SweepError> {
    let f: Vec<&str> = line.trim_end().split(',').collect();
    if f.len() != COLUMNS.len() {
        return Err(SweepError::parse(
            n,
            format!("expected {} columns, found {}", COLUMNS.len(), f.len()),
        ));
    }
    fn num<T: std::str::FromStr>(f: &[&str], i: usize, n: u64) -> Result<T, SweepError> {
        f[i].parse().map_err(|_| {
            SweepError::parse(
                n,
                format!("column `{}`: `{}` is not a number", COLUMNS[i], f[i]),
            )
        })
    }
    fn opt<T: std::str::FromStr>(f: &[&str], i: usize, n: u64) -> Result<Option<T>, SweepError> {
        if f[i].is_empty() {
            Ok(None)
        } else {
            num(f, i, n).map(Some)
        }
    }
    let ttl = if f[1].is_empty() {
        None
    } else {
        Some(Duration::from_millis(num(&f, 1, n)?))
    };
    let refresh_on_hit = match f[2] {
        "true" => true,
        "false" => false,
        other => {
            return Err(SweepError::parse(
                n,
                format!("column `refresh_on_hit`: `{other}` is not true or false"),
            ));
        }
    };
    let key_kind = f[3]
        .parse()
        .map_err(|e: String| SweepError::parse(n, format!("column `key_kind`: {e}")))?;
    let _: f64 = num(&f, 7, n)?;
    let _: Option<f64> = opt(&f, 10, n)?;
    Ok(CellResult {
        max_keys: num(&f, 0, n)?,
        ttl,
        refresh_on_hit,
        key_kind,
        deliveries: num(&f, 4, n)?,
        redeliveries: num(&f, 5, n)?,
        leaked: num(&f, 6, n)?,
        wrongly_dropped: num(&f, 8, n)?,
        heap_bytes: opt(&f, 9, n)?,
        peak_keys: num(&f, 11, n)?,
        evicted: num(&f, 12, n)?,
        expired: num(&f, 13, n)?,
        replay_secs: 0.0,
        items_per_sec: opt(&f, 14, n)?,
    })
}

/// A percentage with enough digits to compare against a small target.
fn format_pct(p: f64) -> String {
    match p {
        0.0 => "0".to_owned(),
        p if p >= 10.0 => format!("{p:.1}"),
        p if p >= 0.1 => format!("{p:.2}"),
        p if p >= 0.001 => format!("{p:.4}"),
        p => format!("{p:.2e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(max_keys: usize, ttl: Option<u64>, leaked: u64, heap: Option<u64>) -> CellResult {
        CellResult {
            max_keys,
            ttl: ttl.map(Duration::from_secs),
            refresh_on_hit: false,
            key_kind: KeyKind::U64,
            deliveries: 11_000,
            redeliveries: 1000,
            leaked,
            wrongly_dropped: 0,
            heap_bytes: heap,
            peak_keys: max_keys as u64,
            evicted: 3,
            expired: 0,
            replay_secs: 0.0,
            items_per_sec: Some(1.5e7),
        }
    }

    fn report(cells: Vec<CellResult>) -> SweepReport {
        SweepReport {
            workload: "test".into(),
            summary: WorkloadSummary::default(),
            key_kind: KeyKind::U64,
            cells,
        }
    }

    #[test]
    fn recommends_the_smallest_window_under_target() {
        let r = report(vec![
            cell(1000, None, 500, Some(30_000)),
            cell(10_000, None, 0, Some(300_000)),
            cell(1000, Some(60), 1, Some(20_000)),
            cell(10_000, Some(60), 0, Some(200_000)),
        ]);
        assert_eq!(
            r.recommend(0.01).map(|c| (c.max_keys, c.ttl)),
            Some((10_000, Some(Duration::from_secs(60))))
        );
        assert_eq!(
            r.recommend(0.1).map(|c| (c.max_keys, c.ttl)),
            Some((1000, Some(Duration::from_secs(60))))
        );
        let mut lost = r.clone();
        for c in &mut lost.cells {
            c.wrongly_dropped = 1;
        }
        assert!(lost.recommend(100.0).is_none());
        let table = r.table(0.01);
        assert_eq!(table.lines().count(), 6);
        assert_eq!(table.lines().filter(|l| l.contains('◀')).count(), 1);
        assert!(table.lines().nth(5).unwrap().contains('◀'));
        assert!(
            table
                .lines()
                .all(|l| l.chars().count() == table.lines().next().unwrap().chars().count())
        );
    }

    #[test]
    fn csv_round_trip_and_errors() {
        let r = report(vec![
            cell(1000, None, 5, None),
            cell(30_000, Some(300), 0, Some(812_345)),
        ]);
        let mut csv = Vec::new();
        r.write_csv(&mut csv).unwrap();
        assert_eq!(SweepReport::read_csv(&csv[..]).unwrap(), r.cells);
        let text = String::from_utf8(csv).unwrap();
        let bad = text.replacen("30000,300000", "30000,soon", 1);
        let err = SweepReport::read_csv(bad.as_bytes()).unwrap_err();
        assert_eq!(err.line(), Some(3), "{err}");
        assert!(err.to_string().contains("ttl_ms"), "{err}");
        let short = format!("{text}1,2,3\n");
        assert_eq!(
            SweepReport::read_csv(short.as_bytes()).unwrap_err().line(),
            Some(4)
        );
    }

    #[test]
    fn percentages() {
        assert_eq!(format_pct(0.0), "0");
        assert_eq!(format_pct(12.345), "12.3");
        assert_eq!(format_pct(0.5), "0.50");
        assert_eq!(format_pct(0.0123), "0.0123");
        assert_eq!(format_pct(0.00005), "5.00e-5");
    }
}
