//! A service without endpoints: TCP is answered with RST, UDP with ICMP
//! port unreachable, both built by the datapath with valid checksums.

use super::*;

/// Parses an answer built by the datapath and checks both checksums.
fn parse_answer(out: &[u8]) -> etherparse::SlicedPacket<'_> {
    let p = etherparse::SlicedPacket::from_ethernet(out).expect("a well-formed answer");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!("answer is not IPv4");
    };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
    assert_eq!(h.time_to_live, 64);
    p
}

#[test]
fn tcp_to_a_service_without_endpoints_is_answered_with_rst() {
    for at in [IngressHook::Xdp, IngressHook::Tc] {
        tcp_to_a_service_without_endpoints_is_answered_with_rst_at(at);
    }
}

fn tcp_to_a_service_without_endpoints_is_answered_with_rst_at(at: IngressHook) {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let s0 = g.stats();
    let syn = tcp((CLIENT, 40_100), (NODE, 30091), true, b"");
    let (verdict, out) = g.ingress(at, &syn);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), 54);
    let p = parse_answer(&out);
    let eth = p.link.as_ref().unwrap().to_header();
    let Some(etherparse::LinkHeader::Ethernet2(eth)) = eth else {
        panic!("not Ethernet II")
    };
    assert_eq!((eth.source, eth.destination), (MAC_B, MAC_A));
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        unreachable!()
    };
    assert_eq!(ip.header().source(), NODE);
    assert_eq!(ip.header().destination(), CLIENT);
    let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport else {
        panic!("not TCP")
    };
    assert_eq!((t.source_port(), t.destination_port()), (30091, 40_100));
    assert!(t.rst() && t.ack() && !t.syn());
    assert_eq!(
        t.acknowledgment_number(),
        1001,
        "ACKs the SYN (seq 1000 + 1)"
    );
    assert_eq!(t.sequence_number(), 0);
    let th = t.to_header();
    assert_eq!(
        th.checksum,
        th.calc_checksum_ipv4(&ip.header().to_header(), &[])
            .unwrap(),
        "TCP checksum"
    );

    // A segment with ACK gets a bare RST whose sequence is that ACK.
    let data = tcp((CLIENT, 40_101), (NODE, 30091), false, b"hello");
    let (verdict, out) = g.ingress(at, &data);
    assert_eq!(verdict, XDP_TX);
    let p = parse_answer(&out);
    let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport else {
        panic!("not TCP")
    };
    assert!(t.rst() && !t.ack());
    assert_eq!(t.sequence_number(), 1, "seq = the segment's ACK");

    // A RST is never answered.
    let mut rst = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(CLIENT, NODE, 64)
        .tcp(40_102, 30091, 5, 0)
        .rst()
        .write(&mut rst, b"")
        .unwrap();
    assert_eq!(g.ingress(at, &rst).0, XDP_DROP);

    let s = g.stats();
    assert_eq!(s.reject_tcp - s0.reject_tcp, 2);
    assert_eq!(s.new_flows, s0.new_flows);
}

#[test]
fn udp_to_a_service_without_endpoints_gets_icmp_port_unreachable() {
    for at in [IngressHook::Xdp, IngressHook::Tc] {
        udp_to_a_service_without_endpoints_gets_icmp_port_unreachable_at(at);
    }
}

fn udp_to_a_service_without_endpoints_gets_icmp_port_unreachable_at(at: IngressHook) {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let input = udp((CLIENT, 5000), (NODE, 30091), b"is anyone there?");
    let (verdict, out) = g.ingress(at, &input);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), 14 + 20 + 8 + 20 + 8);
    let p = parse_answer(&out);
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        unreachable!()
    };
    assert_eq!(
        ip.header().source(),
        NODE,
        "from the address the client used"
    );
    assert_eq!(ip.header().destination(), CLIENT);
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!("not ICMP")
    };
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 3), "port unreachable");
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload()),
        "ICMP checksum"
    );
    assert_eq!(
        icmp.payload(),
        &input[14..42],
        "quotes the IPv4 header and 8 bytes"
    );
    assert_eq!(g.stats().reject_udp, 1);
}
