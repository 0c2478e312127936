//! The last stage of the pipeline: map operations, and the writers that apply
//! them (`kernel`: the pinned BPF maps; `memory`: BTreeMaps for tests).
//!
//! The planner (`crate::plan`) reads a [`MapState`] and emits [`Op`]s in a
//! safe order; a writer applies them in the order given and can read its
//! state back, so the agent re-plans against what the maps really hold (after
//! a restart, too).

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{BackendV4, FrontendKeyV4, ServiceValue, maglev_class};

mod batch;
pub mod kernel;
pub mod memory;

/// What the datapath maps hold, as far as the planner cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// `LB_FRONTENDS_V4`.
    pub frontends: BTreeMap<FrontendKeyV4, ServiceValue>,
    /// `LB_MAGLEV_S/M/L`: service id → its table (the one in the map its
    /// size selects).
    pub maglev: BTreeMap<u32, MaglevEntry>,
    /// Tables left in another table map than their service's current one
    /// (an agent stopped between writing a resized table and removing the
    /// old one): (service id, table map index). A full plan removes them.
    pub stale_tables: BTreeSet<(u32, usize)>,
    /// `LB_BACKENDS_V4`, only the slots whose state is not `BACKEND_FREE`.
    pub backends: BTreeMap<u32, BackendV4>,
    /// `LB_SRC_RANGE_V4`: (service id, network address, prefix length).
    pub src_ranges: BTreeSet<SrcRange>,
    /// `LB_SVC_BACKENDS`: service id → its usable backend ids in list order
    /// (services whose policy is not Maglev).
    pub backend_lists: BTreeMap<u32, Vec<u32>>,
    /// `LB_SVC_NAMES`: service id → `ns/name:port`.
    pub names: BTreeMap<u32, String>,
    /// Derived from the maps above: service id → what refers to it. Kept
    /// by [`MapState::apply_op`] and [`MapState::reindex`], so that
    /// planning the changes of a few services costs what they hold, not a
    /// pass over every map.
    by_service: BTreeMap<u32, ServiceRefs>,
    /// Derived: which backend ids and service ids are free, so that a new
    /// one is found without a pass over the maps.
    backend_ids: IdSpace,
    service_ids: IdSpace,
    /// Derived: how many backends are `BACKEND_ACTIVE` (the others are
    /// terminating), for the gauges.
    active_backends: usize,
}

/// The ids in use of one kind, as what is free: every id below the
/// highest in use that is not used, and every id above it. Id 0 is never
/// handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IdSpace {
    /// One above the highest id in use (1 when none is).
    next: u32,
    /// Ids below `next` not in use.
    gaps: BTreeSet<u32>,
}

impl Default for IdSpace {
    fn default() -> Self {
        Self {
            next: 1,
            gaps: BTreeSet::new(),
        }
    }
}

impl IdSpace {
    fn used(&mut self, id: u32) {
        if id >= self.next {
            self.gaps.extend(self.next..id);
            self.next = id + 1;
        } else {
            self.gaps.remove(&id);
        }
    }

    fn freed(&mut self, id: u32) {
        if id == 0 || id >= self.next {
            return;
        }
        self.gaps.insert(id);
        // Keep the gaps below the highest id in use only.
        while self.next > 1 && self.gaps.remove(&(self.next - 1)) {
            self.next -= 1;
        }
    }

    /// The free ids, ascending (unbounded: the caller stops at its limit).
    fn free(&self) -> impl Iterator<Item = u32> + '_ {
        self.gaps.iter().copied().chain(self.next..)
    }
}

fn is_active(b: &BackendV4) -> bool {
    b.state == lb_common::BACKEND_ACTIVE
}

/// Everything in the maps that belongs to one service id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRefs {
    /// Its frontends.
    pub frontends: BTreeSet<FrontendKeyV4>,
    /// Its backends (not free).
    pub backends: BTreeSet<u32>,
    /// Entries keyed by the id itself: Maglev table, backend list, name,
    /// source ranges.
    keyed: usize,
}

