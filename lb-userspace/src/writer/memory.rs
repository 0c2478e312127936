//! The in-memory twin of the datapath maps, for tests and dry runs.

use std::{collections::BTreeMap, ops::Deref};

use lb_common::{
    BackendV4, FrontendKeyV4, MAGLEV_CAPACITY, MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES,
    maglev_class,
};

use super::{MapState, MapWriter, Op};
use crate::error::{Error, Result};

/// A [`MapState`] that behaves like the kernel maps (same capacities, same
/// whole-value replacement), plus the Maglev tables' slots (which a
/// `MapState` only digests) and [`MemoryMaps::resolve`], which picks a
/// backend for a new flow the way the datapath does. Derefs to its state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryMaps {
    state: MapState,
    /// `LB_MAGLEV`: service id → the written slots of its table.
    /// `LB_MAGLEV_S/M/L`: (service id, table map index) → the written
    /// slots of the table there.
    tables: BTreeMap<(u32, usize), Vec<u32>>,
}

impl Deref for MemoryMaps {
    type Target = MapState;

    fn deref(&self) -> &MapState {
        &self.state
    }
}

impl MemoryMaps {
    /// Empty maps.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps holding `state` (a restarted agent's picture): what the
    /// planner needs, without the tables' slots, so [`MemoryMaps::resolve`]
    /// finds no Maglev backend in them until a table is written again.
    pub fn from_state(state: &MapState) -> Self {
        Self {
            state: state.clone(),
            tables: BTreeMap::new(),
        }
    }

    /// The written slots of service `service_id`'s Maglev table.
    pub fn table(&self, service_id: u32) -> Option<&[u32]> {
        let class = maglev_class(self.maglev.get(&service_id)?.size);
        self.tables.get(&(service_id, class)).map(Vec::as_slice)
    }

    /// The table the datapath reads for frontend value `svc`: the one in
    /// the table map its size selects.
    fn table_of(&self, svc: &lb_common::ServiceValue) -> Option<&[u32]> {
        let class = maglev_class(svc.maglev_size);
        self.tables.get(&(svc.service_id, class)).map(Vec::as_slice)
    }

    /// The backend the datapath picks for a new flow to `key` whose flow
    /// hash is `flow_hash`: frontend → service → Maglev slot
    /// `maglev_slot(flow_hash, maglev_size)` → backend. `None` when the
    /// frontend is unknown, the service has no usable backend, or the slot
    /// names a backend that is not active in that service.
    pub fn resolve(&self, key: &FrontendKeyV4, flow_hash: u32) -> Option<BackendV4> {
        let svc = self.frontends.get(key)?;
        if svc.backend_count == 0 || svc.maglev_size == 0 {
            return None;
        }
        let table = self.table_of(svc)?;
        let slot = lb_common::hash::maglev_slot(flow_hash, svc.maglev_size);
        let id = *table.get(slot as usize)?;
        let b = self.backends.get(&id)?;
        b.serves(svc.service_id).then_some(*b)
    }

    /// The backend id and entry the datapath picks for a new flow to `key`
    /// under the service's policy (no session affinity): Maglev as
    /// [`MemoryMaps::resolve`]; round-robin: list entry
    /// `rr_index(turn, len)` for the service's turn counter `turn`;
    /// least-connection: `lb_common::policy::least_conn` over the list with
    /// the open-flow counts `open`.
    pub fn resolve_policy(
        &self,
        key: &FrontendKeyV4,
        flow_hash: u32,
        turn: u64,
        open: impl Fn(u32) -> u64,
    ) -> Option<(u32, BackendV4)> {
        let svc = self.frontends.get(key)?;
        if svc.backend_count == 0 || svc.maglev_size == 0 {
            return None;
        }
        let table = self.table_of(svc)?;
        let slot_id = |h: u32| {
            let slot = lb_common::hash::maglev_slot(h, svc.maglev_size);
            table.get(slot as usize).copied()
        };
        let list = self.backend_lists.get(&svc.service_id);
        let id = match (svc.policy, list) {
            (lb_common::POLICY_ROUND_ROBIN, Some(l)) if !l.is_empty() => {
                l[lb_common::policy::rr_index(turn, l.len() as u32) as usize]
            }
            (lb_common::POLICY_LEAST_CONN, Some(l)) => {
                let m = slot_id(flow_hash)?;
                let second = slot_id(lb_common::hash::rehash(flow_hash))?;
                lb_common::policy::least_conn(l, m, second, open).0
            }
            _ => slot_id(flow_hash)?,
        };
        let b = self.backends.get(&id)?;
        b.serves(svc.service_id).then_some((id, *b))
    }

