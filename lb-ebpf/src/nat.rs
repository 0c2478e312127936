//! Address and port rewrites with incremental checksum updates.
//!
//! XDP writes the packet directly (`lb_common::csum`); TC goes through the
//! kernel's checksum helpers, which also handle `CHECKSUM_PARTIAL` skbs.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{IPPROTO_UDP, csum};

use crate::parse::{IP_CHECK_OFF, IP_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF, PacketV4};

/// An address and a port (network byte order).
pub type Endpoint = ([u8; 4], u16);

/// XDP: rewrites the source and/or the destination of `pkt`. IPv4 and L4
/// checksums are updated incrementally; a zero UDP checksum stays zero.
#[inline(always)]
pub fn rewrite_xdp(pkt: &PacketV4, src: Option<Endpoint>, dst: Option<Endpoint>) {
    // SAFETY: the parser checked that the IPv4 header, the ports and the L4
    // checksum are inside the packet; XDP owns the packet memory.
    unsafe {
        let ip = &mut *pkt.ip;
        let mut ip_check = u16::from_ne_bytes(ip.check);
        let l4_check = u16::from_ne_bytes(*pkt.l4_check);
        let mut c = l4_check;
        if let Some((addr, port_be)) = src {
            let (old, new) = (u32::from_ne_bytes(pkt.src), u32::from_ne_bytes(addr));
            ip_check = csum::replace4(ip_check, old, new);
            c = csum::replace2(csum::replace4(c, old, new), pkt.sport_be, port_be);
            ip.src_addr = addr;
            (*pkt.ports)[0] = port_be;
        }
        if let Some((addr, port_be)) = dst {
            let (old, new) = (u32::from_ne_bytes(pkt.dst), u32::from_ne_bytes(addr));
            ip_check = csum::replace4(ip_check, old, new);
            c = csum::replace2(csum::replace4(c, old, new), pkt.dport_be, port_be);
            ip.dst_addr = addr;
            (*pkt.ports)[1] = port_be;
        }
        if pkt.proto == IPPROTO_UDP {
            c = csum::udp_fixup(l4_check, c);
        }
        ip.check = ip_check.to_ne_bytes();
        *pkt.l4_check = c.to_ne_bytes();
    }
}

/// TC: rewrites the source to `addr:port_be` (reverse NAT of a reply), and
/// the destination port to `client_port_be` when given (a flow whose client
/// port was remapped). Packet pointers in `pkt` are invalid afterwards; only
/// offsets are used.
#[inline(always)]
pub fn snat_tc(
    ctx: &TcContext,
    pkt: &PacketV4,
    addr: [u8; 4],
    port_be: u16,
    client_port_be: Option<u16>,
) -> Result<(), i64> {
    let old = u32::from_ne_bytes(pkt.src) as u64;
    let new = u32::from_ne_bytes(addr) as u64;
    let mangled0 = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    ctx.l4_csum_replace(
        pkt.l4_check_off,
        old,
        new,
        BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
    )?;
    ctx.l4_csum_replace(
        pkt.l4_check_off,
        pkt.sport_be as u64,
        port_be as u64,
        mangled0 | 2,
    )?;
    if let Some(p) = client_port_be {
        ctx.l4_csum_replace(
            pkt.l4_check_off,
            pkt.dport_be as u64,
            p as u64,
            mangled0 | 2,
        )?;
        ctx.store(L4_DPORT_OFF, &p, 0)?;
    }
    ctx.l3_csum_replace(IP_CHECK_OFF, old, new, 4)?;
    ctx.store(IP_SRC_OFF, &addr, 0)?;
    ctx.store(L4_SPORT_OFF, &port_be, 0)?;
    Ok(())
}
