//! How long each system takes from the Service and
//! EndpointSlice objects to a programmed dataplane, for 10,000 services × 10
//! endpoints (1,000 in quick mode), and to add one endpoint when they all
//! exist. Each system runs in its own fresh network namespace.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use super::{
    BenchService, NodeInfo, Protocol, iptables, nftables, run_tool, services, write_manifests,
};
use lb_testkit::{
    lab::{
        self, BPFFS, NODE_IFACE,
        agent::{ATTACHED, Agent, AgentConfig, AgentSource},
        netns,
    },
    topology::Site,
};

/// Services in a full run.
pub const SERVICES: usize = 10_000;
/// Services in quick mode.
pub const QUICK_SERVICES: usize = 1_000;
/// Endpoints per service.
pub const ENDPOINTS: usize = 10;
/// One-endpoint changes measured per system; the figures are medians.
pub const ADD_RUNS: usize = 5;
/// How long the agent may take to its first `synced` line.
const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the agent may take to sync after SIGHUP.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Endpoint `j` of service `i`: `198.18.16.0 + 10·i + j` (198.18.16.0 -
/// 198.19.150.159 for 10,000 × 10).
pub fn endpoint(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + (i * ENDPOINTS + j) as u32)
}

/// The endpoint added by change `k`: `198.19.250.(1 + k)`, to service `k`.
pub fn added_endpoint(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 250, 1 + k as u8)
}

/// Measures the three (four) systems and returns:
///
/// ```json
/// {"services": 10000, "endpoints_per_service": 10, "add_runs": 5,
///  "xdp": {"initial_ms", "initial_after_attach_ms", "add_endpoint_ms",
///          "add_endpoint_agent_ms", "add_endpoint_runs_ms", "manifest_bytes",
///          "memory": {"possible_cpus", "projected_cpus", "maps": [{"name",
///                     "type", "max_entries", "key_size", "value_size",
///                     "bytes_memlock", "projected_bytes"}], "bytes_memlock",
///                     "projected_bytes", "agent_rss_bytes"}},
///  "iptables": {"tool", "backend", "initial_ms", "add_endpoint_ms",
///               "add_endpoint_runs_ms", "rules", "chains", "bytes",
///               "add_endpoint_rules", "add_endpoint_bytes", "nat_rules_loaded"},
///  "iptables_legacy": {same, when iptables-legacy-restore exists},
///  "nftables": {"tool", "initial_ms", "add_endpoint_ms", "add_endpoint_runs_ms",
///               "list_chains_ms", "rules", "elements", "chains", "lines",
///               "bytes", "add_endpoint_rules", "add_endpoint_bytes"},
///  "method": "…"}
/// ```
///
/// - `xdp.initial_ms`: from spawning `lb-agent run --manifests` to the
///   timestamp of its first `synced` log line (process start, manifest parse
///   and validation, BPF load, attach, translate, plan, map writes).
///   `initial_after_attach_ms`: from its last `attached … ingress` line to that
///   `synced` line (the manifest read again, translate, plan, map writes).
/// - `xdp.add_endpoint_ms`: median over [`ADD_RUNS`] of SIGHUP sent → the
///   next `synced` line, after rewriting the manifest with one more endpoint
///   (re-reads and re-plans every object: the manifest source has no
///   incremental path). `add_endpoint_agent_ms`: the agent's own part, its
///   `SIGHUP: reloading` line → `synced`.
/// - `iptables.initial_ms`: one `iptables-restore` of kube-proxy's full sync
///   ([`iptables::full_text`]); `add_endpoint_ms`: median
///   `iptables-restore --noflush` of kube-proxy's partial sync
///   ([`iptables::partial_text`]). `rules`/`chains`/`bytes`: of the full
///   input; `add_endpoint_rules`/`add_endpoint_bytes`: of one partial input;
///   `nat_rules_loaded`: `-A` lines `iptables-save -t nat` printed after the
///   changes (a check that the restore took).
/// - `nftables.initial_ms`: one `nft -f` of kube-proxy's first sync;
///   `add_endpoint_ms`: median `nft -f` of its partial-sync transaction;
///   `list_chains_ms`: median of the `nft --json list chains` kube-proxy
///   runs before every transaction (not included in `add_endpoint_ms`).
pub fn control_plane(agent_bin: &Path, quick: bool) -> Result<Value> {
    if !lb_testkit::is_root() {
        bail!("the control-plane bench needs root (network namespaces, BPF, netfilter)");
    }
    if !lb_testkit::bpffs_mounted() {
        bail!("bpffs is not mounted at {BPFFS}: run `cargo xtask setup`");
    }
    netns::remove_stale();
    let n = if quick { QUICK_SERVICES } else { SERVICES };
    let svcs = services(n, ENDPOINTS, endpoint, Protocol::Tcp);
    let node = NodeInfo {
        name: lab::manifest::NODE_NAME.into(),
        addr: lab::NODE_ADDR,
    };
    eprintln!("control plane: {n} services × {ENDPOINTS} endpoints");

    let xdp = measure_xdp(agent_bin, &svcs, &node).context("lb-agent")?;
    eprintln!("control plane: xdp {xdp}");
    let ipt = measure_iptables(iptables::RESTORE, "iptables-save", &svcs, &node)
        .context("iptables-restore")?;
    eprintln!("control plane: iptables {ipt}");
    let legacy = if lb_testkit::cmd::find_program(iptables::LEGACY_RESTORE).is_some() {
        let v = measure_iptables(
            iptables::LEGACY_RESTORE,
            "iptables-legacy-save",
            &svcs,
            &node,
        )
        .context("iptables-legacy-restore")?;
        eprintln!("control plane: iptables-legacy {v}");
        v
    } else {
        Value::Null
    };
    let nft = measure_nftables(&svcs, &node).context("nft")?;
    eprintln!("control plane: nftables {nft}");

    Ok(json!({
        "services": n,
        "endpoints_per_service": ENDPOINTS,
        "add_runs": ADD_RUNS,
        "xdp": xdp,
        "iptables": ipt,
        "iptables_legacy": legacy,
        "nftables": nft,
        "method": "Each system in its own fresh network namespace, from the same Service/EndpointSlice set (NodePort, externalTrafficPolicy Cluster, TCP). Ours: spawn of `lb-agent run --manifests` to the timestamp of its first `synced` log line; one endpoint: manifest rewritten, SIGHUP, to the next `synced` line. kube-proxy: wall time of the one tool run its sync makes, with its exact input (iptables: full restore; partial sync with --noflush rewriting KUBE-SERVICES, KUBE-NODEPORTS and the changed service's chains; nftables: the first-sync transaction; the partial-sync transaction of the changed service's chains). kube-proxy's own work before the tool (informers, computing the rules: tens of ms to seconds at 10,000 services) is not included, ours is. One-endpoint figures are medians over add_runs changes, each adding an endpoint to a different service.",
    }))
}

