//! Sending a rewritten packet on from XDP: `bpf_fib_lookup` finds the next
//! hop and its MAC; the packet leaves by `XDP_TX` (same interface) or
//! `XDP_REDIRECT` (another one). When the kernel must help (neighbour not
//! resolved yet, TTL expiring, fragmentation needed, no route) the packet is
//! passed to it as rewritten, so nothing is lost: the kernel forwards it and
//! resolves the neighbour for the next packets.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action::{XDP_PASS, XDP_TX},
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{Stats, csum};

use crate::parse::PacketV4;

const AF_INET: u8 = 2;

/// Forwards `pkt` (already rewritten: its IPv4 header holds the new
/// addresses) towards its destination.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &PacketV4, st: &mut Stats) -> u32 {
    // SAFETY: the parser checked the Ethernet and IPv4 headers are in bounds.
    let (eth, ip) = unsafe { (&mut *pkt.eth, &mut *pkt.ip) };
    if ip.ttl <= 1 {
        st.fib_failed += 1;
        return XDP_PASS; // the kernel sends ICMP time exceeded
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    // SAFETY: the ports were bounds-checked by the parser.
    let [sport, dport] = unsafe { *pkt.ports };
    p.sport = sport;
    p.dport = dport;
    p.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    // SAFETY: helper with a pointer to our stack struct and its size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
            st.fib_no_neigh += 1;
        } else {
            st.fib_failed += 1;
        }
        return XDP_PASS;
    }
    // Decrement the TTL (the word [ttl, proto] changes in the checksum).
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.check = csum::replace2(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
    eth.dst_addr = p.dmac;
    eth.src_addr = p.smac;
    if p.ifindex == ctx.ingress_ifindex() as u32 {
        XDP_TX
    } else {
        // SAFETY: helper without pointers.
        unsafe { bpf_redirect(p.ifindex, 0) as u32 }
    }
}
