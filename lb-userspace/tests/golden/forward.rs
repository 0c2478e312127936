//! Backends on another node: DNAT + SNAT and `XDP_TX` through a FIB that
//! resolves the next hop, the reply translated back, SNAT port exhaustion.

use super::*;

const NODE_B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];

/// The packet as it must leave node A: new MACs and addresses, TTL 63.
fn tcp_out(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0, dst.0, 63)
        .tcp(src.1, dst.1, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

#[test]
fn remote_backend_gets_dnat_snat_and_xdp_tx_and_the_reply_is_translated_back() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let s0 = g.stats();
    let syn = tcp((CLIENT, 40_500), (NODE, 30200), true, b"");
    let (syn_out, reply_out, node_mac) = in_fib_netns(|ifindex, node_mac| {
        let syn_out = g.xdp_on(&syn, ifindex);
        // The port the datapath reserved is in the first 4 of the range.
        let port = u16::from_be_bytes([syn_out.1[34], syn_out.1[35]]);
        assert!((SNAT_LO..SNAT_LO + 4).contains(&port), "SNAT port {port}");
        let reply = tcp((POD_B, 8080), (NODE, port), false, b"pod-b1\n");
        let reply_out = g.xdp_on(&reply, ifindex);
        (syn_out, reply_out, node_mac)
    });
    // Forward: DNAT to the pod on node B, SNAT to this node, TTL 63, MACs
    // from the FIB, back out of the same interface.
    assert_eq!(syn_out.0, XDP_TX);
    let port = u16::from_be_bytes([syn_out.1[34], syn_out.1[35]]);
    assert_eq!(
        syn_out.1,
        tcp_out(
            (node_mac, NODE_B_MAC),
            (NODE, port),
            (POD_B, 8080),
            true,
            b""
        ),
        "DNAT+SNAT'd SYN differs from the golden packet (bytes or checksums)"
    );
    // Reply: source back to the frontend, destination back to the client.
    assert_eq!(reply_out.0, XDP_TX);
    assert_eq!(
        reply_out.1,
        tcp_out(
            (node_mac, MAC_A),
            (NODE, 30200),
            (CLIENT, 40_500),
            false,
            b"pod-b1\n"
        ),
        "reverse-SNAT'd reply differs from the golden packet"
    );
    let s = g.stats();
    assert_eq!(s.forwarded - s0.forwarded, 1);
    assert_eq!(s.reverse_snat - s0.reverse_snat, 1);
    // The mapping is in LB_NAT_V4, and the flow's conntrack entry says SNAT.
    let fwd = g
        .ct(&flow::key(
            (CLIENT, 40_500u16.to_be()),
            (NODE, 30200u16.to_be()),
            IPPROTO_TCP,
            CT_DIR_FORWARD,
        ))
        .unwrap();
    assert_eq!(fwd.flags, lb_common::CT_F_SNAT);
    assert_eq!(
        (fwd.snat_addr, u16::from_be(fwd.snat_port_be)),
        (NODE, port)
    );
}

#[test]
fn snat_port_exhaustion_drops_and_counts_then_udp_is_forwarded_on_a_free_port() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let s0 = g.stats();
    let (verdicts, udp) = in_fib_netns(|ifindex, _| {
        // Four ports in the range: four flows get one, the others are dropped
        // (the 16 tries from the flow hash cover all four ports).
        let verdicts: Vec<u32> = (0..6u16)
            .map(|i| {
                g.xdp_on(
                    &tcp((CLIENT, 41_000 + i), (NODE, 30200), true, b""),
                    ifindex,
                )
                .0
            })
            .collect();
        // UDP uses its own mappings (the protocol is part of the key).
        let udp = g.xdp_on(&udp((CLIENT, 5000), (NODE, 30200), b"q"), ifindex);
        (verdicts, udp)
    });
    assert_eq!(
        verdicts.iter().filter(|&&v| v == XDP_TX).count(),
        4,
        "{verdicts:?}"
    );
    assert_eq!(
        verdicts.iter().filter(|&&v| v == XDP_DROP).count(),
        2,
        "{verdicts:?}"
    );
    assert_eq!(g.stats().snat_exhausted - s0.snat_exhausted, 2);
    assert_eq!(udp.0, XDP_TX, "UDP to the same backend still finds a port");
    let out = etherparse::SlicedPacket::from_ethernet(&udp.1).unwrap();
    let Some(etherparse::TransportSlice::Udp(u)) = out.transport else {
        panic!("not UDP")
    };
    let Some(etherparse::NetSlice::Ipv4(ip)) = out.net else {
        panic!("not IPv4")
    };
    assert_eq!(
        u.checksum(),
        u.to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
            .unwrap(),
        "UDP checksum after DNAT+SNAT"
    );
}
