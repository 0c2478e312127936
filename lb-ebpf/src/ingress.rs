//! The XDP path: parse → frontend → conntrack → (new flow: Maglev, pin) →
//! DNAT → XDP_PASS (the kernel routes to the local pod).

use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
use lb_common::{Counters, REASON_MAGLEV, REASON_REBALANCED, Stats};

use crate::{
    conntrack::{self, Lookup},
    maps::{LB_BE_COUNTERS, LB_FRONTENDS_V4, LB_STATS, LB_SVC_COUNTERS},
    nat,
    parse::{self, Bounds, Skip},
    select,
};

/// Handles one packet; always returns a verdict (never aborts).
#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    let Some(st) = LB_STATS.get_ptr_mut(0) else {
        return XDP_PASS;
    };
    // SAFETY: per-CPU value, only this program run touches it.
    let st = unsafe { &mut *st };
    st.xdp_packets += 1;

    let b = Bounds {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let pkt = match parse::parse_v4(b) {
        Ok(p) => p,
        Err(skip) => {
            count_skip(st, skip);
            return XDP_PASS;
        }
    };

    let key = lb_common::FrontendKeyV4 {
        addr: pkt.dst,
        port_be: pkt.dport_be,
        proto: pkt.proto,
        _pad: 0,
    };
    // SAFETY: read-only copy of a hash value.
    let Some(svc) = (unsafe { LB_FRONTENDS_V4.get(&key) }).copied() else {
        st.pass_not_service += 1;
        return XDP_PASS;
    };

    let now = conntrack::now();
    let fkey = conntrack::forward_key(&pkt);
    let (id, be, new_flow) =
        match conntrack::lookup_forward(&fkey, svc.service_id, pkt.tcp_flags, now) {
            Lookup::Hit(id, be) => {
                st.established += 1;
                (id, be, false)
            }
            found => {
                let Some((id, be)) = select::maglev(&svc, &pkt) else {
                    st.pass_no_backend += 1;
                    bump(LB_SVC_COUNTERS.get_ptr_mut(svc.service_id), |c| {
                        c.no_backend += 1
                    });
                    return XDP_PASS;
                };
                let reason = if matches!(found, Lookup::Stale) {
                    st.rebalanced += 1;
                    REASON_REBALANCED
                } else {
                    REASON_MAGLEV
                };
                if !conntrack::pin(&pkt, svc.service_id, id, &be, reason, now) {
                    st.ct_insert_failed += 1;
                }
                st.new_flows += 1;
                (id, be, true)
            }
        };

    nat::dnat_xdp(&pkt, be.addr, be.port_be);

    let len = pkt.len as u64;
    let account = |c: &mut Counters| {
        c.packets += 1;
        c.bytes += len;
        if new_flow {
            c.new_flows += 1;
        }
    };
    bump(LB_SVC_COUNTERS.get_ptr_mut(svc.service_id), account);
    bump(LB_BE_COUNTERS.get_ptr_mut(id), account);
    XDP_PASS
}

#[inline(always)]
fn bump(c: Option<*mut Counters>, f: impl FnOnce(&mut Counters)) {
    if let Some(c) = c {
        // SAFETY: per-CPU value, only this program run touches it.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn count_skip(st: &mut Stats, skip: Skip) {
    match skip {
        Skip::NotIpv4 => st.pass_not_ipv4 += 1,
        Skip::OtherProto => st.pass_other_proto += 1,
        Skip::Truncated => st.pass_truncated += 1,
        Skip::IpOptions => st.pass_ip_options += 1,
        Skip::Fragment => st.pass_fragment += 1,
    }
}
