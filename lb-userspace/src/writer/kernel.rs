//! The map writer for the real, pinned BPF maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::{
    BACKEND_FREE, BACKEND_LIST_CAPACITY, BackendList, BackendV4, FrontendKeyV4, MAGLEV_SIZES,
    MaglevTable, ServiceName, ServiceValue, SrcRangeV4, maglev_class, pin,
};

use super::{MaglevEntry, MapState, MapWriter, Op, SrcRange};
use crate::error::{Error, Result};

/// Typed handles on the maps the agent writes.
pub struct KernelMaps {
    frontends: HashMap<MapData, FrontendKeyV4, ServiceValue>,
    maglev: TableMaps,
    backends: Array<MapData, BackendV4>,
    /// Other descriptors of `backends`, `frontends` and `names`, for batch
    /// operations (aya's map types do not lend their own).
    backends_fd: OwnedFd,
    frontends_fd: OwnedFd,
    names_fd: OwnedFd,
    src_ranges: LpmTrie<MapData, SrcRangeV4, u32>,
    lists: HashMap<MapData, u32, BackendList>,
    names: HashMap<MapData, u32, ServiceName>,
}

/// The three Maglev table maps, smallest tables first.
struct TableMaps {
    s: HashMap<MapData, u32, lb_common::MaglevTableS>,
    m: HashMap<MapData, u32, lb_common::MaglevTableM>,
    l: HashMap<MapData, u32, lb_common::MaglevTableL>,
}

impl TableMaps {
    fn new(mut map: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        let [s, m, l] = pin::MAGLEV;
        Ok(Self {
            s: map(s)?.try_into().map_err(|e| err(s, e))?,
            m: map(m)?.try_into().map_err(|e| err(m, e))?,
            l: map(l)?.try_into().map_err(|e| err(l, e))?,
        })
    }

    /// Writes `slots` as service `sid`'s table, in the map their count selects.
    fn put(&mut self, sid: u32, slots: &[u32]) -> Result<()> {
        fn put<const N: usize>(
            map: &mut HashMap<MapData, u32, MaglevTable<N>>,
            sid: u32,
            slots: &[u32],
        ) -> std::result::Result<(), aya::maps::MapError> {
            let mut t = Box::<MaglevTable<N>>::default();
            let n = slots.len().min(N);
            t.slots[..n].copy_from_slice(&slots[..n]);
            map.insert(sid, t.as_ref(), 0)
        }
        let class = maglev_class(slots.len() as u32);
        let r = match class {
            0 => put(&mut self.s, sid, slots),
            1 => put(&mut self.m, sid, slots),
            _ => put(&mut self.l, sid, slots),
        };
        r.map_err(|e| err(pin::MAGLEV[class], format!("insert {sid}: {e}")))
    }

    fn remove(&mut self, sid: u32, size: u32) -> Result<()> {
        let class = maglev_class(size);
        let r = match class {
            0 => self.s.remove(&sid),
            1 => self.m.remove(&sid),
            _ => self.l.remove(&sid),
        };
        r.map_err(|e| err(pin::MAGLEV[class], format!("remove {sid}: {e}")))
    }

    /// Every table: (service id, table map index, all its slots).
    fn read(&self) -> Result<Vec<(u32, usize, Vec<u32>)>> {
        fn read<const N: usize>(
            map: &HashMap<MapData, u32, MaglevTable<N>>,
            class: usize,
            out: &mut Vec<(u32, usize, Vec<u32>)>,
        ) -> Result<()> {
            let name = pin::MAGLEV[class];
            for key in map.keys() {
                let sid = key.map_err(|e| err(name, e))?;
                let t = map.get(&sid, 0).map_err(|e| err(name, e))?;
                out.push((sid, class, t.slots.to_vec()));
            }
            Ok(())
        }
        let mut out = Vec::new();
        read(&self.s, 0, &mut out)?;
        read(&self.m, 1, &mut out)?;
        read(&self.l, 2, &mut out)?;
        Ok(out)
    }
}