/// The agent's side of [`control_plane`] alone, at `n` services × 10
/// endpoints: its `xdp` object.
pub fn agent_only(agent_bin: &Path, n: usize) -> Result<Value> {
    if !lb_testkit::is_root() || !lb_testkit::bpffs_mounted() {
        bail!("the agent's control-plane bench needs root and bpffs at {BPFFS}");
    }
    netns::remove_stale();
    let svcs = services(n, ENDPOINTS, endpoint, Protocol::Tcp);
    let node = NodeInfo {
        name: lab::manifest::NODE_NAME.into(),
        addr: lab::NODE_ADDR,
    };
    measure_xdp(agent_bin, &svcs, &node)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median_ms(v: &[Duration]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().map(ms).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn runs_ms(v: &[Duration]) -> Vec<f64> {
    v.iter()
        .map(|&d| (ms(d) * 1000.0).round() / 1000.0)
        .collect()
}

/// Timestamps of the log lines containing `marker` (the agent's lines start
/// with an RFC 3339 UTC time).
fn marker_times(log: &str, marker: &str) -> Vec<SystemTime> {
    log.lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            l.split_whitespace()
                .next()
                .and_then(crate::time::parse_rfc3339)
        })
        .collect()
}

/// `synced` lines (successful syncs).
const SYNCED_LINE: &str = ": synced ";

