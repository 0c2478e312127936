//! The benchmarks of the load balancer and what it is compared with, in one
//! run (`cargo xtask bench [--quick] [--out DIR]`, which builds the release
//! `lb-agent` and runs the `lb-bench` binary): JSON in
//! `target/bench/results.json` and, with `--out`, `DIR/benchmarks.{json,md,svg}`
//! and `DIR/benchmarks-rates.svg`.
//!
//! 1. XDP/TC per-packet cost under BPF_PROG_TEST_RUN at 1, 1,000 and 10,000
//!    services and at 2 … 1,000 endpoints, and the Maglev spread against
//!    kube-proxy's random choices: the bench target
//!    `lb-userspace/benches/datapath.rs` (run through `cargo bench`, which
//!    builds it in release).
//! 2. Sync latency of the real `lb-agent` (release build) watching the
//!    API-server double in the namespace lab: from an EndpointSlice change
//!    in the double's store to the agent's `synced` log line.
//! 3. Short connections and UDP through this project, kube-proxy's iptables
//!    and nftables rules (generated from the same objects by
//!    [`crate::kubeproxy`]) and no load balancer, along the services and
//!    the endpoints axes ([`crate::traffic`]).
//! 4. Control plane: the same objects loaded by `lb-agent`,
//!    `iptables-restore` and `nft -f`, and one endpoint added
//!    ([`crate::kubeproxy::control_plane`]).
//!
//! [`report`] turns the results into the targets' verdicts and the markdown,
//! [`chart`] into the SVG charts.
//!
//! Needs root; `--quick` (fewer points, shorter runs) is what `cargo xtask
//! test` smoke-tests.

