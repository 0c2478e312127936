//! Capacities, pin names and the integer codes stored in map values.
//!
//! Every code here is part of the pinned-map ABI: never renumber a code, only
//! add new ones. A change of layout gets a new map version ([`MAP_VERSION`]).

/// Layout version of the pinned maps. Pins live under
/// `<bpffs-root>/v<MAP_VERSION>/` so that an agent with a new layout never
/// reuses maps written with an old one.
pub const MAP_VERSION: u32 = 5;
/// The directory of [`MAP_VERSION`]'s pins under the bpffs root: `v` and
/// the version (a unit test keeps the two together).
pub const PIN_DIR: &str = "v5";

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

/// The Maglev table sizes the maps are made for, smallest first: each a
/// prime and the slot count of one table map (`LB_MAGLEV_S`, `LB_MAGLEV_M`,
/// `LB_MAGLEV_L`). A service's table takes the smallest that keeps
/// M ≥ 100·N (each backend's share within about 1% of 1/N: up to 10, 40
/// and 163 backends), so its memory follows its size: 4 KiB, 16 KiB,
/// 64 KiB.
pub const MAGLEV_SIZES: [u32; 3] = [1_021, 4_093, 16_381];
/// The largest table size: the capacity of the largest table map.
pub const MAGLEV_CAPACITY: usize = MAGLEV_SIZES[2] as usize;

/// The table map (index into [`MAGLEV_SIZES`]) that holds a table of `size`
/// slots: the smallest that is large enough (the largest for anything
/// larger, where slots beyond its capacity find no backend).
#[inline(always)]
pub const fn maglev_class(size: u32) -> usize {
    if size <= MAGLEV_SIZES[0] {
        0
    } else if size <= MAGLEV_SIZES[1] {
        1
    } else {
        2
    }
}

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

/// [`crate::maps::ServiceValue::flags`]: the service has no ready endpoint;
/// its usable backends are serving-and-terminating endpoints (the KEP-1669
/// fallback). New flows record `REASON_TERMINATING_FALLBACK`.
pub const SVC_F_TERMINATING_FALLBACK: u16 = 4;

/// [`crate::maps::ServiceValue::policy`]: per-flow Maglev hashing (default).
pub const POLICY_MAGLEV: u8 = 0;
/// [`crate::maps::ServiceValue::policy`]: new flows take the service's usable
/// backends (`LB_SVC_BACKENDS`) in turn, one shared counter per service
/// (`LB_RR`) across all CPUs of the node.
pub const POLICY_ROUND_ROBIN: u8 = 1;
/// [`crate::maps::ServiceValue::policy`]: a new flow goes to the usable
/// backend with the fewest open flows on this node (`LB_BE_OPEN`); ties go to
/// the backend Maglev picks. Up to [`LC_SCAN_MAX`] backends are scanned; a
/// larger service compares two candidates drawn from its Maglev table.
pub const POLICY_LEAST_CONN: u8 = 2;

/// Least-connection scans every usable backend of a service with at most
/// this many; beyond, it compares two Maglev candidates (the flow's slot
/// and a second slot from a re-hash) and takes the one with fewer flows.
pub const LC_SCAN_MAX: u32 = 64;
/// Backend ids per `LB_SVC_BACKENDS` list. Round-robin turns over at most
/// this many backends; a service with more takes turns over its Maglev
/// table's slots instead (still even, no longer strictly in turn).
pub const BACKEND_LIST_CAPACITY: usize = 1024;
/// Capacity of the open-flow registry `LB_OPEN_FLOWS_V4` (one entry per
/// counted flow, and per closed flow until the agent's next collection).
/// Preallocated, not an LRU: when full, new flows are forwarded and pinned
/// but not counted at once (`Stats::flows_untracked`); the agent's collector
/// counts them once there is room.
pub const OPEN_FLOWS_DEFAULT_CAPACITY: u32 = 131_072;
/// Bytes of a service name in `LB_SVC_NAMES` (`ns/name:port`, truncated).
pub const SERVICE_NAME_LEN: usize = 248;

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
/// [`crate::maps::CtValueV4::flags`]: a local flow whose client port was
/// changed because another flow from the same client endpoint already
/// reaches the same backend through another frontend (both would look the
/// same to the pod). Forward entry: `snat_addr:snat_port_be` is the source
/// the packets leave with (the client's address, the new port). Reply entry:
/// `snat_addr:snat_port_be` is the client's own endpoint, restored as the
/// reply's destination.
pub const CT_F_PORT_REMAP: u8 = 2;

/// TCP flag bits as on the wire (byte 13 of the TCP header): FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP flag on the wire: SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP flag on the wire: RST.
pub const TCP_RST: u8 = 0x04;
/// TCP flag on the wire: ACK.
pub const TCP_ACK: u8 = 0x10;

