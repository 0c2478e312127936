//! Round-robin and least-connection, and the exact open-flow counts they
//! read: a flow counted down once whatever ends it, a re-balanced flow
//! moving its count, a flow whose conntrack entry the LRU evicted.

use std::time::Duration;

use lb_common::{FLOW_CLOSED, LC_SCAN_MAX, OpenFlowV4, token_backend};
use lb_userspace::{
    gc::{Tables, Timeouts, monotonic_ns},
    loader::FlowCloser,
};

use super::*;

fn fwd_key(sport: u16, dport: u16) -> CtKeyV4 {
    flow::key(
        (CLIENT, sport.to_be()),
        (NODE, dport.to_be()),
        IPPROTO_TCP,
        CT_DIR_FORWARD,
    )
}

#[test]
fn round_robin_takes_the_backends_in_turn() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let mut got = Vec::new();
    for (turn, port) in (42_000..42_007u16).enumerate() {
        let (verdict, out) = g.xdp(&tcp((CLIENT, port), (NODE, 30300), true, b""));
        assert_eq!(verdict, XDP_PASS);
        let be = dnat_target(&out);
        got.push(be[3]);
        let ct = g.ct(&fwd_key(port, 30300)).expect("pinned");
        assert_eq!(ct.reason, REASON_ROUND_ROBIN);
        assert_eq!(ct.choice, turn as u32, "the turn is recorded");
        // The host reference agrees turn by turn.
        let key = FrontendKeyV4 {
            addr: NODE,
            port_be: 30300u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        let (_, want) = g
            .memory
            .resolve_policy(&key, 0, turn as u64, |_| 0)
            .unwrap();
        assert_eq!(want.addr, be);
    }
    // List order is ascending address, whatever the slice's order.
    assert_eq!(got, [11, 12, 13, 11, 12, 13, 11]);
    // Each flow is counted once on its backend.
    assert_eq!(g.open_of([198, 18, 3, 11]), 3);
    assert_eq!(g.open_of([198, 18, 3, 12]), 2);
    assert_eq!(g.open_of([198, 18, 3, 13]), 2);
    assert_eq!(g.stats().flows_opened, 7);
}

#[test]
fn least_connection_takes_the_backend_with_the_fewest_open_flows() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let a = [198, 18, 4, 11];
    let b = [198, 18, 4, 12];
    let c = [198, 18, 4, 13];
    // The counter map says: a 5, b 2, c 7.
    g.set_open(a, 5);
    g.set_open(b, 2);
    g.set_open(c, 7);
    let (_, out) = g.xdp(&tcp((CLIENT, 43_000), (NODE, 30301), true, b""));
    assert_eq!(dnat_target(&out), b);
    let ct = g.ct(&fwd_key(43_000, 30301)).unwrap();
    assert_eq!(ct.reason, REASON_LEAST_CONN);
    assert_eq!(ct.choice, 2, "the count seen when choosing");
    assert_eq!(g.open_of(b), 3, "counted from the moment it is pinned");

    // All equal: the tie goes to Maglev's pick, as the host reference says.
    for x in [a, b, c] {
        g.set_open(x, 4);
    }
    let key = FrontendKeyV4 {
        addr: NODE,
        port_be: 30301u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    for port in 43_001..43_011u16 {
        for x in [a, b, c] {
            g.set_open(x, 4);
        }
        let h = flow_hash_v4(CLIENT, NODE, port.to_be(), 30301u16.to_be(), IPPROTO_TCP);
        let maglev = g.memory.resolve(&key, h).unwrap().addr;
        let (_, want) = g.memory.resolve_policy(&key, h, 0, |_| 4).unwrap();
        assert_eq!(want.addr, maglev);
        let (_, out) = g.xdp(&tcp((CLIENT, port), (NODE, 30301), true, b""));
        assert_eq!(dnat_target(&out), maglev, "tie → Maglev's pick");
        assert_eq!(g.ct(&fwd_key(port, 30301)).unwrap().choice, 4);
    }
}

