//! kube-proxy's iptables mode: the `iptables-restore` input of its
//! `syncProxyRules` (pkg/proxy/iptables/proxier.go, 1.31+), for NodePort
//! services with `externalTrafficPolicy: Cluster`.
//!
//! A sync writes `*filter` then `*nat`, each as all chain lines (`:CHAIN - [0:0]`,
//! which also flushes the chain under `--noflush`) followed by all rules:
//!
//! ```text
//! nat  PREROUTING/OUTPUT ─► KUBE-SERVICES: per service  -d CLUSTER-IP --dport P ─► KUBE-SVC-…
//!                                         last: -m addrtype --dst-type LOCAL ─► KUBE-NODEPORTS
//!      KUBE-NODEPORTS: per service --dport NODEPORT ─► KUBE-EXT-… (mark for masquerade) ─► KUBE-SVC-…
//!      KUBE-SVC-…: statistic random 1/n, 1/(n-1), …, last unconditional ─► KUBE-SEP-… (DNAT)
//!      POSTROUTING ─► KUBE-POSTROUTING: MASQUERADE --random-fully what KUBE-MARK-MASQ marked
//! filter INPUT/FORWARD/OUTPUT ─► KUBE-FORWARD, KUBE-SERVICES, KUBE-EXTERNAL-SERVICES,
//!                                KUBE-NODEPORTS, KUBE-PROXY-FIREWALL, KUBE-FIREWALL
//! ```
//!
//! kube-proxy adds the jumps from the built-in chains with separate
//! `iptables -I` calls once, then always restores with `--noflush`.
//! [`full_text`] instead carries the built-in chains and their jumps in the
//! same input and is restored without `--noflush` (the nat and filter tables
//! are replaced): self-contained and idempotent, and in a fresh namespace the
//! same rules as kube-proxy's first sync. [`partial_text`] is exactly what a
//! partial sync (`MinimizeIPTablesRestore`, default since 1.27) restores with
//! `--noflush`: every top-level chain with all its rules (so `KUBE-SERVICES`
//! and `KUBE-NODEPORTS` are rewritten in full), plus only the changed
//! services' `KUBE-EXT`/`KUBE-SVC`/`KUBE-SEP` chains.
//!
//! Above [`LARGE_CLUSTER_ENDPOINTS`] endpoints kube-proxy drops the comments
//! of `KUBE-SVC` → `KUBE-SEP` and `KUBE-SEP` rules ("large cluster mode");
//! so does this. Not reproduced: the `KUBE-PROXY-CANARY` chains, nfacct
//! matches, and the periodic `iptables-save` that finds stale chains (none
//! go stale when endpoints are only added; in large cluster mode kube-proxy
//! skips it anyway).

use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use anyhow::Result;

use super::{BenchService, CLUSTER_CIDR, MASQ_MARK, NodeInfo, hash_prefix, rule_order, run_tool};
use lb_testkit::lab::netns::Netns;

/// The restore tool of the system's default backend (here `nf_tables`).
pub const RESTORE: &str = "iptables-restore";
/// The restore tool of the legacy (`x_tables`) backend.
pub const LEGACY_RESTORE: &str = "iptables-legacy-restore";
/// Above this many endpoints in total kube-proxy leaves out per-endpoint
/// comments (`largeClusterEndpointsThreshold`).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// `KUBE-SVC-` + 16 chars of base32(sha256("ns/name:port" + "tcp")).
pub fn svc_chain(svc: &BenchService) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(svc))
}

/// `KUBE-EXT-` + the same hash as [`svc_chain`].
pub fn ext_chain(svc: &BenchService) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(svc))
}

/// `KUBE-SEP-` + 16 chars of base32(sha256("ns/name:port" + "tcp" + "ip:port")).
pub fn sep_chain(svc: &BenchService, ep: Ipv4Addr) -> String {
    let s = format!(
        "{}{}{ep}:{}",
        svc.port_name_string(),
        svc.protocol.lower(),
        svc.target_port
    );
    format!("KUBE-SEP-{}", hash_prefix(&s, 16))
}

fn port_proto_hash(svc: &BenchService) -> String {
    hash_prefix(
        &format!("{}{}", svc.port_name_string(), svc.protocol.lower()),
        16,
    )
}

