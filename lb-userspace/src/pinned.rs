//! The datapath's maps, opened from their pins by name (`lb_common::pin`):
//! one typed helper per kind of map, and one error that names the pin and
//! the likely fix. Everything that reads or writes a pinned map outside the
//! loader goes through here.

use std::path::Path;

use aya::{
    Pod,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
};

use crate::error::{Error, Result};

fn map(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        Error::Datapath(format!(
            "{}: {e} (is the datapath loaded with this --bpffs-root?)",
            path.display()
        ))
    })?;
    Map::from_map_data(data).map_err(|e| kind(name, e))
}

fn kind(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Datapath(format!("{name}: {e}"))
}

/// A hash map or LRU hash map pinned as `name` under `dir`.
pub fn hash<K: Pod, V: Pod>(dir: &Path, name: &str) -> Result<HashMap<MapData, K, V>> {
    HashMap::try_from(map(dir, name)?).map_err(|e| kind(name, e))
}

/// An array pinned as `name` under `dir`.
pub fn array<V: Pod>(dir: &Path, name: &str) -> Result<Array<MapData, V>> {
    Array::try_from(map(dir, name)?).map_err(|e| kind(name, e))
}

/// A per-CPU array pinned as `name` under `dir`.
pub fn per_cpu_array<V: Pod>(dir: &Path, name: &str) -> Result<PerCpuArray<MapData, V>> {
    PerCpuArray::try_from(map(dir, name)?).map_err(|e| kind(name, e))
}