impl ServiceRefs {
    fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.backends.is_empty() && self.keyed == 0
    }
}

/// A service's Maglev table as the planner sees it: its size and members,
/// not its slots. A table is a function of its members and size (every
/// node computes the same one), so that is all the planner compares; the
/// slots (64 KiB at the default size) are written and dropped, so that the
/// agent's picture of 10,000 services does not hold 640 MiB of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaglevEntry {
    /// The table's size: its first `size` slots are written.
    pub size: u32,
    /// The distinct backend ids in the slots, computed once when the table
    /// is read or written (the planner compares it on every plan, for
    /// every service: it must not cost a pass over the slots).
    pub members: BTreeSet<u32>,
    /// A digest of the slots (xxh3), so that two pictures of the maps are
    /// equal only when their tables are.
    pub digest: u64,
}

impl MaglevEntry {
    /// The entry of a table whose written slots are `slots`.
    pub fn new(slots: &[u32]) -> Self {
        let bytes: Vec<u8> = slots.iter().flat_map(|id| id.to_ne_bytes()).collect();
        Self {
            size: slots.len() as u32,
            members: slots.iter().copied().collect(),
            digest: xxhash_rust::xxh3::xxh3_64(&bytes),
        }
    }
}

/// One `loadBalancerSourceRanges` CIDR of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRange {
    /// Service id.
    pub service_id: u32,
    /// Network address, wire order.
    pub addr: [u8; 4],
    /// CIDR prefix length (0..=32).
    pub prefix_len: u8,
}

/// One map write. The planner orders them so that the datapath never sees a
/// reference to something not yet written: backends, then Maglev tables and
/// backend lists, then frontends (source ranges before the frontends that
/// use them); removals in the reverse order. Names come with the lists and
/// go with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write backend `id` (new backend, or a state change).
    PutBackend { id: u32, value: BackendV4 },
    /// Replace the whole Maglev table of a service (one atomic map update),
    /// in the table map its size (`slots.len()`) selects.
    PutMaglev { service_id: u32, slots: Vec<u32> },
    /// Admit a CIDR for a service (`loadBalancerSourceRanges`).
    PutSrcRange(SrcRange),
    /// Withdraw a CIDR.
    DeleteSrcRange(SrcRange),
    /// Create or replace a frontend.
    PutFrontend {
        key: FrontendKeyV4,
        value: ServiceValue,
    },
    /// Replace the whole backend list of a service (one atomic map update).
    PutBackendList { service_id: u32, ids: Vec<u32> },
    /// Name (or rename) a service id for operators' tools.
    PutServiceName { service_id: u32, name: String },
    /// Remove a frontend.
    DeleteFrontend { key: FrontendKeyV4 },
    /// Remove a service's backend list.
    DeleteBackendList { service_id: u32 },
    /// Forget a service id's name.
    DeleteServiceName { service_id: u32 },
    /// Remove a service's Maglev table from the table map `size` selects.
    DeleteMaglev { service_id: u32, size: u32 },
    /// Mark backend `id` free (array slots cannot be deleted). Flows still
    /// pinned to it are re-balanced on their next packet.
    FreeBackend { id: u32 },
}

/// Applies operations to some set of maps and reads their state back.
pub trait MapWriter {
    /// Applies `ops` in order. Stops at the first failure and reports it;
    /// the operations before it stay applied (each is individually safe).
    fn apply(&mut self, ops: &[Op]) -> crate::error::Result<()>;
    /// Reads the current state of the maps.
    fn read_state(&self) -> crate::error::Result<MapState>;
}

impl Op {
    /// A `PutMaglev`'s service id and the slots it writes.
    pub fn maglev_slots(&self) -> Option<(u32, &[u32])> {
        match self {
            Op::PutMaglev { service_id, slots } => Some((*service_id, slots)),
            _ => None,
        }
    }
}

