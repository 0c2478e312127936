//! Flow state through the churn a cluster sees every day: backend ids
//! reused by a rolling update, one client endpoint reaching a pod through
//! two frontends, handshakes that never complete, and malformed headers.

use std::time::Duration;

use lb_common::{CT_F_PORT_REMAP, CT_TCP_ACK};
use lb_userspace::gc::{Tables, Timeouts, monotonic_ns};

use super::*;

const P1: &str = "198.18.1.11";
const P2: &str = "198.18.1.12";
const P3: &str = "198.18.1.13";
const P4: &str = "198.18.1.14";

fn addr(s: &str) -> [u8; 4] {
    s.parse::<Ipv4Addr>().unwrap().octets()
}

/// The destination of a DNAT'd UDP datagram.
fn udp_target(out: &[u8]) -> ([u8; 4], u16) {
    (
        out[30..34].try_into().unwrap(),
        u16::from_be_bytes([out[36], out[37]]),
    )
}

#[test]
fn a_backend_id_reused_by_a_rolling_update_rebalances_its_old_flows() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&[P1, P2]);
    // Sixteen UDP flows, pinned to pod-1 and pod-2.
    let mut on_p1 = Vec::new();
    for port in 50_000..50_016u16 {
        let (_, out) = g.xdp(&udp((CLIENT, port), (NODE, 30090), b"q"));
        if udp_target(&out).0 == addr(P1) {
            on_p1.push(port);
        }
    }
    assert!(!on_p1.is_empty(), "some flows land on pod-1");
    let p1_udp_id = |g: &Golden, a: &str| {
        *g.memory
            .backends
            .iter()
            .find(|(_, b)| b.addr == addr(a) && u16::from_be(b.port_be) == 8053)
            .unwrap()
            .0
    };
    let old_id = p1_udp_id(&g, P1);
    // A rolling update: pod-3 added, pod-1 removed, pod-4 added.
    g.set_endpoints(&[P1, P2, P3]);
    g.set_endpoints(&[P2, P3]);
    g.set_endpoints(&[P2, P3, P4]);
    assert_eq!(
        p1_udp_id(&g, P4),
        old_id,
        "the planner handed pod-1's freed id to pod-4 (the case under test)"
    );

    let s0 = g.stats();
    for &port in &on_p1 {
        let (verdict, out) = g.xdp(&udp((CLIENT, port), (NODE, 30090), b"again"));
        assert_eq!(verdict, XDP_PASS);
        let to = udp_target(&out);
        assert_ne!(to.0, addr(P1));
        let ct = g.ct(&fwd_key_of(port, 30090, IPPROTO_UDP)).unwrap();
        assert_eq!(
            ct.reason, REASON_REBALANCED,
            "flow from port {port} was rewritten to {to:?} without being re-balanced"
        );
        // The new pod's answer leaves from the frontend, not its own address.
        let reply = udp(to, (CLIENT, port), b"a");
        let (_, back) = g.tc(&reply);
        assert_eq!(
            back,
            udp((NODE, 30090), (CLIENT, port), b"a"),
            "reply of the flow from port {port}"
        );
    }
    assert_eq!(
        g.stats().rebalanced - s0.rebalanced,
        on_p1.len() as u64,
        "every flow of pod-1 was re-balanced once"
    );
}

fn fwd_key_of(sport: u16, dport: u16, proto: u8) -> CtKeyV4 {
    flow::key(
        (CLIENT, sport.to_be()),
        (NODE, dport.to_be()),
        proto,
        CT_DIR_FORWARD,
    )
}

const LB_IP: [u8; 4] = [198, 18, 100, 1];

