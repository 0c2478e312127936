//! Traffic through each system on one namespace topology, at every point of
//! the services and endpoints axes, against the no-load-balancer ceiling:
//! **xdp** (lb-agent), **iptables** and
//! **nftables** (kube-proxy's rules from [`crate::kubeproxy`]) and **nolb**
//! (the client connects straight to the pod addresses).
//!
//! * [`short_connections`]: one request per new TCP connection. For each
//!   point, the max rate of a closed loop and the latency at a fixed offered
//!   load (open loop, the same rate for every system); a services axis (1,
//!   1,000, 10,000 services × 10 endpoints, the target service where
//!   kube-proxy's order makes it dearest) and an endpoints axis (one service
//!   with 2 … 1,000 endpoints that all answer).
//! * [`udp`]: request/echo transactions per second through each system.
//!
//! Every measurement gets a fresh [`topology::Topology`] (see there for the
//! addresses) and reports the kernel counters that tell what limited it
//! ([`counters`]). The load generator and the servers are epoll threads of
//! this process ([`load`], [`server`]); only the agent is another process.

pub mod counters;
pub mod load;
pub mod server;
pub mod sys;
pub mod topology;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use self::{
    counters::Snapshot,
    load::{Loop, TcpOutcome, TcpRun, UdpOutcome, UdpRun},
    server::{REQUEST, Served},
    topology::{NODE_ADDR, System, Topology},
};
use crate::kubeproxy::{self, BenchService, Protocol};

/// Endpoints per service on the services axis.
pub const SERVICES_AXIS_ENDPOINTS: usize = 10;

/// What to measure and for how long.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A quick run (the test suite's smoke test).
    pub quick: bool,
    /// Service counts of the services axis (× [`SERVICES_AXIS_ENDPOINTS`]).
    pub services_axis: Vec<usize>,
    /// Endpoint counts of the endpoints axis (one service).
    pub endpoints_axis: Vec<usize>,
    /// The systems, in the order of the first repetition (later ones rotate).
    pub systems: Vec<System>,
    /// Each phase (fixed load, max rate) of each measurement, warm-up included.
    pub duration: Duration,
    /// The start of each phase that the figures leave out.
    pub warmup: Duration,
    /// Connections in flight in the max-rate (closed-loop) phase.
    pub in_flight: usize,
    /// Load-generator threads.
    pub threads: usize,
    /// New connections per second of the fixed-load (open-loop) phase:
    /// 500, about a third of the slowest max rate measured here (iptables
    /// at 10,000 services, ~1,500/s on 2 cores); at 1,000/s that row was
    /// overloaded (p50 76 ms), which measures queueing, not the path.
    pub offered_load_per_s: f64,
    /// Measurements of each (point, system), interleaved across systems.
    pub repeats: usize,
    /// Endpoints of the UDP service.
    pub udp_endpoints: usize,
    /// UDP flows (sockets), each with one request outstanding.
    pub udp_flows: usize,
    /// Each UDP measurement, warm-up included.
    pub udp_duration: Duration,
    /// The longest wait for an idle machine before each measurement (see
    /// [`counters::wait_for_idle`]).
    pub idle_wait_max: Duration,
}

impl Settings {
    /// The quick or the full settings.
    pub fn new(quick: bool) -> Self {
        if quick { Self::quick() } else { Self::full() }
    }

    /// Quick: services 1 and 1,000, endpoints 2 and 100, short phases.
    pub fn quick() -> Self {
        Self {
            quick: true,
            services_axis: vec![1, 1_000],
            endpoints_axis: vec![2, 100],
            duration: Duration::from_millis(600),
            warmup: Duration::from_millis(100),
            repeats: 1,
            systems: System::ALL.to_vec(),
            udp_duration: Duration::from_millis(600),
            idle_wait_max: Duration::from_secs(1),
            ..Self::full()
        }
    }