/// kube-proxy's `computeProbability`: Go's `%0.10f` of `1/n`
/// (`0.3333333333`; `iptables-save` prints the stored value back with 11
/// decimals, `0.33333333349`).
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Whether kube-proxy is in "large cluster mode" for `svcs`.
pub fn large_cluster(svcs: &[BenchService]) -> bool {
    svcs.iter().map(|s| s.endpoints.len()).sum::<usize>() > LARGE_CLUSTER_ENDPOINTS
}

/// Self-contained input for `iptables-restore` (without `--noflush`): the
/// built-in chains with kube-proxy's jumps, and kube-proxy's full sync. The
/// node's address does not appear: with `--nodeport-addresses` unset
/// NodePorts match every local address (`-m addrtype --dst-type LOCAL`).
pub fn full_text(svcs: &[BenchService], _node: &NodeInfo) -> String {
    sync_text(svcs, None, true)
}

/// kube-proxy's partial sync after the services `changed` (indices into
/// `svcs`, which already hold the new endpoints) changed, for
/// `iptables-restore --noflush`.
pub fn partial_text(svcs: &[BenchService], changed: &[usize]) -> String {
    sync_text(svcs, Some(changed), false)
}

/// Number of rules (`-A` lines) in restore input.
pub fn count_rules(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Number of chains declared (`:CHAIN` lines) in restore input.
pub fn count_chains(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with(':')).count()
}

/// Built-in chain jumps in their final order (kube-proxy prepends each
/// one with `iptables -I`, so its list ends up reversed per chain).
const FILTER_JUMPS: &[&str] = &[
    "-A INPUT -j KUBE-FIREWALL",
    "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
    "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
    "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
    "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
    "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    "-A OUTPUT -j KUBE-FIREWALL",
    "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
    "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
];
const NAT_JUMPS: &[&str] = &[
    "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
];