use std::{
    fs::File,
    io::Read as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

pub mod chart;
pub mod report;

use self::report::print_summary;
pub use self::{
    chart::chart,
    report::{markdown, verdicts},
};

use lb_testkit::{
    apiserver::{ApiServer, Options, Store},
    cmd,
    lab::{self, Lab, agent::AgentSource},
};

pub mod kubeproxy;
pub mod time;
pub mod traffic;

/// The targets each measurement is held to.
pub mod targets {
    /// XDP established flow, ns per packet.
    pub const ESTABLISHED_NS: f64 = 100.0;
    /// XDP new flow, ns per packet.
    pub const NEW_FLOW_NS: f64 = 400.0;
    /// Allowed change of the per-packet cost from 1 to 10,000 services, %.
    pub const SERVICES_SPREAD_PCT: f64 = 15.0;
    /// Maglev max/min share over 100,000 flows.
    pub const MAGLEV_MAX_MIN: f64 = 1.05;
    /// Share of flows that move when one of ten backends is removed.
    pub const MOVED_SHARE: f64 = 0.12;
    /// Watch event to maps updated, one change at a time, at the largest
    /// store (10,000 services in a full run), p99, ms.
    pub const SYNC_P99_MS: f64 = 10.0;
    /// 1,000 changes per second at 10,000 services: p99, ms.
    pub const SUSTAINED_P99_MS: f64 = 50.0;
    /// The agent's CPU under those changes, cores.
    pub const SUSTAINED_CPU_CORES: f64 = 0.5;
    /// Short connections at 10,000 services: at least this many times iptables'.
    pub const VS_IPTABLES_AT_10K: f64 = 2.0;
    /// 10,000 services × 10 endpoints from objects to a ready dataplane, ms.
    pub const CONTROL_PLANE_INITIAL_MS: f64 = 1_000.0;
    /// One added endpoint when 10,000 services exist, ms.
    pub const CONTROL_PLANE_ADD_MS: f64 = 10.0;
    /// Kernel memory of every map at 10,000 × 10 on this machine, MiB
    /// (conntrack at its default size included).
    pub const KERNEL_MEMORY_MIB: f64 = 128.0;
    /// The same, projected to a 128-CPU node, MiB.
    pub const KERNEL_MEMORY_128_CPUS_MIB: f64 = 256.0;
    /// The agent's resident set at 10,000 × 10, MiB.
    pub const AGENT_RSS_MIB: f64 = 100.0;
    /// Short-connection rate as a fraction of the no-load-balancer rate, at
    /// every point of both axes.
    pub const FRACTION_OF_NOLB: f64 = 0.9;
    /// Allowed change of the per-packet cost from 2 to 1,000 endpoints, %.
    pub const ENDPOINTS_SPREAD_PCT: f64 = 15.0;
}

/// EndpointSlice changes per second of the sustained-churn run.
pub const SUSTAINED_RATE: u32 = 1_000;

/// Sizes of the sync-latency run.
#[derive(Clone, Copy, Debug)]
pub struct SyncEffort {
    /// Services (10 endpoints each) in the double's store.
    pub services: usize,
    /// EndpointSlice changes applied one at a time.
    pub changes: usize,
}

/// The sync-latency runs of a quick or a full run, smallest store first
/// (the last one is the headline and the target's verdict).
pub fn sync_efforts(quick: bool) -> Vec<SyncEffort> {
    if quick {
        vec![SyncEffort {
            services: 100,
            changes: 100,
        }]
    } else {
        [100, 1_000, 10_000]
            .map(|services| SyncEffort {
                services,
                changes: 1_000,
            })
            .to_vec()
    }
}

/// The whole bench with the `lb-agent` at `agent` (a release build): writes
/// `target/bench/results.json` and, with `out`, the docs.
pub fn main(agent: &Path, quick: bool, out: Option<PathBuf>) -> Result<()> {
    let results = run(agent, quick)?;
    let dir = lb_testkit::target_dir().join("bench");
    let path = dir.join("results.json");
    write(&path, &(serde_json::to_string_pretty(&results)? + "\n"))?;
    println!("bench: wrote {}", path.display());
    if let Some(out) = out {
        write_docs(&results, &out)?;
    }
    print_summary(&results);
    Ok(())
}

/// The arguments every benched agent gets beside its source: no metrics
/// server, and native XDP (the `xdp` rows measure it, whatever `--attach
/// auto` would pick for the lab's veth).
pub fn xdp_agent_args() -> Vec<String> {
    ["--metrics-addr", "off", "--attach", "xdp"]
        .map(str::to_owned)
        .to_vec()
}

/// One part of the bench, for `lb-bench --only`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Part {
    /// Watch event → maps, at every store size of the run.
    Sync,
    /// Objects → ready dataplane and one added endpoint, with kube-proxy's.
    ControlPlane,
    /// The agent's side of the control-plane part only (first sync, one
    /// endpoint through SIGHUP, kernel and agent memory), at 10,000
    /// services unless `--services` says.
    Agent,
    /// 1,000 EndpointSlice changes per second for 30 s (10 s with
    /// `--quick`), at 10,000 services unless `--services` says.
    Sustained,
}

