//! Capacities, pin names and the integer codes stored in map values.
//!
//! Every code here is part of the pinned-map ABI: never renumber a code, only
//! add new ones. A change of layout gets a new map version ([`MAP_VERSION`]).

/// Layout version of the pinned maps. Pins live under
/// `<bpffs-root>/v<MAP_VERSION>/` so that an agent with a new layout never
/// reuses maps written with an old one.
pub const MAP_VERSION: u32 = 1;

/// Maximum number of service ports (one Maglev table each). Ids run from 1;
/// 0 means "none".
pub const MAX_SERVICES: u32 = 16_384;
/// Maximum number of frontends (address, port, protocol) across all services.
pub const MAX_FRONTENDS: u32 = 65_536;
/// Maximum number of backends across all services. Ids run from 1; 0 means
/// "none".
pub const MAX_BACKENDS: u32 = 262_144;
/// Default capacity of the conntrack table (entries; each flow takes two: the
/// forward and the reply direction). The agent can change it at load time.
pub const CT_DEFAULT_CAPACITY: u32 = 262_144;

/// Slots compiled into each Maglev table value: the largest table size the
/// agent may choose. Must be prime.
pub const MAGLEV_CAPACITY: usize = 16_381;
/// Default Maglev table size (prime; M ≥ 100·N keeps each backend's share
/// within 1% of 1/N).
pub const MAGLEV_DEFAULT_SIZE: u32 = 16_381;

/// IP protocol numbers used in keys.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol numbers used in keys.
pub const IPPROTO_UDP: u8 = 17;

/// [`crate::maps::ServiceValue::kind`]: the frontend is a NodePort on a node address.
pub const FRONTEND_NODEPORT: u8 = 1;
/// [`crate::maps::ServiceValue::kind`]: the frontend is a LoadBalancer ingress IP.
pub const FRONTEND_LOADBALANCER: u8 = 2;
/// [`crate::maps::ServiceValue::kind`]: the frontend is one of `spec.externalIPs`.
pub const FRONTEND_EXTERNAL_IP: u8 = 3;

/// [`crate::maps::ServiceValue::flags`]: this frontend only admits clients in
/// the service's `loadBalancerSourceRanges` (`LB_SRC_RANGES_V4`); others are
/// dropped and counted.
pub const SVC_F_SOURCE_RANGES: u16 = 1;
/// [`crate::maps::ServiceValue::flags`]: with no usable backend, drop instead
/// of rejecting (kube-proxy drops external traffic of an
/// `externalTrafficPolicy: Local` service that has no local endpoint, so a
/// load balancer's health check steers clients elsewhere).
pub const SVC_F_DROP_NO_BACKEND: u16 = 2;

/// [`crate::maps::ServiceValue::policy`]: per-flow Maglev hashing (default).
pub const POLICY_MAGLEV: u8 = 0;

/// [`crate::maps::BackendV4::state`]: the slot is free (no backend). A flow
/// pinned to a free slot is re-balanced on its next packet.
pub const BACKEND_FREE: u8 = 0;
/// [`crate::maps::BackendV4::state`]: ready; takes new flows through the
/// Maglev table and keeps the flows it has.
pub const BACKEND_ACTIVE: u8 = 1;
/// [`crate::maps::BackendV4::state`]: terminating; not in the Maglev table,
/// keeps the flows it already has.
pub const BACKEND_TERMINATING: u8 = 2;

/// [`crate::maps::BackendV4::flags`]: the backend runs on this node (DNAT, then
/// the kernel routes to the pod). Without it the backend is remote: DNAT +
/// SNAT to this node's address, forwarded from XDP.
pub const BACKEND_F_LOCAL: u8 = 1;

/// [`crate::maps::CtKeyV4::dir`]: client → frontend, looked up by XDP.
pub const CT_DIR_FORWARD: u8 = 0;
/// [`crate::maps::CtKeyV4::dir`]: backend → client, looked up by TC egress.
pub const CT_DIR_REPLY: u8 = 1;

/// [`crate::maps::CtKeyV4::dir`]: key of `LB_NAT_V4`: the reply of a
/// forwarded flow as it returns from the backend's node (backend → this
/// node's SNAT address and port).
pub const CT_DIR_SNAT: u8 = 2;

