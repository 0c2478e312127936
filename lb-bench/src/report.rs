//! The targets' verdicts, the summary printed at the end and `docs/benchmarks.md`.
//!
//! The page's words live in `docs/templates/benchmarks.md.j2`, built into
//! the binary; [`markdown`] renders it from a context computed here: every
//! figure already formatted as text (the page never depends on the template
//! engine's number formatting), the tables as rows, the targets with their
//! verdicts and which paragraphs of the closing note apply.

use minijinja::{AutoEscape, Environment, UndefinedBehavior, syntax::SyntaxConfig, value::Serde};
use serde_json::{Value, json};

use super::targets;

/// The template of `docs/benchmarks.md`, path relative to this file.
const TEMPLATE: &str = include_str!("../../docs/templates/benchmarks.md.j2");
/// The template's name in error messages.
const TEMPLATE_NAME: &str = "docs/templates/benchmarks.md.j2";

pub(super) fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// One target: which, what, the measured figure as text and whether it is
/// met (`None`: not measured, or not at the scale the target is about).
struct Target {
    /// Names the target for the closing note (`what` carries figures).
    key: &'static str,
    what: String,
    measured: String,
    met: Option<bool>,
}

impl Target {
    fn new(key: &'static str, what: String, measured: String, met: Option<bool>) -> Self {
        Self {
            key,
            what,
            measured,
            met,
        }
    }

    fn missed(&self) -> bool {
        self.met == Some(false)
    }
}

fn target_rows(r: &Value) -> Vec<Target> {
    let mut rows = Vec::new();
    let dp = &r["datapath"];
    let dp_rows = dp["rows"].as_array().cloned().unwrap_or_default();
    let worst = |k: &str| {
        dp_rows
            .iter()
            .filter_map(|row| f(&row[k]))
            .fold(f64::NAN, f64::max)
    };
    let est = worst("established_ns");
    rows.push(Target::new(
        "established",
        format!(
            "XDP established flow ≤ {} ns (every service count)",
            targets::ESTABLISHED_NS
        ),
        format!("worst {est:.1} ns"),
        Some(est <= targets::ESTABLISHED_NS),
    ));
    let new = worst("new_flow_ns");
    let new_raw = worst("new_flow_raw_ns");
    rows.push(Target::new(
        "new_flow",
        format!(
            "XDP new flow ≤ {} ns (every service count)",
            targets::NEW_FLOW_NS
        ),
        format!("worst {new:.1} ns net of call overhead ({new_raw:.1} ns raw)"),
        Some(new <= targets::NEW_FLOW_NS),
    ));
    let sp = &dp["spread_pct"];
    let from = sp["from_services"].as_u64().unwrap_or(0);
    let to = sp["to_services"].as_u64().unwrap_or(0);
    for (k, what) in [
        ("established_ns", "established"),
        ("new_flow_ns", "new flow"),
    ] {
        if let Some(p) = f(&sp[k]) {
            // A quick run stops at 1,000 services: no verdict on 10,000.
            let full = to >= 10_000;
            rows.push(Target::new(
                "services_spread",
                format!(
                    "XDP {what} within ±{}% from 1 to 10,000 services",
                    targets::SERVICES_SPREAD_PCT
                ),
                format!(
                    "{p:+.1}% ({} → {} services{})",
                    thousands(from),
                    thousands(to),
                    if full { "" } else { "; needs the full run" }
                ),
                full.then_some(p.abs() <= targets::SERVICES_SPREAD_PCT),
            ));
        }
    }
    let s = &r["spread"];
    if let Some(mm) = f(&s["maglev"]["max_min_ratio"]) {
        rows.push(Target::new(
            "maglev",
            format!(
                "Maglev max/min ≤ {} over 100,000 flows",
                targets::MAGLEV_MAX_MIN
            ),
            format!("{mm:.4}"),
            Some(mm <= targets::MAGLEV_MAX_MIN),
        ));
    }
    if let Some(m) = f(&s["removal"]["maglev_moved_share"]) {
        rows.push(Target::new(
            "moved",
            format!(
                "≤ {:.0}% of flows move when one of ten backends is removed",
                targets::MOVED_SHARE * 100.0
            ),
            format!("{:.2}%", m * 100.0),
            Some(m <= targets::MOVED_SHARE),
        ));
    }
    if let Some(p99) = f(&r["sync_latency"]["p99_ms"]) {
        rows.push(Target::new(
            "sync",
            format!(
                "watch event → maps ≤ {} ms at p99 ({} services)",
                targets::SYNC_P99_MS,
                r["sync_latency"]["services_in_store"]
            ),
            format!("{p99:.2} ms"),
            Some(p99 <= targets::SYNC_P99_MS),
        ));
    }
    let sus = &r["sync_latency"]["sustained"];
    if let (Some(p99), Some(cpu)) = (f(&sus["p99_ms"]), f(&sus["agent_cpu_cores"])) {
        rows.push(Target::new(
            "sustained",
            format!(
                "{} changes/s at {} services: p99 ≤ {} ms, agent ≤ {} cores",
                sus["rate_per_s"],
                sus["services_in_store"],
                targets::SUSTAINED_P99_MS,
                targets::SUSTAINED_CPU_CORES
            ),
            format!("{p99:.2} ms, {cpu:.2} cores"),
            Some(p99 <= targets::SUSTAINED_P99_MS && cpu <= targets::SUSTAINED_CPU_CORES),
        ));
    }
    // Per-packet cost along the endpoints axis.
    let ep = &dp["endpoints_axis"]["spread_pct"];
    for (k, what) in [
        ("established_ns", "established"),
        ("new_flow_ns", "new flow"),
    ] {
        if let Some(p) = f(&ep[k]) {
            let full = ep["to_endpoints"].as_u64().unwrap_or(0) >= 1_000;
            rows.push(Target::new(
                "endpoints_spread",
                format!(
                    "XDP {what} within ±{}% from 2 to 1,000 endpoints",
                    targets::ENDPOINTS_SPREAD_PCT
                ),
                format!(
                    "{p:+.1}% ({} → {} endpoints{})",
                    ep["from_endpoints"],
                    ep["to_endpoints"],
                    if full { "" } else { "; needs the full run" }
                ),
                full.then_some(p.abs() <= targets::ENDPOINTS_SPREAD_PCT),
            ));
        }
    }
    short_connection_targets(r, &mut rows);
    control_plane_targets(r, &mut rows);
    rows
}