/// `lb-bench --only PART`: that part's results, printed; `services`
/// replaces the store sizes of the sync part.
pub fn only(agent: &Path, quick: bool, part: Part, services: Option<usize>) -> Result<()> {
    let efforts = match services {
        Some(services) => vec![SyncEffort {
            services,
            changes: if quick { 100 } else { 1_000 },
        }],
        None => sync_efforts(quick),
    };
    let v = match part {
        Part::Sync => Value::Array(
            efforts
                .into_iter()
                .map(|e| sync_latency(agent, e))
                .collect::<Result<_>>()?,
        ),
        Part::ControlPlane => kubeproxy::control_plane(agent, quick)?,
        Part::Agent => kubeproxy::control_plane::agent_only(
            agent,
            services.unwrap_or(kubeproxy::control_plane::SERVICES),
        )?,
        Part::Sustained => sustained_sync(
            agent,
            services.unwrap_or(10_000),
            SUSTAINED_RATE,
            if quick { 10 } else { 30 },
        )?,
    };
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// `bench --render JSON --out DIR`: the docs of an earlier run, re-rendered.
pub fn render(json: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(json).with_context(|| format!("read {}", json.display()))?;
    let mut results: Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", json.display()))?;
    results["targets"] = verdicts(&results);
    write_docs(&results, out)?;
    print_summary(&results);
    Ok(())
}

/// Runs every measurement and returns the results document.
pub fn run(agent: &Path, quick: bool) -> Result<Value> {
    if !lb_testkit::is_root() {
        bail!(
            "cargo xtask bench needs root: BPF_PROG_TEST_RUN, bpffs pins and network \
             namespaces; run `sudo -E cargo xtask bench`"
        );
    }
    let started = Instant::now();
    let machine = machine();
    let dir = lb_testkit::target_dir().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

    let dp_json = dir.join("datapath.json");
    let _ = std::fs::remove_file(&dp_json);
    let mut bench = cmd::cargo();
    bench
        .current_dir(lb_testkit::workspace_root())
        .args(["bench", "-p", "lb-userspace", "--bench", "datapath", "--"])
        .arg("--json")
        .arg(&dp_json);
    if quick {
        bench.arg("--quick");
    }
    cmd::run(&mut bench)?;
    let dp: Value = serde_json::from_str(
        &std::fs::read_to_string(&dp_json)
            .with_context(|| format!("read {}", dp_json.display()))?,
    )
    .context("parse the datapath bench's JSON")?;

    let mut runs = Vec::new();
    for effort in sync_efforts(quick) {
        runs.push(sync_latency(agent, effort)?);
    }
    let mut sync = runs.last().cloned().unwrap_or(Value::Null);
    sync["by_store_size"] = Value::Array(runs);
    let (services, secs) = if quick { (1_000, 5) } else { (10_000, 30) };
    sync["sustained"] = sustained_sync(agent, services, SUSTAINED_RATE, secs)?;

    // Traffic and control plane: the same objects through this project, kube-proxy's
    // iptables and nftables rules, and no load balancer at all.
    let settings = traffic::Settings::new(quick);
    let short = traffic::short_connections(agent, &settings)?;
    let udp = traffic::udp(agent, &settings)?;
    let control_plane = kubeproxy::control_plane(agent, quick)?;

    let mut results = json!({
        "schema": 1,
        "quick": quick,
        "date": time::rfc3339(SystemTime::now()),
        "git": git_describe(),
        "machine": machine,
        "datapath": dp["datapath"],
        "snat": dp["snat"],
        "spread": dp["spread"],
        "sync_latency": sync,
        "short_connections": short,
        "udp": udp,
        "control_plane": control_plane,
        "duration_seconds": 0.0,
    });
    results["targets"] = verdicts(&results);
    results["duration_seconds"] = json!(round2(started.elapsed().as_secs_f64()));
    Ok(results)
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// Writes `benchmarks.json`, `benchmarks.md` and `benchmarks.svg` into `out`.
pub fn write_docs(results: &Value, out: &Path) -> Result<()> {
    write(
        &out.join("benchmarks.json"),
        &(serde_json::to_string_pretty(results)? + "\n"),
    )?;
    write(&out.join("benchmarks.svg"), &chart(results))?;
    write(
        &out.join("benchmarks-rates.svg"),
        &chart::rates_chart(results),
    )?;
    write(&out.join("benchmarks.md"), &markdown(results))?;
    println!(
        "bench: wrote {}/benchmarks.{{json,md,svg}} and benchmarks-rates.svg",
        out.display()
    );
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---------------------------------------------------------------------------
// Machine description
// ---------------------------------------------------------------------------

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    json!({
        "loadavg_at_start": read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu": cpu,
        "cores": cores,
        "memory_mib": mem_kib / 1024,
    })
}

fn git_describe() -> String {
    cmd::output(
        cmd::command("git", ["describe", "--always", "--dirty"])
            .current_dir(lb_testkit::workspace_root()),
    )
    .map(|s| s.trim().to_owned())
    .unwrap_or_else(|_| "unknown".into())
}

// ---------------------------------------------------------------------------
// Sync latency
// ---------------------------------------------------------------------------

/// Endpoints per service of the sync-latency run.
const SYNC_ENDPOINTS: usize = 10;
/// How long one change may take to show up in the agent's log.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the first full sync may take.
const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(120);

fn sync_pod(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + k as u32)
}

fn sync_service(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i:05}"), "namespace": "bench"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.1",
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80,
                            "nodePort": 30_000 + i, "targetPort": 8080}]},
    })
}

