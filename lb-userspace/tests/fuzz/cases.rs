//! Random agent states and packets for the datapath fuzzer.
//!
//! States come from small pools (four services, a few frontends, eight
//! local and four remote pods, three clients) so that successive states
//! reuse names, addresses and backend ids, and packets hit existing flows:
//! most packets belong to a frontend, a flow's reply, a NAT mapping or an
//! ICMP error about one, and some are then damaged (truncated, IPv4
//! options, fragments, VLAN, bad TCP data offset, a length beyond the
//! frame, TTL 1).

use std::net::Ipv4Addr;

use etherparse::{Icmpv4Type, PacketBuilder, icmpv4};
use lb_common::{CT_DIR_FORWARD, CT_DIR_REPLY, DatapathConfig, IPPROTO_TCP, IPPROTO_UDP};
use lb_userspace::model::{
    Backend, BackendState, BalancingPolicy, Desired, Frontend, FrontendKind, Ipv4Cidr, Proto,
    ServicePort, ServicePortName, SessionAffinity, TrafficPolicy,
};
use lb_userspace::writer::MapState;
use rand::{Rng, RngExt};

use super::model::Flows;

pub const NODE: [u8; 4] = [198, 18, 0, 1];
pub const NODE_NAME: &str = "node-a";
const LB_IPS: [[u8; 4]; 2] = [[198, 18, 100, 1], [198, 18, 100, 2]];
const EXT_IPS: [[u8; 4]; 2] = [[198, 18, 101, 1], [198, 18, 101, 2]];
/// Two clients inside the source ranges, one outside.
const CLIENTS: [[u8; 4]; 3] = [[198, 18, 0, 2], [198, 18, 0, 3], [198, 18, 7, 9]];
const ROUTER: [u8; 4] = [198, 18, 0, 254];
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// The SNAT settings of every run: a short range, so it runs out.
pub const CONFIG: DatapathConfig = DatapathConfig {
    snat_addr: NODE,
    snat_port_lo: 61_000,
    snat_port_hi: 61_007,
};

/// Which program a packet goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    Xdp,
    Tc,
}

fn pod(rng: &mut impl Rng) -> Backend {
    let remote = rng.random_bool(0.3);
    let addr = if remote {
        Ipv4Addr::new(198, 18, 2, 11 + rng.random_range(0..4))
    } else {
        Ipv4Addr::new(198, 18, 1, 11 + rng.random_range(0..8))
    };
    Backend {
        addr,
        port: 8080 + rng.random_range(0..2),
        state: if rng.random_bool(0.2) {
            BackendState::Terminating
        } else {
            BackendState::Active
        },
        node_name: Some(if remote { "node-b" } else { NODE_NAME }.into()),
        local: !remote,
    }
}

fn service(rng: &mut impl Rng, i: u16) -> ServicePort {
    let proto = if rng.random_bool(0.5) {
        Proto::Tcp
    } else {
        Proto::Udp
    };
    let mut sp = ServicePort::default();
    let fe = |addr: [u8; 4], port: u16, kind| Frontend {
        addr: addr.into(),
        port,
        proto,
        kind,
    };
    sp.frontends
        .insert(fe(NODE, 30_000 + i, FrontendKind::NodePort));
    if rng.random_bool(0.5) {
        let ip = LB_IPS[rng.random_range(0..2)];
        sp.frontends
            .insert(fe(ip, 80 + i, FrontendKind::LoadBalancer));
    }
    if rng.random_bool(0.3) {
        let ip = EXT_IPS[rng.random_range(0..2)];
        sp.frontends
            .insert(fe(ip, 90 + i, FrontendKind::ExternalIp));
    }
    for _ in 0..rng.random_range(0..6) {
        sp.backends.insert(pod(rng));
    }
    sp.policy = match rng.random_range(0..3) {
        0 => BalancingPolicy::Maglev,
        1 => BalancingPolicy::RoundRobin,
        _ => BalancingPolicy::LeastConnection,
    };
    if rng.random_bool(0.25) {
        // Far longer than a run: the model does not age affinity.
        sp.affinity = SessionAffinity::ClientIp { timeout_s: 3600 };
    }
    if rng.random_bool(0.2) {
        sp.traffic_policy = TrafficPolicy::Local;
    }
    if rng.random_bool(0.3) {
        sp.source_ranges = vec![Ipv4Cidr {
            addr: Ipv4Addr::new(198, 18, 0, 0),
            prefix_len: 30,
        }];
    }
    sp.terminating_fallback = rng.random_bool(0.1);
    sp
}

fn name(i: u16) -> ServicePortName {
    ServicePortName {
        namespace: "fuzz".into(),
        name: format!("svc{i}"),
        port_name: String::new(),
    }
}