#[test]
fn least_connection_over_a_large_service_takes_the_less_loaded_of_two_table_picks() {
    if !privileged() {
        return;
    }
    // More backends than the datapath scans: it compares the backend of the
    // flow's Maglev slot with that of a second, rehashed slot.
    let n = LC_SCAN_MAX as usize + 6;
    let addr = |i: usize| [198, 18, 5, 10 + i as u8];
    let eps: String = (0..n)
        .map(|i| {
            let [a, b, c, d] = addr(i);
            format!(
                "  - {{addresses: [\"{a}.{b}.{c}.{d}\"], conditions: {{ready: true}}, nodeName: node-a}}\n"
            )
        })
        .collect();
    let three = "  - {addresses: [\"198.18.4.11\"], conditions: {ready: true}, nodeName: node-a}\n  - {addresses: [\"198.18.4.12\"], conditions: {ready: true}, nodeName: node-a}\n  - {addresses: [\"198.18.4.13\"], conditions: {ready: true}, nodeName: node-a}\n";
    let text = manifest(&PODS);
    assert!(text.contains(three), "the lc service's endpoints");
    let mut g = Golden::new(&PODS);
    g.set_manifest(&text.replace(three, &eps));
    let key = FrontendKeyV4 {
        addr: NODE,
        port_be: 30301u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    let mut second_won = 0;
    for port in 45_000..45_040u16 {
        // Loads that differ between most pairs of backends.
        for i in 0..n {
            g.set_open(addr(i), ((i * 7 + port as usize) % 13) as u64);
        }
        let open = |id: u32| {
            let a = g.memory.backends[&id].addr;
            g.open_of(a)
        };
        let h = flow_hash_v4(CLIENT, NODE, port.to_be(), 30301u16.to_be(), IPPROTO_TCP);
        let maglev = g.memory.resolve(&key, h).unwrap().addr;
        let (want_id, want) = g.memory.resolve_policy(&key, h, 0, open).unwrap();
        let want_n = open(want_id);
        second_won += usize::from(want.addr != maglev);
        let (verdict, out) = g.xdp(&tcp((CLIENT, port), (NODE, 30301), true, b""));
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(dnat_target(&out), want.addr, "port {port}");
        let ct = g.ct(&fwd_key(port, 30301)).unwrap();
        assert_eq!(ct.reason, REASON_LEAST_CONN);
        assert_eq!(u64::from(ct.choice), want_n, "the count seen when choosing");
    }
    assert!(
        second_won > 0,
        "the second pick never won: the case is not exercised"
    );
}

#[test]
fn a_fin_from_each_side_or_a_rst_counts_a_flow_down_exactly_once() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let open_total = |g: &Golden| -> u64 {
        PODS.iter()
            .map(|p| g.open_of(p.parse::<Ipv4Addr>().unwrap().octets()))
            .sum()
    };

    // FIN from the client, then from the pod.
    g.xdp(&tcp((CLIENT, 44_000), (NODE, 30090), true, b""));
    let be = g.expected_backend(44_000, 30090, IPPROTO_TCP);
    assert_eq!(g.open_of(be.0), 1);
    assert_eq!(g.ct(&fwd_key(44_000, 30090)).unwrap().reason, REASON_MAGLEV);
    g.xdp(&tcp_end((CLIENT, 44_000), (NODE, 30090), false));
    assert_eq!(g.open_of(be.0), 1, "half-closed is still open");
    let (v, _) = g.tc(&tcp_end(be, (CLIENT, 44_000), false));
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(g.open_of(be.0), 0, "FIN both ways: counted down");
    // Retransmitted FINs and the last ACK change nothing.
    g.xdp(&tcp_end((CLIENT, 44_000), (NODE, 30090), false));
    g.tc(&tcp_end(be, (CLIENT, 44_000), false));
    g.xdp(&tcp((CLIENT, 44_000), (NODE, 30090), false, b""));
    assert_eq!(g.open_of(be.0), 0);

    // FIN from the pod first, then from the client.
    g.xdp(&tcp((CLIENT, 44_001), (NODE, 30090), true, b""));
    let be1 = g.expected_backend(44_001, 30090, IPPROTO_TCP);
    assert_eq!(open_total(&g), 1);
    g.tc(&tcp_end(be1, (CLIENT, 44_001), false));
    assert_eq!(open_total(&g), 1);
    g.xdp(&tcp_end((CLIENT, 44_001), (NODE, 30090), false));
    assert_eq!(open_total(&g), 0);

    // RST from the pod, then a RST from the client too: once.
    g.xdp(&tcp((CLIENT, 44_002), (NODE, 30090), true, b""));
    let be2 = g.expected_backend(44_002, 30090, IPPROTO_TCP);
    assert_eq!(open_total(&g), 1);
    g.tc(&tcp_end(be2, (CLIENT, 44_002), true));
    assert_eq!(open_total(&g), 0);
    g.xdp(&tcp_end((CLIENT, 44_002), (NODE, 30090), true));
    assert_eq!(open_total(&g), 0);

    // RST from the client.
    g.xdp(&tcp((CLIENT, 44_003), (NODE, 30090), true, b""));
    assert_eq!(open_total(&g), 1);
    g.xdp(&tcp_end((CLIENT, 44_003), (NODE, 30090), true));
    assert_eq!(open_total(&g), 0);

    // The agent's collector ends a flow (idle timeout) through lb_flow_end:
    // once, and never after the datapath did.
    g.xdp(&tcp((CLIENT, 44_004), (NODE, 30090), true, b""));
    assert_eq!(open_total(&g), 1);
    let token = |g: &Golden, sport| g.ct(&fwd_key(sport, 30090)).unwrap().token;
    let t4 = token(&g, 44_004);
    assert!(close_with(&mut g.dp.ebpf, &fwd_key(44_004, 30090), t4).unwrap());
    assert_eq!(open_total(&g), 0);
    assert!(!close_with(&mut g.dp.ebpf, &fwd_key(44_004, 30090), t4).unwrap());
    let t0 = token(&g, 44_000);
    assert!(!close_with(&mut g.dp.ebpf, &fwd_key(44_000, 30090), t0).unwrap());
    assert_eq!(open_total(&g), 0);

    let s = g.stats();
    assert_eq!(s.flows_opened, 5);
    assert_eq!(
        s.flows_closed, 4,
        "four closed by the datapath, one by the agent"
    );
    assert_eq!(s.flows_untracked, 0);
}

