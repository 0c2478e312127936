//! Keys and values of every BPF map, with their exact layout.
//!
//! Byte order: addresses are `[u8; 4]` in wire order (bpftool prints them as
//! `[198,18,0,2]`); ports are `u16` in network byte order (`_be`), as read
//! from the packet, so bpftool prints them byte-swapped on x86 (port 30090 is
//! shown as 35445). Every other integer is in host byte order.
//!
//! IPv4-only types carry a `V4` suffix; the IPv6 datapath will add `V6`
//! twins with 16-byte addresses. [`ServiceValue`], [`MaglevTable`] and
//! [`Counters`] are family-neutral.

use core::mem::size_of;

use crate::consts::{
    BACKEND_ACTIVE, BACKEND_F_LOCAL, BACKEND_LIST_CAPACITY, CT_F_PORT_REMAP, CT_F_SNAT,
    MAGLEV_CAPACITY, SERVICE_NAME_LEN,
};

/// Key of `LB_FRONTENDS_V4`: a destination the datapath balances.
///
/// One entry per NodePort × node address, per LoadBalancer ingress IP × port
/// and per external IP × port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKeyV4 {
    /// Destination IPv4 address, wire order.
    pub addr: [u8; 4],
    /// Destination port, network byte order.
    pub port_be: u16,
    /// IP protocol: 6 (TCP) or 17 (UDP).
    pub proto: u8,
    /// Always 0.
    pub _pad: u8,
}

/// Value of `LB_FRONTENDS_V4`: the service a frontend belongs to, and what the
/// datapath needs to choose a backend for a new flow.
///
/// A service with several frontends has one copy per frontend; the agent
/// writes them all. A hash-map update replaces the whole value atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Service-port id: key of `LB_MAGLEV`, index of `LB_SVC_COUNTERS`.
    pub service_id: u32,
    /// Backends in the Maglev table (ready ones). 0: no usable backend.
    pub backend_count: u32,
    /// Slots of the Maglev table in use (a prime ≤ `MAGLEV_CAPACITY`).
    pub maglev_size: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// `SVC_F_*` bits.
    pub flags: u16,
    /// How the frontend was declared: `FRONTEND_NODEPORT`, `_LOADBALANCER`, `_EXTERNAL_IP`.
    pub kind: u8,
    /// Balancing policy: `POLICY_MAGLEV` (0, default), `POLICY_ROUND_ROBIN`
    /// or `POLICY_LEAST_CONN`.
    pub policy: u8,
    /// Always 0.
    pub _pad: u32,
}

/// Value of the table maps `LB_MAGLEV_S/M/L` (key: service id, `u32`): a
/// service's Maglev lookup table of up to `N` slots
/// ([`crate::MAGLEV_SIZES`]). Slot `i < maglev_size` holds the backend id
/// that owns it.
///
/// The agent replaces a whole table with one map update, so the datapath
/// never sees a half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable<const N: usize> {
    /// Backend ids; only the first `maglev_size` are used.
    pub slots: [u32; N],
    /// Always 0 (keeps the size a multiple of 8: every N is odd).
    pub _pad: u32,
}

impl<const N: usize> Default for MaglevTable<N> {
    fn default() -> Self {
        Self {
            slots: [0; N],
            _pad: 0,
        }
    }
}

/// The value of `LB_MAGLEV_S` (tables of up to 1,021 slots).
pub type MaglevTableS = MaglevTable<{ crate::MAGLEV_SIZES[0] as usize }>;
/// The value of `LB_MAGLEV_M` (up to 4,093 slots).
pub type MaglevTableM = MaglevTable<{ crate::MAGLEV_SIZES[1] as usize }>;
/// The value of `LB_MAGLEV_L` (up to 16,381 slots).
pub type MaglevTableL = MaglevTable<{ crate::MAGLEV_SIZES[2] as usize }>;

