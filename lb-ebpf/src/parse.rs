//! Packet parsing: one bounds-check primitive ([`Bounds::ptr_at`]) and one
//! packet description ([`PacketV4`]) filled once and used by every handler.
//!
//! Accepted: Ethernet II + IPv4 without options, not fragmented, whose total
//! length fits in the frame, carrying a complete TCP header (data offset at
//! least 5 words) or UDP header (8 bytes). Everything else is a
//! [`Skip`] reason, counted by the caller, and the packet is passed untouched.

use core::mem::size_of;

use lb_common::{IPPROTO_TCP, IPPROTO_UDP, flow};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

/// Offset of the IPv4 header (right after Ethernet II).
pub const L3_OFF: usize = EthHdr::LEN;
/// Offset of the L4 header (IPv4 without options).
pub const L4_OFF: usize = L3_OFF + Ipv4Hdr::LEN;
/// Offset of the IPv4 header checksum.
pub const IP_CHECK_OFF: usize = L3_OFF + 10;
/// Offset of the IPv4 TTL.
pub const IP_TTL_OFF: usize = L3_OFF + 8;
/// Offset of the IPv4 source address.
pub const IP_SRC_OFF: usize = L3_OFF + 12;
/// Offset of the IPv4 destination address.
pub const IP_DST_OFF: usize = L3_OFF + 16;
/// Offset of the L4 source port.
pub const L4_SPORT_OFF: usize = L4_OFF;
/// Offset of the L4 destination port.
pub const L4_DPORT_OFF: usize = L4_OFF + 2;
const TCP_CHECK_OFF: usize = L4_OFF + 16;
const UDP_CHECK_OFF: usize = L4_OFF + 6;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// The packet's directly readable memory, `[start, end)`, and the length
/// of the whole packet (`len`): at TC an skb's payload may sit in pages past
/// `end`; an XDP frame is all in `[start, end)`.
#[derive(Clone, Copy)]
pub struct Bounds {
    pub start: usize,
    pub end: usize,
    pub len: usize,
}

impl Bounds {
    /// An XDP frame.
    #[inline(always)]
    pub fn xdp(ctx: &aya_ebpf::programs::XdpContext) -> Self {
        let (start, end) = (ctx.data(), ctx.data_end());
        Self {
            start,
            end,
            len: end - start,
        }
    }

    /// An skb at TC.
    #[inline(always)]
    pub fn tc(ctx: &aya_ebpf::programs::TcContext) -> Self {
        Self {
            start: ctx.data(),
            end: ctx.data_end(),
            len: ctx.len() as usize,
        }
    }

    /// The one bounds check: a pointer to a `T` at `off`, if all of it lies
    /// inside the packet.
    #[inline(always)]
    pub fn ptr_at<T>(&self, off: usize) -> Option<*mut T> {
        if self.start + off + size_of::<T>() > self.end {
            return None;
        }
        Some((self.start + off) as *mut T)
    }
}

/// Why a packet is not parsed further (each has a counter in `Stats`).
#[derive(Clone, Copy)]
pub enum Skip {
    NotIpv4,
    OtherProto,
    Truncated,
    IpOptions,
    Fragment,
}

/// An IPv4 TCP/UDP packet, parsed once. Addresses in wire order, ports in
/// network byte order (memory order of the header fields).
pub struct PacketV4 {
    /// The Ethernet header (in bounds).
    pub eth: *mut EthHdr,
    /// The IPv4 header (in bounds).
    pub ip: *mut Ipv4Hdr,
    /// The L4 ports (source, destination), in bounds.
    pub ports: *mut [u16; 2],
    /// The L4 checksum field, in bounds.
    pub l4_check: *mut [u8; 2],
    /// Offset of the L4 checksum from the packet start (for TC helpers).
    pub l4_check_off: usize,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// `CT_TCP_SYN | CT_TCP_FIN_FWD | CT_TCP_RST | CT_TCP_ACK` as seen in
    /// this packet (FIN reported as `CT_TCP_FIN_FWD`, an ACK without SYN or
    /// RST as `CT_TCP_ACK`; the reply path maps them with
    /// `lb_common::flow::reply_flags`).
    pub tcp_flags: u8,
    /// The IPv4 TTL as received.
    pub ttl: u8,
    /// The IPv4 total length (host order).
    pub tot_len: u16,
    /// Bytes from the Ethernet header to the end of the packet (at TC,
    /// paged data included).
    pub len: u32,
}