fn range_key(r: &SrcRange) -> Key<SrcRangeV4> {
    Key::new(
        32 + r.prefix_len as u32,
        SrcRangeV4 {
            service_id_be: r.service_id.to_be(),
            addr: r.addr,
        },
    )
}

fn err(map: &str, what: impl std::fmt::Display) -> Error {
    Error::Datapath(format!("{map}: {what}"))
}

/// A descriptor of array or hash map `map` of its own (a `dup`: no
/// capability beyond the ones that opened the map; getting one by map id
/// would need CAP_SYS_ADMIN).
fn second_fd(map: Option<&Map>, name: &'static str) -> Result<OwnedFd> {
    match map {
        Some(Map::Array(m) | Map::HashMap(m)) => m
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| err(name, e)),
        _ => Err(err(
            name,
            "missing from the eBPF object, or not an array or hash",
        )),
    }
}

/// Ops of one kind in a row that one batch update can write.
fn batchable(a: &Op, b: &Op) -> bool {
    matches!(
        (a, b),
        (Op::PutBackend { .. }, Op::PutBackend { .. })
            | (Op::PutFrontend { .. }, Op::PutFrontend { .. })
            | (Op::PutServiceName { .. }, Op::PutServiceName { .. })
    )
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| err(name, "map missing from the eBPF object"))
}

impl KernelMaps {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        let fd = |name| second_fd(ebpf.map(name), name);
        let (backends_fd, frontends_fd, names_fd) = (
            fd(pin::BACKENDS_V4)?,
            fd(pin::FRONTENDS_V4)?,
            fd(pin::SERVICE_NAMES)?,
        );
        Ok(Self {
            backends_fd,
            frontends_fd,
            names_fd,
            frontends: take(ebpf, pin::FRONTENDS_V4)?
                .try_into()
                .map_err(|e| err(pin::FRONTENDS_V4, e))?,
            maglev: TableMaps::new(|name| take(ebpf, name))?,
            backends: take(ebpf, pin::BACKENDS_V4)?
                .try_into()
                .map_err(|e| err(pin::BACKENDS_V4, e))?,
            src_ranges: take(ebpf, pin::SRC_RANGES_V4)?
                .try_into()
                .map_err(|e| err(pin::SRC_RANGES_V4, e))?,
            lists: take(ebpf, pin::SERVICE_BACKENDS)?
                .try_into()
                .map_err(|e| err(pin::SERVICE_BACKENDS, e))?,
            names: take(ebpf, pin::SERVICE_NAMES)?
                .try_into()
                .map_err(|e| err(pin::SERVICE_NAMES, e))?,
        })
    }

    /// Opens the maps pinned in `dir` (`<bpffs-root>/v1`), e.g. to inspect a
    /// node while the agent is down.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        let open = |name: &'static str| MapData::from_pin(dir.join(name)).map_err(|e| err(name, e));
        let backends = Map::Array(open(pin::BACKENDS_V4)?);
        let frontends = Map::HashMap(open(pin::FRONTENDS_V4)?);
        let names = Map::HashMap(open(pin::SERVICE_NAMES)?);
        Ok(Self {
            backends_fd: second_fd(Some(&backends), pin::BACKENDS_V4)?,
            frontends_fd: second_fd(Some(&frontends), pin::FRONTENDS_V4)?,
            names_fd: second_fd(Some(&names), pin::SERVICE_NAMES)?,
            frontends: HashMap::try_from(frontends).map_err(|e| err(pin::FRONTENDS_V4, e))?,
            maglev: TableMaps::new(|name| Ok(Map::HashMap(open(name)?)))?,
            backends: Array::try_from(backends).map_err(|e| err(pin::BACKENDS_V4, e))?,
            src_ranges: LpmTrie::try_from(Map::LpmTrie(open(pin::SRC_RANGES_V4)?))
                .map_err(|e| err(pin::SRC_RANGES_V4, e))?,
            lists: HashMap::try_from(Map::HashMap(open(pin::SERVICE_BACKENDS)?))
                .map_err(|e| err(pin::SERVICE_BACKENDS, e))?,
            names: HashMap::try_from(names).map_err(|e| err(pin::SERVICE_NAMES, e))?,
        })
    }
}