/// Value of `LB_BACKENDS_V4` (array, index: backend id).
///
/// Written once when the backend is created; afterwards only `state`
/// changes, so a reader never sees a torn address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendV4 {
    /// Pod IPv4 address, wire order.
    pub addr: [u8; 4],
    /// Pod port, network byte order.
    pub port_be: u16,
    /// `BACKEND_FREE`, `BACKEND_ACTIVE` or `BACKEND_TERMINATING`.
    pub state: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// The service id this backend belongs to (a flow whose conntrack entry
    /// names another service is re-balanced).
    pub service_id: u32,
    /// Always 0.
    pub _pad: u32,
}

impl BackendV4 {
    /// Whether a new flow of service `service_id` may go here: the backend
    /// is active and still that service's (an id reused by another service
    /// never takes the old service's flows).
    #[inline(always)]
    pub const fn serves(&self, service_id: u32) -> bool {
        self.state == BACKEND_ACTIVE && self.service_id == service_id
    }

    /// Whether the backend runs on this node (`BACKEND_F_LOCAL`): DNAT
    /// only; others are reached with SNAT and forwarding.
    #[inline(always)]
    pub const fn local(&self) -> bool {
        self.flags & BACKEND_F_LOCAL != 0
    }
}

/// Key of `LB_CT_V4` (LRU hash): one entry per flow and direction.
///
/// Forward (`CT_DIR_FORWARD`): the packet as XDP sees it, client →
/// frontend. Reply (`CT_DIR_REPLY`): the packet as TC egress sees it,
/// backend → client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKeyV4 {
    /// Source IPv4 address, wire order.
    pub src_addr: [u8; 4],
    /// Destination IPv4 address, wire order.
    pub dst_addr: [u8; 4],
    /// Source port, network byte order.
    pub src_port_be: u16,
    /// Destination port, network byte order.
    pub dst_port_be: u16,
    /// IP protocol.
    pub proto: u8,
    /// `CT_DIR_FORWARD` or `CT_DIR_REPLY`.
    pub dir: u8,
    /// Always 0.
    pub _pad: [u8; 2],
}

/// Value of `LB_CT_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValueV4 {
    /// The backend the flow is pinned to.
    pub backend_id: u32,
    /// The service the flow was balanced by.
    pub service_id: u32,
    /// Forward: the backend address the destination is rewritten to. Reply:
    /// the frontend address the source is rewritten back to. Wire order.
    pub nat_addr: [u8; 4],
    /// Port paired with `nat_addr`, network byte order.
    pub nat_port_be: u16,
    /// `CT_TCP_*` bits seen on this direction's packets (forward entry: client
    /// flags; reply entry: backend flags).
    pub tcp_flags: u8,
    /// Why this backend: `REASON_*`.
    pub reason: u8,
    /// Forward entry of a flow to a remote backend (`CT_F_SNAT`): the source
    /// address the packets leave with (this node's). Forward entry with
    /// `CT_F_PORT_REMAP`: the client's address (the source keeps it, only
    /// the port changes). Reply entry with `CT_F_PORT_REMAP`: the client's
    /// address, restored as the reply's destination. Wire order.
    pub snat_addr: [u8; 4],
    /// Port paired with `snat_addr` (forward: the source port the packets
    /// leave with; reply with `CT_F_PORT_REMAP`: the client's own port),
    /// network byte order.
    pub snat_port_be: u16,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// Always 0.
    pub _pad: u8,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the entry was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet, refreshed at most once a second.
    pub last_seen_ns: u64,
    /// The detail of `reason` (host order): `REASON_MAGLEV`: the Maglev
    /// slot; `REASON_ROUND_ROBIN`: the service's turn counter (mod 2³²);
    /// `REASON_LEAST_CONN`: the open flows the chosen backend had on this node
    /// at that moment; `REASON_REBALANCED`, `REASON_TERMINATING_FALLBACK`:
    /// the detail of the policy that chose again; `REASON_AFFINITY`: 0.
    pub choice: u32,
    /// Always 0.
    pub _pad2: u32,
    /// The flow's token (`flow_token`, host order), the same in its forward
    /// and reply entries: the open-flow registry holds it while the flow is
    /// counted, and counting the flow down needs it (see [`OpenFlowV4`]).
    pub token: u64,
}