    /// Checks that nothing the datapath can reach dangles: every frontend
    /// with backends has a table, and every slot of every table names a
    /// written backend of that table's service. Describes the first problem
    /// found. (While a table is being resized its frontends briefly carry
    /// the old size; a slot beyond the table finds no backend, which the
    /// datapath treats as "no backend" for that one new flow.)
    pub fn check_references(&self) -> std::result::Result<(), String> {
        for (key, v) in &self.frontends {
            if v.backend_count == 0 {
                continue;
            }
            if !self.maglev.contains_key(&v.service_id) {
                return Err(format!(
                    "frontend {key:?} points to service {} without a table",
                    v.service_id
                ));
            }
        }
        for ((sid, _), t) in &self.tables {
            for id in t {
                match self.backends.get(id) {
                    Some(b) if b.service_id == *sid => {}
                    _ => return Err(format!("table {sid} names backend {id}, not written")),
                }
            }
        }
        for (sid, l) in &self.backend_lists {
            for id in l {
                match self.backends.get(id) {
                    Some(b) if b.service_id == *sid => {}
                    _ => return Err(format!("list {sid} names backend {id}, not written")),
                }
            }
        }
        Ok(())
    }

    fn apply_one(&mut self, op: &Op) -> Result<()> {
        let full = |map: &'static str, op: &Op| Error::Map {
            map,
            op: format!("{op:?}"),
            source: std::io::Error::from_raw_os_error(7), // E2BIG, as the kernel says
        };
        let over = match op {
            Op::PutBackend { id, .. } => *id >= MAX_BACKENDS,
            Op::PutMaglev { service_id, slots } => {
                *service_id >= MAX_SERVICES || slots.len() > MAGLEV_CAPACITY
            }
            Op::PutFrontend { key, .. } => {
                !self.frontends.contains_key(key) && self.frontends.len() >= MAX_FRONTENDS as usize
            }
            Op::PutBackendList { service_id, .. } | Op::PutServiceName { service_id, .. } => {
                *service_id >= MAX_SERVICES
            }
            _ => false,
        };
        if over {
            let map = match op {
                Op::PutBackend { .. } => lb_common::pin::BACKENDS_V4,
                Op::PutMaglev { slots, .. } => {
                    lb_common::pin::MAGLEV[maglev_class(slots.len() as u32)]
                }
                Op::PutBackendList { .. } => lb_common::pin::SERVICE_BACKENDS,
                Op::PutServiceName { .. } => lb_common::pin::SERVICE_NAMES,
                _ => lb_common::pin::FRONTENDS_V4,
            };
            return Err(full(map, op));
        }
        if let Some((service_id, slots)) = op.maglev_slots() {
            let class = maglev_class(slots.len() as u32);
            self.tables.insert((service_id, class), slots.to_vec());
        }
        if let Op::DeleteMaglev { service_id, size } = op {
            self.tables.remove(&(*service_id, maglev_class(*size)));
        }
        self.state.apply_op(op);
        Ok(())
    }
}

impl MapWriter for MemoryMaps {
    fn apply(&mut self, ops: &[Op]) -> Result<()> {
        ops.iter().try_for_each(|op| self.apply_one(op))
    }

    fn read_state(&self) -> Result<MapState> {
        Ok(self.state.clone())
    }
}
