//! Conntrack: pins each flow to its backend (forward entry, looked up by XDP)
//! and remembers how to undo the DNAT on replies (reply entry, looked up by
//! TC egress). Both entries are written together when a flow is pinned.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_coarse_ns,
};
use lb_common::{
    BACKEND_ACTIVE, BackendV4, CT_DIR_FORWARD, CT_F_PORT_REMAP, CT_F_SNAT, CT_TCP_FIN_FWD,
    CT_TCP_FIN_REPLY, CT_TCP_RST, CT_TCP_SYN, CtKeyV4, CtValueV4, PORT_REMAP_LO, PORT_REMAP_TRIES,
    flow,
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
    packet_key(pkt, CT_DIR_FORWARD)
}

/// The key of `pkt` as it is, in direction `dir` (a reply as TC egress
/// sees it: `CT_DIR_REPLY`; a forwarded flow's reply: `CT_DIR_SNAT`).
#[inline(always)]
pub fn packet_key(pkt: &PacketV4, dir: u8) -> CtKeyV4 {
    flow::key(
        (pkt.src, pkt.sport_be),
        (pkt.dst, pkt.dport_be),
        pkt.proto,
        dir,
    )
}

/// What the forward lookup found.
pub enum Lookup {
    /// The flow is pinned to this live backend (a copy of its entry).
    Hit(CtValueV4, BackendV4),
    /// No entry, or a new connection on the tuple of one that ended: a new
    /// flow. `prev`: the token of the entry found, 0 if none.
    Miss { prev: u64 },
    /// An entry whose backend is gone (freed, moved to another service, or
    /// its id reused for another pod): the flow must be re-balanced. `prev`:
    /// the entry's token.
    Stale { prev: u64 },
}

/// Looks up the flow of `key`, checks that its backend still serves
/// `service_id`, and records this packet's TCP flags and time.
#[inline(always)]
pub fn lookup_forward(key: &CtKeyV4, service_id: u32, tcp_flags: u8, now: u64) -> Lookup {
    let Some(ct) = LB_CT_V4.get_ptr_mut(key) else {
        return Lookup::Miss { prev: 0 };
    };
    // SAFETY: LRU entries stay valid for the program's run (RCU); concurrent
    // writers only touch flags and times, for which a lost update is harmless.
    let ct = unsafe { &mut *ct };
    let prev = ct.token;
    let Some(be) = LB_BACKENDS_V4.get(ct.backend_id) else {
        return Lookup::Stale { prev };
    };
    if !flow::pins(ct, be, service_id) {
        return Lookup::Stale { prev };
    }
    if flow::syn_rebalances(tcp_flags, ct, be) {
        // A new connection on this tuple: balanced like any new flow if the
        // old one ended, re-balanced away from a terminating backend.
        return if be.state == BACKEND_ACTIVE {
            Lookup::Miss { prev }
        } else {
            Lookup::Stale { prev }
        };
    }
    if touch(ct, tcp_flags, now) && !ct.forwarded() {
        repair_reply(key, ct);
    }
    Lookup::Hit(*ct, *be)
}

/// Merges `flags` into an entry's flags and refreshes its time, writing
/// only on change; true if the time was refreshed (at most once a second). A SYN after the flow ended (FIN/RST seen) starts a new
/// connection on the same 5-tuple: the old flags are cleared.
#[inline(always)]
pub fn touch_fields(tcp_flags: &mut u8, last_seen_ns: &mut u64, flags: u8, now: u64) -> bool {
    let ended = CT_TCP_FIN_FWD | CT_TCP_FIN_REPLY | CT_TCP_RST;
    if flags & CT_TCP_SYN != 0 && *tcp_flags & ended != 0 {
        *tcp_flags = CT_TCP_SYN;
    } else if *tcp_flags | flags != *tcp_flags {
        *tcp_flags |= flags;
    }
    if now.wrapping_sub(*last_seen_ns) > TOUCH_NS {
        *last_seen_ns = now;
        return true;
    }
    false
}

/// [`touch_fields`] on a conntrack entry.
#[inline(always)]
pub fn touch(ct: &mut CtValueV4, flags: u8, now: u64) -> bool {
    touch_fields(&mut ct.tcp_flags, &mut ct.last_seen_ns, flags, now)
}

/// What [`pin`] did.
pub enum Pinned {
    /// Both entries written; `Some` is the source the flow's packets must
    /// leave with (a remapped client port).
    Yes(Option<([u8; 4], u16)>),
    /// An insert failed (the flow is still forwarded, not pinned).
    InsertFailed,
    /// Another live flow from this client endpoint already reaches this
    /// backend through another frontend, and no other client port was free.
    ReplyClash,
}

