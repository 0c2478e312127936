//! kube-proxy's rules load into the kernel in both modes: install 3 services
//! × 3 endpoints, check what `iptables-save` / `nft list` show, add an
//! endpoint as a partial sync, check again, flush. Needs root (`cargo xtask
//! test` runs it as a kernel test).

use std::{net::Ipv4Addr, process::Command};

use lb_bench::kubeproxy::{
    self, BenchService, Mode, NodeInfo, Protocol, iptables as ipt, nftables as nft, services,
};
use lb_testkit::lab::netns::{Netns, PREFIX};

use lb_testkit::guard::can_run_as_root as root_or_skip;

fn output(cmd: &mut Command) -> String {
    lb_testkit::cmd::output(cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        addr: Ipv4Addr::new(198, 18, 0, 1),
    }
}

fn three_services() -> Vec<BenchService> {
    services(
        3,
        3,
        |i, j| Ipv4Addr::new(198, 18, 16 + i as u8, 10 + j as u8),
        Protocol::Tcp,
    )
}

fn netns(role: &str) -> Netns {
    lb_testkit::lab::netns::remove_stale();
    Netns::create(format!("{PREFIX}{}-kp-{role}", std::process::id()))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The rules of `chain` in `iptables-save` output.
fn chain_rules<'a>(save: &'a str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("-A {chain} ");
    save.lines().filter(|l| l.starts_with(&prefix)).collect()
}

#[test]
fn iptables_mode_installs_updates_and_flushes() {
    if !root_or_skip("kube-proxy iptables test") {
        return;
    }
    let ns = netns("ipt");
    let node = node();
    let mut svcs = three_services();
    kubeproxy::install(&ns, Mode::Iptables, &svcs, &node).unwrap_or_else(|e| panic!("{e:#}"));
    let save = output(ns.command("iptables-save").args(["-t", "nat"]));

    // KUBE-SERVICES: three cluster IPs, svc-00000 last, then the NodePort jump.
    let services_chain = chain_rules(&save, "KUBE-SERVICES");
    assert_eq!(services_chain.len(), 4, "{save}");
    assert!(services_chain[2].contains("-d 10.96.0.10/32"), "{save}");
    assert!(services_chain[3].contains("--dst-type LOCAL -j KUBE-NODEPORTS"));
    let nodeports = chain_rules(&save, "KUBE-NODEPORTS");
    assert_eq!(nodeports.len(), 3);
    assert!(
        nodeports[2].contains("--dport 30000 -j KUBE-EXT-"),
        "{save}"
    );

    // The target's service chain: 1/3, 1/2 (as iptables-save prints the
    // stored probabilities), then unconditional.
    let svc = ipt::svc_chain(&svcs[0]);
    let rules = chain_rules(&save, &svc);
    assert_eq!(rules.len(), 4, "masquerade + 3 endpoints:\n{save}");
    assert!(rules[0].contains("! -s 10.244.0.0/16") && rules[0].ends_with("-j KUBE-MARK-MASQ"));
    assert!(
        rules[1].contains("--probability 0.33333333349"),
        "{}",
        rules[1]
    );
    assert!(
        rules[2].contains("--probability 0.50000000000"),
        "{}",
        rules[2]
    );
    assert!(!rules[3].contains("statistic"), "{}", rules[3]);
    let sep = ipt::sep_chain(&svcs[0], svcs[0].endpoints[0]);
    assert!(rules[1].ends_with(&format!("-j {sep}")));
    let sep_rules = chain_rules(&save, &sep);
    assert_eq!(sep_rules.len(), 2);
    assert!(
        sep_rules[0].contains("-s 198.18.16.10/32") && sep_rules[0].ends_with("-j KUBE-MARK-MASQ")
    );
    assert!(sep_rules[1].ends_with("-j DNAT --to-destination 198.18.16.10:8080"));
    assert_eq!(chain_rules(&save, &ipt::ext_chain(&svcs[0])).len(), 2);
    assert!(save.contains("-j MASQUERADE --random-fully"));
    let filter = output(ns.command("iptables-save").args(["-t", "filter"]));
    assert!(
        filter.contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"),
        "{filter}"
    );
    assert!(filter.contains(
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"
    ));

    // One more endpoint for svc-00000: a --noflush partial restore.
    let added = Ipv4Addr::new(198, 18, 30, 1);
    kubeproxy::add_endpoint(&ns, Mode::Iptables, &mut svcs, 0, added, &node)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(svcs[0].endpoints.len(), 4);
    let save = output(ns.command("iptables-save").args(["-t", "nat"]));
    let rules = chain_rules(&save, &svc);
    assert_eq!(rules.len(), 5, "{save}");
    assert!(rules[1].contains("--probability 0.25000000000"));
    assert!(rules[2].contains("--probability 0.33333333349"));
    assert!(rules[3].contains("--probability 0.50000000000"));
    assert!(rules[4].ends_with(&format!("-j {}", ipt::sep_chain(&svcs[0], added))));
    assert_eq!(
        chain_rules(&save, "KUBE-SERVICES").len(),
        4,
        "not duplicated"
    );
    assert_eq!(
        chain_rules(&save, "KUBE-NODEPORTS").len(),
        3,
        "not duplicated"
    );
    assert_eq!(chain_rules(&save, "PREROUTING").len(), 1);
    // The other services' chains survive a partial restore.
    assert_eq!(chain_rules(&save, &ipt::svc_chain(&svcs[1])).len(), 4);
    assert_eq!(save.matches("-j DNAT").count(), 10);

    kubeproxy::flush(&ns, Mode::Iptables).unwrap_or_else(|e| panic!("{e:#}"));
    let save = output(&mut ns.command("iptables-save"));
    assert!(!save.contains("KUBE-"), "{save}");
}

