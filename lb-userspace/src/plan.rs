//! Desired state × current map state → the map operations that turn one
//! into the other.
//!
//! The maps are the agent's only memory: ids are recovered from what they
//! hold, so an agent restart re-plans to nothing and no flow moves.
//!
//! * Service ports without frontends are not written (nothing reaches them).
//! * Service ids: a service port keeps the id its frontends already point
//!   to (the id most of them point to, when they disagree); a new one gets
//!   the smallest id not used in the maps.
//! * Backend ids: one per (service id, address, port), kept while that
//!   backend exists; new ones get the smallest id not used in the maps.
//!   Remote backends (on other nodes) are written without
//!   `BACKEND_F_LOCAL`: the datapath forwards to them with SNAT. Freed ids
//!   are only reused when no never-used id is left.
//! * Maglev tables are built from the active backends, local and remote
//!   (every node computes the same table), and rewritten
//!   only when that set of ids or the table size changed.
//! * Services whose policy is round-robin or least-connection also get a
//!   backend list (their active backends in (address, port) order, at most
//!   `BACKEND_LIST_CAPACITY`); every service id gets its name.
//! * Operations come only for differences, in the order the datapath can
//!   follow safely: `PutBackend`, `PutMaglev`, `PutBackendList`,
//!   `PutServiceName`, `PutFrontend`, `DeleteFrontend`,
//!   `DeleteBackendList`, `DeleteServiceName`, `DeleteMaglev`, `FreeBackend`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use lb_common::{
    BACKEND_ACTIVE, BACKEND_F_LOCAL, BACKEND_TERMINATING, BackendV4, FRONTEND_EXTERNAL_IP,
    FRONTEND_LOADBALANCER, FRONTEND_NODEPORT, FrontendKeyV4, MAGLEV_CAPACITY, MAGLEV_SIZES,
    MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES, SVC_F_DROP_NO_BACKEND, SVC_F_SOURCE_RANGES,
    SVC_F_TERMINATING_FALLBACK, ServiceValue, maglev_class,
};

use crate::error::{Error, Result};
use crate::maglev;
use crate::model::{
    BackendState, BalancingPolicy, Desired, Frontend, FrontendKind, Proto, ServicePort,
    ServicePortName, SessionAffinity, TrafficPolicy,
};
use crate::writer::{MapState, Op, SrcRange};

/// Planner settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanConfig {
    /// Slots of every Maglev table: a prime ≤ [`MAGLEV_CAPACITY`]. `None`
    /// (the default): each service's table takes the smallest of
    /// [`MAGLEV_SIZES`] that is at least 100 × its backends (the largest
    /// beyond 163 backends), so a table costs memory and time in
    /// proportion to its service. Either way every node computes the same
    /// table for the same backends.
    pub maglev_size: Option<u32>,
}

