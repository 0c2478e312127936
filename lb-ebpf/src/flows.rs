//! Exact open-flow counts per backend (`LB_BE_OPEN`), kept through the
//! preallocated registry `LB_OPEN_FLOWS_V4` (see `lb_common::OpenFlowV4`)
//! and the flow's token, so that a new flow costs no kernel allocation.
//!
//! Every flow pinned by XDP gets a token (`lb_common::flow_token`): the next
//! number of the node-wide sequence `LB_FLOW_SEQ` (an atomic
//! fetch-and-add; never reused, since the sequence is pinned and 2^46 flows
//! wide) with the backend id in its low bits. The token is written in the
//! flow's conntrack entries, forward and reply. The registry entry of the
//! flow's forward key holds the token while the flow is counted:
//!
//! * [`open`]: count up (`+1` on the token's backend), then install the
//!   token: insert the entry, or swap a closed entry of that key from
//!   `FLOW_CLOSED` to the token (compare-and-swap). If neither works (the
//!   key holds another flow's token, or the registry is full), count down
//!   again: the flow is `flows_untracked` until the agent's collector counts
//!   it. Counting before installing keeps a count from dipping below zero
//!   while a racing close of the just-installed token runs.
//! * [`close`]: whoever swaps the entry from the flow's token to
//!   `FLOW_CLOSED` (compare-and-swap: exactly one winner among the
//!   datapath's RST / FIN-both-ways paths, a re-balance and the agent's
//!   `lb_flow_end`) counts the token's backend down. The entry stays, closed,
//!   for the next flow of that key or for the collector, which deletes it
//!   through `lb_flow_end` (`FLOW_END_RETIRE`: swapped to `FLOW_RETIRED`
//!   first, then deleted). The datapath never deletes a registry entry.
//!
//! Why this is exact with a preallocated map: the kernel reuses a deleted
//! element of a preallocated hash at once, so a pointer from a lookup may
//! point at an element that now holds another key. Every change of `open`
//! is a compare-and-swap from a value the caller knows: a token (unique, so
//! it matches only the element that holds that very flow), `FLOW_CLOSED` or
//! `FLOW_RETIRED`; and nothing is read from an element before a swap
//! succeeds, the backend to count down being part of the token. So each
//! token is counted up once when installed and down at most once, by the
//! swap that removes it, whatever element it sits in: `LB_BE_OPEN[b]` is the
//! number of registry entries holding a token of backend `b` (plus, for a
//! moment, the installs in flight). Only a closed entry is ever retired and
//! deleted, so a counted token is never lost.
//!
//! Why no count leaks up forever though conntrack is an LRU: the registry
//! is not, and the collector checks every counted entry against the
//! forward conntrack entry of its key. An entry whose token that conntrack
//! entry no longer holds (evicted, re-pinned elsewhere) or whose backend
//! left the service is counted down by the collector (`FLOW_END_CLOSE`); a
//! live flow whose token is not in the registry (untracked, or its key held
//! the token of the evicted flow it replaced) is counted by it
//! (`FLOW_END_COUNT`). Between two collections a count may thus include an
//! evicted flow (or one that ended while the collector counted it: its
//! RST or FINs make it expire at a later collection), or miss a re-pinned
//! one; it never goes negative, and a flow that is gone leaves its count at
//! the first collection after the closed-flow grace.
//!
//! One race ends the same way: an [`install`] whose lookup returned an
//! element that the collector retired, deleted and the kernel reused for
//! another key, closed since, swaps its token into that element. The token
//! is counted once and sits under the wrong key; the collector counts it
//! down (that key's conntrack entry does not hold it) and counts the flow
//! under its own key: the flow may be counted twice, or not at all, until
//! the first collections after the grace.

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    programs::XdpContext,
};
use lb_common::{
    CT_TCP_FIN_FWD, CT_TCP_FIN_REPLY, CtKeyV4, CtValueV4, FLOW_CLOSED, FLOW_END_CLOSE,
    FLOW_END_COUNT, FLOW_END_RETIRE, FLOW_RETIRED, FlowEndV4, OpenFlowV4, Stats, flow, flow_token,
    token_backend, token_live,
};