#[test]
fn one_client_port_through_two_frontends_to_one_pod_keeps_two_reply_translations() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    // `demo/web` has ClientIP affinity: both flows go to one pod, and the
    // pod would see the same 5-tuple twice.
    let (v1, first) = g.xdp(&tcp((CLIENT, 45_000), (NODE, 30100), true, b""));
    let (v2, second) = g.xdp(&tcp((CLIENT, 45_000), (LB_IP, 80), true, b""));
    assert_eq!((v1, v2), (XDP_PASS, XDP_PASS));
    let pod = dnat_target(&first);
    assert_eq!(dnat_target(&second), pod, "affinity: one pod");
    let sport = |p: &[u8]| u16::from_be_bytes([p[34], p[35]]);
    assert_eq!(sport(&first), 45_000, "the first flow keeps its port");
    let remapped = sport(&second);
    assert_ne!(
        remapped, 45_000,
        "the second flow must look different to the pod"
    );
    assert_eq!(
        second,
        tcp((CLIENT, remapped), (pod, 8080), true, b""),
        "second flow: DNAT and the new client port, valid checksums"
    );
    let fwd = g
        .ct(&flow::key(
            (CLIENT, 45_000u16.to_be()),
            (LB_IP, 80u16.to_be()),
            IPPROTO_TCP,
            CT_DIR_FORWARD,
        ))
        .unwrap();
    assert_eq!(fwd.flags & CT_F_PORT_REMAP, CT_F_PORT_REMAP);

    // The pod answers each; each answer leaves from the frontend its flow used.
    let (_, r1) = g.tc(&tcp((pod, 8080), (CLIENT, 45_000), false, b"one"));
    assert_eq!(r1, tcp((NODE, 30100), (CLIENT, 45_000), false, b"one"));
    let (_, r2) = g.tc(&tcp((pod, 8080), (CLIENT, remapped), false, b"two"));
    assert_eq!(r2, tcp((LB_IP, 80), (CLIENT, 45_000), false, b"two"));

    // Later packets of each flow keep their translation.
    let (_, again) = g.xdp(&tcp((CLIENT, 45_000), (LB_IP, 80), false, b"more"));
    assert_eq!(again, tcp((CLIENT, remapped), (pod, 8080), false, b"more"));
    let (_, again) = g.xdp(&tcp((CLIENT, 45_000), (NODE, 30100), false, b"more"));
    assert_eq!(again, tcp((CLIENT, 45_000), (pod, 8080), false, b"more"));
}

fn timeouts() -> Timeouts {
    Timeouts {
        udp_idle: Duration::from_secs(60),
        tcp_idle: Duration::from_secs(7200),
        tcp_closed_grace: Duration::from_secs(10),
        tcp_syn: Duration::from_secs(60),
    }
}

#[test]
fn a_handshake_that_never_completes_releases_its_snat_port_after_the_syn_timeout() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let (half, done) = in_fib_netns(|ifindex, _| {
        // Two flows to the remote backend: one stays a bare SYN, the other
        // completes its handshake.
        let half = g.xdp_on(&tcp((CLIENT, 46_000), (NODE, 30200), true, b""), ifindex);
        let done = g.xdp_on(&tcp((CLIENT, 46_001), (NODE, 30200), true, b""), ifindex);
        g.xdp_on(&tcp((CLIENT, 46_001), (NODE, 30200), false, b""), ifindex);
        (half, done)
    });
    assert_eq!((half.0, done.0), (XDP_TX, XDP_TX));
    let done_ct = g.ct(&fwd_key_of(46_001, 30200, IPPROTO_TCP)).unwrap();
    assert_ne!(done_ct.tcp_flags & CT_TCP_ACK, 0, "handshake recorded");
    let half_ct = g.ct(&fwd_key_of(46_000, 30200, IPPROTO_TCP)).unwrap();
    assert_eq!(half_ct.tcp_flags & CT_TCP_ACK, 0);

    let mut tables = Tables::open(&g.pins(), None).expect("open tables");
    let now = monotonic_ns();
    let before = tables.collect(now + 30 * 1_000_000_000, &timeouts());
    assert_eq!(before.flows_removed, 0, "within the SYN timeout");
    let after = tables.collect(now + 61 * 1_000_000_000, &timeouts());
    assert_eq!(after.flows_removed, 1, "the half-open flow, and only it");
    assert!(g.ct(&fwd_key_of(46_000, 30200, IPPROTO_TCP)).is_none());
    assert!(g.ct(&fwd_key_of(46_001, 30200, IPPROTO_TCP)).is_some());
    let nat_after = tables.collect(now + 62 * 1_000_000_000, &timeouts());
    assert_eq!(nat_after.nat_entries, 1, "its SNAT port is free again");
}