#[test]
fn nftables_mode_installs_updates_and_flushes() {
    if !root_or_skip("kube-proxy nftables test") {
        return;
    }
    let ns = netns("nft");
    let node = node();
    let mut svcs = three_services();
    kubeproxy::install(&ns, Mode::Nftables, &svcs, &node).unwrap_or_else(|e| panic!("{e:#}"));
    let list = || {
        output(
            ns.command("nft")
                .args(["list", "table", "ip", "kube-proxy"]),
        )
    };
    let table = list();
    for svc in &svcs {
        let chain = nft::service_chain(svc);
        let external = nft::external_chain(svc);
        assert!(table.contains(&format!("chain {chain} {{")), "{table}");
        assert!(table.contains(&format!("chain {external} {{")));
        assert!(
            table.contains(&format!("{} . tcp . 80 : goto {chain}", svc.cluster_ip)),
            "{table}"
        );
        assert!(table.contains(&format!("tcp . {} : goto {external}", svc.node_port)));
        for &ep in &svc.endpoints {
            assert!(table.contains(&format!("chain {} {{", nft::endpoint_chain(svc, ep))));
            assert!(table.contains(&format!("dnat to {ep}:8080")));
        }
    }
    assert_eq!(
        table.matches("numgen random mod 3 vmap").count(),
        3,
        "{table}"
    );
    assert!(table.contains("masquerade fully-random"));
    assert!(table.contains("elements = { 198.18.0.1 }"), "{table}");

    let added = Ipv4Addr::new(198, 18, 30, 1);
    kubeproxy::add_endpoint(&ns, Mode::Nftables, &mut svcs, 0, added, &node)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let table = list();
    assert_eq!(
        table.matches("numgen random mod 3 vmap").count(),
        2,
        "{table}"
    );
    assert_eq!(table.matches("numgen random mod 4 vmap").count(), 1);
    assert!(table.contains(&format!(
        "chain {} {{",
        nft::endpoint_chain(&svcs[0], added)
    )));
    assert!(table.contains("dnat to 198.18.30.1:8080"));
    // Rules were replaced, not appended.
    assert_eq!(table.matches("dnat to 198.18.16.10:8080").count(), 1);
    assert_eq!(table.matches(" : goto endpoint-").count(), 10);

    kubeproxy::flush(&ns, Mode::Nftables).unwrap_or_else(|e| panic!("{e:#}"));
    let tables = output(ns.command("nft").args(["list", "tables"]));
    assert!(!tables.contains("kube-proxy"), "{tables}");
}

#[test]
fn manifests_are_accepted_by_the_agents_loader() {
    // No root needed: the agent's own manifest loader and translation.
    let mut svcs = three_services();
    svcs[1].endpoints = (0..130).map(|j| Ipv4Addr::from(0xc612_2000 + j)).collect();
    let node = node();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.json");
    kubeproxy::write_manifests(&path, &svcs, &node).unwrap();
    let objects = lb_userspace::source::manifests::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(objects.services.len(), 3);
    assert_eq!(objects.slices.len(), 4, "130 endpoints → 2 slices");
    let ctx = lb_userspace::translate::NodeContext {
        node_name: node.name.clone(),
        node_addrs: vec![node.addr],
    };
    let tr = lb_userspace::translate::translate(&objects, &ctx).unwrap_or_else(|e| panic!("{e}"));
    assert!(tr.warnings.is_empty(), "{:?}", tr.warnings);
    assert_eq!(tr.desired.services.len(), 3);
    let backends: Vec<usize> = tr
        .desired
        .services
        .values()
        .map(|s| s.backends.len())
        .collect();
    assert_eq!(backends, [3, 130, 3]);
    for s in tr.desired.services.values() {
        assert!(!s.frontends.is_empty());
    }
}
