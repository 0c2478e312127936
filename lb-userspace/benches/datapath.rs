//! Datapath benchmark: per-packet cost of the real
//! XDP and TC programs under BPF_PROG_TEST_RUN with the maps filled by the
//! agent's own pipeline, and the Maglev spread against iptables' random
//! chain. `cargo xtask bench` runs it as
//!
//! ```text
//! cargo bench -p lb-userspace --bench datapath -- [--quick] [--json FILE] [--spread-only]
//! ```
//!
//! and merges its JSON into `target/bench/results.json`. The per-packet part
//! needs root (BPF); `--spread-only` runs the pure computation alone.
//!
//! # How each per-packet figure is measured
//! `BPF_PROG_TEST_RUN` with `repeat = R` runs the program R times on one
//! buffer and does NOT restore the input between runs, so a program that
//! rewrites the packet sees its own output from the second run on. Hence:
//! - **non-service**: a TCP packet to a port with no frontend; it is not
//!   rewritten, so `repeat` is sound.
//! - **established** (ping-pong): the measured service A sends the flow to a
//!   pod `P:8080`; a helper service B has every pod of A as an external IP
//!   on port 8080 and the frontend of A as its only endpoint. After a
//!   warm-up of two runs (A: new flow, B: new flow) every repetition is an
//!   established conntrack hit plus a DNAT: A rewrites to `P:8080`, B
//!   rewrites back. Checked: `established` grows by exactly R per call,
//!   `new_flows` by 0, and an even R gives back the input bytes.
//! - **new flow**: `repeat = 1` over many distinct SYNs (distinct source
//!   address and port), so every call is a conntrack miss, a Maglev choice
//!   and two LRU inserts. A single call's time includes the test-run
//!   framework's overhead, measured the same way (repeat = 1, same packets)
//!   with the test eBPF object's `xdp_pass`; both the raw average and the difference are
//!   reported.
//! - **TC reply**: the established flow's reply `P:8080 → client` through
//!   `lb_tc_egress`; the reverse-NAT entries of A and B ping-pong the same
//!   way (`tc_reverse_nat` grows by exactly R per call).
//!
//! Each figure is the median over several calls.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, TestRun,
    maps::{Array, HashMap},
    programs::{SchedClassifier, TestRunOptions, TestRunResult, Xdp},
};
use lb_common::{
    BackendList, CT_DIR_FORWARD, CtKeyV4, CtValueV4, FrontendKeyV4, IPPROTO_TCP, LC_SCAN_MAX,
    POLICY_LEAST_CONN, POLICY_MAGLEV, POLICY_ROUND_ROBIN, REASON_LEAST_CONN, REASON_MAGLEV,
    REASON_ROUND_ROBIN, ServiceValue, Stats, flow,
    hash::{flow_hash_v4, maglev_slot},
    pin,
};
use lb_testkit::fixtures::{self, CLIENT, Endpoint, Fixture, NODE, XDP_PASS, XDP_TX};
use lb_testkit::topology::Site;
use lb_userspace::{
    loader::{Datapath, LoadOptions, TC_PROGRAM, XDP_PROGRAM, pin_dir, program},
    maglev, pinned,
    plan::{PlanConfig, plan},
    source::Objects,
    translate::{ANNOTATION_BALANCING, NodeContext, translate},
    writer::{MapState, MapWriter, kernel::KernelMaps},
};
use serde_json::{Value, json};
use statrs::distribution::{ChiSquared, ContinuousCDF};

const NODE_NAME: &str = "node-a";
/// Service `i` has nodePort `FIRST_NODE_PORT + i` (10,000 services need
/// `--service-node-port-range=30000-39999` on a real cluster).
const FIRST_NODE_PORT: u16 = 30_000;
/// Pod port of every endpoint.
const POD_PORT: u16 = 8080;
/// Endpoints per service.
const ENDPOINTS: usize = 10;
/// Conntrack capacity (entries; two per flow) of the per-packet runs.
const CT_CAPACITY: u32 = 262_144;

/// The Maglev table size the agent gives the services of the per-packet
/// runs (`ENDPOINTS` backends each).
fn bench_maglev_size() -> u32 {
    PlanConfig::default().maglev_size_for(ENDPOINTS)
}

/// Seed of every random draw of the spread figures.
const SPREAD_SEED: u64 = 0x5eed_0005;
/// Synthetic flows of the spread figures.
const SPREAD_FLOWS: usize = 100_000;
/// Backends of the spread figures.
const SPREAD_BACKENDS: usize = 10;
/// Maglev size of the spread figures: the one the agent gives a service of
/// `SPREAD_BACKENDS` backends.
fn spread_maglev_size() -> u32 {
    PlanConfig::default().maglev_size_for(SPREAD_BACKENDS)
}