impl CtValueV4 {
    /// Forward entry of a flow to a backend on another node (`CT_F_SNAT`):
    /// DNAT and SNAT, sent on by XDP; its partner is a NAT mapping.
    #[inline(always)]
    pub const fn forwarded(&self) -> bool {
        self.flags & CT_F_SNAT != 0
    }

    /// Entry of a flow whose client port was remapped (`CT_F_PORT_REMAP`)
    /// because its reply key was taken by another flow of the same client
    /// endpoint.
    #[inline(always)]
    pub const fn port_remapped(&self) -> bool {
        self.flags & CT_F_PORT_REMAP != 0
    }
}

/// Value of `LB_OPEN_FLOWS_V4` (preallocated hash, not LRU; key: the flow's
/// forward [`CtKeyV4`]): a flow counted in `LB_BE_OPEN`, or a closed entry
/// waiting for reuse or for the agent's collector to delete it.
///
/// Counting protocol (`lb-ebpf/src/flows.rs`): `open` holds the flow's token
/// while it is counted. A flow is counted up (`LB_BE_OPEN[token_backend(t)]
/// += 1`) by whoever installs its token `t`: an insert, or an atomic
/// compare-and-swap of a closed entry from `FLOW_CLOSED` to `t`; it is
/// counted down by whoever swaps `open` from `t` to `FLOW_CLOSED` (an atomic
/// compare-and-swap, so exactly one of the datapath's RST / FIN-both-ways
/// paths, a re-balance, or the agent's collector through `lb_flow_end`
/// wins). Tokens are never reused, so a stale pointer to an entry that was
/// deleted and reused for another flow can never match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OpenFlowV4 {
    /// The backend the flow was counted on when the entry was inserted (for
    /// operators; the count follows `open`'s token, which names it too).
    pub backend_id: u32,
    /// The service that balanced it.
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` when the entry was inserted.
    pub created_ns: u64,
    /// The counted flow's token; `FLOW_CLOSED` (0) once counted down;
    /// `FLOW_RETIRED` while the collector deletes the entry.
    pub open: u64,
}

/// The input "packet" of `lb_flow_end`, run by the agent's collector through
/// BPF_PROG_TEST_RUN: one operation of the counting protocol on one flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowEndV4 {
    /// The flow's forward key.
    pub key: CtKeyV4,
    /// The flow's token (`FLOW_END_CLOSE`, `FLOW_END_COUNT`); 0 for
    /// `FLOW_END_RETIRE`.
    pub token: u64,
    /// `FLOW_END_*`.
    pub op: u32,
    /// `FLOW_END_COUNT`: the flow's service (for the entry); else 0.
    pub service_id: u32,
}

/// Value of `LB_SVC_BACKENDS` (hash, not preallocated; key: service id,
/// `u32`): the service's usable backends, in ascending (address, port)
/// order. Written only for services whose policy is not Maglev; replaced
/// whole, like a Maglev table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendList {
    /// Entries of `ids` in use (≤ `BACKEND_LIST_CAPACITY`; the service's
    /// `backend_count` may be larger).
    pub count: u32,
    /// Always 0.
    pub _pad: u32,
    /// Backend ids; the first `count` are used.
    pub ids: [u32; BACKEND_LIST_CAPACITY],
}

impl Default for BackendList {
    fn default() -> Self {
        Self {
            count: 0,
            _pad: 0,
            ids: [0; BACKEND_LIST_CAPACITY],
        }
    }
}

/// Value of `LB_SVC_NAMES` (hash; key: service id, `u32`): the service
/// port's name, `namespace/name` or `namespace/name:port`, for operators'
/// tools (`lb-agent flows`, `lb-agent backends`, bpftool). Not read by the
/// datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    /// Bytes of `name` in use.
    pub len: u32,
    /// Always 0.
    pub _pad: u32,
    /// UTF-8, truncated to `SERVICE_NAME_LEN` bytes.
    pub name: [u8; SERVICE_NAME_LEN],
}

impl Default for ServiceName {
    fn default() -> Self {
        Self {
            len: 0,
            _pad: 0,
            name: [0; SERVICE_NAME_LEN],
        }
    }
}

impl ServiceName {
    /// `s`, truncated to [`SERVICE_NAME_LEN`] bytes at a character boundary.
    pub fn new(s: &str) -> Self {
        let mut end = s.len().min(SERVICE_NAME_LEN);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut v = Self::default();
        v.name[..end].copy_from_slice(&s.as_bytes()[..end]);
        v.len = end as u32;
        v
    }

    /// The name as text (invalid UTF-8 gives an empty string).
    pub fn as_str(&self) -> &str {
        let n = (self.len as usize).min(SERVICE_NAME_LEN);
        core::str::from_utf8(&self.name[..n]).unwrap_or("")
    }
}

/// Value of `LB_NAT_V4` (hash; key: a [`CtKeyV4`] with `dir =
/// CT_DIR_SNAT`, the reply of a forwarded flow as it comes back from the
/// backend's node: backend → this node's SNAT address and port).
///
/// Written by XDP when it forwards a new flow to a remote backend; removed
/// by the agent's garbage collector once the flow is over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatValueV4 {
    /// The client's address (the reply's new destination), wire order.
    pub client_addr: [u8; 4],
    /// The frontend address the client used (the reply's new source).
    pub frontend_addr: [u8; 4],
    /// The client's port, network byte order.
    pub client_port_be: u16,
    /// The frontend port, network byte order.
    pub frontend_port_be: u16,
    /// The backend the flow goes to.
    pub backend_id: u32,
    /// `CT_TCP_*` bits seen on replies (FIN as `CT_TCP_FIN_REPLY`).
    pub tcp_flags: u8,
    /// Always 0.
    pub _pad: [u8; 7],
    /// `bpf_ktime_get_ns()` when the mapping was made.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last reply, refreshed at most once a second.
    pub last_seen_ns: u64,
}

