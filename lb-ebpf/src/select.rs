//! Backend choice for a new flow: session affinity first (when the service
//! has it), else the service's balancing policy:
//!
//! * Maglev (default): the service's Maglev table indexed by the flow hash
//!   (`lb_common::hash`), so every node picks the same backend for the same
//!   5-tuple and a backend change moves few flows.
//! * Round-robin: the service's backend list (`LB_SVC_BACKENDS`) in turn,
//!   one atomic counter per service (`LB_RR`) shared by all CPUs.
//! * Least-connection: the fewest open flows on this node (`LB_BE_OPEN`),
//!   ties to Maglev's pick (`lb_common::policy::least_conn` is the rule).

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    AffinityKeyV4, AffinityValue, BACKEND_LIST_CAPACITY, BackendV4, LC_SCAN_MAX, MaglevTable,
    POLICY_LEAST_CONN, POLICY_ROUND_ROBIN, REASON_AFFINITY, REASON_LEAST_CONN, REASON_MAGLEV,
    REASON_ROUND_ROBIN, REASON_TERMINATING_FALLBACK, SVC_F_TERMINATING_FALLBACK, ServiceValue,
    hash::{maglev_slot, rehash},
    maglev_class,
};

use crate::{
    atomic, flows,
    maps::{
        LB_AFFINITY_V4, LB_BACKENDS_V4, LB_MAGLEV_L, LB_MAGLEV_M, LB_MAGLEV_S, LB_RR,
        LB_SVC_BACKENDS,
    },
    parse::PacketV4,
};

/// A chosen backend: id, its entry, why (`REASON_*`) and the reason's
/// detail (`CtValueV4::choice`).
pub struct Choice {
    pub id: u32,
    pub backend: BackendV4,
    pub reason: u8,
    pub detail: u32,
}

/// Chooses the backend of a new flow (`hash`: its `flow_hash_v4`), or
/// `None` when the service has no usable backend.
#[inline(always)]
pub fn choose(svc: &ServiceValue, pkt: &PacketV4, hash: u32, now: u64) -> Option<Choice> {
    let mut c = if svc.affinity_timeout_s == 0 {
        by_policy(svc, hash)?
    } else {
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
                    detail: 0,
                });
            }
        }
        let c = by_policy(svc, hash)?;
        let value = AffinityValue {
            backend_id: c.id,
            _pad: 0,
            last_ns: now,
        };
        // A failed insert only costs affinity for this client's next flow.
        let _ = LB_AFFINITY_V4.insert(key, value, BPF_ANY as u64);
        c
    };
    if svc.flags & SVC_F_TERMINATING_FALLBACK != 0 {
        c.reason = REASON_TERMINATING_FALLBACK;
    }
    Some(c)
}

/// The service's policy.
#[inline(always)]
fn by_policy(svc: &ServiceValue, hash: u32) -> Option<Choice> {
    match svc.policy {
        POLICY_ROUND_ROBIN => round_robin(svc).or_else(|| maglev(svc, hash)),
        POLICY_LEAST_CONN => least_conn(svc, hash),
        _ => maglev(svc, hash),
    }
}

/// Backend `id` if it is active in `svc`.
#[inline(always)]
fn active(svc: &ServiceValue, id: u32) -> Option<BackendV4> {
    let be = *LB_BACKENDS_V4.get(id)?;
    be.serves(svc.service_id).then_some(be)
}

/// Slots `idx` of `t`, if it has them all.
#[inline(always)]
fn slots_in<const N: usize, const K: usize>(
    t: Option<&MaglevTable<N>>,
    idx: [usize; K],
) -> Option<[u32; K]> {
    let t = t?;
    let mut out = [0u32; K];
    let mut k = 0;
    while k < K {
        if idx[k] >= N {
            return None;
        }
        out[k] = t.slots[idx[k]];
        k += 1;
    }
    Some(out)
}