#[test]
fn a_rebalanced_flow_moves_its_count() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    g.xdp(&tcp((CLIENT, 45_000), (NODE, 30090), true, b""));
    let be = g.expected_backend(45_000, 30090, IPPROTO_TCP);
    let old_id = g.backend_id(be.0);
    assert_eq!(g.open_of(be.0), 1);
    let gone = Ipv4Addr::from(be.0).to_string();
    let rest: Vec<&str> = PODS.iter().copied().filter(|p| *p != gone).collect();
    g.set_endpoints(&rest);
    let (_, out) = g.xdp(&tcp((CLIENT, 45_000), (NODE, 30090), false, b"x"));
    let now = dnat_target(&out);
    assert_ne!(now, be.0);
    assert_eq!(
        g.open_flows().get(&old_id, 0).unwrap(),
        0,
        "moved off the removed backend"
    );
    assert_eq!(g.open_of(now), 1);
    assert_eq!(
        g.ct(&fwd_key(45_000, 30090)).unwrap().reason,
        REASON_REBALANCED
    );
}

/// The collector of `g`'s pinned maps, counting through `lb_flow_end`.
fn collector(g: &Golden) -> Tables {
    let closer = FlowCloser::open(&LoadOptions {
        bpffs_root: g.site.pins().to_owned(),
        ct_capacity: 4096,
    })
    .expect("load lb_flow_end");
    Tables::open(&g.pins(), Some(closer)).expect("open tables")
}

fn registry(g: &Golden) -> Vec<(CtKeyV4, OpenFlowV4)> {
    let m: HashMap<_, CtKeyV4, OpenFlowV4> = pinned::hash(&g.pins(), pin::OPEN_FLOWS_V4).unwrap();
    m.iter().map(|r| r.unwrap()).collect()
}