impl PlanConfig {
    /// Every table of `maglev_size` slots, validated.
    pub fn new(maglev_size: u32) -> Result<Self> {
        let cfg = Self {
            maglev_size: Some(maglev_size),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that a fixed `maglev_size` is a prime ≤ [`MAGLEV_CAPACITY`].
    pub fn validate(&self) -> Result<()> {
        let Some(n) = self.maglev_size else {
            return Ok(());
        };
        if n as usize > MAGLEV_CAPACITY {
            return Err(Error::Config(format!(
                "maglev size {n} is larger than the compiled capacity {MAGLEV_CAPACITY}"
            )));
        }
        if !maglev::is_prime(n) {
            let hint = maglev::next_prime_at_least(n)
                .filter(|&p| p as usize <= MAGLEV_CAPACITY)
                .map(|p| format!(" (next prime: {p})"))
                .unwrap_or_default();
            return Err(Error::Config(format!("maglev size {n} is not prime{hint}")));
        }
        Ok(())
    }

    /// The table size of a service with `backends` active backends.
    pub fn maglev_size_for(&self, backends: usize) -> u32 {
        self.maglev_size.unwrap_or_else(|| {
            let want = 100 * backends as u64;
            MAGLEV_SIZES
                .into_iter()
                .find(|&m| m as u64 >= want)
                .unwrap_or(MAGLEV_CAPACITY as u32)
        })
    }
}

/// The map key of a frontend.
pub fn frontend_key(addr: Ipv4Addr, port: u16, proto: Proto) -> FrontendKeyV4 {
    FrontendKeyV4 {
        addr: addr.octets(),
        port_be: port.to_be(),
        proto: proto.number(),
        _pad: 0,
    }
}

fn kind_code(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::NodePort => FRONTEND_NODEPORT,
        FrontendKind::LoadBalancer => FRONTEND_LOADBALANCER,
        FrontendKind::ExternalIp => FRONTEND_EXTERNAL_IP,
    }
}

/// Hands out the smallest ids in `1..max` that nothing uses, preferring
/// ids the maps do not hold at all over ids this plan frees.
struct IdPool<I: Iterator<Item = u32>> {
    max: u32,
    /// Ids this plan has given out or keeps.
    taken: BTreeSet<u32>,
    /// Ids no map entry uses, ascending.
    free: I,
    /// Ids this plan may take back when nothing else is left (the ones it
    /// frees), ascending.
    reusable: BTreeSet<u32>,
}

impl<I: Iterator<Item = u32>> IdPool<I> {
    fn new(max: u32, taken: BTreeSet<u32>, free: I, reusable: BTreeSet<u32>) -> Self {
        Self {
            max,
            taken,
            free,
            reusable,
        }
    }