/// Pins the flow of `pkt` (flow hash `hash`) to backend `id` with its
/// open-flow `token` (see `flows.rs`): writes the forward entry and, for a
/// local backend (`snat` is `None`), the reply entry the TC program uses. A remote backend's replies come back through
/// `LB_NAT_V4` instead.
///
/// The reply key is what the pod sees (backend, client endpoint), which does
/// not name the frontend: one client endpoint reaching the same pod through
/// two frontends (node IP and LB IP, unconnected UDP, port reuse) would share
/// it, and the last writer would take the other flow's replies. When the
/// key belongs to another live flow, this flow's client port is remapped, as
/// netfilter's NAT does on a tuple clash, so the pod sees two flows.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one flow's pinning inputs")]
pub fn pin(
    pkt: &PacketV4,
    hash: u32,
    service_id: u32,
    id: u32,
    be: &BackendV4,
    reason: u8,
    choice: u32,
    snat: Option<([u8; 4], u16)>,
    token: u64,
    now: u64,
) -> Pinned {
    let mut fwd = CtValueV4 {
        backend_id: id,
        service_id,
        nat_addr: be.addr,
        nat_port_be: be.port_be,
        tcp_flags: pkt.tcp_flags,
        reason,
        snat_addr: [0; 4],
        snat_port_be: 0,
        flags: 0,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        choice,
        _pad2: 0,
        token,
    };
    let fkey = forward_key(pkt);
    if let Some((a, p)) = snat {
        fwd.flags = CT_F_SNAT;
        fwd.snat_addr = a;
        fwd.snat_port_be = p;
        return if LB_CT_V4.insert(fkey, fwd, BPF_ANY as u64).is_ok() {
            Pinned::Yes(None)
        } else {
            Pinned::InsertFailed
        };
    }
    let backend = (be.addr, be.port_be);
    let client = (pkt.src, pkt.sport_be);
    let rkey = flow::local_reply_key(backend, client, pkt.proto);
    let mut remap = None;
    if reply_taken(&rkey, pkt, backend) {
        let mut i = 0;
        while i < PORT_REMAP_TRIES {
            let span = (u16::MAX - PORT_REMAP_LO) as u32 + 1;
            let port = (PORT_REMAP_LO + (hash.wrapping_add(i) % span) as u16).to_be();
            let remapped = CtValueV4 {
                flags: CT_F_PORT_REMAP,
                snat_addr: pkt.src,
                snat_port_be: port,
                ..fwd
            };
            let key = flow::partner_key(&fkey, &remapped);
            let rev = flow::reply_value(&fkey, &remapped);
            if LB_CT_V4.insert(key, rev, BPF_NOEXIST as u64).is_ok() {
                fwd = remapped;
                remap = Some((pkt.src, port));
                break;
            }
            i += 1;
        }
        if remap.is_none() {
            return Pinned::ReplyClash;
        }
    }
    let reply_ok = remap.is_some()
        || LB_CT_V4
            .insert(rkey, flow::reply_value(&fkey, &fwd), BPF_ANY as u64)
            .is_ok();
    let fwd_ok = LB_CT_V4.insert(fkey, fwd, BPF_ANY as u64).is_ok();
    if reply_ok && fwd_ok {
        Pinned::Yes(remap)
    } else {
        Pinned::InsertFailed
    }
}

/// Writes the reply entry of the local flow (`key`, `ct`) again if it is
/// gone: per-CPU LRU lists can evict one half of a flow before the table is
/// full, and without its reply entry the pod's answers would leave from the
/// pod's own address. Called at most once a second per flow.
#[inline(always)]
fn repair_reply(key: &CtKeyV4, ct: &CtValueV4) {
    let rkey = flow::partner_key(key, ct);
    // SAFETY: only checks presence.
    if unsafe { LB_CT_V4.get(&rkey) }.is_none() {
        let _ = LB_CT_V4.insert(rkey, flow::reply_value(key, ct), BPF_NOEXIST as u64);
    }
}

/// True if reply key `rkey` belongs to another live flow: its entry names
/// another frontend, and that flow's forward entry still pins `backend`
/// through this reply key. An entry left by a flow that ended, moved or
/// was evicted is not live and is overwritten.
#[inline(always)]
fn reply_taken(rkey: &CtKeyV4, pkt: &PacketV4, backend: ([u8; 4], u16)) -> bool {
    // SAFETY: read-only copies of LRU values.
    let Some(r) = (unsafe { LB_CT_V4.get(rkey) }).copied() else {
        return false;
    };
    if r.nat_addr == pkt.dst && r.nat_port_be == pkt.dport_be {
        return false; // this flow's own reply entry
    }
    let other = flow::forward_key_of_reply(rkey, &r);
    let Some(f) = (unsafe { LB_CT_V4.get(&other) }).copied() else {
        return false;
    };
    (f.nat_addr, f.nat_port_be) == backend
        && !f.forwarded()
        && flow::partner_key(&other, &f) == *rkey
}