/// The rate of `system` at the point of `axis` where `field` = `at`.
pub(super) fn rate_at(r: &Value, axis: &str, field: &str, at: u64, system: &str) -> Option<f64> {
    r["short_connections"][axis]
        .as_array()?
        .iter()
        .find(|row| row[field].as_u64() == Some(at) && row["system"] == system)
        .and_then(|row| f(&row["rate_per_s"]))
}

fn short_connection_targets(r: &Value, rows: &mut Vec<Target>) {
    let sc = &r["short_connections"];
    if !sc.is_object() {
        return;
    }
    let at =
        |services: u64, system: &str| rate_at(r, "services_axis", "services", services, system);
    if let (Some(x), Some(i), Some(n)) = (at(1, "xdp"), at(1, "iptables"), at(1, "nftables")) {
        rows.push(Target::new(
            "vs_kube_proxy",
            "short connections at 1 service ≥ both kube-proxy modes".into(),
            format!(
                "{x:.0}/s: {:.2}× iptables ({i:.0}/s), {:.2}× nftables ({n:.0}/s)",
                x / i,
                x / n
            ),
            Some(x >= i && x >= n),
        ));
    }
    let ten_k = (at(10_000, "xdp"), at(10_000, "iptables"));
    rows.push(Target::new(
        "vs_iptables",
        format!(
            "short connections at 10,000 services ≥ {}× iptables",
            targets::VS_IPTABLES_AT_10K
        ),
        match ten_k {
            (Some(x), Some(i)) => format!("{:.2}× ({x:.0}/s against {i:.0}/s)", x / i),
            _ => "needs the full run".into(),
        },
        match ten_k {
            (Some(x), Some(i)) => Some(x >= targets::VS_IPTABLES_AT_10K * i),
            _ => None,
        },
    ));
    let worst = AXES
        .iter()
        .flat_map(|(axis, _)| sc[*axis].as_array().cloned().unwrap_or_default())
        .filter(|row| row["system"] == "xdp")
        .filter_map(|row| {
            Some((
                f(&row["fraction_of_nolb"])?,
                row["services"].as_u64()?,
                row["endpoints"].as_u64()?,
            ))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((frac, s, e)) = worst {
        rows.push(Target::new(
            "fraction_of_nolb",
            format!(
                "short connections ≥ {}× the no-load-balancer rate at every point",
                targets::FRACTION_OF_NOLB
            ),
            format!(
                "worst {frac:.2}× ({} services × {} endpoints)",
                thousands(s),
                thousands(e)
            ),
            Some(frac >= targets::FRACTION_OF_NOLB),
        ));
    }
}

fn control_plane_targets(r: &Value, rows: &mut Vec<Target>) {
    let cp = &r["control_plane"];
    let Some(n) = cp["services"].as_u64() else {
        return;
    };
    let full = n >= 10_000;
    let scope = if full {
        String::new()
    } else {
        format!(" (measured at {}; needs the full run)", thousands(n))
    };
    if let Some(ms) = f(&cp["xdp"]["initial_ms"]) {
        rows.push(Target::new(
            "initial",
            format!(
                "10,000 × 10 from objects to a ready dataplane ≤ {} ms",
                targets::CONTROL_PLANE_INITIAL_MS
            ),
            format!("{ms:.0} ms{scope}"),
            full.then_some(ms <= targets::CONTROL_PLANE_INITIAL_MS),
        ));
    }
    if let Some(ms) = f(&cp["xdp"]["add_endpoint_ms"]) {
        rows.push(Target::new(
            "add_endpoint",
            format!(
                "one added endpoint at 10,000 services ≤ {} ms",
                targets::CONTROL_PLANE_ADD_MS
            ),
            format!("{ms:.1} ms{scope}"),
            full.then_some(ms <= targets::CONTROL_PLANE_ADD_MS),
        ));
    }
    let mem = &cp["xdp"]["memory"];
    let mib = |v: &Value| f(v).map(|b| b / (1024.0 * 1024.0));
    for (key, what, value, target) in [
        (
            "kernel_memory",
            "kernel memory of every map at 10,000 × 10 on this machine",
            mib(&mem["bytes_memlock"]),
            targets::KERNEL_MEMORY_MIB,
        ),
        (
            "kernel_memory_128",
            "kernel memory of every map at 10,000 × 10 on a 128-CPU node (projected)",
            mib(&mem["projected_bytes"]),
            targets::KERNEL_MEMORY_128_CPUS_MIB,
        ),
        (
            "agent_rss",
            "agent resident memory at 10,000 × 10",
            mib(&mem["agent_rss_bytes"]),
            targets::AGENT_RSS_MIB,
        ),
    ] {
        if let Some(v) = value {
            rows.push(Target::new(
                key,
                format!("{what} ≤ {target:.0} MiB"),
                format!("{v:.0} MiB{scope}"),
                full.then_some(v <= target),
            ));
        }
    }
}

pub fn verdicts(r: &Value) -> Value {
    Value::Array(
        target_rows(r)
            .into_iter()
            .map(|t| json!({"target": t.what, "measured": t.measured, "met": t.met}))
            .collect(),
    )
}

pub(super) fn print_summary(r: &Value) {
    println!("\nbench: targets");
    for t in target_rows(r) {
        let word = match t.met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "  -   ",
        };
        println!("  {word} {}: {}", t.what, t.measured);
    }
    if r["quick"].as_bool() == Some(true) {
        println!("  (quick run: 1 and 1,000 services only; the ±15% targets need the full run)");
    }
}

fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "—".into(),
    }
}

