//! SYN flood: `hping3 -i u10 --rand-source -S` at a NodePort whose
//! endpoints are on both nodes of the two-node lab (local pods: DNAT;
//! remote pods: DNAT + SNAT), while established connections keep talking.
//!
//! The flood is paced (one SYN every 10 µs asked, about 20,000-25,000/s
//! got on a 2-core VM) rather than `--flood`: unpaced, hping3 outruns what
//! the VM's two CPUs can take off the veth ring in front of node-a, the
//! kernel drops a third of all packets there, before any BPF program, and
//! the established connections' losses measure the VM, not the balancer.
//! Paced, nothing is dropped before XDP and the flood still fills the
//! conntrack LRU, the NAT table and the open-flow registry.
//!
//! The agents run with `--nat-tcp-syn-timeout 20 --gc-interval 1` (defaults
//! 60 and 5) so that the test sees the tables drain within seconds of the
//! flood's end rather than minutes. Each node gets a default route through
//! the client (a real node's uplink): the pods' SYN-ACKs to the spoofed
//! sources then leave as on a real node, and a strict `rp_filter` would
//! accept the spoofed sources.
//!
//! Needs root, BPF and hping3 (`cargo test -p lb-e2e --test flood --
//! --test-threads=1`; `cargo xtask test` runs it with `LB_AGENT_BIN` set to
//! a fresh build). Without root it prints SKIPPED and passes, except under
//! CI, where it fails.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use lb_common::{CtKeyV4, CtValueV4, NatValueV4, OpenFlowV4};
use lb_testkit::lab::{
    client::{self, EchoConn},
    cluster::{self, ClusterLab, Endpoints, NodeId},
    manifest::EchoOptions,
    pins,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// `--nat-tcp-syn-timeout` of the agents, seconds.
const SYN_TIMEOUT: u64 = 20;
/// `--gc-interval` of the agents, seconds.
const GC_INTERVAL: u64 = 1;
/// How long hping3 floods.
const FLOOD: Duration = Duration::from_secs(30);
/// Established connections through node-a to pods on each node.
const PER_NODE: usize = 3;
/// Interval between two exchanges of an established connection.
const TALK_EVERY: Duration = Duration::from_millis(20);
/// The share of exchanges the established connections must complete.
const MIN_ANSWERED: f64 = 0.999;
/// Entries above the pre-flood count that still count as back to the
/// pre-flood size: the half-open connections of the pods' listen backlogs
/// (128 per pod, beyond that they answer with SYN cookies and keep no
/// state) retransmit their SYN-ACKs for about a minute, and each
/// retransmission keeps a flow entry whose other half the LRU evicted
/// alive for the closed grace (10 s) after it. That is at most 256 entries
/// per table on each node; twice that for margin.
const ABOUT: usize = 512;
/// Entries above the pre-flood count that count as fully drained.
const SLACK: usize = 16;
/// How long after the flood the test waits for the tables to drain fully
/// (reported, not asserted: see [`ABOUT`]).
const FULL_DRAIN_WAIT: Duration = Duration::from_secs(45);

/// Packets the ingress program saw, at whichever hook `--attach auto`
/// chose (TC ingress on the lab's veths).
fn ingress_packets(d: &BTreeMap<String, u64>) -> u64 {
    d["xdp_packets"] + d["tc_ingress_packets"]
}

/// The verdict counters of `LB_STATS`: every packet the ingress program
/// sees ends in exactly one of them.
const VERDICTS: &[&str] = &[
    "pass_not_ipv4",
    "pass_other_proto",
    "pass_not_service",
    "pass_truncated",
    "pass_ip_options",
    "pass_fragment",
    "icmp_translated",
    "drop_source_range",
    "reject_tcp",
    "reject_udp",
    "reject_failed",
    "drop_no_backend",
    "new_flows",
    "established",
    "reverse_snat",
    "snat_exhausted",
    "drop_reply_clash",
];
/// The verdicts that drop the packet.
const DROPS: &[&str] = &[
    "drop_source_range",
    "reject_failed",
    "drop_no_backend",
    "snat_exhausted",
    "drop_reply_clash",
];
/// Counters that describe a packet further (not verdicts).
const DETAILS: &[&str] = &[
    "forwarded",
    "rebalanced",
    "ct_insert_failed",
    "fib_no_neigh",
    "fib_failed",
    "flows_opened",
    "flows_closed",
    "flows_untracked",
    "tc_packets",
    "tc_reverse_nat",
    "tc_rewrite_failed",
    "tc_icmp_translated",
    "snat_reclaimed",
];

/// Entries of the hash map (LRU or not) pinned as `name` on node-a,
/// counted by walking its keys.
fn entries<V: aya::Pod>(lab: &ClusterLab, name: &str) -> usize {
    let dir = lab.pin(NodeId::A, name);
    let dir = dir.parent().expect("a pin has a directory");
    let map: HashMap<MapData, CtKeyV4, V> =
        lb_userspace::pinned::hash(dir, name).unwrap_or_else(|e| panic!("{e}"));
    map.keys().filter(Result::is_ok).count()
}

/// Node-a's flow tables: (conntrack, NAT, open-flow registry) entries.
fn tables(lab: &ClusterLab) -> (usize, usize, usize) {
    (
        entries::<CtValueV4>(lab, pins::CONNTRACK_V4),
        entries::<NatValueV4>(lab, pins::NAT_V4),
        entries::<OpenFlowV4>(lab, pins::OPEN_FLOWS_V4),
    )
}

/// `lb_conntrack_entries` and `lb_nat_entries` of node-a's agent (as of
/// its last collection), read over loopback inside the node so that the
/// flooded link is not in the way.
fn gauges(lab: &ClusterLab) -> Option<(u64, u64)> {
    let addr = SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::LOCALHOST,
        cluster::METRICS_PORT,
    ));
    let metrics = lab
        .node(NodeId::A)
        .run(move || client::http_get_path(addr, "/metrics"))
        .ok()?
        .ok()?;
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    Some((value("lb_conntrack_entries")?, value("lb_nat_entries")?))
}

