//! Source NAT for flows to remote backends (externalTrafficPolicy Cluster):
//! the packet leaves with this node's address and a port from the
//! configured range, so the backend's reply comes back here; the mapping is
//! recorded in `LB_NAT_V4`, and replies are translated back to the client.

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    BackendV4, CT_DIR_SNAT, CT_TCP_FIN_FWD, CT_TCP_FIN_REPLY, CT_TCP_RST, CtKeyV4, DatapathConfig,
    NatValueV4, SNAT_PORT_TRIES, Stats,
};

use crate::{
    conntrack, flows,
    maps::{LB_CONFIG, LB_NAT_V4},
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
#[inline(always)]
pub fn reserve(
    cfg: &DatapathConfig,
    pkt: &PacketV4,
    hash: u32,
    backend_id: u32,
    be: &BackendV4,
    now: u64,
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
    let mut i = 0;
    while i < SNAT_PORT_TRIES {
        let port = cfg.snat_port_lo + (hash.wrapping_add(i) % range) as u16;
        let key = CtKeyV4 {
            src_addr: be.addr,
            dst_addr: cfg.snat_addr,
            src_port_be: be.port_be,
            dst_port_be: port.to_be(),
            proto: pkt.proto,
            dir: CT_DIR_SNAT,
            _pad: [0; 2],
        };
        if LB_NAT_V4.insert(key, value, BPF_NOEXIST as u64).is_ok() {
            return Some((cfg.snat_addr, port.to_be()));
        }
        i += 1;
    }
    None
}

/// For a reply of a forwarded flow (backend → this node's SNAT endpoint):
/// the new (source, destination) = (frontend, client). Records its flags.
#[inline(always)]
pub fn reverse(pkt: &PacketV4, now: u64, st: &mut Stats) -> Option<(Endpoint, Endpoint)> {
    let key = CtKeyV4 {
        dir: CT_DIR_SNAT,
        ..conntrack::forward_key(pkt)
    };
    let nat = LB_NAT_V4.get_ptr_mut(&key)?;
    // SAFETY: a hash value stays valid during this run; racing writers only
    // touch flags and times.
    let nat = unsafe { &mut *nat };
    let flags = if pkt.tcp_flags & CT_TCP_FIN_FWD != 0 {
        (pkt.tcp_flags & !CT_TCP_FIN_FWD) | CT_TCP_FIN_REPLY
    } else {
        pkt.tcp_flags
    };
    conntrack::touch_fields(&mut nat.tcp_flags, &mut nat.last_seen_ns, flags, now);
    if flags & (CT_TCP_RST | CT_TCP_FIN_REPLY) != 0 {
        let fkey = flows::forward_key_of_reply(
            nat.client_addr,
            nat.client_port_be,
            nat.frontend_addr,
            nat.frontend_port_be,
            pkt.proto,
        );
        if flags & CT_TCP_RST != 0 {
            flows::close_counted(&fkey, st);
        } else {
            flows::pod_fin(&fkey, st);
        }
    }
    Some((
        (nat.frontend_addr, nat.frontend_port_be),
        (nat.client_addr, nat.client_port_be),
    ))
}