/// [`crate::maps::CtValueV4::tcp_flags`]: a SYN was seen from the client.
pub const CT_TCP_SYN: u8 = 1;
/// [`crate::maps::CtValueV4::tcp_flags`]: the client sent FIN.
pub const CT_TCP_FIN_FWD: u8 = 2;
/// [`crate::maps::CtValueV4::tcp_flags`]: the backend sent FIN.
pub const CT_TCP_FIN_REPLY: u8 = 4;
/// [`crate::maps::CtValueV4::tcp_flags`]: either side sent RST.
pub const CT_TCP_RST: u8 = 8;
/// [`crate::maps::CtValueV4::tcp_flags`] (forward entry): the client sent an
/// ACK without SYN or RST, so the handshake completed (netfilter's
/// ESTABLISHED). A flow without it is half-open and ages out after the SYN
/// timeout.
pub const CT_TCP_ACK: u8 = 16;

/// [`crate::maps::CtValueV4::reason`]: backend taken from the Maglev slot of
/// the flow hash when the flow was new.
pub const REASON_MAGLEV: u8 = 1;
/// [`crate::maps::CtValueV4::reason`]: the flow's backend went away; it was
/// re-balanced through the Maglev table.
pub const REASON_REBALANCED: u8 = 2;

/// [`crate::maps::CtValueV4::reason`]: session affinity (`ClientIP`) sent the
/// client's new flow to the backend of its previous one.
pub const REASON_AFFINITY: u8 = 3;

/// [`crate::maps::CtValueV4::reason`]: round-robin handed the flow its turn
/// (`CtValueV4::choice` = the service's turn counter, modulo 2³²).
pub const REASON_ROUND_ROBIN: u8 = 4;
/// [`crate::maps::CtValueV4::reason`]: least-connection chose the backend
/// (`CtValueV4::choice` = its open flows on this node at that moment).
pub const REASON_LEAST_CONN: u8 = 5;
/// [`crate::maps::CtValueV4::reason`]: the service had no ready endpoint and
/// the flow went to a serving-and-terminating one (KEP-1669);
/// `CtValueV4::choice` keeps the policy's detail.
pub const REASON_TERMINATING_FALLBACK: u8 = 6;

/// [`crate::maps::OpenFlowV4::open`]: the entry's flow was counted down
/// (or the entry is being reused); any other value except
/// [`FLOW_RETIRED`] is the token of the counted flow ([`flow_token`]).
pub const FLOW_CLOSED: u64 = 0;
/// [`crate::maps::OpenFlowV4::open`]: the agent's collector is deleting this
/// closed entry (no datapath operation matches it).
pub const FLOW_RETIRED: u64 = u64::MAX;
/// Low bits of a flow token that hold the backend id.
pub const FLOW_TOKEN_BACKEND_BITS: u32 = 18;
const _: () = assert!(MAX_BACKENDS <= 1 << FLOW_TOKEN_BACKEND_BITS);

/// The token of a flow counted on `backend_id`, from the node-wide sequence
/// number `seq` (`LB_FLOW_SEQ`, never reused: 2^46 counted flows before it
/// wraps): unique per counted flow, never [`FLOW_CLOSED`] (`seq` ≥ 1) nor
/// [`FLOW_RETIRED`]. It names the backend, so whoever counts a token down
/// knows which count from the token alone.
#[inline(always)]
pub const fn flow_token(seq: u64, backend_id: u32) -> u64 {
    (seq << FLOW_TOKEN_BACKEND_BITS) | (backend_id as u64 & ((1 << FLOW_TOKEN_BACKEND_BITS) - 1))
}

/// The backend id a token counts on.
#[inline(always)]
pub const fn token_backend(token: u64) -> u32 {
    (token & ((1 << FLOW_TOKEN_BACKEND_BITS) - 1)) as u32
}

/// True if `open` (an [`crate::maps::OpenFlowV4::open`] word) holds a token,
/// i.e. its flow is counted.
#[inline(always)]
pub const fn token_live(open: u64) -> bool {
    open != FLOW_CLOSED && open != FLOW_RETIRED
}

