//! Which window does my traffic need? Replays a workload through a grid of windows
//! (`max_keys` × ttl) on a paused clock and reports, for each, the duplicates it let through,
//! the unique messages it wrongly dropped, the heap it held and its throughput; writes a CSV
//! and an SVG plot; prints the smallest window under a leak target.
//!
//! ```text
//! # a synthetic at-least-once broker (see --help for its knobs)
//! cargo run --release -p window-sweep
//! cargo run --release -p window-sweep -- --rate 5000 --ack-wait 30s --jitter 5s
//! # a trace recorded from your consumer with `record_trace` (CSV `timestamp,key` or JSON lines)
//! cargo run --release -p window-sweep -- --trace trace.csv --key-kind string
//! ```

use std::alloc::System;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cap::Cap;
use clap::Parser;
use window_sweep::{
    KeyKind, Sweep, SyntheticBroker, TraceFormat, Workload, format_bytes, format_count, format_ttl,
    parse_count, parse_duration, parse_grid, parse_ttl,
};

/// Counts every byte the process holds, so the sweep can measure each window's heap.
#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

#[derive(Debug, Parser)]
#[command(
    about = "Replay a workload through a grid of dedup windows (max_keys x ttl) and see what each lets through and costs",
    after_help = "Counts take k/M suffixes (30k, 1.5M); durations take ms/s/m/h (500ms, 30s, 5m); a ttl of `none` is a window without one."
)]
struct Args {
    /// Replay this recorded trace instead of the synthetic broker: CSV `timestamp,key` lines
    /// (timestamps in ms, as `record_trace` writes them) or JSON lines
    /// (`{"timestamp": ms, "key": …}`).
    #[arg(long, value_name = "FILE", help_heading = "Workload")]
    trace: Option<PathBuf>,

    /// Format of --trace: auto (by extension .jsonl/.ndjson or a first `{`), csv or jsonl.
    #[arg(long, default_value = "auto", value_parser = parse_format, help_heading = "Workload")]
    format: TraceFormat,

    /// New messages per second.
    #[arg(long, default_value_t = 1000.0, help_heading = "Synthetic broker")]
    rate: f64,

    /// Distinct messages (keys) to send.
    #[arg(long, default_value = "1M", value_parser = parse_count, help_heading = "Synthetic broker")]
    messages: usize,

    /// Share of deliveries whose ACK is lost (0.01 = 1%).
    #[arg(long, default_value_t = 0.01, help_heading = "Synthetic broker")]
    lost_ack: f64,

    /// Share of messages whose processing outlasts the ack deadline.
    #[arg(long, default_value_t = 0.005, help_heading = "Synthetic broker")]
    timeouts: f64,

    /// How long the broker waits for an ACK before it redelivers.
    #[arg(long, default_value = "30s", value_parser = parse_duration, help_heading = "Synthetic broker")]
    ack_wait: Duration,

    /// A redelivery comes up to this much before or after ack_wait, uniformly.
    #[arg(long, default_value = "5s", value_parser = parse_duration, help_heading = "Synthetic broker")]
    jitter: Duration,

    /// Extra delay before each redelivery (a backoff, a delay level).
    #[arg(long, default_value = "0", value_parser = parse_duration, help_heading = "Synthetic broker")]
    redelivery_delay: Duration,

    /// Most deliveries of one message, the first included.
    #[arg(long, default_value_t = 5, help_heading = "Synthetic broker")]
    max_deliver: u32,

    /// Seed of the broker's randomness.
    #[arg(long, default_value_t = 1, help_heading = "Synthetic broker")]
    seed: u64,

    /// Evenly spaced arrivals instead of Poisson.
    #[arg(long, help_heading = "Synthetic broker")]
    even: bool,

    /// Window sizes: a log-scale range FROM..TO or a list (1k,10k,100k).
    #[arg(long, default_value = "1k..1M", help_heading = "Grid")]
    max_keys: String,

    /// Sizes per factor of ten in a range.
    #[arg(long, default_value_t = 2, help_heading = "Grid")]
    per_decade: u32,

    /// Ttls to try, comma-separated; `none` for a window without one.
    #[arg(long, value_delimiter = ',', default_value = "none,30s,1m,5m", value_parser = parse_ttl, help_heading = "Grid")]
    ttl: Vec<Option<Duration>>,

