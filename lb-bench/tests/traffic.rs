//! A tiny traffic bench run (`lb_bench::traffic`): one service with two
//! endpoints through lb-agent, kube-proxy's iptables rules and no load
//! balancer; every system answers, from both endpoints, with few failures.
//! Needs root (`cargo xtask test` runs it as a kernel test); without root it
//! prints SKIPPED and passes, except under CI, where it fails.

use std::time::Duration;

use lb_bench::traffic::{self, Settings, topology::System};
use serde_json::Value;

fn tiny() -> Settings {
    Settings {
        services_axis: vec![],
        endpoints_axis: vec![2],
        systems: vec![
            System::Xdp,
            System::Iptables,
            System::NoLb,
            System::NoLbXdpPass,
        ],
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(100),
        offered_load_per_s: 200.0,
        repeats: 1,
        udp_endpoints: 2,
        udp_duration: Duration::from_millis(500),
        ..Settings::quick()
    }
}

fn f(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {row}"))
}

#[test]
fn every_system_answers_from_every_endpoint() {
    if !lb_testkit::guard::can_run_as_root("traffic test") {
        return;
    }
    let agent = lb_testkit::lab::agent::release_binary().expect("the release lb-agent");
    let settings = tiny();

    let tcp = traffic::short_connections(&agent, &settings)
        .unwrap_or_else(|e| panic!("short connections: {e:#}"));
    let rows = tcp["endpoints_axis"].as_array().expect("endpoints_axis");
    let systems: Vec<&str> = rows.iter().map(|r| r["system"].as_str().unwrap()).collect();
    assert_eq!(systems, ["xdp", "iptables", "nolb", "nolb_xdp_pass"]);
    for row in rows {
        let name = &row["system"];
        assert_eq!(row["endpoints"], 2, "{name}");
        assert!(f(row, "rate_per_s") > 0.0, "{name}: no rate: {row}");
        let failures = f(row, "failures");
        let answered = f(&row["fixed_load"], "answered");
        assert!(
            failures <= 2.0 + 0.01 * answered,
            "{name}: {failures} failures: {row}"
        );
        assert_eq!(
            row["endpoints_answered"], 2,
            "{name}: both endpoints must answer: {row}"
        );
        assert!(f(row, "p50_ms") <= f(row, "p99_ms"), "{name}: {row}");
        assert!(f(row, "fraction_of_nolb") > 0.0, "{name}: {row}");
        // The evidence is there and counts what happened.
        let ev = &row["evidence"]["max_rate"];
        assert!(f(&ev["pods"], "TcpPassiveOpens") > 0.0, "{name}: {ev}");
        assert!(f(&ev["cpu"], "busy") > 0.0, "{name}: {ev}");
    }
    let nolb = rows.iter().find(|r| r["system"] == "nolb").unwrap();
    assert_eq!(nolb["fraction_of_nolb"], 1.0);

    let udp = traffic::udp(&agent, &settings).unwrap_or_else(|e| panic!("udp: {e:#}"));
    for row in udp["rows"].as_array().expect("rows") {
        let name = &row["system"];
        assert!(f(row, "rate_per_s") > 0.0, "{name}: {row}");
        assert_eq!(row["endpoints_answered"], 2, "{name}: {row}");
    }
}
