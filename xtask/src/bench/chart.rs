//! Per-packet cost chart, and the short-connection rates along both axes with the no-load-balancer ceiling.

use std::fmt::Write as _;

use serde_json::Value;

use super::{report::f, targets};

/// Per-packet cost against services, log x: one line per figure, dashed
/// targets.
pub fn chart(r: &Value) -> String {
    const W: f64 = 720.0;
    const H: f64 = 420.0;
    const L: f64 = 70.0;
    const R: f64 = 200.0;
    const T: f64 = 40.0;
    const B: f64 = 60.0;
    let rows = r["datapath"]["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let series: [(&str, &str, &str); 5] = [
        ("new_flow_raw_ns", "new flow, raw (repeat=1)", "#c44e52"),
        ("new_flow_ns", "new flow, net of call", "#dd8452"),
        ("tc_reply_ns", "TC reply (established)", "#8172b3"),
        ("established_ns", "established flow", "#4c72b0"),
        ("non_service_ns", "non-service packet", "#55a868"),
    ];
    let ymax_data = rows
        .iter()
        .flat_map(|row| series.iter().filter_map(|(k, _, _)| f(&row[*k])))
        .fold(targets::NEW_FLOW_NS, f64::max);
    let step = nice_step(ymax_data / 5.0);
    let ymax = (ymax_data / step).ceil() * step;
    let xmax_log = 4.0_f64; // 10,000 services
    let x = |services: f64| L + (services.max(1.0).log10() / xmax_log) * (W - L - R);
    let y = |ns: f64| T + (1.0 - ns / ymax) * (H - T - B);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="{W}" height="{H}" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="22" font-size="15" text-anchor="middle">XDP/TC per-packet cost under BPF_PROG_TEST_RUN (ns, median)</text>"##,
        (W - R + L) / 2.0
    );
    // Grid and y ticks.
    let mut v = 0.0;
    while v <= ymax + 1e-9 {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v}</text>"##,
            W - R,
            L - 6.0,
            yy + 4.0
        );
        v += step;
    }
    // x ticks (log).
    for (services, label) in [
        (1.0, "1"),
        (10.0, "10"),
        (100.0, "100"),
        (1_000.0, "1,000"),
        (10_000.0, "10,000"),
    ] {
        let xx = x(services);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{T}" x2="{xx:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            H - B,
            H - B + 18.0
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{L}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/><line x1="{L}" y1="{T}" x2="{L}" y2="{:.1}" stroke="#333"/>"##,
        H - B,
        W - R,
        H - B,
        H - B
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">services × 10 endpoints (log scale)</text>"##,
        (W - R + L) / 2.0,
        H - 18.0
    );
    let _ = writeln!(
        s,
        r##"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">ns per packet</text>"##,
        (H - B + T) / 2.0,
        (H - B + T) / 2.0
    );
    // Targets.
    for (ns, label) in [
        (targets::ESTABLISHED_NS, "target: established"),
        (targets::NEW_FLOW_NS, "target: new flow"),
    ] {
        let yy = y(ns);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#888" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" fill="#666" font-size="11">{label} ≤ {ns}</text>"##,
            W - R,
            L + 4.0,
            yy - 4.0
        );
    }
    // Series.
    for (i, (key, label, color)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|row| Some((x(f(&row["services"])?), y(f(&row[*key])?))))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"##,
            path.join(" ")
        );
        for (a, b) in &pts {
            let _ = writeln!(
                s,
                r##"<circle cx="{a:.1}" cy="{b:.1}" r="3.5" fill="{color}"/>"##
            );
        }
        let ly = T + 10.0 + i as f64 * 22.0;
        let lx = W - R + 16.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{label}</text>"##,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" fill="#666" font-size="11">{}</text>"##,
        W - R + 16.0,
        H - B,
        escape(r["date"].as_str().unwrap_or_default())
    );
    s.push_str("</svg>\n");
    s
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

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The systems of the short-connection runs: key, legend, colour, dashed.
const SYSTEMS: [(&str, &str, &str, bool); 4] = [
    ("nolb", "no load balancer (ceiling)", "#333333", true),
    ("xdp", "this project (XDP)", "#4c72b0", false),
    ("nftables", "kube-proxy nftables", "#55a868", false),
    ("iptables", "kube-proxy iptables", "#c44e52", false),
];