pub(super) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A count with thousands separators; 0 when absent.
fn count(v: &Value) -> String {
    thousands(v.as_u64().unwrap_or(0))
}

/// A string of the results; `?` when absent.
fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// A value as the results hold it, in JSON (`null` when absent).
fn raw(v: &Value) -> String {
    v.to_string()
}

/// `docs/benchmarks.md` from the results.
///
/// Panics if the template does not render: it is built into the binary and
/// the unit tests render it, so that is a bug of the template or of
/// `context`, not of the results.
pub fn markdown(r: &Value) -> String {
    let mut env = Environment::new();
    // A block tag alone on its line leaves nothing in the output: the
    // template keeps one statement a line and the page its exact layout.
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(true)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    // Markdown: nothing to escape.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // The context has every key the template reads (`null` for a missing
    // section), so a misspelt name fails the tests instead of printing
    // nothing.
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.template_from_named_str(TEMPLATE_NAME, TEMPLATE)
        .and_then(|t| t.render(minijinja::Value::from(Serde(context(r)))))
        .unwrap_or_else(|e| panic!("render {TEMPLATE_NAME}: {e}"))
}

/// What the template shows, from the results.
fn context(r: &Value) -> Value {
    let mach = &r["machine"];
    let targets = target_rows(r);
    json!({
        "quick": r["quick"].as_bool() == Some(true),
        "run": {
            "date": text(&r["date"]),
            "git": text(&r["git"]),
            "seconds": format!("{:.0}", r["duration_seconds"].as_f64().unwrap_or_default()),
        },
        "machine": {
            "kernel": text(&mach["kernel"]),
            "cpu": text(&mach["cpu"]),
            "cores": raw(&mach["cores"]),
            "memory_mib": raw(&mach["memory_mib"]),
            "loadavg": text(&mach["loadavg_at_start"]),
        },
        "targets": targets
            .iter()
            .map(|t| json!({"what": t.what, "measured": t.measured, "met": t.met}))
            .collect::<Vec<_>>(),
        "missed": targets
            .iter()
            .filter(|t| t.missed())
            .map(|t| t.what.as_str())
            .collect::<Vec<_>>(),
        "datapath": datapath(&r["datapath"]),
        "snat": snat(&r["snat"]),
        "spread": spread(&r["spread"]),
        "sync": sync_latency(&r["sync_latency"]),
        "short": short_connections(r),
        "udp": udp(&r["udp"]),
        "control_plane": control_plane(&r["control_plane"]),
        "notes": closing_note(r, &targets),
    })
}

