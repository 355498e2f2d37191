//! `examples/prometheus.rs`, scraped over HTTP: every metric of `stream_dedup::stats` is
//! served with its `window` label and the type the README's "Metrics" table gives it, and
//! that table lists exactly those metrics.

// The example itself, compiled into this test (its `main` is not called here): the test runs
// the example's own exporter and consumer, on a port of its choosing.
#[allow(dead_code)]
#[path = "../examples/prometheus.rs"]
mod example;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use stream_dedup::stats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep};

/// Every metric name of `stream_dedup::stats`.
const METRICS: [&str; 12] = [
    stats::ACCEPTED_TOTAL,
    stats::DUPLICATES_TOTAL,
    stats::EVICTED_TOTAL,
    stats::EXPIRED_TOTAL,
    stats::UNCHECKED_TOTAL,
    stats::STORE_ERRORS_TOTAL,
    stats::HELD_BACK_TOTAL,
    stats::COMMITTED_TOTAL,
    stats::RELEASED_TOTAL,
    stats::RENEWED_TOTAL,
    stats::LEASES_LOST_TOTAL,
    stats::KEYS,
];

/// The list above is all of them: every `pub const` of `src/stats.rs` whose value is a metric
/// name (a new metric must be added there, to the README table and to this test).
#[test]
fn the_list_holds_every_metric_of_the_stats_module() {
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/stats.rs"))
        .expect("src/stats.rs is readable");
    let declared: BTreeSet<&str> = source
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub const "))
        .filter_map(|rest| rest.split_once("= \"")?.1.split_once("\";"))
        .map(|(value, _)| value)
        .filter(|value| value.starts_with("stream_dedup_"))
        .collect();
    assert_eq!(declared, METRICS.into_iter().collect());
}

/// The README's "Metrics" table: name -> (type, labels), with the alert column filled in.
fn readme_table() -> BTreeMap<String, (String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md is readable");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Metrics\n"))
        .expect("README.md has a \"## Metrics\" section");
    let mut rows = section.lines().filter(|l| l.starts_with('|'));
    let header: Vec<String> = cells(rows.next().expect("the section has a table"));
    assert_eq!(header, ["metric", "type", "labels", "meaning", "alert"]);
    let mut table = BTreeMap::new();
    for row in rows.skip(1) {
        let cells = cells(row);
        assert_eq!(cells.len(), 5, "five columns: {row}");
        let name = cells[0].trim_matches('`').to_owned();
        assert!(
            !cells[3].is_empty() && !cells[4].is_empty(),
            "{name}: say what it means and which alert to put on it"
        );
        let previous = table.insert(name.clone(), (cells[1].clone(), cells[2].clone()));
        assert!(previous.is_none(), "{name} is listed twice");
    }
    table
}

fn cells(row: &str) -> Vec<String> {
    let row = row.trim().trim_start_matches('|').trim_end_matches('|');
    row.split('|').map(|c| c.trim().to_owned()).collect()
}

#[test]
fn the_readme_table_lists_exactly_the_metrics() {
    let table = readme_table();
    let listed: BTreeSet<&str> = table.keys().map(String::as_str).collect();
    assert_eq!(listed, METRICS.into_iter().collect());
    for (name, (kind, labels)) in &table {
        let expected = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        assert_eq!(kind, expected, "{name}");
        assert_eq!(labels, &format!("`{}`", stats::WINDOW_LABEL), "{name}");
    }
}

/// A free port on the loopback interface (the exporter binds it right after).
fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address")
}

/// `GET /metrics` over HTTP/1.0 (so the body is not chunked): the status line and the body.
async fn scrape(addr: SocketAddr) -> std::io::Result<(String, String)> {
    let mut conn = TcpStream::connect(addr).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    conn.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or("").to_owned();
    Ok((status, body.to_owned()))
}

/// A scrape parsed: name -> (type, labels, value) of its one series.
type Series = BTreeMap<String, (String, String, f64)>;