#[test]
fn a_forwarded_flow_whose_forward_entry_was_evicted_keeps_its_snat_port() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let (first, second) = in_fib_netns(|ifindex, _| {
        let first = g.xdp_on(&tcp((CLIENT, 47_000), (NODE, 30200), true, b""), ifindex);
        // The LRU evicts the forward entry (per-CPU lists evict before the
        // table is full); the NAT mapping stays.
        g.conntrack()
            .remove(&fwd_key_of(47_000, 30200, IPPROTO_TCP))
            .unwrap();
        let second = g.xdp_on(&tcp((CLIENT, 47_000), (NODE, 30200), false, b"x"), ifindex);
        (first, second)
    });
    assert_eq!((first.0, second.0), (XDP_TX, XDP_TX));
    let port = |p: &[u8]| u16::from_be_bytes([p[34], p[35]]);
    assert_eq!(
        port(&second.1),
        port(&first.1),
        "the connection keeps its SNAT port"
    );
    let nat: HashMap<_, CtKeyV4, lb_common::NatValueV4> =
        pinned::hash(&g.pins(), pin::NAT_V4).unwrap();
    assert_eq!(nat.keys().count(), 1, "one mapping for one connection");
}

#[test]
fn a_tcp_data_offset_below_five_or_an_ip_length_beyond_the_frame_is_truncated() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let s0 = g.stats();
    let mut bad_offset = tcp((CLIENT, 48_000), (NODE, 30090), true, b"");
    bad_offset[14 + 20 + 12] = 4 << 4; // data offset 4 words
    let mut long = tcp((CLIENT, 48_001), (NODE, 30090), true, b"");
    let claimed = (long.len() - 14 + 40) as u16;
    long[16..18].copy_from_slice(&claimed.to_be_bytes());
    for pkt in [&bad_offset, &long] {
        let (verdict, out) = g.xdp(pkt);
        assert_eq!((verdict, &out), (XDP_PASS, pkt), "passed untouched");
    }
    let s = g.stats();
    assert_eq!(s.pass_truncated - s0.pass_truncated, 2);
    assert_eq!(s.new_flows, s0.new_flows, "no flow pinned");
}

#[test]
fn a_new_connection_on_an_old_tuple_of_a_terminating_pod_goes_to_a_ready_one() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    // Find two client ports whose flows Maglev puts on pod-1.
    let ports: Vec<u16> = (49_000..49_200u16)
        .filter(|&p| g.expected_backend(p, 30090, IPPROTO_TCP).0 == addr(P1))
        .take(2)
        .collect();
    let (reused, kept) = (ports[0], ports[1]);
    for p in [reused, kept] {
        g.xdp(&tcp((CLIENT, p), (NODE, 30090), true, b""));
        let (_, out) = g.xdp(&tcp((CLIENT, p), (NODE, 30090), false, b"x"));
        assert_eq!(dnat_target(&out), addr(P1));
    }
    // The first connection ends from the client's side.
    g.xdp(&tcp_end((CLIENT, reused), (NODE, 30090), false));
    // Pod-1 starts terminating (serving, not ready).
    let text = manifest(&PODS).replacen(
        &format!("[\"{P1}\"]\n      conditions: {{ready: true}}"),
        &format!(
            "[\"{P1}\"]\n      conditions: {{ready: false, serving: true, terminating: true}}"
        ),
        1,
    );
    g.set_manifest(&text);

    // The established connection stays with its pod.
    let (_, out) = g.xdp(&tcp((CLIENT, kept), (NODE, 30090), false, b"y"));
    assert_eq!(
        dnat_target(&out),
        addr(P1),
        "an established flow keeps its pod"
    );
    // A SYN of a new connection on the first tuple goes to a ready pod.
    let (verdict, out) = g.xdp(&tcp((CLIENT, reused), (NODE, 30090), true, b""));
    assert_eq!(verdict, XDP_PASS);
    assert_ne!(
        dnat_target(&out),
        addr(P1),
        "a new connection to a terminating pod"
    );
    // A SYN on the established tuple (the client lost its connection) too.
    let (_, out) = g.xdp(&tcp((CLIENT, kept), (NODE, 30090), true, b""));
    assert_ne!(dnat_target(&out), addr(P1));
}