/// Section 1: per-packet cost along services, then along endpoints and
/// under each balancing policy.
fn datapath(dp: &Value) -> Value {
    let rows: Vec<Value> = dp["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            json!({
                "services": count(&row["services"]),
                "non_service": num(&row["non_service_ns"], 1),
                "established": num(&row["established_ns"], 1),
                "new_flow": num(&row["new_flow_ns"], 1),
                "new_flow_raw": num(&row["new_flow_raw_ns"], 1),
                "call_overhead": num(&row["call_overhead_ns"], 1),
                "tc_reply": num(&row["tc_reply_ns"], 1),
                "fill": num(&row["fill_seconds"], 2),
            })
        })
        .collect();
    let sp = &dp["spread_pct"];
    let spread = sp.is_object().then(|| {
        json!({
            "from": count(&sp["from_services"]),
            "to": count(&sp["to_services"]),
            "non_service": num(&sp["non_service_ns"], 1),
            "established": num(&sp["established_ns"], 1),
            "new_flow": num(&sp["new_flow_ns"], 1),
            "new_flow_raw": num(&sp["new_flow_raw_ns"], 1),
            "tc_reply": num(&sp["tc_reply_ns"], 1),
            "target": targets::SERVICES_SPREAD_PCT.to_string(),
        })
    });
    let method = &dp["method"];
    json!({
        "calls": raw(&dp["calls_per_figure"]),
        "repeat": count(&dp["repeat"]),
        "new_flow_packets": count(&dp["new_flow_packets_per_call"]),
        "endpoints_per_service": raw(&dp["endpoints_per_service"]),
        "maglev_table_size": raw(&dp["maglev_table_size"]),
        "rows": rows,
        "spread": spread,
        "method": {
            "non_service": text(&method["non_service"]),
            "established": text(&method["established"]),
            "new_flow": text(&method["new_flow"]),
            "tc_reply": text(&method["tc_reply"]),
            "maps": text(&method["maps"]),
        },
        "endpoints_axis": endpoints_axis(&dp["endpoints_axis"]),
        "policy": policy(&dp["policy_new_flow"]),
    })
}

fn endpoints_axis(ep: &Value) -> Value {
    if !ep.is_object() {
        return Value::Null;
    }
    let rows: Vec<Value> = ep["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            json!({
                "endpoints": count(&row["endpoints"]),
                "non_service": num(&row["non_service_ns"], 1),
                "established": num(&row["established_ns"], 1),
                "new_flow": num(&row["new_flow_ns"], 1),
                "new_flow_raw": num(&row["new_flow_raw_ns"], 1),
                "tc_reply": num(&row["tc_reply_ns"], 1),
            })
        })
        .collect();
    let sp = &ep["spread_pct"];
    json!({
        "rows": rows,
        "from": raw(&sp["from_endpoints"]),
        "to": raw(&sp["to_endpoints"]),
        "established": num(&sp["established_ns"], 1),
        "new_flow": num(&sp["new_flow_ns"], 1),
        "target": targets::ENDPOINTS_SPREAD_PCT.to_string(),
        "method": text(&ep["method"]),
    })
}