struct Args {
    quick: bool,
    json: Option<PathBuf>,
    spread_only: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        quick: false,
        json: None,
        spread_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--spread-only" => args.spread_only = true,
            "--json" => args.json = Some(it.next().ok_or("--json needs a file")?.into()),
            // `cargo bench` passes `--bench` to every bench target.
            "--bench" => {}
            other => {
                return Err(format!(
                    "unknown argument {other:?} (--quick, --json FILE, --spread-only)"
                ));
            }
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("datapath bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let spread = spread();
    print_spread(&spread);
    let mut out = json!({ "spread": spread });
    if !args.spread_only {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!(
                "datapath bench: the per-packet figures need root (BPF_PROG_TEST_RUN, bpffs); \
                 run `sudo -E cargo xtask bench`, or pass --spread-only"
            );
            return ExitCode::FAILURE;
        }
        match datapath(args.quick) {
            Ok(d) => out["datapath"] = d,
            Err(e) => {
                eprintln!("datapath bench: {e}");
                return ExitCode::FAILURE;
            }
        }
        match snat_path(args.quick) {
            Ok(d) => out["snat"] = d,
            Err(e) => {
                eprintln!("datapath bench: SNAT path: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let text = serde_json::to_string_pretty(&out).expect("JSON");
    match &args.json {
        Some(path) => {
            if let Err(e) = std::fs::write(path, text + "\n") {
                eprintln!("datapath bench: write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("datapath bench: wrote {}", path.display());
        }
        None => println!("{text}"),
    }
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------
// Per-packet cost
// ---------------------------------------------------------------------------

/// How much work each figure gets.
#[derive(Clone, Copy)]
struct Effort {
    /// Service counts measured (× [`ENDPOINTS`] endpoints each).
    services: &'static [usize],
    /// Endpoint counts of one service measured (the endpoints axis).
    endpoints: &'static [usize],
    /// `repeat` of the non-service, established and TC calls (even: the
    /// ping-pong then ends on the input bytes).
    repeat: u32,
    /// Calls per figure (the median is reported).
    calls: usize,
    /// Distinct SYNs per new-flow call.
    new_flow_packets: usize,
    /// Calls per figure of the policy figures (cheap: new flows only).
    policy_calls: usize,
}

const FULL: Effort = Effort {
    services: &[1, 1_000, 10_000],
    endpoints: &[2, 10, 100, 1_000],
    repeat: 200_000,
    calls: 9,
    new_flow_packets: 4_000,
    policy_calls: 11,
};
const QUICK: Effort = Effort {
    services: &[1, 1_000],
    endpoints: &[2, 100],
    repeat: 20_000,
    calls: 5,
    new_flow_packets: 1_000,
    policy_calls: 11,
};

fn datapath(quick: bool) -> Result<Value, String> {
    let effort = if quick { QUICK } else { FULL };
    // Every service count is loaded at once and the calls go round robin
    // over them, so that background load on a shared machine hits each
    // count alike (the ±% comparison is the point).
    let mut setups = Vec::new();
    let points = effort
        .services
        .iter()
        .map(|&n| (n, ENDPOINTS))
        .chain(effort.endpoints.iter().map(|&e| (1, e)));
    for (n, e) in points {
        let s = Setup::new(n, e)?;
        println!(
            "datapath: {n:>6} services × {e:>4} endpoints: maps filled in {:.2} s ({} ops)",
            s.fill_s, s.fill_ops
        );
        setups.push(s);
    }
    let start = Instant::now();
    for s in &mut setups {
        s.call_all(effort.calls, &effort, false)?;
    }
    for call in 0..effort.calls {
        for s in &mut setups {
            s.call_all(call, &effort, true)?;
        }
    }
    let all: Vec<Value> = setups.iter().map(Setup::row).collect();
    drop(setups);
    let (rows, endpoint_rows) = all.split_at(effort.services.len());
    for row in &all {
        println!(
            "datapath: {:>6} services × {:>4} endpoints: non-service {:.1} ns, established {:.1} ns, \
             new flow {:.1} ns ({:.1} raw − {:.1} call overhead), TC reply {:.1} ns",
            row["services"],
            row["endpoints"],
            row["non_service_ns"].as_f64().unwrap_or_default(),
            row["established_ns"].as_f64().unwrap_or_default(),
            row["new_flow_ns"].as_f64().unwrap_or_default(),
            row["new_flow_raw_ns"].as_f64().unwrap_or_default(),
            row["call_overhead_ns"].as_f64().unwrap_or_default(),
            row["tc_reply_ns"].as_f64().unwrap_or_default(),
        );
    }
    println!(
        "datapath: measured in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let policies = policy_new_flow(&effort)?;
    let mut out = json!({
        "services": effort.services,
        "endpoints_per_service": ENDPOINTS,
        "maglev_table_size": bench_maglev_size(),
        "repeat": effort.repeat,
        "calls_per_figure": effort.calls,
        "warm_up_calls": 1,
        "interleaved": true,
        "new_flow_packets_per_call": effort.new_flow_packets,
        "rows": rows,
        "spread_pct": spread_pct(rows, "services"),
        "endpoints_axis": {
            "endpoints": effort.endpoints,
            "maglev_table_size": "per service, by its endpoints",
            "rows": endpoint_rows,
            "spread_pct": spread_pct(endpoint_rows, "endpoints"),
            "method": "one NodePort service with E ready local endpoints (plus the ping-pong helper service), measured exactly as the services axis, interleaved with it; each service's table has the size the agent gives it (1,021 slots up to 10 endpoints, 4,093 up to 40, 16,381 beyond); the axis stops at 1,000",
        },
        "method": {
            "non_service": "TCP SYN to a port with no frontend, repeat R: not rewritten, so every repetition is the same miss; median of the calls' averages",
            "established": "ping-pong pair: service A's pods P:8080 are external IPs of a helper service B whose only endpoint is A's frontend; after a two-run warm-up (two new flows) every repetition is a conntrack hit + DNAT (A rewrites to P:8080, B back); verified: established += R and new_flows += 0 per call, and the output equals the input for even R",
            "new_flow": "repeat=1 over distinct SYNs (distinct source address and port): each call one conntrack miss, Maglev choice and two LRU inserts; raw = average call time, new_flow_ns = raw minus the average of xdp_pass called the same way (repeat=1, same packets); verified: new_flows += packets",
            "tc_reply": "reply P:8080 -> client of the established flow through lb_tc_egress, repeat R; the reverse-NAT entries of A and B ping-pong the same way; verified: tc_reverse_nat += R per call",
            "maps": "filled through the agent's pipeline: Objects -> translate -> plan -> KernelMaps, one NodePort service per nodePort 30000+i, 10 ready local endpoints each; the measured service is the middle one; +1 helper service (B) for the ping-pong",
        },
    });
    out["policy_new_flow"] = policies;
    Ok(out)
}

/// The services of the policy figures: JSON key prefix, the
/// `lb-agent.dev/balancing` annotation, ready endpoints.
const POLICY_CASES: [(&str, &str, usize); 5] = [
    ("maglev", "maglev", ENDPOINTS),
    ("round_robin", "round-robin", ENDPOINTS),
    ("least_conn_8", "least-connection", 8),
    ("least_conn_64", "least-connection", 64),
    ("least_conn_256", "least-connection", 256),
];

/// The per-packet cost of a new flow under each balancing policy: one
/// service per case of [`POLICY_CASES`], each in its own datapath, new-flow
/// calls as in the services axis, interleaved over the cases (rotating
/// which goes first), then each setup checked to run its policy.
fn policy_new_flow(effort: &Effort) -> Result<Value, String> {
    let mut cases = Vec::new();
    for (key, policy, per) in POLICY_CASES {
        let s = Setup::with_policy(1, per, Some(policy))?;
        println!(
            "datapath: policy {key}: 1 service × {per:>3} endpoints \
             ({ANNOTATION_BALANCING}: {policy}): maps filled in {:.2} s ({} ops)",
            s.fill_s, s.fill_ops
        );
        cases.push((key, s));
    }
    let start = Instant::now();
    let packets = effort.new_flow_packets;
    let n = cases.len();
    // Call 0 is the warm-up; every call has its own source address, so
    // every SYN is a new flow (they stay open: least-connection's counts
    // grow evenly, and its scan reads every count whatever their values).
    let src = |call: usize| [198, 19, 201, call as u8 + 1];
    for call in 0..=effort.policy_calls {
        for k in 0..n {
            let (_, s) = &mut cases[(call + k) % n];
            let (raw, overhead) = s.call_new_flows(src(call), packets)?;
            if call > 0 {
                s.new_flow_raw.push(raw);
                s.call_overhead.push(overhead);
            }
        }
    }
    let mut out = serde_json::Map::new();
    let mut verified = serde_json::Map::new();
    let mut endpoints = serde_json::Map::new();
    for (key, s) in &cases {
        let what = s
            .verify_policy(src(effort.policy_calls), packets)
            .map_err(|e| format!("policy {key}: {e}"))?;
        let raw = median(s.new_flow_raw.clone());
        let overhead = median(s.call_overhead.clone());
        println!(
            "datapath: policy {key:<15} ({:>3} endpoints): new flow {:.1} ns ({:.1} raw − {:.1} call overhead)",
            s.per,
            raw - overhead,
            raw,
            overhead
        );
        out.insert(format!("{key}_ns"), json!(round2(raw - overhead)));
        out.insert(format!("{key}_raw_ns"), json!(round2(raw)));
        out.insert(format!("{key}_call_overhead_ns"), json!(round2(overhead)));
        endpoints.insert((*key).into(), json!(s.per));
        verified.insert((*key).into(), json!(what));
    }
    println!(
        "datapath: policies measured in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    out.insert("endpoints".into(), Value::Object(endpoints));
    out.insert("calls".into(), json!(effort.policy_calls));
    out.insert("warm_up_calls".into(), json!(1));
    out.insert("new_flow_packets_per_call".into(), json!(packets));
    out.insert("maglev_table_size".into(), json!(bench_maglev_size()));
    out.insert("lc_scan_max".into(), json!(LC_SCAN_MAX));
    out.insert("verified".into(), Value::Object(verified));
    out.insert(
        "method".into(),
        json!(format!(
            "one NodePort service per policy, each in its own datapath, the annotation {ANNOTATION_BALANCING} set on the Service and the maps filled through the agent's pipeline (Objects -> translate -> plan -> KernelMaps, Maglev size {maglev_size}): maglev and round-robin with 10 ready local endpoints, least-connection with 8, 64 and 256. \
             Each call: repeat=1 over {packets} distinct SYNs (every one a new flow: conntrack miss, the policy's choice, conntrack and open-flow registry inserts, count up), raw = average call time, _ns = raw minus xdp_pass called the same way on the same packets; median over {} calls after one warm-up call, the five services' calls interleaved (rotating order) so that background noise hits them alike. \
             Flows are never closed, so the open-flow counts grow during the run (evenly under round-robin and least-connection). \
             least_conn_8 and least_conn_64 scan every backend's count (up to LC_SCAN_MAX = {LC_SCAN_MAX}); least_conn_256 has more than LC_SCAN_MAX backends and compares two candidates only (its Maglev slot and a second slot from a re-hash). \
             Verified after the calls (see `verified`): the frontend's policy in LB_FRONTENDS_V4, the conntrack reason of every flow of the last call, round-robin's LB_RR turn counter equal to the service's flows, and for round-robin and least-connection the LB_BE_OPEN counts summing to the flows (within 1 of each other except for the two-candidate case)",
            effort.policy_calls,
            maglev_size = bench_maglev_size(),
        )),
    );
    Ok(Value::Object(out))
}

/// (b − a) / a in percent, per figure, between the first and the last row
/// (smallest and largest `axis`: "services" or "endpoints").
fn spread_pct(rows: &[Value], axis: &str) -> Value {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    out.insert(format!("from_{axis}"), first[axis].clone());
    out.insert(format!("to_{axis}"), last[axis].clone());
    for k in [
        "non_service_ns",
        "established_ns",
        "new_flow_ns",
        "new_flow_raw_ns",
        "tc_reply_ns",
    ] {
        if let (Some(a), Some(b)) = (first[k].as_f64(), last[k].as_f64())
            && a > 0.0
        {
            out.insert(k.into(), json!(round2((b - a) / a * 100.0)));
        }
    }
    Value::Object(out)
}

fn pod(k: usize) -> Ipv4Addr {
    // 198.18.1.0 + k: up to 100,000 pods fit below 198.19.255.255.
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 1, 0)) + k as u32)
}

fn object<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| format!("building an object: {e}"))
}

/// `n` NodePort services of `per` ready local endpoints each, and the
/// helper service B whose external IPs are the pods of service `target`.
/// With `balancing`, the `n` services carry the annotation
/// [`ANNOTATION_BALANCING`] with that value (B keeps the default, Maglev).
fn objects(
    n: usize,
    per: usize,
    target: usize,
    balancing: Option<&str>,
) -> Result<Objects, String> {
    let mut objs = Objects::default();
    for i in 0..n {
        let name = format!("svc-{i:05}");
        let mut metadata = json!({"name": name, "namespace": "bench"});
        if let Some(policy) = balancing {
            metadata["annotations"] = json!({ ANNOTATION_BALANCING: policy });
        }
        objs.services.push(object(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": metadata,
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.1",
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80,
                                "nodePort": FIRST_NODE_PORT as usize + i, "targetPort": POD_PORT}]},
        }))?);
        let endpoints: Vec<Value> = (0..per)
            .map(|j| {
                json!({"addresses": [pod(i * per + j).to_string()],
                       "conditions": {"ready": true}, "nodeName": NODE_NAME})
            })
            .collect();
        objs.slices.push(object(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-x"), "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": POD_PORT}],
            "endpoints": endpoints,
        }))?);
    }
    let pods: Vec<String> = (0..per)
        .map(|j| pod(target * per + j).to_string())
        .collect();
    let target_port = FIRST_NODE_PORT as usize + target;
    objs.services.push(object(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "pingpong", "namespace": "bench"},
        "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                 "externalIPs": pods,
                 "ports": [{"name": "back", "protocol": "TCP", "port": POD_PORT, "targetPort": target_port}]},
    }))?);
    objs.slices.push(object(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "pingpong-x", "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": "pingpong"}},
        "addressType": "IPv4",
        "ports": [{"name": "back", "protocol": "TCP", "port": target_port}],
        "endpoints": [{"addresses": [Ipv4Addr::from(NODE).to_string()],
                       "conditions": {"ready": true}, "nodeName": NODE_NAME}],
    }))?);
    Ok(objs)
}

