//! DNAT of NodePort traffic: a new TCP flow to its Maglev backend, UDP
//! (a zero checksum stays zero), what is not a service passes untouched,
//! the reply's source back to the frontend, a flow re-balanced when its
//! backend goes.

use super::*;

#[test]
fn tcp_syn_is_dnated_to_the_maglev_backend_with_valid_checksums() {
    for at in [IngressHook::Xdp, IngressHook::Tc] {
        tcp_syn_is_dnated_to_the_maglev_backend_with_valid_checksums_at(at);
    }
}

fn tcp_syn_is_dnated_to_the_maglev_backend_with_valid_checksums_at(at: IngressHook) {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let before = g.stats();
    let input = tcp((CLIENT, 40_000), (NODE, 30090), true, b"");
    let (verdict, out) = g.ingress(at, &input);
    assert_eq!(verdict, XDP_PASS);
    let be = g.expected_backend(40_000, 30090, IPPROTO_TCP);
    assert_eq!(be.1, 8080);
    assert_eq!(
        out,
        tcp((CLIENT, 40_000), be, true, b""),
        "DNAT'd SYN differs from the golden packet"
    );

    // Both conntrack entries are there, with the reason.
    let fwd = g
        .ct(&flow::key(
            (CLIENT, 40_000u16.to_be()),
            (NODE, 30090u16.to_be()),
            IPPROTO_TCP,
            CT_DIR_FORWARD,
        ))
        .expect("forward conntrack entry");
    assert_eq!(fwd.reason, REASON_MAGLEV);
    assert_eq!((fwd.nat_addr, u16::from_be(fwd.nat_port_be)), be);
    let rev = g
        .ct(&flow::key(
            (be.0, be.1.to_be()),
            (CLIENT, 40_000u16.to_be()),
            IPPROTO_TCP,
            CT_DIR_REPLY,
        ))
        .expect("reply conntrack entry");
    assert_eq!((rev.nat_addr, u16::from_be(rev.nat_port_be)), (NODE, 30090));
    let after = g.stats();
    assert_eq!(after.new_flows - before.new_flows, 1);

    // The next packet of the flow is an established hit, same backend.
    let data = tcp(
        (CLIENT, 40_000),
        (NODE, 30090),
        false,
        b"GET / HTTP/1.1\r\n\r\n",
    );
    let (verdict, out) = g.ingress(at, &data);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        tcp((CLIENT, 40_000), be, false, b"GET / HTTP/1.1\r\n\r\n")
    );
    assert_eq!(g.stats().established - after.established, 1);
}

#[test]
fn udp_is_dnated_and_a_zero_checksum_stays_zero() {
    for at in [IngressHook::Xdp, IngressHook::Tc] {
        udp_is_dnated_and_a_zero_checksum_stays_zero_at(at);
    }
}

fn udp_is_dnated_and_a_zero_checksum_stays_zero_at(at: IngressHook) {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let input = udp((CLIENT, 5353), (NODE, 30090), b"hello");
    let (verdict, out) = g.ingress(at, &input);
    assert_eq!(verdict, XDP_PASS);
    let be = g.expected_backend(5353, 30090, IPPROTO_UDP);
    assert_eq!(be.1, 8053);
    assert_eq!(out, udp((CLIENT, 5353), be, b"hello"));

    // Same flow, checksum 0 ("none"): must stay 0, IPv4 checksum still right.
    let mut zero = udp((CLIENT, 5353), (NODE, 30090), b"again");
    zero[40..42].copy_from_slice(&[0, 0]);
    let (verdict, out) = g.ingress(at, &zero);
    assert_eq!(verdict, XDP_PASS);
    let mut expect = udp((CLIENT, 5353), be, b"again");
    expect[40..42].copy_from_slice(&[0, 0]);
    assert_eq!(out, expect);
}

