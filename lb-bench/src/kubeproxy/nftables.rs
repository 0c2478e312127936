//! kube-proxy's nftables mode: the `nft -f` transactions of its
//! `syncProxyRules` (pkg/proxy/nftables/proxier.go, 1.31+, written the way
//! its library knftables prints them: one command per line), for NodePort
//! services with `externalTrafficPolicy: Cluster`.
//!
//! ```text
//! nat-prerouting/nat-output ─► services:
//!     ip daddr . meta l4proto . th dport vmap @service-ips       (cluster IP → goto service-…)
//!     ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports (→ goto external-…)
//! external-…: jump mark-for-masquerade; goto service-…
//! service-…:  numgen random mod N vmap { 0 : goto endpoint-…, 1 : … }
//! endpoint-…: ip saddr EP jump mark-for-masquerade; meta l4proto tcp dnat to EP:PORT
//! nat-postrouting ─► masquerading: masquerade fully-random what was marked
//! filter-* ─► service-endpoints-check, nodeport-endpoints-check, firewall-check,
//!             cluster-ips-check (no-endpoint, LoadBalancerSourceRanges and
//!             unknown-port handling; empty maps for the bench's services)
//! ```
//!
//! The first sync ([`full_text`]) sets up the table, base chains, maps and
//! sets, then adds every service; a partial sync ([`partial_text`]) only
//! re-creates (add + flush + rules) the chains of the changed services, map
//! elements being unchanged. kube-proxy also lists the table's chains and
//! sets (`nft --json list chains|sets`) before each
//! transaction to find stale ones; that is a separate tool run
//! ([`LIST_CHAINS_ARGS`]), not part of the text here.

use std::{fmt::Write as _, net::Ipv4Addr};

use super::{
    BenchService, CLUSTER_CIDR, MASQ_MARK, NodeInfo, SERVICE_CIDR, hash_prefix, rule_order,
};

/// The table every line addresses.
pub const TABLE: &str = "ip kube-proxy";
/// Deletes the table if it exists (the add makes the delete never fail).
pub const DELETE_TABLE: &str = "add table ip kube-proxy\ndelete table ip kube-proxy\n";
/// `nft` arguments of kube-proxy's per-sync listing of chains (knftables
/// asks for the table's chains; nft 1.0.6 only filters by family, which in
/// a namespace holding only this table lists the same chains).
pub const LIST_CHAINS_ARGS: &[&str] = &["--json", "list", "chains", "ip"];

/// kube-proxy's `hashAndTruncate`: 8 chars of base32(sha256(name)), `-`, name.
fn hash_and_truncate(name: &str) -> String {
    let s = format!("{}-{name}", hash_prefix(name, 8));
    // knftables.NameLengthMax (256) - 16; never reached with our names.
    debug_assert!(s.len() <= 240);
    s
}

fn chain_base(svc: &BenchService) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}",
        svc.namespace,
        svc.name,
        svc.protocol.lower(),
        svc.protocol.port_name()
    ))
}

/// `service-HASH-ns/name/tcp/port`.
pub fn service_chain(svc: &BenchService) -> String {
    format!("service-{}", chain_base(svc))
}

/// `external-HASH-ns/name/tcp/port`.
pub fn external_chain(svc: &BenchService) -> String {
    format!("external-{}", chain_base(svc))
}

/// `endpoint-HASH-ns/name/tcp/port__IP/PORT`.
pub fn endpoint_chain(svc: &BenchService, ep: Ipv4Addr) -> String {
    format!(
        "endpoint-{}",
        hash_and_truncate(&format!(
            "{}/{}/{}/{}__{ep}/{}",
            svc.namespace,
            svc.name,
            svc.protocol.lower(),
            svc.protocol.port_name(),
            svc.target_port
        ))
    )
}