impl KernelMaps {
    /// Writes `ops` one syscall each.
    fn apply_each(&mut self, ops: &[Op]) -> Result<()> {
        for op in ops {
            match op {
                Op::PutBackend { id, value } => self
                    .backends
                    .set(*id, value, 0)
                    .map_err(|e| err(pin::BACKENDS_V4, format!("set {id}: {e}")))?,
                Op::PutMaglev { service_id, slots } => self.maglev.put(*service_id, slots)?,
                Op::PutFrontend { key, value } => self
                    .frontends
                    .insert(key, value, 0)
                    .map_err(|e| err(pin::FRONTENDS_V4, format!("insert {key:?}: {e}")))?,
                Op::DeleteFrontend { key } => self
                    .frontends
                    .remove(key)
                    .map_err(|e| err(pin::FRONTENDS_V4, format!("remove {key:?}: {e}")))?,
                Op::DeleteMaglev { service_id, size } => self.maglev.remove(*service_id, *size)?,
                Op::PutSrcRange(r) => self
                    .src_ranges
                    .insert(&range_key(r), 1, 0)
                    .map_err(|e| err(pin::SRC_RANGES_V4, format!("insert {r:?}: {e}")))?,
                Op::DeleteSrcRange(r) => self
                    .src_ranges
                    .remove(&range_key(r))
                    .map_err(|e| err(pin::SRC_RANGES_V4, format!("remove {r:?}: {e}")))?,
                Op::PutBackendList { service_id, ids } => {
                    let mut list = Box::<BackendList>::default();
                    let n = ids.len().min(BACKEND_LIST_CAPACITY);
                    list.ids[..n].copy_from_slice(&ids[..n]);
                    list.count = n as u32;
                    self.lists
                        .insert(service_id, list.as_ref(), 0)
                        .map_err(|e| {
                            err(pin::SERVICE_BACKENDS, format!("insert {service_id}: {e}"))
                        })?
                }
                Op::DeleteBackendList { service_id } => self
                    .lists
                    .remove(service_id)
                    .map_err(|e| err(pin::SERVICE_BACKENDS, format!("remove {service_id}: {e}")))?,
                Op::PutServiceName { service_id, name } => self
                    .names
                    .insert(service_id, ServiceName::new(name), 0)
                    .map_err(|e| err(pin::SERVICE_NAMES, format!("insert {service_id}: {e}")))?,
                Op::DeleteServiceName { service_id } => self
                    .names
                    .remove(service_id)
                    .map_err(|e| err(pin::SERVICE_NAMES, format!("remove {service_id}: {e}")))?,
                Op::FreeBackend { id } => {
                    let mut v = self
                        .backends
                        .get(id, 0)
                        .map_err(|e| err(pin::BACKENDS_V4, format!("get {id}: {e}")))?;
                    v.state = BACKEND_FREE;
                    self.backends
                        .set(*id, v, 0)
                        .map_err(|e| err(pin::BACKENDS_V4, format!("free {id}: {e}")))?
                }
            }
        }
        Ok(())
    }

    /// Writes a run of puts of one kind (see [`batchable`]) as batch
    /// updates; `false` if the kernel has no batch update for the map.
    fn put_batch(&mut self, run: &[Op]) -> Result<bool> {
        /// The (key, value) of every op of `run` `pick` recognises, written
        /// to `fd` in one batch.
        fn write<K: aya::Pod, V: aya::Pod>(
            fd: &OwnedFd,
            map: &str,
            run: &[Op],
            pick: impl Fn(&Op) -> Option<(K, V)>,
        ) -> Result<bool> {
            let (keys, values): (Vec<K>, Vec<V>) = run.iter().filter_map(pick).unzip();
            super::batch::update(fd.as_fd(), &keys, &values)
                .map_err(|e| err(map, format!("batch update: {e}")))
        }
        match &run[0] {
            Op::PutBackend { .. } => {
                write(&self.backends_fd, pin::BACKENDS_V4, run, |op| match op {
                    Op::PutBackend { id, value } => Some((*id, *value)),
                    _ => None,
                })
            }
            Op::PutFrontend { .. } => {
                write(&self.frontends_fd, pin::FRONTENDS_V4, run, |op| match op {
                    Op::PutFrontend { key, value } => Some((*key, *value)),
                    _ => None,
                })
            }
            Op::PutServiceName { .. } => {
                write(&self.names_fd, pin::SERVICE_NAMES, run, |op| match op {
                    Op::PutServiceName { service_id, name } => {
                        Some((*service_id, ServiceName::new(name)))
                    }
                    _ => None,
                })
            }
            _ => Ok(false),
        }
    }
}