impl MapState {
    /// The picture of maps holding these entries.
    pub fn new(
        frontends: BTreeMap<FrontendKeyV4, ServiceValue>,
        maglev: BTreeMap<u32, MaglevEntry>,
        backends: BTreeMap<u32, BackendV4>,
        src_ranges: BTreeSet<SrcRange>,
        backend_lists: BTreeMap<u32, Vec<u32>>,
        names: BTreeMap<u32, String>,
        stale_tables: BTreeSet<(u32, usize)>,
    ) -> Self {
        let mut s = Self {
            frontends,
            maglev,
            stale_tables,
            backends,
            src_ranges,
            backend_lists,
            names,
            by_service: BTreeMap::new(),
            backend_ids: IdSpace::default(),
            service_ids: IdSpace::default(),
            active_backends: 0,
        };
        s.reindex();
        s
    }

    /// Rebuilds the index by service id from the maps' entries.
    fn reindex(&mut self) {
        let mut idx: BTreeMap<u32, ServiceRefs> = BTreeMap::new();
        for (k, v) in &self.frontends {
            idx.entry(v.service_id).or_default().frontends.insert(*k);
        }
        for (&id, b) in &self.backends {
            idx.entry(b.service_id).or_default().backends.insert(id);
        }
        let keyed = self
            .maglev
            .keys()
            .chain(self.backend_lists.keys())
            .chain(self.names.keys())
            .chain(self.src_ranges.iter().map(|r| &r.service_id))
            .chain(self.stale_tables.iter().map(|(sid, _)| sid));
        for sid in keyed {
            idx.entry(*sid).or_default().keyed += 1;
        }
        self.service_ids = IdSpace::default();
        for &sid in idx.keys().filter(|&&s| s > 0) {
            self.service_ids.used(sid);
        }
        self.backend_ids = IdSpace::default();
        for &id in self.backends.keys().filter(|&&i| i > 0) {
            self.backend_ids.used(id);
        }
        self.active_backends = self.backends.values().filter(|b| is_active(b)).count();
        self.by_service = idx;
    }

    /// Service ids anything in the maps refers to.
    pub fn service_count(&self) -> usize {
        self.by_service.len()
    }

    /// Backends that take new flows, and backends that are terminating.
    pub fn backend_states(&self) -> (usize, usize) {
        (
            self.active_backends,
            self.backends.len() - self.active_backends,
        )
    }

