//! Every map of the datapath, declared once. Types and byte order are
//! documented in `lb_common::maps`; pin names equal these symbols (see
//! `lb_common::pin`) and live under `<bpffs-root>/v5/`.
//!
//! All maps are BTF maps, so `bpftool map dump` prints named fields.

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    AFFINITY_CAPACITY, AffinityKeyV4, AffinityValue, BackendCounters, BackendList, BackendV4,
    CT_DEFAULT_CAPACITY, Counters, CtKeyV4, CtValueV4, DatapathConfig, FrontendKeyV4, MAX_BACKENDS,
    MAX_FRONTENDS, MAX_SERVICES, MAX_SOURCE_RANGES, MaglevTableL, MaglevTableM, MaglevTableS,
    NAT_DEFAULT_CAPACITY, NatValueV4, OPEN_FLOWS_DEFAULT_CAPACITY, OpenFlowV4, ServiceName,
    ServiceValue, SrcRangeV4, Stats,
};

/// Frontend (addr, port, proto) → service. Written by the agent; read by
/// XDP. Capacity `MAX_FRONTENDS`. Not preallocated: memory follows the
/// frontends written (only the agent inserts, so no packet allocates).
#[btf_map]
pub static LB_FRONTENDS_V4: HashMap<
    FrontendKeyV4,
    ServiceValue,
    { MAX_FRONTENDS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Service id → Maglev table of backend ids, one map per table size
/// (`MAGLEV_SIZES`): a service's table is in the smallest map that holds
/// its `maglev_size`. Written by the agent (one update per table: atomic;
/// a table that changes size is written to its new map before its
/// frontends point there, and removed from the old one after); read by XDP
/// for new flows. Not preallocated: memory follows the tables written.
/// Capacity `MAX_SERVICES` each.
#[btf_map]
pub static LB_MAGLEV_S: HashMap<
    u32,
    MaglevTableS,
    { MAX_SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// See [`LB_MAGLEV_S`]: tables of up to 4,093 slots.
#[btf_map]
pub static LB_MAGLEV_M: HashMap<
    u32,
    MaglevTableM,
    { MAX_SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// See [`LB_MAGLEV_S`]: tables of up to 16,381 slots.
#[btf_map]
pub static LB_MAGLEV_L: HashMap<
    u32,
    MaglevTableL,
    { MAX_SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Backend id → address, port, state. Written by the agent; read by XDP.
/// Capacity `MAX_BACKENDS`.
#[btf_map]
pub static LB_BACKENDS_V4: Array<BackendV4, { MAX_BACKENDS as usize }> = Array::new();

/// Conntrack, both directions (`CtKeyV4::dir`). Written by XDP (new flows)
/// and TC (reply flags); read by both. LRU: a full table evicts the least
/// recently used flow. `BPF_F_NO_COMMON_LRU`: each CPU keeps its own LRU
/// list (the table is still shared), so inserts do not contend on one list.
/// Capacity `CT_DEFAULT_CAPACITY` (the agent may resize).
#[btf_map]
pub static LB_CT_V4: LruHashMap<
    CtKeyV4,
    CtValueV4,
    { CT_DEFAULT_CAPACITY as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// Service id → counters, per CPU. Written by XDP; read by the agent.
#[btf_map]
pub static LB_SVC_COUNTERS: PerCpuArray<Counters, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// Backend id → counters, shared by all CPUs (atomic adds; see
/// `BackendCounters` for why not per CPU). Written by XDP; read by the agent.
#[btf_map]
pub static LB_BE_COUNTERS: Array<BackendCounters, { MAX_BACKENDS as usize }> = Array::new();

/// One entry of verdict counters, per CPU. Written by XDP and TC.
#[btf_map]
pub static LB_STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();

/// (service id, client address) → backend of the client's last new flow, for
/// `sessionAffinity: ClientIP`. Written by XDP; LRU. Capacity `AFFINITY_CAPACITY`.
#[btf_map]
pub static LB_AFFINITY_V4: LruHashMap<
    AffinityKeyV4,
    AffinityValue,
    { AFFINITY_CAPACITY as usize },
> = LruHashMap::new();

/// `loadBalancerSourceRanges` per service: LPM trie of (service id, CIDR).
/// Written by the agent; read by XDP for frontends flagged
/// `SVC_F_SOURCE_RANGES`. Capacity `MAX_SOURCE_RANGES`.
#[btf_map]
pub static LB_SRC_RANGE_V4: LpmTrie<SrcRangeV4, u32, { MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// SNAT mappings of flows forwarded to remote backends: the reply tuple as it
/// returns (backend → this node's SNAT address:port, `dir = CT_DIR_SNAT`) →
/// client and frontend. Written by XDP (`BPF_NOEXIST`: the insert is the port
/// reservation); read by XDP for replies; deleted by the agent's GC. Not LRU:
/// a mapping never disappears under a live flow. Capacity `NAT_DEFAULT_CAPACITY`.
#[btf_map]
pub static LB_NAT_V4: HashMap<CtKeyV4, NatValueV4, { NAT_DEFAULT_CAPACITY as usize }> =
    HashMap::new();

/// Node-wide settings (SNAT address and port range). Written by the agent at
/// start; read by XDP.
#[btf_map]
pub static LB_CONFIG: Array<DatapathConfig, 1> = Array::new();

/// Service id → its usable backends in (address, port) order, for
/// round-robin and least-connection. Written by the agent (whole value, one
/// update) only for services whose policy is not Maglev; read by XDP. Not
/// preallocated. Capacity `MAX_SERVICES`.
#[btf_map]
pub static LB_SVC_BACKENDS: HashMap<
    u32,
    BackendList,
    { MAX_SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Service id → round-robin turn counter (`u64`), one per service shared by
/// all CPUs, advanced with an atomic fetch-and-add by XDP.
#[btf_map]
pub static LB_RR: Array<u64, { MAX_SERVICES as usize }> = Array::new();

/// Backend id → open flows on this node (`u64`), changed only with atomic
/// adds by the counting protocol (`flows.rs`): XDP, TC, and `lb_flow_end`
/// run by the agent. Read by XDP (least-connection) and the agent.
#[btf_map]
pub static LB_BE_OPEN: Array<u64, { MAX_BACKENDS as usize }> = Array::new();

/// Open-flow registry: a flow's forward key → the token of the flow counted
/// on it (`open`), or `FLOW_CLOSED` once counted down. Tokens are installed
/// and closed by XDP/TC (new flow, RST, FIN both ways, re-balance) and by
/// the agent's collector through `lb_flow_end` (idle timeout, conntrack
/// entry lost, flows it counts), only with compare-and-swaps; closed entries
/// are reused by the next flow of the key or deleted by the collector. Not
/// LRU: never evicted behind the program's back. Preallocated (a new flow
/// costs no allocation): a deleted element may be reused at once, which the
/// tokens make harmless (see `flows.rs`). Capacity
/// `OPEN_FLOWS_DEFAULT_CAPACITY` (the agent sizes it to half the conntrack).
#[btf_map]
pub static LB_OPEN_FLOWS_V4: HashMap<
    CtKeyV4,
    OpenFlowV4,
    { OPEN_FLOWS_DEFAULT_CAPACITY as usize },
> = HashMap::new();

/// The sequence number of flow tokens (`u64`, one entry), advanced with an
/// atomic fetch-and-add by XDP for each pinned flow. Pinned, so tokens stay
/// unique across agent restarts and program reloads.
#[btf_map]
pub static LB_FLOW_SEQ: Array<u64, 1> = Array::new();

/// Service id → `ns/name:port`. Written by the agent for operators' tools
/// (`lb-agent flows`, `lb-agent backends`, bpftool); not read by the datapath.
/// Not preallocated: memory follows the services written.
#[btf_map]
pub static LB_SVC_NAMES: HashMap<
    u32,
    ServiceName,
    { MAX_SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();