/// Parses `b` as Ethernet II / IPv4 / TCP or UDP.
#[inline(always)]
pub fn parse_v4(b: Bounds) -> Result<PacketV4, Skip> {
    let eth: *mut EthHdr = b.ptr_at(0).ok_or(Skip::Truncated)?;
    // SAFETY: `eth` is in bounds.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return Err(Skip::NotIpv4);
    }
    let ip: *mut Ipv4Hdr = b.ptr_at(L3_OFF).ok_or(Skip::Truncated)?;
    // SAFETY: `ip` is in bounds.
    let iph = unsafe { &*ip };
    if iph.vihl >> 4 != 4 {
        return Err(Skip::NotIpv4);
    }
    if iph.vihl & 0xf != 5 {
        return Err(if iph.vihl & 0xf < 5 {
            Skip::Truncated
        } else {
            Skip::IpOptions
        });
    }
    // MF flag or a non-zero fragment offset.
    if u16::from_be_bytes(iph.frags) & 0x3fff != 0 {
        return Err(Skip::Fragment);
    }
    // A datagram longer than the frame lost its tail (trailing padding, as
    // in short Ethernet frames, is fine).
    if L3_OFF + u16::from_be_bytes(iph.tot_len) as usize > b.len {
        return Err(Skip::Truncated);
    }
    let proto = iph.proto;
    let (check_off, tcp_flags) = match proto {
        IPPROTO_TCP => {
            let tcp: *mut TcpHdr = b.ptr_at(L4_OFF).ok_or(Skip::Truncated)?;
            // SAFETY: the 20-byte TCP header is in bounds; byte 12 holds the
            // data offset (high nibble), byte 13 the flags.
            let (doff, raw) = unsafe {
                (
                    *(tcp as *const u8).add(12) >> 4,
                    *(tcp as *const u8).add(13),
                )
            };
            if doff < 5 {
                return Err(Skip::Truncated);
            }
            (TCP_CHECK_OFF, flow::ct_flags_of_segment(raw))
        }
        IPPROTO_UDP => {
            let _: *mut UdpHdr = b.ptr_at(L4_OFF).ok_or(Skip::Truncated)?;
            (UDP_CHECK_OFF, 0)
        }
        _ => return Err(Skip::OtherProto),
    };
    let ports: *mut [u16; 2] = b.ptr_at(L4_OFF).ok_or(Skip::Truncated)?;
    let l4_check: *mut [u8; 2] = b.ptr_at(check_off).ok_or(Skip::Truncated)?;
    // SAFETY: in bounds (checked just above).
    let [sport_be, dport_be] = unsafe { *ports };
    Ok(PacketV4 {
        eth,
        ip,
        ports,
        l4_check,
        l4_check_off: check_off,
        src: iph.src_addr,
        dst: iph.dst_addr,
        sport_be,
        dport_be,
        proto,
        tcp_flags,
        ttl: iph.ttl,
        tot_len: u16::from_be_bytes(iph.tot_len),
        len: b.len as u32,
    })
}

/// An ICMP error (destination unreachable, time exceeded) quoting an IPv4
/// TCP/UDP packet: what the datapath needs to translate the quote of a
/// flow it rewrote. Parsed only for packets that [`parse_v4`] skipped as
/// another protocol.
pub struct IcmpErrorV4 {
    /// The outer IPv4 header (in bounds).
    pub ip: *mut Ipv4Hdr,
    /// The ICMP checksum (in bounds).
    pub icmp_check: *mut [u8; 2],
    /// The quoted IPv4 header (in bounds, without options).
    pub inner_ip: *mut Ipv4Hdr,
    /// The quoted L4 ports (source, destination), in bounds.
    pub inner_ports: *mut [u16; 2],
    /// The quoted L4 checksum, when the quote reaches it.
    pub inner_l4_check: Option<*mut [u8; 2]>,
    pub outer_dst: [u8; 4],
    pub inner_src: [u8; 4],
    pub inner_dst: [u8; 4],
    pub inner_sport_be: u16,
    pub inner_dport_be: u16,
    pub inner_proto: u8,
}

/// ICMP type: destination unreachable (fragmentation needed is code 4).
const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP type: time exceeded.
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Offset of the quoted IPv4 header (after the 8-byte ICMP header).
const INNER_L3_OFF: usize = L4_OFF + 8;
/// Offset of the quoted L4 header.
const INNER_L4_OFF: usize = INNER_L3_OFF + Ipv4Hdr::LEN;
/// End of the longest part of an ICMP error the parser reads (up to the
/// quoted TCP checksum).
pub const ICMP_QUOTE_END: usize = INNER_L4_OFF + 18;
const IPPROTO_ICMP: u8 = 1;

/// Parses `b` as Ethernet II / IPv4 / ICMP error quoting IPv4 TCP or UDP
/// (both headers without options, the outer one not fragmented).
#[inline(always)]
pub fn parse_icmp_error_v4(b: Bounds) -> Option<IcmpErrorV4> {
    let eth: *mut EthHdr = b.ptr_at(0)?;
    // SAFETY: `eth` is in bounds.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return None;
    }
    let ip: *mut Ipv4Hdr = b.ptr_at(L3_OFF)?;
    // SAFETY: in bounds.
    let iph = unsafe { &*ip };
    if iph.vihl != 0x45 || iph.proto != IPPROTO_ICMP || u16::from_be_bytes(iph.frags) & 0x3fff != 0
    {
        return None;
    }
    let icmp: *mut [u8; 4] = b.ptr_at(L4_OFF)?;
    // SAFETY: in bounds: type, code, checksum.
    let [ty, ..] = unsafe { *icmp };
    if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner_ip: *mut Ipv4Hdr = b.ptr_at(INNER_L3_OFF)?;
    // SAFETY: in bounds.
    let inner = unsafe { &*inner_ip };
    if inner.vihl != 0x45 || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return None;
    }
    let inner_ports: *mut [u16; 2] = b.ptr_at(INNER_L4_OFF)?;
    let check_off = if inner.proto == IPPROTO_TCP {
        INNER_L4_OFF + 16
    } else {
        INNER_L4_OFF + 6
    };
    // SAFETY: in bounds (checked just above).
    let [sport, dport] = unsafe { *inner_ports };
    Some(IcmpErrorV4 {
        ip,
        icmp_check: b.ptr_at(L4_OFF + 2)?,
        inner_ip,
        inner_ports,
        inner_l4_check: b.ptr_at(check_off),
        outer_dst: iph.dst_addr,
        inner_src: inner.src_addr,
        inner_dst: inner.dst_addr,
        inner_sport_be: sport,
        inner_dport_be: dport,
        inner_proto: inner.proto,
    })
}
