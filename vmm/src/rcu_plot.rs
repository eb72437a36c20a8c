//! A picture of a VM's RCU lifetime: cumulative `call_rcu` calls, callbacks
//! run and grace periods against time since VMM start, with a labelled
//! vertical line at boot, each memory plug and unplug, and the end.
//!
//! The picture is an SVG line chart. Its text is SVG `<text>` laid out with
//! estimated metrics, so drawing it needs no font files or font library; the
//! viewer renders the text. When grace periods are far fewer than calls they
//! get their own scale on the right-hand axis, so both stay readable.

use crate::rcu_lifetime::{LifetimeReport, MarkerKind};
use plotters::prelude::*;
use plotters::style::FontTransform;
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Width and height of the picture, in pixels.
pub const SIZE: (u32, u32) = (1100, 620);

/// Grace periods get the right-hand axis when calls outnumber them by at
/// least this factor.
const SECOND_AXIS_RATIO: u64 = 8;

/// Least horizontal distance between two marker labels, in pixels; a label
/// closer than that to one already placed is left out (its line stays).
const LABEL_GAP: i32 = 15;

/// The plot could not be made or written.
#[derive(Debug, Error)]
pub enum PlotError {
    /// The chart library failed to draw.
    #[error("cannot draw the RCU lifetime plot: {0}")]
    Draw(String),
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

fn draw_err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
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

/// Writes the plot of `report` to `path` as SVG, atomically (a temporary
/// file in the same directory, then renamed): a failure leaves the old file
/// or none.
pub fn write_plot(path: &Path, report: &LifetimeReport) -> Result<(), PlotError> {
    let svg = render_svg(report)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(svg.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The plot of `report` as an SVG document.
pub fn render_svg(report: &LifetimeReport) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, report)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    report: &LifetimeReport,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(draw_err)?;
    let tl = &report.timeline;
    let last_ms = tl
        .last()
        .map_or(0, |s| s.t_ms)
        .max(report.uptime_ms)
        .max(report.markers.last().map_or(0, |m| m.t_ms));
    let (unit, unit_name) = time_unit(last_ms as f64 / 1000.0);
    let x_of = |t_ms: u64| t_ms as f64 / 1000.0 / unit;
    let x_max = x_of(last_ms).max(1e-3);

    let max_of = |f: fn(&crate::rcu_lifetime::Sample) -> u64| tl.iter().map(f).max().unwrap_or(0);
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
        .caption(title, ("sans-serif", 19))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .right_y_label_area_size(if two_axes { 72 } else { 14 })
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(draw_err)?
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
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(draw_err)?;
    if two_axes {
        chart
            .configure_secondary_axes()
            .y_desc("grace periods")
            .y_labels(10)
            .y_label_formatter(&int_label)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(draw_err)?;
    }

    // Markers under the curves: a dashed line each, labelled when there is
    // room.
    let plot_area = chart.plotting_area().clone();
    for m in &report.markers {
        let x = x_of(m.t_ms);
        chart
            .draw_series(DashedLineSeries::new(
                [(x, 0.0), (x, y_max)],
                6,
                4,
                marker_color(m.kind).stroke_width(1),
            ))
            .map_err(draw_err)?;
    }
    for (i, text) in marker_labels(report, |t_ms| {
        plot_area.map_coordinate(&(x_of(t_ms), y_max)).0
    }) {
        let Some(m) = report.markers.get(i) else {
            continue;
        };
        let (px, py) = plot_area.map_coordinate(&(x_of(m.t_ms), y_max));
        let style = ("sans-serif", 13)
            .into_font()
            .transform(FontTransform::Rotate90)
            .color(&marker_color(m.kind));
        root.draw(&Text::new(text, (px + 3, py + 4), style))
            .map_err(draw_err)?;
    }

    let pts = |f: fn(&crate::rcu_lifetime::Sample) -> u64| {
        tl.iter()
            .map(move |s| (x_of(s.t_ms), f(s) as f64))
            .collect::<Vec<_>>()
    };
    chart
        .draw_series(LineSeries::new(pts(|s| s.call_rcu), CALLS.stroke_width(3)))
        .map_err(draw_err)?
        .label("call_rcu calls")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 22, y)], CALLS.stroke_width(3)));
    chart
        .draw_series(LineSeries::new(
            pts(|s| s.callbacks_run),
            RUN.stroke_width(2),
        ))
        .map_err(draw_err)?
        .label("callbacks run")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 22, y)], RUN.stroke_width(2)));
    let gp_style = GRACE.stroke_width(2);
    let gp_series = LineSeries::new(pts(|s| s.grace_periods), gp_style);
    let gp = if two_axes {
        chart.draw_secondary_series(gp_series)
    } else {
        chart.draw_series(gp_series)
    };
    gp.map_err(draw_err)?
        .label(if two_axes {
            "grace periods (right axis)"
        } else {
            "grace periods"
        })
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 22, y)], gp_style));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// The markers to label, as (index into `report.markers`, text): the end
/// first, then boot, then the others in time order, each left out if its
/// line (at pixel `px(t_ms)`) is within [`LABEL_GAP`] of a label already
/// placed.
fn marker_labels(report: &LifetimeReport, px: impl Fn(u64) -> i32) -> Vec<(usize, String)> {
    let rank = |k: MarkerKind| match k {
        MarkerKind::End => 0,
        MarkerKind::Boot => 1,
        MarkerKind::Plug | MarkerKind::Unplug => 2,
    };
    let mut order: Vec<usize> = (0..report.markers.len()).collect();
    order.sort_by_key(|&i| report.markers.get(i).map(|m| (rank(m.kind), m.t_ms)));
    let mut placed: Vec<i32> = Vec::new();
    let mut out = Vec::new();
    for i in order {
        let Some(m) = report.markers.get(i) else {
            continue;
        };
        let x = px(m.t_ms);
        if placed.iter().any(|p| (p - x).abs() < LABEL_GAP) {
            continue;
        }
        placed.push(x);
        let text = if m.detail.is_empty() {
            m.kind.name().to_string()
        } else {
            match m.kind {
                MarkerKind::Boot => m.kind.name().to_string(),
                MarkerKind::End => format!("end: {}", m.detail),
                MarkerKind::Plug | MarkerKind::Unplug => {
                    format!("{} to {}", m.kind.name(), m.detail)
                }
            }
        };
        out.push((i, text));
    }
    out.sort_by_key(|(i, _)| *i);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rcu_lifetime::{Marker, Sample};

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
                marker(40, MarkerKind::Plug, "512 MiB", Some(512 << 20)),
                marker(70, MarkerKind::Unplug, "128 MiB", Some(128 << 20)),
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
            "plug to 512 MiB",
            "unplug to 128 MiB",
            "end: guest powered off",
            "time since VMM start (s)",
        ] {
            assert!(t.iter().any(|x| x == want), "no text '{want}' in {t:?}");
        }
        // Tick labels on the time axis, up to the 90 s lifetime.
        assert!(t.iter().any(|x| x == "0"));
        assert!(t.iter().any(|x| x == "90"));
        // Three curves and four marker lines.
        assert_eq!(svg.matches("<polyline").count(), 3 + 4 + 3);
        for c in [CALLS, RUN, GRACE] {
            let rgb = format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2);
            assert!(svg.contains(&rgb), "no series in {rgb}");
        }
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
                detail: "1 GiB".into(),
                plugged_bytes: Some(1 << 30),
            });
        }
        r.markers.sort_by_key(|m| m.t_ms);
        let svg = render_svg(&r).unwrap();
        let t = texts(&svg);
        assert!(t.iter().any(|x| x == "time since VMM start (h)"));
        let labels = t.iter().filter(|x| x.as_str() == "plug to 1 GiB").count();
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
