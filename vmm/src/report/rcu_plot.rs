//! A picture of a VM's RCU lifetime: cumulative `call_rcu` calls, callbacks
//! run and grace periods against time since VMM start, with a labelled
//! vertical line at boot, each memory plug and unplug, and the end.
//!
//! The picture is an SVG line chart. Its text is SVG `<text>` laid out with
//! estimated metrics, so drawing it needs no font files or font library; the
//! viewer renders the text. When grace periods are far fewer than calls they
//! get their own scale on the right-hand axis, so both stay readable.

use crate::report::rcu_lifetime::{LifetimeReport, MarkerKind};
use plotters::drawing::DrawingAreaErrorKind;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Width and height of the picture, in pixels.
pub(crate) const SIZE: (u32, u32) = (1100, 620);

/// Grace periods get the right-hand axis when calls outnumber them by at
/// least this factor.
const SECOND_AXIS_RATIO: u64 = 8;

/// Least horizontal distance between two marker labels, in pixels.
const LABEL_GAP: i32 = 8;

/// Rows of marker labels above the plot.
const LABEL_ROWS: usize = 3;

/// Height of one row of marker labels, in pixels.
const ROW_HEIGHT: i32 = 20;

/// Font size of marker labels (plotters' units: the SVG font size is this
/// divided by 1.24).
const MARKER_FONT: u32 = 17;