/// Slots `idx` of the service's Maglev table (in the table map its size
/// selects), from one lookup of the table; `None` without a usable backend
/// or a table.
#[inline(always)]
fn table_slots<const K: usize>(svc: &ServiceValue, idx: [usize; K]) -> Option<[u32; K]> {
    if svc.backend_count == 0 {
        return None;
    }
    let sid = svc.service_id;
    // SAFETY: tables are only read; the agent replaces them whole.
    unsafe {
        match maglev_class(svc.maglev_size) {
            0 => slots_in(LB_MAGLEV_S.get(sid), idx),
            1 => slots_in(LB_MAGLEV_M.get(sid), idx),
            _ => slots_in(LB_MAGLEV_L.get(sid), idx),
        }
    }
}

/// The backend Maglev assigns to a flow of hash `hash`.
#[inline(always)]
fn maglev(svc: &ServiceValue, hash: u32) -> Option<Choice> {
    let slot = maglev_slot(hash, svc.maglev_size);
    let [id] = table_slots(svc, [slot as usize])?;
    Some(Choice {
        id,
        backend: active(svc, id)?,
        reason: REASON_MAGLEV,
        detail: slot,
    })
}

/// The next turn of the service's list. `None` (the caller falls back to
/// Maglev) without a list, or when the service has more backends than a
/// list holds: then the turn indexes the Maglev table's slots.
#[inline(always)]
fn round_robin(svc: &ServiceValue) -> Option<Choice> {
    let ctr = LB_RR.get_ptr_mut(svc.service_id)?;
    // SAFETY: array value; every writer uses atomics.
    let turn = unsafe { atomic::fetch_add(ctr, 1) };
    // SAFETY: the list is only read; the agent replaces it whole.
    let list = unsafe { LB_SVC_BACKENDS.get(svc.service_id) };
    let id = match list {
        Some(l) if l.count > 0 && svc.backend_count as usize <= BACKEND_LIST_CAPACITY => {
            let idx = lb_common::policy::rr_index(turn, l.count) as usize;
            if idx >= BACKEND_LIST_CAPACITY {
                return None;
            }
            l.ids[idx]
        }
        _ => table_slots(
            svc,
            [lb_common::policy::rr_index(turn, svc.maglev_size) as usize],
        )?[0],
    };
    Some(Choice {
        id,
        backend: active(svc, id)?,
        reason: REASON_ROUND_ROBIN,
        detail: turn as u32,
    })
}

/// The usable backend with the fewest open flows on this node; see
/// `lb_common::policy::least_conn` for the rule this follows.
#[inline(always)]
fn least_conn(svc: &ServiceValue, hash: u32) -> Option<Choice> {
    // SAFETY: the list is only read; the agent replaces it whole.
    let list = unsafe { LB_SVC_BACKENDS.get(svc.service_id) };
    let scan = list.filter(|l| l.count <= LC_SCAN_MAX);
    // The Maglev pick, and without a scan a second pick from a rehashed
    // slot: both from one table lookup.
    let slot = |h| maglev_slot(h, svc.maglev_size) as usize;
    let (mid, second) = match scan {
        Some(_) => (table_slots(svc, [slot(hash)])?[0], None),
        None => {
            let [mid, second] = table_slots(svc, [slot(hash), slot(rehash(hash))])?;
            (mid, Some(second))
        }
    };
    let mut best = mid;
    let mut best_n = flows::count(mid);
    match (scan, second) {
        (Some(l), _) => {
            let mut i = 0usize;
            while i < LC_SCAN_MAX as usize {
                if i >= l.count as usize {
                    break;
                }
                let id = l.ids[i];
                let n = flows::count(id);
                if n < best_n {
                    best = id;
                    best_n = n;
                }
                i += 1;
            }
        }
        (None, Some(second)) => {
            let n = flows::count(second);
            if n < best_n {
                best = second;
                best_n = n;
            }
        }
        (None, None) => {}
    }
    let (id, backend) = match active(svc, best) {
        Some(be) => (best, be),
        None => (mid, active(svc, mid)?),
    };
    Some(Choice {
        id,
        backend,
        reason: REASON_LEAST_CONN,
        detail: best_n.min(u32::MAX as u64) as u32,
    })
}
