//! Backend choice for a new flow: the service's Maglev table, indexed by the
//! flow hash (`lb_common::hash`), so every node picks the same backend for
//! the same 5-tuple and a backend change moves few flows.

use lb_common::{
    BACKEND_ACTIVE, BackendV4, MAGLEV_CAPACITY, ServiceValue,
    hash::{flow_hash_v4, maglev_slot},
};

use crate::{
    maps::{LB_BACKENDS_V4, LB_MAGLEV},
    parse::PacketV4,
};

/// The backend Maglev assigns to `pkt`, or `None` when the service has no
/// usable backend.
#[inline(always)]
pub fn maglev(svc: &ServiceValue, pkt: &PacketV4) -> Option<(u32, BackendV4)> {
    if svc.backend_count == 0 {
        return None;
    }
    // SAFETY: the table is only read; the agent replaces it whole.
    let table = unsafe { LB_MAGLEV.get(svc.service_id)? };
    let h = flow_hash_v4(pkt.src, pkt.dst, pkt.sport_be, pkt.dport_be, pkt.proto);
    let slot = maglev_slot(h, svc.maglev_size) as usize;
    if slot >= MAGLEV_CAPACITY {
        return None;
    }
    let id = table.slots[slot];
    let be = *LB_BACKENDS_V4.get(id)?;
    if be.state != BACKEND_ACTIVE {
        return None;
    }
    Some((id, be))
}