/// A new state: fresh, or `prev` with one backend added, removed or turned
/// terminating (the churn of a rolling update).
pub fn desired(rng: &mut impl Rng, prev: &Desired) -> Desired {
    if prev.services.is_empty() || rng.random_bool(0.4) {
        let mut d = Desired::default();
        for i in 0..rng.random_range(1..5u16) {
            d.services.insert(name(i), service(rng, i));
        }
        return d;
    }
    let mut d = prev.clone();
    let n = d.services.len();
    let sp = d.services.values_mut().nth(rng.random_range(0..n)).unwrap();
    match rng.random_range(0..3) {
        0 => {
            sp.backends.insert(pod(rng));
        }
        1 if !sp.backends.is_empty() => {
            let b = sp
                .backends
                .iter()
                .nth(rng.random_range(0..sp.backends.len()))
                .cloned();
            sp.backends.remove(&b.unwrap());
        }
        _ => {
            let all: Vec<Backend> = sp.backends.iter().cloned().collect();
            if let Some(b) = all.get(rng.random_range(0..all.len().max(1))) {
                sp.backends.remove(b);
                sp.backends.insert(Backend {
                    state: BackendState::Terminating,
                    ..b.clone()
                });
            }
        }
    }
    d
}

fn pick<T: Copy>(rng: &mut impl Rng, v: &[T]) -> Option<T> {
    (!v.is_empty()).then(|| v[rng.random_range(0..v.len())])
}

type Ep = ([u8; 4], u16);

/// A TCP segment or UDP datagram (etherparse computes every checksum).
fn l4(rng: &mut impl Rng, src: Ep, dst: Ep, proto: u8) -> Vec<u8> {
    let payload: Vec<u8> = (0..rng.random_range(0..24)).map(|_| rng.random()).collect();
    let ip = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src.0, dst.0, 64);
    let mut v = Vec::new();
    if proto == IPPROTO_UDP {
        ip.udp(src.1, dst.1).write(&mut v, &payload).unwrap();
        if rng.random_bool(0.1) {
            v[40..42].copy_from_slice(&[0, 0]); // no checksum
        }
        return v;
    }
    let seq = rng.random();
    let t = ip.tcp(src.1, dst.1, seq, 64_240);
    let ack = rng.random();
    let t = match rng.random_range(0..9) {
        0 | 1 => t.syn(),
        2 => t.syn().ack(ack),
        3 => t.fin().ack(ack),
        4 => t.rst(),
        5 => t.rst().ack(ack),
        6 => t.fin(),
        7 => t,
        _ => t.ack(ack),
    };
    t.write(&mut v, &payload).unwrap();
    v
}

/// An ICMP error from `from` to `to` quoting `src → dst`.
fn icmp_error(
    rng: &mut impl Rng,
    from: [u8; 4],
    to: [u8; 4],
    src: Ep,
    dst: Ep,
    proto: u8,
) -> Vec<u8> {
    let mut quote = Vec::new();
    let ip = PacketBuilder::ipv4(src.0, dst.0, 63);
    if proto == IPPROTO_UDP {
        ip.udp(src.1, dst.1).write(&mut quote, b"quoted").unwrap();
    } else {
        ip.tcp(src.1, dst.1, rng.random(), 1000)
            .ack(1)
            .write(&mut quote, b"quoted")
            .unwrap();
    }
    if rng.random_bool(0.3) {
        quote.truncate(28); // only the 8 bytes every router quotes
    }
    let ty =
        match rng.random_range(0..3) {
            0 => Icmpv4Type::DestinationUnreachable(
                icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            ),
            1 => Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
            _ => Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit),
        };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(from, to, 64)
        .icmpv4(ty)
        .write(&mut v, &quote)
        .unwrap();
    v
}

fn client(rng: &mut impl Rng) -> Ep {
    let port = if rng.random_bool(0.8) {
        40_000 + rng.random_range(0..6)
    } else {
        rng.random()
    };
    (pick(rng, &CLIENTS).unwrap(), port)
}

fn be_port(ep: Ep) -> Ep {
    (ep.0, u16::from_be(ep.1))
}

