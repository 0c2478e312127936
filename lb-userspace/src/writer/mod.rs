//! The last stage of the pipeline: map operations, and the writers that apply
//! them (`kernel`: the pinned BPF maps; `memory`: BTreeMaps for tests).
//!
//! The planner (`crate::plan`) reads a [`MapState`] and emits [`Op`]s in a
//! safe order; a writer applies them in the order given and can read its
//! state back, so the agent re-plans against what the maps really hold (after
//! a restart, too).

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{BackendV4, FrontendKeyV4, MaglevTable, ServiceValue};

pub mod kernel;
pub mod memory;

/// What the datapath maps hold, as far as the planner cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// `LB_FRONTENDS_V4`.
    pub frontends: BTreeMap<FrontendKeyV4, ServiceValue>,
    /// `LB_MAGLEV`: service id → its table.
    pub maglev: BTreeMap<u32, MaglevEntry>,
    /// `LB_BACKENDS_V4`, only the slots whose state is not `BACKEND_FREE`.
    pub backends: BTreeMap<u32, BackendV4>,
    /// `LB_SRC_RANGE_V4`: (service id, network address, prefix length).
    pub src_ranges: BTreeSet<SrcRange>,
    /// `LB_SVC_BACKENDS`: service id → its usable backend ids in list order
    /// (services whose policy is not Maglev).
    pub backend_lists: BTreeMap<u32, Vec<u32>>,
    /// `LB_SVC_NAMES`: service id → `ns/name:port`.
    pub names: BTreeMap<u32, String>,
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
    /// Replace the whole Maglev table of a service (one atomic map update).
    PutMaglev {
        service_id: u32,
        table: Box<MaglevTable>,
        size: u32,
    },
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
    /// Remove a service's Maglev table.
    DeleteMaglev { service_id: u32 },
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
    /// A `PutMaglev`'s service id and the slots it writes (the table's
    /// first `size`; the kernel value holds the full capacity).
    pub fn maglev_slots(&self) -> Option<(u32, &[u32])> {
        match self {
            Op::PutMaglev {
                service_id,
                table,
                size,
            } => Some((
                *service_id,
                &table.slots[..(*size as usize).min(table.slots.len())],
            )),
            _ => None,
        }
    }
}

impl MapState {
    /// Applies `op` to this picture of the maps, exactly as a writer applies
    /// it to the maps themselves. The agent keeps its picture current this
    /// way instead of reading every map back after each sync.
    pub fn apply_op(&mut self, op: &Op) {
        match op {
            Op::PutBackend { id, value } => {
                if value.state == lb_common::BACKEND_FREE {
                    self.backends.remove(id);
                } else {
                    self.backends.insert(*id, *value);
                }
            }
            Op::PutMaglev { .. } => {
                if let Some((service_id, slots)) = op.maglev_slots() {
                    self.maglev.insert(service_id, MaglevEntry::new(slots));
                }
            }
            Op::PutFrontend { key, value } => {
                self.frontends.insert(*key, *value);
            }
            Op::DeleteFrontend { key } => {
                self.frontends.remove(key);
            }
            Op::DeleteMaglev { service_id } => {
                self.maglev.remove(service_id);
            }
            Op::FreeBackend { id } => {
                self.backends.remove(id);
            }
            Op::PutSrcRange(r) => {
                self.src_ranges.insert(*r);
            }
            Op::PutBackendList { service_id, ids } => {
                let n = ids.len().min(lb_common::BACKEND_LIST_CAPACITY);
                self.backend_lists.insert(*service_id, ids[..n].to_vec());
            }
            Op::DeleteBackendList { service_id } => {
                self.backend_lists.remove(service_id);
            }
            Op::PutServiceName { service_id, name } => {
                self.names.insert(
                    *service_id,
                    lb_common::ServiceName::new(name).as_str().to_owned(),
                );
            }
            Op::DeleteServiceName { service_id } => {
                self.names.remove(service_id);
            }
            Op::DeleteSrcRange(r) => {
                self.src_ranges.remove(r);
            }
        }
    }
}