/// A TCP packet without payload.
fn tcp(src: Endpoint, dst: Endpoint, syn: bool) -> Vec<u8> {
    fixtures::tcp(src, dst, syn, b"")
}

fn test_run<P>(prog: &mut P, pkt: &[u8], repeat: u32) -> Result<(TestRunResult, Vec<u8>), String>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))?;
    out.truncate(r.data_size_out as usize);
    Ok((r, out))
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn stats(root: &Path) -> Result<Stats, String> {
    let m =
        pinned::per_cpu_array::<Stats>(&pin_dir(root), pin::STATS).map_err(|e| e.to_string())?;
    let per_cpu = m.get(&0, 0).map_err(|e| e.to_string())?;
    let mut s = Stats::default();
    for c in per_cpu.iter() {
        s.add(c);
    }
    Ok(s)
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, String> {
    program(ebpf, name).map_err(|e| e.to_string())
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

/// One loaded datapath with `n` services in its maps, and the packets and
/// samples of its figures.
struct Setup {
    n: usize,
    /// Endpoints per service.
    per: usize,
    /// The `lb-agent.dev/balancing` annotation of the `n` services (`None`:
    /// not written, Maglev).
    policy: Option<&'static str>,
    /// SYNs sent by [`Setup::call_new_flows`] so far.
    syns_sent: u64,
    dp: Datapath,
    /// The pass-only program (the test eBPF object): the call overhead.
    pass: Ebpf,
    /// The pins of this setup's datapath, removed on drop.
    root: Site,
    frontend: ([u8; 4], u16),
    /// The fixture rows of the measured flow ([`fixtures::flow`]), the same
    /// packets the golden tests check.
    rows: Vec<Fixture>,
    fill_s: f64,
    fill_ops: usize,
    non_service: Vec<f64>,
    established: Vec<f64>,
    tc_reply: Vec<f64>,
    new_flow_raw: Vec<f64>,
    call_overhead: Vec<f64>,
}

impl Setup {
    /// Loads a datapath under its own bpffs root, fills its maps with `n`
    /// services of `per` endpoints through the agent's pipeline, and warms
    /// the ping-pong flow.
    fn new(n: usize, per: usize) -> Result<Self, String> {
        Self::with_policy(n, per, None)
    }

    /// [`Setup::new`] with the `n` services annotated with the balancing
    /// policy `policy` (`None`: no annotation).
    fn with_policy(n: usize, per: usize, policy: Option<&'static str>) -> Result<Self, String> {
        // Each setup its own pins (removed on drop, also when a measurement
        // fails half-way): the services axis and the endpoints axis both
        // have a 1 × 10 point, and each reads its counters back.
        let root = Site::new("dp").map_err(|e| format!("{e:#}"))?;
        let mut dp = Datapath::load(&LoadOptions {
            bpffs_root: root.pins().to_owned(),
            ct_capacity: CT_CAPACITY,
        })
        .map_err(|e| format!("load the datapath: {e}"))?;
        dp.load_ingress(lb_userspace::loader::IngressHook::Xdp)
            .map_err(|e| format!("load the XDP program: {e}"))?;
        let mut maps = KernelMaps::from_ebpf(&mut dp.ebpf).map_err(|e| e.to_string())?;
        let pass = lb_testkit::xdp_pass::load().map_err(|e| format!("{e:#}"))?;

        let target = n / 2;
        let fill = Instant::now();
        let objs = objects(n, per, target, policy)?;
        let node = NodeContext {
            node_name: NODE_NAME.into(),
            node_addrs: vec![Ipv4Addr::from(NODE)],
        };
        let translated = translate(&objs, &node).map_err(|e| format!("translate: {e}"))?;
        // An unknown policy is only a warning (and Maglev): fail instead.
        let bad: Vec<&String> = translated
            .warnings
            .iter()
            .filter(|w| w.contains(ANNOTATION_BALANCING))
            .collect();
        check(bad.is_empty(), || format!("translate: {bad:?}"))?;
        let desired = translated.desired;
        check(desired.services.len() == n + 1, || {
            format!(
                "translate gave {} services, not {}",
                desired.services.len(),
                n + 1
            )
        })?;
        let current = maps.read_state().map_err(|e| e.to_string())?;
        let cfg = PlanConfig::default();
        let ops = plan(&current, &desired, &cfg).map_err(|e| format!("plan: {e}"))?;
        let fill_ops = ops.len();
        maps.apply(&ops).map_err(|e| format!("apply: {e}"))?;
        drop(ops);
        let fill_s = fill.elapsed().as_secs_f64();

        let mut s = Self {
            n,
            per,
            policy,
            syns_sent: 0,
            dp,
            pass,
            root,
            frontend: (NODE, FIRST_NODE_PORT + target as u16),
            rows: Vec::new(),
            fill_s,
            fill_ops,
            non_service: Vec::new(),
            established: Vec::new(),
            tc_reply: Vec::new(),
            new_flow_raw: Vec::new(),
            call_overhead: Vec::new(),
        };
        // Ping-pong warm-up: A and B each see their flow's first packet.
        let s0 = s.stats()?;
        let client = (CLIENT, fixtures::CLIENT_PORT);
        let est = tcp(client, s.frontend, false);
        let (res, _) = test_run(s.xdp(XDP_PROGRAM)?, &est, 2)?;
        let s1 = s.stats()?;
        check(
            res.return_value == XDP_PASS && s1.new_flows - s0.new_flows == 2,
            || {
                format!(
                    "ping-pong warm-up: verdict {}, {} new flows (want 2)",
                    res.return_value,
                    s1.new_flows - s0.new_flows
                )
            },
        )?;
        // One run (odd): A's rewrite, to the pod, is the flow's backend.
        let (_, out) = test_run(s.xdp(XDP_PROGRAM)?, &est, 1)?;
        let ip = etherparse::SlicedPacket::from_ethernet(&out).map_err(|e| e.to_string())?;
        let backend = match (ip.net, ip.transport) {
            (Some(etherparse::NetSlice::Ipv4(v4)), Some(etherparse::TransportSlice::Tcp(t))) => {
                (v4.header().destination(), t.destination_port())
            }
            _ => return Err("DNAT'd packet does not parse".into()),
        };
        check(backend.1 == POD_PORT, || {
            format!("established flow went to port {}", backend.1)
        })?;
        s.rows = fixtures::flow(client, s.frontend, backend);
        Ok(s)
    }

    fn stats(&self) -> Result<Stats, String> {
        stats(self.root.pins())
    }

    /// The directory of this setup's pinned maps.
    fn pins(&self) -> PathBuf {
        pin_dir(self.root.pins())
    }

    /// The measured service's entry (its TCP NodePort frontend).
    fn service(&self) -> Result<ServiceValue, String> {
        let m: HashMap<_, FrontendKeyV4, ServiceValue> =
            pinned::hash(&self.pins(), pin::FRONTENDS_V4).map_err(|e| e.to_string())?;
        let key = FrontendKeyV4 {
            addr: self.frontend.0,
            port_be: self.frontend.1.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        m.get(&key, 0)
            .map_err(|e| format!("frontend {:?}: {e}", self.frontend))
    }

    /// The open flows (`LB_BE_OPEN`) of each backend in the service's list
    /// (`LB_SVC_BACKENDS`, round-robin and least-connection services).
    fn open_counts(&self, svc: &ServiceValue) -> Result<Vec<u64>, String> {
        let lists: HashMap<_, u32, BackendList> =
            pinned::hash(&self.pins(), pin::SERVICE_BACKENDS).map_err(|e| e.to_string())?;
        let list = lists
            .get(&svc.service_id, 0)
            .map_err(|e| format!("backend list of service {}: {e}", svc.service_id))?;
        let open: Array<_, u64> =
            pinned::array(&self.pins(), pin::BACKEND_OPEN_FLOWS).map_err(|e| e.to_string())?;
        list.ids[..list.count as usize]
            .iter()
            .map(|id| {
                open.get(id, 0)
                    .map_err(|e| format!("open flows of {id}: {e}"))
            })
            .collect()
    }

    /// Checks that the measured service ran its policy for the `packets`
    /// SYNs of the last [`Setup::call_new_flows`] from `src`, and returns
    /// what was checked. Fails when the frontend's policy is not the
    /// annotation's, when a flow of that call was pinned for another reason,
    /// when round-robin's turn counter is not the number of flows the
    /// service had, or when least-connection's counts are not the flows
    /// (spread within 1 while it scans every backend).
    fn verify_policy(&self, src: [u8; 4], packets: usize) -> Result<String, String> {
        let (want_policy, want_reason) = match self.policy {
            None | Some("maglev") => (POLICY_MAGLEV, REASON_MAGLEV),
            Some("round-robin") => (POLICY_ROUND_ROBIN, REASON_ROUND_ROBIN),
            Some("least-connection") => (POLICY_LEAST_CONN, REASON_LEAST_CONN),
            Some(other) => return Err(format!("unknown policy {other:?}")),
        };
        let name = self.policy.unwrap_or("maglev");
        let svc = self.service()?;
        check(svc.policy == want_policy, || {
            format!(
                "{name}: the frontend's policy is {}, not {want_policy}",
                svc.policy
            )
        })?;
        let ct: HashMap<_, CtKeyV4, CtValueV4> =
            pinned::hash(&self.pins(), pin::CONNTRACK_V4).map_err(|e| e.to_string())?;
        let (mut wrong, mut missing) = (Vec::new(), 0usize);
        for i in 0..packets {
            let key = flow::key(
                (src, (10_000 + i as u16).to_be()),
                (self.frontend.0, self.frontend.1.to_be()),
                IPPROTO_TCP,
                CT_DIR_FORWARD,
            );
            match ct.get(&key, 0) {
                Ok(v) if v.reason == want_reason && v.service_id == svc.service_id => {}
                Ok(v) => wrong.push(v.reason),
                Err(_) => missing += 1,
            }
        }
        check(wrong.is_empty() && missing == 0, || {
            format!(
                "{name}: of the last call's {packets} flows, {missing} are not in conntrack \
                 and {} have another reason than {want_reason} (first: {:?})",
                wrong.len(),
                wrong.first()
            )
        })?;
        let mut done = format!(
            "policy {want_policy} in LB_FRONTENDS_V4; conntrack reason {want_reason} on all {packets} flows of the last call"
        );
        // The service's flows: the ping-pong warm-up's first run and the SYNs.
        let flows = 1 + self.syns_sent;
        if want_policy == POLICY_MAGLEV {
            return Ok(done);
        }
        let counts = self.open_counts(&svc)?;
        let (sum, min, max) = (
            counts.iter().sum::<u64>(),
            counts.iter().copied().min().unwrap_or(0),
            counts.iter().copied().max().unwrap_or(0),
        );
        check(counts.len() == self.per && sum == flows, || {
            format!(
                "{name}: {} backends in the list (want {}), {sum} open flows counted (want {flows})",
                counts.len(),
                self.per
            )
        })?;
        let scans = counts.len() <= LC_SCAN_MAX as usize;
        if want_policy == POLICY_ROUND_ROBIN {
            let rr: Array<_, u64> =
                pinned::array(&self.pins(), pin::ROUND_ROBIN).map_err(|e| e.to_string())?;
            let turn = rr
                .get(&svc.service_id, 0)
                .map_err(|e| format!("LB_RR: {e}"))?;
            check(turn == flows, || {
                format!("round-robin: turn counter {turn} after {flows} flows")
            })?;
            done += &format!("; LB_RR turn counter = {turn} = the service's flows");
        }
        if want_policy == POLICY_ROUND_ROBIN || scans {
            check(max - min <= 1, || {
                format!("{name}: open flows per backend from {min} to {max} (want within 1)")
            })?;
        }
        done += &format!(
            "; LB_BE_OPEN sums to the {flows} flows over {} backends, {min} to {max} each{}",
            counts.len(),
            match (want_policy, scans) {
                (POLICY_ROUND_ROBIN, _) => "",
                (_, true) => " (every backend scanned)",
                (_, false) => " (two candidates: more than LC_SCAN_MAX backends)",
            }
        );
        Ok(done)
    }

    fn xdp(&mut self, name: &str) -> Result<&mut Xdp, String> {
        xdp(&mut self.dp.ebpf, name)
    }

    fn pass(&mut self) -> Result<&mut Xdp, String> {
        lb_testkit::xdp_pass::program(&mut self.pass).map_err(|e| format!("{e:#}"))
    }

    /// (a) One call on the non-service packet.
    fn call_non_service(&mut self, repeat: u32) -> Result<f64, String> {
        let row = fixtures::row(&self.rows, "non_service").clone();
        let s0 = self.stats()?;
        let (res, out) = test_run(self.xdp(XDP_PROGRAM)?, &row.packet, repeat)?;
        let s1 = self.stats()?;
        check(
            res.return_value == row.verdict
                && out == row.output
                && (row.counter)(&s1) - (row.counter)(&s0) == u64::from(repeat),
            || {
                format!(
                    "non-service packet ({} services × {} endpoints): verdict {}, bytes {}, \
                     pass_not_service +{} for repeat {repeat}",
                    self.n,
                    self.per,
                    res.return_value,
                    if out == row.output {
                        "unchanged"
                    } else {
                        "CHANGED"
                    },
                    (row.counter)(&s1) - (row.counter)(&s0)
                )
            },
        )?;
        Ok(ns(res.duration))
    }

    /// (b) One call on the established ping-pong packet.
    fn call_established(&mut self, repeat: u32) -> Result<f64, String> {
        let row = fixtures::row(&self.rows, "established").clone();
        let s0 = self.stats()?;
        let (res, out) = test_run(self.xdp(XDP_PROGRAM)?, &row.packet, repeat)?;
        let s1 = self.stats()?;
        check(res.return_value == row.verdict && out == row.packet, || {
            "established ping-pong: after an even number of runs the packet must be the input again"
                .into()
        })?;
        check(
            (row.counter)(&s1) - (row.counter)(&s0) == u64::from(repeat)
                && s1.new_flows == s0.new_flows,
            || {
                format!(
                    "established ping-pong: {} established and {} new flows for {repeat} runs",
                    s1.established - s0.established,
                    s1.new_flows - s0.new_flows,
                )
            },
        )?;
        Ok(ns(res.duration))
    }

    /// (d) One call on the reply `P:8080 → client` of the established flow,
    /// through TC; the reverse-NAT entries of A and B ping-pong.
    fn call_tc_reply(&mut self, repeat: u32) -> Result<f64, String> {
        let row = fixtures::row(&self.rows, "tc_reply").clone();
        let s0 = self.stats()?;
        let prog: &mut SchedClassifier =
            program(&mut self.dp.ebpf, TC_PROGRAM).map_err(|e| e.to_string())?;
        let (res, out) = test_run(prog, &row.packet, repeat)?;
        let s1 = self.stats()?;
        check(
            res.return_value == row.verdict
                && out == row.packet
                && (row.counter)(&s1) - (row.counter)(&s0) == u64::from(repeat),
            || {
                format!(
                    "TC reply ping-pong: verdict {}, packet not back or {} reverse NATs for {repeat} runs",
                    res.return_value,
                    (row.counter)(&s1) - (row.counter)(&s0)
                )
            },
        )?;
        Ok(ns(res.duration))
    }

    /// (c) One new-flow call: `packets` distinct SYNs from `src_addr`, each
    /// with repeat = 1, then the same SYNs through `xdp_pass`. Returns
    /// the two averages.
    fn call_new_flows(&mut self, src_addr: [u8; 4], packets: usize) -> Result<(f64, f64), String> {
        let syns: Vec<Vec<u8>> = (0..packets)
            .map(|i| tcp((src_addr, 10_000 + i as u16), self.frontend, true))
            .collect();
        let before = self.stats()?;
        let mut sum = 0.0;
        for p in &syns {
            let (res, _) = test_run(self.xdp(XDP_PROGRAM)?, p, 1)?;
            check(res.return_value == XDP_PASS, || {
                format!("new flow: verdict {}", res.return_value)
            })?;
            sum += ns(res.duration);
        }
        let after = self.stats()?;
        self.syns_sent += syns.len() as u64;
        check(
            after.new_flows - before.new_flows == syns.len() as u64
                && after.ct_insert_failed == before.ct_insert_failed
                && after.flows_untracked == before.flows_untracked,
            || {
                format!(
                    "new flows: {} counted for {} SYNs ({} conntrack inserts failed, {} flows untracked)",
                    after.new_flows - before.new_flows,
                    syns.len(),
                    after.ct_insert_failed - before.ct_insert_failed,
                    after.flows_untracked - before.flows_untracked
                )
            },
        )?;
        let raw = sum / syns.len() as f64;
        let mut sum = 0.0;
        for p in &syns {
            let (res, _) = test_run(self.pass()?, p, 1)?;
            sum += ns(res.duration);
        }
        Ok((raw, sum / syns.len() as f64))
    }

    /// One call of every figure, recorded (`record`) or as a warm-up.
    fn call_all(&mut self, call: usize, effort: &Effort, record: bool) -> Result<(), String> {
        let r = effort.repeat;
        let a = self.call_non_service(r)?;
        let b = self.call_established(r)?;
        let d = self.call_tc_reply(r)?;
        // Distinct source addresses per call keep every SYN a new flow.
        let src = [198, 19, 200, call as u8 + 1];
        let (raw, overhead) = self.call_new_flows(src, effort.new_flow_packets)?;
        if record {
            self.non_service.push(a);
            self.established.push(b);
            self.tc_reply.push(d);
            self.new_flow_raw.push(raw);
            self.call_overhead.push(overhead);
        }
        Ok(())
    }

    fn row(&self) -> Value {
        let raw = median(self.new_flow_raw.clone());
        let overhead = median(self.call_overhead.clone());
        json!({
            "services": self.n,
            "endpoints": self.per,
            "non_service_ns": round2(median(self.non_service.clone())),
            "established_ns": round2(median(self.established.clone())),
            "new_flow_raw_ns": round2(raw),
            "call_overhead_ns": round2(overhead),
            "new_flow_ns": round2(raw - overhead),
            "tc_reply_ns": round2(median(self.tc_reply.clone())),
            "fill_seconds": round2(self.fill_s),
            "fill_ops": self.fill_ops,
        })
    }
}

// ---------------------------------------------------------------------------
// Spread
// ---------------------------------------------------------------------------

/// SplitMix64 (Steele, Lea, Flood 2014): a small seeded generator, so the
/// figures are the same on every run and every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// iptables' chain for `n` endpoints: rule `i` matches with probability
/// `1/(n−i)` (`-m statistic --mode random --probability …`), the last rule
/// always. Returns the endpoint index.
fn iptables_pick(rng: &mut SplitMix64, n: usize) -> usize {
    for i in 0..n - 1 {
        if rng.next_f64() < 1.0 / (n - i) as f64 {
            return i;
        }
    }
    n - 1
}

/// nftables' `numgen random mod n vmap { 0 : goto …, … }`: one uniform draw
/// in `0..n` (the kernel's `prandom_u32_state` scaled by `reciprocal_scale`;
/// simulated here as a uniform draw from the same generator).
fn nftables_pick(rng: &mut SplitMix64, n: usize) -> usize {
    (((rng.next_u64() >> 32) * n as u64) >> 32) as usize
}

/// Shares, max/min and the chi-square test of uniformity.
fn spread_figures(counts: &[u64]) -> Value {
    let total: u64 = counts.iter().sum();
    let expected = total as f64 / counts.len() as f64;
    let chi2: f64 = counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum();
    let df = (counts.len() - 1) as f64;
    let p = ChiSquared::new(df).map(|d| d.sf(chi2)).unwrap_or(f64::NAN);
    let max = *counts.iter().max().unwrap_or(&0) as f64;
    let min = *counts.iter().min().unwrap_or(&0) as f64;
    json!({
        "counts": counts,
        "shares": counts.iter().map(|&c| round6(c as f64 / total as f64)).collect::<Vec<_>>(),
        "max_min_ratio": round6(max / min),
        "chi_square": round6(chi2),
        "degrees_of_freedom": df,
        "p_value": round6(p),
    })
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn spread() -> Value {
    let n = SPREAD_BACKENDS;
    let names: Vec<String> = (0..n).map(|j| format!("{}:{POD_PORT}", pod(j))).collect();
    let table = maglev::populate(&names, spread_maglev_size());
    // The table after removing the last backend: indices 0..n-1 keep their
    // names, so they compare directly with `table`'s.
    let removed = n - 1;
    let table_after = maglev::populate(&names[..removed], spread_maglev_size());
    let mut slot_counts = vec![0u64; n];
    for &b in &table {
        slot_counts[b as usize] += 1;
    }

    let mut rng = SplitMix64(SPREAD_SEED);
    let frontend = (NODE, FIRST_NODE_PORT);
    let mut maglev_counts = vec![0u64; n];
    let mut ipt_counts = vec![0u64; n];
    let mut nft_counts = vec![0u64; n];
    let (mut moved, mut moved_other, mut ipt_moved, mut nft_moved) = (0u64, 0u64, 0u64, 0u64);
    for _ in 0..SPREAD_FLOWS {
        let r = rng.next_u64();
        let src = (r as u32).to_be_bytes();
        let sport = ((r >> 32) as u16).max(1);
        // Exactly the datapath's choice: flow hash of the packet's 5-tuple,
        // multiply-shift slot, table entry.
        let h = flow_hash_v4(src, frontend.0, sport.to_be(), frontend.1.to_be(), 6);
        let b = table[maglev_slot(h, spread_maglev_size()) as usize] as usize;
        maglev_counts[b] += 1;
        let b2 = table_after[maglev_slot(h, spread_maglev_size()) as usize] as usize;
        if b2 != b {
            moved += 1;
            if b != removed {
                moved_other += 1;
            }
        }
        // iptables: the same flow draws its endpoint from the chain; a new
        // connection with the same 5-tuple after the removal draws again.
        let i = iptables_pick(&mut rng, n);
        ipt_counts[i] += 1;
        if iptables_pick(&mut rng, n - 1) != i {
            ipt_moved += 1;
        }
        // nftables: the same, with one uniform draw per connection.
        let i = nftables_pick(&mut rng, n);
        nft_counts[i] += 1;
        if nftables_pick(&mut rng, n - 1) != i {
            nft_moved += 1;
        }
    }
    let flows = SPREAD_FLOWS as f64;
    let slot_max = *slot_counts.iter().max().unwrap_or(&0) as f64;
    let slot_min = *slot_counts.iter().min().unwrap_or(&0) as f64;
    json!({
        "flows": SPREAD_FLOWS,
        "backends": n,
        "seed": format!("{SPREAD_SEED:#x}"),
        "maglev_table_size": spread_maglev_size(),
        "maglev": spread_figures(&maglev_counts),
        "maglev_table_slots_max_min_ratio": round6(slot_max / slot_min),
        "iptables_random": spread_figures(&ipt_counts),
        "nftables_numgen": spread_figures(&nft_counts),
        "removal": {
            "removed_backend": names[removed],
            "maglev_moved_share": round6(moved as f64 / flows),
            "maglev_moved_share_of_surviving_backends": round6(moved_other as f64 / flows),
            "iptables_moved_share_simulated": round6(ipt_moved as f64 / flows),
            "iptables_moved_share_theoretical": round6(1.0 - 1.0 / n as f64),
            "nftables_moved_share_simulated": round6(nft_moved as f64 / flows),
        },
        "method": "100,000 5-tuples (random source address and port, one TCP frontend) from SplitMix64 with the seed above. Maglev: lb_userspace::maglev::populate over 10 backends at the size the agent gives them (maglev_table_size), slot = maglev_slot(flow_hash_v4(tuple), size), exactly the datapath's choice. iptables: kube-proxy's chain of `statistic mode random probability 1/(n-i)` rules simulated with draws from the same generator. nftables: kube-proxy's `numgen random mod 10 vmap` simulated as one uniform draw per connection from the same generator. Chi-square test of equal shares (9 degrees of freedom, statrs). Removal: the last backend is removed; Maglev's table is rebuilt and every flow looked up again; for iptables and nftables a flow's endpoint is not a function of its 5-tuple, so a reconnection draws again from the 9 remaining endpoints (simulated), moving 1 - 1/n of the flows in expectation (theoretical). Established connections stay on their endpoint in both systems (conntrack); this figure is where the same 5-tuple lands after the change.",
    })
}

fn print_spread(s: &Value) {
    println!(
        "spread: Maglev max/min {} (p = {}), iptables max/min {} (p = {}); \
         one of ten removed: Maglev moves {:.2}% ({:.2}% of flows on surviving backends), \
         iptables {:.2}% (theory {:.0}%)",
        s["maglev"]["max_min_ratio"],
        s["maglev"]["p_value"],
        s["iptables_random"]["max_min_ratio"],
        s["iptables_random"]["p_value"],
        s["removal"]["maglev_moved_share"]
            .as_f64()
            .unwrap_or_default()
            * 100.0,
        s["removal"]["maglev_moved_share_of_surviving_backends"]
            .as_f64()
            .unwrap_or_default()
            * 100.0,
        s["removal"]["iptables_moved_share_simulated"]
            .as_f64()
            .unwrap_or_default()
            * 100.0,
        s["removal"]["iptables_moved_share_theoretical"]
            .as_f64()
            .unwrap_or_default()
            * 100.0,
    );
}

// ---------------------------------------------------------------------------
// The forwarding (SNAT) path
// ---------------------------------------------------------------------------

/// One NodePort service whose 10 endpoints are on another node.
fn remote_objects() -> Result<Objects, String> {
    let mut objs = Objects::default();
    objs.services.push(object(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "remote", "namespace": "bench"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.2",
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80,
                            "nodePort": FIRST_NODE_PORT, "targetPort": POD_PORT}]},
    }))?);
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|j| {
            json!({"addresses": [format!("198.18.2.{}", 11 + j)],
                   "conditions": {"ready": true}, "nodeName": "node-b"})
        })
        .collect();
    objs.slices.push(object(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "remote-x", "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": "remote"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": POD_PORT}],
        "endpoints": endpoints,
    }))?);
    Ok(objs)
}