#[test]
fn non_service_and_malformed_packets_pass_untouched_and_are_counted() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let s0 = g.stats();

    // TCP to a port with no service.
    let other = tcp((CLIENT, 40_001), (NODE, 9000), true, b"");
    assert_eq!(g.xdp(&other), (XDP_PASS, other.clone()));
    // ICMP echo.
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(CLIENT, NODE, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, b"ping")
        .unwrap();
    assert_eq!(g.xdp(&icmp), (XDP_PASS, icmp.clone()));
    // ARP-like non-IPv4 frame.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    assert_eq!(g.xdp(&arp), (XDP_PASS, arp.clone()));
    // Truncated: a service SYN cut inside the TCP header.
    let syn = tcp((CLIENT, 40_002), (NODE, 30090), true, b"");
    let cut = syn[..40].to_vec();
    assert_eq!(g.xdp(&cut), (XDP_PASS, cut.clone()));
    // IPv4 options (IHL 6): a service SYN with 4 bytes of NOP options.
    let mut opts = syn[..34].to_vec();
    opts.extend_from_slice(&[1, 1, 1, 0]);
    opts.extend_from_slice(&syn[34..]);
    opts[14] = 0x46;
    opts[17] += 4; // total length
    assert_eq!(g.xdp(&opts), (XDP_PASS, opts.clone()));
    // Fragment: MF set on a service packet.
    let mut frag = syn.clone();
    frag[20] |= 0x20;
    assert_eq!(g.xdp(&frag), (XDP_PASS, frag.clone()));

    let s = g.stats();
    assert_eq!(s.pass_not_service - s0.pass_not_service, 1);
    assert_eq!(s.pass_other_proto - s0.pass_other_proto, 1);
    assert_eq!(s.pass_not_ipv4 - s0.pass_not_ipv4, 1);
    assert_eq!(s.pass_truncated - s0.pass_truncated, 1);
    assert_eq!(s.pass_ip_options - s0.pass_ip_options, 1);
    assert_eq!(s.pass_fragment - s0.pass_fragment, 1);
    assert_eq!(
        s.new_flows, s0.new_flows,
        "no malformed packet may create a flow"
    );
}

#[test]
fn tc_rewrites_the_reply_source_back_to_the_frontend() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let syn = tcp((CLIENT, 40_003), (NODE, 30090), true, b"");
    assert_eq!(g.xdp(&syn).0, XDP_PASS);
    let be = g.expected_backend(40_003, 30090, IPPROTO_TCP);

    let reply = tcp(be, (CLIENT, 40_003), false, b"HTTP/1.1 200 OK\r\n\r\npod");
    let (verdict, out) = g.tc(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        tcp(
            (NODE, 30090),
            (CLIENT, 40_003),
            false,
            b"HTTP/1.1 200 OK\r\n\r\npod"
        )
    );

    // UDP reply too.
    let q = udp((CLIENT, 5400), (NODE, 30090), b"q");
    assert_eq!(g.xdp(&q).0, XDP_PASS);
    let ube = g.expected_backend(5400, 30090, IPPROTO_UDP);
    let (verdict, out) = g.tc(&udp(ube, (CLIENT, 5400), b"pod-1"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, udp((NODE, 30090), (CLIENT, 5400), b"pod-1"));

    // A packet of no tracked flow continues untouched.
    let stray = tcp(([198, 18, 1, 99], 8080), (CLIENT, 40_003), false, b"x");
    assert_eq!(g.tc(&stray), (TC_ACT_UNSPEC, stray.clone()));
}

#[test]
fn flow_is_rebalanced_when_its_backend_is_removed() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let syn = tcp((CLIENT, 40_004), (NODE, 30090), true, b"");
    g.xdp(&syn);
    let be = g.expected_backend(40_004, 30090, IPPROTO_TCP);
    let gone = Ipv4Addr::from(be.0).to_string();
    let rest: Vec<&str> = PODS.iter().copied().filter(|p| *p != gone).collect();
    g.set_endpoints(&rest);

    let s0 = g.stats();
    let data = tcp((CLIENT, 40_004), (NODE, 30090), false, b"more");
    let (verdict, out) = g.xdp(&data);
    assert_eq!(verdict, XDP_PASS);
    let now = g.expected_backend(40_004, 30090, IPPROTO_TCP);
    assert_ne!(now.0, be.0);
    assert_eq!(out, tcp((CLIENT, 40_004), now, false, b"more"));
    assert_eq!(g.stats().rebalanced - s0.rebalanced, 1);
    let fwd = g
        .ct(&flow::key(
            (CLIENT, 40_004u16.to_be()),
            (NODE, 30090u16.to_be()),
            IPPROTO_TCP,
            CT_DIR_FORWARD,
        ))
        .unwrap();
    assert_eq!(fwd.reason, REASON_REBALANCED);

    // Flows pinned to the surviving backends keep them: add a fourth pod and
    // check an established flow does not move even if Maglev would move it.
    let mut pinned = BTreeSet::new();
    for port in 41_000..41_030u16 {
        g.xdp(&tcp((CLIENT, port), (NODE, 30090), true, b""));
        pinned.insert((port, g.expected_backend(port, 30090, IPPROTO_TCP)));
    }
    let mut four = rest.clone();
    four.push("198.18.1.14");
    g.set_endpoints(&four);
    for (port, be) in pinned {
        let (_, out) = g.xdp(&tcp((CLIENT, port), (NODE, 30090), false, b"x"));
        assert_eq!(
            out,
            tcp((CLIENT, port), be, false, b"x"),
            "flow from port {port} moved"
        );
    }
}

