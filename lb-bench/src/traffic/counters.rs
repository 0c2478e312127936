//! Evidence of what limits a system: kernel counters read
//! before and after a measurement, inside each namespace, and their deltas.
//!
//! * SNMP and extended TCP counters (what `nstat -az` prints): read from
//!   `/proc/thread-self/net/{snmp,netstat}` on a thread that entered the
//!   namespace (`/proc/net` follows the process's first thread, not ours).
//! * conntrack in the node namespace: `nf_conntrack_count` (entries at the
//!   end) and the per-CPU `net/stat/nf_conntrack` counters, summed.
//! * CPU: `/proc/stat` (all CPUs; the whole machine is the test bed).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Map, Value, json};

use lb_testkit::lab::netns::Netns;

/// Counters reported for the client namespace.
pub const CLIENT_KEYS: &[&str] = &[
    "TcpActiveOpens",
    "TcpAttemptFails",
    "TcpEstabResets",
    "TcpRetransSegs",
    "TcpOutRsts",
    "TcpInErrs",
    "TcpExtTCPSynRetrans",
    "TcpExtTW",
    "TcpExtTWRecycled",
    "TcpExtTWKilled",
    "TcpExtTCPTimeWaitOverflow",
    "UdpInDatagrams",
    "UdpOutDatagrams",
    "UdpRcvbufErrors",
    "UdpSndbufErrors",
    "UdpInErrors",
    "UdpNoPorts",
];

/// Counters reported for the node namespace.
pub const NODE_KEYS: &[&str] = &[
    "IpInReceives",
    "IpForwDatagrams",
    "IpInDiscards",
    "IpInHdrErrors",
    "IpInAddrErrors",
    "IpOutNoRoutes",
    "IpOutDiscards",
    "TcpInErrs",
    "TcpOutRsts",
    "IcmpOutDestUnreachs",
];

/// Counters reported for the pod namespaces (summed over them).
pub const POD_KEYS: &[&str] = &[
    "TcpPassiveOpens",
    "TcpAttemptFails",
    "TcpEstabResets",
    "TcpRetransSegs",
    "TcpOutRsts",
    "TcpInErrs",
    "TcpInCsumErrors",
    "TcpExtListenOverflows",
    "TcpExtListenDrops",
    "TcpExtTCPReqQFullDrop",
    "TcpExtSyncookiesSent",
    "TcpExtTCPSynRetrans",
    "TcpExtTW",
    "TcpExtTWRecycled",
    "TcpExtTWKilled",
    "TcpExtTCPTimeWaitOverflow",
    "TcpExtPAWSEstab",
    "UdpInDatagrams",
    "UdpOutDatagrams",
    "UdpRcvbufErrors",
    "UdpInErrors",
    "UdpNoPorts",
];

/// conntrack statistics reported (summed over CPUs).
pub const CONNTRACK_KEYS: &[&str] = &[
    "found",
    "invalid",
    "insert",
    "insert_failed",
    "drop",
    "early_drop",
    "clashres",
    "search_restart",
];

/// `/proc/stat`'s first line: jiffies per kind, all CPUs together.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    user: u64,
    system: u64,
    idle: u64,
    iowait: u64,
    irq: u64,
    softirq: u64,
    steal: u64,
    total: u64,
    /// CPU seconds of this process (load generator and servers), user + system.
    own: f64,
}