/// Value of `LB_CONFIG` (array, one entry): node-wide datapath settings
/// written by the agent at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    /// Source address for flows forwarded to remote backends (this node's
    /// address), wire order. All zero: no SNAT, remote backends are not used.
    pub snat_addr: [u8; 4],
    /// First source port of the SNAT range (host order).
    pub snat_port_lo: u16,
    /// Last source port of the SNAT range (host order, inclusive).
    pub snat_port_hi: u16,
}

/// Value of `LB_SVC_COUNTERS` (per-CPU array indexed by service id); the
/// agent sums over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counters {
    /// Packets balanced (forward direction, XDP).
    pub packets: u64,
    /// Bytes of those packets, Ethernet header included.
    pub bytes: u64,
    /// New flows pinned (including re-balanced ones).
    pub new_flows: u64,
    /// Packets to this service that found no usable backend (rejected or,
    /// with `SVC_F_DROP_NO_BACKEND`, dropped).
    pub no_backend: u64,
    /// Packets dropped because the client is outside the service's
    /// `loadBalancerSourceRanges`.
    pub denied: u64,
}

/// Value of `LB_BE_COUNTERS` (array indexed by backend id, shared by all
/// CPUs: the datapath adds with atomic instructions).
///
/// Not per-CPU on purpose: a per-CPU map costs entries × value × possible
/// CPUs, and with `MAX_BACKENDS` entries that is 3 MiB per CPU, over a GiB on
/// a 128-CPU node whether or not a backend exists. Shared, it costs 6 MiB on
/// any node; the price is that CPUs sending to the same backend at the same
/// time contend for its cache line (the per-service counters stay per-CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendCounters {
    /// Packets balanced to this backend (forward direction, XDP).
    pub packets: u64,
    /// Bytes of those packets, Ethernet header included.
    pub bytes: u64,
    /// New flows pinned to this backend.
    pub new_flows: u64,
}

