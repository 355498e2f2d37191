//! The sweep's plot: leaked duplicates and heap bytes against window size, one line per ttl.

use std::time::Duration;

use plotters::prelude::*;

use super::report::SweepReport;
use super::{SweepError, format_count, format_ttl};

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 560;

/// Line colours (Tableau 10 without red, which marks the target).
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBAColor {
    COLORS[i % COLORS.len()].to_rgba()
}

const MIB: f64 = 1024.0 * 1024.0;

/// A tick of the heap axis, in MiB.
fn mib_label(y: f64) -> String {
    let s = format!("{y:.4}");
    format!("{} MiB", s.trim_end_matches('0').trim_end_matches('.'))
}

fn plot_err<E: std::fmt::Display>(e: E) -> SweepError {
    SweepError::Plot(e.to_string())
}

impl SweepReport {
    /// Draws the sweep as an SVG image: on the left, duplicates let through (in % of the
    /// redeliveries, log scale; a window that leaked none is drawn on the bottom edge) against
    /// `max_keys`, with `target_pct` as a dashed line; on the right, the heap bytes each window
    /// held (when measured). One line per ttl; the recommended window circled.
    ///
    /// Text is left to the SVG viewer's fonts, so no font library is needed to draw it.
    ///
    /// # Errors
    ///
    /// [`SweepError::Plot`] if plotters fails (it should not, drawing to a string).
    ///
    /// # Examples
    ///
    /// ```
    /// use window_sweep::{Sweep, SyntheticBroker, Workload};
    ///
    /// let workload = Workload::synthetic(&SyntheticBroker::new().messages(5000));
    /// let report = Sweep::new().max_keys([100, 1000, 10_000]).ttls([None]).run(&workload);
    /// let svg = report.svg(0.01).unwrap();
    /// assert!(svg.starts_with("<svg") && svg.contains("ttl none"));
    /// ```
    pub fn svg(&self, target_pct: f64) -> Result<String, SweepError> {
        let mut svg = String::new();
        self.draw(
            SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)),
            target_pct,
        )?;
        Ok(svg)
    }

    fn draw(&self, backend: SVGBackend<'_>, target_pct: f64) -> Result<(), SweepError> {
        let root = backend.into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let s = &self.summary;
        root.draw(&Text::new(
            "Which window? Duplicates let through and memory held, against max_keys (one line per ttl)",
            (20, 12),
            ("sans-serif", 20).into_font(),
        ))
        .map_err(plot_err)?;
        let subtitle = format!(
            "{} | {} keys, {} deliveries, {} redeliveries over {} | keys: {}",
            self.workload,
            format_count(s.messages),
            format_count(s.deliveries),
            format_count(s.redeliveries),
            match s.duration.as_secs() {
                secs @ 0..120 => format!("{secs}s"),
                secs => format!("{:.1} min", secs as f64 / 60.0),
            },
            self.key_kind,
        );
        root.draw(&Text::new(
            subtitle,
            (20, 40),
            ("sans-serif", 13).into_font().color(&RGBColor(80, 80, 80)),
        ))
        .map_err(plot_err)?;
        let body = root.margin(60, 10, 10, 10);

        let measured = self.cells.iter().any(|c| c.heap_bytes.is_some());
        let (left, right) = if measured {
            let (l, r) = body.split_horizontally(WIDTH / 2);
            (l, Some(r))
        } else {
            (body, None)
        };

        let mut ttls: Vec<(Option<Duration>, bool)> = Vec::new();
        for c in &self.cells {
            if !ttls.contains(&(c.ttl, c.refresh_on_hit)) {
                ttls.push((c.ttl, c.refresh_on_hit));
            }
        }
        let xmin = self.cells.iter().map(|c| c.max_keys).min().unwrap_or(1) as f64;
        let xmax = self.cells.iter().map(|c| c.max_keys).max().unwrap_or(10) as f64;
        let (xmin, xmax) = if xmin == xmax {
            (xmin / 2.0, xmax * 2.0)
        } else {
            (xmin / 1.3, xmax * 1.3)
        };
        let min_leak = self
            .cells
            .iter()
            .map(super::CellResult::leaked_pct)
            .filter(|&p| p > 0.0)
            .fold(f64::INFINITY, f64::min);
        let floor = (target_pct / 10.0).min(min_leak / 2.0).clamp(1e-6, 1.0);
        let pick = self.recommend(target_pct);
        let series = |c: &super::CellResult| (c.ttl, c.refresh_on_hit);
        // Earlier lines are drawn wider, so that a later line on top of one leaves it visible.
        let width = |i: usize| (ttls.len() - i).clamp(1, 3) as u32 * 2;
        let label = |(ttl, refresh): (Option<Duration>, bool)| {
            if refresh && ttl.is_some() {
                format!("ttl {} (refresh)", format_ttl(ttl))
            } else {
                format!("ttl {}", format_ttl(ttl))
            }
        };

        let mut chart = ChartBuilder::on(&left)
            .caption(
                "duplicates let through (% of redeliveries)",
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((xmin..xmax).log_scale(), (floor..120.0).log_scale())
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("max_keys")
            .y_desc("leaked %  (0 drawn on the bottom edge)")
            .x_label_formatter(&|x| format_count(x.round() as u64))
            .y_label_formatter(&|y| format!("{y}"))
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(DashedLineSeries::new(
                [(xmin, target_pct), (xmax, target_pct)],
                6,
                4,
                RED.stroke_width(1),
            ))
            .map_err(plot_err)?
            .label(format!("target {target_pct}%"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        for (i, &key) in ttls.iter().enumerate() {
            let color = color(i);
            let points: Vec<(f64, f64)> = self
                .cells
                .iter()
                .filter(|c| series(c) == key)
                .map(|c| (c.max_keys as f64, c.leaked_pct().max(floor)))
                .collect();
            chart
                .draw_series(LineSeries::new(
                    points.clone(),
                    color.stroke_width(width(i)),
                ))
                .map_err(plot_err)?
                .label(label(key))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(width(i)))
                });
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(plot_err)?;
        }
        if let Some(p) = pick {
            chart
                .draw_series([Circle::new(
                    (p.max_keys as f64, p.leaked_pct().max(floor)),
                    9,
                    BLACK.stroke_width(2),
                )])
                .map_err(plot_err)?
                .label(format!(
                    "recommended: {} keys, {}",
                    format_count(p.max_keys as u64),
                    label(series(p))
                ))
                .legend(|(x, y)| Circle::new((x + 10, y), 5, BLACK.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;

        if let Some(right) = right {
            let heap: Vec<f64> = self
                .cells
                .iter()
                .filter_map(|c| c.heap_bytes)
                .map(|b| b.max(1) as f64 / MIB)
                .collect();
            let ymin = heap.iter().copied().fold(f64::INFINITY, f64::min) / 2.0;
            let ymax = heap.iter().copied().fold(f64::MIN_POSITIVE, f64::max) * 2.0;
            let mut chart = ChartBuilder::on(&right)
                .caption("heap bytes held by the window", ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(80)
                .build_cartesian_2d((xmin..xmax).log_scale(), (ymin..ymax).log_scale())
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("max_keys")
                .y_desc("heap (MiB)")
                .x_label_formatter(&|x| format_count(x.round() as u64))
                .y_label_formatter(&|y| mib_label(*y))
                .draw()
                .map_err(plot_err)?;
            for (i, &key) in ttls.iter().enumerate() {
                let color = color(i);
                let points: Vec<(f64, f64)> = self
                    .cells
                    .iter()
                    .filter(|c| series(c) == key)
                    .filter_map(|c| Some((c.max_keys as f64, c.heap_bytes?.max(1) as f64 / MIB)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(
                        points.clone(),
                        color.stroke_width(width(i)),
                    ))
                    .map_err(plot_err)?
                    .label(label(key))
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], color.stroke_width(width(i)))
                    });
                chart
                    .draw_series(
                        points
                            .into_iter()
                            .map(|p| Circle::new(p, 3, color.filled())),
                    )
                    .map_err(plot_err)?;
            }
            if let Some((p, bytes)) = pick.and_then(|p| Some((p, p.heap_bytes?))) {
                chart
                    .draw_series([Circle::new(
                        (p.max_keys as f64, bytes.max(1) as f64 / MIB),
                        9,
                        BLACK.stroke_width(2),
                    )])
                    .map_err(plot_err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
        Ok(())
    }
}