#[test]
fn a_local_flow_whose_reply_entry_was_evicted_gets_it_back_on_its_next_packet() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    g.xdp(&tcp((CLIENT, 47_100), (NODE, 30090), true, b""));
    let pod = g.expected_backend(47_100, 30090, IPPROTO_TCP);
    let fwd = g.ct(&fwd_key_of(47_100, 30090, IPPROTO_TCP)).unwrap();
    let rkey = flow::partner_key(&fwd_key_of(47_100, 30090, IPPROTO_TCP), &fwd);
    g.conntrack().remove(&rkey).unwrap();
    // The entry is checked when the flow's time is refreshed (once a second).
    std::thread::sleep(Duration::from_millis(1_100));
    g.xdp(&tcp((CLIENT, 47_100), (NODE, 30090), false, b"x"));
    assert!(g.ct(&rkey).is_some(), "reply entry written again");
    let (_, back) = g.tc(&tcp(pod, (CLIENT, 47_100), false, b"y"));
    assert_eq!(back, tcp((NODE, 30090), (CLIENT, 47_100), false, b"y"));
}

#[test]
fn lb_agent_flows_shows_the_pods_side_of_a_forwarded_flow() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    in_fib_netns(|ifindex, _| {
        let syn = g.xdp_on(&tcp((CLIENT, 47_200), (NODE, 30200), true, b""), ifindex);
        let port = u16::from_be_bytes([syn.1[34], syn.1[35]]);
        g.xdp_on(&tcp((CLIENT, 47_200), (NODE, 30200), false, b""), ifindex);
        // The pod on node B closes its side; its FIN comes back to the SNAT port.
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(POD_B, NODE, 64)
            .tcp(8080, port, 5000, 64240)
            .fin()
            .ack(1);
        let mut fin = Vec::new();
        b.write(&mut fin, b"").unwrap();
        assert_eq!(g.xdp_on(&fin, ifindex).0, XDP_TX);
    });
    let rows = lb_userspace::inspect::Pinned::new(g.site.pins())
        .flows(monotonic_ns())
        .expect("lb-agent flows");
    let row = rows
        .iter()
        .find(|r| r.client == "198.18.0.2:47200")
        .expect("the forwarded flow is listed");
    assert_eq!(row.backend, "198.18.2.11:8080");
    assert_eq!(
        row.state, "fin-pod",
        "the state includes the pod's side, read from the NAT mapping"
    );
}

#[test]
fn a_port_held_by_a_handshake_that_never_completed_is_taken_over_when_the_range_is_full() {
    if !privileged() {
        return;
    }
    let mut g = Golden::new(&PODS);
    let s0 = g.stats();
    let port = |p: &[u8]| u16::from_be_bytes([p[34], p[35]]);
    let (half_port, young, reclaimed, established_only, retry) = in_fib_netns(|ifindex, _| {
        let mut x = |sport: u16, syn: bool| {
            g.xdp_on(&tcp((CLIENT, sport), (NODE, 30200), syn, b""), ifindex)
        };
        // The four SNAT ports: three completed handshakes, one bare SYN.
        for sport in 48_000..48_003 {
            assert_eq!(x(sport, true).0, XDP_TX);
            assert_eq!(x(sport, false).0, XDP_TX);
        }
        let half = x(48_003, true);
        assert_eq!(half.0, XDP_TX);
        // Full, and the half-open flow is young: refused.
        let young = x(48_010, true).0;
        std::thread::sleep(Duration::from_millis(5_300));
        let reclaimed = x(48_011, true);
        let established_only = x(48_012, true).0;
        // The flow that lost its port retries: a new flow, no port for it.
        let retry = x(48_003, true).0;
        (port(&half.1), young, reclaimed, established_only, retry)
    });
    assert_eq!(young, XDP_DROP, "a young half-open flow keeps its port");
    assert_eq!(reclaimed.0, XDP_TX, "the port of the old half-open flow");
    assert_eq!(port(&reclaimed.1), half_port);
    assert_eq!(
        established_only, XDP_DROP,
        "completed flows keep their ports"
    );
    assert_eq!(retry, XDP_DROP);
    let s = g.stats();
    assert_eq!(s.snat_reclaimed - s0.snat_reclaimed, 1);
    assert_eq!(s.snat_exhausted - s0.snat_exhausted, 3);
    for sport in 48_000..48_003 {
        let ct = g.ct(&fwd_key_of(sport, 30200, IPPROTO_TCP)).unwrap();
        assert_ne!(ct.tcp_flags & CT_TCP_ACK, 0, "flow {sport} untouched");
    }
}