    /// Sweep windows whose ttl restarts on each hit (Window::refresh_on_hit).
    #[arg(long, help_heading = "Grid")]
    refresh_on_hit: bool,

    /// Key type the windows hold: u64, fingerprint (16-byte hash of the key) or string (the
    /// key's text, owned). Memory per key depends on it.
    #[arg(long, default_value = "u64", help_heading = "Grid")]
    key_kind: KeyKind,

    /// Leak target: recommend the smallest window that lets through at most this percentage of
    /// the redeliveries.
    #[arg(
        long,
        default_value_t = 0.01,
        value_name = "PERCENT",
        help_heading = "Output"
    )]
    target: f64,

    /// Write the results as CSV here.
    #[arg(long, default_value = "window_sweep.csv", help_heading = "Output")]
    csv: PathBuf,

    /// Write the plot (SVG) here.
    #[arg(long, default_value = "window_sweep.svg", help_heading = "Output")]
    svg: PathBuf,

    /// Also write a Markdown report (command, workload, table, recommendation) here.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    markdown: Option<PathBuf>,
}

/// What the table's columns mean.
const LEGEND: &str = "leaked: duplicates let through (% of all redeliveries). uniques dropped: unique \
messages wrongly dropped (must be 0). heap: bytes the window held after the replay, counted by the \
allocator; B/key: heap / peak keys (a window that never filled keeps up to 2x growth slack). \
M/s: millions of deliveries a second through the window alone (WindowSet::insert_at, same keys \
and times).";