fn policy(pol: &Value) -> Value {
    if !pol.is_object() {
        return Value::Null;
    }
    json!({
        "maglev": num(&pol["maglev_ns"], 1),
        "round_robin": num(&pol["round_robin_ns"], 1),
        "least_conn_8": num(&pol["least_conn_8_ns"], 1),
        "least_conn_64": num(&pol["least_conn_64_ns"], 1),
        "least_conn_256": num(&pol["least_conn_256_ns"], 1),
        "method": text(&pol["method"]),
    })
}

/// Section 1's forwarding path (remote backends).
fn snat(sn: &Value) -> Value {
    if !sn.is_object() {
        return Value::Null;
    }
    json!({
        "new_flow": raw(&sn["new_forwarded_flow_ns"]),
        "established": raw(&sn["established_forwarded_ns"]),
        "reverse": raw(&sn["reverse_snat_ns"]),
        "call_overhead": raw(&sn["call_overhead_ns"]),
        "method": text(&sn["method"]),
    })
}

/// Section 2: Maglev's spread against kube-proxy's random choices.
fn spread(s: &Value) -> Value {
    let system = |k: &str| {
        let shares: Vec<String> = s[k]["shares"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| format!("{:.2}%", v.as_f64().unwrap_or_default() * 100.0))
            .collect();
        json!({
            "max_min": num(&s[k]["max_min_ratio"], 4),
            "chi_square": num(&s[k]["chi_square"], 2),
            "p_value": num(&s[k]["p_value"], 3),
            "shares": shares.join(" "),
        })
    };
    let rm = &s["removal"];
    let pct = |v: &Value| format!("{:.2}%", v.as_f64().unwrap_or(f64::NAN) * 100.0);
    json!({
        "flows": count(&s["flows"]),
        "backends": raw(&s["backends"]),
        "maglev": system("maglev"),
        "iptables": system("iptables_random"),
        "nftables": system("nftables_numgen"),
        "slots_max_min": num(&s["maglev_table_slots_max_min_ratio"], 4),
        "removal": {
            "backend": text(&rm["removed_backend"]),
            "maglev": pct(&rm["maglev_moved_share"]),
            "maglev_surviving": pct(&rm["maglev_moved_share_of_surviving_backends"]),
            "iptables": pct(&rm["iptables_moved_share_simulated"]),
            "nftables": pct(&rm["nftables_moved_share_simulated"]),
            "theory": pct(&rm["iptables_moved_share_theoretical"]),
        },
        "seed": text(&s["seed"]),
        "method": text(&s["method"]),
    })
}

/// Section 3: sync latency, one run per store size.
fn sync_latency(sl: &Value) -> Value {
    let runs: Vec<Value> = sl["by_store_size"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|run| {
            json!({
                "changes": count(&run["changes"]),
                "changes_unformatted": raw(&run["changes"]),
                "services": count(&run["services_in_store"]),
                "endpoints": raw(&run["endpoints_per_service"]),
                "p50": num(&run["p50_ms"], 2),
                "p90": num(&run["p90_ms"], 2),
                "p99": num(&run["p99_ms"], 2),
                "max": num(&run["max_ms"], 2),
                "mean": num(&run["mean_ms"], 2),
                "ops": num(&run["ops_per_sync_mean"], 1),
                "first_sync": num(&run["first_full_sync_seconds_from_spawn"], 2),
                "skipped": raw(&run["syncs_without_ops_skipped"]),
                "errors": raw(&run["agent_errors_logged"]),
                "synced_early": raw(&run["synced_before_apply_returned"]),
            })
        })
        .collect();
    let sus = &sl["sustained"];
    json!({
        "runs": runs,
        "agent": text(&sl["agent"]),
        "method": text(&sl["method"]),
        "sustained": {
            "services": count(&sus["services_in_store"]),
            "rate": count(&sus["rate_per_s"]),
            "seconds": raw(&sus["seconds"]),
            "changes": count(&sus["changes"]),
            "late": raw(&sus["changes_applied_late"]),
            "p50": num(&sus["p50_ms"], 2),
            "p99": num(&sus["p99_ms"], 2),
            "max": num(&sus["max_ms"], 2),
            "syncs": count(&sus["syncs"]),
            "per_sync": num(&sus["changes_per_sync"], 2),
            "sync_p50": num(&sus["sync_ms_p50"], 2),
            "sync_p99": num(&sus["sync_ms_p99"], 2),
            "cpu": num(&sus["agent_cpu_cores"], 2),
            "errors": raw(&sus["agent_errors_logged"]),
            "method": text(&sus["method"]),
        },
    })
}