fn sync_slice(i: usize, ready: &[bool]) -> Value {
    let endpoints: Vec<Value> = ready
        .iter()
        .enumerate()
        .map(|(j, &r)| {
            json!({"addresses": [sync_pod(i * SYNC_ENDPOINTS + j).to_string()],
                   "conditions": {"ready": r, "serving": r, "terminating": false},
                   "nodeName": lab::manifest::NODE_NAME})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i:05}-x"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i:05}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints,
    })
}

/// Follows the agent's log file line by line.
struct LogTail {
    file: File,
    partial: String,
    /// Complete lines read but not looked at yet.
    pending: std::collections::VecDeque<String>,
}

/// One `synced` line: when the agent logged it and how many map operations
/// it wrote.
#[derive(Debug, Clone, Copy)]
struct Synced {
    at: SystemTime,
    ops: u64,
    /// How long the sync took (`ms="…"`), when the line says.
    ms: Option<f64>,
}

impl Synced {
    /// When the sync started: its line's time less its duration (the line's
    /// time when it gives none).
    fn started(&self) -> SystemTime {
        self.at - Duration::from_secs_f64(self.ms.unwrap_or(0.0) / 1e3)
    }
}

impl LogTail {
    fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            file: File::open(path).with_context(|| format!("open {}", path.display()))?,
            partial: String::new(),
            pending: Default::default(),
        })
    }

    /// Every `synced` line written so far and not read yet.
    fn drain_synced(&mut self) -> Result<Vec<Synced>> {
        let mut out = Vec::new();
        while let Some(line) = self.next_line()? {
            out.extend(parse_synced(&line)?);
        }
        Ok(out)
    }

    /// The next complete line, if one has been written.
    fn next_line(&mut self) -> Result<Option<String>> {
        if self.pending.is_empty() {
            let mut buf = String::new();
            self.file.read_to_string(&mut buf)?;
            self.partial.push_str(&buf);
            if let Some(end) = self.partial.rfind('\n') {
                let rest = self.partial.split_off(end + 1);
                let done = std::mem::replace(&mut self.partial, rest);
                self.pending.extend(done.lines().map(str::to_owned));
            }
        }
        Ok(self.pending.pop_front())
    }

    /// Waits for the next `synced` line that satisfies `want`, skipping
    /// others (counted in `skipped`).
    fn next_synced(
        &mut self,
        timeout: Duration,
        skipped: &mut usize,
        want: impl Fn(&Synced) -> bool,
    ) -> Result<Synced> {
        let start = Instant::now();
        loop {
            while let Some(line) = self.next_line()? {
                if let Some(s) = parse_synced(&line)? {
                    if want(&s) {
                        return Ok(s);
                    }
                    *skipped += 1;
                }
            }
            if start.elapsed() > timeout {
                bail!("no `synced` line in the agent's log within {timeout:?}");
            }
            if lab::interrupted() {
                bail!("interrupted");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

/// `2026-11-21T20:12:12.267520Z  INFO lb_userspace::agent: synced services=… ops=N`.
fn parse_synced(line: &str) -> Result<Option<Synced>> {
    if !line.contains(": synced ") {
        return Ok(None);
    }
    let at = line
        .split_whitespace()
        .next()
        .and_then(time::parse_rfc3339)
        .with_context(|| format!("no RFC 3339 timestamp at the start of {line:?}"))?;
    let ops = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ops="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no ops=N in {line:?}"))?;
    let ms = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ms="))
        .and_then(|v| v.trim_matches('"').parse().ok());
    Ok(Some(Synced { at, ops, ms }))
}

/// The median of `v` (unsorted).
fn median_of(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

/// The `p`-th percentile (nearest rank) of sorted `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The agent in the lab watching the double, which holds `services`
/// Services × `SYNC_ENDPOINTS` endpoints; after the agent's first sync.
struct SyncLab {
    api: ApiServer,
    store: Store,
    /// Readiness of every endpoint, as stored.
    ready: Vec<Vec<bool>>,
    tail: LogTail,
    first_sync_s: f64,
    // Declared last: dropped (its namespace removed) after the API server.
    lab: Lab,
}

impl SyncLab {
    fn start(agent_bin: &Path, services: usize) -> Result<Self> {
        let mut lab = Lab::new(0)?;
        lab.set_agent_bin(agent_bin.to_owned());
        // Declared after the lab: dropped (stopped) before its namespace goes.
        let api = lab
            .node()
            .run(|| {
                ApiServer::start_with(
                    Store::new(),
                    "127.0.0.1:0".parse().expect("address"),
                    // The real API server sends a bookmark about once a minute.
                    Options {
                        bookmark_interval: Duration::from_secs(60),
                    },
                )
            })?
            .context("start the API-server double in the node namespace")?;
        let store = api.store().clone();
        store
            .apply_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": lab::manifest::NODE_NAME},
                "status": {"addresses": [{"type": "InternalIP", "address": lab::NODE_ADDR.to_string()}]},
            }))
            .context("store the Node")?;
        let ready = vec![vec![true; SYNC_ENDPOINTS]; services];
        for (i, r) in ready.iter().enumerate() {
            store
                .apply_value(sync_service(i))
                .context("store a Service")?;
            store
                .apply_value(sync_slice(i, r))
                .context("store an EndpointSlice")?;
        }
        let kubeconfig = lab.dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;

        let started = Instant::now();
        let extra = ["--metrics-addr".to_owned(), "off".to_owned()];
        let log = lab
            .spawn_agent_from(AgentSource::Kubeconfig(&kubeconfig), &extra)?
            .log_path()
            .to_owned();
        let mut tail = LogTail::open(&log)?;
        let mut skipped = 0usize;
        tail.next_synced(FIRST_SYNC_TIMEOUT, &mut skipped, |_| true)
            .context("the agent's first full sync")?;
        let first_sync_s = started.elapsed().as_secs_f64();
        Ok(Self {
            api,
            store,
            ready,
            tail,
            first_sync_s,
            lab,
        })
    }

    /// Flips endpoint `e` of service `i` in the store; the time just before.
    fn flip(&mut self, i: usize, e: usize) -> Result<(SystemTime, SystemTime)> {
        self.ready[i][e] = !self.ready[i][e];
        let slice = sync_slice(i, &self.ready[i]);
        let before = SystemTime::now();
        self.store
            .apply_value(slice)
            .context("change an EndpointSlice")?;
        Ok((before, SystemTime::now()))
    }

    /// Stops the agent; the number of errors it logged.
    fn stop(mut self) -> Result<usize> {
        let agent_log = self.lab.stop_agent()?;
        drop(self.api);
        Ok(agent_log
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains("sync failed"))
            .count())
    }
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz.max(1.0))
}