/// Base chains: name, type, hook, priority (knftables prints `dstnat-10`
/// etc. as numbers).
const BASE_CHAINS: &[(&str, &str, &str, i32)] = &[
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// Regular chains jumped to from base chains: (to, from, match).
const JUMPS: &[(&str, &str, &str)] = &[
    ("nodeport-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-forward", "ct state new "),
    ("service-endpoints-check", "filter-output", "ct state new "),
    ("firewall-check", "filter-prerouting", "ct state new "),
    ("firewall-check", "filter-output", "ct state new "),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new "),
    (
        "cluster-ips-check",
        "filter-output-post-dnat",
        "ct state new ",
    ),
];

/// kube-proxy's first (full) sync for `svcs` in a namespace without the
/// table: one transaction. NodePorts are accepted on `node.addr` only
/// (nftables mode's default `--nodeport-addresses=primary`).
pub fn full_text(svcs: &[BenchService], node: &NodeInfo) -> String {
    let total_eps: usize = svcs.iter().map(|s| s.endpoints.len()).sum();
    let mut out = String::with_capacity(8192 + svcs.len() * 900 + total_eps * 420);
    let t = TABLE;
    let _ = writeln!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    for (name, ..) in BASE_CHAINS {
        let _ = writeln!(out, "add chain {t} {name}");
        let _ = writeln!(out, "delete chain {t} {name}");
    }
    for (name, ty, hook, prio) in BASE_CHAINS {
        let _ = writeln!(
            out,
            "add chain {t} {name} {{ type {ty} hook {hook} priority {prio} ; }}"
        );
        let _ = writeln!(out, "flush chain {t} {name}");
    }
    let mut created: Vec<&str> = Vec::new();
    let mut ensure = |out: &mut String, chain: &'static str| {
        if !created.contains(&chain) {
            created.push(chain);
            let _ = writeln!(out, "add chain {t} {chain}");
            let _ = writeln!(out, "flush chain {t} {chain}");
        }
    };
    for (to, from, m) in JUMPS {
        ensure(&mut out, to);
        let _ = writeln!(out, "add rule {t} {from} {m}jump {to}");
    }
    for chain in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        ensure(&mut out, chain);
    }
    let _ = writeln!(
        out,
        "add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}"
    );
    let _ = writeln!(
        out,
        "add rule {t} masquerading mark and {MASQ_MARK} == 0 return"
    );
    let _ = writeln!(
        out,
        "add rule {t} masquerading mark set mark xor {MASQ_MARK}"
    );
    let _ = writeln!(out, "add rule {t} masquerading masquerade fully-random");
    let _ = writeln!(
        out,
        "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    let _ = writeln!(
        out,
        "add rule {t} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
    );
    let _ = writeln!(
        out,
        "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    let _ = writeln!(out, "flush set {t} nodeport-ips");
    let _ = writeln!(out, "add element {t} nodeport-ips {{ {} }}", node.addr);
    let _ = writeln!(
        out,
        "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    let _ = writeln!(out, "flush chain {t} reject-chain");
    let _ = writeln!(out, "add rule {t} reject-chain reject");
    let _ = writeln!(
        out,
        "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    let _ = writeln!(
        out,
        "add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
    );
    let _ = writeln!(
        out,
        "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(
        out,
        "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        out,
        "add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    );
    let _ = writeln!(out, "flush set {t} cluster-ips");
    for map in [
        "service-ips",
        "firewall-ips",
        "no-endpoint-services",
        "no-endpoint-nodeports",
        "service-nodeports",
    ] {
        let _ = writeln!(out, "flush map {t} {map}");
    }
    for i in rule_order(svcs.len()) {
        write_service(&mut out, &svcs[i], true);
    }
    out
}

/// kube-proxy's partial sync after the services `changed` (indices into
/// `svcs`, already holding their new endpoints) changed: their chains
/// re-created and refilled; their map elements exist with the same values,
/// so none are written.
pub fn partial_text(svcs: &[BenchService], changed: &[usize]) -> String {
    let mut out = String::new();
    for i in rule_order(svcs.len()).filter(|i| changed.contains(i)) {
        write_service(&mut out, &svcs[i], false);
    }
    out
}

/// One service's chains (add + flush), map elements (`elements`), rules.
fn write_service(out: &mut String, svc: &BenchService, elements: bool) {
    if svc.endpoints.is_empty() {
        // Not generated by the bench; kube-proxy would add a
        // no-endpoint-services element instead.
        return;
    }
    let t = TABLE;
    let proto = svc.protocol.lower();
    let svc_chain = service_chain(svc);
    let ext_chain = external_chain(svc);
    let ep_chains: Vec<String> = svc
        .endpoints
        .iter()
        .map(|&e| endpoint_chain(svc, e))
        .collect();
    for c in ep_chains.iter().chain([&svc_chain, &ext_chain]) {
        let _ = writeln!(out, "add chain {t} {c}");
        let _ = writeln!(out, "flush chain {t} {c}");
    }
    if elements {
        let _ = writeln!(out, "add element {t} cluster-ips {{ {} }}", svc.cluster_ip);
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} . {proto} . {} : goto {svc_chain} }}",
            svc.cluster_ip, svc.port
        );
        let _ = writeln!(
            out,
            "add element {t} service-nodeports {{ {proto} . {} : goto {ext_chain} }}",
            svc.node_port
        );
    }
    let _ = writeln!(
        out,
        "add rule {t} {svc_chain} ip daddr {} {proto} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        svc.cluster_ip, svc.port
    );
    let _ = writeln!(out, "add rule {t} {ext_chain} jump mark-for-masquerade");
    let _ = writeln!(out, "add rule {t} {ext_chain} goto {svc_chain}");
    let _ = write!(
        out,
        "add rule {t} {svc_chain} numgen random mod {} vmap {{",
        ep_chains.len()
    );
    for (k, c) in ep_chains.iter().enumerate() {
        let sep = if k + 1 < ep_chains.len() { " ," } else { "" };
        let _ = write!(out, " {k} : goto {c}{sep}");
    }
    out.push_str(" }\n");
    for (&ep, c) in svc.endpoints.iter().zip(&ep_chains) {
        let _ = writeln!(
            out,
            "add rule {t} {c} ip saddr {ep} jump mark-for-masquerade"
        );
        let _ = writeln!(
            out,
            "add rule {t} {c} meta l4proto {proto} dnat to {ep}:{}",
            svc.target_port
        );
    }
}