/// The systems of the traffic runs, in table order (the template names them).
const SYSTEMS: [&str; 5] = ["nolb", "nolb_xdp_pass", "xdp", "nftables", "iptables"];

/// The axes of the traffic runs: the key in the results and the field that
/// holds each point's position.
const AXES: [(&str, &str); 2] = [
    ("services_axis", "services"),
    ("endpoints_axis", "endpoints"),
];

fn ev(row: &Value, path: &str) -> Option<f64> {
    let mut cur = &row["evidence"]["max_rate"];
    for part in path.split('.') {
        cur = &cur[part];
    }
    f(cur)
}

/// What the counters of a max-rate run say limited it: each of these that
/// the evidence shows, in this order, or `none` with the CPU's load. The
/// template words each `kind`.
fn limit_of(row: &Value) -> Vec<Value> {
    let n = |p: &str| ev(row, p).unwrap_or(0.0);
    let whole = |x: f64| format!("{x:.0}");
    let percent = |x: f64| format!("{:.0}", x * 100.0);
    let failures = row["max_rate"]["failures"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_f64).sum::<f64>())
        .unwrap_or(0.0);
    let mut why = Vec::new();
    if n("node_conntrack.insert_failed") > 0.0 || n("node_conntrack.drop") > 0.0 {
        why.push(json!({
            "kind": "conntrack",
            "insert_failed": whole(n("node_conntrack.insert_failed")),
            "drops": whole(n("node_conntrack.drop")),
        }));
    }
    if n("client.TcpAttemptFails") > 0.0 || failures > 0.0 {
        why.push(json!({
            "kind": "connects",
            "client": whole(n("client.TcpAttemptFails")),
            "generator": whole(failures),
        }));
    }
    if n("client.TcpExtTCPSynRetrans") > 0.0 {
        why.push(json!({
            "kind": "syns",
            "retransmitted": whole(n("client.TcpExtTCPSynRetrans")),
        }));
    }
    let busy = n("cpu.busy");
    if busy >= 0.9 {
        why.push(json!({
            "kind": "cpu",
            "busy": percent(busy),
            "softirq": percent(n("cpu.softirq")),
        }));
    }
    if why.is_empty() {
        why.push(json!({"kind": "none", "busy": percent(busy)}));
    }
    why
}

/// Section 4: short connections along both axes and what limits each
/// system; `null` when the traffic runs are absent.
fn short_connections(r: &Value) -> Value {
    let sc = &r["short_connections"];
    if !sc.is_object() {
        return Value::Null;
    }
    let mut axes = Vec::new();
    for (axis, field) in AXES {
        let rows = sc[axis].as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            continue;
        }
        let mut points: Vec<u64> = rows.iter().filter_map(|row| row[field].as_u64()).collect();
        points.sort_unstable();
        points.dedup();
        let mut table = Vec::new();
        let mut ratios = Vec::new();
        for &p in &points {
            for system in SYSTEMS {
                let Some(row) = rows
                    .iter()
                    .find(|row| row[field].as_u64() == Some(p) && row["system"] == system)
                else {
                    continue;
                };
                table.push(json!({
                    "point": thousands(p),
                    "system": system,
                    "rate": num(&row["rate_per_s"], 0),
                    "fraction": num(&row["fraction_of_nolb"], 2),
                    "p50": num(&row["p50_ms"], 3),
                    "p99": num(&row["p99_ms"], 3),
                    "failures": raw(&row["failures"]),
                    "answered": raw(&row["endpoints_answered"]),
                }));
            }
            let rate = |system: &str| rate_at(r, axis, field, p, system);
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "—".into(),
            };
            let x = rate("xdp");
            ratios.push(json!({
                "point": thousands(p),
                "iptables": ratio(x, rate("iptables")),
                "nftables": ratio(x, rate("nftables")),
                "nolb": ratio(x, rate("nolb")),
            }));
        }
        axes.push(json!({"field": field, "rows": table, "ratios": ratios}));
    }
    let mut limits = Vec::new();
    for (axis, field) in AXES {
        for row in sc[axis].as_array().into_iter().flatten() {
            let pct = |p: &str| {
                ev(row, p)
                    .map(|x| format!("{:.0}%", x * 100.0))
                    .unwrap_or("—".into())
            };
            let n = |p: &str| {
                ev(row, p)
                    .map(|x| thousands(x.max(0.0) as u64))
                    .unwrap_or("—".into())
            };
            limits.push(json!({
                "point": count(&row[field]),
                "field": field,
                "system": text(&row["system"]),
                "cpu_busy": pct("cpu.busy"),
                "softirq": pct("cpu.softirq"),
                "client_tw": n("client.TcpExtTW"),
                "client_tw_recycled": n("client.TcpExtTWRecycled"),
                "client_tw_killed": n("client.TcpExtTWKilled"),
                "pod_tw": n("pods.TcpExtTW"),
                "conntrack_inserts": n("node_conntrack.insert"),
                "conntrack_at_end": n("node_conntrack.count_at_end"),
                "limit": limit_of(row),
            }));
        }
    }
    json!({
        "method": text(&sc["method"]),
        "axes": axes,
        "offered_load": num(&sc["offered_load_per_s"], 0),
        "limits": limits,
    })
}

