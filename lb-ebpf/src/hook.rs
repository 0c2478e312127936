//! The two hooks the ingress logic runs at, and what it needs from each.
//!
//! XDP is the fast hook on a NIC whose driver runs XDP natively. On a veth
//! and other virtual devices, XDP must first turn each skb into an XDP
//! buffer (often a copy), its `XDP_TX` frames reach the peer only when the
//! peer runs an XDP program too, and `XDP_REDIRECT` drops frames at devices
//! without XDP transmit; there the same logic runs at TC ingress, on the
//! skb, and sends packets with `bpf_redirect` / `bpf_redirect_neigh`.
//!
//! `ingress::handle` is written once against [`Hook`] and returns an
//! [`Action`]; each entry point maps the action to its hook's verdict.
//! What differs:
//! - rewrites: XDP writes the headers and updates the checksums itself; TC
//!   uses the kernel's checksum helpers, which also handle skbs whose L4
//!   checksum is left to the device (`CHECKSUM_PARTIAL`: packets from a
//!   socket on this host over a veth with transmit offload on);
//! - forwarding: XDP writes the next hop's MACs from `bpf_fib_lookup` and
//!   leaves by `XDP_TX`/`XDP_REDIRECT`; TC lets `bpf_redirect_neigh` fill in
//!   the MACs (resolving the neighbour when needed: nothing is handed back to
//!   the kernel for that);
//! - resizing a packet into a reject: `bpf_xdp_adjust_*` or
//!   `bpf_skb_change_*`.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT,
        bpf_fib_lookup as FibParams,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head, bpf_skb_change_tail,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::{Stats, csum};

use crate::{
    nat::{self, Endpoint},
    parse::{
        self, Bounds, ICMP_QUOTE_END, IP_CHECK_OFF, IP_TTL_OFF, IcmpErrorV4, L4_OFF, PacketV4, Skip,
    },
};

/// What the ingress logic decided for a packet.
#[derive(Clone, Copy)]
pub enum Action {
    /// On to the kernel's stack (untouched, or rewritten for a local pod).
    Pass,
    /// Dropped (every drop has its counter in `Stats`).
    Drop,
    /// Back out of the interface it came in by (a reject).
    Bounce,
    /// Out of interface `ifindex` towards the next hop (a remote backend,
    /// or a client of a forwarded flow).
    Forward(u32),
}

/// What the ingress logic needs from the hook it runs at.
pub trait Hook {
    /// The packet's memory.
    fn bounds(&self) -> Bounds;
    /// Makes the first `len` bytes directly readable (TC: an skb's headers
    /// may sit in paged data); false if it could not.
    fn pull(&self, len: u32) -> bool;
    /// The interface the packet came in by.
    fn ifindex(&self) -> u32;
    /// Rewrites the source and/or destination of `pkt` with checksum
    /// updates; false if a helper failed (TC). `pkt`'s pointers may be
    /// invalid afterwards.
    fn rewrite(&self, pkt: &PacketV4, src: Option<Endpoint>, dst: Option<Endpoint>) -> bool;
    /// Sends `pkt`, already rewritten to leave from `src` to `dst`, to its
    /// next hop, or hands it to the kernel when the kernel must help (TTL
    /// expiring, no route).
    fn forward(&self, pkt: &PacketV4, src: Endpoint, dst: Endpoint, st: &mut Stats) -> Action;
    /// Grows the packet by `n` bytes at the front.
    fn grow_head(&self, n: u32) -> bool;
    /// Trims the packet from `cur` to `len` bytes.
    fn trim(&self, cur: u32, len: u32) -> bool;
}

/// The packet at `h`, parsed once ([`parse::parse_v4`]); at TC, headers
/// that sit in an skb's paged data are pulled in first.
#[inline(always)]
pub fn parse_v4(h: &impl Hook) -> Result<PacketV4, Skip> {
    let parsed = parse::parse_v4(h.bounds());
    if matches!(parsed, Err(Skip::Truncated)) && h.pull((L4_OFF + 20) as u32) {
        return parse::parse_v4(h.bounds());
    }
    parsed
}