/// Waits until the agent has logged `n` `synced` lines; the time of the
/// `n`-th.
fn wait_synced(agent: &mut Agent, n: usize, timeout: Duration) -> Result<SystemTime> {
    let start = Instant::now();
    loop {
        let log = agent.log();
        if let Some(&t) = marker_times(&log, SYNCED_LINE).get(n - 1) {
            return Ok(t);
        }
        if !agent.running() {
            bail!("lb-agent exited before sync #{n}; log:\n{log}");
        }
        if start.elapsed() > timeout {
            bail!("no sync #{n} from lb-agent within {timeout:?}; log:\n{log}");
        }
        if lab::interrupted() {
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn since(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

fn measure_xdp(agent_bin: &Path, svcs: &[BenchService], node: &NodeInfo) -> Result<Value> {
    let site = Site::new("cp")?;
    let ns = site.netns("xdp")?;
    ns.ip(&[
        "link", "add", NODE_IFACE, "type", "veth", "peer", "name", "c0",
    ])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", node.addr),
        "dev",
        NODE_IFACE,
    ])?;
    ns.ip(&["link", "set", NODE_IFACE, "up"])?;
    ns.ip(&["link", "set", "c0", "up"])?;
    let manifest = site.dir().join("services.json");
    let mut svcs = svcs.to_vec();
    write_manifests(&manifest, &svcs, node)?;
    let manifest_bytes = std::fs::metadata(&manifest)?.len();
    let log = site.dir().join("agent.log");
    let extra = crate::xdp_agent_args();
    // A profiler to run the agent under, e.g. `heaptrack -o /tmp/agent` or
    // `perf record -g -o /tmp/agent.data --`: the figures it changes are
    // then not comparable.
    let wrapper: Vec<String> = std::env::var("LB_BENCH_AGENT_WRAPPER")
        .map(|w| w.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let cfg = AgentConfig {
        bin: agent_bin,
        interfaces: &[NODE_IFACE],
        source: AgentSource::Manifests(&manifest),
        extra_args: &extra,
        node_name: &node.name,
        bpffs_root: site.pins(),
        log: &log,
        wrapper: &wrapper,
    };

    let spawned = SystemTime::now();
    let mut agent = Agent::spawn(&ns, &cfg)?;
    let first = wait_synced(&mut agent, 1, FIRST_SYNC_TIMEOUT)?;
    let attached = marker_times(&agent.log(), ATTACHED)
        .last()
        .copied()
        .context("no `attached … ingress` line with a timestamp")?;
    let memory = memory(site.pins(), agent.pid())?;

    let mut runs = Vec::new();
    let mut agent_runs = Vec::new();
    for k in 0..ADD_RUNS {
        let idx = k % svcs.len();
        svcs[idx].endpoints.push(added_endpoint(k));
        write_manifests(&manifest, &svcs, node)?;
        let before = marker_times(&agent.log(), SYNCED_LINE).len();
        let sent = SystemTime::now();
        agent.signal(Signal::SIGHUP)?;
        let synced = wait_synced(&mut agent, before + 1, RELOAD_TIMEOUT)?;
        let reloading = marker_times(&agent.log(), "SIGHUP: reloading")
            .get(k)
            .copied()
            .context("no `SIGHUP: reloading` line")?;
        runs.push(since(synced, sent));
        agent_runs.push(since(synced, reloading));
    }
    let status = agent.stop()?;
    if status.is_none_or(|s| !s.success()) {
        eprintln!("control plane: lb-agent stopped with {status:?}");
    }
    Ok(json!({
        "initial_ms": ms(since(first, spawned)),
        "initial_after_attach_ms": ms(since(first, attached)),
        "add_endpoint_ms": median_ms(&runs),
        "add_endpoint_agent_ms": median_ms(&agent_runs),
        "add_endpoint_runs_ms": runs_ms(&runs),
        "manifest_bytes": manifest_bytes,
        "memory": memory,
    }))
}

/// The CPUs a per-CPU map is sized for (`/sys/devices/system/cpu/possible`,
/// e.g. `0-1`).
fn possible_cpus() -> Result<u64> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("read /sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (u64, u64) = (lo.parse()?, hi.parse()?);
        n += hi - lo + 1;
    }
    Ok(n)
}

/// The CPU count the per-CPU maps are projected to.
pub const PROJECTED_CPUS: u64 = 128;

/// What the agent's maps and the agent itself hold once the services are
/// loaded: every map pinned under `pins` as `bpftool map show` reports it
/// (`bytes_memlock`, the kernel's own accounting), projected to a
/// [`PROJECTED_CPUS`]-CPU node (a per-CPU map's memory grows with the CPUs
/// it is sized for; the others do not), and the agent's resident set.
fn memory(pins: &Path, agent: Option<u32>) -> Result<Value> {
    let cpus = possible_cpus()?;
    let dir = pins.join(lb_common::PIN_DIR);
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    let (mut total, mut projected) = (0u64, 0u64);
    let mut maps = Vec::new();
    for pin in names {
        let out = lb_testkit::cmd::output(
            std::process::Command::new(lb_testkit::cmd::program("bpftool"))
                .args(["-j", "map", "show", "pinned"])
                .arg(&pin),
        )?;
        let m: Value = serde_json::from_str(&out).context("parse `bpftool -j map show`")?;
        let memlock = m["bytes_memlock"].as_u64().unwrap_or(0);
        let kind = m["type"].as_str().unwrap_or("?");
        let at_128 = if kind.contains("percpu") {
            memlock / cpus * PROJECTED_CPUS
        } else {
            memlock
        };
        total += memlock;
        projected += at_128;
        maps.push(json!({
            "name": pin.file_name().map(|n| n.to_string_lossy().into_owned()),
            "type": kind,
            "max_entries": m["max_entries"],
            "key_size": m["bytes_key"],
            "value_size": m["bytes_value"],
            "bytes_memlock": memlock,
            "projected_bytes": at_128,
        }));
    }
    let rss = agent.and_then(|pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    });
    Ok(json!({
        "possible_cpus": cpus,
        "projected_cpus": PROJECTED_CPUS,
        "maps": maps,
        "bytes_memlock": total,
        "projected_bytes": projected,
        "agent_rss_bytes": rss,
    }))
}

fn measure_iptables(
    program: &str,
    save: &str,
    svcs: &[BenchService],
    node: &NodeInfo,
) -> Result<Value> {
    let (tool, backend) = iptables::version(program)?;
    let site = Site::new("cp")?;
    let ns = site.netns("ipt")?;
    let text = iptables::full_text(svcs, node);
    let initial = run_tool(&ns, program, &["--counters"], &text)?;
    let mut svcs = svcs.to_vec();
    let mut runs = Vec::new();
    let mut partial = String::new();
    for k in 0..ADD_RUNS {
        let idx = k % svcs.len();
        svcs[idx].endpoints.push(added_endpoint(k));
        partial = iptables::partial_text(&svcs, &[idx]);
        runs.push(run_tool(
            &ns,
            program,
            &["--noflush", "--counters"],
            &partial,
        )?);
    }
    let saved = lb_testkit::cmd::output(ns.command(save).args(["-t", "nat"]))?;
    let loaded = iptables::count_rules(&saved);
    let expected = iptables::count_rules(
        iptables::full_text(&svcs, node)
            .split("*nat")
            .nth(1)
            .unwrap_or_default(),
    );
    if loaded != expected {
        bail!("{save} -t nat shows {loaded} rules, expected {expected}");
    }
    Ok(json!({
        "tool": tool,
        "backend": backend,
        "initial_ms": ms(initial),
        "add_endpoint_ms": median_ms(&runs),
        "add_endpoint_runs_ms": runs_ms(&runs),
        "rules": iptables::count_rules(&text),
        "chains": iptables::count_chains(&text),
        "bytes": text.len(),
        "add_endpoint_rules": iptables::count_rules(&partial),
        "add_endpoint_bytes": partial.len(),
        "nat_rules_loaded": loaded,
    }))
}

fn measure_nftables(svcs: &[BenchService], node: &NodeInfo) -> Result<Value> {
    let tool = lb_testkit::cmd::output(
        std::process::Command::new(lb_testkit::cmd::program("nft")).arg("--version"),
    )?
    .trim()
    .to_owned();
    let site = Site::new("cp")?;
    let ns = site.netns("nft")?;
    let text = nftables::full_text(svcs, node);
    let initial = run_tool(&ns, "nft", &["-f", "-"], &text)?;
    let mut svcs = svcs.to_vec();
    let mut runs = Vec::new();
    let mut lists = Vec::new();
    let mut partial = String::new();
    for k in 0..ADD_RUNS {
        let idx = k % svcs.len();
        svcs[idx].endpoints.push(added_endpoint(k));
        lists.push(run_tool(&ns, "nft", nftables::LIST_CHAINS_ARGS, "")?);
        partial = nftables::partial_text(&svcs, &[idx]);
        runs.push(run_tool(&ns, "nft", &["-f", "-"], &partial)?);
    }
    let (rules, elements, chains) = nftables::counts(&text);
    let (add_rules, ..) = nftables::counts(&partial);
    Ok(json!({
        "tool": tool,
        "initial_ms": ms(initial),
        "add_endpoint_ms": median_ms(&runs),
        "add_endpoint_runs_ms": runs_ms(&runs),
        "list_chains_ms": median_ms(&lists),
        "rules": rules,
        "elements": elements,
        "chains": chains,
        "lines": text.lines().count(),
        "bytes": text.len(),
        "add_endpoint_rules": add_rules,
        "add_endpoint_bytes": partial.len(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_the_test_range_and_distinct() {
        assert_eq!(endpoint(0, 0), Ipv4Addr::new(198, 18, 16, 0));
        assert_eq!(endpoint(9_999, 9), Ipv4Addr::new(198, 19, 150, 159));
        assert!(added_endpoint(ADD_RUNS - 1) > endpoint(SERVICES - 1, ENDPOINTS - 1));
    }

    #[test]
    fn medians() {
        let d = |m| Duration::from_millis(m);
        assert_eq!(median_ms(&[d(5), d(1), d(3)]), 3.0);
        assert_eq!(median_ms(&[d(4), d(1), d(3), d(2)]), 2.5);
    }
}