/// Average ns of one `repeat=1` run per packet, with `ctx.ingress_ifindex`.
fn xdp_calls(prog: &mut Xdp, pkts: &[Vec<u8>], ifindex: u32, want: u32) -> Result<f64, String> {
    let mut total = Duration::ZERO;
    for pkt in pkts {
        let md: Vec<u8> = [0, pkt.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|v: &u32| v.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; pkt.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                ctx_in: Some(&md),
                repeat: 1,
                ..Default::default()
            })
            .map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))?;
        check(r.return_value == want, || {
            format!("verdict {} instead of {want}", r.return_value)
        })?;
        total += r.duration;
    }
    Ok(ns(total) / pkts.len() as f64)
}

/// Per-packet cost of the forwarding path: a new flow to a pod on another
/// node (Maglev, SNAT port reservation, conntrack insert, DNAT + SNAT, FIB
/// lookup, XDP_TX), a packet of such a flow, and its reply translated back.
/// Run in a private network namespace whose FIB resolves the next hop, with
/// `repeat=1` calls (a rewritten packet is not a frontend any more) minus
/// the call overhead of `xdp_pass` measured the same way.
fn snat_path(quick: bool) -> Result<Value, String> {
    let packets = if quick { 300 } else { 2_000 };
    std::thread::scope(|sc| {
        sc.spawn(|| -> Result<Value, String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unshare: {e}"))?;
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| e.to_string())?;
            for args in [
                "link add v0 type veth peer name v1",
                "addr add 198.18.0.1/24 dev v0",
                "link set v0 up",
                "link set v1 up",
                "neigh add 198.18.0.2 lladdr 02:00:00:00:00:01 dev v0 nud permanent",
                "neigh add 198.18.0.3 lladdr 02:00:00:00:00:03 dev v0 nud permanent",
                "route add 198.18.2.0/24 via 198.18.0.3 dev v0",
            ] {
                let st = std::process::Command::new("ip")
                    .args(args.split(' '))
                    .status()
                    .map_err(|e| e.to_string())?;
                check(st.success(), || format!("ip {args}"))?;
            }
            let ifindex = nix::net::if_::if_nametoindex("v0").map_err(|e| e.to_string())?;
            let root = Site::new("dp").map_err(|e| format!("{e:#}"))?;
            let mut dp = Datapath::load(&LoadOptions {
                bpffs_root: root.pins().to_owned(),
                ct_capacity: CT_CAPACITY,
            })
            .map_err(|e| e.to_string())?;
            dp.load_ingress(lb_userspace::loader::IngressHook::Xdp)
                .map_err(|e| e.to_string())?;
            dp.configure(&lb_common::DatapathConfig {
                snat_addr: NODE,
                snat_port_lo: 1024,
                snat_port_hi: 65_535,
            })
            .map_err(|e| e.to_string())?;
            let mut maps = KernelMaps::from_ebpf(&mut dp.ebpf).map_err(|e| e.to_string())?;
            let node = NodeContext {
                node_name: NODE_NAME.into(),
                node_addrs: vec![Ipv4Addr::from(NODE)],
            };
            let desired = translate(&remote_objects()?, &node)
                .map_err(|e| e.to_string())?
                .desired;
            let ops = plan(
                &MapState::default(),
                &desired,
                &PlanConfig::default(),
            )
            .map_err(|e| e.to_string())?;
            maps.apply(&ops).map_err(|e| e.to_string())?;

            let syns: Vec<Vec<u8>> = (0..packets)
                .map(|i: u32| {
                    let src = [198, 18, 100 + (i / 60_000) as u8, (i % 250) as u8 + 1];
                    tcp((src, 10_000 + (i % 50_000) as u16), (NODE, FIRST_NODE_PORT), true)
                })
                .collect();
            let frontend = (NODE, FIRST_NODE_PORT);
            let data = vec![tcp((CLIENT, 43_000), frontend, false); packets as usize];
            let mut pass_object = lb_testkit::xdp_pass::load().map_err(|e| format!("{e:#}"))?;
            let pass =
                lb_testkit::xdp_pass::program(&mut pass_object).map_err(|e| format!("{e:#}"))?;
            let overhead_new = xdp_calls(pass, &syns, ifindex, XDP_PASS)?;
            let overhead = xdp_calls(pass, &data, ifindex, XDP_PASS)?;
            let prog = xdp(&mut dp.ebpf, XDP_PROGRAM)?;
            let new_raw = xdp_calls(prog, &syns, ifindex, XDP_TX)?;
            // The established flow: its first packet pins it; then the reply.
            xdp_calls(prog, &data[..1], ifindex, XDP_TX)?; // pins the flow
            let mut out = vec![0u8; data[0].len() + 256];
            let md: Vec<u8> = [0, data[0].len() as u32, 0, ifindex, 0, 0]
                .iter()
                .flat_map(|v: &u32| v.to_ne_bytes())
                .collect();
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(&data[0]),
                    data_out: Some(&mut out),
                    ctx_in: Some(&md),
                    repeat: 1,
                    ..Default::default()
                })
                .map_err(|e| e.to_string())?;
            out.truncate(r.data_size_out as usize);
            let (pod, pod_port) = ([out[30], out[31], out[32], out[33]], u16::from_be_bytes([out[36], out[37]]));
            let snat_port = u16::from_be_bytes([out[34], out[35]]);
            let est_raw = xdp_calls(prog, &data, ifindex, XDP_TX)?;
            let reply = vec![tcp((pod, pod_port), (NODE, snat_port), false); packets as usize];
            let rev_raw = xdp_calls(prog, &reply, ifindex, XDP_TX)?;
            let st = stats(root.pins())?;
            check(st.forwarded as u32 >= packets, || format!("forwarded {}", st.forwarded))?;
            check(st.reverse_snat as u32 >= packets, || {
                format!("reverse_snat {}", st.reverse_snat)
            })?;
            let row = json!({
                "new_forwarded_flow_ns": round2(new_raw - overhead_new),
                "new_forwarded_flow_raw_ns": round2(new_raw),
                "established_forwarded_ns": round2(est_raw - overhead),
                "established_forwarded_raw_ns": round2(est_raw),
                "reverse_snat_ns": round2(rev_raw - overhead),
                "reverse_snat_raw_ns": round2(rev_raw),
                "call_overhead_ns": round2(overhead),
                "packets_per_figure": packets,
                "method": "one NodePort service with 10 endpoints on another node; a private network namespace whose FIB resolves the next hop (bpf_fib_lookup succeeds, verdict XDP_TX checked on every call); repeat=1 calls (a rewritten packet is not a frontend, so repeat>1 would measure something else) minus xdp_pass called the same way",
            });
            println!(
                "datapath: SNAT path: new forwarded flow {:.1} ns, established forwarded {:.1} ns, reply reverse-SNAT {:.1} ns (net of {:.1} ns call overhead)",
                new_raw - overhead_new,
                est_raw - overhead,
                rev_raw - overhead,
                overhead
            );
            drop(maps);
            drop(dp);
            Ok(row)
        })
        .join()
        .map_err(|_| "SNAT bench thread panicked".to_string())?
    })
}