/// An ICMP error at `h` quoting a TCP/UDP packet
/// ([`parse::parse_icmp_error_v4`]); at TC the quote, up to the quoted
/// TCP checksum (the longest read), is pulled in first.
#[inline(always)]
pub fn parse_icmp_error(h: &impl Hook) -> Option<IcmpErrorV4> {
    h.pull(ICMP_QUOTE_END as u32);
    parse::parse_icmp_error_v4(h.bounds())
}

const AF_INET: u8 = 2;

/// Looks up the next hop of `pkt` leaving from `src` to `dst` by interface
/// `ifindex` into `p` (all zero on entry); returns the helper's code, a
/// failure counted. `tot_len` is the length the MTU check uses (0: the
/// kernel checks the skb itself, which is right for GRO aggregates larger
/// than the MTU).
#[inline(always)]
fn next_hop(
    ctx: *mut core::ffi::c_void,
    ifindex: u32,
    pkt: &PacketV4,
    (src, dst): (Endpoint, Endpoint),
    tot_len: u16,
    p: &mut FibParams,
    st: &mut Stats,
) -> i64 {
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    p.sport = src.1;
    p.dport = dst.1;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src.0);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst.0);
    // SAFETY: helper with a pointer to the caller's struct and its size.
    let rc = unsafe { bpf_fib_lookup(ctx, p, core::mem::size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        st.fib_no_neigh += 1;
    } else if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        st.fib_failed += 1;
    }
    rc
}

/// The IPv4 checksum after the TTL went from `ttl` to `ttl - 1` (the word
/// [ttl, proto] changes).
#[inline(always)]
fn ttl_words(ttl: u8, proto: u8) -> (u16, u16) {
    (
        u16::from_ne_bytes([ttl, proto]),
        u16::from_ne_bytes([ttl - 1, proto]),
    )
}

impl Hook for XdpContext {
    #[inline(always)]
    fn bounds(&self) -> Bounds {
        Bounds::xdp(self)
    }

