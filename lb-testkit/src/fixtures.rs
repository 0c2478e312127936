//! The per-packet scenarios as one table, read by the golden tests
//! (`lb-userspace/tests/golden/`: each row's verdict, output bytes and
//! counter) and by the per-packet bench (`lb-userspace/benches/datapath.rs`:
//! each row's time), as Katran's testing fixtures drive both its tests and
//! its perf runs. The addressing both use lives here too, so a bench figure
//! is always the time of a packet the golden tests check.
//!
//! Packets are built with etherparse, which computes its own checksums: an
//! output equal to a row's `output` proves the rewrite and both checksums.

use etherparse::PacketBuilder;
use lb_common::Stats;

/// The node's address (NodePort frontends).
pub const NODE: [u8; 4] = [198, 18, 0, 1];
/// The client of the scenarios.
pub const CLIENT: [u8; 4] = [198, 18, 0, 2];
/// The packets' source MAC address.
pub const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
/// The packets' destination MAC address.
pub const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// A port with no frontend (the non-service row).
pub const NO_SERVICE_PORT: u16 = 9;
/// The client port of the rows' flow.
pub const CLIENT_PORT: u16 = 41_000;

/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;
/// `XDP_TX`.
pub const XDP_TX: u32 = 3;
/// `TC_ACT_OK`.
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_UNSPEC` (-1): continue with the next program.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;

/// An address and a port (host order).
pub type Endpoint = ([u8; 4], u16);

/// A TCP segment in an Ethernet frame: a SYN, or an ACK of 1 (sequence
/// 1000, window 64240, TTL 64).
pub fn tcp(src: Endpoint, dst: Endpoint, syn: bool, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build a TCP packet");
    v
}

/// A UDP datagram in an Ethernet frame (TTL 64).
pub fn udp(src: Endpoint, dst: Endpoint, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1)
        .write(&mut v, payload)
        .expect("build a UDP packet");
    v
}

/// The program a row's packet goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// XDP ingress (`lb_xdp`).
    Xdp,
    /// TC egress (`lb_tc_egress`).
    Tc,
}

/// One row: a packet, the program it goes through and what must come out.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The row's name; the bench's figure of it is `<name>_ns`.
    pub name: &'static str,
    /// What the row exercises.
    pub what: &'static str,
    /// The program.
    pub program: Program,
    /// The input packet.
    pub packet: Vec<u8>,
    /// The program's return value.
    pub verdict: u32,
    /// The output packet.
    pub output: Vec<u8>,
    /// The `LB_STATS` counter that counts the row's packet once.
    pub counter: fn(&Stats) -> u64,
}

/// The rows of one TCP flow from `client` to the NodePort `frontend` that
/// the datapath sends to `backend`, in the order they must run: a packet to
/// a port with no frontend, the flow's first packet, an established packet,
/// and the backend's reply through TC.
pub fn flow(client: Endpoint, frontend: Endpoint, backend: Endpoint) -> Vec<Fixture> {
    let other = tcp(client, (frontend.0, NO_SERVICE_PORT), true, b"");
    vec![
        Fixture {
            name: "non_service",
            what: "a packet to the node on a port with no frontend: one lookup, passed untouched",
            program: Program::Xdp,
            output: other.clone(),
            packet: other,
            verdict: XDP_PASS,
            counter: |s| s.pass_not_service,
        },
        Fixture {
            name: "new_flow",
            what: "the flow's SYN: conntrack miss, the policy's choice, DNAT",
            program: Program::Xdp,
            packet: tcp(client, frontend, true, b""),
            verdict: XDP_PASS,
            output: tcp(client, backend, true, b""),
            counter: |s| s.new_flows,
        },
        Fixture {
            name: "established",
            what: "a packet of the pinned flow: conntrack hit, DNAT",
            program: Program::Xdp,
            packet: tcp(client, frontend, false, b""),
            verdict: XDP_PASS,
            output: tcp(client, backend, false, b""),
            counter: |s| s.established,
        },
        Fixture {
            name: "tc_reply",
            what: "the backend's reply at TC egress: its source back to the frontend",
            program: Program::Tc,
            packet: tcp(backend, client, false, b""),
            verdict: TC_ACT_OK,
            output: tcp(frontend, client, false, b""),
            counter: |s| s.tc_reverse_nat,
        },
    ]
}

/// The row `name` of `rows`.
pub fn row<'a>(rows: &'a [Fixture], name: &str) -> &'a Fixture {
    rows.iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no fixture row {name}"))
}