/// The plot could not be made or written.
#[derive(Debug, Error)]
pub(crate) enum PlotError {
    /// The chart library failed to draw (a range or text it cannot lay out).
    #[error("cannot draw the RCU lifetime plot")]
    Draw(#[source] DrawingAreaErrorKind<std::io::Error>),
    /// Writing the file failed.
    #[error("cannot write the RCU lifetime plot to '{path}'")]
    Write {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

const CALLS: RGBColor = RGBColor(31, 119, 180);
const RUN: RGBColor = RGBColor(255, 127, 14);
const GRACE: RGBColor = RGBColor(44, 160, 44);

fn marker_color(kind: MarkerKind) -> RGBColor {
    match kind {
        MarkerKind::Boot => RGBColor(90, 90, 90),
        MarkerKind::Plug => RGBColor(106, 61, 154),
        MarkerKind::Unplug => RGBColor(214, 39, 40),
        MarkerKind::End => RGBColor(0, 0, 0),
    }
}

/// The unit the time axis uses for a lifetime of `span_s` seconds.
fn time_unit(span_s: f64) -> (f64, &'static str) {
    if span_s <= 1200.0 {
        (1.0, "s")
    } else if span_s <= 48.0 * 3600.0 {
        (60.0, "min")
    } else {
        (3600.0, "h")
    }
}

/// Writes the plot of `report` to `path` as SVG, the way every report is
/// written ([`crate::report::report_file`]): a failure leaves the old file or none.
pub(crate) fn write_plot(path: &Path, report: &LifetimeReport) -> Result<(), PlotError> {
    let svg = render_svg(report)?;
    crate::report::report_file::write_report(path, svg.as_bytes()).map_err(|source| {
        PlotError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The plot of `report` as an SVG document.
pub(crate) fn render_svg(report: &LifetimeReport) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, report)?;
        root.present().map_err(PlotError::Draw)?;
    }
    Ok(svg)
}

fn draw(
    root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    report: &LifetimeReport,
) -> Result<(), PlotError> {
    root.fill(&WHITE).map_err(PlotError::Draw)?;
    let tl = &report.timeline;
    let last_ms = tl
        .last()
        .map_or(0, |s| s.t_ms)
        .max(report.uptime_ms)
        .max(report.markers.last().map_or(0, |m| m.t_ms));
    let (unit, unit_name) = time_unit(last_ms as f64 / 1000.0);
    let x_of = |t_ms: u64| t_ms as f64 / 1000.0 / unit;
    let x_max = x_of(last_ms).max(1e-3);

    let max_of =
        |f: fn(&crate::report::rcu_lifetime::Sample) -> u64| tl.iter().map(f).max().unwrap_or(0);
    let calls_max = max_of(|s| s.call_rcu).max(max_of(|s| s.callbacks_run));
    let gp_max = max_of(|s| s.grace_periods);
    let two_axes = gp_max > 0 && calls_max >= gp_max.saturating_mul(SECOND_AXIS_RATIO);
    let top = |m: u64| (m.max(1) as f64 * 1.12).ceil();
    let y_max = if two_axes {
        top(calls_max)
    } else {
        top(calls_max.max(gp_max))
    };
    let y2_max = if two_axes { top(gp_max) } else { y_max };

    let title = format!(
        "RCU over the VM's lifetime: {} call_rcu, {} grace periods, {} force_rcu (wake-up: {})",
        report.rcu.call_rcu,
        report.rcu.grace_periods,
        report.rcu.force_rcu,
        report.rcu.wakeup.name()
    );
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(14)
        .top_x_label_area_size(ROW_HEIGHT * LABEL_ROWS as i32 + 6)
        .x_label_area_size(52)
        .y_label_area_size(72)
        .right_y_label_area_size(if two_axes { 72 } else { 14 })
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(PlotError::Draw)?
        .set_secondary_coord(0f64..x_max, 0f64..y2_max);

    let int_label = |v: &f64| {
        if v.fract().abs() < 1e-9 {
            format!("{v:.0}")
        } else {
            String::new()
        }
    };
    let x_label = |v: &f64| {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    let x_desc = format!("time since VMM start ({unit_name})");
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(if two_axes {
            "call_rcu calls, callbacks run"
        } else {
            "count (cumulative)"
        })
        .x_labels(12)
        .x_label_formatter(&x_label)
        .y_labels(10)
        .y_label_formatter(&int_label)
        .label_style(("sans-serif", 17))
        .axis_desc_style(("sans-serif", 18))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(PlotError::Draw)?;
    if two_axes {
        chart
            .configure_secondary_axes()
            .y_desc("grace periods")
            // The secondary time axis is the primary one: no ticks on top,
            // where the marker labels go.
            .x_labels(0)
            .y_labels(10)
            .y_label_formatter(&int_label)
            .label_style(("sans-serif", 17))
            .axis_desc_style(("sans-serif", 18))
            .draw()
            .map_err(PlotError::Draw)?;
    }

    // Markers under the curves: a dashed line each, continued up into the
    // label band to its label when there is room for one.
    let plot_area = chart.plotting_area().clone();
    let (px_range, py_range) = plot_area.get_pixel_range();
    for m in &report.markers {
        let x = x_of(m.t_ms);
        chart
            .draw_series(DashedLineSeries::new(
                [(x, 0.0), (x, y_max)],
                6,
                4,
                marker_color(m.kind).stroke_width(1),
            ))
            .map_err(PlotError::Draw)?;
    }
    let label_font = ("sans-serif", MARKER_FONT).into_font();
    let width = |text: &str| {
        root.estimate_text_size(text, &label_font.clone().into_text_style(root))
            .map_or(text.len() as i32 * MARKER_FONT as i32 / 2, |(w, _)| {
                w as i32
            })
    };
    let line_x = |t_ms: u64| plot_area.map_coordinate(&(x_of(t_ms), y_max)).0;
    // Within the plot's width: the axes' labels are beside it.
    let (x_lo, x_hi) = (px_range.start, px_range.end);
    let band_bottom = py_range.start;
    for l in place_labels(report, line_x, width, (x_lo, x_hi)) {
        let Some(m) = report.markers.get(l.index) else {
            continue;
        };
        let color = marker_color(m.kind);
        let row_top = band_bottom - (l.row as i32 + 1) * ROW_HEIGHT;
        root.draw(&PathElement::new(
            [
                (l.line_x, band_bottom),
                (l.line_x, row_top + ROW_HEIGHT - 2),
            ],
            color.stroke_width(1),
        ))
        .map_err(PlotError::Draw)?;
        let style = label_font.clone().color(&color);
        root.draw(&Text::new(l.text, (l.x0, row_top + 2), style))
            .map_err(PlotError::Draw)?;
    }
    let pts = |f: fn(&crate::report::rcu_lifetime::Sample) -> u64| {
        tl.iter()
            .map(move |s| (x_of(s.t_ms), f(s) as f64))
            .collect::<Vec<_>>()
    };
    chart
        .draw_series(LineSeries::new(pts(|s| s.call_rcu), CALLS.stroke_width(3)))
        .map_err(PlotError::Draw)?
        .label("call_rcu calls")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 22, y)], CALLS.stroke_width(3)));
    chart
        .draw_series(LineSeries::new(
            pts(|s| s.callbacks_run),
            RUN.stroke_width(2),
        ))
        .map_err(PlotError::Draw)?
        .label("callbacks run")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 22, y)], RUN.stroke_width(2)));
    let gp_style = GRACE.stroke_width(2);
    let gp_series = LineSeries::new(pts(|s| s.grace_periods), gp_style);
    let gp = if two_axes {
        chart.draw_secondary_series(gp_series)
    } else {
        chart.draw_series(gp_series)
    };
    gp.map_err(PlotError::Draw)?
        .label(if two_axes {
            "grace periods (right axis)"
        } else {
            "grace periods"
        })
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 22, y)], gp_style));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 17))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()
        .map_err(PlotError::Draw)?;
    Ok(())
}

