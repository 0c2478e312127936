//! The TC egress path: a reply from a backend (backend → client) whose flow
//! is in conntrack gets its source rewritten back to the frontend the client
//! used (and its destination port back to the client's, when the flow's
//! port was remapped). Everything else continues untouched.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_UNSPEC},
    programs::TcContext,
};
use lb_common::{CT_DIR_REPLY, CT_TCP_FIN_REPLY, CT_TCP_RST, Stats, flow};

use crate::{
    conntrack, flows, hook, icmp,
    maps::{LB_CT_V4, LB_STATS},
    nat,
    parse::Skip,
};

/// Handles one outgoing packet. Returns `TC_ACT_OK` after a rewrite and
/// `TC_ACT_UNSPEC` (continue with the next program) otherwise.
#[inline(always)]
pub fn handle(ctx: &TcContext) -> i32 {
    let Some(st) = LB_STATS.get_ptr_mut(0) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: per-CPU value, only this program run touches it.
    let st = unsafe { &mut *st };
    st.tc_packets += 1;

    let pkt = hook::parse_v4(ctx);
    let pkt = match pkt {
        Ok(p) => p,
        Err(Skip::OtherProto) => return icmp_error(ctx, st),
        Err(_) => return TC_ACT_UNSPEC,
    };
    let key = conntrack::packet_key(&pkt, CT_DIR_REPLY);
    let Some(ct) = LB_CT_V4.get_ptr_mut(&key) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: LRU entry valid for this run; see conntrack::lookup_forward.
    let ct = unsafe { &mut *ct };
    let flags = flow::reply_flags(pkt.tcp_flags);
    conntrack::touch(ct, flags, conntrack::now());
    let (addr, port) = (ct.nat_addr, ct.nat_port_be);
    let client = ct.port_remapped().then_some(ct.snat_port_be);
    if flags & (CT_TCP_RST | CT_TCP_FIN_REPLY) != 0 {
        // The pod ends the flow: a RST at once, a FIN once the client's FIN
        // was seen too (the open-flow count goes down exactly once).
        let fkey = flow::forward_key_of_reply(&key, ct);
        if flags & CT_TCP_RST != 0 {
            flows::close_counted(&fkey, ct.token, st);
        } else {
            flows::pod_fin(&fkey, st);
        }
    }
    // Back to the frontend the client used; to the client's own port when
    // the flow's was remapped.
    let dst = client.map(|p| (pkt.dst, p));
    if nat::rewrite_tc(ctx, &pkt, Some((addr, port)), dst).is_err() {
        st.tc_rewrite_failed += 1;
        return TC_ACT_UNSPEC;
    }
    st.tc_reverse_nat += 1;
    TC_ACT_OK
}

/// An ICMP error leaving towards a client: its quote is translated back if
/// it is about a packet DNAT'd to a local pod.
#[inline(always)]
fn icmp_error(ctx: &TcContext, st: &mut Stats) -> i32 {
    match hook::parse_icmp_error(ctx) {
        Some(e) if icmp::translate_tc(&e, st) => TC_ACT_OK,
        _ => TC_ACT_UNSPEC,
    }
}