use crate::{
    atomic,
    maps::{LB_BE_OPEN, LB_CT_V4, LB_FLOW_SEQ, LB_NAT_V4, LB_OPEN_FLOWS_V4},
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

/// A new token for a flow pinned to `backend_id` (0 if the sequence is
/// missing, which a one-entry array never is: such a flow is not counted).
#[inline(always)]
pub fn next_token(backend_id: u32) -> u64 {
    match LB_FLOW_SEQ.get_ptr_mut(0) {
        // SAFETY: an array value stays mapped; only atomics touch it.
        Some(p) => flow_token(unsafe { atomic::fetch_add(p, 1) } + 1, backend_id),
        None => 0,
    }
}

/// What [`install`] did.
#[derive(PartialEq, Eq)]
pub enum Installed {
    /// This call installed the token and counted it up.
    Now,
    /// The key already holds this token (counted once, not again).
    Already,
    /// Not counted: the key holds another token, or the registry is full.
    No,
}

/// Counts flow `key` with `token` (see the module doc): count up, then
/// install the token in the key's registry entry (insert, or reuse the
/// key's closed entry); count down again if it cannot be installed.
#[inline(always)]
pub fn install(key: &CtKeyV4, token: u64, service_id: u32, now: u64) -> Installed {
    if !token_live(token) {
        return Installed::No;
    }
    let backend_id = token_backend(token);
    add(backend_id, 1);
    let value = OpenFlowV4 {
        backend_id,
        service_id,
        created_ns: now,
        open: token,
    };
    match LB_OPEN_FLOWS_V4.insert(key, value, BPF_NOEXIST as u64) {
        Ok(()) => return Installed::Now,
        Err(EEXIST) => {
            if let Some(p) = LB_OPEN_FLOWS_V4.get_ptr_mut(key) {
                // SAFETY: a preallocated hash element stays mapped (it may
                // be reused for another key: the swap from FLOW_CLOSED is
                // what decides, see the module doc).
                let was = unsafe { atomic::cmpxchg(&raw mut (*p).open, FLOW_CLOSED, token) };
                if was == FLOW_CLOSED {
                    // Ours now: nobody else writes an entry holding our
                    // token. The other fields are for operators and the
                    // collector's age check.
                    unsafe {
                        (*p).backend_id = backend_id;
                        (*p).service_id = service_id;
                        (*p).created_ns = now;
                    }
                    return Installed::Now;
                }
                if was == token {
                    add(backend_id, u64::MAX); // -1: counted once already
                    return Installed::Already;
                }
            }
        }
        Err(_) => {}
    }
    add(backend_id, u64::MAX); // -1
    Installed::No
}

/// [`install`] with the datapath's counters.
#[inline(always)]
pub fn open(key: &CtKeyV4, token: u64, service_id: u32, now: u64, st: &mut Stats) {
    match install(key, token, service_id, now) {
        Installed::Now => st.flows_opened += 1,
        Installed::Already => {}
        Installed::No => st.flows_untracked += 1,
    }
}

/// Counts flow `key` down if its registry entry holds `token` and this
/// caller wins the swap to `FLOW_CLOSED`. True if this call counted it down.
#[inline(always)]
pub fn close(key: &CtKeyV4, token: u64) -> bool {
    if !token_live(token) {
        return false;
    }
    let Some(p) = LB_OPEN_FLOWS_V4.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a preallocated hash element stays mapped; the swap only
    // succeeds on the element that holds this very token.
    let was = unsafe { atomic::cmpxchg(&raw mut (*p).open, token, FLOW_CLOSED) };
    if was != token {
        return false;
    }
    add(token_backend(token), u64::MAX); // -1
    true
}

/// [`close`] with the datapath's counter.
#[inline(always)]
pub fn close_counted(key: &CtKeyV4, token: u64, st: &mut Stats) {
    if close(key, token) {
        st.flows_closed += 1;
    }
}

/// [`close_counted`] for a caller without the token: reads it from the
/// flow's forward conntrack entry (a flow whose entry is gone is left to the
/// collector).
#[inline(always)]
pub fn close_flow(fkey: &CtKeyV4, st: &mut Stats) {
    // SAFETY: read-only copy of one field of an LRU value.
    if let Some(token) = unsafe { LB_CT_V4.get(fkey) }.map(|c| c.token) {
        close_counted(fkey, token, st);
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
        close_counted(key, ct.token, st);
    }
}

/// The pod's FIN was just recorded for the flow whose forward key is `fkey`:
/// if the client's FIN was seen too, the flow is over.
#[inline(always)]
pub fn pod_fin(fkey: &CtKeyV4, st: &mut Stats) {
    // SAFETY: read-only copy of two fields.
    let fwd = unsafe { LB_CT_V4.get(fkey) }.map(|c| (c.tcp_flags, c.token));
    if let Some((flags, token)) = fwd
        && flags & CT_TCP_FIN_FWD != 0
    {
        close_counted(fkey, token, st);
    }
}

/// Deletes the registry entry of `key` if it is closed: swapped to
/// `FLOW_RETIRED` first, so that no [`install`] reuses it while it goes (and
/// only the collector, one call at a time, retires). True if deleted.
#[inline(always)]
fn retire(key: &CtKeyV4) -> bool {
    let Some(p) = LB_OPEN_FLOWS_V4.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: as in `close`.
    let was = unsafe { atomic::cmpxchg(&raw mut (*p).open, FLOW_CLOSED, FLOW_RETIRED) };
    // The entry of `key` is the retired one: nothing else deletes or
    // replaces a registry entry.
    was == FLOW_CLOSED && LB_OPEN_FLOWS_V4.remove(key).is_ok()
}

/// `lb_flow_end`: the "packet" is a [`FlowEndV4`]; `XDP_PASS` if the
/// operation took effect, else `XDP_DROP`.
#[inline(always)]
pub fn end_from_ctx(ctx: &XdpContext) -> u32 {
    let b = crate::parse::Bounds::xdp(ctx);
    let Some(p) = b.ptr_at::<FlowEndV4>(0) else {
        return XDP_DROP;
    };
    // SAFETY: in bounds; `FlowEndV4` is valid for any bytes.
    let req = unsafe { core::ptr::read_unaligned(p) };
    let done = match req.op {
        FLOW_END_CLOSE => close(&req.key, req.token),
        FLOW_END_COUNT => {
            let now = crate::conntrack::now();
            install(&req.key, req.token, req.service_id, now) == Installed::Now
        }
        FLOW_END_RETIRE => retire(&req.key),
        _ => false,
    };
    if done { XDP_PASS } else { XDP_DROP }
}