/// [`crate::maps::CtValueV4::flags`]: the flow goes to a remote backend,
/// source-NATed to `snat_addr:snat_port_be`.
pub const CT_F_SNAT: u8 = 1;

/// [`crate::maps::CtValueV4::tcp_flags`]: a SYN was seen from the client.
pub const CT_TCP_SYN: u8 = 1;
/// [`crate::maps::CtValueV4::tcp_flags`]: the client sent FIN.
pub const CT_TCP_FIN_FWD: u8 = 2;
/// [`crate::maps::CtValueV4::tcp_flags`]: the backend sent FIN.
pub const CT_TCP_FIN_REPLY: u8 = 4;
/// [`crate::maps::CtValueV4::tcp_flags`]: either side sent RST.
pub const CT_TCP_RST: u8 = 8;

/// [`crate::maps::CtValueV4::reason`]: backend taken from the Maglev slot of
/// the flow hash when the flow was new.
pub const REASON_MAGLEV: u8 = 1;
/// [`crate::maps::CtValueV4::reason`]: the flow's backend went away; it was
/// re-balanced through the Maglev table.
pub const REASON_REBALANCED: u8 = 2;

/// [`crate::maps::CtValueV4::reason`]: session affinity (`ClientIP`) sent the
/// client's new flow to the backend of its previous one.
pub const REASON_AFFINITY: u8 = 3;

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (kube-proxy's).
pub const AFFINITY_DEFAULT_TIMEOUT_S: u32 = 10_800;
/// Default capacity of the NAT table (flows forwarded to remote backends).
pub const NAT_DEFAULT_CAPACITY: u32 = 131_072;
/// Ports tried (from the flow hash on) before a new forwarded flow is
/// dropped as `snat_exhausted`.
pub const SNAT_PORT_TRIES: u32 = 16;

/// Capacity of the session-affinity table (clients × services).
pub const AFFINITY_CAPACITY: u32 = 65_536;
/// Capacity of the source-range table (CIDRs across all services).
pub const MAX_SOURCE_RANGES: u32 = 16_384;

/// Pin names of the maps (files under `<bpffs-root>/v<MAP_VERSION>/`); equal
/// to the map symbols in `lb-ebpf/src/maps.rs`.
pub mod pin {
    /// Frontend (address, port, protocol) → service.
    pub const FRONTENDS_V4: &str = "LB_FRONTENDS_V4";
    /// Service id → Maglev table of backend ids.
    pub const MAGLEV: &str = "LB_MAGLEV";
    /// Backend id → address, port, state.
    pub const BACKENDS_V4: &str = "LB_BACKENDS_V4";
    /// Conntrack, both directions.
    pub const CONNTRACK_V4: &str = "LB_CT_V4";
    /// Per-service counters (per CPU).
    pub const SERVICE_COUNTERS: &str = "LB_SVC_COUNTERS";
    /// Per-backend counters (per CPU).
    pub const BACKEND_COUNTERS: &str = "LB_BE_COUNTERS";
    /// Datapath verdict counters (per CPU).
    pub const STATS: &str = "LB_STATS";
    /// Session affinity: (service, client) → backend.
    pub const AFFINITY_V4: &str = "LB_AFFINITY_V4";
    /// `loadBalancerSourceRanges`: (service, CIDR) LPM trie.
    pub const SRC_RANGES_V4: &str = "LB_SRC_RANGE_V4";
    /// SNAT mappings of flows forwarded to remote backends.
    pub const NAT_V4: &str = "LB_NAT_V4";
    /// Node-wide datapath settings.
    pub const CONFIG: &str = "LB_CONFIG";
    /// Every map the agent pins.
    pub const ALL: [&str; 11] = [
        FRONTENDS_V4,
        MAGLEV,
        BACKENDS_V4,
        CONNTRACK_V4,
        SERVICE_COUNTERS,
        BACKEND_COUNTERS,
        STATS,
        AFFINITY_V4,
        SRC_RANGES_V4,
        NAT_V4,
        CONFIG,
    ];
}
