//! Per-packet cost chart, and the short-connection rates along both axes with the no-load-balancer ceiling,
//! drawn with plotters' SVG backend.
//!
//! Plotters has no dashed stroke in SVG and draws every path, axis lines and
//! tick marks included, as a `<polyline>`. [`finish`] adjusts its output in
//! two ways so that the only polylines are the data series and dashes are
//! real `stroke-dasharray`s: a two-point path of width 1 (axis, tick, target
//! line, legend sample) becomes a `<line>`, and a line or polyline in one of
//! the dashed colours gets a dash pattern. Series are therefore drawn with
//! width 2, and nothing but a dashed element uses a dashed colour.

use std::error::Error;

use plotters::{
    coord::{Shift, combinators::WithKeyPoints, types::RangedCoordf64},
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};
use serde_json::Value;

use super::{
    report::{f, thousands},
    targets,
};

/// Text sizes as plotters counts them: its SVG backend writes `font-size`
/// as the size divided by 1.24, so these give 12, 14 and 11 px.
const FONT: f64 = 14.88;
const TITLE_FONT: f64 = 17.36;
const SMALL_FONT: f64 = 13.64;
/// Axes and frame; not a dashed colour (the ceiling's is #333333).
const AXIS: RGBColor = RGBColor(0x33, 0x33, 0x34);
const GRID: RGBColor = RGBColor(0xe4, 0xe4, 0xe4);
const GREY_TEXT: RGBColor = RGBColor(0x66, 0x66, 0x66);
/// The dashed target lines of the per-packet chart.
const TARGET: RGBColor = RGBColor(0x88, 0x88, 0x88);
const DASH: &str = "7 4";

type Drawn = Result<(), Box<dyn Error>>;

/// Per-packet cost against services, log x: one line per figure, dashed
/// targets.
pub fn chart(r: &Value) -> String {
    render(&[TARGET], |svg| draw_cost(svg, r))
}

/// The per-packet figures: JSON key, legend, colour.
const COST_SERIES: [(&str, &str, RGBColor); 5] = [
    (
        "new_flow_raw_ns",
        "new flow, raw (repeat=1)",
        RGBColor(0xc4, 0x4e, 0x52),
    ),
    (
        "new_flow_ns",
        "new flow, net of call",
        RGBColor(0xdd, 0x84, 0x52),
    ),
    (
        "tc_reply_ns",
        "TC reply (established)",
        RGBColor(0x81, 0x72, 0xb3),
    ),
    (
        "established_ns",
        "established flow",
        RGBColor(0x4c, 0x72, 0xb0),
    ),
    (
        "non_service_ns",
        "non-service packet",
        RGBColor(0x55, 0xa8, 0x68),
    ),
];

fn draw_cost(svg: &mut String, r: &Value) -> Drawn {
    const PLOT_W: u32 = 560;
    const H: u32 = 420;
    let rows = r["datapath"]["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ymax_data = rows
        .iter()
        .flat_map(|row| COST_SERIES.iter().filter_map(|(k, _, _)| f(&row[*k])))
        .fold(targets::NEW_FLOW_NS, f64::max);
    let step = nice_step(ymax_data / 5.0);
    let ymax = (ymax_data / step).ceil() * step;
    let target_labels = [
        format!("target: new flow ≤ {}", targets::NEW_FLOW_NS),
        format!("target: established ≤ {}", targets::ESTABLISHED_NS),
    ];
    let entries: Vec<(&str, RGBColor, bool)> = COST_SERIES
        .iter()
        .map(|&(_, label, color)| (label, color, true))
        .chain(target_labels.iter().map(|l| (l.as_str(), TARGET, false)))
        .collect();
    let date = r["date"].as_str().unwrap_or_default();
    let legend_w = legend_width(&entries, date);

    let root = SVGBackend::with_string(svg, (PLOT_W + legend_w, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, legend_area) = root.split_horizontally(PLOT_W);
    let plot = plot.titled(
        "XDP/TC per-packet cost under BPF_PROG_TEST_RUN (ns, median)",
        ("sans-serif", TITLE_FONT),
    )?;
    let mut c = ChartBuilder::on(&plot)
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (1f64..10_000f64)
                .log_scale()
                .with_key_points(vec![1.0, 10.0, 100.0, 1_000.0, 10_000.0]),
            0f64..ymax,
        )?;
    mesh(
        &mut c,
        "services × 10 endpoints (log scale)",
        "ns per packet",
    )
    .y_labels((ymax / step) as usize + 1)
    .draw()?;
    frame(&c)?;
    // The targets: dashed lines across the chart, named in the legend.
    for ns in [targets::NEW_FLOW_NS, targets::ESTABLISHED_NS] {
        c.draw_series([PathElement::new([(1.0, ns), (10_000.0, ns)], TARGET)])?;
    }
    for (key, _, color) in COST_SERIES {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|row| Some((f(&row["services"])?.max(1.0), f(&row[key])?)))
            .collect();
        series(&mut c, &pts, color)?;
    }
    legend(&legend_area, &entries, date)?;
    root.present()?;
    Ok(())
}