impl Cpu {
    /// Reads `/proc/stat`.
    pub fn read() -> Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        Ok(Self {
            own: own_cpu_seconds(),
            ..Self::parse(&text)
        })
    }

    fn parse(text: &str) -> Self {
        let v: Vec<u64> = text
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest is in user).
        Self {
            user: at(0) + at(1),
            system: at(2),
            idle: at(3),
            iowait: at(4),
            irq: at(5),
            softirq: at(6),
            steal: at(7),
            total: (0..8).map(at).sum(),
            own: 0.0,
        }
    }

    /// Shares of the time between `self` and `later`, as JSON.
    pub fn shares(&self, later: &Self) -> Value {
        let d = |a: u64, b: u64| b.saturating_sub(a) as f64;
        let total = d(self.total, later.total).max(1.0);
        let share = |a: u64, b: u64| round3(d(a, b) / total);
        let busy = total - d(self.idle, later.idle) - d(self.iowait, later.iowait);
        json!({
            "busy": round3(busy / total),
            "user": share(self.user, later.user),
            "system": share(self.system, later.system),
            "softirq": share(self.softirq, later.softirq),
            "irq": share(self.irq, later.irq),
            "steal": share(self.steal, later.steal),
            "busy_cpu_seconds": round3(busy / clock_ticks()),
            // Softirq work done on our threads' time is in here too.
            "bench_process_cpu_seconds": round3(later.own - self.own),
        })
    }

    /// The busy share of all CPUs between `self` and `later`, 0..=1.
    pub fn busy_share(&self, later: &Self) -> f64 {
        let d = |a: u64, b: u64| b.saturating_sub(a) as f64;
        let total = d(self.total, later.total);
        if total <= 0.0 {
            return 0.0;
        }
        (total - d(self.idle, later.idle) - d(self.iowait, later.iowait)) / total
    }

    /// Busy CPU seconds between `self` and `later`.
    pub fn busy_seconds(&self, later: &Self) -> f64 {
        let d = |a: u64, b: u64| b.saturating_sub(a) as f64;
        (d(self.total, later.total) - d(self.idle, later.idle) - d(self.iowait, later.iowait))
            / clock_ticks()
    }
}

/// User + system CPU seconds of this process (all threads).
fn own_cpu_seconds() -> f64 {
    // SAFETY: `usage` is a plain struct the call fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Below this busy share of all CPUs the machine counts as idle.
pub const IDLE_SHARE: f64 = 0.2;

/// Waits until the machine is idle (busy below [`IDLE_SHARE`] over 100 ms)
/// or `max` has passed, and returns how long it waited. Deleting a
/// namespace frees its rules, conntrack entries and sockets later, on a
/// kernel worker: without this wait, that work would land on the next
/// system's measurement.
pub fn wait_for_idle(max: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let a = Cpu::read()?;
        std::thread::sleep(Duration::from_millis(100));
        let b = Cpu::read()?;
        if a.busy_share(&b) < IDLE_SHARE || start.elapsed() >= max {
            return Ok(start.elapsed());
        }
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Parses the `Name: k1 k2…` / `Name: v1 v2…` line pairs of
/// `/proc/net/snmp` and `/proc/net/netstat` into `NameK1 → v1` (nstat's
/// names, e.g. `TcpExtTW`, `TcpAttemptFails`).
pub fn parse_snmp(text: &str, into: &mut BTreeMap<String, i64>) {
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [head, values] = pair else { continue };
        let (Some((prefix, keys)), Some((_, vals))) =
            (head.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (k, v) in keys.split_whitespace().zip(vals.split_whitespace()) {
            if let Ok(v) = v.parse::<i64>() {
                into.insert(format!("{prefix}{k}"), v);
            }
        }
    }
}

/// Sums the per-CPU hexadecimal rows of `net/stat/nf_conntrack` by column.
pub fn parse_conntrack_stat(text: &str) -> BTreeMap<String, i64> {
    let mut lines = text.lines();
    let names: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let mut sums = BTreeMap::new();
    for line in lines {
        for (name, v) in names.iter().zip(line.split_whitespace()) {
            if let Ok(v) = i64::from_str_radix(v, 16) {
                *sums.entry((*name).to_owned()).or_default() += v;
            }
        }
    }
    sums
}

/// Every counter of one namespace at one moment.
#[derive(Debug, Clone, Default)]
pub struct NsCounters {
    /// SNMP and extended counters by nstat name.
    pub snmp: BTreeMap<String, i64>,
    /// conntrack statistics (summed over CPUs) and `count`.
    pub conntrack: BTreeMap<String, i64>,
}

/// Reads the counters of `ns` (on a thread inside it).
pub fn read_ns(ns: &Netns) -> Result<NsCounters> {
    ns.run(|| -> Result<NsCounters> {
        let mut c = NsCounters::default();
        for file in ["snmp", "netstat"] {
            let path = format!("/proc/thread-self/net/{file}");
            let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
            parse_snmp(&text, &mut c.snmp);
        }
        if let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack") {
            c.conntrack = parse_conntrack_stat(&text);
        }
        if let Ok(text) = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count") {
            c.conntrack
                .insert("count".into(), text.trim().parse().unwrap_or(0));
        }
        Ok(c)
    })?
    .with_context(|| format!("counters of {}", ns.name()))
}