/// Section 5: UDP (shown with the short connections only).
fn udp(u: &Value) -> Value {
    if !u.is_object() {
        return Value::Null;
    }
    let rows: Vec<Value> = u["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            json!({
                "system": text(&row["system"]),
                "rate": num(&row["rate_per_s"], 0),
                "packets": num(&row["packets_forwarded_per_s"], 0),
                "fraction": num(&row["fraction_of_nolb"], 2),
                "cpu_us": num(&row["cpu_us_per_request"], 2),
                "lost": raw(&row["lost"]),
                "stale": raw(&row["stale"]),
            })
        })
        .collect();
    json!({"method": text(&u["method"]), "rows": rows})
}

/// Section 6: from objects to a ready dataplane, this project against each
/// kube-proxy mode that was measured.
fn control_plane(cp: &Value) -> Value {
    if !cp.is_object() {
        return Value::Null;
    }
    let x = &cp["xdp"];
    let kube_proxy: Vec<Value> = ["nftables", "iptables", "iptables_legacy"]
        .into_iter()
        .filter(|k| cp[*k].is_object())
        .map(|k| {
            let v = &cp[k];
            json!({
                "mode": k,
                "backend": v["backend"].as_str(),
                "initial": num(&v["initial_ms"], 0),
                "add": num(&v["add_endpoint_ms"], 1),
                "rules": count(&v["rules"]),
                "bytes": count(&v["bytes"]),
                "add_rules": count(&v["add_endpoint_rules"]),
                "add_bytes": count(&v["add_endpoint_bytes"]),
            })
        })
        .collect();
    json!({
        "services": count(&cp["services"]),
        "endpoints": raw(&cp["endpoints_per_service"]),
        "xdp": {
            "initial": num(&x["initial_ms"], 0),
            "initial_after_attach": num(&x["initial_after_attach_ms"], 0),
            "add": num(&x["add_endpoint_ms"], 1),
            "add_agent": num(&x["add_endpoint_agent_ms"], 1),
            "manifest_bytes": count(&x["manifest_bytes"]),
        },
        "memory": memory(&x["memory"]),
        "kube_proxy": kube_proxy,
        "method": text(&cp["method"]),
    })
}

/// The maps' kernel memory and the agent's resident set, in MiB, largest
/// map first.
fn memory(m: &Value) -> Value {
    if !m.is_object() {
        return Value::Null;
    }
    let mib = |v: &Value| f(v).map(|b| format!("{:.1}", b / (1024.0 * 1024.0)));
    let mut maps: Vec<&Value> = m["maps"].as_array().into_iter().flatten().collect();
    maps.sort_by_key(|v| std::cmp::Reverse(v["bytes_memlock"].as_u64().unwrap_or(0)));
    json!({
        "cpus": raw(&m["possible_cpus"]),
        "projected_cpus": raw(&m["projected_cpus"]),
        "total": mib(&m["bytes_memlock"]),
        "projected": mib(&m["projected_bytes"]),
        "rss": mib(&m["agent_rss_bytes"]),
        "maps": maps
            .into_iter()
            .map(|v| json!({
                "name": text(&v["name"]),
                "type": text(&v["type"]),
                "entries": count(&v["max_entries"]),
                "value": raw(&v["value_size"]),
                "mib": mib(&v["bytes_memlock"]),
                "projected": mib(&v["projected_bytes"]),
            }))
            .collect::<Vec<_>>(),
    })
}