/// A packet for the current state and flows.
pub fn packet(rng: &mut impl Rng, maps: &MapState, flows: &Flows) -> (Prog, Vec<u8>) {
    let frontends: Vec<_> = maps.frontends.keys().copied().collect();
    let replies: Vec<_> = flows
        .ct
        .keys()
        .filter(|k| k.dir == CT_DIR_REPLY)
        .copied()
        .collect();
    let forwards: Vec<_> = flows
        .ct
        .keys()
        .filter(|k| k.dir == CT_DIR_FORWARD)
        .copied()
        .collect();
    let nats: Vec<_> = flows.nat.keys().copied().collect();
    let proto = |rng: &mut _| {
        if pick(rng, &[0, 1]) == Some(0) {
            IPPROTO_TCP
        } else {
            IPPROTO_UDP
        }
    };
    let roll = rng.random_range(0..100);
    let (prog, mut v) = if roll < 55 {
        match pick(rng, &frontends) {
            Some(f) => {
                let c = client(rng);
                (
                    Prog::Xdp,
                    l4(rng, c, (f.addr, u16::from_be(f.port_be)), f.proto),
                )
            }
            None => {
                let c = client(rng);
                (Prog::Xdp, l4(rng, c, (NODE, 30_000), IPPROTO_TCP))
            }
        }
    } else if roll < 67 {
        match pick(rng, &replies) {
            Some(k) => {
                let (s, d) = (
                    be_port((k.src_addr, k.src_port_be)),
                    be_port((k.dst_addr, k.dst_port_be)),
                );
                (Prog::Tc, l4(rng, s, d, k.proto))
            }
            None => {
                let c = client(rng);
                (Prog::Tc, l4(rng, ([198, 18, 1, 11], 8080), c, IPPROTO_TCP))
            }
        }
    } else if roll < 75 {
        match pick(rng, &nats) {
            Some(k) => {
                let (s, d) = (
                    be_port((k.src_addr, k.src_port_be)),
                    be_port((k.dst_addr, k.dst_port_be)),
                );
                (Prog::Xdp, l4(rng, s, d, k.proto))
            }
            None => {
                let p = proto(rng);
                (
                    Prog::Xdp,
                    l4(rng, ([198, 18, 2, 11], 8080), (NODE, 61_000), p),
                )
            }
        }
    } else if roll < 85 {
        match rng.random_range(0..3) {
            // The node's kernel, about a packet DNAT'd to a local pod.
            0 => match pick(rng, &replies) {
                Some(k) => {
                    let (pod, cl) = (
                        be_port((k.src_addr, k.src_port_be)),
                        be_port((k.dst_addr, k.dst_port_be)),
                    );
                    (
                        Prog::Tc,
                        icmp_error(rng, [198, 18, 1, 1], cl.0, cl, pod, k.proto),
                    )
                }
                None => {
                    let c = client(rng);
                    (
                        Prog::Tc,
                        icmp_error(rng, ROUTER, CLIENTS[0], c, (NODE, 1), IPPROTO_TCP),
                    )
                }
            },
            // A router, about a forwarded packet.
            1 => match pick(rng, &nats) {
                Some(k) => {
                    let (be, sn) = (
                        be_port((k.src_addr, k.src_port_be)),
                        be_port((k.dst_addr, k.dst_port_be)),
                    );
                    (Prog::Xdp, icmp_error(rng, ROUTER, sn.0, sn, be, k.proto))
                }
                None => (
                    Prog::Xdp,
                    icmp_error(
                        rng,
                        ROUTER,
                        NODE,
                        (NODE, 61_001),
                        ([198, 18, 2, 12], 8080),
                        IPPROTO_UDP,
                    ),
                ),
            },
            // A router, about a reply sent to a client.
            _ => match pick(rng, &forwards) {
                Some(k) => {
                    let (cl, fe) = (
                        be_port((k.src_addr, k.src_port_be)),
                        be_port((k.dst_addr, k.dst_port_be)),
                    );
                    (Prog::Xdp, icmp_error(rng, ROUTER, fe.0, fe, cl, k.proto))
                }
                None => {
                    let c = client(rng);
                    (
                        Prog::Xdp,
                        icmp_error(rng, ROUTER, NODE, (NODE, 30_000), c, IPPROTO_TCP),
                    )
                }
            },
        }
    } else {
        let p = proto(rng);
        let dst = (
            [198, 18, 0, rng.random_range(1..4)],
            rng.random_range(29_998..30_006),
        );
        let c = client(rng);
        (Prog::Xdp, l4(rng, c, dst, p))
    };
    if rng.random_bool(0.15) {
        // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header,
        // nor an skb shorter than its IPv4 header (TC never sees one).
        let min = if prog == Prog::Tc { 34 } else { 14 };
        damage(rng, &mut v, min);
    }
    (prog, v)
}

/// One kind of damage a real network or a hostile sender produces.
fn damage(rng: &mut impl Rng, v: &mut Vec<u8>, min: usize) {
    match rng.random_range(0..8) {
        0 if v.len() > min => {
            let n = rng.random_range(min..v.len());
            v.truncate(n);
        }
        1 if v.len() > 14 => v[14] = 0x46,  // IPv4 options
        2 if v.len() > 20 => v[20] |= 0x20, // more fragments
        3 if v.len() > 21 => v[21] = rng.random_range(1..=255), // fragment offset
        4 if v.len() > 13 => v[12..14].copy_from_slice(&[0x81, 0x00]), // VLAN
        5 if v.len() > 46 && v[23] == IPPROTO_TCP => v[46] = (rng.random_range(0..5u8)) << 4,
        6 if v.len() > 17 => {
            let l = u16::from_be_bytes([v[16], v[17]]).wrapping_add(rng.random_range(1..40));
            v[16..18].copy_from_slice(&l.to_be_bytes());
        }
        7 if v.len() > 22 => v[22] = 1, // TTL 1
        _ => {}
    }
}