/// CPU seconds (user + system) of process `pid` so far, from
/// `/proc/<pid>/stat`; `None` when it is gone.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime 14, stime 15.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// The counters of the whole topology at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    cpu: Cpu,
    /// CPU seconds of the agent process, if there is one.
    agent_cpu: Option<f64>,
    client: NsCounters,
    node: NsCounters,
    pods: Vec<NsCounters>,
}

impl Snapshot {
    /// Reads everything.
    pub fn take(
        client: &Netns,
        node: &Netns,
        pods: &[Netns],
        agent_pid: Option<u32>,
    ) -> Result<Self> {
        Ok(Self {
            agent_cpu: agent_pid.and_then(process_cpu_seconds),
            client: read_ns(client)?,
            node: read_ns(node)?,
            pods: pods.iter().map(read_ns).collect::<Result<_>>()?,
            cpu: Cpu::read()?,
        })
    }

    /// The CPU counters.
    pub fn cpu(&self) -> &Cpu {
        &self.cpu
    }

    /// The deltas from `self` to `later`, as the `evidence` JSON object.
    pub fn evidence(&self, later: &Self) -> Value {
        let pick = |keys: &[&str], a: &BTreeMap<String, i64>, b: &BTreeMap<String, i64>| {
            let mut m = Map::new();
            for k in keys {
                let d = b.get(*k).copied().unwrap_or(0) - a.get(*k).copied().unwrap_or(0);
                m.insert((*k).to_owned(), json!(d));
            }
            Value::Object(m)
        };
        let sum = |pods: &[NsCounters]| {
            let mut s: BTreeMap<String, i64> = BTreeMap::new();
            for p in pods {
                for (k, v) in &p.snmp {
                    *s.entry(k.clone()).or_default() += v;
                }
            }
            s
        };
        let mut conntrack = match pick(CONNTRACK_KEYS, &self.node.conntrack, &later.node.conntrack)
        {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        conntrack.insert(
            "count_at_end".into(),
            json!(later.node.conntrack.get("count").copied().unwrap_or(0)),
        );
        let mut cpu = self.cpu.shares(&later.cpu);
        // The agent's own CPU time (its GC, map reads) during the run: null
        // without an agent.
        cpu["agent_process_cpu_seconds"] = match (self.agent_cpu, later.agent_cpu) {
            (Some(a), Some(b)) => json!(round3(b - a)),
            _ => Value::Null,
        };
        json!({
            "cpu": cpu,
            "client": pick(CLIENT_KEYS, &self.client.snmp, &later.client.snmp),
            "node": pick(NODE_KEYS, &self.node.snmp, &later.node.snmp),
            "pods": pick(POD_KEYS, &sum(&self.pods), &sum(&later.pods)),
            "node_conntrack": Value::Object(conntrack),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_pairs_become_nstat_names() {
        let text = "Tcp: RtoAlgorithm ActiveOpens AttemptFails\nTcp: 1 20 3\n\
                    TcpExt: SyncookiesSent TW\nTcpExt: 0 17\n";
        let mut m = BTreeMap::new();
        parse_snmp(text, &mut m);
        assert_eq!(m["TcpActiveOpens"], 20);
        assert_eq!(m["TcpAttemptFails"], 3);
        assert_eq!(m["TcpExtTW"], 17);
    }

    #[test]
    fn conntrack_stat_sums_cpus() {
        let text = "entries  clashres found insert_failed\n\
                    00000002  00000000 00000010 00000001\n\
                    00000003  00000001 00000001 00000000\n";
        let m = parse_conntrack_stat(text);
        assert_eq!(m["entries"], 5);
        assert_eq!(m["found"], 17);
        assert_eq!(m["insert_failed"], 1);
        assert_eq!(m["clashres"], 1);
    }

    #[test]
    fn cpu_shares() {
        let a = Cpu::parse("cpu  100 0 50 800 0 0 50 0 0 0\n");
        let b = Cpu::parse("cpu  200 0 100 900 0 0 100 0 0 0\n");
        let s = a.shares(&b);
        assert_eq!(s["busy"], 0.667);
        assert_eq!(s["softirq"], 0.167);
    }
}