fn parse_format(s: &str) -> Result<TraceFormat, String> {
    match s {
        "auto" => Ok(TraceFormat::Auto),
        "csv" => Ok(TraceFormat::Csv),
        "jsonl" | "json" | "ndjson" => Ok(TraceFormat::JsonLines),
        _ => Err(format!("`{s}`: auto, csv or jsonl")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("window-sweep: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let max_keys = parse_grid(&args.max_keys, args.per_decade)?;
    if !(0.0..=100.0).contains(&args.target) {
        return Err(format!("--target {} is not a percentage", args.target).into());
    }

    let clock = Instant::now();
    let workload = match &args.trace {
        Some(path) => Workload::from_trace_file(path, args.format)
            .map_err(|e| format!("{}: {e}", path.display()))?,
        None => {
            check_share("--lost-ack", args.lost_ack)?;
            check_share("--timeouts", args.timeouts)?;
            if !(args.rate.is_finite() && args.rate > 0.0) {
                return Err("--rate must be above 0".into());
            }
            let messages = u32::try_from(args.messages)
                .ok()
                .filter(|&n| n > 0 && n < u32::MAX)
                .ok_or("--messages must be between 1 and 4G")?;
            let broker = SyntheticBroker::new()
                .rate(args.rate)
                .messages(messages)
                .lost_ack(args.lost_ack)
                .timeouts(args.timeouts)
                .ack_wait(args.ack_wait)
                .jitter(args.jitter)
                .redelivery_delay(args.redelivery_delay)
                .max_deliver(args.max_deliver.max(1))
                .seed(args.seed)
                .poisson(!args.even);
            Workload::synthetic(&broker)
        }
    };
    let s = workload.summary();
    eprintln!(
        "workload ready in {:.1} s: {}",
        clock.elapsed().as_secs_f64(),
        workload.name()
    );
    let facts = workload_facts(&workload);
    eprintln!("{facts}");

    let sweep = Sweep::new()
        .max_keys(max_keys)
        .ttls(args.ttl.iter().copied())
        .refresh_on_hit(args.refresh_on_hit)
        .key_kind(args.key_kind)
        .heap_bytes(|| ALLOC.allocated());
    let tty = std::io::stderr().is_terminal();
    let report = sweep.run_with_progress(&workload, |p| {
        let c = p.cell;
        let line = format!(
            "[{:>3}/{}] ttl {:>5}  max_keys {:>6}: leaked {:>8} ({:.4}%), heap {:>10}, replay {:.1} s | elapsed {:.0} s, ~{:.0} s to go",
            p.done,
            p.total,
            format_ttl(c.ttl),
            format_count(c.max_keys as u64),
            c.leaked,
            c.leaked_pct(),
            c.heap_bytes.map_or_else(|| "-".into(), format_bytes),
            c.replay_secs,
            p.elapsed.as_secs_f64(),
            p.remaining().as_secs_f64(),
        );
        // On a terminal one line rewritten in place; in a log, one line per window.
        match (tty, p.done < p.total) {
            (true, true) => eprint!("\r{line}\x1b[K"),
            (true, false) => eprintln!("\r{line}\x1b[K"),
            (false, _) => eprintln!("{line}"),
        }
    });

    let table = report.table(args.target);
    println!();
    println!("{}", workload.name());
    println!("{facts}");
    println!();
    print!("{table}");
    println!();
    println!("{LEGEND}");
    println!();
    let verdict = verdict(&report, args.target, s.redeliveries);
    println!("{verdict}");

    let mut csv = BufWriter::new(File::create(&args.csv)?);
    report.write_csv(&mut csv)?;
    csv.flush()?;
    std::fs::write(&args.svg, report.svg(args.target)?)?;
    eprintln!("wrote {} and {}", args.csv.display(), args.svg.display());
    if let Some(path) = &args.markdown {
        let command: Vec<String> = std::env::args().skip(1).collect();
        // The plot, when it sits beside the report.
        let folder = |p: &Path| {
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        };
        let plot = match args.svg.file_name() {
            Some(name) if folder(path) == folder(&args.svg) => {
                format!("![window sweep]({})\n\n", name.to_string_lossy())
            }
            _ => String::new(),
        };
        let md = format!(
            "# Window sweep\n\nMade with:\n\n```sh\ncargo run --release -p window-sweep -- {}\n```\n\n\
             Workload: {}.\n\n{}\n\n{plot}{}\n{LEGEND}\n\n{}\n",
            command.join(" "),
            workload.name(),
            facts,
            table,
            verdict,
        );
        std::fs::write(path, md)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn check_share(flag: &str, share: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&share) {
        Ok(())
    } else {
        Err(format!("{flag} {share} is not a share between 0 and 1"))
    }
}

fn workload_facts(w: &Workload) -> String {
    let s = w.summary();
    let mut out = format!(
        "{} messages, {} deliveries, {} redeliveries ({:.3}% of deliveries) over {}.",
        format_count(s.messages),
        format_count(s.deliveries),
        s.redeliveries,
        s.redeliveries as f64 * 100.0 / s.deliveries.max(1) as f64,
        seconds(s.duration),
    );
    if let (Some(age), Some(gap)) = (s.max_redelivery_age, s.max_redelivery_gap) {
        out.push_str(&format!(
            " Every redelivery is caught by a window of at least {} keys without a ttl \
             (the most keys seen between a redelivery and its previous delivery, plus one), \
             or with a ttl above {} (from first acceptance; {} with refresh_on_hit) and keys to match.",
            format_count(s.min_max_keys()),
            seconds(age),
            seconds(gap),
        ));
    }
    out
}

fn seconds(d: Duration) -> String {
    match d.as_secs_f64() {
        s if s < 120.0 => format!("{s:.1}s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

fn verdict(report: &window_sweep::SweepReport, target: f64, redeliveries: u64) -> String {
    let lost: u64 = report.cells.iter().map(|c| c.wrongly_dropped).sum();
    let mut out = if lost == 0 {
        "Unique messages wrongly dropped: 0 in every window.".to_owned()
    } else {
        format!("WARNING: {lost} unique messages were wrongly dropped across the grid.")
    };
    if let Some(bound) = report.fingerprint_collision_bound() {
        out.push_str(&format!(
            " Fingerprint collision probability for these keys: at most {bound:.1e}."
        ));
    }
    out.push('\n');
    match report.recommend(target) {
        Some(c) => out.push_str(&format!(
            "Recommendation (leak target {target}% of {redeliveries} redeliveries): \
             Window::max_keys({}){} — leaked {} ({:.4}%), heap {}{}.",
            c.max_keys,
            c.ttl
                .map(|t| format!(".ttl(Duration::from_millis({}))", t.as_millis()))
                .unwrap_or_default(),
            c.leaked,
            c.leaked_pct(),
            c.heap_bytes
                .map_or_else(|| "not measured".into(), format_bytes),
            c.bytes_per_key()
                .map(|b| format!(" ({b:.1} B/key)"))
                .unwrap_or_default(),
        )),
        None => out.push_str(&format!(
            "No window of the grid leaks at most {target}% of the redeliveries: try larger \
             windows (--max-keys) or longer ttls (--ttl)."
        )),
    }
    out
}
