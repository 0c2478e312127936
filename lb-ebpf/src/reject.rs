//! Refusing a flow to a service that has no usable backend, the way
//! kube-proxy does, but from the datapath: a TCP segment is answered with a RST and a
//! UDP datagram with ICMP port unreachable, both sent back out of the
//! receiving interface (`Action::Bounce`). Never a silent black hole.
//!
//! Both rewrite the received packet in place into the answer, then trim it
//! (through the hook: the same code at XDP and TC). At TC the skb keeps its
//! checksum state; a `CHECKSUM_PARTIAL` one only comes from a socket on
//! this host over a virtual device, whose receiver trusts it.

use lb_common::{IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, csum};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr};

use crate::{
    hook::Hook,
    parse::{L3_OFF, L4_OFF, PacketV4},
};

const TCP_RST_LEN: usize = L4_OFF + TcpHdr::LEN;
/// Ethernet + IPv4 + ICMP header + the offending IPv4 header + 8 bytes of it.
const ICMP_UNREACH_LEN: usize = L4_OFF + 8 + Ipv4Hdr::LEN + 8;
const ICMP_GROW: usize = 8 + Ipv4Hdr::LEN;

/// Writes a fresh IPv4 header (no options, DF, TTL 64) with its checksum.
#[inline(always)]
fn ipv4_header(ip: &mut Ipv4Hdr, src: [u8; 4], dst: [u8; 4], proto: u8, tot_len: u16) {
    ip.vihl = 0x45;
    ip.tos = 0;
    ip.tot_len = tot_len.to_be_bytes();
    ip.id = [0, 0];
    ip.frags = 0x4000u16.to_be_bytes();
    ip.ttl = 64;
    ip.proto = proto;
    ip.check = [0, 0];
    ip.src_addr = src;
    ip.dst_addr = dst;
    // SAFETY: `ip` is a whole header.
    let bytes = unsafe { &*(ip as *const Ipv4Hdr as *const [u8; Ipv4Hdr::LEN]) };
    ip.check = csum::finish(csum::sum(bytes)).to_ne_bytes();
}

/// Turns the TCP segment `pkt` into the RST its sender expects (RFC 9293
/// 3.10.7.1) and returns true if it is ready to bounce.
#[inline(always)]
pub fn tcp_rst(h: &impl Hook, pkt: &PacketV4) -> bool {
    // SAFETY: the parser checked that Ethernet, IPv4 (no options) and the
    // 20-byte TCP header are in the packet; they do not overlap.
    let (eth, ip, tcp) = unsafe {
        (
            &mut *pkt.eth,
            &mut *pkt.ip,
            &mut *(pkt.ports as *mut [u8; TcpHdr::LEN]),
        )
    };

    let flags = tcp[13];
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let hdr_len = ((tcp[12] >> 4) as u32) * 4;
    let seg_len = (u16::from_be_bytes(ip.tot_len) as u32)
        .saturating_sub(Ipv4Hdr::LEN as u32 + hdr_len)
        + (flags & TCP_SYN != 0) as u32
        + (flags & TCP_FIN != 0) as u32;
    if flags & TCP_RST != 0 {
        return false; // never answer a RST
    }
    let (new_seq, new_ack, new_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST) // seq = their ACK
    } else {
        (0, seq.wrapping_add(seg_len), TCP_RST | TCP_ACK)
    };

    core::mem::swap(&mut eth.src_addr, &mut eth.dst_addr);
    ipv4_header(
        ip,
        pkt.dst,
        pkt.src,
        IPPROTO_TCP,
        (Ipv4Hdr::LEN + TcpHdr::LEN) as u16,
    );
    *tcp = [0; TcpHdr::LEN];
    tcp[0..2].copy_from_slice(&u16::from_be(pkt.dport_be).to_be_bytes());
    tcp[2..4].copy_from_slice(&u16::from_be(pkt.sport_be).to_be_bytes());
    tcp[4..8].copy_from_slice(&new_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&new_ack.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = new_flags;
    let pseudo = pseudo_sum(pkt.dst, pkt.src, IPPROTO_TCP, TcpHdr::LEN as u16);
    let c = csum::finish(csum::combine(pseudo, csum::sum(tcp)));
    tcp[16..18].copy_from_slice(&c.to_ne_bytes());
    h.trim(pkt.len, TCP_RST_LEN as u32)
}

/// The one's-complement sum of an IPv4 pseudo-header.
#[inline(always)]
fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src);
    p[4..8].copy_from_slice(&dst);
    p[9] = proto;
    p[10..12].copy_from_slice(&len.to_be_bytes());
    csum::sum(&p)
}

/// Turns the UDP datagram `pkt` into an ICMP port unreachable (type 3,
/// code 3) quoting its IPv4 header and first 8 bytes, from the frontend
/// address, and returns true if it is ready to bounce.
#[inline(always)]
pub fn icmp_port_unreachable(h: &impl Hook, pkt: &PacketV4) -> bool {
    let (client, frontend) = (pkt.src, pkt.dst);
    // Room in front for the new IPv4 + ICMP headers: the old Ethernet header
    // moves to offset 28, the quoted IPv4 header to 42 (right after ICMP).
    if !h.grow_head(ICMP_GROW as u32) {
        return false;
    }
    let b = h.bounds();
    let Some(p) = b.ptr_at::<[u8; ICMP_UNREACH_LEN]>(0) else {
        return false;
    };
    // SAFETY: in bounds.
    let p = unsafe { &mut *p };
    let mut macs = [0u8; 12];
    macs.copy_from_slice(&p[ICMP_GROW..ICMP_GROW + 12]);
    p[0..6].copy_from_slice(&macs[6..12]);
    p[6..12].copy_from_slice(&macs[0..6]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    // SAFETY: bytes 14..34 are a whole IPv4 header inside `p`.
    let ip = unsafe { &mut *(p.as_mut_ptr().add(L3_OFF) as *mut Ipv4Hdr) };
    ipv4_header(ip, frontend, client, 1, (ICMP_UNREACH_LEN - L3_OFF) as u16);
    let icmp = &mut p[L4_OFF..ICMP_UNREACH_LEN];
    icmp[0..8].copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
    let c = csum::finish(csum::sum(icmp));
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    h.trim(pkt.len + ICMP_GROW as u32, ICMP_UNREACH_LEN as u32)
}
