//! ICMP errors about translated flows, translated back, so that Path MTU
//! discovery ("fragmentation needed"), unreachables and time exceeded reach
//! the host that sent the quoted packet, quoting the packet as it sent it.
//!
//! * TC egress: an error this node (or a hop behind it) sends to a client
//!   about a packet DNAT'd towards a local pod: the quote's destination goes
//!   back to the frontend (and its source port back to the client's, if it
//!   was remapped). Found through the flow's reply entry.
//! * XDP: an error about a packet this node sent on a flow's behalf: a
//!   forwarded packet (quote: SNAT endpoint → backend; found through the NAT
//!   mapping) goes to the client, quoting client → frontend; a reply to a
//!   client (quote: frontend → client; found through the forward entry)
//!   goes to the backend, quoting backend → client as the backend sent it.
//!   Both are handed to the kernel (`XDP_PASS`), which routes them.
//!
//! Only the outer destination and the quote change; every checksum is
//! updated incrementally (the ICMP checksum covers the quote; every changed
//! field sits at an even offset from the ICMP header, so word replacement
//! holds). A zero quoted UDP checksum stays zero.

use lb_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_DIR_SNAT, IPPROTO_UDP, Stats, csum, flow};

use crate::{
    maps::{LB_CT_V4, LB_NAT_V4},
    nat::Endpoint,
    parse::IcmpErrorV4,
};

/// The key of the quoted packet's reverse direction in `dir`: the quote is
/// what was sent (a → b); its answer would be b → a.
#[inline(always)]
fn answer_key(e: &IcmpErrorV4, dir: u8) -> lb_common::CtKeyV4 {
    flow::key(
        (e.inner_dst, e.inner_dport_be),
        (e.inner_src, e.inner_sport_be),
        e.inner_proto,
        dir,
    )
}

/// TC egress: the quote of a client → local pod packet goes back to client
/// → frontend. True if translated.
#[inline(always)]
pub fn translate_tc(e: &IcmpErrorV4, st: &mut Stats) -> bool {
    let key = answer_key(e, CT_DIR_REPLY);
    // SAFETY: read-only copy of an LRU value.
    let Some(r) = (unsafe { LB_CT_V4.get(&key) }).copied() else {
        return false;
    };
    let client = if r.port_remapped() {
        Some(flow::client_of_reply(&key, &r))
    } else {
        None
    };
    rewrite(e, None, client, Some((r.nat_addr, r.nat_port_be)));
    st.tc_icmp_translated += 1;
    true
}

/// XDP: an error about a packet this node sent for a flow. True if
/// translated (the caller passes it to the kernel).
#[inline(always)]
pub fn translate_xdp(e: &IcmpErrorV4, st: &mut Stats) -> bool {
    // A forwarded packet: SNAT endpoint → backend.
    let nkey = answer_key(e, CT_DIR_SNAT);
    // SAFETY: read-only copy of a hash value.
    if let Some(n) = (unsafe { LB_NAT_V4.get(&nkey) }).copied() {
        rewrite(
            e,
            Some(n.client_addr),
            Some((n.client_addr, n.client_port_be)),
            Some((n.frontend_addr, n.frontend_port_be)),
        );
        st.icmp_translated += 1;
        return true;
    }
    // A reply to a client: frontend → client.
    let fkey = answer_key(e, CT_DIR_FORWARD);
    // SAFETY: read-only copy of an LRU value.
    let Some(f) = (unsafe { LB_CT_V4.get(&fkey) }).copied() else {
        return false;
    };
    if e.outer_dst != e.inner_src {
        return false; // not addressed to the frontend that sent the quote
    }
    // As the backend sent it: from the backend, to the client as the
    // backend sees it (this node's SNAT endpoint, or a remapped port).
    let to = flow::rewritten_source(&f);
    rewrite(e, Some(f.nat_addr), Some((f.nat_addr, f.nat_port_be)), to);
    st.icmp_translated += 1;
    true
}

/// Rewrites the outer destination, the quote's source and destination.
#[inline(always)]
fn rewrite(
    e: &IcmpErrorV4,
    outer_dst: Option<[u8; 4]>,
    src: Option<Endpoint>,
    dst: Option<Endpoint>,
) {
    // SAFETY: the parser checked every pointer is inside the packet; the
    // program owns the packet memory (XDP, or TC after a pull).
    unsafe {
        let ip = &mut *e.ip;
        let inner = &mut *e.inner_ip;
        if let Some(a) = outer_dst {
            let c = u16::from_ne_bytes(ip.check);
            let c = csum::replace4(c, u32::from_ne_bytes(ip.dst_addr), u32::from_ne_bytes(a));
            ip.check = c.to_ne_bytes();
            ip.dst_addr = a;
        }
        let old_ip_check = u16::from_ne_bytes(inner.check);
        let old_l4 = e.inner_l4_check.map(|p| u16::from_ne_bytes(*p));
        let mut sums = Sums {
            ip: old_ip_check,
            icmp: u16::from_ne_bytes(*e.icmp_check),
            l4: old_l4,
        };
        if let Some(new) = src {
            replace(
                &mut inner.src_addr,
                &mut (*e.inner_ports)[0],
                new,
                &mut sums,
            );
        }
        if let Some(new) = dst {
            replace(
                &mut inner.dst_addr,
                &mut (*e.inner_ports)[1],
                new,
                &mut sums,
            );
        }
        let Sums {
            ip: ip_check,
            mut icmp,
            mut l4,
        } = sums;
        if e.inner_proto == IPPROTO_UDP
            && let (Some(o), Some(n)) = (old_l4, l4)
        {
            l4 = Some(csum::udp_fixup(o, n));
        }
        icmp = csum::replace2(icmp, old_ip_check, ip_check);
        inner.check = ip_check.to_ne_bytes();
        if let (Some(p), Some(o), Some(n)) = (e.inner_l4_check, old_l4, l4) {
            icmp = csum::replace2(icmp, o, n);
            *p = n.to_ne_bytes();
        }
        *e.icmp_check = icmp.to_ne_bytes();
    }
}

/// The checksums a quote rewrite updates: the quoted IPv4 header's, the
/// ICMP message's, and the quoted L4 one when the quote reaches it.
struct Sums {
    ip: u16,
    icmp: u16,
    l4: Option<u16>,
}

/// Replaces one endpoint of the quote (address and port) and updates `sums`.
#[inline(always)]
fn replace(addr: &mut [u8; 4], port: &mut u16, new: Endpoint, sums: &mut Sums) {
    let (o, n) = (u32::from_ne_bytes(*addr), u32::from_ne_bytes(new.0));
    sums.ip = csum::replace4(sums.ip, o, n);
    sums.icmp = csum::replace2(csum::replace4(sums.icmp, o, n), *port, new.1);
    sums.l4 = sums
        .l4
        .map(|c| csum::replace2(csum::replace4(c, o, n), *port, new.1));
    *addr = new.0;
    *port = new.1;
}