    /// Backend ids no map entry uses, ascending.
    pub fn free_backend_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.backend_ids.free()
    }

    /// Service ids nothing in the maps refers to, ascending.
    pub fn free_service_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.service_ids.free()
    }

    /// What refers to service id `sid`.
    pub fn service(&self, sid: u32) -> Option<&ServiceRefs> {
        self.by_service.get(&sid)
    }

    /// The service ids anything in the maps refers to, ascending.
    pub fn service_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_service.keys().copied()
    }

    /// The source ranges of service id `sid`.
    pub fn src_ranges_of(&self, sid: u32) -> impl Iterator<Item = &SrcRange> {
        let lo = SrcRange {
            service_id: sid,
            addr: [0; 4],
            prefix_len: 0,
        };
        let hi = SrcRange {
            service_id: sid,
            addr: [u8::MAX; 4],
            prefix_len: u8::MAX,
        };
        self.src_ranges.range(lo..=hi)
    }

    fn refs(&mut self, sid: u32, f: impl FnOnce(&mut ServiceRefs)) {
        let r = self.by_service.entry(sid).or_default();
        f(r);
        if r.is_empty() {
            self.by_service.remove(&sid);
            self.service_ids.freed(sid);
        } else if sid > 0 {
            self.service_ids.used(sid);
        }
    }

    /// Counts (`inserted`) or uncounts an entry keyed by `sid`.
    fn keyed(&mut self, sid: u32, inserted: bool) {
        self.refs(sid, |r| {
            if inserted {
                r.keyed += 1
            } else {
                r.keyed = r.keyed.saturating_sub(1)
            }
        });
    }

    /// Applies `op` to this picture of the maps, exactly as a writer applies
    /// it to the maps themselves. The agent keeps its picture current this
    /// way instead of reading every map back after each sync.
    pub fn apply_op(&mut self, op: &Op) {
        match op {
            Op::PutBackend { id, value } => {
                let free = value.state == lb_common::BACKEND_FREE;
                let old = if free {
                    self.backends.remove(id)
                } else {
                    self.backends.insert(*id, *value)
                };
                if let Some(o) = old {
                    self.active_backends -= usize::from(is_active(&o));
                    self.refs(o.service_id, |r| {
                        r.backends.remove(id);
                    });
                }
                if !free {
                    self.active_backends += usize::from(is_active(value));
                }
                if free {
                    self.backend_ids.freed(*id);
                } else {
                    self.backend_ids.used(*id);
                    self.refs(value.service_id, |r| {
                        r.backends.insert(*id);
                    });
                }
            }
            Op::FreeBackend { id } => {
                if let Some(o) = self.backends.remove(id) {
                    self.active_backends -= usize::from(is_active(&o));
                    self.refs(o.service_id, |r| {
                        r.backends.remove(id);
                    });
                }
                self.backend_ids.freed(*id);
            }
            Op::PutFrontend { key, value } => {
                if let Some(o) = self.frontends.insert(*key, *value) {
                    self.refs(o.service_id, |r| {
                        r.frontends.remove(key);
                    });
                }
                self.refs(value.service_id, |r| {
                    r.frontends.insert(*key);
                });
            }
            Op::DeleteFrontend { key } => {
                if let Some(o) = self.frontends.remove(key) {
                    self.refs(o.service_id, |r| {
                        r.frontends.remove(key);
                    });
                }
            }
            Op::PutMaglev { service_id, slots } => {
                let sid = *service_id;
                match self.maglev.insert(sid, MaglevEntry::new(slots)) {
                    None => self.keyed(sid, true),
                    // The old table stays in its own map until removed.
                    Some(old) if maglev_class(old.size) != maglev_class(slots.len() as u32) => {
                        if self.stale_tables.insert((sid, maglev_class(old.size))) {
                            self.keyed(sid, true);
                        }
                    }
                    Some(_) => {}
                }
                if self
                    .stale_tables
                    .remove(&(sid, maglev_class(slots.len() as u32)))
                {
                    self.keyed(sid, false);
                }
            }
            Op::DeleteMaglev { service_id, size } => {
                let sid = *service_id;
                let class = maglev_class(*size);
                let live = self
                    .maglev
                    .get(&sid)
                    .is_some_and(|t| maglev_class(t.size) == class);
                if live {
                    self.maglev.remove(&sid);
                    self.keyed(sid, false);
                } else if self.stale_tables.remove(&(sid, class)) {
                    self.keyed(sid, false);
                }
            }
            Op::PutSrcRange(r) => {
                if self.src_ranges.insert(*r) {
                    self.keyed(r.service_id, true);
                }
            }
            Op::DeleteSrcRange(r) => {
                if self.src_ranges.remove(r) {
                    self.keyed(r.service_id, false);
                }
            }
            Op::PutBackendList { service_id, ids } => {
                let n = ids.len().min(lb_common::BACKEND_LIST_CAPACITY);
                if self
                    .backend_lists
                    .insert(*service_id, ids[..n].to_vec())
                    .is_none()
                {
                    self.keyed(*service_id, true);
                }
            }
            Op::DeleteBackendList { service_id } => {
                if self.backend_lists.remove(service_id).is_some() {
                    self.keyed(*service_id, false);
                }
            }
            Op::PutServiceName { service_id, name } => {
                let name = lb_common::ServiceName::new(name).as_str().to_owned();
                if self.names.insert(*service_id, name).is_none() {
                    self.keyed(*service_id, true);
                }
            }
            Op::DeleteServiceName { service_id } => {
                if self.names.remove(service_id).is_some() {
                    self.keyed(*service_id, false);
                }
            }
        }
    }
}