/// Which table maps hold service `sid`'s table (`LB_MAGLEV_S`, `_M`, `_L`).
fn table_maps_of(g: &Golden, sid: u32) -> Vec<&'static str> {
    fn has<V: aya::Pod>(g: &Golden, name: &str, sid: u32) -> bool {
        let m: HashMap<MapData, u32, V> = pinned::hash(&g.pins(), name).unwrap();
        m.keys().any(|k| k.unwrap() == sid)
    }
    let [s, m, l] = pin::MAGLEV;
    let found = [
        has::<lb_common::MaglevTableS>(g, s, sid),
        has::<lb_common::MaglevTableM>(g, m, sid),
        has::<lb_common::MaglevTableL>(g, l, sid),
    ];
    pin::MAGLEV
        .into_iter()
        .zip(found)
        .filter_map(|(n, f)| f.then_some(n))
        .collect()
}

/// SYNs from the client ports `sports` to NodePort 30090: each DNAT'd to
/// the reference's pick; the backends reached.
fn new_flows(g: &mut Golden, sports: std::ops::Range<u16>) -> BTreeSet<[u8; 4]> {
    let mut reached = BTreeSet::new();
    for sport in sports {
        let (verdict, out) = g.xdp(&tcp((CLIENT, sport), (NODE, 30090), true, b""));
        assert_eq!(verdict, XDP_PASS);
        let be = g.expected_backend(sport, 30090, IPPROTO_TCP);
        assert_eq!(out, tcp((CLIENT, sport), be, true, b""));
        reached.insert(be.0);
    }
    reached
}

#[test]
fn a_table_sits_in_the_map_of_its_size_and_moves_when_its_service_grows() {
    if !privileged() {
        return;
    }
    let ips: Vec<String> = (1..=11).map(|i| format!("198.18.7.{i}")).collect();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    // The agent's default: each service's table sized by its backends.
    let mut g = Golden::with_config(PlanConfig::default(), &ips[..10]);
    let key = FrontendKeyV4 {
        addr: NODE,
        port_be: 30090u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    let svc = g.memory.frontends[&key];
    assert_eq!(svc.maglev_size, 1_021, "10 backends: 1,021 slots");
    assert_eq!(table_maps_of(&g, svc.service_id), ["LB_MAGLEV_S"]);

    // New flows go to the reference's pick, and reach every backend.
    assert_eq!(new_flows(&mut g, 20_000..20_300).len(), 10);
    let first = g.expected_backend(20_000, 30090, IPPROTO_TCP);

    // An 11th backend: 4,093 slots, in LB_MAGLEV_M; the small table is gone.
    g.set_endpoints(&ips);
    let svc = g.memory.frontends[&key];
    assert_eq!(svc.maglev_size, 4_093, "11 backends: 4,093 slots");
    assert_eq!(table_maps_of(&g, svc.service_id), ["LB_MAGLEV_M"]);
    assert_eq!(new_flows(&mut g, 30_000..30_400).len(), 11);
    // A flow opened before keeps its backend.
    let data = tcp((CLIENT, 20_000), (NODE, 30090), false, b"x");
    let (verdict, out) = g.xdp(&data);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, tcp((CLIENT, 20_000), first, false, b"x"));

    // Back to 10: back to the small map.
    g.set_endpoints(&ips[..10]);
    let svc = g.memory.frontends[&key];
    assert_eq!(svc.maglev_size, 1_021);
    assert_eq!(table_maps_of(&g, svc.service_id), ["LB_MAGLEV_S"]);
}