/// The closing note: which paragraphs apply (one per group of missed
/// targets) and the figures they quote.
fn closing_note(r: &Value, targets: &[Target]) -> Value {
    let missed = |keys: &[&str]| targets.iter().any(|t| t.missed() && keys.contains(&t.key));
    // The pass-only XDP row's share of the no-LB rate, at every point.
    let pass_fraction: Vec<String> = AXES
        .iter()
        .flat_map(|(axis, _)| {
            r["short_connections"][*axis]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|row| row["system"] == "nolb_xdp_pass")
        .filter_map(|row| f(&row["fraction_of_nolb"]))
        .map(|x| format!("{x:.2}"))
        .collect();
    // What limited this project's max-rate runs, point by point.
    let mut xdp_limits = Vec::new();
    for (axis, field) in AXES {
        for row in r["short_connections"][axis]
            .as_array()
            .into_iter()
            .flatten()
        {
            if row["system"] == "xdp" {
                xdp_limits.push(json!({
                    "point": count(&row[field]),
                    "field": field,
                    "limit": limit_of(row),
                }));
            }
        }
    }
    json!({
        "new_flow": missed(&["new_flow"]),
        "established": missed(&["established"]),
        "spread": missed(&["services_spread", "endpoints_spread"]),
        "maglev": missed(&["maglev"]),
        "moved": missed(&["moved"]),
        "sync": missed(&["sync"]),
        "short": missed(&["vs_kube_proxy", "vs_iptables", "fraction_of_nolb"]),
        "control_plane": missed(&["initial", "add_endpoint"]),
        "memory": missed(&["kernel_memory", "kernel_memory_128"]),
        "agent_rss": missed(&["agent_rss"]),
        "largest_services": raw(
            r["datapath"]["services"]
                .as_array()
                .and_then(|a| a.last())
                .unwrap_or(&Value::Null)
        ),
        "pass_fraction": pass_fraction,
        "xdp_limits": xdp_limits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The results the committed page was rendered from.
    fn committed() -> Value {
        serde_json::from_str(include_str!("../../docs/benchmarks.json"))
            .expect("docs/benchmarks.json parses")
    }

    #[test]
    fn renders_the_committed_results_without_template_syntax() {
        let full = committed();
        // The same results without the sections a partial run lacks, so
        // that the template's other branches render too.
        let mut partial = full.clone();
        partial["quick"] = json!(true);
        for key in ["short_connections", "udp", "control_plane", "snat"] {
            partial[key] = Value::Null;
        }
        partial["datapath"]["endpoints_axis"] = Value::Null;
        partial["datapath"]["policy_new_flow"] = Value::Null;
        partial["datapath"]["spread_pct"] = Value::Null;
        for (results, sections) in [(&full, 8), (&partial, 5)] {
            let md = markdown(results);
            for heading in [
                "# Benchmarks\n\n",
                "\n## Targets\n\n| target | measured | met |\n",
                "\n## 1. XDP and TC per-packet cost (BPF_PROG_TEST_RUN)\n\n",
                "\n## 2. Spread: Maglev against kube-proxy's random choices\n\n",
                "\n## 3. Sync latency of the Kubernetes agent\n\n",
                "\n## Closing note\n\n- ",
            ] {
                assert!(md.contains(heading), "{heading:?} missing");
            }
            assert_eq!(md.matches("\n## ").count(), sections, "{md}");
            for syntax in ["{{", "}}", "{%", "%}", "{#", "#}"] {
                assert!(!md.contains(syntax), "{syntax:?} left in the page");
            }
            assert!(md.ends_with(".\n\n"));
        }
        let md = markdown(&full);
        assert!(md.contains("\n## 4. Short connections through each system\n\n"));
        assert!(md.contains("\n## 6. Control plane: objects to a ready dataplane\n\n"));
        assert!(md.contains("| 1 | **this project (XDP)** | "));
        assert!(md.contains("\n**Missed:** XDP established flow ≤ 100 ns"));
    }
}