/// Sustained churn: `rate` EndpointSlice changes per second for `secs`
/// seconds at `services` Services, applied on a fixed schedule whatever the
/// agent does (it coalesces what arrives during a sync into the next one).
pub fn sustained_sync(agent_bin: &Path, services: usize, rate: u32, secs: u64) -> Result<Value> {
    let mut lab = SyncLab::start(agent_bin, services)?;
    let pid = lab.lab.agent()?.pid().context("the agent's pid")?;
    lab.tail.drain_synced()?;
    println!(
        "sync: agent synced {services} services in {:.2} s; {rate} changes/s for {secs} s",
        lab.first_sync_s
    );
    let n = rate as u64 * secs;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let mut applied = Vec::with_capacity(n as usize);
    let mut late = 0usize;
    for k in 0..n as usize {
        let due = started + period * k as u32;
        match due.checked_duration_since(Instant::now()) {
            Some(wait) => std::thread::sleep(wait),
            None => late += 1,
        }
        let i = (k * 7_919) % services;
        let e = (k / services) % SYNC_ENDPOINTS;
        let (_, after) = lab.flip(i, e)?;
        applied.push(after);
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The last change is in the maps once a sync that started after it ends.
    let last = *applied.last().context("no change applied")?;
    let mut syncs = Vec::new();
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    loop {
        syncs.extend(lab.tail.drain_synced()?);
        let done = syncs.iter().any(|s| s.started() > last);
        if done {
            break;
        }
        if Instant::now() > deadline {
            bail!("no sync after the last change within {CHANGE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let cpu = cpu_seconds(pid)? - cpu_before;
    let errors = lab.stop()?;

    // A change is in the maps at the end of the first sync that started
    // after the store applied it (an estimate: the watch event reaches the
    // agent a moment after the store applies it, and a sync starting in
    // that moment leaves it to the next one).
    let starts: Vec<(SystemTime, SystemTime)> = syncs.iter().map(|s| (s.started(), s.at)).collect();
    let mut latencies: Vec<f64> = applied
        .iter()
        .filter_map(|&t| {
            let (_, end) = starts.iter().find(|(start, _)| *start >= t)?;
            Some(end.duration_since(t).ok()?.as_secs_f64() * 1e3)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let mut durations: Vec<f64> = syncs.iter().filter_map(|s| s.ms).collect();
    durations.sort_by(f64::total_cmp);
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let with_ops = syncs.iter().filter(|s| s.ops > 0).count();
    println!(
        "sync: {n} changes in {elapsed:.1} s: p50 {:.2} ms, p99 {:.2} ms; {} syncs; agent CPU {:.2} cores",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        syncs.len(),
        cpu / elapsed
    );
    Ok(json!({
        "services_in_store": services,
        "endpoints_per_service": SYNC_ENDPOINTS,
        "rate_per_s": rate,
        "seconds": secs,
        "changes": n,
        "changes_applied_late": late,
        "applied_over_s": round2(elapsed),
        "p50_ms": r3(percentile(&latencies, 50.0)),
        "p99_ms": r3(percentile(&latencies, 99.0)),
        "max_ms": r3(latencies.last().copied().unwrap_or(f64::NAN)),
        "syncs": syncs.len(),
        "syncs_with_ops": with_ops,
        "changes_per_sync": round2(n as f64 / with_ops.max(1) as f64),
        "sync_ms_p50": r3(percentile(&durations, 50.0)),
        "sync_ms_p99": r3(percentile(&durations, 99.0)),
        "agent_cpu_cores": round2(cpu / elapsed),
        "agent_errors_logged": errors,
        "method": "The same lab and double as the one-at-a-time runs. Changes (one endpoint's readiness flipped, spread over the services) are applied to the double's store on a fixed schedule, whatever the agent does. A change's latency: from the moment the store applied it to the end of the first sync that started after it (start = the `synced` line's time minus its `ms`); an estimate, since the watch event reaches the agent a moment after the store applies it. Agent CPU: utime + stime from /proc over the schedule, divided by its length.",
    }))
}

/// The agent in the lab, watching the double; `effort.changes` EndpointSlice
/// changes one at a time.
pub fn sync_latency(agent_bin: &Path, effort: SyncEffort) -> Result<Value> {
    let mut lab = SyncLab::start(agent_bin, effort.services)?;
    println!(
        "sync: agent synced {} services in {:.2} s (from spawn); applying {} changes",
        effort.services, lab.first_sync_s, effort.changes
    );
    let mut skipped = 0usize;
    let mut latencies = Vec::with_capacity(effort.changes);
    let mut ops = Vec::with_capacity(effort.changes);
    let mut apply_us = Vec::with_capacity(effort.changes);
    let mut synced_before_apply_returned = 0usize;
    for k in 0..effort.changes {
        let i = k % effort.services;
        let e = (k / effort.services) % SYNC_ENDPOINTS;
        // t0 is taken just BEFORE the store applies the change: taken after
        // `apply` returns, a preempted bench thread (2 shared cores) saw
        // syncs that the agent had logged before it read the clock.
        let (before, after) = lab.flip(i, e)?;
        apply_us.push(
            after
                .duration_since(before)
                .unwrap_or_default()
                .as_secs_f64()
                * 1e6,
        );
        let s = lab
            .tail
            .next_synced(CHANGE_TIMEOUT, &mut skipped, |s| s.ops > 0)
            .with_context(|| format!("change #{k} (slice svc-{i:05}-x, endpoint {e})"))?;
        if s.at < after {
            synced_before_apply_returned += 1;
        }
        // A sync logged before the change started cannot be this change's.
        let dt = match s.at.duration_since(before) {
            Ok(d) => d.as_secs_f64() * 1e3,
            Err(_) => bail!(
                "change #{k}: a `synced` line older than the change (a sync the bench did \
                 not expect, or clocks that disagree)"
            ),
        };
        latencies.push(dt);
        ops.push(s.ops);
    }
    let first_sync_s = lab.first_sync_s;
    let errors = lab.stop()?;

    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = sorted.iter().sum::<f64>() / sorted.len().max(1) as f64;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    println!(
        "sync: {} changes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        sorted.len(),
        percentile(&sorted, 50.0),
        percentile(&sorted, 99.0),
        sorted.last().copied().unwrap_or(f64::NAN)
    );
    Ok(json!({
        "services_in_store": effort.services,
        "endpoints_per_service": SYNC_ENDPOINTS,
        "changes": latencies.len(),
        "p50_ms": r3(percentile(&sorted, 50.0)),
        "p90_ms": r3(percentile(&sorted, 90.0)),
        "p99_ms": r3(percentile(&sorted, 99.0)),
        "max_ms": r3(sorted.last().copied().unwrap_or(f64::NAN)),
        "min_ms": r3(sorted.first().copied().unwrap_or(f64::NAN)),
        "mean_ms": r3(mean),
        "ops_per_sync_mean": round2(ops.iter().sum::<u64>() as f64 / ops.len().max(1) as f64),
        "syncs_without_ops_skipped": skipped,
        "store_apply_us_p50": round2(median_of(&apply_us)),
        "synced_before_apply_returned": synced_before_apply_returned,
        "agent_errors_logged": errors,
        "first_full_sync_seconds_from_spawn": round2(first_sync_s),
        "agent": "release lb-agent, --kubeconfig (kube-rs watcher on the API-server double, inside the node namespace), --metrics-addr off, Maglev tables sized per service (1,021 slots for 10 endpoints)",
        "method": "Each change flips the readiness of one endpoint of one EndpointSlice (round robin over the services), applied to the double's store; t0 = SystemTime right BEFORE Store::apply (read after apply returns, a preempted bench thread could read the clock after the agent had already synced: synced_before_apply_returned counts how often the agent's line is older than the end of apply; store_apply_us_p50 is the store's own work that t0 includes); t1 = the timestamp (RFC 3339, µs, UTC, same clock) of the agent's next `synced` log line with ops > 0, which the agent writes after the map writes of that sync; the next change waits for that line. Includes the watch stream, the reflector, translating and planning the changed service (the agent's incremental sync), and the map writes. Bookmarks every 60 s (as the real API server); syncs with 0 ops are skipped and counted.",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_lines_parse() {
        let line = "2026-11-21T20:12:12.267520Z  INFO lb_userspace::agent: synced services=3 frontends=4 backends=30 ops=7";
        let s = parse_synced(line).unwrap().unwrap();
        assert_eq!(s.ops, 7);
        assert!(
            parse_synced("2026-11-21T20:12:12.267520Z  INFO x: first full sync done: ready")
                .unwrap()
                .is_none()
        );
        assert!(parse_synced("garbage: synced ops=1").is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
