//! Address and port rewrites with incremental checksum updates.
//!
//! XDP writes the packet directly (`lb_common::csum`); TC goes through the
//! kernel's checksum helpers, which also handle `CHECKSUM_PARTIAL` skbs.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{IPPROTO_UDP, csum};

use crate::parse::{IP_CHECK_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF, PacketV4};

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

/// TC: rewrites the source and/or the destination of `pkt` through the
/// kernel's helpers: the addresses are in the L4 pseudo-header
/// (`BPF_F_PSEUDO_HDR`), so a `CHECKSUM_PARTIAL` skb, whose L4 checksum
/// field holds only the pseudo-header sum, stays right; a zero UDP checksum
/// stays zero. An endpoint whose address does not change only has its port
/// rewritten. Packet pointers in `pkt` are invalid afterwards.
#[inline(always)]
pub fn rewrite_tc(
    ctx: &TcContext,
    pkt: &PacketV4,
    src: Option<Endpoint>,
    dst: Option<Endpoint>,
) -> Result<(), i64> {
    if let Some(new) = src {
        replace_tc(
            ctx,
            pkt,
            (pkt.src, pkt.sport_be),
            new,
            IP_SRC_OFF,
            L4_SPORT_OFF,
        )?;
    }
    if let Some(new) = dst {
        replace_tc(
            ctx,
            pkt,
            (pkt.dst, pkt.dport_be),
            new,
            IP_DST_OFF,
            L4_DPORT_OFF,
        )?;
    }
    Ok(())
}

/// Replaces one endpoint (`old` → `new`) at `addr_off` / `port_off`.
#[inline(always)]
fn replace_tc(
    ctx: &TcContext,
    pkt: &PacketV4,
    old: Endpoint,
    new: Endpoint,
    addr_off: usize,
    port_off: usize,
) -> Result<(), i64> {
    let mangled0 = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if old.0 != new.0 {
        let (o, n) = (
            u32::from_ne_bytes(old.0) as u64,
            u32::from_ne_bytes(new.0) as u64,
        );
        ctx.l4_csum_replace(
            pkt.l4_check_off,
            o,
            n,
            BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
        )?;
        ctx.l3_csum_replace(IP_CHECK_OFF, o, n, 4)?;
        ctx.store(addr_off, &new.0, 0)?;
    }
    if old.1 != new.1 {
        ctx.l4_csum_replace(pkt.l4_check_off, old.1 as u64, new.1 as u64, mangled0 | 2)?;
        ctx.store(port_off, &new.1, 0)?;
    }
    Ok(())
}