/// [`crate::maps::FlowEndV4::op`]: count down the flow `token` of the key if
/// its entry still holds that token.
pub const FLOW_END_CLOSE: u32 = 0;
/// [`crate::maps::FlowEndV4::op`]: count the flow `token` of the key (a live
/// flow whose own count was never made or was moved away): insert its entry,
/// or reuse the key's closed one. No change if the key holds a token.
pub const FLOW_END_COUNT: u32 = 1;
/// [`crate::maps::FlowEndV4::op`]: delete the key's entry if it is closed
/// (marked [`FLOW_RETIRED`] first, so no open can reuse it meanwhile).
pub const FLOW_END_RETIRE: u32 = 2;

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (kube-proxy's).
pub const AFFINITY_DEFAULT_TIMEOUT_S: u32 = 10_800;
/// Default capacity of the NAT table (flows forwarded to remote backends).
pub const NAT_DEFAULT_CAPACITY: u32 = 131_072;
/// Ports tried (from the flow hash on) before a new forwarded flow is
/// dropped as `snat_exhausted`.
pub const SNAT_PORT_TRIES: u32 = 16;
/// When none of the tried ports is free, a port held by a flow whose client
/// has not completed its handshake this long after the mapping was made is
/// taken over (netfilter's early drop of unconfirmed entries): a SYN flood
/// from spoofed sources then holds a remote backend's ports for this long,
/// not for the whole SYN timeout. Longer than two SYN retransmissions (1 s,
/// then 2 s later), so a slow client's handshake is left alone.
pub const SNAT_RECLAIM_HALF_OPEN_NS: u64 = 5_000_000_000;
/// Client ports tried (from the flow hash on, in `PORT_REMAP_LO..=65535`)
/// for a local flow whose reply key is taken by another live flow, before
/// the packet is dropped as `drop_reply_clash`.
pub const PORT_REMAP_TRIES: u32 = 16;
/// First client port handed out by a port remap.
pub const PORT_REMAP_LO: u16 = 1024;

/// Capacity of the session-affinity table (clients × services).
pub const AFFINITY_CAPACITY: u32 = 65_536;
/// Capacity of the source-range table (CIDRs across all services).
pub const MAX_SOURCE_RANGES: u32 = 16_384;

/// Pin names of the maps (files under `<bpffs-root>/v<MAP_VERSION>/`); equal
/// to the map symbols in `lb-ebpf/src/maps.rs`.
pub mod pin {
    /// Frontend (address, port, protocol) → service.
    pub const FRONTENDS_V4: &str = "LB_FRONTENDS_V4";
    /// Service id → Maglev table of backend ids, one map per table size
    /// (`MAGLEV_SIZES`, smallest first).
    pub const MAGLEV: [&str; 3] = ["LB_MAGLEV_S", "LB_MAGLEV_M", "LB_MAGLEV_L"];
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
    /// Service id → its usable backends, in order (round-robin, least-connection).
    pub const SERVICE_BACKENDS: &str = "LB_SVC_BACKENDS";
    /// Service id → round-robin turn counter.
    pub const ROUND_ROBIN: &str = "LB_RR";
    /// Backend id → open flows on this node.
    pub const BACKEND_OPEN_FLOWS: &str = "LB_BE_OPEN";
    /// Open-flow registry: forward key → the counted flow's token (never evicts).
    pub const OPEN_FLOWS_V4: &str = "LB_OPEN_FLOWS_V4";
    /// Sequence number of the flow tokens.
    pub const FLOW_SEQ: &str = "LB_FLOW_SEQ";
    /// Service id → `ns/name:port`, for operators' tools.
    pub const SERVICE_NAMES: &str = "LB_SVC_NAMES";
    /// Every map the agent pins.
    pub const ALL: [&str; 19] = [
        FRONTENDS_V4,
        MAGLEV[0],
        MAGLEV[1],
        MAGLEV[2],
        BACKENDS_V4,
        CONNTRACK_V4,
        SERVICE_COUNTERS,
        BACKEND_COUNTERS,
        STATS,
        AFFINITY_V4,
        SRC_RANGES_V4,
        NAT_V4,
        CONFIG,
        SERVICE_BACKENDS,
        ROUND_ROBIN,
        BACKEND_OPEN_FLOWS,
        OPEN_FLOWS_V4,
        FLOW_SEQ,
        SERVICE_NAMES,
    ];
}

#[cfg(test)]
mod pin_dir_tests {
    extern crate std;

    #[test]
    fn pin_dir_names_the_map_version() {
        assert_eq!(super::PIN_DIR, std::format!("v{}", super::MAP_VERSION));
    }

    #[test]
    fn a_token_names_its_backend_and_is_never_closed_nor_retired() {
        use super::*;
        for (seq, id) in [
            (1, 0),
            (1, MAX_BACKENDS - 1),
            ((1 << 46) - 1, 7),
            (42, 262_143),
        ] {
            let t = flow_token(seq, id);
            assert_eq!(token_backend(t), id);
            assert!(token_live(t), "{seq} {id}");
            assert_eq!(t >> FLOW_TOKEN_BACKEND_BITS, seq);
        }
        assert_ne!(flow_token(1, 5), flow_token(2, 5));
        assert!(!token_live(FLOW_CLOSED) && !token_live(FLOW_RETIRED));
    }
}