/// `changed`: None for a full sync, else the services whose chains are
/// rewritten. `builtin`: also declare the built-in chains with the jumps.
fn sync_text(svcs: &[BenchService], changed: Option<&[usize]>, builtin: bool) -> String {
    let large = large_cluster(svcs);
    let total_eps: usize = svcs.iter().map(|s| s.endpoints.len()).sum();
    let mut out = String::with_capacity(256 + svcs.len() * 400 + total_eps * 250);

    // filter
    out.push_str("*filter\n");
    if builtin {
        out.push_str(":INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    }
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    if builtin {
        for j in FILTER_JUMPS {
            let _ = writeln!(out, "{j}");
        }
    }
    out.push_str(
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" \
         -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
    );
    out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" \
         -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    out.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" \
         -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    out.push_str("COMMIT\n");

    // nat: chain lines, then rules.
    let rewritten = |i: usize| changed.is_none_or(|c| c.contains(&i));
    let mut chains = String::new();
    let mut rules = String::new();
    if builtin {
        chains.push_str(
            ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
        );
        for j in NAT_JUMPS {
            let _ = writeln!(rules, "{j}");
        }
    }
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{c} - [0:0]");
    }
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    rules.push_str(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully\n",
    );
    let _ = writeln!(rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");

    for i in rule_order(svcs.len()) {
        let svc = &svcs[i];
        if svc.endpoints.is_empty() {
            // The bench never has endpoint-less services; kube-proxy would
            // write REJECT rules in the filter table for them.
            continue;
        }
        let name = svc.port_name_string();
        let proto = svc.protocol.lower();
        let svc_chain = svc_chain(svc);
        let ext_chain = ext_chain(svc);
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} \
             -d {} --dport {} -j {svc_chain}",
            svc.cluster_ip, svc.port
        );
        let _ = writeln!(
            rules,
            "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {} -j {ext_chain}",
            svc.node_port
        );
        if !rewritten(i) {
            continue;
        }
        // Internal traffic: masquerade what does not come from a pod.
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} \
             -d {} --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            svc.cluster_ip, svc.port
        );
        // External traffic (NodePort): always masquerade, then the service.
        let _ = writeln!(chains, ":{ext_chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" \
             -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(rules, "-A {ext_chain} -j {svc_chain}");
        // Service → endpoints.
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let n = svc.endpoints.len();
        for (k, &ep) in svc.endpoints.iter().enumerate() {
            let _ = write!(rules, "-A {svc_chain}");
            if !large {
                let _ = write!(
                    rules,
                    " -m comment --comment \"{name} -> {ep}:{}\"",
                    svc.target_port
                );
            }
            if k + 1 < n {
                let _ = write!(
                    rules,
                    " -m statistic --mode random --probability {}",
                    probability(n - k)
                );
            }
            let _ = writeln!(rules, " -j {}", sep_chain(svc, ep));
        }
        // Endpoint chains.
        for &ep in &svc.endpoints {
            let sep = sep_chain(svc, ep);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let comment = if large {
                String::new()
            } else {
                format!(" -m comment --comment {name}")
            };
            let _ = writeln!(rules, "-A {sep}{comment} -s {ep} -j KUBE-MARK-MASQ");
            let _ = writeln!(
                rules,
                "-A {sep}{comment} -m {proto} -p {proto} -j DNAT --to-destination {ep}:{}",
                svc.target_port
            );
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    out.push_str("*nat\n");
    out.push_str(&chains);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

/// Restores [`full_text`] with `program` (an `iptables-restore` of some
/// backend) in `ns`; the wall time of that run.
pub fn install(
    ns: &Netns,
    program: &str,
    svcs: &[BenchService],
    node: &NodeInfo,
) -> Result<Duration> {
    run_tool(ns, program, &["--counters"], &full_text(svcs, node))
}

/// Restores kube-proxy's partial sync for the changed service `idx` with
/// `--noflush --counters`; the wall time of that run.
pub fn add_endpoint(
    ns: &Netns,
    program: &str,
    svcs: &[BenchService],
    idx: usize,
) -> Result<Duration> {
    run_tool(
        ns,
        program,
        &["--noflush", "--counters"],
        &partial_text(svcs, &[idx]),
    )
}

/// Empties the nat and filter tables (user chains deleted, built-in chains
/// flushed).
pub fn flush(ns: &Netns, program: &str) -> Result<()> {
    run_tool(ns, program, &[], "*filter\nCOMMIT\n*nat\nCOMMIT\n").map(drop)
}

/// `iptables-restore v1.8.9 (nf_tables)` → (`v1.8.9 (nf_tables)`, `nf_tables`).
pub fn version(program: &str) -> Result<(String, String)> {
    let out = lb_testkit::cmd::output(
        std::process::Command::new(lb_testkit::cmd::program(program)).arg("--version"),
    )?;
    let line = out.lines().next().unwrap_or_default().trim().to_owned();
    let backend = line
        .rsplit_once('(')
        .and_then(|(_, b)| b.strip_suffix(')'))
        .unwrap_or("legacy")
        .to_owned();
    Ok((line, backend))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeproxy::{Protocol, services};

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            addr: Ipv4Addr::new(198, 18, 0, 1),
        }
    }

    fn ep(i: usize, j: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 16 + i as u8, 10 + j as u8)
    }

    #[test]
    fn probabilities_are_formatted_like_kube_proxy() {
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(7), "0.1428571429");
        assert_eq!(probability(1), "1.0000000000");
    }

    #[test]
    fn one_service_three_endpoints() {
        let svcs = services(1, 3, ep, Protocol::Tcp);
        let text = full_text(&svcs, &node());
        let svc = svc_chain(&svcs[0]);
        let ext = ext_chain(&svcs[0]);
        let seps: Vec<String> = svcs[0]
            .endpoints
            .iter()
            .map(|&e| sep_chain(&svcs[0], e))
            .collect();
        let lines: Vec<&str> = text.lines().collect();
        let has = |l: &str| assert!(lines.contains(&l), "missing line {l:?} in\n{text}");
        has(&format!(
            "-A {svc} -m comment --comment \"bench/svc-00000:http -> 198.18.16.10:8080\" \
             -m statistic --mode random --probability 0.3333333333 -j {}",
            seps[0]
        ));
        has(&format!(
            "-A {svc} -m comment --comment \"bench/svc-00000:http -> 198.18.16.11:8080\" \
             -m statistic --mode random --probability 0.5000000000 -j {}",
            seps[1]
        ));
        // The last endpoint is unconditional.
        has(&format!(
            "-A {svc} -m comment --comment \"bench/svc-00000:http -> 198.18.16.12:8080\" -j {}",
            seps[2]
        ));
        has(&format!(
            "-A KUBE-SERVICES -m comment --comment \"bench/svc-00000:http cluster IP\" -m tcp -p tcp \
             -d 10.96.0.10 --dport 80 -j {svc}"
        ));
        has(&format!(
            "-A KUBE-NODEPORTS -m comment --comment bench/svc-00000:http -m tcp -p tcp --dport 30000 -j {ext}"
        ));
        has(&format!(
            "-A {ext} -m comment --comment \"masquerade traffic for bench/svc-00000:http external \
             destinations\" -j KUBE-MARK-MASQ"
        ));
        has(&format!("-A {ext} -j {svc}"));
        has(&format!(
            "-A {} -m comment --comment bench/svc-00000:http -s 198.18.16.10 -j KUBE-MARK-MASQ",
            seps[0]
        ));
        has(&format!(
            "-A {} -m comment --comment bench/svc-00000:http -m tcp -p tcp -j DNAT \
             --to-destination 198.18.16.10:8080",
            seps[0]
        ));
        has("-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000");
        has("-A KUBE-POSTROUTING -m mark ! --mark 0x004000/0x004000 -j RETURN");
        has("-A KUBE-POSTROUTING -j MARK --xor-mark 0x004000");
        has("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES");
        // The NodePort jump is the last rule of KUBE-SERVICES.
        let last = lines
            .iter()
            .rev()
            .find(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(
            last.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"),
            "{last}"
        );
        // filter before nat, one COMMIT each.
        assert_eq!(text.matches("COMMIT\n").count(), 2);
        assert!(text.find("*filter").unwrap() < text.find("*nat").unwrap());
        // Chain names: KUBE-XXX- + 16, at most 28 chars (iptables' limit).
        for c in [&svc, &ext].into_iter().chain(&seps) {
            assert_eq!(c.len(), 9 + 16, "{c}");
        }
        assert_eq!(svc[9..], ext[9..], "SVC and EXT share the hash");
    }

    #[test]
    fn target_is_last_and_large_clusters_drop_comments() {
        let svcs = services(
            200,
            10,
            |i, j| Ipv4Addr::from(0xc612_1000 + (i * 10 + j) as u32),
            Protocol::Tcp,
        );
        let text = full_text(&svcs, &node());
        let services: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -m comment --comment \"bench/"))
            .collect();
        assert_eq!(services.len(), 200);
        assert!(services[0].contains("svc-00001"));
        assert!(services[199].contains("svc-00000"));
        let nodeports: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-NODEPORTS"))
            .collect();
        assert!(nodeports[199].contains("--dport 30000 "));
        // 2000 endpoints > 1000: no comments on SVC/SEP rules.
        assert!(large_cluster(&svcs));
        assert!(!text.contains(" -> "));
        assert!(text.contains("\"bench/svc-00000:http cluster IP\""));
        // Rules: per service 1 KUBE-SERVICES + 1 NODEPORTS + 1 SVC masq + 2 EXT + 10 SVC + 20 SEP.
        let per_service = 35;
        let fixed = FILTER_JUMPS.len() + NAT_JUMPS.len() + 4 + 4 + 1;
        assert_eq!(count_rules(&text), 200 * per_service + fixed);
    }

    #[test]
    fn partial_sync_rewrites_top_level_chains_and_the_changed_service() {
        let mut svcs = services(5, 3, ep, Protocol::Tcp);
        svcs[2].endpoints.push(Ipv4Addr::new(198, 18, 30, 1));
        let text = partial_text(&svcs, &[2]);
        assert!(
            !text.contains(":INPUT"),
            "no built-in chains under --noflush"
        );
        assert_eq!(text.matches("-A KUBE-SERVICES ").count(), 6);
        assert_eq!(text.matches("-A KUBE-NODEPORTS ").count(), 5);
        assert!(text.contains(&format!(":{} - [0:0]", svc_chain(&svcs[2]))));
        assert!(!text.contains(&format!(":{} - [0:0]", svc_chain(&svcs[1]))));
        assert_eq!(
            count_chains(&text),
            6 + 4 + 2 + 4,
            "filter, nat top-level, SVC+EXT, 4 SEP"
        );
        assert!(text.contains("--probability 0.2500000000"));
    }
}
