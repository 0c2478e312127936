//! Source NAT for flows to remote backends (externalTrafficPolicy Cluster):
//! the packet leaves with this node's address and a port from the
//! configured range, so the backend's reply comes back here; the mapping is
//! recorded in `LB_NAT_V4`, and replies are translated back to the client.

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    BackendV4, CT_DIR_SNAT, CT_TCP_FIN_REPLY, CT_TCP_RST, CtKeyV4, DatapathConfig, NatValueV4,
    SNAT_PORT_TRIES, SNAT_RECLAIM_HALF_OPEN_NS, Stats, flow,
};

use crate::{
    conntrack, flows,
    maps::{LB_CONFIG, LB_CT_V4, LB_NAT_V4},
    nat::Endpoint,
    parse::PacketV4,
};

/// The node's SNAT settings, if SNAT is configured.
#[inline(always)]
pub fn config() -> Option<DatapathConfig> {
    let c = *LB_CONFIG.get(0)?;
    (c.snat_addr != [0; 4] && c.snat_port_lo <= c.snat_port_hi).then_some(c)
}

/// Reserves a source port for the new flow `pkt` to the remote backend
/// `be`: inserts its `LB_NAT_V4` mapping with `BPF_NOEXIST`, trying up to
/// `SNAT_PORT_TRIES` ports from the flow hash `hash` on. `None`: range exhausted.
///
/// A port already mapped to this very flow is reused: when the LRU evicted
/// the flow's forward entry but not its mapping, the next packet walks the
/// same ports (same hash, same backend) and finds it, so the connection
/// keeps its source port instead of reaching the backend from a second one.
///
/// When every tried port is in use, the first one held by a half-open flow
/// older than `SNAT_RECLAIM_HALF_OPEN_NS` is taken over ([`reclaim`]).
#[inline(always)]
pub fn reserve(
    cfg: &DatapathConfig,
    pkt: &PacketV4,
    hash: u32,
    backend_id: u32,
    be: &BackendV4,
    now: u64,
    st: &mut Stats,
) -> Option<Endpoint> {
    let range = (cfg.snat_port_hi - cfg.snat_port_lo) as u32 + 1;
    let value = NatValueV4 {
        client_addr: pkt.src,
        frontend_addr: pkt.dst,
        client_port_be: pkt.sport_be,
        frontend_port_be: pkt.dport_be,
        backend_id,
        tcp_flags: 0,
        _pad: [0; 7],
        created_ns: now,
        last_seen_ns: now,
    };
    let mut stale: Option<(CtKeyV4, NatValueV4)> = None;
    let mut i = 0;
    while i < SNAT_PORT_TRIES {
        let port = cfg.snat_port_lo + (hash.wrapping_add(i) % range) as u16;
        let key = flow::key(
            (be.addr, be.port_be),
            (cfg.snat_addr, port.to_be()),
            pkt.proto,
            CT_DIR_SNAT,
        );
        if LB_NAT_V4.insert(key, value, BPF_NOEXIST as u64).is_ok() {
            return Some((cfg.snat_addr, port.to_be()));
        }
        // SAFETY: read-only copy of a hash value.
        if let Some(n) = unsafe { LB_NAT_V4.get(&key) }.copied() {
            if flow::forward_key_of_nat(&key, &n) == conntrack::forward_key(pkt) {
                return Some((cfg.snat_addr, port.to_be()));
            }
            if stale.is_none() && reclaimable(&key, &n, now) {
                stale = Some((key, n));
            }
        }
        i += 1;
    }
    let (key, old) = stale?;
    reclaim(&key, &old, value, st).then_some((cfg.snat_addr, key.dst_port_be))
}

/// True if mapping (`key`, `n`) belongs to a flow whose client has not
/// completed its handshake `SNAT_RECLAIM_HALF_OPEN_NS` after it was made.
#[inline(always)]
fn reclaimable(key: &CtKeyV4, n: &NatValueV4, now: u64) -> bool {
    if now.wrapping_sub(n.created_ns) <= SNAT_RECLAIM_HALF_OPEN_NS {
        return false;
    }
    let fkey = flow::forward_key_of_nat(key, n);
    // SAFETY: read-only copy of one field of an LRU value.
    unsafe { LB_CT_V4.get(&fkey) }.is_some_and(|f| flow::half_open(key.proto, f.tcp_flags))
}

/// Takes the port of mapping (`key`, `old`) for a new flow: the half-open
/// flow loses its open-flow count (read from its forward entry's token) and
/// then its forward entry (its next packet is a new flow that finds another
/// port), then the mapping is
/// replaced by delete + insert-if-absent, so of two CPUs reclaiming one port
/// only one gets it. True if this flow got it.
#[inline(always)]
fn reclaim(key: &CtKeyV4, old: &NatValueV4, value: NatValueV4, st: &mut Stats) -> bool {
    let fkey = flow::forward_key_of_nat(key, old);
    flows::close_flow(&fkey, st);
    let _ = LB_CT_V4.remove(&fkey);
    let _ = LB_NAT_V4.remove(key);
    if LB_NAT_V4.insert(key, value, BPF_NOEXIST as u64).is_ok() {
        st.snat_reclaimed += 1;
        return true;
    }
    false
}

/// For a reply of a forwarded flow (backend → this node's SNAT endpoint):
/// the new (source, destination) = (frontend, client). Records its flags.
#[inline(always)]
pub fn reverse(pkt: &PacketV4, now: u64, st: &mut Stats) -> Option<(Endpoint, Endpoint)> {
    let key = conntrack::packet_key(pkt, CT_DIR_SNAT);
    let nat = LB_NAT_V4.get_ptr_mut(&key)?;
    // SAFETY: a hash value stays valid during this run; racing writers only
    // touch flags and times.
    let nat = unsafe { &mut *nat };
    let flags = flow::reply_flags(pkt.tcp_flags);
    conntrack::touch_fields(&mut nat.tcp_flags, &mut nat.last_seen_ns, flags, now);
    if flags & (CT_TCP_RST | CT_TCP_FIN_REPLY) != 0 {
        let fkey = flow::forward_key_of_nat(&key, nat);
        if flags & CT_TCP_RST != 0 {
            flows::close_flow(&fkey, st);
        } else {
            flows::pod_fin(&fkey, st);
        }
    }
    Some((
        (nat.frontend_addr, nat.frontend_port_be),
        (nat.client_addr, nat.client_port_be),
    ))
}