/// The systems of the short-connection runs: JSON `system`, legend, colour,
/// dashed. The pass-only XDP row is only in a full run.
const SYSTEMS: [(&str, &str, RGBColor, bool); 5] = [
    (
        "nolb",
        "no load balancer (ceiling)",
        RGBColor(0x33, 0x33, 0x33),
        true,
    ),
    (
        "nolb_xdp_pass",
        "no load balancer, pass-only XDP",
        RGBColor(0x93, 0x78, 0x60),
        false,
    ),
    (
        "xdp",
        "this project (XDP)",
        RGBColor(0x4c, 0x72, 0xb0),
        false,
    ),
    (
        "nftables",
        "kube-proxy nftables",
        RGBColor(0x55, 0xa8, 0x68),
        false,
    ),
    (
        "iptables",
        "kube-proxy iptables",
        RGBColor(0xc4, 0x4e, 0x52),
        false,
    ),
];

/// Short-connection rates along both axes: services × 10 endpoints (left)
/// and endpoints of one service (right), log x, one line per system, the
/// no-load-balancer rate drawn dashed as the ceiling.
pub fn rates_chart(r: &Value) -> String {
    let dashed: Vec<RGBColor> = SYSTEMS
        .iter()
        .filter(|s| s.3)
        .map(|&(_, _, color, _)| color)
        .collect();
    render(&dashed, |svg| draw_rates(svg, r))
}