/// A marker label placed in the band above the plot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PlacedLabel {
    /// Index into the report's markers.
    index: usize,
    text: String,
    /// Row in the band, 0 nearest the plot.
    row: usize,
    /// Left edge of the text, in pixels.
    x0: i32,
    /// Right edge of the text, in pixels.
    x1: i32,
    /// The marker line's x, in pixels.
    line_x: i32,
}

/// The text of marker `m`'s label.
fn label_text(m: &crate::report::rcu_lifetime::Marker) -> String {
    match m.kind {
        MarkerKind::Boot => "boot".to_string(),
        MarkerKind::End if m.detail.is_empty() => "end".to_string(),
        MarkerKind::End => format!("end: {}", m.detail),
        MarkerKind::Plug | MarkerKind::Unplug if m.detail.is_empty() => m.kind.name().to_string(),
        MarkerKind::Plug | MarkerKind::Unplug => format!("{} to {}", m.kind.name(), m.detail),
    }
}

/// Places marker labels in [`LABEL_ROWS`] rows above the plot: the end
/// first, then boot, then the others in time order (of markers at the same
/// time, the last first). Each label is centred
/// on its line where the image's edges (`bounds`) allow, in the lowest row
/// where it overlaps no other label (with [`LABEL_GAP`] between them) and
/// no other label's connector line crosses it or its own connector crosses
/// another label; a label that fits nowhere is left out (its line stays).
/// `line_x` maps a time to the line's pixel x; `width` estimates a text's
/// width in pixels.
fn place_labels(
    report: &LifetimeReport,
    line_x: impl Fn(u64) -> i32,
    width: impl Fn(&str) -> i32,
    bounds: (i32, i32),
) -> Vec<PlacedLabel> {
    let rank = |k: MarkerKind| match k {
        MarkerKind::End => 0,
        MarkerKind::Boot => 1,
        MarkerKind::Plug | MarkerKind::Unplug => 2,
    };
    let mut order: Vec<usize> = (0..report.markers.len()).collect();
    // Of markers at the same time, the last says where things ended up.
    order.sort_by_key(|&i| {
        report
            .markers
            .get(i)
            .map(|m| (rank(m.kind), m.t_ms, std::cmp::Reverse(i)))
    });
    let mut placed: Vec<PlacedLabel> = Vec::new();
    for index in order {
        let Some(m) = report.markers.get(index) else {
            continue;
        };
        let text = label_text(m);
        let lx = line_x(m.t_ms);
        let w = width(&text);
        let x0 = (lx - w / 2).min(bounds.1 - w).max(bounds.0);
        let x1 = x0 + w;
        let covers = |a: i32, b: i32, x: i32| x >= a - LABEL_GAP / 2 && x <= b + LABEL_GAP / 2;
        let fits = |row: usize| {
            placed.iter().all(|p| match p.row.cmp(&row) {
                std::cmp::Ordering::Equal => x1 + LABEL_GAP <= p.x0 || p.x1 + LABEL_GAP <= x0,
                // Our connector passes through the lower row.
                std::cmp::Ordering::Less => !covers(p.x0, p.x1, lx),
                // Its connector passes through our row.
                std::cmp::Ordering::Greater => !covers(x0, x1, p.line_x),
            })
        };
        if let Some(row) = (0..LABEL_ROWS).find(|&r| fits(r)) {
            placed.push(PlacedLabel {
                index,
                text,
                row,
                x0,
                x1,
                line_x: lx,
            });
        }
    }
    placed.sort_by_key(|l| l.index);
    placed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::rcu_lifetime::{Marker, Sample};

    fn report(span_ms: u64, calls_per_gp: u64) -> LifetimeReport {
        let mut timeline = Vec::new();
        for i in 0..=100u64 {
            let t_ms = span_ms * i / 100;
            let n = i * i;
            timeline.push(Sample {
                t_ms,
                call_rcu: n,
                callbacks_run: n.saturating_sub(3),
                grace_periods: n / calls_per_gp,
                ..Sample::default()
            });
        }
        let last = timeline[100];
        let marker = |pct: u64, kind, detail: &str, b| Marker {
            t_ms: span_ms * pct / 100,
            kind,
            detail: detail.into(),
            plugged_bytes: b,
        };
        LifetimeReport {
            rcu: rcu::Stats {
                call_rcu: last.call_rcu,
                callbacks_run: last.callbacks_run,
                grace_periods: last.grace_periods,
                ..rcu::Stats::default()
            },
            uptime_ms: span_ms,
            sample_interval_ms: 100,
            markers_dropped: 0,
            timeline,
            markers: vec![
                marker(5, MarkerKind::Boot, "first KVM_RUN", None),
                marker(40, MarkerKind::Plug, "512M", Some(512 << 20)),
                marker(70, MarkerKind::Unplug, "128M", Some(128 << 20)),
                marker(100, MarkerKind::End, "guest powered off", None),
            ],
        }
    }

    /// The text of every `<text>` element.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..];
                Some(body[..body.find("</text>")?].trim().to_string())
            })
            .collect()
    }

    /// Checks that tags open and close in order (enough of XML for SVG as
    /// plotters writes it: no CDATA, no comments).
    fn check_well_formed(svg: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(lt) = rest.find('<') {
            let gt = rest[lt..].find('>').expect("unclosed tag") + lt;
            let tag = &rest[lt + 1..gt];
            rest = &rest[gt + 1..];
            if tag.starts_with('?') || tag.starts_with('!') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().unwrap();
                stack.push(name.to_string());
            }
        }
        assert!(stack.is_empty(), "unclosed elements {stack:?}");
    }

    #[test]
    fn plot_is_svg_with_three_series_legend_axes_and_marker_labels() {
        let r = report(90_000, 20);
        let dir = std::env::temp_dir().join(format!("rcu-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rcu.svg");
        write_plot(&path, &r).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.trim_start().starts_with("<svg"));
        check_well_formed(&svg);
        let t = texts(&svg);
        for want in [
            "call_rcu calls",
            "callbacks run",
            "grace periods (right axis)",
            "boot",
            "plug to 512M",
            "unplug to 128M",
            "end: guest powered off",
            "time since VMM start (s)",
        ] {
            assert!(t.iter().any(|x| x == want), "no text '{want}' in {t:?}");
        }
        // Tick labels on the time axis, up to the 90 s lifetime.
        assert!(t.iter().any(|x| x == "0"));
        assert!(t.iter().any(|x| x == "90"));
        // Each series is a polyline in its own colour.
        for c in [CALLS, RUN, GRACE] {
            let rgb = format!("stroke=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
            let lines = svg
                .split("<polyline")
                .skip(1)
                .filter(|p| {
                    p.split('>')
                        .next()
                        .is_some_and(|attrs| attrs.contains(&rgb))
                })
                .count();
            // The curve, and its sample in the legend.
            assert!(lines >= 1, "no series drawn with {rgb}");
        }
    }

    #[test]
    fn marker_labels_never_overlap_and_crowded_ones_are_left_out() {
        let mut r = report(60_000, 20);
        // Ten plugs a few pixels apart, and one far away.
        for i in 0..10 {
            r.markers.push(Marker {
                t_ms: 30_000 + i * 50,
                kind: MarkerKind::Plug,
                detail: format!("{}M", 128 * (i + 1)),
                plugged_bytes: None,
            });
        }
        r.markers.sort_by_key(|m| m.t_ms);
        // 10 px per second, 10 px per character.
        let placed = place_labels(&r, |t| (t / 100) as i32, |s| 10 * s.len() as i32, (0, 700));
        let n = r.markers.len();
        assert!(placed.len() < n, "all {n} crowded labels placed");
        // The end and boot always get theirs.
        for kind in [MarkerKind::End, MarkerKind::Boot] {
            assert!(placed.iter().any(|l| r.markers[l.index].kind == kind));
        }
        for (i, a) in placed.iter().enumerate() {
            assert!(a.row < LABEL_ROWS && a.x0 >= 0 && a.x1 <= 700);
            for b in &placed[i + 1..] {
                if a.row == b.row {
                    assert!(a.x1 + LABEL_GAP <= b.x0 || b.x1 + LABEL_GAP <= a.x0);
                }
                // No connector crosses a label nearer the plot.
                let (low, high) = if a.row < b.row { (a, b) } else { (b, a) };
                if low.row != high.row {
                    assert!(high.line_x < low.x0 || high.line_x > low.x1);
                }
            }
        }
        // The end marker at the right edge keeps its label inside.
        let end = placed.iter().find(|l| l.text.starts_with("end")).unwrap();
        assert_eq!(end.x1, 700);
    }

    #[test]
    fn close_counts_share_one_axis() {
        let svg = render_svg(&report(5_000, 2)).unwrap();
        let t = texts(&svg);
        assert!(t.iter().any(|x| x == "grace periods"));
        assert!(!t.iter().any(|x| x.contains("right axis")));
    }

    #[test]
    fn long_lives_are_drawn_in_hours_and_crowded_labels_are_skipped() {
        let mut r = report(3 * 24 * 3600 * 1000, 20);
        // A hundred plugs within one minute: lines for all, few labels.
        for i in 0..100 {
            r.markers.push(Marker {
                t_ms: 3600 * 1000 + i * 600,
                kind: MarkerKind::Plug,
                detail: "1G".into(),
                plugged_bytes: Some(1 << 30),
            });
        }
        r.markers.sort_by_key(|m| m.t_ms);
        let svg = render_svg(&r).unwrap();
        let t = texts(&svg);
        assert!(t.iter().any(|x| x == "time since VMM start (h)"));
        let labels = t.iter().filter(|x| x.as_str() == "plug to 1G").count();
        assert!((1..5).contains(&labels), "{labels} crowded labels");
    }

    #[test]
    fn empty_report_still_draws() {
        let r = LifetimeReport {
            rcu: rcu::Stats::default(),
            uptime_ms: 0,
            sample_interval_ms: 100,
            markers_dropped: 0,
            timeline: Vec::new(),
            markers: Vec::new(),
        };
        let svg = render_svg(&r).unwrap();
        check_well_formed(&svg);
        assert!(texts(&svg).iter().any(|x| x == "call_rcu calls"));
    }
}