/// Key of `LB_AFFINITY_V4` (LRU hash): a client of a service with
/// `sessionAffinity: ClientIP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKeyV4 {
    /// Service id.
    pub service_id: u32,
    /// Client IPv4 address, wire order.
    pub client_addr: [u8; 4],
}

/// Value of `LB_AFFINITY_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// The backend the client's flows go to.
    pub backend_id: u32,
    /// Always 0.
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the client's last new flow; the affinity
    /// expires `affinity_timeout_s` after it (as kube-proxy's `recent` match).
    pub last_ns: u64,
}

/// Data of the `LB_SRC_RANGE_V4` LPM-trie key (the trie adds `prefix_len`
/// in front): a CIDR of a service's `loadBalancerSourceRanges`. The
/// service id is always matched in full, so an entry's `prefix_len` is
/// `32 + CIDR length` and a lookup uses 64. Value: `u32` 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeV4 {
    /// Service id, network byte order (the trie matches bits from the first byte).
    pub service_id_be: u32,
    /// Network address of the CIDR (lookup: the client address), wire order.
    pub addr: [u8; 4],
}

/// Value of `LB_STATS` (per-CPU array with one entry): why each packet got
/// its verdict. See README, "Verdicts".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stats {
    /// Packets seen by the XDP program.
    pub xdp_packets: u64,
    /// Not IPv4 (ARP, IPv6, VLAN-tagged, …): passed untouched.
    pub pass_not_ipv4: u64,
    /// IPv4 but not TCP/UDP (ICMP, …): passed untouched.
    pub pass_other_proto: u64,
    /// TCP/UDP to no frontend: passed untouched.
    pub pass_not_service: u64,
    /// Headers shorter than they claim (Ethernet, IPv4, TCP, UDP): passed to the kernel, which drops them.
    pub pass_truncated: u64,
    /// IPv4 header with options (IHL > 5): passed untouched.
    pub pass_ip_options: u64,
    /// IPv4 fragment (MF set or offset ≠ 0): passed untouched.
    pub pass_fragment: u64,
    /// New flows pinned to a backend.
    pub new_flows: u64,
    /// Packets of already pinned flows.
    pub established: u64,
    /// Flows whose backend had gone and that were pinned again.
    pub rebalanced: u64,
    /// Conntrack inserts that failed (flow still forwarded, not pinned).
    pub ct_insert_failed: u64,
    /// Packets seen by the TC egress program.
    pub tc_packets: u64,
    /// Replies whose source was rewritten back to the frontend.
    pub tc_reverse_nat: u64,
    /// TC rewrites that failed in a kernel helper: a reply passed as is at
    /// egress; a packet dropped at TC ingress (half rewritten).
    pub tc_rewrite_failed: u64,
    /// Dropped: client outside the frontend's `loadBalancerSourceRanges`.
    pub drop_source_range: u64,
    /// No usable backend, TCP: answered with a RST from XDP (`XDP_TX`).
    pub reject_tcp: u64,
    /// No usable backend, UDP: answered with ICMP port unreachable (`XDP_TX`).
    pub reject_udp: u64,
    /// No usable backend and `SVC_F_DROP_NO_BACKEND` (eTP Local): dropped.
    pub drop_no_backend: u64,
    /// New flows sent to a backend by session affinity.
    pub affinity_hits: u64,
    /// A reject could not be built, or a RST to a service with no backend: dropped.
    pub reject_failed: u64,
    /// New flows to remote backends: SNAT'd and forwarded (XDP_TX/REDIRECT).
    pub forwarded: u64,
    /// Replies of forwarded flows translated back to the client.
    pub reverse_snat: u64,
    /// New flows to a remote backend dropped: no free port in the SNAT range.
    pub snat_exhausted: u64,
    /// Forwarded packets handed to the kernel: next hop's neighbour unresolved.
    pub fib_no_neigh: u64,
    /// Forwarded packets handed to the kernel: no route, TTL expiring or MTU.
    pub fib_failed: u64,
    /// Flows counted up in `LB_BE_OPEN` by the datapath (a token installed
    /// in the registry).
    pub flows_opened: u64,
    /// Flows counted down by the datapath (RST, FIN both ways, re-balance).
    pub flows_closed: u64,
    /// New flows not counted at once: the open-flow registry was full, or
    /// the flow's key still held the token of an earlier flow whose
    /// conntrack entry was evicted (the flow is still forwarded and pinned;
    /// the agent's collector counts it at its next pass).
    pub flows_untracked: u64,
    /// New local flows dropped: the client endpoint already reaches the
    /// backend through another frontend and no other client port was free
    /// (`PORT_REMAP_TRIES` tried).
    pub drop_reply_clash: u64,
    /// ICMP errors about packets this node sent for a flow (forwarded to a
    /// remote backend, or a reply to a client), translated back and passed
    /// to the kernel to route.
    pub icmp_translated: u64,
    /// ICMP errors to a client about a packet DNAT'd to a local pod,
    /// translated back at TC egress.
    pub tc_icmp_translated: u64,
    /// SNAT ports taken over from a flow whose handshake never completed
    /// (`SNAT_RECLAIM_HALF_OPEN_NS`), because every tried port was in use.
    pub snat_reclaimed: u64,
    /// Packets seen by the TC ingress program (the ingress logic attached
    /// at TC instead of XDP: `--attach tc`, or `auto` on a virtual device).
    pub tc_ingress_packets: u64,
}

