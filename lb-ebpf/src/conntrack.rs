//! Conntrack: pins each flow to its backend (forward entry, looked up by XDP)
//! and remembers how to undo the DNAT on replies (reply entry, looked up by
//! TC egress). Both entries are written together when a flow is pinned.

use aya_ebpf::{bindings::BPF_ANY, helpers::generated::bpf_ktime_get_coarse_ns};
use lb_common::{
    BACKEND_FREE, BackendV4, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_SNAT, CT_TCP_FIN_FWD,
    CT_TCP_FIN_REPLY, CT_TCP_RST, CT_TCP_SYN, CtKeyV4, CtValueV4,
};

use crate::{
    maps::{LB_BACKENDS_V4, LB_CT_V4},
    parse::PacketV4,
};

/// Refresh `last_seen_ns` at most this often (saves a shared-cache-line write
/// per packet).
const TOUCH_NS: u64 = 1_000_000_000;

/// Monotonic time in nanoseconds.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The forward key of `pkt` (client → frontend).
#[inline(always)]
pub fn forward_key(pkt: &PacketV4) -> CtKeyV4 {
    CtKeyV4 {
        src_addr: pkt.src,
        dst_addr: pkt.dst,
        src_port_be: pkt.sport_be,
        dst_port_be: pkt.dport_be,
        proto: pkt.proto,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    }
}

/// The reply key of `pkt` as TC egress sees it (backend → client).
#[inline(always)]
pub fn reply_key(pkt: &PacketV4) -> CtKeyV4 {
    CtKeyV4 {
        dir: CT_DIR_REPLY,
        ..forward_key(pkt)
    }
}

/// What the forward lookup found.
pub enum Lookup {
    /// The flow is pinned to this live backend (a copy of its entry).
    Hit(CtValueV4, BackendV4),
    /// No entry: a new flow.
    Miss,
    /// An entry whose backend is gone (freed, or reused by another service):
    /// the flow must be re-balanced.
    Stale,
}

/// Looks up the flow of `key`, checks that its backend still serves
/// `service_id`, and records this packet's TCP flags and time.
#[inline(always)]
pub fn lookup_forward(key: &CtKeyV4, service_id: u32, tcp_flags: u8, now: u64) -> Lookup {
    let Some(ct) = LB_CT_V4.get_ptr_mut(key) else {
        return Lookup::Miss;
    };
    // SAFETY: LRU entries stay valid for the program's run (RCU); concurrent
    // writers only touch flags and times, for which a lost update is harmless.
    let ct = unsafe { &mut *ct };
    if ct.service_id != service_id {
        return Lookup::Stale;
    }
    let Some(be) = LB_BACKENDS_V4.get(ct.backend_id) else {
        return Lookup::Stale;
    };
    if be.state == BACKEND_FREE || be.service_id != service_id {
        return Lookup::Stale;
    }
    touch(ct, tcp_flags, now);
    Lookup::Hit(*ct, *be)
}

/// Merges `flags` into an entry's flags and refreshes its time, writing
/// only on change. A SYN after the flow ended (FIN/RST seen) starts a new
/// connection on the same 5-tuple: the old flags are cleared.
#[inline(always)]
pub fn touch_fields(tcp_flags: &mut u8, last_seen_ns: &mut u64, flags: u8, now: u64) {
    let ended = CT_TCP_FIN_FWD | CT_TCP_FIN_REPLY | CT_TCP_RST;
    if flags & CT_TCP_SYN != 0 && *tcp_flags & ended != 0 {
        *tcp_flags = CT_TCP_SYN;
    } else if *tcp_flags | flags != *tcp_flags {
        *tcp_flags |= flags;
    }
    if now.wrapping_sub(*last_seen_ns) > TOUCH_NS {
        *last_seen_ns = now;
    }
}

/// [`touch_fields`] on a conntrack entry.
#[inline(always)]
pub fn touch(ct: &mut CtValueV4, flags: u8, now: u64) {
    touch_fields(&mut ct.tcp_flags, &mut ct.last_seen_ns, flags, now);
}

/// Pins the flow of `pkt` to backend `id`: writes the forward entry and,
/// for a local backend (`snat` is `None`), the reply entry the TC program
/// uses. A remote backend's replies come back through `LB_NAT_V4` instead.
/// Returns false if an insert failed.
#[inline(always)]
pub fn pin(
    pkt: &PacketV4,
    service_id: u32,
    id: u32,
    be: &BackendV4,
    reason: u8,
    choice: u32,
    snat: Option<([u8; 4], u16)>,
    now: u64,
) -> bool {
    let (snat_addr, snat_port_be, flags) = match snat {
        Some((a, p)) => (a, p, CT_F_SNAT),
        None => ([0; 4], 0, 0),
    };
    let fwd = CtValueV4 {
        backend_id: id,
        service_id,
        nat_addr: be.addr,
        nat_port_be: be.port_be,
        tcp_flags: pkt.tcp_flags,
        reason,
        snat_addr,
        snat_port_be,
        flags,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        choice,
        _pad2: 0,
    };
    if snat.is_some() {
        return LB_CT_V4
            .insert(forward_key(pkt), fwd, BPF_ANY as u64)
            .is_ok();
    }
    let rkey = CtKeyV4 {
        src_addr: be.addr,
        dst_addr: pkt.src,
        src_port_be: be.port_be,
        dst_port_be: pkt.sport_be,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let rev = CtValueV4 {
        nat_addr: pkt.dst,
        nat_port_be: pkt.dport_be,
        tcp_flags: 0,
        ..fwd
    };
    let a = LB_CT_V4.insert(rkey, rev, BPF_ANY as u64).is_ok();
    let b = LB_CT_V4
        .insert(forward_key(pkt), fwd, BPF_ANY as u64)
        .is_ok();
    a && b
}