/// Short-connection rates along both axes: services × 10 endpoints (left)
/// and endpoints of one service (right), log x, one line per system, the
/// no-load-balancer rate drawn dashed as the ceiling.
pub fn rates_chart(r: &Value) -> String {
    const W: f64 = 980.0;
    const H: f64 = 440.0;
    const PW: f64 = 360.0; // panel width
    const T: f64 = 50.0;
    const B: f64 = 70.0;
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
    let all_rates = axes
        .iter()
        .flat_map(|(k, ..)| sc[*k].as_array().cloned().unwrap_or_default())
        .filter_map(|row| f(&row["rate_per_s"]))
        .fold(1.0, f64::max);
    let step = nice_step(all_rates / 5.0);
    let ymax = (all_rates / step).ceil() * step;
    let y = |v: f64| T + (1.0 - v / ymax) * (H - T - B);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="{W}" height="{H}" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="22" font-size="15" text-anchor="middle">Short connections per second, client → NodePort (one request per connection)</text>"##,
        (2.0 * PW + 140.0) / 2.0
    );
    for (p, (key, field, label, [lo, hi])) in axes.iter().enumerate() {
        let l = 70.0 + p as f64 * (PW + 60.0);
        let x = |v: f64| l + (v.max(*lo).log10() - lo.log10()) / (hi.log10() - lo.log10()) * PW;
        let rows = sc[*key].as_array().cloned().unwrap_or_default();
        let mut v = 0.0;
        while v <= ymax + 1e-9 {
            let yy = y(v);
            let _ = writeln!(
                s,
                r##"<line x1="{l}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v}</text>"##,
                l + PW,
                l - 6.0,
                yy + 4.0
            );
            v += step;
        }
        let mut ticks: Vec<f64> = rows.iter().filter_map(|row| f(&row[*field])).collect();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        for t in ticks {
            let xx = x(t);
            let _ = writeln!(
                s,
                r##"<line x1="{xx:.1}" y1="{T}" x2="{xx:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                H - B,
                H - B + 18.0,
                super::report::thousands(t as u64)
            );
        }
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/><line x1="{l}" y1="{T}" x2="{l}" y2="{:.1}" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            H - B,
            l + PW,
            H - B,
            H - B,
            l + PW / 2.0,
            H - B + 40.0
        );
        for (system, _, color, dashed) in SYSTEMS {
            let mut pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|row| row["system"] == system)
                .filter_map(|row| Some((f(&row[*field])?, f(&row["rate_per_s"])?)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            if pts.is_empty() {
                continue;
            }
            let path: Vec<String> = pts
                .iter()
                .map(|&(a, b)| format!("{:.1},{:.1}", x(a), y(b)))
                .collect();
            let dash = if dashed {
                r#" stroke-dasharray="7 4""#
            } else {
                ""
            };
            let _ = writeln!(
                s,
                r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"##,
                path.join(" ")
            );
            for &(a, b) in &pts {
                let _ = writeln!(
                    s,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"##,
                    x(a),
                    y(b)
                );
            }
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">connections per second</text>"##,
        (H - B + T) / 2.0,
        (H - B + T) / 2.0
    );
    let lx = 2.0 * PW + 160.0;
    for (i, (_, label, color, dashed)) in SYSTEMS.iter().enumerate() {
        let ly = T + 10.0 + i as f64 * 22.0;
        let dash = if *dashed {
            r#" stroke-dasharray="7 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r##"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"##,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(label)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{lx:.1}" y="{:.1}" fill="#666" font-size="11">{}</text>"##,
        H - B,
        escape(r["date"].as_str().unwrap_or_default())
    );
    s.push_str("</svg>\n");
    s
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
}