/// The change of each counter from `before` to `after`.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .collect()
}

/// What one established connection did.
#[derive(Debug, Default)]
struct Talk {
    pod: String,
    sent: u64,
    answered: u64,
    broken: Vec<String>,
    slowest: Duration,
}

/// Exchanges on `conn` every [`TALK_EVERY`] until `stop`; a broken
/// connection (error, timeout, wrong answer) is counted and replaced.
fn talk(conn: EchoConn, pod: String, frontend: SocketAddr, stop: &AtomicBool) -> Talk {
    let mut t = Talk {
        pod,
        ..Talk::default()
    };
    let mut conn = Some(conn);
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let at = Instant::now();
        n += 1;
        t.sent += 1;
        let result = match conn.as_mut() {
            Some(c) => c.ask(&format!("line {n}")),
            None => EchoConn::connect(frontend).and_then(|mut c| {
                let pod = c.ask(&format!("line {n}"));
                conn = Some(c);
                pod
            }),
        };
        match result {
            Ok(_) => {
                t.answered += 1;
                t.slowest = t.slowest.max(at.elapsed());
            }
            Err(e) => {
                t.broken.push(format!("{e:#}"));
                conn = None;
            }
        }
        thread::sleep(TALK_EVERY.saturating_sub(at.elapsed()));
    }
    t
}

/// The cluster lab, or `None` (after saying why) when the test cannot run
/// here (not root; no hping3 outside CI).
fn lab_or_skip(test: &str) -> Option<ClusterLab> {
    if !lb_testkit::guard::can_run_with(test, "hping3") {
        return None;
    }
    Some(
        ClusterLab::new(2, None)
            .unwrap_or_else(|e| panic!("{test}: building the cluster lab: {e:#}")),
    )
}

/// hping3 flooding from the client; SIGTERM stops it (it then prints its
/// statistics; in paced mode it does not stop on SIGINT).
struct Flood(Option<Child>);