impl MapWriter for KernelMaps {
    fn apply(&mut self, ops: &[Op]) -> Result<()> {
        // A cold start writes 100,000s of entries: a run of puts to one map
        // goes in batches (same order, same per-element semantics).
        for run in ops.chunk_by(batchable) {
            if run.len() < 2 || !self.put_batch(run)? {
                self.apply_each(run)?;
            }
        }
        Ok(())
    }

    fn read_state(&self) -> Result<MapState> {
        let mut frontends = BTreeMap::new();
        for kv in self.frontends.iter() {
            let (k, v) = kv.map_err(|e| err(pin::FRONTENDS_V4, e))?;
            frontends.insert(k, v);
        }
        let sizes: BTreeMap<u32, u32> = frontends
            .values()
            .map(|v: &ServiceValue| (v.service_id, v.maglev_size))
            .collect();
        // A service's table is the one in the map its frontends' size
        // selects; any other is stale (or, without frontends, the first found).
        let mut maglev = BTreeMap::new();
        let mut stale_tables = BTreeSet::new();
        let mut found = self.maglev.read()?;
        found.sort_by_key(|(sid, class, _)| {
            (*sid, sizes.get(sid).map(|s| maglev_class(*s) != *class))
        });
        for (sid, class, slots) in found {
            let size = sizes
                .get(&sid)
                .filter(|s| maglev_class(**s) == class)
                .map_or(MAGLEV_SIZES[class] as usize, |s| *s as usize)
                .min(slots.len());
            if maglev.contains_key(&sid)
                || sizes.get(&sid).is_some_and(|s| maglev_class(*s) != class)
            {
                stale_tables.insert((sid, class));
            } else {
                maglev.insert(sid, MaglevEntry::new(&slots[..size]));
            }
        }
        let slots: Vec<BackendV4> =
            match super::batch::read_array(self.backends_fd.as_fd(), self.backends.len()) {
                Ok(Some(slots)) => slots,
                Ok(None) => self
                    .backends
                    .iter()
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| err(pin::BACKENDS_V4, e))?,
                Err(e) => return Err(err(pin::BACKENDS_V4, format!("batch read: {e}"))),
            };
        let backends: BTreeMap<u32, BackendV4> = (0u32..)
            .zip(slots)
            .filter(|(_, v)| v.state != BACKEND_FREE)
            .collect();
        let mut src_ranges = BTreeSet::new();
        for key in self.src_ranges.keys() {
            let key = key.map_err(|e| err(pin::SRC_RANGES_V4, e))?;
            let data = key.data();
            src_ranges.insert(SrcRange {
                service_id: u32::from_be(data.service_id_be),
                addr: data.addr,
                prefix_len: key.prefix_len().saturating_sub(32) as u8,
            });
        }
        let mut backend_lists = BTreeMap::new();
        for key in self.lists.keys() {
            let id = key.map_err(|e| err(pin::SERVICE_BACKENDS, e))?;
            let l = self
                .lists
                .get(&id, 0)
                .map_err(|e| err(pin::SERVICE_BACKENDS, e))?;
            let n = (l.count as usize).min(BACKEND_LIST_CAPACITY);
            backend_lists.insert(id, l.ids[..n].to_vec());
        }
        let mut names = BTreeMap::new();
        for kv in self.names.iter() {
            let (id, v) = kv.map_err(|e| err(pin::SERVICE_NAMES, e))?;
            names.insert(id, v.as_str().to_owned());
        }
        Ok(MapState::new(
            frontends,
            maglev,
            backends,
            src_ranges,
            backend_lists,
            names,
            stale_tables,
        ))
    }
}