fn parse(body: &str) -> Series {
    let mut types = BTreeMap::new();
    let mut series = Series::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            types.insert(name.to_owned(), kind.to_owned());
        } else if !line.is_empty() && !line.starts_with('#') {
            let (name_labels, value) = line.rsplit_once(' ').expect("a sample: name value");
            let (name, labels) = match name_labels.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (name_labels, ""),
            };
            let kind = types.get(name).cloned().unwrap_or_default();
            let value = value.parse().expect("a number");
            let previous = series.insert(name.to_owned(), (kind, labels.to_owned(), value));
            assert!(previous.is_none(), "one series of {name}: {body}");
        }
    }
    series
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_serves_every_metric_with_its_window_label() {
    let addr = free_addr();
    example::serve(addr).expect("the exporter serves /metrics");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(example::consume(async {
        let _ = stopped.await;
    }));

    // Scrape until the consumer has accepted and dropped items (the metrics are registered
    // when its window is built, and move as the simulated broker delivers).
    let deadline = Instant::now() + Duration::from_secs(60);
    let series = loop {
        let scraped = scrape(addr).await;
        if let Ok((status, body)) = &scraped {
            assert_eq!(status, "HTTP/1.0 200 OK", "{body}");
            let series = parse(body);
            let moved = |name: &str| series.get(name).is_some_and(|s| s.2 > 0.0);
            if moved(stats::ACCEPTED_TOTAL) && moved(stats::DUPLICATES_TOTAL) {
                break series;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no accepted items and duplicates in /metrics within a minute: {scraped:?}"
        );
        sleep(Duration::from_millis(200)).await;
    };
    let _ = stop.send(());
    let summary = tokio::time::timeout(Duration::from_secs(90), consumer)
        .await
        .expect("the example stops once asked to")
        .expect("the example's consumer does not panic");
    assert!(summary.processed > 0, "{summary}");

    let table = readme_table();
    let label = format!("{}=\"{}\"", stats::WINDOW_LABEL, example::WINDOW);
    for name in METRICS {
        let (kind, labels, value) = series
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not served: {series:?}"));
        assert_eq!(labels, &label, "{name}: the window label, and no other");
        assert_eq!(kind, &table[name].0, "{name}: the type the README gives");
        assert!(value.is_finite() && *value >= 0.0, "{name} = {value}");
    }
    let ours: BTreeSet<&str> = series
        .keys()
        .map(String::as_str)
        .filter(|n| n.starts_with("stream_dedup_"))
        .collect();
    assert_eq!(
        ours,
        METRICS.into_iter().collect(),
        "no metric the table lacks"
    );
}

#[test]
fn the_example_reads_its_address_and_run_time() {
    use example::Options;
    let none = |_: &str| None;
    let default = Options::parse(&[], none).unwrap();
    assert_eq!(default.addr, example::DEFAULT_ADDR.parse().unwrap());
    assert_eq!(default.run_for, None);
    let args = ["0.0.0.0:9100".to_owned(), "1.5".to_owned()];
    let given = Options::parse(&args, none).unwrap();
    assert_eq!(given.addr, "0.0.0.0:9100".parse().unwrap());
    assert_eq!(given.run_for, Some(Duration::from_millis(1_500)));
    let env = |name: &str| match name {
        "METRICS_ADDR" => Some("127.0.0.1:9100".to_owned()),
        "RUN_SECONDS" => Some("60".to_owned()),
        _ => None,
    };
    let from_env = Options::parse(&[], env).unwrap();
    assert_eq!(from_env.addr, "127.0.0.1:9100".parse().unwrap());
    assert_eq!(from_env.run_for, Some(Duration::from_secs(60)));
    assert!(Options::parse(&["localhost".to_owned()], none).is_err());
    let negative = [example::DEFAULT_ADDR.to_owned(), "-1".to_owned()];
    assert!(Options::parse(&negative, none).is_err());
}