    #[inline(always)]
    fn pull(&self, _len: u32) -> bool {
        false // an XDP frame is all in one buffer
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn rewrite(&self, pkt: &PacketV4, src: Option<Endpoint>, dst: Option<Endpoint>) -> bool {
        nat::rewrite_xdp(pkt, src, dst);
        true
    }

    #[inline(always)]
    fn forward(&self, pkt: &PacketV4, src: Endpoint, dst: Endpoint, st: &mut Stats) -> Action {
        if pkt.ttl <= 1 {
            st.fib_failed += 1;
            return Action::Pass; // the kernel sends ICMP time exceeded
        }
        // SAFETY: the parser checked the Ethernet and IPv4 headers are in
        // bounds; XDP writes go straight to the frame.
        let (eth, ip) = unsafe { (&mut *pkt.eth, &mut *pkt.ip) };
        // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
        let mut p: FibParams = unsafe { core::mem::zeroed() };
        let out = (src, dst);
        if next_hop(
            self.ctx as *mut _,
            self.ifindex(),
            pkt,
            out,
            pkt.tot_len,
            &mut p,
            st,
        ) != BPF_FIB_LKUP_RET_SUCCESS as i64
        {
            // Unresolved neighbour, no route: the kernel forwards it as
            // rewritten and resolves the neighbour for the next packets.
            return Action::Pass;
        }
        let (old, new) = ttl_words(ip.ttl, ip.proto);
        ip.ttl -= 1;
        ip.check = csum::replace2(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
        eth.dst_addr = p.dmac;
        eth.src_addr = p.smac;
        Action::Forward(p.ifindex)
    }

    #[inline(always)]
    fn grow_head(&self, n: u32) -> bool {
        // SAFETY: helper on this program's own context.
        unsafe { bpf_xdp_adjust_head(self.ctx, -(n as i32)) == 0 }
    }

    #[inline(always)]
    fn trim(&self, cur: u32, len: u32) -> bool {
        let delta = len as i32 - cur as i32;
        // SAFETY: helper on this program's own context.
        delta == 0 || unsafe { bpf_xdp_adjust_tail(self.ctx, delta) } == 0
    }
}

/// XDP's verdict for `a`.
#[inline(always)]
pub fn xdp_verdict(ctx: &XdpContext, a: Action) -> u32 {
    match a {
        Action::Pass => XDP_PASS,
        Action::Drop => XDP_DROP,
        Action::Bounce => XDP_TX,
        Action::Forward(i) if i == ctx.ifindex() => XDP_TX,
        // SAFETY: helper without pointers.
        Action::Forward(i) => unsafe { bpf_redirect(i, 0) as u32 },
    }
}

impl Hook for TcContext {
    #[inline(always)]
    fn bounds(&self) -> Bounds {
        Bounds::tc(self)
    }

    #[inline(always)]
    fn pull(&self, len: u32) -> bool {
        self.pull_data(len.min(self.len())).is_ok()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context's own skb; at ingress `ifindex` is the device
        // the packet came in by.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn rewrite(&self, pkt: &PacketV4, src: Option<Endpoint>, dst: Option<Endpoint>) -> bool {
        nat::rewrite_tc(self, pkt, src, dst).is_ok()
    }

    #[inline(always)]
    fn forward(&self, pkt: &PacketV4, src: Endpoint, dst: Endpoint, st: &mut Stats) -> Action {
        if pkt.ttl <= 1 {
            st.fib_failed += 1;
            return Action::Pass; // the kernel sends ICMP time exceeded
        }
        // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
        let mut p: FibParams = unsafe { core::mem::zeroed() };
        let ctx = self.skb.skb as *mut _;
        let rc = next_hop(ctx, self.ifindex(), pkt, (src, dst), 0, &mut p, st);
        // Route known, neighbour not resolved yet: bpf_redirect_neigh
        // resolves it and queues the packet meanwhile.
        if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
            return Action::Pass;
        }
        let ifindex = p.ifindex;
        let (old, new) = ttl_words(pkt.ttl, pkt.proto);
        if self.store(IP_TTL_OFF, &(pkt.ttl - 1), 0).is_err()
            || self
                .l3_csum_replace(IP_CHECK_OFF, old as u64, new as u64, 2)
                .is_err()
        {
            st.tc_rewrite_failed += 1;
            return Action::Drop;
        }
        Action::Forward(ifindex)
    }

    #[inline(always)]
    fn grow_head(&self, n: u32) -> bool {
        // SAFETY: helper on this program's own skb.
        let grown = unsafe { bpf_skb_change_head(self.skb.skb, n, 0) == 0 };
        grown && self.pull(n + 128)
    }

    #[inline(always)]
    fn trim(&self, cur: u32, len: u32) -> bool {
        // SAFETY: helper on this program's own skb.
        cur == len || unsafe { bpf_skb_change_tail(self.skb.skb, len, 0) == 0 }
    }
}

/// TC's verdict for `a`.
#[inline(always)]
pub fn tc_verdict(ctx: &TcContext, a: Action) -> i32 {
    match a {
        Action::Pass => TC_ACT_OK as i32,
        Action::Drop => TC_ACT_SHOT as i32,
        // SAFETY: helpers without pointers (no neighbour parameters: the
        // kernel looks the next hop up itself).
        Action::Bounce => unsafe { bpf_redirect(ctx.ifindex(), 0) as i32 },
        Action::Forward(i) => unsafe { bpf_redirect_neigh(i, core::ptr::null_mut(), 0, 0) as i32 },
    }
}