#[test]
fn a_new_flow_is_counted_once_and_closed_once_and_an_eviction_cannot_leak_its_count() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let t = Timeouts {
        udp_idle: Duration::from_secs(60),
        tcp_idle: Duration::from_secs(7200),
        tcp_closed_grace: Duration::from_secs(10),
        tcp_syn: Duration::from_secs(60),
    };
    let later = |s: u64| monotonic_ns() + s * 1_000_000_000;
    let key = fwd_key(48_000, 30090);

    // A new flow: its token in conntrack (both entries) and in the registry,
    // counted once on its backend; a retransmitted SYN changes nothing.
    g.xdp(&tcp((CLIENT, 48_000), (NODE, 30090), true, b""));
    g.xdp(&tcp((CLIENT, 48_000), (NODE, 30090), true, b""));
    let be = g.expected_backend(48_000, 30090, IPPROTO_TCP);
    let t1 = g.ct(&key).unwrap().token;
    assert_eq!(token_backend(t1), g.backend_id(be.0));
    let reply = flow::partner_key(&key, &g.ct(&key).unwrap());
    assert_eq!(
        g.ct(&reply).unwrap().token,
        t1,
        "the reply entry has it too"
    );
    assert_eq!(registry(&g).len(), 1);
    assert_eq!(registry(&g)[0].1.open, t1);
    assert_eq!(g.open_of(be.0), 1);
    assert_eq!(g.stats().flows_opened, 1);

    // The LRU evicts the forward entry; the next packet pins the flow again
    // (same backend, new token) while the registry still holds the old
    // token: neither lost nor counted twice.
    g.conntrack().remove(&key).unwrap();
    g.xdp(&tcp((CLIENT, 48_000), (NODE, 30090), false, b"x"));
    let t2 = g.ct(&key).unwrap().token;
    assert_ne!(t2, t1);
    assert_eq!(g.open_of(be.0), 1);
    assert_eq!(g.stats().flows_untracked, 1);
    assert_eq!(registry(&g)[0].1.open, t1);

    // The collector moves the count to the live flow's token: the old one
    // counted down, the new one counted, in place.
    let mut c = collector(&g);
    let pass = c.collect(later(11), &t);
    assert_eq!((pass.flows_closed, pass.flows_counted), (1, 1));
    assert_eq!(g.open_of(be.0), 1);
    assert_eq!(registry(&g).len(), 1);
    assert_eq!(registry(&g)[0].1.open, t2);

    // FIN both ways ends it once; the collector's close and a late RST
    // change nothing after that.
    g.xdp(&tcp_end((CLIENT, 48_000), (NODE, 30090), false));
    g.tc(&tcp_end(be, (CLIENT, 48_000), false));
    assert_eq!(g.open_of(be.0), 0);
    assert!(!close_with(&mut g.dp.ebpf, &key, t2).unwrap());
    assert!(!close_with(&mut g.dp.ebpf, &key, t1).unwrap());
    g.xdp(&tcp_end((CLIENT, 48_000), (NODE, 30090), true));
    assert_eq!(g.open_of(be.0), 0);
    assert_eq!(
        registry(&g)[0].1.open,
        FLOW_CLOSED,
        "closed, kept for reuse"
    );

    // A second flow whose conntrack entries are both evicted and that never
    // sends again: the collector counts it down after the grace.
    let key2 = fwd_key(48_001, 30090);
    g.xdp(&tcp((CLIENT, 48_001), (NODE, 30090), true, b""));
    let be2 = g.expected_backend(48_001, 30090, IPPROTO_TCP);
    let open2 = g.open_of(be2.0);
    let reply2 = flow::partner_key(&key2, &g.ct(&key2).unwrap());
    g.conntrack().remove(&key2).unwrap();
    g.conntrack().remove(&reply2).unwrap();
    let early = c.collect(monotonic_ns(), &t);
    assert_eq!(early.flows_closed, 0, "within the grace");
    assert_eq!(early.entries_retired, 1, "the first flow's closed entry");
    assert_eq!(g.open_of(be2.0), open2);
    let pass = c.collect(later(11), &t);
    assert_eq!(pass.flows_closed, 1, "the evicted flow");
    assert_eq!(g.open_of(be2.0), open2 - 1);
    assert_eq!(g.open_of(be.0), 0);

    // The next pass deletes the second flow's closed entry: nothing is left.
    let last = c.collect(later(12), &t);
    assert_eq!(last.entries_retired, 1);
    assert!(registry(&g).is_empty());
    for p in PODS {
        assert_eq!(g.open_of(p.parse::<Ipv4Addr>().unwrap().octets()), 0);
    }
    let s = g.stats();
    assert_eq!((s.flows_opened, s.flows_closed), (2, 1));
}