fn draw_rates(svg: &mut String, r: &Value) -> Drawn {
    const PANEL_W: u32 = 420;
    const H: u32 = 440;
    let sc = &r["short_connections"];
    let axes: [(&str, &str, &str, [f64; 2]); 2] = [
        (
            "services_axis",
            "services",
            "services × 10 endpoints (log)",
            [1.0, 10_000.0],
        ),
        (
            "endpoints_axis",
            "endpoints",
            "endpoints of one service (log)",
            [2.0, 1_000.0],
        ),
    ];
    let rows_of = |key: &str| sc[key].as_array().cloned().unwrap_or_default();
    let all_rates = axes
        .iter()
        .flat_map(|(k, ..)| rows_of(k))
        .filter_map(|row| f(&row["rate_per_s"]))
        .fold(1.0, f64::max);
    let step = nice_step(all_rates / 5.0);
    let ymax = (all_rates / step).ceil() * step;
    // The legend lists the systems measured on either axis.
    let entries: Vec<(&str, RGBColor, bool)> = SYSTEMS
        .iter()
        .filter(|(system, ..)| {
            axes.iter()
                .flat_map(|(k, ..)| rows_of(k))
                .any(|row| row["system"] == *system)
        })
        .map(|&(_, label, color, _)| (label, color, true))
        .collect();
    let date = r["date"].as_str().unwrap_or_default();
    let legend_w = legend_width(&entries, date);

    let root = SVGBackend::with_string(svg, (2 * PANEL_W + legend_w, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let (panels, legend_area) = root.split_horizontally(2 * PANEL_W);
    let panels = panels.titled(
        "Short connections per second, client → NodePort (one request per connection)",
        ("sans-serif", TITLE_FONT),
    )?;
    for (p, (panel, (key, field, label, [lo, hi]))) in
        panels.split_evenly((1, 2)).iter().zip(axes).enumerate()
    {
        let rows = rows_of(key);
        let mut ticks: Vec<f64> = rows.iter().filter_map(|row| f(&row[field])).collect();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        let mut c = ChartBuilder::on(panel)
            .margin(10)
            .margin_right(20)
            .x_label_area_size(45)
            .y_label_area_size(if p == 0 { 70 } else { 50 })
            .build_cartesian_2d((lo..hi).log_scale().with_key_points(ticks), 0f64..ymax)?;
        mesh(
            &mut c,
            label,
            if p == 0 { "connections per second" } else { "" },
        )
        .y_labels((ymax / step) as usize + 1)
        .draw()?;
        frame(&c)?;
        for (system, _, color, _) in SYSTEMS {
            let mut pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|row| row["system"] == system)
                .filter_map(|row| Some((f(&row[field])?.max(lo), f(&row["rate_per_s"])?)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            series(&mut c, &pts, color)?;
        }
    }
    legend(&legend_area, &entries, date)?;
    root.present()?;
    Ok(())
}

type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<WithKeyPoints<LogCoord<f64>>, RangedCoordf64>>;

/// The grid, tick labels and axis descriptions shared by the charts: light
/// grey lines at the labelled values, thousands separators on the log axis.
fn mesh<'a, 'b, 'c>(
    c: &'c mut Chart<'a, 'b>,
    x_desc: &str,
    y_desc: &str,
) -> plotters::chart::MeshStyle<'a, 'c, WithKeyPoints<LogCoord<f64>>, RangedCoordf64, SVGBackend<'b>>
{
    let mut m = c.configure_mesh();
    m.x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| thousands(v.round() as u64))
        .y_label_formatter(&|v| thousands(v.round() as u64))
        .label_style(("sans-serif", FONT))
        .axis_desc_style(("sans-serif", FONT))
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .axis_style(AXIS);
    m
}

/// A frame around the plotting area, as the axes close only two sides.
fn frame(c: &Chart) -> Drawn {
    let area = c.plotting_area().strip_coord_spec();
    let (w, h) = area.dim_in_pixel();
    area.draw(&Rectangle::new(
        [(0, 0), (w as i32 - 1, h as i32 - 1)],
        AXIS.stroke_width(1),
    ))?;
    Ok(())
}

/// One series: a 2-px line through the points (the one `<polyline>` of the
/// series) and a dot on each point.
fn series(c: &mut Chart, pts: &[(f64, f64)], color: RGBColor) -> Drawn {
    if pts.is_empty() {
        return Ok(());
    }
    c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
    c.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    Ok(())
}

/// Legend column width: sample, gap, the widest label or the date, margins.
fn legend_width(entries: &[(&str, RGBColor, bool)], date: &str) -> u32 {
    let widest = entries
        .iter()
        .map(|(label, ..)| text_width(label, FONT))
        .chain([text_width(date, SMALL_FONT)])
        .max()
        .unwrap_or(0);
    16 + 28 + widest + 16
}

/// Text width as plotters estimates it without fonts: 0.7 em a byte, the em
/// being the size / 1.24².
fn text_width(text: &str, size: f64) -> u32 {
    (size / 1.24 / 1.24 * 0.7 * text.len() as f64).ceil() as u32
}

/// The legend in its own column right of the chart: per entry (label,
/// colour, dot) a line sample, dashed for a dashed colour, with a dot for a
/// series, and the label; the run's date at the bottom.
fn legend(
    area: &DrawingArea<SVGBackend, Shift>,
    entries: &[(&str, RGBColor, bool)],
    date: &str,
) -> Drawn {
    let top = 50;
    for (i, &(label, color, dot)) in entries.iter().enumerate() {
        let y = top + i as i32 * 22;
        area.draw(&PathElement::new([(16, y), (36, y)], color.stroke_width(1)))?;
        if dot {
            area.draw(&Circle::new((26, y), 3, color.filled()))?;
        }
        area.draw(&Text::new(
            label.to_string(),
            (44, y),
            ("sans-serif", FONT)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    let (_, h) = area.dim_in_pixel();
    area.draw(&Text::new(
        date.to_string(),
        (16, h as i32 - 60),
        ("sans-serif", SMALL_FONT).into_font().color(&GREY_TEXT),
    ))?;
    Ok(())
}

/// Runs `draw` on a fresh SVG string, then [`finish`]es it; an error is
/// drawn as the picture's only text.
fn render(dashed: &[RGBColor], draw: impl FnOnce(&mut String) -> Drawn) -> String {
    let mut svg = String::new();
    match draw(&mut svg) {
        Ok(()) => finish(&svg, dashed),
        Err(e) => format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"40\">\
             <text x=\"10\" y=\"25\">chart: {}</text></svg>\n",
            e.to_string()
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        ),
    }
}

/// The two adjustments of plotters' output described at the top of this
/// file. Plotters' SVG backend writes one element a line.
fn finish(svg: &str, dashed: &[RGBColor]) -> String {
    let dashed: Vec<String> = dashed
        .iter()
        .map(|c| format!("stroke=\"{}\"", hex(*c)))
        .collect();
    let mut out = String::with_capacity(svg.len());
    for line in svg.lines() {
        let mut line = if line.starts_with("<polyline") && line.contains("stroke-width=\"1\"") {
            polyline_to_line(line).unwrap_or_else(|| line.to_string())
        } else {
            line.to_string()
        };
        if (line.starts_with("<line") || line.starts_with("<polyline"))
            && dashed.iter().any(|d| line.contains(d.as_str()))
        {
            line = line.replacen("/>", &format!(" stroke-dasharray=\"{DASH}\"/>"), 1);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `<polyline … points="x1,y1 x2,y2 "/>` as `<line … x1 y1 x2 y2/>`; None
/// for any other number of points.
fn polyline_to_line(el: &str) -> Option<String> {
    let start = el.find(" points=\"")?;
    let rest = &el[start + " points=\"".len()..];
    let end = rest.find('"')?;
    let pts: Vec<(&str, &str)> = rest[..end]
        .split_whitespace()
        .map(|p| p.split_once(','))
        .collect::<Option<_>>()?;
    let [(x1, y1), (x2, y2)] = pts[..] else {
        return None;
    };
    let attrs = el[..start]
        .strip_prefix("<polyline")?
        .replace(" fill=\"none\"", "");
    Some(format!(
        "<line{attrs} x1=\"{x1}\" y1=\"{y1}\" x2=\"{x2}\" y2=\"{y2}\"{}",
        &rest[end + 1..]
    ))
}

/// A colour as plotters' SVG backend writes it.
fn hex(c: RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

/// 1, 2 or 5 × 10^k, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(70.0), 100.0);
        assert_eq!(nice_step(150.0), 200.0);
        assert_eq!(nice_step(0.3), 1.0);
    }

    #[test]
    fn two_point_thin_paths_become_dashed_lines() {
        let svg = "<svg>\n\
            <polyline fill=\"none\" opacity=\"1\" stroke=\"#888888\" stroke-width=\"1\" points=\"1,2 3,4 \"/>\n\
            <polyline fill=\"none\" opacity=\"1\" stroke=\"#4C72B0\" stroke-width=\"2\" points=\"1,2 3,4 \"/>\n\
            </svg>\n";
        let out = finish(svg, &[RGBColor(0x88, 0x88, 0x88)]);
        assert!(out.contains(
            "<line opacity=\"1\" stroke=\"#888888\" stroke-width=\"1\" x1=\"1\" y1=\"2\" x2=\"3\" y2=\"4\" stroke-dasharray=\"7 4\"/>"
        ));
        assert_eq!(out.matches("<polyline").count(), 1);
        assert_eq!(out.matches("stroke-dasharray").count(), 1);
    }

    /// What the bench smoke test checks of a quick run's charts: two points
    /// a series, no pass-only XDP row.
    #[test]
    fn quick_run_charts_have_one_polyline_a_series() {
        let row = |s: u64| {
            serde_json::json!({"services": s, "new_flow_raw_ns": 900.0,
            "new_flow_ns": 800.0, "tc_reply_ns": 150.0, "established_ns": 90.0,
            "non_service_ns": 40.0})
        };
        let rate = |system: &str, services: u64, endpoints: u64| {
            serde_json::json!({"system": system, "services": services,
                "endpoints": endpoints, "rate_per_s": 10_000.0})
        };
        let systems = ["nolb", "xdp", "nftables", "iptables"];
        let r = serde_json::json!({
            "date": "2026-01-01T00:00:00Z",
            "datapath": {"rows": [row(1), row(1_000)]},
            "short_connections": {
                "services_axis": systems.iter().flat_map(|s| [rate(s, 1, 10), rate(s, 1_000, 10)])
                    .collect::<Vec<_>>(),
                "endpoints_axis": systems.iter().flat_map(|s| [rate(s, 1, 2), rate(s, 1, 10)])
                    .collect::<Vec<_>>(),
            },
        });
        let svg = chart(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 5);
        let rates = rates_chart(&r);
        assert!(rates.starts_with("<svg") && rates.trim_end().ends_with("</svg>"));
        assert_eq!(rates.matches("<polyline").count(), 8);
        assert_eq!(rates.matches("stroke-dasharray").count(), 3);
    }
}
