//! Exact open-flow counts per backend (`LB_BE_OPEN`), kept through the
//! registry `LB_OPEN_FLOWS_V4` (see `lb_common::OpenFlowV4`):
//!
//! * [`open`]: the insert that creates a flow's entry counts it up.
//! * [`close`]: whoever swaps the entry's `open` flag from 1 to 0 counts it
//!   down (an atomic exchange: exactly one winner among the datapath's RST /
//!   FIN-both-ways paths, a re-balance and the agent's `lb_flow_end`), then
//!   deletes the entry.
//!
//! Nothing else changes a count, so a count equals the number of open
//! entries naming that backend, whatever happens to conntrack.

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    programs::XdpContext,
};
use lb_common::{
    CT_TCP_FIN_FWD, CT_TCP_FIN_REPLY, CtKeyV4, CtValueV4, FLOW_CLOSED, FLOW_OPEN, OpenFlowV4,
    Stats, flow,
};

use crate::{
    atomic,
    maps::{LB_BE_OPEN, LB_CT_V4, LB_NAT_V4, LB_OPEN_FLOWS_V4},
};

/// `-EEXIST`.
const EEXIST: i32 = -17;

#[inline(always)]
fn add(backend_id: u32, delta: u64) {
    if let Some(p) = LB_BE_OPEN.get_ptr_mut(backend_id) {
        // SAFETY: an array value stays mapped; every writer uses atomics.
        unsafe { atomic::add(p, delta) };
    }
}

/// Open flows of backend `id` on this node.
#[inline(always)]
pub fn count(id: u32) -> u64 {
    match LB_BE_OPEN.get_ptr(id) {
        // SAFETY: as in `add`; a plain atomic load.
        Some(p) => unsafe { atomic::load(p) },
        None => u64::MAX,
    }
}

/// Counts the flow `key` on `backend_id` (idempotent: a flow already counted
/// on that backend stays counted once; one counted on another backend moves).
/// A full registry leaves the flow uncounted (`flows_untracked`).
#[inline(always)]
pub fn open(key: &CtKeyV4, backend_id: u32, service_id: u32, now: u64, st: &mut Stats) {
    let value = OpenFlowV4 {
        backend_id,
        service_id,
        created_ns: now,
        open: FLOW_OPEN,
    };
    let mut tries = 0;
    while tries < 3 {
        match LB_OPEN_FLOWS_V4.insert(key, value, BPF_NOEXIST as u64) {
            Ok(()) => {
                add(backend_id, 1);
                st.flows_opened += 1;
                return;
            }
            Err(EEXIST) => {
                if let Some(p) = LB_OPEN_FLOWS_V4.get_ptr_mut(key) {
                    // SAFETY: not-preallocated hash value, valid (RCU) for this run.
                    let e = unsafe { &*p };
                    if e.backend_id == backend_id
                        && unsafe { atomic::load(&raw const e.open) } == FLOW_OPEN
                    {
                        return; // already counted here
                    }
                }
                // Counted on another backend (re-balanced): count it down
                // there. If another CPU wins that swap, it deletes the
                // entry; only the winner ever deletes, so no insert of ours
                // can be deleted by mistake. Then retry.
                close_counted(key, st);
            }
            Err(_) => break,
        }
        tries += 1;
    }
    st.flows_untracked += 1;
}

/// Counts the flow `key` down if it is counted and this caller wins the
/// swap; deletes its registry entry. True if this call counted it down.
#[inline(always)]
pub fn close(key: &CtKeyV4) -> bool {
    let Some(p) = LB_OPEN_FLOWS_V4.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: not-preallocated hash value, valid (RCU) during this run even
    // if another CPU deletes it; the flag is only changed atomically.
    let (flag, backend_id) = unsafe { (&raw mut (*p).open, (*p).backend_id) };
    let was = unsafe { atomic::swap(flag, FLOW_CLOSED) };
    if was != FLOW_OPEN {
        return false;
    }
    add(backend_id, u64::MAX); // -1
    let _ = LB_OPEN_FLOWS_V4.remove(key);
    true
}

/// [`close`] with the datapath's counter.
#[inline(always)]
pub fn close_counted(key: &CtKeyV4, st: &mut Stats) {
    if close(key) {
        st.flows_closed += 1;
    }
}

/// The client's FIN was just recorded on forward entry `ct` of flow `key`:
/// if the pod's FIN was seen too (on the reply entry, or the NAT mapping of
/// a forwarded flow), the flow is over.
#[inline(always)]
pub fn client_fin(key: &CtKeyV4, ct: &CtValueV4, st: &mut Stats) {
    let partner = flow::partner_key(key, ct);
    let reply_fin = if ct.forwarded() {
        // SAFETY: read-only copy of one field.
        unsafe { LB_NAT_V4.get(&partner) }.map(|n| n.tcp_flags)
    } else {
        // SAFETY: read-only copy of one field.
        unsafe { LB_CT_V4.get(&partner) }.map(|r| r.tcp_flags)
    };
    if reply_fin.is_some_and(|f| f & CT_TCP_FIN_REPLY != 0) {
        close_counted(key, st);
    }
}

/// The pod's FIN was just recorded for the flow whose forward key is `fkey`:
/// if the client's FIN was seen too, the flow is over.
#[inline(always)]
pub fn pod_fin(fkey: &CtKeyV4, st: &mut Stats) {
    // SAFETY: read-only copy of one field.
    let fwd = unsafe { LB_CT_V4.get(fkey) }.map(|c| c.tcp_flags);
    if fwd.is_some_and(|f| f & CT_TCP_FIN_FWD != 0) {
        close_counted(fkey, st);
    }
}

/// `lb_flow_end`: the "packet" is a forward [`CtKeyV4`]; close it.
#[inline(always)]
pub fn end_from_ctx(ctx: &XdpContext) -> u32 {
    let b = crate::parse::Bounds::xdp(ctx);
    let Some(p) = b.ptr_at::<CtKeyV4>(0) else {
        return XDP_DROP;
    };
    // SAFETY: in bounds; `CtKeyV4` is valid for any bytes.
    let key = unsafe { core::ptr::read_unaligned(p) };
    if close(&key) { XDP_PASS } else { XDP_DROP }
}
