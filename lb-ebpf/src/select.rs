//! Backend choice for a new flow: session affinity first (when the service
//! has it), else the service's Maglev table indexed by the flow hash
//! (`lb_common::hash`), so every node picks the same backend for the same
//! 5-tuple and a backend change moves few flows.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    AffinityKeyV4, AffinityValue, BACKEND_ACTIVE, BackendV4, MAGLEV_CAPACITY, REASON_AFFINITY,
    REASON_MAGLEV, ServiceValue, hash::maglev_slot,
};

use crate::{
    maps::{LB_AFFINITY_V4, LB_BACKENDS_V4, LB_MAGLEV},
    parse::PacketV4,
};

/// A chosen backend: id, its entry, and why (`REASON_*`).
pub struct Choice {
    pub id: u32,
    pub backend: BackendV4,
    pub reason: u8,
}

/// Chooses the backend of a new flow (`hash`: its `flow_hash_v4`), or
/// `None` when the service has no usable backend.
#[inline(always)]
pub fn choose(svc: &ServiceValue, pkt: &PacketV4, hash: u32, now: u64) -> Option<Choice> {
    if svc.affinity_timeout_s == 0 {
        return maglev(svc, hash).map(|(id, backend)| Choice {
            id,
            backend,
            reason: REASON_MAGLEV,
        });
    }
    let key = AffinityKeyV4 {
        service_id: svc.service_id,
        client_addr: pkt.src,
    };
    if let Some(a) = LB_AFFINITY_V4.get_ptr_mut(&key) {
        // SAFETY: LRU value valid during this run; a racing writer at worst
        // loses one timestamp update.
        let a = unsafe { &mut *a };
        let timeout_ns = svc.affinity_timeout_s as u64 * 1_000_000_000;
        if now.wrapping_sub(a.last_ns) < timeout_ns
            && let Some(be) = active(svc, a.backend_id)
        {
            a.last_ns = now;
            return Some(Choice {
                id: a.backend_id,
                backend: be,
                reason: REASON_AFFINITY,
            });
        }
    }
    let (id, backend) = maglev(svc, hash)?;
    let value = AffinityValue {
        backend_id: id,
        _pad: 0,
        last_ns: now,
    };
    // A failed insert only costs affinity for this client's next flow.
    let _ = LB_AFFINITY_V4.insert(key, value, BPF_ANY as u64);
    Some(Choice {
        id,
        backend,
        reason: REASON_MAGLEV,
    })
}

/// Backend `id` if it is active in `svc`.
#[inline(always)]
fn active(svc: &ServiceValue, id: u32) -> Option<BackendV4> {
    let be = *LB_BACKENDS_V4.get(id)?;
    (be.state == BACKEND_ACTIVE && be.service_id == svc.service_id).then_some(be)
}

/// The backend Maglev assigns to a flow of hash `hash`.
#[inline(always)]
fn maglev(svc: &ServiceValue, hash: u32) -> Option<(u32, BackendV4)> {
    if svc.backend_count == 0 {
        return None;
    }
    // SAFETY: the table is only read; the agent replaces it whole.
    let table = unsafe { LB_MAGLEV.get(svc.service_id)? };
    let slot = maglev_slot(hash, svc.maglev_size) as usize;
    if slot >= MAGLEV_CAPACITY {
        return None;
    }
    let id = table.slots[slot];
    Some((id, active(svc, id)?))
}
