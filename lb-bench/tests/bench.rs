//! Smoke test of `cargo xtask bench --quick`: every section of the results
//! is there with sane numbers, and the docs (markdown, chart) are written.
//! Needs root (`cargo xtask test` runs it as a kernel test).

use serde_json::Value;

fn num(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for part in path.split('.') {
        cur = match part.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[part],
        };
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {cur}"))
}

fn within(v: &Value, path: &str, lo: f64, hi: f64) {
    let x = num(v, path);
    assert!(
        x.is_finite() && (lo..=hi).contains(&x),
        "{path} = {x}, expected within [{lo}, {hi}]"
    );
}

#[test]
fn quick_bench_has_every_section_with_sane_numbers() {
    if !lb_testkit::guard::can_run_as_root("bench smoke test") {
        return;
    }
    let agent = lb_testkit::lab::agent::release_binary().expect("the release lb-agent");
    let r = lb_bench::run(&agent, true).unwrap_or_else(|e| panic!("bench --quick: {e:#}"));

    // Machine description.
    assert!(!r["machine"]["kernel"].as_str().unwrap().is_empty());
    assert!(!r["machine"]["cpu"].as_str().unwrap().is_empty());
    within(&r, "machine.cores", 1.0, 4096.0);
    within(&r, "machine.memory_mib", 256.0, 1e8);
    assert_eq!(r["quick"], true);

    // 1. Per-packet cost: 1 and 1,000 services, every figure positive and
    // far below a microsecond or so (anything else is a broken method).
    let rows = r["datapath"]["rows"].as_array().expect("datapath.rows");
    let services: Vec<u64> = rows
        .iter()
        .map(|r| r["services"].as_u64().unwrap())
        .collect();
    assert_eq!(services, [1, 1_000]);
    for i in 0..rows.len() {
        for k in [
            "non_service_ns",
            "established_ns",
            "tc_reply_ns",
            "call_overhead_ns",
        ] {
            within(&r, &format!("datapath.rows.{i}.{k}"), 1.0, 5_000.0);
        }
        within(
            &r,
            &format!("datapath.rows.{i}.new_flow_raw_ns"),
            1.0,
            50_000.0,
        );
        within(
            &r,
            &format!("datapath.rows.{i}.new_flow_ns"),
            -1_000.0,
            50_000.0,
        );
        // A new flow costs more than a hit, a hit more than a miss.
        assert!(
            num(&r, &format!("datapath.rows.{i}.new_flow_raw_ns"))
                > num(&r, &format!("datapath.rows.{i}.non_service_ns")),
            "row {i}: new flow cheaper than a non-service packet"
        );
    }
    assert!(r["datapath"]["spread_pct"]["established_ns"].is_number());
    // The endpoints axis of the per-packet cost (2 and 100 quick).
    let ep = r["datapath"]["endpoints_axis"]["rows"]
        .as_array()
        .expect("datapath.endpoints_axis.rows");
    let eps: Vec<u64> = ep
        .iter()
        .map(|r| r["endpoints"].as_u64().unwrap())
        .collect();
    assert_eq!(eps, [2, 100]);
    for i in 0..ep.len() {
        within(
            &r,
            &format!("datapath.endpoints_axis.rows.{i}.established_ns"),
            1.0,
            5_000.0,
        );
    }

    // 2. Spread: shares sum to one, Maglev near-even, p-values in [0, 1].
    for sys in ["maglev", "iptables_random", "nftables_numgen"] {
        let shares: f64 = r["spread"][sys]["shares"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((shares - 1.0).abs() < 1e-3, "{sys}: shares sum to {shares}");
        within(&r, &format!("spread.{sys}.p_value"), 0.0, 1.0);
        within(&r, &format!("spread.{sys}.max_min_ratio"), 1.0, 1.2);
    }
    within(&r, "spread.removal.maglev_moved_share", 0.09, 0.2);
    within(
        &r,
        "spread.removal.iptables_moved_share_simulated",
        0.85,
        0.95,
    );

    // 3. Sync latency: 100 changes, ordered percentiles, under 10 s each.
    assert_eq!(r["sync_latency"]["changes"], 100);
    within(&r, "sync_latency.p50_ms", 0.0, 10_000.0);
    assert!(num(&r, "sync_latency.p50_ms") <= num(&r, "sync_latency.p99_ms"));
    assert!(num(&r, "sync_latency.p99_ms") <= num(&r, "sync_latency.max_ms"));
    assert_eq!(r["sync_latency"]["agent_errors_logged"], 0);
    // Sustained churn (quick: 1,000 changes/s for 5 s at 1,000 services):
    // every change reached the maps, no error.
    let sus = &r["sync_latency"]["sustained"];
    assert_eq!(sus["changes"], 5_000);
    assert_eq!(sus["agent_errors_logged"], 0);
    within(&r, "sync_latency.sustained.p50_ms", 0.0, 10_000.0);
    assert!(num(&r, "sync_latency.sustained.p50_ms") <= num(&r, "sync_latency.sustained.p99_ms"));
    within(&r, "sync_latency.sustained.agent_cpu_cores", 0.0, 2.0);

    // 4. Short connections: every system at every point of both axes (quick:
    // 1 and 1,000 services; 2 and 100 endpoints), each answering, with
    // ordered latencies and a no-LB fraction.
    let sc = &r["short_connections"];
    for (axis, field, points) in [
        ("services_axis", "services", [1u64, 1_000]),
        ("endpoints_axis", "endpoints", [2, 100]),
    ] {
        let rows = sc[axis].as_array().unwrap_or_else(|| panic!("{axis}"));
        for p in points {
            for system in ["nolb", "xdp", "iptables", "nftables"] {
                let row = rows
                    .iter()
                    .find(|r| r[field] == p && r["system"] == system)
                    .unwrap_or_else(|| panic!("{axis}: no {system} row at {field} = {p}"));
                let rate = row["rate_per_s"].as_f64().unwrap();
                assert!(rate > 50.0, "{axis} {p} {system}: {rate} connections/s");
                let (p50, p99) = (
                    row["p50_ms"].as_f64().unwrap(),
                    row["p99_ms"].as_f64().unwrap(),
                );
                assert!(
                    0.0 < p50 && p50 <= p99,
                    "{axis} {p} {system}: p50 {p50}, p99 {p99}"
                );
                assert!(row["fraction_of_nolb"].as_f64().unwrap() > 0.0);
                assert!(row["evidence"]["max_rate"]["cpu"]["busy"].is_number());
            }
        }
    }
    // 5. UDP: every system forwards.
    for system in ["nolb", "xdp", "iptables", "nftables"] {
        let row = r["udp"]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["system"] == system)
            .unwrap_or_else(|| panic!("udp: no {system} row"));
        assert!(
            row["rate_per_s"].as_f64().unwrap() > 50.0,
            "udp {system}: {row}"
        );
    }
    // 6. Control plane: the three systems loaded the same 1,000 services.
    assert_eq!(r["control_plane"]["services"], 1_000);
    for system in ["xdp", "iptables", "nftables"] {
        within(
            &r,
            &format!("control_plane.{system}.initial_ms"),
            0.01,
            120_000.0,
        );
        within(
            &r,
            &format!("control_plane.{system}.add_endpoint_ms"),
            0.001,
            60_000.0,
        );
    }
    // Memory once loaded: every pinned map accounted, the conntrack map
    // among them, a per-CPU map projected to 128 CPUs grows, the agent's
    // resident set read.
    let mem = &r["control_plane"]["xdp"]["memory"];
    let maps = mem["maps"]
        .as_array()
        .expect("control_plane.xdp.memory.maps");
    assert!(maps.len() >= 10, "pinned maps: {maps:?}");
    assert!(maps.iter().any(|m| m["name"] == "LB_CT_V4"));
    let sum: u64 = maps
        .iter()
        .map(|m| m["bytes_memlock"].as_u64().unwrap())
        .sum();
    assert_eq!(mem["bytes_memlock"].as_u64(), Some(sum));
    within(&r, "control_plane.xdp.memory.bytes_memlock", 1e6, 1e11);
    assert!(mem["projected_bytes"].as_u64() >= mem["bytes_memlock"].as_u64());
    within(&r, "control_plane.xdp.memory.agent_rss_bytes", 1e6, 1e11);
    assert!(r["targets"].as_array().unwrap().len() >= 10);

    // The docs the bench writes with --out.
    let dir = tempfile::tempdir().unwrap();
    lb_bench::write_docs(&r, dir.path()).unwrap();
    let md = std::fs::read_to_string(dir.path().join("benchmarks.md")).unwrap();
    for needle in [
        "## 1. XDP and TC per-packet cost",
        "## 2. Spread",
        "## 3. Sync latency",
        "## 4. Short connections",
        "What limits each system",
        "## 5. UDP",
        "## 6. Control plane",
        "### Memory once the services are loaded",
        "| `LB_CT_V4` |",
        "ours ÷ iptables",
        "benchmarks.svg",
        "benchmarks-rates.svg",
    ] {
        assert!(md.contains(needle), "benchmarks.md lacks {needle:?}");
    }
    let svg = std::fs::read_to_string(dir.path().join("benchmarks.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 5);
    // Both axes, four systems each, the ceiling dashed.
    let rates = std::fs::read_to_string(dir.path().join("benchmarks-rates.svg")).unwrap();
    assert!(rates.starts_with("<svg") && rates.trim_end().ends_with("</svg>"));
    assert_eq!(rates.matches("<polyline").count(), 8);
    assert_eq!(rates.matches("stroke-dasharray").count(), 3);
    let back: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("benchmarks.json")).unwrap())
            .unwrap();
    assert!(
        same(&back, &r),
        "benchmarks.json does not read back as the results"
    );
}

/// Equal JSON, numbers within a relative 1e-12: serde_json parses some
/// unrounded floats one ulp off what it printed (without its
/// `float_roundtrip` feature).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}