    fn take(&mut self) -> Option<u32> {
        for id in self.free.by_ref() {
            if id == 0 || self.taken.contains(&id) {
                continue;
            }
            if id >= self.max {
                break;
            }
            self.taken.insert(id);
            return Some(id);
        }
        let id = *self.reusable.iter().find(|id| !self.taken.contains(id))?;
        self.taken.insert(id);
        Some(id)
    }
}

/// Which part of the maps a plan may change.
enum Scope<'a> {
    /// Everything: what the desired state does not name is removed.
    All,
    /// Only what belongs to these service ids; every other service is
    /// left as it is.
    Services(&'a BTreeSet<u32>),
}

/// Plans the operations that make `current` hold `desired`.
///
/// An unchanged desired state plans to an empty Vec. Fails, with no
/// operation, when `cfg` is invalid, when two service ports claim the same
/// frontend, or when the desired state does not fit in the maps.
pub fn plan(current: &MapState, desired: &Desired, cfg: &PlanConfig) -> Result<Vec<Op>> {
    cfg.validate()?;
    // A service port without frontends is unreachable: nothing is written
    // for it (and it has no frontend to recover its id from).
    let services: Vec<(&ServicePortName, &ServicePort)> = desired
        .services
        .iter()
        .filter(|(_, sp)| !sp.frontends.is_empty())
        .collect();

    // Capacity checks first: all or nothing.
    let n_services = services.len();
    if n_services >= MAX_SERVICES as usize {
        return Err(Error::Capacity {
            what: "service ports",
            needed: n_services,
            max: MAX_SERVICES as usize - 1,
        });
    }
    let n_frontends: usize = services.iter().map(|(_, s)| s.frontends.len()).sum();
    if n_frontends > MAX_FRONTENDS as usize {
        return Err(Error::Capacity {
            what: "frontends",
            needed: n_frontends,
            max: MAX_FRONTENDS as usize,
        });
    }
    let n_backends: usize = services.iter().map(|(_, s)| s.backends.len()).sum();
    if n_backends >= MAX_BACKENDS as usize {
        return Err(Error::Capacity {
            what: "backends",
            needed: n_backends,
            max: MAX_BACKENDS as usize - 1,
        });
    }
    plan_scope(current, &services, Scope::All, cfg)
}

/// Plans the operations for the service ports in `changed` only: their
/// entries in `desired` are what they must become (absent: removed), and
/// `previous` is the desired state the maps were last planned to. Every
/// other service port is assumed unchanged and costs nothing, so a change
/// costs what the changed services hold.
///
/// The maps must hold what [`plan`] (or this) planned for `previous`: the
/// agent plans from scratch on start, after a failed write and on a timer.
/// Under that condition the result equals [`plan`]'s for the whole
/// `desired` (a property test checks it).
pub fn plan_changes(
    current: &MapState,
    desired: &Desired,
    previous: &Desired,
    changed: &BTreeSet<ServicePortName>,
    cfg: &PlanConfig,
) -> Result<Vec<Op>> {
    cfg.validate()?;
    let services: Vec<(&ServicePortName, &ServicePort)> = changed
        .iter()
        .filter_map(|n| desired.services.get_key_value(n))
        .filter(|(_, sp)| !sp.frontends.is_empty())
        .collect();
    // The ids the changed service ports had or will take back: those their
    // old and new frontends point to. (A frontend of a changed port held by
    // an unchanged one would be claimed twice in `desired`, which
    // translation never produces.)
    let mut scope = BTreeSet::new();
    for n in changed {
        let sps = [previous.services.get(n), desired.services.get(n)];
        for f in sps.into_iter().flatten().flat_map(|sp| &sp.frontends) {
            if let Some(v) = current
                .frontends
                .get(&frontend_key(f.addr, f.port, f.proto))
            {
                scope.insert(v.service_id);
            }
        }
    }
    plan_scope(current, &services, Scope::Services(&scope), cfg)
}

/// The service ids in `scope` among the keys of `map` (a map keyed by
/// service id).
fn keys_in_scope<V>(scope: &Scope, map: &BTreeMap<u32, V>) -> Vec<u32> {
    match scope {
        Scope::All => map.keys().copied().collect(),
        Scope::Services(s) => s
            .iter()
            .copied()
            .filter(|sid| map.contains_key(sid))
            .collect(),
    }
}

fn plan_scope(
    current: &MapState,
    services: &[(&ServicePortName, &ServicePort)],
    scope: Scope<'_>,
    cfg: &PlanConfig,
) -> Result<Vec<Op>> {
    let n_services = services.len();
    let n_backends: usize = services.iter().map(|(_, s)| s.backends.len()).sum();
    // What the plan may change, as it stands in the maps.
    let scope_sids: Vec<u32> = match scope {
        Scope::All => current.service_ids().collect(),
        Scope::Services(s) => s.iter().copied().collect(),
    };
    let scope_backends: Vec<(u32, &BackendV4)> = match scope {
        Scope::All => current.backends.iter().map(|(&id, b)| (id, b)).collect(),
        Scope::Services(_) => scope_sids
            .iter()
            .filter_map(|&sid| current.service(sid))
            .flat_map(|r| r.backends.iter())
            .filter_map(|id| Some((*id, current.backends.get(id)?)))
            .collect(),
    };

    // Each frontend key belongs to one service port.
    let mut owner: BTreeMap<FrontendKeyV4, &ServicePortName> = BTreeMap::new();
    for &(name, sp) in services {
        for f in &sp.frontends {
            let key = frontend_key(f.addr, f.port, f.proto);
            if let Some(other) = owner.insert(key, name) {
                if other != name {
                    return Err(Error::Config(format!(
                        "frontend {}:{}/{} is claimed by both {other} and {name}",
                        f.addr, f.port, f.proto
                    )));
                }
                return Err(Error::Config(format!(
                    "frontend {}:{}/{} is listed twice in {name}",
                    f.addr, f.port, f.proto
                )));
            }
        }
    }

    // Service ids: vote by frontends, most votes first.
    let mut votes: Vec<(usize, u32, usize)> = Vec::new(); // (count, id, service index)
    for (i, (_, sp)) in services.iter().enumerate() {
        let mut count: BTreeMap<u32, usize> = BTreeMap::new();
        for f in &sp.frontends {
            if let Some(v) = current
                .frontends
                .get(&frontend_key(f.addr, f.port, f.proto))
                && (1..MAX_SERVICES).contains(&v.service_id)
            {
                *count.entry(v.service_id).or_default() += 1;
            }
        }
        votes.extend(count.into_iter().map(|(id, c)| (c, id, i)));
    }
    votes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut sid_of: Vec<Option<u32>> = vec![None; services.len()];
    let mut taken = BTreeSet::new();
    for (_, id, i) in votes {
        if sid_of[i].is_none() && !taken.contains(&id) {
            sid_of[i] = Some(id);
            taken.insert(id);
        }
    }
    let mut sid_pool = IdPool::new(
        MAX_SERVICES,
        taken,
        current.free_service_ids(),
        scope_sids.iter().copied().collect(),
    );
    for sid in &mut sid_of {
        if sid.is_none() {
            // Cannot fail: fewer services than ids (checked above).
            *sid = Some(sid_pool.take().ok_or(Error::Capacity {
                what: "service ports",
                needed: n_services,
                max: MAX_SERVICES as usize - 1,
            })?);
        }
    }

    // Backend ids: reuse by (service id, addr, port).
    let mut current_be: BTreeMap<(u32, [u8; 4], u16), u32> = BTreeMap::new();
    for &(id, b) in scope_backends.iter().rev() {
        // Iterating in reverse leaves the smallest id for duplicates.
        current_be.insert((b.service_id, b.addr, b.port_be), id);
    }
    let mut want_be: BTreeMap<u32, BackendV4> = BTreeMap::new();
    // Per service: (sid, its backends in desired order as (id, name, active)).
    let mut svc_be: Vec<Vec<(u32, String, bool)>> = Vec::with_capacity(services.len());
    let mut new_be: Vec<(usize, usize, BackendV4)> = Vec::new(); // (service idx, backend idx, value)
    for (i, (_, sp)) in services.iter().enumerate() {
        let sid = sid_of[i].unwrap_or_default();
        let mut list = Vec::new();
        for b in &sp.backends {
            let active = b.state == BackendState::Active;
            let value = BackendV4 {
                addr: b.addr.octets(),
                port_be: b.port.to_be(),
                state: if active {
                    BACKEND_ACTIVE
                } else {
                    BACKEND_TERMINATING
                },
                flags: if b.local { BACKEND_F_LOCAL } else { 0 },
                service_id: sid,
                _pad: 0,
            };
            match current_be.get(&(sid, value.addr, value.port_be)) {
                Some(&id) if !want_be.contains_key(&id) => {
                    want_be.insert(id, value);
                    list.push((id, b.maglev_name(), active));
                }
                _ => {
                    new_be.push((i, list.len(), value));
                    list.push((0, b.maglev_name(), active));
                }
            }
        }
        svc_be.push(list);
    }
    let mut be_pool = IdPool::new(
        MAX_BACKENDS,
        want_be.keys().copied().collect(),
        current.free_backend_ids(),
        scope_backends.iter().map(|(id, _)| *id).collect(),
    );
    for (i, j, value) in new_be {
        let id = be_pool.take().ok_or(Error::Capacity {
            what: "backends",
            needed: n_backends,
            max: MAX_BACKENDS as usize - 1,
        })?;
        want_be.insert(id, value);
        svc_be[i][j].0 = id;
    }

    // Maglev tables and frontends.
    let mut ops_maglev = Vec::new();
    // Service id → the size of its table.
    let mut want_tables: BTreeMap<u32, u32> = BTreeMap::new();
    let mut want_lists: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut want_names: BTreeMap<u32, String> = BTreeMap::new();
    let mut want_fe: BTreeMap<FrontendKeyV4, ServiceValue> = BTreeMap::new();
    let mut want_ranges: BTreeSet<SrcRange> = BTreeSet::new();
    for (i, (name, sp)) in services.iter().enumerate() {
        let sid = sid_of[i].unwrap_or_default();
        let active: Vec<&(u32, String, bool)> = svc_be[i].iter().filter(|b| b.2).collect();
        let has_table = !active.is_empty();
        want_names.insert(
            sid,
            lb_common::ServiceName::new(&name.to_string())
                .as_str()
                .to_owned(),
        );
        if has_table && sp.policy != BalancingPolicy::Maglev {
            let n = active.len().min(lb_common::BACKEND_LIST_CAPACITY);
            want_lists.insert(sid, active[..n].iter().map(|b| b.0).collect());
        }
        let size = cfg.maglev_size_for(active.len());
        if has_table {
            want_tables.insert(sid, size);
            let ids: BTreeSet<u32> = active.iter().map(|b| b.0).collect();
            let unchanged = current
                .maglev
                .get(&sid)
                .is_some_and(|t| t.size == size && t.members == ids);
            if !unchanged {
                let names: Vec<&str> = active.iter().map(|b| b.1.as_str()).collect();
                let slots = maglev::populate(&names, size)
                    .into_iter()
                    .map(|idx| active[idx as usize].0)
                    .collect();
                ops_maglev.push(Op::PutMaglev {
                    service_id: sid,
                    slots,
                });
            }
        }
        for r in &sp.source_ranges {
            want_ranges.insert(SrcRange {
                service_id: sid,
                addr: r.addr.octets(),
                prefix_len: r.prefix_len,
            });
        }
        for f in &sp.frontends {
            want_fe.insert(
                frontend_key(f.addr, f.port, f.proto),
                service_value(
                    f,
                    sp,
                    sid,
                    active.len() as u32,
                    if has_table { size } else { 0 },
                ),
            );
        }
    }

    // What the maps hold in scope, to compare with what is wanted.
    let cur_ranges: BTreeSet<SrcRange> = match scope {
        Scope::All => current.src_ranges.clone(),
        Scope::Services(_) => scope_sids
            .iter()
            .flat_map(|&sid| current.src_ranges_of(sid))
            .copied()
            .collect(),
    };
    let cur_frontends: Vec<FrontendKeyV4> = match scope {
        Scope::All => current.frontends.keys().copied().collect(),
        Scope::Services(_) => scope_sids
            .iter()
            .filter_map(|&sid| current.service(sid))
            .flat_map(|r| r.frontends.iter().copied())
            .collect(),
    };
    let cur_lists = keys_in_scope(&scope, &current.backend_lists);
    let cur_names = keys_in_scope(&scope, &current.names);
    let cur_tables = keys_in_scope(&scope, &current.maglev);

    // Order: what a new flow may be sent to is written before anything
    // that points at it (new and promoted backends, then tables, lists and
    // frontends); a backend is demoted (active → terminating) only once no
    // table or list hands it new flows, so no new flow is refused in
    // between while a usable backend exists; freed last.
    let mut ops = Vec::new();
    let mut demotions = Vec::new();
    for (&id, value) in &want_be {
        let old = current.backends.get(&id);
        if old == Some(value) {
            continue;
        }
        let demoted =
            old.is_some_and(|o| o.state == BACKEND_ACTIVE) && value.state != BACKEND_ACTIVE;
        let op = Op::PutBackend { id, value: *value };
        if demoted {
            demotions.push(op);
        } else {
            ops.push(op);
        }
    }
    ops.extend(ops_maglev);
    for (&service_id, ids) in &want_lists {
        if current.backend_lists.get(&service_id) != Some(ids) {
            ops.push(Op::PutBackendList {
                service_id,
                ids: ids.clone(),
            });
        }
    }
    for (&service_id, name) in &want_names {
        if current.names.get(&service_id) != Some(name) {
            ops.push(Op::PutServiceName {
                service_id,
                name: name.clone(),
            });
        }
    }
    ops.extend(
        want_ranges
            .difference(&cur_ranges)
            .map(|r| Op::PutSrcRange(*r)),
    );
    for (key, value) in &want_fe {
        if current.frontends.get(key) != Some(value) {
            ops.push(Op::PutFrontend {
                key: *key,
                value: *value,
            });
        }
    }
    ops.extend(demotions);
    for key in &cur_frontends {
        if !want_fe.contains_key(key) {
            ops.push(Op::DeleteFrontend { key: *key });
        }
    }
    ops.extend(
        cur_ranges
            .difference(&want_ranges)
            .map(|r| Op::DeleteSrcRange(*r)),
    );
    for service_id in cur_lists {
        if !want_lists.contains_key(&service_id) {
            ops.push(Op::DeleteBackendList { service_id });
        }
    }
    for service_id in cur_names {
        if !want_names.contains_key(&service_id) {
            ops.push(Op::DeleteServiceName { service_id });
        }
    }
    // A table goes when its service does, or (after its frontends point
    // to the new one) when it moved to another table map; stale ones too.
    for service_id in cur_tables {
        let old = current.maglev[&service_id].size;
        let kept = want_tables
            .get(&service_id)
            .is_some_and(|&new| maglev_class(new) == maglev_class(old));
        if !kept {
            ops.push(Op::DeleteMaglev {
                service_id,
                size: old,
            });
        }
    }
    let stale: Vec<(u32, usize)> = match scope {
        Scope::All => current.stale_tables.iter().copied().collect(),
        Scope::Services(s) => s
            .iter()
            .flat_map(|&sid| current.stale_tables.range((sid, 0)..=(sid, usize::MAX)))
            .copied()
            .collect(),
    };
    for (service_id, class) in stale {
        if want_tables
            .get(&service_id)
            .is_none_or(|&new| maglev_class(new) != class)
        {
            ops.push(Op::DeleteMaglev {
                service_id,
                size: MAGLEV_SIZES[class],
            });
        }
    }
    for &(id, _) in &scope_backends {
        if !want_be.contains_key(&id) {
            ops.push(Op::FreeBackend { id });
        }
    }
    Ok(ops)
}

/// The frontend's map value. Source ranges apply to LoadBalancer IPs only
/// (as in kube-proxy); `externalTrafficPolicy: Local` drops rather than
/// rejects when the node has no endpoint.
fn service_value(
    f: &Frontend,
    sp: &ServicePort,
    sid: u32,
    backend_count: u32,
    maglev_size: u32,
) -> ServiceValue {
    let mut flags = 0;
    if f.kind == FrontendKind::LoadBalancer && !sp.source_ranges.is_empty() {
        flags |= SVC_F_SOURCE_RANGES;
    }
    if sp.traffic_policy == TrafficPolicy::Local {
        flags |= SVC_F_DROP_NO_BACKEND;
    }
    if sp.terminating_fallback && backend_count > 0 {
        flags |= SVC_F_TERMINATING_FALLBACK;
    }
    ServiceValue {
        service_id: sid,
        backend_count,
        maglev_size,
        affinity_timeout_s: match sp.affinity {
            SessionAffinity::None => 0,
            SessionAffinity::ClientIp { timeout_s } => timeout_s.max(1),
        },
        flags,
        kind: kind_code(f.kind),
        policy: sp.policy.code(),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sizes_follow_the_backends_unless_fixed() {
        let auto = PlanConfig::default();
        let sizes: Vec<u32> = [1, 10, 11, 40, 41, 163, 164, 1000]
            .map(|n| auto.maglev_size_for(n))
            .to_vec();
        assert_eq!(
            sizes,
            [1_021, 1_021, 4_093, 4_093, 16_381, 16_381, 16_381, 16_381]
        );
        for m in MAGLEV_SIZES {
            assert!(maglev::is_prime(m));
        }
        assert_eq!(PlanConfig::new(251).unwrap().maglev_size_for(1000), 251);
    }

    #[test]
    fn config_is_validated() {
        assert!(PlanConfig::new(16_381).is_ok());
        assert!(PlanConfig::new(251).is_ok());
        let e = PlanConfig::new(1000).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid configuration: maglev size 1000 is not prime (next prime: 1009)"
        );
        assert!(PlanConfig::new(65_537).is_err());
        assert!(PlanConfig::new(0).is_err());
    }

    #[test]
    fn id_pool_prefers_never_used_ids() {
        let mut p = IdPool::new(6, [1].into(), [1, 4, 5, 6, 7].into_iter(), [2, 3].into());
        assert_eq!(p.take(), Some(4));
        assert_eq!(p.take(), Some(5));
        assert_eq!(p.take(), Some(2));
        assert_eq!(p.take(), Some(3));
        assert_eq!(p.take(), None);
    }
}
