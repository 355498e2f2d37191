//! Parsing and printing the sweep's numbers: window sizes (`30k`), durations (`30s`), ttls
//! (`none`) and log-scale grids (`1k..1M`).

use std::time::Duration;

/// Parses a count: digits with an optional `_` separator and an optional suffix `k` (×1000),
/// `M` (×1,000,000) or `G` (×10⁹); a decimal point is allowed before a suffix (`1.5M`).
///
/// # Examples
///
/// ```
/// use window_sweep::parse_count;
///
/// assert_eq!(parse_count("30k"), Ok(30_000));
/// assert_eq!(parse_count("1.5M"), Ok(1_500_000));
/// assert_eq!(parse_count("10_000"), Ok(10_000));
/// assert!(parse_count("ten").is_err());
/// ```
pub fn parse_count(s: &str) -> Result<usize, String> {
    let t = s.trim().replace('_', "");
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1e3),
        Some((i, 'M')) => (&t[..i], 1e6),
        Some((i, 'G')) => (&t[..i], 1e9),
        _ => (&t[..], 1.0),
    };
    if let Ok(n) = digits.parse::<usize>() {
        if let Some(n) = n.checked_mul(mult as usize) {
            return Ok(n);
        }
    }
    match digits.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 && (x * mult).fract() == 0.0 && x * mult < 1e18 => {
            Ok((x * mult) as usize)
        }
        _ => Err(format!("`{s}` is not a count (examples: 1000, 30k, 1.5M)")),
    }
}

/// Parses a duration: a number and a unit `ms`, `s`, `m` (minutes), `h` or `d` (`30s`, `1.5m`,
/// `250ms`); `0` alone is zero.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use window_sweep::parse_duration;
///
/// assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
/// assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert!(parse_duration("30").is_err()); // a unit is needed
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("`{s}` needs a unit: ms, s, m, h or d (example: 30s)"))?;
    let (num, unit) = t.split_at(split);
    let secs = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h or d)")),
    };
    match num.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Duration::try_from_secs_f64(x * secs)
            .map(|d| Duration::from_millis(d.as_millis() as u64))
            .map_err(|e| format!("`{s}`: {e}")),
        _ => Err(format!("`{s}` is not a duration (example: 30s)")),
    }
}

/// Parses a ttl: `none` (also `off` or `-`) for a window without one, else a duration as
/// [`parse_duration`] reads it.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use window_sweep::parse_ttl;
///
/// assert_eq!(parse_ttl("none"), Ok(None));
/// assert_eq!(parse_ttl("5m"), Ok(Some(Duration::from_secs(300))));
/// ```
pub fn parse_ttl(s: &str) -> Result<Option<Duration>, String> {
    match s.trim() {
        "none" | "off" | "-" | "" => Ok(None),
        t => {
            let d = parse_duration(t)?;
            if d < Duration::from_millis(1) {
                return Err(format!("`{s}`: a ttl is at least 1ms (or `none`)"));
            }
            Ok(Some(d))
        }
    }
}

/// Window sizes spaced evenly on a log scale from `from` to `to` (both included), `per_decade`
/// of them in each factor of ten, rounded to round numbers (1, 2, 5 for three a decade; 1, 3
/// for two).
///
/// # Panics
///
/// If `from` is 0, `to < from` or `per_decade` is 0.
///
/// # Examples
///
/// ```
/// use window_sweep::log_grid;
///
/// assert_eq!(log_grid(1_000, 100_000, 2), [1_000, 3_000, 10_000, 30_000, 100_000]);
/// assert_eq!(log_grid(1_000, 10_000, 3), [1_000, 2_000, 5_000, 10_000]);
/// ```
#[track_caller]
pub fn log_grid(from: usize, to: usize, per_decade: u32) -> Vec<usize> {
    assert!(
        from > 0 && to >= from && per_decade > 0,
        "log_grid: need 0 < from <= to and per_decade > 0, got {from}, {to}, {per_decade}"
    );
    let digits = if per_decade <= 4 { 1 } else { 2 };
    let mut out: Vec<usize> = Vec::new();
    let (lo, hi) = ((from as f64).log10(), (to as f64).log10());
    let steps = ((hi - lo) * f64::from(per_decade) + 1e-9).floor() as u32;
    for i in 0..=steps {
        let x = 10f64.powf(lo + f64::from(i) / f64::from(per_decade));
        let n = if i == 0 { from } else { round_sig(x, digits) };
        if out.last().is_none_or(|&last| n > last) && n <= to {
            out.push(n);
        }
    }
    if out.last() != Some(&to) {
        out.push(to);
    }
    out
}

fn round_sig(x: f64, digits: i32) -> usize {
    let scale = 10f64.powi(x.log10().floor() as i32 - digits + 1);
    ((x / scale).round() * scale).round() as usize
}