impl Flood {
    fn start(lab: &ClusterLab, target: SocketAddr) -> Self {
        let child = lab
            .client()
            .command("hping3")
            .args(["-i", "u10", "--rand-source", "-S", "-p"])
            .arg(target.port().to_string())
            .arg(target.ip().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hping3");
        Self(Some(child))
    }

    /// Stops hping3; returns the packets it says it sent, and its output.
    fn stop(&mut self) -> (Option<u64>, String) {
        let Some(child) = self.0.take() else {
            return (None, String::new());
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let out = child.wait_with_output().expect("wait for hping3");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let sent = text
            .lines()
            .find_map(|l| l.split_once(" packets transmitted"))
            .and_then(|(n, _)| n.trim().parse().ok());
        (sent, text)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Opens connections through node-a until [`PER_NODE`] land on pods of
/// each node; returns them with their pod.
fn connections(lab: &ClusterLab, frontend: SocketAddr) -> Vec<(EchoConn, String)> {
    let mut kept: Vec<(EchoConn, String)> = Vec::new();
    for _ in 0..80 {
        let mut conn = lab
            .in_client(move || EchoConn::connect(frontend))
            .unwrap()
            .unwrap_or_else(|e| panic!("connect through node-a: {e:#}\n{}", lab.agent_logs()));
        let pod = conn
            .ask("hello")
            .unwrap_or_else(|e| panic!("first echo: {e:#}\n{}", lab.agent_logs()));
        let on = |kept: &[(EchoConn, String)], node: NodeId| {
            kept.iter()
                .filter(|(_, p)| cluster::parse_label(p).is_some_and(|(n, _)| n == node))
                .count()
        };
        let node = cluster::parse_label(&pod).map(|(n, _)| n);
        if node.is_some_and(|n| on(&kept, n) < PER_NODE) {
            kept.push((conn, pod));
        }
        if on(&kept, NodeId::A) == PER_NODE && on(&kept, NodeId::B) == PER_NODE {
            return kept;
        }
    }
    panic!("80 connections through node-a did not give {PER_NODE} to each node's pods");
}

#[test]
fn syn_flood_spares_established_connections_and_the_tables_drain() {
    let test = "syn_flood_spares_established_connections_and_the_tables_drain";
    let Some(mut lab) = lab_or_skip(test) else {
        return;
    };
    lab.route_default_via_client().unwrap();
    lab.write_manifest(&Endpoints::all(2), &EchoOptions::default())
        .unwrap();
    let args: Vec<String> = [
        "--nat-tcp-syn-timeout".to_owned(),
        SYN_TIMEOUT.to_string(),
        "--gc-interval".to_owned(),
        GC_INTERVAL.to_string(),
    ]
    .to_vec();
    lab.start_agents(&args).unwrap();
    let frontend = cluster::nodeport(NodeId::A);

    let conns = connections(&lab, frontend);
    let (ct0, nat0, open0) = tables(&lab);
    let stats0 = lab.stats(NodeId::A).unwrap();
    let wire = |lab: &ClusterLab| {
        (
            lab.client().link_stats("c0").unwrap(),
            lab.wire().link_stats("wa").unwrap(),
            lab.node(NodeId::A).link_stats(cluster::NODE_IFACE).unwrap(),
        )
    };
    let links0 = wire(&lab);

    let stop = Arc::new(AtomicBool::new(false));
    let talkers: Vec<JoinHandle<Talk>> = conns
        .into_iter()
        .map(|(conn, pod)| {
            let stop = stop.clone();
            lab.in_client(move || thread::spawn(move || talk(conn, pod, frontend, &stop)))
                .unwrap()
        })
        .collect();
    thread::sleep(Duration::from_secs(2));

    // The flood, sampling the agent's table gauges every second.
    let mut flood = Flood::start(&lab, frontend);
    let started = Instant::now();
    let (mut peak_ct, mut peak_nat) = (0, 0);
    while started.elapsed() < FLOOD {
        thread::sleep(Duration::from_secs(1));
        if let Some((ct, nat)) = gauges(&lab) {
            peak_ct = peak_ct.max(ct);
            peak_nat = peak_nat.max(nat);
        }
    }
    let (hping_sent, hping_out) = flood.stop();
    let flood_secs = started.elapsed().as_secs_f64();
    let stopped = Instant::now();
    let (ct_end, nat_end, open_end) = tables(&lab);
    let stats_end = lab.stats(NodeId::A).unwrap();
    let links_end = wire(&lab);

    // Recovery: the flood's entries age out the SYN timeout after the
    // client's last SYN, at the next collection. A collection walks the
    // whole conntrack table: with 262,144 entries it takes 1.5-5 s in a
    // debug build of the agent, so "a GC interval" is that much longer here.
    let deadline = Duration::from_secs(SYN_TIMEOUT + 10);
    let mut recovered = None;
    let drained = loop {
        let (ct, nat, open) = tables(&lab);
        if recovered.is_none() && ct <= ct0 + ABOUT && nat <= nat0 + ABOUT {
            recovered = Some((stopped.elapsed(), ct, nat, open));
        }
        if ct <= ct0 + SLACK && nat <= nat0 + SLACK {
            break Some((stopped.elapsed(), ct, nat, open));
        }
        if stopped.elapsed() > FULL_DRAIN_WAIT {
            break None;
        }
        thread::sleep(Duration::from_millis(250));
    };
    stop.store(true, Ordering::SeqCst);
    let talks: Vec<Talk> = talkers
        .into_iter()
        .map(|t| t.join().expect("talker thread"))
        .collect();
    let stats1 = lab.stats(NodeId::A).unwrap();

    // New connections right after.
    let after = lab
        .in_client(move || {
            let mut tally = client::Tally::default();
            for _ in 0..40 {
                tally.record(client::http_get(frontend));
            }
            tally
        })
        .unwrap();

    // ---- the figures
    let d = delta(&stats0, &stats1);
    let flood_d = delta(&stats0, &stats_end);
    let (c0, wa, n0) = (
        links_end.0.since(&links0.0),
        links_end.1.since(&links0.1),
        links_end.2.since(&links0.2),
    );
    let sent: u64 = talks.iter().map(|t| t.sent).sum();
    let answered: u64 = talks.iter().map(|t| t.answered).sum();
    let ratio = answered as f64 / sent.max(1) as f64;
    let syn_rate = hping_sent.unwrap_or(c0.tx_packets) as f64 / flood_secs;
    println!("---- {test}");
    println!(
        "hping3: {} SYNs in {flood_secs:.1} s ({syn_rate:.0}/s); c0 sent {}, wa dropped {} \
         (node-a's XDP ring full), n0 received {} (dropped {})",
        hping_sent.map_or("?".to_owned(), |n| n.to_string()),
        c0.tx_packets,
        wa.tx_dropped,
        n0.rx_packets,
        n0.rx_dropped
    );
    println!(
        "node-a during the flood: new_flows {} (forwarded {}), snat_exhausted {}, \
         ct_insert_failed {}, flows_untracked {}, ingress packets {} (n0 received {})",
        flood_d["new_flows"],
        flood_d["forwarded"],
        flood_d["snat_exhausted"],
        flood_d["ct_insert_failed"],
        flood_d["flows_untracked"],
        ingress_packets(&flood_d),
        n0.rx_packets
    );
    println!(
        "tables (conntrack / NAT / open flows): before {ct0} / {nat0} / {open0}; peak (agent \
         gauges) {peak_ct} / {peak_nat}; at the flood's end {ct_end} / {nat_end} / {open_end}"
    );
    match recovered {
        Some((t, ct, nat, open)) => println!(
            "back to about the pre-flood size (+{ABOUT}) {:.1} s after the flood: \
             {ct} / {nat} / {open}",
            t.as_secs_f64()
        ),
        None => println!("NOT back to the pre-flood size within {FULL_DRAIN_WAIT:?}"),
    }
    match drained {
        Some((t, ct, nat, open)) => println!(
            "fully drained (+{SLACK}) {:.1} s after the flood: {ct} / {nat} / {open}",
            t.as_secs_f64()
        ),
        None => println!(
            "not fully drained {FULL_DRAIN_WAIT:?} after the flood: {:?}",
            tables(&lab)
        ),
    }
    for t in &talks {
        println!(
            "established to {}: {}/{} answered, slowest {} ms, broken {}{}",
            t.pod,
            t.answered,
            t.sent,
            t.slowest.as_millis(),
            t.broken.len(),
            t.broken
                .first()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
    }
    println!(
        "established overall: {answered}/{sent} = {:.4}%",
        ratio * 100.0
    );
    let drops: Vec<String> = DROPS.iter().map(|k| format!("{k}={}", d[*k])).collect();
    println!("drops (whole run): {}", drops.join(" "));
    let verdicts: u64 = VERDICTS.iter().map(|k| d[*k]).sum();
    let shown: Vec<String> = VERDICTS
        .iter()
        .chain(DETAILS)
        .filter(|k| d[**k] > 0)
        .map(|k| format!("{k}={}", d[*k]))
        .collect();
    println!(
        "LB_STATS (whole run): ingress packets {} = sum of verdicts {verdicts}: {}",
        ingress_packets(&d),
        shown.join(" ")
    );
    println!("new connections after: {after}");

    // ---- the assertions
    assert!(
        hping_sent.is_some_and(|n| n > 0),
        "hping3 sent nothing:\n{hping_out}"
    );
    // Each run of the program counts its packet first and its verdict
    // last: a read while packets are in flight may see one without the
    // other, once per CPU.
    assert!(
        ingress_packets(&d).abs_diff(verdicts) <= 2,
        "node-a's ingress program saw {} packets but counted {verdicts} verdicts: {d:?}",
        ingress_packets(&d)
    );
    // What reached node-a went through its ingress program (what the
    // kernel dropped before, in the veth ring, is `wa`'s tx_dropped above).
    let seen = ingress_packets(&flood_d);
    assert!(
        n0.rx_packets.abs_diff(seen) <= n0.rx_packets / 1000 + 100,
        "n0 received {} packets during the flood, node-a's ingress program saw {seen}",
        n0.rx_packets
    );
    assert!(
        ratio >= MIN_ANSWERED,
        "established connections completed {answered}/{sent} exchanges ({:.3}%), under {:.1}%",
        ratio * 100.0,
        MIN_ANSWERED * 100.0
    );
    let (took, ..) = recovered.unwrap_or_else(|| {
        panic!(
            "node-a's tables did not drain: (conntrack, NAT, open flows) {:?}, before \
             {ct0} / {nat0} / {open0}\n{}",
            tables(&lab),
            lab.agent_logs()
        )
    });
    assert!(
        took <= deadline,
        "node-a's tables took {took:?} to come back to about their pre-flood size, over \
         the SYN timeout + 10 s ({deadline:?})"
    );
    assert!(
        after.errors.is_empty(),
        "new connections after the flood: {after}\n{}",
        lab.agent_logs()
    );
    let logs = lab.agent_logs();
    assert!(
        lab.agent(NodeId::A).unwrap().running(),
        "node-a's agent died:\n{logs}"
    );
}
