//! ICMP errors about translated flows are translated back, so that Path MTU
//! discovery works through the balancer: the host that sent the quoted
//! packet receives an error quoting the packet as it sent it.

use etherparse::{Icmpv4Type, icmpv4};

use super::*;

const ROUTER: [u8; 4] = [198, 18, 0, 254];

/// An IPv4 TCP segment without Ethernet, as an ICMP error quotes it.
fn quoted_tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1000, 64240)
        .ack(1)
        .write(&mut v, b"a large upload")
        .unwrap();
    v
}

fn icmp_error(src: [u8; 4], dst: [u8; 4], ty: Icmpv4Type, quote: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .icmpv4(ty)
        .write(&mut v, quote)
        .unwrap();
    v
}

fn frag_needed() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: 1400,
    })
}

#[test]
fn fragmentation_needed_for_a_dnated_packet_reaches_the_client_quoting_the_frontend() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    g.xdp(&tcp((CLIENT, 46_500), (NODE, 30090), true, b""));
    let pod = g.expected_backend(46_500, 30090, IPPROTO_TCP);
    let s0 = g.stats();
    // The node's kernel cannot forward the upload over a 1,400-byte hop to
    // the pod and tells the client, quoting the packet after DNAT.
    let error = icmp_error(
        [198, 18, 1, 1],
        CLIENT,
        frag_needed(),
        &quoted_tcp((CLIENT, 46_500), pod),
    );
    let (verdict, out) = g.tc(&error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        icmp_error(
            [198, 18, 1, 1],
            CLIENT,
            frag_needed(),
            &quoted_tcp((CLIENT, 46_500), (NODE, 30090)),
        ),
        "the client sees its own packet quoted, all checksums valid"
    );
    assert_eq!(g.stats().tc_icmp_translated - s0.tc_icmp_translated, 1);

    // An error about a packet of no flow leaves untouched.
    let stray = icmp_error(
        [198, 18, 1, 1],
        CLIENT,
        frag_needed(),
        &quoted_tcp((CLIENT, 46_999), pod),
    );
    assert_eq!(g.tc(&stray), (TC_ACT_UNSPEC, stray.clone()));
}

#[test]
fn an_error_about_a_reply_to_the_client_reaches_the_pod_quoting_its_own_packet() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    g.xdp(&tcp((CLIENT, 46_501), (NODE, 30090), true, b""));
    let pod = g.expected_backend(46_501, 30090, IPPROTO_TCP);
    // A hop on the client's side cannot carry the pod's answer (sent from
    // the frontend after TC's reverse NAT) and tells the frontend.
    let error = icmp_error(
        ROUTER,
        NODE,
        frag_needed(),
        &quoted_tcp((NODE, 30090), (CLIENT, 46_501)),
    );
    let s0 = g.stats();
    let (verdict, out) = g.xdp(&error);
    assert_eq!(
        verdict, XDP_PASS,
        "handed to the kernel, which routes it to the pod"
    );
    assert_eq!(
        out,
        icmp_error(
            ROUTER,
            pod.0,
            frag_needed(),
            &quoted_tcp(pod, (CLIENT, 46_501))
        ),
    );
    let s = g.stats();
    assert_eq!(s.icmp_translated - s0.icmp_translated, 1);
    assert_eq!(s.pass_other_proto, s0.pass_other_proto);
}

#[test]
fn an_error_about_a_forwarded_packet_reaches_the_client_quoting_the_frontend() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let syn = in_fib_netns(|ifindex, _| {
        g.xdp_on(&tcp((CLIENT, 46_600), (NODE, 30200), true, b""), ifindex)
    });
    assert_eq!(syn.0, XDP_TX);
    let port = u16::from_be_bytes([syn.1[34], syn.1[35]]);
    // A router between the nodes drops the forwarded packet (TTL).
    let ttl = Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
    let error = icmp_error(
        ROUTER,
        NODE,
        ttl.clone(),
        &quoted_tcp((NODE, port), (POD_B, 8080)),
    );
    let (verdict, out) = g.xdp(&error);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        icmp_error(
            ROUTER,
            CLIENT,
            ttl,
            &quoted_tcp((CLIENT, 46_600), (NODE, 30200))
        ),
    );

    // Errors about anything else pass untouched, counted as before.
    let s0 = g.stats();
    let other = icmp_error(
        ROUTER,
        NODE,
        frag_needed(),
        &quoted_tcp((NODE, 12_345), (POD_B, 8080)),
    );
    assert_eq!(g.xdp(&other), (XDP_PASS, other.clone()));
    assert_eq!(g.stats().pass_other_proto - s0.pass_other_proto, 1);
}