    /// Full: every point, 3 s phases, two interleaved repetitions.
    pub fn full() -> Self {
        Self {
            quick: false,
            services_axis: vec![1, 1_000, 10_000],
            endpoints_axis: vec![2, 10, 100, 1_000],
            // The pass-only XDP row only in the full run: it explains the
            // XDP rows, it is not one of the compared systems.
            systems: System::ALL
                .into_iter()
                .chain([System::NoLbXdpPass])
                .collect(),
            duration: Duration::from_secs(3),
            warmup: Duration::from_millis(500),
            in_flight: 32,
            threads: 2,
            offered_load_per_s: 500.0,
            repeats: 2,
            udp_endpoints: 10,
            udp_flows: 64,
            udp_duration: Duration::from_secs(3),
            idle_wait_max: Duration::from_secs(20),
        }
    }

    fn json(&self) -> Value {
        json!({
            "quick": self.quick,
            "services_axis": self.services_axis,
            "services_axis_endpoints": SERVICES_AXIS_ENDPOINTS,
            "endpoints_axis": self.endpoints_axis,
            "systems": self.systems.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "phase_seconds": self.duration.as_secs_f64(),
            "warmup_seconds": self.warmup.as_secs_f64(),
            "closed_loop_in_flight": self.in_flight,
            "generator_threads": self.threads,
            "offered_load_per_s": self.offered_load_per_s,
            "repeats": self.repeats,
            "connection_timeout_seconds": load::TCP_TIMEOUT.as_secs_f64(),
            "thread_nice": sys::NICE,
            "idle_wait_max_seconds": self.idle_wait_max.as_secs_f64(),
            "client_sysctls": topology::CLIENT_SYSCTLS
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// `x`, or JSON null when it is not finite.
fn num(x: f64, digits: i32) -> Value {
    if x.is_finite() {
        json!(round(x, digits))
    } else {
        Value::Null
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------
// Short connections
// ---------------------------------------------------------------------------

/// The method, as reported in the JSON.
pub const TCP_METHOD: &str = "Topology (fresh for every measurement, so no rules, conntrack entries, TIME_WAIT sockets or pinned maps leak between systems): client namespace --veth-- node namespace (NodePort address 198.18.0.1, ip_forward=1; lb-agent's XDP+TC on its client-side veth, or kube-proxy's rules loaded with iptables-restore / nft -f) --veth per pod namespace-- 4 pod namespaces, each owning a /24 of 198.19.0.0/16 through a local route, with one epoll server on 0.0.0.0:8080 serving all its addresses; endpoint j is 198.19.(j mod 4).(2 + j div 4), so every endpoint really answers. Client veth has tx checksum offload off (all systems). One request per connection: the client connects, sends a 31-byte HTTP/1.0 GET, reads the ~50-byte answer (the serving address) until the server's FIN, and closes; the server closes first, so TIME_WAIT sits on the pods (as with an HTTP/1.0 or Connection: close server) and the client's ports are free again as soon as its FIN is acked, so the client's port space never limits a system (client sysctls, identical for all: ip_local_port_range 1024-65535, tcp_tw_reuse=1). Target: NodeIP:nodePort of service 0, which the kube-proxy generator writes last in every per-service list (services axis: the other services' endpoints are addresses that never receive traffic); nolb: the client connects straight to the target service's pod addresses, round robin, so it has the same address space as the balanced rows (on the services axis: nolb with 10 endpoints, whatever the services count). Load generator: non-blocking sockets on epoll threads in the client namespace; generator and server threads run at nice -10 so that background jobs disturb every system less. Fixed load (p50/p90/p99/max): open loop, connections started at evenly spaced times at offered_load_per_s for every system, latency from the scheduled start to the server's FIN (so falling behind shows as latency); connections not answered within connection_timeout_seconds count as failures (a dropped SYN is retried after 1 s, so it shows as a ~1 s latency). Max rate (rate_per_s): closed loop, closed_loop_in_flight connections always open, answered connections per second after the warm-up. Both phases run on the same topology, fixed load first. Before each measurement the bench waits (up to idle_wait_max_seconds; idle_wait_seconds says how long it did) until the machine is idle (busy < 20% over 100 ms): the kernel frees a deleted namespace's rules, conntrack entries and sockets later on a worker thread, which would otherwise land on the next system's measurement. fraction_of_nolb = rate_per_s / the nolb rate at the same point. Evidence: deltas of the SNMP/TcpExt counters of the client, node and pod namespaces (pods summed), conntrack statistics and entry count in the node namespace, the machine's CPU shares from /proc/stat, and the CPU seconds of the bench process (generator + servers) and of lb-agent during the phase (busy_cpu_seconds minus those two is everything else: kernel workers, ksoftirqd, other jobs) (the client, servers, forwarding and rules share the same 2 cores, so rates are for the whole path on this machine, not for the load balancer alone). Repetitions of a point are interleaved across systems (rotating order); rate_per_s is the median over them, latency percentiles come from all their samples.";

/// One measurement of one system at one point.
#[derive(Debug)]
struct TcpMeasurement {
    fixed: TcpOutcome,
    max: TcpOutcome,
    served: Served,
    evidence_fixed: Value,
    evidence_max: Value,
    setup: Duration,
    idle_wait: Duration,
}

/// A point of an axis.
#[derive(Debug, Clone, Copy)]
struct Point {
    services: usize,
    endpoints: usize,
}

/// The services of a point: on the services axis only service 0's
/// endpoints answer.
fn point_services(p: Point, protocol: Protocol) -> Vec<BenchService> {
    kubeproxy::services(
        p.services,
        p.endpoints,
        |i, j| {
            if i == 0 {
                topology::endpoint(j)
            } else {
                topology::silent_endpoint(i, j)
            }
        },
        protocol,
    )
}

/// Where the client connects for `system` at this point.
fn tcp_targets(system: System, svcs: &[BenchService]) -> Vec<SocketAddrV4> {
    match system {
        System::NoLb | System::NoLbXdpPass => {
            topology::targets(&svcs[0].endpoints, svcs[0].target_port)
        }
        _ => vec![SocketAddrV4::new(NODE_ADDR, svcs[0].node_port)],
    }
}

/// One request on a blocking socket, retried for up to 5 s: the path works
/// before anything is measured.
fn probe_tcp(topo: &Topology, target: SocketAddrV4) -> Result<()> {
    let result = topo.client().run(move || -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let attempt = (|| -> std::io::Result<Vec<u8>> {
                let mut s =
                    TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_secs(1))?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                s.write_all(REQUEST)?;
                let mut answer = Vec::new();
                s.read_to_end(&mut answer)?;
                Ok(answer)
            })();
            match attempt {
                Ok(a) if a.starts_with(server::OK_PREFIX) => return Ok(()),
                Ok(a) => bail!("unexpected answer {:?}", String::from_utf8_lossy(&a)),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).context("no answer for 5 s");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })?;
    result.with_context(|| format!("probe {target}"))
}

fn measure_tcp(
    point: Point,
    system: System,
    agent_bin: &Path,
    settings: &Settings,
) -> Result<TcpMeasurement> {
    let idle_wait = counters::wait_for_idle(settings.idle_wait_max)?;
    let svcs = point_services(point, Protocol::Tcp);
    let mut topo = Topology::build(&[])?;
    let setup = topo.install(system, &svcs, agent_bin)?;
    let targets = tcp_targets(system, &svcs);
    probe_tcp(&topo, targets[0]).with_context(|| {
        format!(
            "{} at {} services × {} endpoints; agent log:\n{}",
            system.name(),
            point.services,
            point.endpoints,
            topo.agent_log()
        )
    })?;
    let _ = topo.take_served();

    let run = |mode: Loop| -> Result<(TcpOutcome, Value)> {
        let before = topo.snapshot()?;
        let tcp_run = TcpRun {
            targets: targets.clone(),
            mode,
            duration: settings.duration,
            warmup: settings.warmup,
            threads: settings.threads,
        };
        let outcome = topo.client().run(move || load::tcp(&tcp_run))??;
        let after = topo.snapshot()?;
        Ok((outcome, before.evidence(&after)))
    };
    let (fixed, evidence_fixed) = run(Loop::Open {
        rate: settings.offered_load_per_s,
    })?;
    let (max, evidence_max) = run(Loop::Closed {
        in_flight: settings.in_flight,
    })?;
    let served = topo.take_served();
    Ok(TcpMeasurement {
        fixed,
        max,
        served,
        evidence_fixed,
        evidence_max,
        setup,
        idle_wait,
    })
}

/// How many of `svc`'s endpoints answered at least once.
fn endpoints_answered(svc: &BenchService, served: &Served) -> usize {
    svc.endpoints
        .iter()
        .filter(|a| served.get(a).copied().unwrap_or(0) > 0)
        .count()
}

fn failures_json(f: &BTreeMap<String, u64>) -> Value {
    json!(f)
}

/// The row of one (point, system) from its repetitions.
fn tcp_row(point: Point, system: System, runs: &[TcpMeasurement], settings: &Settings) -> Value {
    let svc = &point_services(
        Point {
            services: 1,
            ..point
        },
        Protocol::Tcp,
    )[0];
    let rates: Vec<f64> = runs.iter().map(|m| m.max.rate()).collect();
    let rate = median(&rates);
    let mut fixed = TcpOutcome::default();
    let mut max_failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut served = Served::new();
    for m in runs {
        fixed.started += m.fixed.started;
        fixed.answered += m.fixed.answered;
        fixed.latencies_us.extend(&m.fixed.latencies_us);
        for (k, v) in &m.fixed.failures {
            *fixed.failures.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &m.max.failures {
            *max_failures.entry(k.clone()).or_default() += v;
        }
        for (a, n) in &m.served {
            *served.entry(*a).or_default() += n;
        }
    }
    fixed.latencies_us.sort_unstable();
    // The evidence of the repetition whose rate is nearest the median.
    let pick = runs
        .iter()
        .enumerate()
        .min_by(|a, b| {
            (a.1.max.rate() - rate)
                .abs()
                .total_cmp(&(b.1.max.rate() - rate).abs())
        })
        .map_or(0, |(i, _)| i);
    let achieved =
        fixed.answered as f64 / (settings.duration.as_secs_f64() * runs.len() as f64).max(1e-9);
    json!({
        "services": point.services,
        "endpoints": point.endpoints,
        "system": system.name(),
        "rate_per_s": num(rate, 0),
        "p50_ms": num(fixed.percentile_ms(50.0), 3),
        "p90_ms": num(fixed.percentile_ms(90.0), 3),
        "p99_ms": num(fixed.percentile_ms(99.0), 3),
        "max_ms": num(fixed.percentile_ms(100.0), 3),
        "failures": fixed.failed() + max_failures.values().sum::<u64>(),
        "fraction_of_nolb": Value::Null,
        "endpoints_answered": endpoints_answered(svc, &served),
        "fixed_load": {
            "offered_per_s": settings.offered_load_per_s,
            "achieved_per_s": num(achieved, 1),
            "started": fixed.started,
            "answered": fixed.answered,
            "failures": failures_json(&fixed.failures),
        },
        "max_rate": {
            "runs_per_s": rates.iter().map(|&r| num(r, 0)).collect::<Vec<_>>(),
            "failures": failures_json(&max_failures),
            "closed_loop_p50_ms": num(runs[pick].max.percentile_ms(50.0), 3),
            "closed_loop_p99_ms": num(runs[pick].max.percentile_ms(99.0), 3),
        },
        "setup_seconds": num(runs.iter().map(|m| m.setup.as_secs_f64()).sum::<f64>() / runs.len() as f64, 2),
        "idle_wait_seconds": runs.iter().map(|m| num(m.idle_wait.as_secs_f64(), 1)).collect::<Vec<_>>(),
        "evidence": {
            "max_rate": runs[pick].evidence_max,
            "fixed_load": runs[pick].evidence_fixed,
        },
    })
}

/// Fills `fraction_of_nolb` of each row from the nolb row of its point.
fn fill_fractions(rows: &mut [Value]) {
    let nolb: BTreeMap<(u64, u64), f64> = rows
        .iter()
        .filter(|r| r["system"] == "nolb")
        .filter_map(|r| {
            Some((
                (r["services"].as_u64()?, r["endpoints"].as_u64()?),
                r["rate_per_s"].as_f64()?,
            ))
        })
        .collect();
    for r in rows {
        let key = (
            r["services"].as_u64().unwrap_or(0),
            r["endpoints"].as_u64().unwrap_or(0),
        );
        if let (Some(&base), Some(rate)) = (nolb.get(&key), r["rate_per_s"].as_f64())
            && base > 0.0
        {
            r["fraction_of_nolb"] = json!(round(rate / base, 3));
        }
    }
}

/// Measures every point of `points` for every system; repetitions are
/// interleaved (each repetition measures every system once, in a rotated
/// order).
fn tcp_axis(
    name: &str,
    points: &[Point],
    agent_bin: &Path,
    settings: &Settings,
) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for &point in points {
        let mut runs: Vec<Vec<TcpMeasurement>> = settings.systems.iter().map(|_| vec![]).collect();
        for rep in 0..settings.repeats.max(1) {
            for k in 0..settings.systems.len() {
                let i = (k + rep) % settings.systems.len();
                let system = settings.systems[i];
                let m = measure_tcp(point, system, agent_bin, settings).with_context(|| {
                    format!(
                        "{name}: {} at {} services × {} endpoints",
                        system.name(),
                        point.services,
                        point.endpoints
                    )
                })?;
                println!(
                    "traffic: {name} {:>6} svc × {:>4} ep {:<9} {:>7.0} conn/s, fixed load p50 {:.3} ms p99 {:.3} ms, {} failures",
                    point.services,
                    point.endpoints,
                    system.name(),
                    m.max.rate(),
                    m.fixed.percentile_ms(50.0),
                    m.fixed.percentile_ms(99.0),
                    m.fixed.failed() + m.max.failed(),
                );
                runs[i].push(m);
            }
        }
        for (i, system) in settings.systems.iter().enumerate() {
            rows.push(tcp_row(point, *system, &runs[i], settings));
        }
    }
    fill_fractions(&mut rows);
    Ok(rows)
}

fn check_prerequisites() -> Result<()> {
    if !lb_testkit::is_root() {
        bail!("the traffic bench needs root (network namespaces, BPF, iptables)");
    }
    if !lb_testkit::bpffs_mounted() {
        bail!("bpffs is not mounted at /sys/fs/bpf: run `cargo xtask setup`");
    }
    for tool in [
        "ip",
        "ethtool",
        "nsenter",
        "sysctl",
        "iptables-restore",
        "nft",
    ] {
        if lb_testkit::cmd::find_program(tool).is_none() {
            bail!("`{tool}` not found: run `cargo xtask setup`");
        }
    }
    lb_testkit::lab::netns::remove_stale();
    Ok(())
}

/// Short-connection rates and latencies of every system on both axes.
pub fn short_connections(agent_bin: &Path, settings: &Settings) -> Result<Value> {
    check_prerequisites()?;
    let started = Instant::now();
    let services: Vec<Point> = settings
        .services_axis
        .iter()
        .map(|&services| Point {
            services,
            endpoints: SERVICES_AXIS_ENDPOINTS,
        })
        .collect();
    let endpoints: Vec<Point> = settings
        .endpoints_axis
        .iter()
        .map(|&endpoints| Point {
            services: 1,
            endpoints,
        })
        .collect();
    for p in &endpoints {
        if p.endpoints > topology::MAX_ENDPOINTS {
            bail!(
                "{} endpoints: the topology answers on at most {}",
                p.endpoints,
                topology::MAX_ENDPOINTS
            );
        }
    }
    let services_axis = tcp_axis("services", &services, agent_bin, settings)?;
    let endpoints_axis = tcp_axis("endpoints", &endpoints, agent_bin, settings)?;
    Ok(json!({
        "method": TCP_METHOD,
        "offered_load_per_s": settings.offered_load_per_s,
        "settings": settings.json(),
        "services_axis": services_axis,
        "endpoints_axis": endpoints_axis,
        "duration_seconds": round(started.elapsed().as_secs_f64(), 1),
    }))
}

// ---------------------------------------------------------------------------
// UDP
// ---------------------------------------------------------------------------

/// The UDP method, as reported in the JSON.
pub const UDP_METHOD: &str = "Same topology as the short connections (fresh per measurement), one UDP NodePort service whose endpoints are UDP echo sockets bound to the endpoint addresses in the pod namespaces. Closed loop of request/echo transactions: the client has udp_flows connected sockets (fixed source ports: established flows for every system; nolb: sockets spread round robin over the pod addresses), each with exactly one 32-byte request outstanding, the next sent when its echo arrives; a request unanswered after 200 ms counts as lost and is sent again. rate_per_s = echoes per second after the warm-up; each echo is two packets forwarded by the node (packets_forwarded_per_s). cpu_us_per_request = busy CPU time of the whole machine (/proc/stat) over the run divided by the transactions: the whole path (client, node, pod) on 2 shared cores, the difference between systems is the load balancer's cost. This closed loop was chosen over a one-way flood because a flood on 2 cores measures mostly how the sender and the softirq fight over the CPUs (drops move between the sender's qdisc, the veth and the pod's socket), while a closed loop keeps every queue short and its ratios stable from run to run. Repetitions are interleaved across systems; the median is reported.";

/// One UDP measurement.
#[derive(Debug)]
struct UdpMeasurement {
    idle_wait: Duration,
    outcome: UdpOutcome,
    busy_cpu_seconds: f64,
    served: Served,
    evidence: Value,
}

fn probe_udp(topo: &Topology, target: SocketAddrV4) -> Result<()> {
    let result = topo.client().run(move || -> Result<()> {
        let s = UdpSocket::bind(("0.0.0.0", 0))?;
        s.connect(target)?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut buf = [0u8; 64];
        for _ in 0..25 {
            s.send(b"probe")?;
            if let Ok(n) = s.recv(&mut buf)
                && &buf[..n] == b"probe"
            {
                return Ok(());
            }
        }
        bail!("no echo for 5 s")
    })?;
    result.with_context(|| format!("UDP probe {target}"))
}

fn measure_udp(system: System, agent_bin: &Path, settings: &Settings) -> Result<UdpMeasurement> {
    let point = Point {
        services: 1,
        endpoints: settings.udp_endpoints,
    };
    let idle_wait = counters::wait_for_idle(settings.idle_wait_max)?;
    let svcs = point_services(point, Protocol::Udp);
    let mut topo = Topology::build(&svcs[0].endpoints)?;
    topo.install(system, &svcs, agent_bin)?;
    let targets = tcp_targets(system, &svcs);
    probe_udp(&topo, targets[0])
        .with_context(|| format!("{}; agent log:\n{}", system.name(), topo.agent_log()))?;
    let _ = topo.take_served();
    let before: Snapshot = topo.snapshot()?;
    let run = UdpRun {
        targets,
        flows: settings.udp_flows,
        duration: settings.udp_duration,
        warmup: settings.warmup,
        threads: settings.threads,
    };
    let outcome = topo.client().run(move || load::udp(&run))??;
    let after = topo.snapshot()?;
    Ok(UdpMeasurement {
        idle_wait,
        busy_cpu_seconds: before.cpu().busy_seconds(after.cpu()),
        outcome,
        served: topo.take_served(),
        evidence: before.evidence(&after),
    })
}

/// UDP request/echo rates of every system.
pub fn udp(agent_bin: &Path, settings: &Settings) -> Result<Value> {
    check_prerequisites()?;
    let started = Instant::now();
    let point = Point {
        services: 1,
        endpoints: settings.udp_endpoints,
    };
    let svc = &point_services(point, Protocol::Udp)[0];
    let mut runs: Vec<Vec<UdpMeasurement>> = settings.systems.iter().map(|_| vec![]).collect();
    for rep in 0..settings.repeats.max(1) {
        for k in 0..settings.systems.len() {
            let i = (k + rep) % settings.systems.len();
            let system = settings.systems[i];
            let m = measure_udp(system, agent_bin, settings)
                .with_context(|| format!("UDP: {}", system.name()))?;
            println!(
                "traffic: udp {:<9} {:>8.0} echoes/s, {} lost",
                system.name(),
                m.outcome.rate(),
                m.outcome.lost
            );
            runs[i].push(m);
        }
    }
    let mut rows = Vec::new();
    for (i, system) in settings.systems.iter().enumerate() {
        let rs = &runs[i];
        let rates: Vec<f64> = rs.iter().map(|m| m.outcome.rate()).collect();
        let rate = median(&rates);
        let cpu_us: Vec<f64> = rs
            .iter()
            .map(|m| {
                let total = m.outcome.sent.max(1) as f64;
                m.busy_cpu_seconds * 1e6 / total
            })
            .collect();
        let mut served = Served::new();
        for m in rs {
            for (a, n) in &m.served {
                *served.entry(*a).or_default() += n;
            }
        }
        let pick = rs
            .iter()
            .enumerate()
            .min_by(|a, b| {
                (a.1.outcome.rate() - rate)
                    .abs()
                    .total_cmp(&(b.1.outcome.rate() - rate).abs())
            })
            .map_or(0, |(i, _)| i);
        rows.push(json!({
            "services": 1,
            "endpoints": settings.udp_endpoints,
            "system": system.name(),
            "rate_per_s": num(rate, 0),
            "packets_forwarded_per_s": num(2.0 * rate, 0),
            "cpu_us_per_request": num(median(&cpu_us), 2),
            "lost": rs.iter().map(|m| m.outcome.lost).sum::<u64>(),
            "stale": rs.iter().map(|m| m.outcome.stale).sum::<u64>(),
            "fraction_of_nolb": Value::Null,
            "endpoints_answered": endpoints_answered(svc, &served),
            "runs_per_s": rates.iter().map(|&r| num(r, 0)).collect::<Vec<_>>(),
            "idle_wait_seconds": rs.iter().map(|m| num(m.idle_wait.as_secs_f64(), 1)).collect::<Vec<_>>(),
            "evidence": rs[pick].evidence,
        }));
    }
    fill_fractions(&mut rows);
    Ok(json!({
        "method": UDP_METHOD,
        "flows": settings.udp_flows,
        "seconds_per_run": settings.udp_duration.as_secs_f64(),
        "repeats": settings.repeats,
        "rows": rows,
        "duration_seconds": round(started.elapsed().as_secs_f64(), 1),
    }))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
        Ipv4Addr::new(a, b, c, d)
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn endpoints_spread_over_pods() {
        assert_eq!(topology::endpoint(0), v4(198, 19, 0, 2));
        assert_eq!(topology::endpoint(1), v4(198, 19, 1, 2));
        assert_eq!(topology::endpoint(4), v4(198, 19, 0, 3));
        assert_eq!(topology::endpoint(999), v4(198, 19, 3, 251));
        let s = topology::silent_endpoint(1, 0);
        assert_eq!(s, v4(198, 18, 1, 10));
    }

    #[test]
    fn fractions_use_the_nolb_row_of_the_point() {
        let mut rows = vec![
            json!({"services": 1, "endpoints": 2, "system": "xdp", "rate_per_s": 50.0}),
            json!({"services": 1, "endpoints": 2, "system": "nolb", "rate_per_s": 100.0}),
            json!({"services": 1, "endpoints": 10, "system": "xdp", "rate_per_s": 10.0}),
        ];
        fill_fractions(&mut rows);
        assert_eq!(rows[0]["fraction_of_nolb"], 0.5);
        assert_eq!(rows[1]["fraction_of_nolb"], 1.0);
        assert_eq!(rows[2]["fraction_of_nolb"], Value::Null);
    }
}