/// Counts of (`add rule`, `add element`, `add chain`) commands in a
/// transaction.
pub fn counts(text: &str) -> (usize, usize, usize) {
    let mut c = (0, 0, 0);
    for l in text.lines() {
        if l.starts_with("add rule ") {
            c.0 += 1;
        } else if l.starts_with("add element ") {
            c.1 += 1;
        } else if l.starts_with("add chain ") {
            c.2 += 1;
        }
    }
    c
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
    fn chain_names_look_like_kube_proxys() {
        let svcs = services(1, 1, ep, Protocol::Tcp);
        let s = service_chain(&svcs[0]);
        let (hash, rest) = s.strip_prefix("service-").unwrap().split_once('-').unwrap();
        assert_eq!(hash.len(), 8);
        assert_eq!(rest, "bench/svc-00000/tcp/http");
        assert_eq!(
            external_chain(&svcs[0])["external-".len()..],
            s["service-".len()..]
        );
        let e = endpoint_chain(&svcs[0], ep(0, 0));
        assert!(
            e.ends_with("-bench/svc-00000/tcp/http__198.18.16.10/8080"),
            "{e}"
        );
    }

    #[test]
    fn vmap_has_one_entry_per_endpoint() {
        let svcs = services(2, 3, ep, Protocol::Tcp);
        let text = full_text(&svcs, &node());
        let s = &svcs[0];
        let chains: Vec<String> = s.endpoints.iter().map(|&e| endpoint_chain(s, e)).collect();
        let want = format!(
            "add rule ip kube-proxy {} numgen random mod 3 vmap {{ 0 : goto {} , 1 : goto {} , 2 : goto {} }}",
            service_chain(s),
            chains[0],
            chains[1],
            chains[2]
        );
        assert!(text.lines().any(|l| l == want), "no {want:?} in\n{text}");
        let vmaps: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("numgen random"))
            .collect();
        assert_eq!(vmaps.len(), 2);
        for v in vmaps {
            assert_eq!(v.matches(": goto endpoint-").count(), 3);
        }
        assert!(text.contains(&format!(
            "add element ip kube-proxy service-nodeports {{ tcp . 30000 : goto {} }}",
            external_chain(s)
        )));
        assert!(text.contains(&format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.10 . tcp . 80 : goto {} }}",
            service_chain(s)
        )));
        assert!(text.contains(&format!(
            "add rule ip kube-proxy {} meta l4proto tcp dnat to 198.18.16.10:8080",
            chains[0]
        )));
        assert!(text.contains("add element ip kube-proxy nodeport-ips { 198.18.0.1 }"));
        // svcs[0] is written last.
        assert!(text.find("svc-00001").unwrap() < text.find("svc-00000").unwrap());
        let (rules, elements, _) = counts(&text);
        assert_eq!(elements, 1 + 2 * 3);
        assert!(rules > 2 * (3 + 1 + 2 * 3));
    }

    #[test]
    fn partial_sync_rewrites_only_the_changed_service() {
        let mut svcs = services(3, 3, ep, Protocol::Udp);
        svcs[1].endpoints.push(Ipv4Addr::new(198, 18, 30, 1));
        let text = partial_text(&svcs, &[1]);
        assert!(!text.contains("svc-00000") && !text.contains("svc-00002"));
        assert!(text.contains("numgen random mod 4 vmap"));
        assert!(text.contains("meta l4proto udp dnat to 198.18.30.1:8080"));
        let (rules, elements, chains) = counts(&text);
        assert_eq!((elements, chains), (0, 4 + 2));
        assert_eq!(rules, 1 + 2 + 1 + 4 * 2);
    }
}
