//! The targets' verdicts, the summary printed at the end and `docs/benchmarks.md`.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::targets;

pub(super) fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// One target: what, the measured figure as text, and whether it is met
/// (`None`: not measured).
fn target_rows(r: &Value) -> Vec<(String, String, Option<bool>)> {
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
    rows.push((
        format!(
            "XDP established flow ≤ {} ns (every service count)",
            targets::ESTABLISHED_NS
        ),
        format!("worst {est:.1} ns"),
        Some(est <= targets::ESTABLISHED_NS),
    ));
    let new = worst("new_flow_ns");
    let new_raw = worst("new_flow_raw_ns");
    rows.push((
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
            rows.push((
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
        rows.push((
            format!(
                "Maglev max/min ≤ {} over 100,000 flows",
                targets::MAGLEV_MAX_MIN
            ),
            format!("{mm:.4}"),
            Some(mm <= targets::MAGLEV_MAX_MIN),
        ));
    }
    if let Some(m) = f(&s["removal"]["maglev_moved_share"]) {
        rows.push((
            format!(
                "≤ {:.0}% of flows move when one of ten backends is removed",
                targets::MOVED_SHARE * 100.0
            ),
            format!("{:.2}%", m * 100.0),
            Some(m <= targets::MOVED_SHARE),
        ));
    }
    if let Some(p99) = f(&r["sync_latency"]["p99_ms"]) {
        rows.push((
            format!("watch event → maps ≤ {} ms at p99", targets::SYNC_P99_MS),
            format!("{p99:.2} ms"),
            Some(p99 <= targets::SYNC_P99_MS),
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
            rows.push((
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

fn short_connection_targets(r: &Value, rows: &mut Vec<(String, String, Option<bool>)>) {
    let sc = &r["short_connections"];
    if !sc.is_object() {
        return;
    }
    let at =
        |services: u64, system: &str| rate_at(r, "services_axis", "services", services, system);
    if let (Some(x), Some(i), Some(n)) = (at(1, "xdp"), at(1, "iptables"), at(1, "nftables")) {
        rows.push((
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
    rows.push((
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
    let worst = ["services_axis", "endpoints_axis"]
        .iter()
        .flat_map(|axis| sc[*axis].as_array().cloned().unwrap_or_default())
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
        rows.push((
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

fn control_plane_targets(r: &Value, rows: &mut Vec<(String, String, Option<bool>)>) {
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
        rows.push((
            format!(
                "10,000 × 10 from objects to a ready dataplane ≤ {} ms",
                targets::CONTROL_PLANE_INITIAL_MS
            ),
            format!("{ms:.0} ms{scope}"),
            full.then_some(ms <= targets::CONTROL_PLANE_INITIAL_MS),
        ));
    }
    if let Some(ms) = f(&cp["xdp"]["add_endpoint_ms"]) {
        rows.push((
            format!(
                "one added endpoint at 10,000 services ≤ {} ms",
                targets::CONTROL_PLANE_ADD_MS
            ),
            format!("{ms:.1} ms{scope}"),
            full.then_some(ms <= targets::CONTROL_PLANE_ADD_MS),
        ));
    }
}

pub fn verdicts(r: &Value) -> Value {
    Value::Array(
        target_rows(r)
            .into_iter()
            .map(|(what, measured, met)| json!({"target": what, "measured": measured, "met": met}))
            .collect(),
    )
}

pub(super) fn print_summary(r: &Value) {
    println!("\nbench: targets");
    for (what, measured, met) in target_rows(r) {
        let word = match met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "  -   ",
        };
        println!("  {word} {what}: {measured}");
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

/// `docs/benchmarks.md` from the results.
pub fn markdown(r: &Value) -> String {
    let mut m = String::new();
    let mach = &r["machine"];
    let quick = r["quick"].as_bool() == Some(true);
    let _ = writeln!(m, "# Benchmarks\n");
    let _ = writeln!(
        m,
        "Generated by `cargo xtask bench{} --out docs/` (`lb-bench`, \
         `lb-userspace/benches/datapath.rs`); do not edit by hand. Every figure is in \
         [`benchmarks.json`](benchmarks.json).\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        m,
        "- run: {} (`{}`), {}, {:.0} s\n- machine: Linux {}, {}, {} cores, {} MiB, \
         load average {} at the start\n",
        r["date"].as_str().unwrap_or("?"),
        r["git"].as_str().unwrap_or("?"),
        if quick {
            "quick (1 and 1,000 services, 100 changes)"
        } else {
            "full"
        },
        r["duration_seconds"].as_f64().unwrap_or_default(),
        mach["kernel"].as_str().unwrap_or("?"),
        mach["cpu"].as_str().unwrap_or("?"),
        mach["cores"],
        mach["memory_mib"],
        mach["loadavg_at_start"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        m,
        "A shared 2-core VM is noisy: read the absolute numbers as an order of magnitude, \
         the comparisons (across service counts, Maglev against iptables) as the result.\n"
    );

    let _ = writeln!(m, "## Targets\n");
    let _ = writeln!(m, "| target | measured | met |\n| --- | --- | --- |");
    let rows = target_rows(r);
    for (what, measured, met) in &rows {
        let word = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(m, "| {what} | {measured} | {word} |");
    }
    let missed: Vec<&String> = rows
        .iter()
        .filter(|(_, _, met)| *met == Some(false))
        .map(|(w, _, _)| w)
        .collect();
    if missed.is_empty() {
        let _ = writeln!(m, "\nEvery target measured so far is met.\n");
    } else {
        let _ = writeln!(
            m,
            "\n**Missed:** {}. See the closing note.\n",
            missed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }

    // 1. Per-packet cost.
    let dp = &r["datapath"];
    let _ = writeln!(m, "## 1. XDP and TC per-packet cost (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(
        m,
        "Median over {} calls (after one warm-up call), the calls of every service count \
         interleaved so that background load hits each alike; `repeat` = {} for the \
         non-service, established and TC figures; {} distinct SYNs per new-flow call. \
         Services × {} endpoints, Maglev table size {} (see below).\n",
        dp["calls_per_figure"],
        thousands(dp["repeat"].as_u64().unwrap_or(0)),
        thousands(dp["new_flow_packets_per_call"].as_u64().unwrap_or(0)),
        dp["endpoints_per_service"],
        dp["maglev_table_size"],
    );
    let _ = writeln!(
        m,
        "| services | non-service | established | new flow (net) | new flow (raw) | call overhead | TC reply | maps filled in |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in dp["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "| {} | {} ns | {} ns | {} ns | {} ns | {} ns | {} ns | {} s |",
            thousands(row["services"].as_u64().unwrap_or(0)),
            num(&row["non_service_ns"], 1),
            num(&row["established_ns"], 1),
            num(&row["new_flow_ns"], 1),
            num(&row["new_flow_raw_ns"], 1),
            num(&row["call_overhead_ns"], 1),
            num(&row["tc_reply_ns"], 1),
            num(&row["fill_seconds"], 2),
        );
    }
    let sp = &dp["spread_pct"];
    if sp.is_object() {
        let _ = writeln!(
            m,
            "\nChange from {} to {} services: non-service {}%, established {}%, new flow {}% \
             (raw {}%), TC reply {}% (target ±{}%).\n",
            thousands(sp["from_services"].as_u64().unwrap_or(0)),
            thousands(sp["to_services"].as_u64().unwrap_or(0)),
            num(&sp["non_service_ns"], 1),
            num(&sp["established_ns"], 1),
            num(&sp["new_flow_ns"], 1),
            num(&sp["new_flow_raw_ns"], 1),
            num(&sp["tc_reply_ns"], 1),
            targets::SERVICES_SPREAD_PCT,
        );
    }
    let _ = writeln!(m, "![per-packet cost against services](benchmarks.svg)\n");
    let _ = writeln!(
        m,
        "How each figure avoids the `repeat` trap (the kernel does not restore the packet between repetitions, so a rewriting program sees its own output from the second run on):\n"
    );
    for (k, label) in [
        ("non_service", "Non-service packet"),
        ("established", "Established flow"),
        ("new_flow", "New flow"),
        ("tc_reply", "TC reply"),
        ("maps", "Maps"),
    ] {
        let _ = writeln!(
            m,
            "- **{label}**: {}.",
            dp["method"][k].as_str().unwrap_or("?")
        );
    }
    let _ = writeln!(
        m,
        "- **Maglev table size {}** instead of the default 16,381, so that the agent builds \
         10,000 tables quickly. The kernel value is a fixed `MaglevTable` of 16,381 slots \
         whatever the size, so `LB_MAGLEV` still holds 10,000 × 64 KiB (655 MB of kernel \
         memory); the size only changes which slot a flow reads. \"Maps filled in\" is \
         translate + plan + map writes for that table size, not the control-plane figure \
         of section 6.\n",
        dp["maglev_table_size"]
    );

    // 1a. The endpoints axis.
    let ep = &dp["endpoints_axis"];
    if ep.is_object() {
        let _ = writeln!(m, "### Along the endpoints axis\n");
        let _ = writeln!(
            m,
            "| endpoints | non-service | established | new flow (net) | new flow (raw) | TC reply |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for row in ep["rows"].as_array().into_iter().flatten() {
            let _ = writeln!(
                m,
                "| {} | {} ns | {} ns | {} ns | {} ns | {} ns |",
                thousands(row["endpoints"].as_u64().unwrap_or(0)),
                num(&row["non_service_ns"], 1),
                num(&row["established_ns"], 1),
                num(&row["new_flow_ns"], 1),
                num(&row["new_flow_raw_ns"], 1),
                num(&row["tc_reply_ns"], 1),
            );
        }
        let sp = &ep["spread_pct"];
        let _ = writeln!(
            m,
            "\nChange from {} to {} endpoints: established {}%, new flow {}% (target ±{}%). {}.\n",
            sp["from_endpoints"],
            sp["to_endpoints"],
            num(&sp["established_ns"], 1),
            num(&sp["new_flow_ns"], 1),
            targets::ENDPOINTS_SPREAD_PCT,
            ep["method"].as_str().unwrap_or("?"),
        );
    }

    // 1b. A new flow's cost under each balancing policy.
    let pol = &dp["policy_new_flow"];
    if pol.is_object() {
        let _ = writeln!(m, "### A new flow under each balancing policy\n");
        let _ = writeln!(
            m,
            "| maglev (10) | round-robin (10) | least-connection (8) | least-connection (64) | least-connection (256: two candidates) |\n\
             | ---: | ---: | ---: | ---: | ---: |\n| {} ns | {} ns | {} ns | {} ns | {} ns |\n",
            num(&pol["maglev_ns"], 1),
            num(&pol["round_robin_ns"], 1),
            num(&pol["least_conn_8_ns"], 1),
            num(&pol["least_conn_64_ns"], 1),
            num(&pol["least_conn_256_ns"], 1),
        );
        let _ = writeln!(
            m,
            "Net of call overhead. {}\n",
            pol["method"].as_str().unwrap_or("?")
        );
    }

    // 1c. The forwarding path (remote backends).
    let sn = &r["snat"];
    if sn.is_object() {
        let _ = writeln!(m, "### Forwarding to another node (SNAT path)\n");
        let _ = writeln!(
            m,
            "| new forwarded flow | packet of a forwarded flow | reply, reverse SNAT | call overhead |\n\
             |---:|---:|---:|---:|\n| {} ns | {} ns | {} ns | {} ns |\n",
            sn["new_forwarded_flow_ns"],
            sn["established_forwarded_ns"],
            sn["reverse_snat_ns"],
            sn["call_overhead_ns"]
        );
        let _ = writeln!(m, "- {}\n", sn["method"].as_str().unwrap_or("?"));
    }

    // 2. Spread.
    let s = &r["spread"];
    let _ = writeln!(
        m,
        "## 2. Spread: Maglev against kube-proxy's random choices\n"
    );
    let _ = writeln!(
        m,
        "{} flows over {} backends.\n",
        thousands(s["flows"].as_u64().unwrap_or(0)),
        s["backends"]
    );
    let _ = writeln!(
        m,
        "| system | max/min | chi-square (9 df) | p-value | shares |\n| --- | ---: | ---: | ---: | --- |"
    );
    for (k, label) in [
        ("maglev", "Maglev (this datapath)"),
        ("iptables_random", "iptables `statistic mode random`"),
        ("nftables_numgen", "nftables `numgen random mod N`"),
    ] {
        let shares: Vec<String> = s[k]["shares"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| format!("{:.2}%", v.as_f64().unwrap_or_default() * 100.0))
            .collect();
        let _ = writeln!(
            m,
            "| {label} | {} | {} | {} | {} |",
            num(&s[k]["max_min_ratio"], 4),
            num(&s[k]["chi_square"], 2),
            num(&s[k]["p_value"], 3),
            shares.join(" ")
        );
    }
    let rm = &s["removal"];
    let pct = |v: &Value| format!("{:.2}%", v.as_f64().unwrap_or(f64::NAN) * 100.0);
    let _ = writeln!(
        m,
        "\nMaglev's table itself gives each backend within one slot of the others \
         (slot max/min {}); the max/min over flows above is the sampling noise of 100,000 \
         flows (one share's standard deviation is about 0.95% of 10,000). A p-value far \
         from 0 means no evidence against equal shares.\n",
        num(&s["maglev_table_slots_max_min_ratio"], 4)
    );
    let _ = writeln!(
        m,
        "| one of ten backends removed ({}) | flows whose backend changes |\n| --- | ---: |\n\
         | Maglev: all | {} |\n| Maglev: flows of the nine surviving backends | {} |\n\
         | iptables random: simulated | {} |\n| nftables numgen: simulated | {} |\n\
         | iptables and nftables random: theory (1 − 1/n) | {} |\n",
        rm["removed_backend"].as_str().unwrap_or("?"),
        pct(&rm["maglev_moved_share"]),
        pct(&rm["maglev_moved_share_of_surviving_backends"]),
        pct(&rm["iptables_moved_share_simulated"]),
        pct(&rm["nftables_moved_share_simulated"]),
        pct(&rm["iptables_moved_share_theoretical"]),
    );
    let _ = writeln!(
        m,
        "Method (seed {}): {}\n",
        s["seed"].as_str().unwrap_or("?"),
        s["method"].as_str().unwrap_or("?")
    );

    // 3. Sync latency.
    let sl = &r["sync_latency"];
    let _ = writeln!(m, "## 3. Sync latency of the Kubernetes agent\n");
    let _ = writeln!(
        m,
        "| changes | services in store | p50 | p90 | p99 | max | mean | ops per sync | first full sync | syncs with 0 ops skipped | errors logged |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for run in sl["by_store_size"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "| {} | {} × {} endpoints | {} ms | {} ms | {} ms | {} ms | {} ms | {} | {} s | {} | {} |",
            thousands(run["changes"].as_u64().unwrap_or(0)),
            thousands(run["services_in_store"].as_u64().unwrap_or(0)),
            run["endpoints_per_service"],
            num(&run["p50_ms"], 2),
            num(&run["p90_ms"], 2),
            num(&run["p99_ms"], 2),
            num(&run["max_ms"], 2),
            num(&run["mean_ms"], 2),
            num(&run["ops_per_sync_mean"], 1),
            num(&run["first_full_sync_seconds_from_spawn"], 2),
            run["syncs_without_ops_skipped"],
            run["agent_errors_logged"],
        );
    }
    let _ = writeln!(
        m,
        "\nThe target's verdict uses the largest store. `synced` lines older than the end of \
         `Store::apply` (the bench thread preempted between the store's write and reading \
         the clock; the reason t0 is read before the apply): {}. Agent: {}.\n\nMethod: {}\n",
        sl["by_store_size"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|run| format!(
                "{} of {} changes at {} services",
                run["synced_before_apply_returned"],
                run["changes"],
                thousands(run["services_in_store"].as_u64().unwrap_or(0))
            ))
            .collect::<Vec<_>>()
            .join(", "),
        sl["agent"].as_str().unwrap_or("?"),
        sl["method"].as_str().unwrap_or("?"),
    );

    traffic_sections(&mut m, r);
    control_plane_section(&mut m, r);

    // Closing note.
    let _ = writeln!(m, "## Closing note\n");
    let _ = writeln!(m, "{}", closing_note(r, &rows));
    m
}

/// What the numbers say where a target is missed, and what would fix it.
fn closing_note(r: &Value, rows: &[(String, String, Option<bool>)]) -> String {
    let mut notes = Vec::new();
    let missed = |needle: &str| {
        rows.iter()
            .any(|(w, _, met)| w.contains(needle) && *met == Some(false))
    };
    if missed("XDP new flow ≤") {
        notes.push(
            "- **New flow far above 400 ns.** Before the balancing policies a \
             new flow measured 760-990 ns here: a Maglev slot read and two inserts into \
             the LRU conntrack map (forward and reply entries). The exact open-flow \
             counts added a third insert, into `LB_OPEN_FLOWS_V4`, a hash that is not \
             preallocated so that an entry's memory stays valid while another CPU swaps \
             its `open` flag: every new flow now allocates kernel memory, plus two \
             atomic operations, and the figure roughly doubled (about 1.8-2.0 µs, flat \
             across services and endpoints). What would bring it down: a preallocated \
             registry with a generation number in the value (so a reused entry cannot be \
             mistaken for the old one), or the counts kept in the conntrack value \
             itself with one insert for both directions; and, as before, one conntrack \
             insert per flow instead of two. With repeat = 1 each call also runs cold, \
             which subtracting the call overhead does not remove."
                .to_string(),
        );
    }
    if missed("XDP established flow ≤") {
        notes.push(
            "- **Established flow above 100 ns** (runs on this shared VM vary by 10-20%; \
             a quiet run measured 102-106 ns, and the coarse clock took about 15 ns off \
             the 121 ns before it). The hit path is a frontend lookup, a conntrack lookup, a \
             backend lookup, three per-CPU counter updates and the rewrite; fewer counter \
             updates per packet (service totals summed from backend counters at scrape \
             time) would be the next thing to try."
                .to_string(),
        );
    }
    if missed("within ±") {
        notes.push(format!(
            "- **Cost grows with the number of services.** The hash lookups are O(1) but \
             10,000 services spread the frontends, tables and backends over more memory \
             than the caches hold ({} × 64 KiB Maglev values alone), so the lookups miss \
             cache more often; a 2-core shared VM adds noise of the same order. A smaller \
             kernel Maglev value (a per-size map, or an array of maps) would shrink the \
             working set.",
            r["datapath"]["services"]
                .as_array()
                .and_then(|a| a.last())
                .cloned()
                .unwrap_or(Value::Null)
        ));
    }
    if missed("Maglev max/min") {
        notes.push(
            "- **Maglev max/min above 1.05.** The table's slot shares are within one slot; \
             over 100,000 flows the max/min of ten shares is sampling noise (about ±3%), so \
             a value above 1.05 is an unlucky sample; more flows would narrow it."
                .to_string(),
        );
    }
    if missed("flows move") {
        notes.push(
            "- **More than 12% of flows move.** Maglev moves the removed backend's 10% plus \
             a disruption that shrinks as the table grows relative to the backends; a larger \
             table size would lower it."
                .to_string(),
        );
    }
    if missed("watch event") {
        notes.push(
            "- **Sync latency above 100 ms at p99.** The latency grows with the number of \
             services in the store (see the table: each change is one slice and about three \
             map operations), because every change makes the agent take the whole \
             snapshot, translate and plan every service again. Incremental work \
             (translate and plan only the service whose objects changed, keep the \
             translation of the others) would make it independent of the cluster's size."
                .to_string(),
        );
    }
    let pass_fraction = ["services_axis", "endpoints_axis"]
        .iter()
        .flat_map(|axis| {
            r["short_connections"][*axis]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|row| row["system"] == "nolb_xdp_pass")
        .filter_map(|row| f(&row["fraction_of_nolb"]))
        .collect::<Vec<_>>();
    if missed("no-load-balancer rate") || missed("short connections at") {
        let pass = if pass_fraction.is_empty() {
            "The full run adds a row with a pass-only XDP program on the node's veth \
             (`nolb_xdp_pass`) to separate the two costs."
                .to_string()
        } else {
            format!(
                "The row with no balancer but a pass-only XDP program on the node's veth \
                 (`nolb_xdp_pass`) reaches {} of the no-LB rate: that much is lost by \
                 attaching any XDP program to a veth, before our program does anything.",
                pass_fraction
                    .iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        notes.push(format!(
            "- **Short connections below the targets.** On this lab the node's client-side \
             interface is a veth. Native XDP on a veth runs in the veth's NAPI poll and \
             must first turn each skb into an XDP buffer: a TCP segment is a clone (TCP \
             keeps the original for retransmission) with less than 256 bytes of headroom, \
             so the veth copies every packet into a new page, and the work moves from the \
             sender's context to the NAPI poll. {pass} kube-proxy's rules run in the \
             normal skb path and pay nothing of the kind. On a physical NIC with a native \
             XDP driver there is no copy; there the per-packet figures of section 1 (tens \
             to hundreds of ns) are the balancer's cost. Two ways to make the veth case \
             fast: attach the same program at TC ingress on veth-like devices (no \
             conversion), or measure on a NIC. What the counters of this project's rows \
             say (section 4): {}.",
            xdp_limits(r)
        ));
    }
    if missed("ready dataplane") || missed("one added endpoint") {
        notes.push(
            "- **Control plane above the targets.** A profile of `lb-agent` filling \
             10,000 services × 10 endpoints (perf, this machine) spends about 27% in the \
             kernel copying 64 KiB Maglev values (`LB_MAGLEV` holds a fixed 16,381-slot \
             table per service whatever its size), about 22% populating 16,381-slot \
             tables for 10 backends, and most of the rest parsing 17 MB of manifests and \
             translating and planning every service. One added endpoint re-reads the \
             file and re-plans every service (SIGHUP), or, from Kubernetes, re-plans \
             every service from the watch cache. What would fix it: a table size per \
             service (the smallest prime ≥ 100 × backends, 1,021 for 10), stored in a \
             size-class map (4 KiB values) or an array of maps; and translating and \
             planning only the services whose objects changed."
                .to_string(),
        );
    }
    if notes.is_empty() {
        notes.push("- Every target measured so far is met.".into());
    }
    notes.join("\n") + "\n"
}

/// The systems of the traffic runs, in table order, with their labels.
const SYSTEMS: [(&str, &str); 5] = [
    ("nolb", "no load balancer"),
    (
        "nolb_xdp_pass",
        "no load balancer, pass-only XDP on the node's veth",
    ),
    ("xdp", "**this project (XDP)**"),
    ("nftables", "kube-proxy nftables"),
    ("iptables", "kube-proxy iptables"),
];

fn label(system: &str) -> &'static str {
    SYSTEMS
        .iter()
        .find(|(k, _)| *k == system)
        .map(|(_, l)| *l)
        .unwrap_or("?")
}

fn ev(row: &Value, path: &str) -> Option<f64> {
    let mut cur = &row["evidence"]["max_rate"];
    for part in path.split('.') {
        cur = &cur[part];
    }
    f(cur)
}

/// What the counters of a max-rate run say limited it:
/// the first of these that the evidence shows.
fn limit_of(row: &Value) -> String {
    let n = |p: &str| ev(row, p).unwrap_or(0.0);
    let failures = row["max_rate"]["failures"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_f64).sum::<f64>())
        .unwrap_or(0.0);
    let mut why = Vec::new();
    if n("node_conntrack.insert_failed") > 0.0 || n("node_conntrack.drop") > 0.0 {
        why.push(format!(
            "conntrack ({:.0} insert failures, {:.0} drops)",
            n("node_conntrack.insert_failed"),
            n("node_conntrack.drop")
        ));
    }
    if n("client.TcpAttemptFails") > 0.0 || failures > 0.0 {
        why.push(format!(
            "failed connects ({:.0} by the client's counters, {failures:.0} by the load generator)",
            n("client.TcpAttemptFails")
        ));
    }
    if n("client.TcpExtTCPSynRetrans") > 0.0 {
        why.push(format!(
            "lost SYNs ({:.0} retransmitted)",
            n("client.TcpExtTCPSynRetrans")
        ));
    }
    let busy = n("cpu.busy");
    if busy >= 0.9 {
        why.push(format!(
            "CPU ({:.0}% busy, {:.0}% softirq)",
            busy * 100.0,
            n("cpu.softirq") * 100.0
        ));
    }
    if why.is_empty() {
        why.push(format!("none saturated (CPU {:.0}% busy)", busy * 100.0));
    }
    why.join("; ")
}

fn traffic_sections(m: &mut String, r: &Value) {
    let sc = &r["short_connections"];
    if !sc.is_object() {
        return;
    }
    let _ = writeln!(m, "## 4. Short connections through each system\n");
    let _ = writeln!(m, "{}\n", sc["method"].as_str().unwrap_or("?"));
    let _ = writeln!(
        m,
        "![short connections along both axes](benchmarks-rates.svg)\n"
    );
    for (axis, field, title) in [
        (
            "services_axis",
            "services",
            "Services axis: N services × 10 endpoints, the target service last in kube-proxy's chains",
        ),
        (
            "endpoints_axis",
            "endpoints",
            "Endpoints axis: one service with N endpoints, every endpoint answering",
        ),
    ] {
        let rows = sc[axis].as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(m, "### {title}\n");
        let _ = writeln!(
            m,
            "| {field} | system | connections/s (max) | × no LB | p50 | p99 | failures | endpoints answered |\n\
             | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        let mut points: Vec<u64> = rows.iter().filter_map(|row| row[field].as_u64()).collect();
        points.sort_unstable();
        points.dedup();
        for &p in &points {
            for (system, _) in SYSTEMS {
                let Some(row) = rows
                    .iter()
                    .find(|row| row[field].as_u64() == Some(p) && row["system"] == system)
                else {
                    continue;
                };
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} ms | {} ms | {} | {} |",
                    thousands(p),
                    label(system),
                    num(&row["rate_per_s"], 0),
                    num(&row["fraction_of_nolb"], 2),
                    num(&row["p50_ms"], 3),
                    num(&row["p99_ms"], 3),
                    row["failures"],
                    row["endpoints_answered"],
                );
            }
        }
        let _ = writeln!(
            m,
            "\n| {field} | ours ÷ iptables | ours ÷ nftables | ours ÷ no LB |\n| ---: | ---: | ---: | ---: |"
        );
        for &p in &points {
            let rate = |system: &str| rate_at(r, axis, field, p, system);
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "—".into(),
            };
            let x = rate("xdp");
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} |",
                thousands(p),
                ratio(x, rate("iptables")),
                ratio(x, rate("nftables")),
                ratio(x, rate("nolb")),
            );
        }
        let _ = writeln!(m);
    }
    let _ = writeln!(
        m,
        "p50 and p99 are connect-to-response latencies at the fixed offered load of {} \
         connections/s (the same for every system); the max rate is a closed loop.\n",
        num(&sc["offered_load_per_s"], 0)
    );

    let _ = writeln!(m, "### What limits each system\n");
    let _ = writeln!(
        m,
        "Counters read in the namespaces around each max-rate run (deltas): CPU of the \
         whole machine, the client's and the pods' TCP counters, the node's conntrack \
         statistics. The last column is what they show, in this order: conntrack \
         failures, failed connects, lost SYNs, a saturated CPU.\n"
    );
    let _ = writeln!(
        m,
        "| point | system | CPU busy | softirq | client TIME_WAIT (TW / recycled / killed) | pod TIME_WAIT | conntrack inserts | conntrack entries at end | limit |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for (axis, field) in [
        ("services_axis", "services"),
        ("endpoints_axis", "endpoints"),
    ] {
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
            let _ = writeln!(
                m,
                "| {} {field} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} |",
                thousands(row[field].as_u64().unwrap_or(0)),
                label(row["system"].as_str().unwrap_or("?")),
                pct("cpu.busy"),
                pct("cpu.softirq"),
                n("client.TcpExtTW"),
                n("client.TcpExtTWRecycled"),
                n("client.TcpExtTWKilled"),
                n("pods.TcpExtTW"),
                n("node_conntrack.insert"),
                n("node_conntrack.count_at_end"),
                limit_of(row),
            );
        }
    }
    let _ = writeln!(m);

    let u = &r["udp"];
    if u.is_object() {
        let _ = writeln!(m, "## 5. UDP through each system\n");
        let _ = writeln!(m, "{}\n", u["method"].as_str().unwrap_or("?"));
        let _ = writeln!(
            m,
            "| system | requests/s | packets forwarded/s | × no LB | CPU µs per request | lost | stale |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for row in u["rows"].as_array().into_iter().flatten() {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {} |",
                label(row["system"].as_str().unwrap_or("?")),
                num(&row["rate_per_s"], 0),
                num(&row["packets_forwarded_per_s"], 0),
                num(&row["fraction_of_nolb"], 2),
                num(&row["cpu_us_per_request"], 2),
                row["lost"],
                row["stale"],
            );
        }
        let _ = writeln!(m);
    }
}

fn control_plane_section(m: &mut String, r: &Value) {
    let cp = &r["control_plane"];
    if !cp.is_object() {
        return;
    }
    let _ = writeln!(m, "## 6. Control plane: objects to a ready dataplane\n");
    let _ = writeln!(
        m,
        "{} services × {} endpoints.\n\n\
         | system | all services | one added endpoint | size of the input |\n| --- | ---: | ---: | --- |",
        thousands(cp["services"].as_u64().unwrap_or(0)),
        cp["endpoints_per_service"],
    );
    let x = &cp["xdp"];
    let _ = writeln!(
        m,
        "| **this project** (`lb-agent --manifests`, spawn → first `synced`; SIGHUP → next `synced`) | {} ms ({} ms after the programs were attached) | {} ms (agent's own sync {} ms) | {} bytes of manifests |",
        num(&x["initial_ms"], 0),
        num(&x["initial_after_attach_ms"], 0),
        num(&x["add_endpoint_ms"], 1),
        num(&x["add_endpoint_agent_ms"], 1),
        thousands(x["manifest_bytes"].as_u64().unwrap_or(0)),
    );
    for (k, name) in [
        ("nftables", "kube-proxy nftables (`nft -f`)"),
        ("iptables", "kube-proxy iptables (`iptables-restore`)"),
        ("iptables_legacy", "kube-proxy iptables, legacy backend"),
    ] {
        let v = &cp[k];
        if !v.is_object() {
            continue;
        }
        let _ = writeln!(
            m,
            "| {name}{} | {} ms | {} ms | {} rules, {} bytes (one endpoint: {} rules, {} bytes) |",
            v["backend"]
                .as_str()
                .map(|b| format!(", {b}"))
                .unwrap_or_default(),
            num(&v["initial_ms"], 0),
            num(&v["add_endpoint_ms"], 1),
            thousands(v["rules"].as_u64().unwrap_or(0)),
            thousands(v["bytes"].as_u64().unwrap_or(0)),
            thousands(v["add_endpoint_rules"].as_u64().unwrap_or(0)),
            thousands(v["add_endpoint_bytes"].as_u64().unwrap_or(0)),
        );
    }
    let _ = writeln!(m, "\nMethod: {}\n", cp["method"].as_str().unwrap_or("?"));
}

/// The limits of this project's max-rate rows, grouped: "CPU (...) at 1
/// services, …".
fn xdp_limits(r: &Value) -> String {
    let mut out = Vec::new();
    for (axis, field) in [
        ("services_axis", "services"),
        ("endpoints_axis", "endpoints"),
    ] {
        for row in r["short_connections"][axis]
            .as_array()
            .into_iter()
            .flatten()
        {
            if row["system"] == "xdp" {
                out.push(format!(
                    "{} {field}: {}",
                    thousands(row[field].as_u64().unwrap_or(0)),
                    limit_of(row)
                ));
            }
        }
    }
    out.join("; ")
}