/// Parses a grid of window sizes: a log-scale range `FROM..TO` (spaced as [`log_grid`] with
/// `per_decade`) or a comma-separated list of counts (as [`parse_count`] reads them).
///
/// # Examples
///
/// ```
/// use window_sweep::parse_grid;
///
/// assert_eq!(parse_grid("1k..100k", 1), Ok(vec![1_000, 10_000, 100_000]));
/// assert_eq!(parse_grid("5k,50k", 1), Ok(vec![5_000, 50_000]));
/// ```
pub fn parse_grid(s: &str, per_decade: u32) -> Result<Vec<usize>, String> {
    if let Some((a, b)) = s.split_once("..") {
        let (from, to) = (parse_count(a)?, parse_count(b)?);
        if from == 0 || to < from || per_decade == 0 {
            return Err(format!(
                "`{s}`: a range FROM..TO needs 0 < FROM <= TO (and a per-decade count above 0)"
            ));
        }
        return Ok(log_grid(from, to, per_decade));
    }
    let mut out = s
        .split(',')
        .map(parse_count)
        .collect::<Result<Vec<_>, _>>()?;
    if out.contains(&0) {
        return Err(format!("`{s}`: a window holds at least one key"));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A count in short form: `1000` → `1k`, `1500000` → `1.5M`.
///
/// # Examples
///
/// ```
/// use window_sweep::format_count;
///
/// assert_eq!(format_count(30_000), "30k");
/// assert_eq!(format_count(1_500_000), "1.5M");
/// assert_eq!(format_count(999), "999");
/// ```
pub fn format_count(n: u64) -> String {
    let (div, suffix) = match n {
        1_000_000_000.. => (1e9, "G"),
        1_000_000.. => (1e6, "M"),
        1_000.. => (1e3, "k"),
        _ => return n.to_string(),
    };
    let x = n as f64 / div;
    let s = format!("{x:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{suffix}")
}

/// Bytes in binary units: `1536` → `1.5 KiB`.
///
/// # Examples
///
/// ```
/// use window_sweep::format_bytes;
///
/// assert_eq!(format_bytes(512), "512 B");
/// assert_eq!(format_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
/// ```
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut x = n as f64 / 1024.0;
    let mut unit = 0;
    while x >= 1024.0 && unit < UNITS.len() - 1 {
        x /= 1024.0;
        unit += 1;
    }
    let digits = if x < 10.0 {
        2
    } else if x < 100.0 {
        1
    } else {
        0
    };
    let s = format!("{x:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    };
    format!("{s} {}", UNITS[unit])
}

/// A duration in the largest unit that keeps it whole: `90s` → `90s`, `300s` → `5m`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use window_sweep::format_duration;
///
/// assert_eq!(format_duration(Duration::from_secs(300)), "5m");
/// assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
/// ```
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0".to_owned();
    }
    for (unit, name) in [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ] {
        if ms % unit == 0 {
            return format!("{}{name}", ms / unit);
        }
    }
    format!("{ms}ms")
}

/// A ttl as [`parse_ttl`] reads it: `none`, or [`format_duration`].
pub fn format_ttl(ttl: Option<Duration>) -> String {
    ttl.map_or_else(|| "none".to_owned(), format_duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip() {
        for n in [1, 999, 1_000, 2_000, 30_000, 1_500_000, 10_000_000] {
            assert_eq!(parse_count(&format_count(n)), Ok(n as usize), "{n}");
        }
        assert!(parse_count("1.2345k").is_err());
        assert!(parse_count("").is_err());
        assert!(parse_count("-3").is_err());
    }

    #[test]
    fn durations_round_trip() {
        for ms in [
            1, 250, 1000, 1500, 30_000, 90_000, 300_000, 3_600_000, 86_400_000,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_ttl("0").is_err());
        assert_eq!(parse_ttl("off"), Ok(None));
    }

    #[test]
    fn grids() {
        assert_eq!(
            log_grid(1_000, 10_000_000, 1),
            [1_000, 10_000, 100_000, 1_000_000, 10_000_000]
        );
        assert_eq!(
            log_grid(1_000, 100_000, 4),
            [
                1_000, 2_000, 3_000, 6_000, 10_000, 20_000, 30_000, 60_000, 100_000
            ]
        );
        assert_eq!(log_grid(1_500, 20_000, 1), [1_500, 20_000]);
        assert_eq!(log_grid(7, 7, 3), [7]);
        assert_eq!(parse_grid("50k,5k,5k", 2), Ok(vec![5_000, 50_000]));
        assert!(parse_grid("0,5", 2).is_err());
        assert!(parse_grid("1M..1k", 2).is_err());
    }

    #[test]
    fn bytes() {
        assert_eq!(format_bytes(1024), "1 KiB");
        assert_eq!(format_bytes(150 * 1024 * 1024), "150 MiB");
        assert_eq!(format_bytes(25 * 1024 * 1024 + 300 * 1024), "25.3 MiB");
    }
}