impl Stats {
    /// Every counter with its field name, in declaration order.
    pub fn named(&self) -> [(&'static str, u64); 33] {
        [
            ("xdp_packets", self.xdp_packets),
            ("pass_not_ipv4", self.pass_not_ipv4),
            ("pass_other_proto", self.pass_other_proto),
            ("pass_not_service", self.pass_not_service),
            ("pass_truncated", self.pass_truncated),
            ("pass_ip_options", self.pass_ip_options),
            ("pass_fragment", self.pass_fragment),
            ("new_flows", self.new_flows),
            ("established", self.established),
            ("rebalanced", self.rebalanced),
            ("ct_insert_failed", self.ct_insert_failed),
            ("tc_packets", self.tc_packets),
            ("tc_reverse_nat", self.tc_reverse_nat),
            ("tc_rewrite_failed", self.tc_rewrite_failed),
            ("drop_source_range", self.drop_source_range),
            ("reject_tcp", self.reject_tcp),
            ("reject_udp", self.reject_udp),
            ("drop_no_backend", self.drop_no_backend),
            ("affinity_hits", self.affinity_hits),
            ("reject_failed", self.reject_failed),
            ("forwarded", self.forwarded),
            ("reverse_snat", self.reverse_snat),
            ("snat_exhausted", self.snat_exhausted),
            ("fib_no_neigh", self.fib_no_neigh),
            ("fib_failed", self.fib_failed),
            ("flows_opened", self.flows_opened),
            ("flows_closed", self.flows_closed),
            ("flows_untracked", self.flows_untracked),
            ("drop_reply_clash", self.drop_reply_clash),
            ("icmp_translated", self.icmp_translated),
            ("tc_icmp_translated", self.tc_icmp_translated),
            ("snat_reclaimed", self.snat_reclaimed),
            ("tc_ingress_packets", self.tc_ingress_packets),
        ]
    }

    /// Adds `other` (e.g. another CPU's values) to `self`.
    pub fn add(&mut self, other: &Stats) {
        self.xdp_packets += other.xdp_packets;
        self.pass_not_ipv4 += other.pass_not_ipv4;
        self.pass_other_proto += other.pass_other_proto;
        self.pass_not_service += other.pass_not_service;
        self.pass_truncated += other.pass_truncated;
        self.pass_ip_options += other.pass_ip_options;
        self.pass_fragment += other.pass_fragment;
        self.new_flows += other.new_flows;
        self.established += other.established;
        self.rebalanced += other.rebalanced;
        self.ct_insert_failed += other.ct_insert_failed;
        self.tc_packets += other.tc_packets;
        self.tc_reverse_nat += other.tc_reverse_nat;
        self.tc_rewrite_failed += other.tc_rewrite_failed;
        self.drop_source_range += other.drop_source_range;
        self.reject_tcp += other.reject_tcp;
        self.reject_udp += other.reject_udp;
        self.drop_no_backend += other.drop_no_backend;
        self.affinity_hits += other.affinity_hits;
        self.reject_failed += other.reject_failed;
        self.forwarded += other.forwarded;
        self.reverse_snat += other.reverse_snat;
        self.snat_exhausted += other.snat_exhausted;
        self.fib_no_neigh += other.fib_no_neigh;
        self.fib_failed += other.fib_failed;
        self.flows_opened += other.flows_opened;
        self.flows_closed += other.flows_closed;
        self.flows_untracked += other.flows_untracked;
        self.drop_reply_clash += other.drop_reply_clash;
        self.icmp_translated += other.icmp_translated;
        self.tc_icmp_translated += other.tc_icmp_translated;
        self.snat_reclaimed += other.snat_reclaimed;
        self.tc_ingress_packets += other.tc_ingress_packets;
    }
}

impl Counters {
    /// Adds `other` (e.g. another CPU's values) to `self`.
    pub fn add(&mut self, other: &Counters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.no_backend += other.no_backend;
        self.denied += other.denied;
    }
}

const _: () = assert!(size_of::<FrontendKeyV4>() == 8);
const _: () = assert!(size_of::<ServiceValue>() == 24);
const _: () = assert!(size_of::<MaglevTableL>() == 4 * MAGLEV_CAPACITY + 4);
const _: () = assert!(size_of::<MaglevTableS>().is_multiple_of(8));
const _: () = assert!(size_of::<MaglevTableM>().is_multiple_of(8));
const _: () = assert!(size_of::<MaglevTableL>().is_multiple_of(8));
const _: () = assert!(size_of::<BackendV4>() == 16);
const _: () = assert!(size_of::<CtKeyV4>() == 16);
const _: () = assert!(size_of::<CtValueV4>() == 56);
const _: () = assert!(size_of::<OpenFlowV4>() == 24);
const _: () = assert!(size_of::<FlowEndV4>() == 32);
const _: () = assert!(size_of::<BackendList>() == 8 + 4 * BACKEND_LIST_CAPACITY);
const _: () = assert!(size_of::<ServiceName>() == 8 + SERVICE_NAME_LEN);
const _: () = assert!(size_of::<NatValueV4>() == 40);
const _: () = assert!(size_of::<DatapathConfig>() == 8);
const _: () = assert!(size_of::<Counters>() == 40);
const _: () = assert!(size_of::<BackendCounters>() == 24);
const _: () = assert!(size_of::<AffinityKeyV4>() == 8);
const _: () = assert!(size_of::<AffinityValue>() == 16);
const _: () = assert!(size_of::<SrcRangeV4>() == 8);
const _: () = assert!(size_of::<Stats>() == 33 * 8);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is `repr(C)`, `Copy`, has no implicit padding (sizes
    // asserted above) and is valid for any bit pattern.
    unsafe impl aya::Pod for FrontendKeyV4 {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl<const N: usize> aya::Pod for MaglevTable<N> {}
    unsafe impl aya::Pod for BackendV4 {}
    unsafe impl aya::Pod for CtKeyV4 {}
    unsafe impl aya::Pod for CtValueV4 {}
    unsafe impl aya::Pod for NatValueV4 {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for BackendCounters {}
    unsafe impl aya::Pod for Stats {}
    unsafe impl aya::Pod for AffinityKeyV4 {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SrcRangeV4 {}
    unsafe impl aya::Pod for OpenFlowV4 {}
    unsafe impl aya::Pod for FlowEndV4 {}
    unsafe impl aya::Pod for BackendList {}
    unsafe impl aya::Pod for ServiceName {}
}
