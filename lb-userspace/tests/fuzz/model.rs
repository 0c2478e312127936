//! The reference datapath: what the XDP and TC programs must do to a packet
//! and to the flow maps, written plainly over byte slices and `BTreeMap`s.
//!
//! It reads the agent's maps from [`MemoryMaps`] (the planner's in-memory
//! twin) and keeps its own flow tables. Times are not modelled: the fuzzer
//! compares flow entries with their timestamps zeroed and keeps affinity
//! timeouts far longer than a run. The shared rules (flow hash, Maglev slot,
//! policies, a flow's keys, checksum arithmetic) come from `lb_common`, as
//! in the datapath; everything else (parsing, choosing, pinning, rewriting,
//! building answers) is written again here, independently.

use std::collections::BTreeMap;

use lb_common::{
    AffinityKeyV4, AffinityValue, BACKEND_ACTIVE, BACKEND_F_LOCAL, BACKEND_LIST_CAPACITY,
    BackendCounters, BackendV4, CT_DIR_FORWARD, CT_DIR_REPLY, CT_DIR_SNAT, CT_F_PORT_REMAP,
    CT_F_SNAT, CT_TCP_ACK, CT_TCP_FIN_FWD, CT_TCP_FIN_REPLY, CT_TCP_RST, CT_TCP_SYN, Counters,
    CtKeyV4, CtValueV4, DatapathConfig, FLOW_CLOSED, IPPROTO_TCP, IPPROTO_UDP, LC_SCAN_MAX,
    MAGLEV_CAPACITY, MAX_BACKENDS, MAX_SERVICES, NatValueV4, OpenFlowV4, POLICY_LEAST_CONN,
    POLICY_ROUND_ROBIN, PORT_REMAP_LO, PORT_REMAP_TRIES, REASON_AFFINITY, REASON_LEAST_CONN,
    REASON_MAGLEV, REASON_REBALANCED, REASON_ROUND_ROBIN, REASON_TERMINATING_FALLBACK,
    SNAT_PORT_TRIES, SVC_F_DROP_NO_BACKEND, SVC_F_SOURCE_RANGES, SVC_F_TERMINATING_FALLBACK,
    ServiceValue, Stats, csum, flow, flow_token,
    hash::{flow_hash_v4, maglev_slot, rehash},
    policy, token_backend, token_live,
};
use lb_userspace::writer::memory::MemoryMaps;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_UNSPEC: u32 = u32::MAX;

/// The flow maps and counters the datapath writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flows {
    pub ct: BTreeMap<CtKeyV4, CtValueV4>,
    pub nat: BTreeMap<CtKeyV4, NatValueV4>,
    pub affinity: BTreeMap<AffinityKeyV4, AffinityValue>,
    pub open: BTreeMap<CtKeyV4, OpenFlowV4>,
    pub be_open: BTreeMap<u32, u64>,
    /// `LB_FLOW_SEQ`: the last flow token's sequence number.
    pub seq: u64,
    pub rr: BTreeMap<u32, u64>,
    pub svc: BTreeMap<u32, Counters>,
    pub be: BTreeMap<u32, BackendCounters>,
    pub stats: Stats,
}

impl Flows {
    /// The same tables with every timestamp zeroed (the part compared).
    pub fn timeless(&self) -> Flows {
        let mut f = self.clone();
        for v in f.ct.values_mut() {
            v.created_ns = 0;
            v.last_seen_ns = 0;
        }
        for v in f.nat.values_mut() {
            v.created_ns = 0;
            v.last_seen_ns = 0;
        }
        for v in f.affinity.values_mut() {
            v.last_ns = 0;
        }
        for v in f.open.values_mut() {
            v.created_ns = 0;
        }
        f.be_open.retain(|_, n| *n != 0);
        f.rr.retain(|_, n| *n != 0);
        f.svc.retain(|_, c| *c != Counters::default());
        f.be.retain(|_, c| *c != BackendCounters::default());
        f
    }
}

/// The reference datapath: the agent's maps plus the flow state.
pub struct Model<'a> {
    pub maps: &'a MemoryMaps,
    pub cfg: DatapathConfig,
    pub flows: &'a mut Flows,
}

/// A parsed TCP/UDP packet.
struct Pkt {
    src: [u8; 4],
    dst: [u8; 4],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
    flags: u8,
}

enum Parse {
    Ok(Pkt),
    NotIpv4,
    OtherProto,
    Truncated,
    IpOptions,
    Fragment,
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn ne16(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn addr(b: &[u8], off: usize) -> [u8; 4] {
    b[off..off + 4].try_into().unwrap()
}

fn parse(b: &[u8]) -> Parse {
    if b.len() < 14 {
        return Parse::Truncated;
    }
    if be16(b, 12) != 0x0800 {
        return Parse::NotIpv4;
    }
    if b.len() < 34 {
        return Parse::Truncated;
    }
    if b[14] >> 4 != 4 {
        return Parse::NotIpv4;
    }
    let ihl = b[14] & 0xf;
    if ihl < 5 {
        return Parse::Truncated;
    }
    if ihl > 5 {
        return Parse::IpOptions;
    }
    if be16(b, 20) & 0x3fff != 0 {
        return Parse::Fragment;
    }
    if 14 + be16(b, 16) as usize > b.len() {
        return Parse::Truncated;
    }
    let proto = b[23];
    let flags = match proto {
        IPPROTO_TCP => {
            if b.len() < 54 || b[46] >> 4 < 5 {
                return Parse::Truncated;
            }
            let raw = b[47];
            let mut f = 0;
            if raw & 1 != 0 {
                f |= CT_TCP_FIN_FWD;
            }
            if raw & 2 != 0 {
                f |= CT_TCP_SYN;
            }
            if raw & 4 != 0 {
                f |= CT_TCP_RST;
            }
            if raw & 0x16 == 0x10 {
                f |= CT_TCP_ACK;
            }
            f
        }
        IPPROTO_UDP => {
            if b.len() < 42 {
                return Parse::Truncated;
            }
            0
        }
        _ => return Parse::OtherProto,
    };
    Parse::Ok(Pkt {
        src: addr(b, 26),
        dst: addr(b, 30),
        sport_be: ne16(b, 34),
        dport_be: ne16(b, 36),
        proto,
        flags,
    })
}

fn l4_check_off(proto: u8) -> usize {
    if proto == IPPROTO_TCP { 50 } else { 40 }
}

type Ep = ([u8; 4], u16);

/// XDP's rewrite: source and/or destination, incremental checksums, a zero
/// UDP checksum stays zero.
fn rewrite(b: &mut [u8], proto: u8, src: Option<Ep>, dst: Option<Ep>) {
    let co = l4_check_off(proto);
    let old_l4 = ne16(b, co);
    let mut ip = ne16(b, 24);
    let mut c = old_l4;
    for (ep, a_off, p_off) in [(src, 26, 34), (dst, 30, 36)] {
        if let Some((a, p)) = ep {
            let (o, n) = (u32::from_ne_bytes(addr(b, a_off)), u32::from_ne_bytes(a));
            ip = csum::replace4(ip, o, n);
            c = csum::replace2(csum::replace4(c, o, n), ne16(b, p_off), p);
            b[a_off..a_off + 4].copy_from_slice(&a);
            b[p_off..p_off + 2].copy_from_slice(&p.to_ne_bytes());
        }
    }
    if proto == IPPROTO_UDP {
        c = csum::udp_fixup(old_l4, c);
    }
    b[24..26].copy_from_slice(&ip.to_ne_bytes());
    b[co..co + 2].copy_from_slice(&c.to_ne_bytes());
}

/// The kernel's `l4_csum_replace` on a checksum that is not partial.
fn tc_l4(check: u16, from: u32, to: u32, four: bool, mangled0: bool) -> u16 {
    if mangled0 && check == 0 {
        return 0;
    }
    let n = if four {
        csum::replace4(check, from, to)
    } else {
        csum::replace2(check, from as u16, to as u16)
    };
    if mangled0 && n == 0 { 0xffff } else { n }
}

/// One's-complement sum of an IPv4 pseudo-header.
fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src);
    p[4..8].copy_from_slice(&dst);
    p[9] = proto;
    p[10..12].copy_from_slice(&len.to_be_bytes());
    csum::sum(&p)
}

fn ipv4_header(src: [u8; 4], dst: [u8; 4], proto: u8, tot_len: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&tot_len.to_be_bytes());
    h[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = csum::finish(csum::sum(&h));
    h[10..12].copy_from_slice(&c.to_ne_bytes());
    h
}

fn swapped_eth(b: &[u8]) -> [u8; 14] {
    let mut e = [0u8; 14];
    e[0..6].copy_from_slice(&b[6..12]);
    e[6..12].copy_from_slice(&b[0..6]);
    e[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    e
}

/// The RST kube-proxy's REJECT would send, or `None` for a RST.
fn tcp_rst(b: &[u8], p: &Pkt) -> Option<Vec<u8>> {
    let flags = b[47];
    if flags & 4 != 0 {
        return None;
    }
    let seq = u32::from_be_bytes(b[38..42].try_into().unwrap());
    let ack = u32::from_be_bytes(b[42..46].try_into().unwrap());
    let hdr = (b[46] >> 4) as u32 * 4;
    let seg = (be16(b, 16) as u32).saturating_sub(20 + hdr)
        + (flags & 2 != 0) as u32
        + (flags & 1 != 0) as u32;
    let (s, a, f) = if flags & 0x10 != 0 {
        (ack, 0, 0x04)
    } else {
        (0, seq.wrapping_add(seg), 0x14)
    };
    let mut out = swapped_eth(b).to_vec();
    out.extend_from_slice(&ipv4_header(p.dst, p.src, IPPROTO_TCP, 40));
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&p.dport_be.to_ne_bytes());
    t[2..4].copy_from_slice(&p.sport_be.to_ne_bytes());
    t[4..8].copy_from_slice(&s.to_be_bytes());
    t[8..12].copy_from_slice(&a.to_be_bytes());
    t[12] = 0x50;
    t[13] = f;
    let c = csum::finish(csum::combine(
        pseudo(p.dst, p.src, IPPROTO_TCP, 20),
        csum::sum(&t),
    ));
    t[16..18].copy_from_slice(&c.to_ne_bytes());
    out.extend_from_slice(&t);
    Some(out)
}

/// ICMP port unreachable quoting the datagram's IPv4 header and 8 bytes.
fn icmp_unreachable(b: &[u8], p: &Pkt) -> Vec<u8> {
    let mut out = swapped_eth(b).to_vec();
    out.extend_from_slice(&ipv4_header(p.dst, p.src, 1, 56));
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&b[14..42]);
    let c = csum::finish(csum::sum(&icmp));
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    out.extend_from_slice(&icmp);
    out
}

/// A parsed ICMP error quoting TCP/UDP.
struct IcmpErr {
    inner_src: [u8; 4],
    inner_dst: [u8; 4],
    inner_sport_be: u16,
    inner_dport_be: u16,
    inner_proto: u8,
    outer_dst: [u8; 4],
    /// The quoted L4 checksum's offset, if the quote reaches it.
    l4_check: Option<usize>,
}

fn parse_icmp(b: &[u8]) -> Option<IcmpErr> {
    if b.len() < 34 || be16(b, 12) != 0x0800 || b[14] != 0x45 || b[23] != 1 {
        return None;
    }
    if be16(b, 20) & 0x3fff != 0 || b.len() < 38 || (b[34] != 3 && b[34] != 11) {
        return None;
    }
    if b.len() < 62 || b[42] != 0x45 || (b[51] != IPPROTO_TCP && b[51] != IPPROTO_UDP) {
        return None;
    }
    if b.len() < 66 {
        return None;
    }
    let co = if b[51] == IPPROTO_TCP { 78 } else { 68 };
    Some(IcmpErr {
        inner_src: addr(b, 54),
        inner_dst: addr(b, 58),
        inner_sport_be: ne16(b, 62),
        inner_dport_be: ne16(b, 64),
        inner_proto: b[51],
        outer_dst: addr(b, 30),
        l4_check: (co + 2 <= b.len()).then_some(co),
    })
}

fn icmp_rewrite(
    b: &mut [u8],
    e: &IcmpErr,
    outer: Option<[u8; 4]>,
    src: Option<Ep>,
    dst: Option<Ep>,
) {
    if let Some(a) = outer {
        let c = csum::replace4(
            ne16(b, 24),
            u32::from_ne_bytes(addr(b, 30)),
            u32::from_ne_bytes(a),
        );
        b[24..26].copy_from_slice(&c.to_ne_bytes());
        b[30..34].copy_from_slice(&a);
    }
    let old_ip = ne16(b, 52);
    let old_l4 = e.l4_check.map(|o| ne16(b, o));
    let (mut ip, mut icmp, mut l4) = (old_ip, ne16(b, 36), old_l4);
    for (ep, a_off, p_off) in [(src, 54, 62), (dst, 58, 64)] {
        if let Some((a, p)) = ep {
            let (o, n) = (u32::from_ne_bytes(addr(b, a_off)), u32::from_ne_bytes(a));
            let op = ne16(b, p_off);
            ip = csum::replace4(ip, o, n);
            icmp = csum::replace2(csum::replace4(icmp, o, n), op, p);
            l4 = l4.map(|c| csum::replace2(csum::replace4(c, o, n), op, p));
            b[a_off..a_off + 4].copy_from_slice(&a);
            b[p_off..p_off + 2].copy_from_slice(&p.to_ne_bytes());
        }
    }
    if e.inner_proto == IPPROTO_UDP
        && let (Some(o), Some(n)) = (old_l4, l4)
    {
        l4 = Some(csum::udp_fixup(o, n));
    }
    icmp = csum::replace2(icmp, old_ip, ip);
    b[52..54].copy_from_slice(&ip.to_ne_bytes());
    if let (Some(off), Some(o), Some(n)) = (e.l4_check, old_l4, l4) {
        icmp = csum::replace2(icmp, o, n);
        b[off..off + 2].copy_from_slice(&n.to_ne_bytes());
    }
    b[36..38].copy_from_slice(&icmp.to_ne_bytes());
}

struct Choice {
    id: u32,
    be: BackendV4,
    reason: u8,
    detail: u32,
}

impl Model<'_> {
    fn backend(&self, id: u32) -> Option<BackendV4> {
        (id < MAX_BACKENDS).then(|| self.maps.backends.get(&id).copied().unwrap_or_default())
    }

    fn open_count(&self, id: u32) -> u64 {
        if id >= MAX_BACKENDS {
            return u64::MAX;
        }
        self.flows.be_open.get(&id).copied().unwrap_or(0)
    }

    fn add_open(&mut self, id: u32, delta: i64) {
        if id < MAX_BACKENDS {
            let n = self.flows.be_open.entry(id).or_default();
            *n = n.wrapping_add(delta as u64);
        }
    }

    fn next_token(&mut self, backend_id: u32) -> u64 {
        self.flows.seq += 1;
        flow_token(self.flows.seq, backend_id)
    }

    /// Counts down the flow of `key` if its registry entry holds `token`.
    fn close(&mut self, key: &CtKeyV4, token: u64) -> bool {
        if !token_live(token) {
            return false;
        }
        match self.flows.open.get_mut(key) {
            Some(e) if e.open == token => e.open = FLOW_CLOSED,
            _ => return false,
        }
        self.add_open(token_backend(token), -1);
        true
    }

    fn close_counted(&mut self, key: &CtKeyV4, token: u64) {
        if self.close(key, token) {
            self.flows.stats.flows_closed += 1;
        }
    }

    /// Closes the flow of `fkey` with the token of its forward entry.
    fn close_flow(&mut self, fkey: &CtKeyV4) {
        if let Some(token) = self.flows.ct.get(fkey).map(|c| c.token) {
            self.close_counted(fkey, token);
        }
    }

    /// Installs `token` in the entry of `key`: a new entry, or the key's
    /// closed one; no change if it holds a token (this one: counted
    /// already; another: not counted).
    fn open(&mut self, key: &CtKeyV4, token: u64, service_id: u32) {
        if !token_live(token) {
            self.flows.stats.flows_untracked += 1;
            return;
        }
        let backend_id = token_backend(token);
        let fresh = OpenFlowV4 {
            backend_id,
            service_id,
            created_ns: 0,
            open: token,
        };
        match self.flows.open.get_mut(key) {
            None => {
                self.flows.open.insert(*key, fresh);
            }
            Some(e) if e.open == FLOW_CLOSED => *e = fresh,
            Some(e) if e.open == token => return,
            Some(_) => {
                self.flows.stats.flows_untracked += 1;
                return;
            }
        }
        self.add_open(backend_id, 1);
        self.flows.stats.flows_opened += 1;
    }

    fn client_fin(&mut self, key: &CtKeyV4, ct: &CtValueV4) {
        let partner = flow::partner_key(key, ct);
        let reply = if ct.flags & CT_F_SNAT != 0 {
            self.flows.nat.get(&partner).map(|n| n.tcp_flags)
        } else {
            self.flows.ct.get(&partner).map(|r| r.tcp_flags)
        };
        if reply.is_some_and(|f| f & CT_TCP_FIN_REPLY != 0) {
            self.close_counted(key, ct.token);
        }
    }

    fn pod_fin(&mut self, fkey: &CtKeyV4) {
        if let Some(c) = self.flows.ct.get(fkey).copied()
            && c.tcp_flags & CT_TCP_FIN_FWD != 0
        {
            self.close_counted(fkey, c.token);
        }
    }

    fn active(&self, svc: &ServiceValue, id: u32) -> Option<BackendV4> {
        let be = self.backend(id)?;
        (be.state == BACKEND_ACTIVE && be.service_id == svc.service_id).then_some(be)
    }

    fn table(&self, svc: &ServiceValue) -> Option<&[u32]> {
        if svc.backend_count == 0 {
            return None;
        }
        self.maps.table(svc.service_id)
    }

    fn slot_of(&self, svc: &ServiceValue, hash: u32) -> Option<(u32, u32)> {
        let t = self.table(svc)?;
        let slot = maglev_slot(hash, svc.maglev_size) as usize;
        if slot >= MAGLEV_CAPACITY {
            return None;
        }
        // Slots beyond the table the planner wrote hold 0 in the kernel.
        Some((t.get(slot).copied().unwrap_or(0), slot as u32))
    }

    fn maglev(&self, svc: &ServiceValue, hash: u32) -> Option<Choice> {
        let (id, slot) = self.slot_of(svc, hash)?;
        Some(Choice {
            id,
            be: self.active(svc, id)?,
            reason: REASON_MAGLEV,
            detail: slot,
        })
    }

    fn round_robin(&mut self, svc: &ServiceValue) -> Option<Choice> {
        if svc.service_id >= MAX_SERVICES {
            return None;
        }
        let ctr = self.flows.rr.entry(svc.service_id).or_default();
        let turn = *ctr;
        *ctr = ctr.wrapping_add(1);
        let list = self.maps.backend_lists.get(&svc.service_id);
        let id = match list {
            Some(l) if !l.is_empty() && svc.backend_count as usize <= BACKEND_LIST_CAPACITY => {
                l[policy::rr_index(turn, l.len() as u32) as usize]
            }
            _ => {
                let t = self.table(svc)?;
                let idx = policy::rr_index(turn, svc.maglev_size) as usize;
                if idx >= MAGLEV_CAPACITY {
                    return None;
                }
                t.get(idx).copied().unwrap_or(0)
            }
        };
        Some(Choice {
            id,
            be: self.active(svc, id)?,
            reason: REASON_ROUND_ROBIN,
            detail: turn as u32,
        })
    }

    fn least_conn(&self, svc: &ServiceValue, hash: u32) -> Option<Choice> {
        let (mid, _) = self.slot_of(svc, hash)?;
        let mut best = mid;
        let mut best_n = self.open_count(mid);
        match self.maps.backend_lists.get(&svc.service_id) {
            Some(l) if l.len() as u32 <= LC_SCAN_MAX => {
                for &id in l {
                    let n = self.open_count(id);
                    if n < best_n {
                        best = id;
                        best_n = n;
                    }
                }
            }
            _ => {
                let (second, _) = self.slot_of(svc, rehash(hash))?;
                let n = self.open_count(second);
                if n < best_n {
                    best = second;
                    best_n = n;
                }
            }
        }
        let (id, be) = match self.active(svc, best) {
            Some(be) => (best, be),
            None => (mid, self.active(svc, mid)?),
        };
        Some(Choice {
            id,
            be,
            reason: REASON_LEAST_CONN,
            detail: best_n.min(u32::MAX as u64) as u32,
        })
    }

    fn by_policy(&mut self, svc: &ServiceValue, hash: u32) -> Option<Choice> {
        match svc.policy {
            POLICY_ROUND_ROBIN => self.round_robin(svc).or_else(|| self.maglev(svc, hash)),
            POLICY_LEAST_CONN => self.least_conn(svc, hash),
            _ => self.maglev(svc, hash),
        }
    }

    fn choose(&mut self, svc: &ServiceValue, client: [u8; 4], hash: u32) -> Option<Choice> {
        let mut c = if svc.affinity_timeout_s == 0 {
            self.by_policy(svc, hash)?
        } else {
            let key = AffinityKeyV4 {
                service_id: svc.service_id,
                client_addr: client,
            };
            if let Some(a) = self.flows.affinity.get(&key).copied()
                && let Some(be) = self.active(svc, a.backend_id)
            {
                return Some(Choice {
                    id: a.backend_id,
                    be,
                    reason: REASON_AFFINITY,
                    detail: 0,
                });
            }
            let c = self.by_policy(svc, hash)?;
            self.flows.affinity.insert(
                key,
                AffinityValue {
                    backend_id: c.id,
                    _pad: 0,
                    last_ns: 0,
                },
            );
            c
        };
        if svc.flags & SVC_F_TERMINATING_FALLBACK != 0 {
            c.reason = REASON_TERMINATING_FALLBACK;
        }
        Some(c)
    }

    fn snat_config(&self) -> Option<DatapathConfig> {
        let c = self.cfg;
        (c.snat_addr != [0; 4] && c.snat_port_lo <= c.snat_port_hi).then_some(c)
    }

    fn reserve(&mut self, p: &Pkt, hash: u32, id: u32, be: &BackendV4) -> Option<Ep> {
        let cfg = self.snat_config()?;
        let range = (cfg.snat_port_hi - cfg.snat_port_lo) as u32 + 1;
        let fkey = flow::key(
            (p.src, p.sport_be),
            (p.dst, p.dport_be),
            p.proto,
            CT_DIR_FORWARD,
        );
        for i in 0..SNAT_PORT_TRIES {
            let port = (cfg.snat_port_lo + (hash.wrapping_add(i) % range) as u16).to_be();
            let key = flow::key(
                (be.addr, be.port_be),
                (cfg.snat_addr, port),
                p.proto,
                CT_DIR_SNAT,
            );
            match self.flows.nat.get(&key) {
                None => {
                    self.flows.nat.insert(
                        key,
                        NatValueV4 {
                            client_addr: p.src,
                            frontend_addr: p.dst,
                            client_port_be: p.sport_be,
                            frontend_port_be: p.dport_be,
                            backend_id: id,
                            ..Default::default()
                        },
                    );
                    return Some((cfg.snat_addr, port));
                }
                Some(n) if flow::forward_key_of_nat(&key, n) == fkey => {
                    return Some((cfg.snat_addr, port));
                }
                Some(_) => {}
            }
        }
        None
    }

    fn reply_taken(&self, rkey: &CtKeyV4, p: &Pkt, backend: Ep) -> bool {
        let Some(r) = self.flows.ct.get(rkey) else {
            return false;
        };
        if r.nat_addr == p.dst && r.nat_port_be == p.dport_be {
            return false;
        }
        let other = flow::forward_key_of_reply(rkey, r);
        let Some(f) = self.flows.ct.get(&other) else {
            return false;
        };
        (f.nat_addr, f.nat_port_be) == backend
            && f.flags & CT_F_SNAT == 0
            && flow::partner_key(&other, f) == *rkey
    }

    /// `Err(())`: a reply clash no remapped port could resolve.
    #[expect(clippy::too_many_arguments, reason = "mirrors the datapath's pin")]
    fn pin(
        &mut self,
        p: &Pkt,
        hash: u32,
        service_id: u32,
        id: u32,
        be: &BackendV4,
        reason: u8,
        choice: u32,
        snat: Option<Ep>,
        token: u64,
    ) -> Result<Option<Ep>, ()> {
        let fkey = flow::key(
            (p.src, p.sport_be),
            (p.dst, p.dport_be),
            p.proto,
            CT_DIR_FORWARD,
        );
        let mut fwd = CtValueV4 {
            backend_id: id,
            service_id,
            nat_addr: be.addr,
            nat_port_be: be.port_be,
            tcp_flags: p.flags,
            reason,
            choice,
            token,
            ..Default::default()
        };
        if let Some((a, port)) = snat {
            fwd.flags = CT_F_SNAT;
            fwd.snat_addr = a;
            fwd.snat_port_be = port;
            self.flows.ct.insert(fkey, fwd);
            return Ok(None);
        }
        let backend = (be.addr, be.port_be);
        let rkey = flow::local_reply_key(backend, (p.src, p.sport_be), p.proto);
        let mut remap = None;
        if self.reply_taken(&rkey, p, backend) {
            for i in 0..PORT_REMAP_TRIES {
                let span = (u16::MAX - PORT_REMAP_LO) as u32 + 1;
                let port = (PORT_REMAP_LO + (hash.wrapping_add(i) % span) as u16).to_be();
                let remapped = CtValueV4 {
                    flags: CT_F_PORT_REMAP,
                    snat_addr: p.src,
                    snat_port_be: port,
                    ..fwd
                };
                let key = flow::partner_key(&fkey, &remapped);
                if let std::collections::btree_map::Entry::Vacant(e) = self.flows.ct.entry(key) {
                    e.insert(flow::reply_value(&fkey, &remapped));
                    fwd = remapped;
                    remap = Some((p.src, port));
                    break;
                }
            }
            if remap.is_none() {
                return Err(());
            }
        } else {
            self.flows.ct.insert(rkey, flow::reply_value(&fkey, &fwd));
        }
        self.flows.ct.insert(fkey, fwd);
        Ok(remap)
    }

    fn count(&mut self, service_id: u32, backend_id: u32, len: u64, new: bool) {
        let bump = |c: &mut Counters| {
            c.packets += 1;
            c.bytes += len;
            if new {
                c.new_flows += 1;
            }
        };
        if service_id < MAX_SERVICES {
            bump(self.flows.svc.entry(service_id).or_default());
        }
        if backend_id < MAX_BACKENDS {
            let c = self.flows.be.entry(backend_id).or_default();
            c.packets += 1;
            c.bytes += len;
            c.new_flows += u64::from(new);
        }
    }

    fn source_allowed(&self, svc: &ServiceValue, client: [u8; 4]) -> bool {
        let c = u32::from_be_bytes(client);
        self.maps.src_ranges.iter().any(|r| {
            r.service_id == svc.service_id && {
                let mask = if r.prefix_len == 0 {
                    0
                } else {
                    u32::MAX << (32 - r.prefix_len)
                };
                c & mask == u32::from_be_bytes(r.addr) & mask
            }
        })
    }

    /// The XDP program: verdict and the packet as it leaves.
    pub fn xdp(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        let mut b = input.to_vec();
        self.flows.stats.xdp_packets += 1;
        let p = match parse(&b) {
            Parse::Ok(p) => p,
            Parse::OtherProto => {
                if let Some(e) = parse_icmp(&b)
                    && self.icmp_xdp(&mut b, &e)
                {
                    return (XDP_PASS, b);
                }
                self.flows.stats.pass_other_proto += 1;
                return (XDP_PASS, b);
            }
            Parse::NotIpv4 => {
                self.flows.stats.pass_not_ipv4 += 1;
                return (XDP_PASS, b);
            }
            Parse::Truncated => {
                self.flows.stats.pass_truncated += 1;
                return (XDP_PASS, b);
            }
            Parse::IpOptions => {
                self.flows.stats.pass_ip_options += 1;
                return (XDP_PASS, b);
            }
            Parse::Fragment => {
                self.flows.stats.pass_fragment += 1;
                return (XDP_PASS, b);
            }
        };
        let fe = lb_common::FrontendKeyV4 {
            addr: p.dst,
            port_be: p.dport_be,
            proto: p.proto,
            _pad: 0,
        };
        let Some(svc) = self.maps.frontends.get(&fe).copied() else {
            return self.not_a_frontend(&mut b, &p);
        };
        let sid = svc.service_id;
        if svc.flags & SVC_F_SOURCE_RANGES != 0 && !self.source_allowed(&svc, p.src) {
            self.flows.stats.drop_source_range += 1;
            if sid < MAX_SERVICES {
                self.flows.svc.entry(sid).or_default().denied += 1;
            }
            return (XDP_DROP, b);
        }
        let fkey = flow::key(
            (p.src, p.sport_be),
            (p.dst, p.dport_be),
            p.proto,
            CT_DIR_FORWARD,
        );
        // Conntrack: Miss, Stale, or Hit with the entry after the touch.
        // `prev`: the token of the entry found (0: none).
        enum Look {
            Miss(u64),
            Stale(u64),
            Hit(CtValueV4, BackendV4),
        }
        let look = match self.flows.ct.get(&fkey).copied() {
            None => Look::Miss(0),
            Some(ct) => match self.backend(ct.backend_id) {
                None => Look::Stale(ct.token),
                Some(be) if !flow::pins(&ct, &be, sid) => Look::Stale(ct.token),
                Some(be) if flow::syn_rebalances(p.flags, &ct, &be) => {
                    if be.state == BACKEND_ACTIVE {
                        Look::Miss(ct.token)
                    } else {
                        Look::Stale(ct.token)
                    }
                }
                Some(be) => {
                    let e = self.flows.ct.get_mut(&fkey).unwrap();
                    touch(&mut e.tcp_flags, p.flags);
                    Look::Hit(*e, be)
                }
            },
        };
        let (id, be, src, remote, new) = match look {
            Look::Hit(ct, be) if ct.flags & CT_F_SNAT != 0 || be.flags & BACKEND_F_LOCAL != 0 => {
                self.flows.stats.established += 1;
                if p.flags & CT_TCP_RST != 0 {
                    self.close_counted(&fkey, ct.token);
                } else if p.flags & CT_TCP_FIN_FWD != 0 {
                    self.client_fin(&fkey, &ct);
                } else if p.flags & CT_TCP_SYN != 0 {
                    self.open(&fkey, ct.token, sid);
                }
                (
                    ct.backend_id,
                    be,
                    flow::rewritten_source(&ct),
                    ct.flags & CT_F_SNAT != 0,
                    false,
                )
            }
            _ => {
                let hash = flow_hash_v4(p.src, p.dst, p.sport_be, p.dport_be, p.proto);
                let Some(c) = self.choose(&svc, p.src, hash) else {
                    if sid < MAX_SERVICES {
                        self.flows.svc.entry(sid).or_default().no_backend += 1;
                    }
                    return self.refuse(&b, &svc, &p);
                };
                let (reason, prev) = match look {
                    Look::Miss(prev) => (c.reason, prev),
                    Look::Stale(prev) => {
                        self.flows.stats.rebalanced += 1;
                        (REASON_REBALANCED, prev)
                    }
                    Look::Hit(ct, _) => {
                        self.flows.stats.rebalanced += 1;
                        (REASON_REBALANCED, ct.token)
                    }
                };
                if reason == REASON_AFFINITY {
                    self.flows.stats.affinity_hits += 1;
                }
                let snat = if c.be.flags & BACKEND_F_LOCAL != 0 {
                    None
                } else {
                    if self.snat_config().is_none() {
                        self.flows.stats.fib_failed += 1;
                        return (XDP_DROP, b);
                    }
                    let Some(ep) = self.reserve(&p, hash, c.id, &c.be) else {
                        self.flows.stats.snat_exhausted += 1;
                        return (XDP_DROP, b);
                    };
                    Some(ep)
                };
                let token = self.next_token(c.id);
                let pinned = self.pin(&p, hash, sid, c.id, &c.be, reason, c.detail, snat, token);
                // The tuple's earlier flow is counted down whatever the pin did.
                self.close_counted(&fkey, prev);
                let src = match pinned {
                    Ok(remap) => snat.or(remap),
                    Err(()) => {
                        self.flows.stats.drop_reply_clash += 1;
                        return (XDP_DROP, b);
                    }
                };
                if p.flags & CT_TCP_RST == 0 {
                    self.open(&fkey, token, sid);
                }
                self.flows.stats.new_flows += 1;
                (c.id, c.be, src, snat.is_some(), true)
            }
        };
        rewrite(&mut b, p.proto, src, Some((be.addr, be.port_be)));
        self.count(sid, id, b.len() as u64, new);
        if !remote {
            return (XDP_PASS, b);
        }
        if new {
            self.flows.stats.forwarded += 1;
        }
        // The fuzzer runs where no route exists: the kernel gets it.
        self.flows.stats.fib_failed += 1;
        (XDP_PASS, b)
    }

    fn refuse(&mut self, b: &[u8], svc: &ServiceValue, p: &Pkt) -> (u32, Vec<u8>) {
        if svc.flags & SVC_F_DROP_NO_BACKEND != 0 {
            self.flows.stats.drop_no_backend += 1;
            return (XDP_DROP, b.to_vec());
        }
        let out = if p.proto == IPPROTO_TCP {
            tcp_rst(b, p)
        } else {
            Some(icmp_unreachable(b, p))
        };
        match out {
            None => {
                self.flows.stats.reject_failed += 1;
                (XDP_DROP, b.to_vec())
            }
            Some(out) => {
                if p.proto == IPPROTO_TCP {
                    self.flows.stats.reject_tcp += 1;
                } else {
                    self.flows.stats.reject_udp += 1;
                }
                (XDP_TX, out)
            }
        }
    }

    fn not_a_frontend(&mut self, b: &mut [u8], p: &Pkt) -> (u32, Vec<u8>) {
        if let Some(cfg) = self.snat_config() {
            let port = u16::from_be(p.dport_be);
            let key = flow::key(
                (p.src, p.sport_be),
                (p.dst, p.dport_be),
                p.proto,
                CT_DIR_SNAT,
            );
            if p.dst == cfg.snat_addr
                && (cfg.snat_port_lo..=cfg.snat_port_hi).contains(&port)
                && let Some(n) = self.flows.nat.get_mut(&key)
            {
                let flags = flow::reply_flags(p.flags);
                touch(&mut n.tcp_flags, flags);
                let n = *n;
                if flags & (CT_TCP_RST | CT_TCP_FIN_REPLY) != 0 {
                    let fkey = flow::forward_key_of_nat(&key, &n);
                    if flags & CT_TCP_RST != 0 {
                        self.close_flow(&fkey);
                    } else {
                        self.pod_fin(&fkey);
                    }
                }
                rewrite(
                    b,
                    p.proto,
                    Some((n.frontend_addr, n.frontend_port_be)),
                    Some((n.client_addr, n.client_port_be)),
                );
                self.flows.stats.reverse_snat += 1;
                self.flows.stats.fib_failed += 1;
                return (XDP_PASS, b.to_vec());
            }
        }
        self.flows.stats.pass_not_service += 1;
        (XDP_PASS, b.to_vec())
    }

    fn icmp_xdp(&mut self, b: &mut [u8], e: &IcmpErr) -> bool {
        let answer = |dir| {
            flow::key(
                (e.inner_dst, e.inner_dport_be),
                (e.inner_src, e.inner_sport_be),
                e.inner_proto,
                dir,
            )
        };
        if let Some(n) = self.flows.nat.get(&answer(CT_DIR_SNAT)).copied() {
            icmp_rewrite(
                b,
                e,
                Some(n.client_addr),
                Some((n.client_addr, n.client_port_be)),
                Some((n.frontend_addr, n.frontend_port_be)),
            );
            self.flows.stats.icmp_translated += 1;
            return true;
        }
        let Some(f) = self.flows.ct.get(&answer(CT_DIR_FORWARD)).copied() else {
            return false;
        };
        if e.outer_dst != e.inner_src {
            return false;
        }
        icmp_rewrite(
            b,
            e,
            Some(f.nat_addr),
            Some((f.nat_addr, f.nat_port_be)),
            flow::rewritten_source(&f),
        );
        self.flows.stats.icmp_translated += 1;
        true
    }

    /// The TC egress program: verdict and the packet as it leaves.
    pub fn tc(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        let mut b = input.to_vec();
        self.flows.stats.tc_packets += 1;
        let p = match parse(&b) {
            Parse::Ok(p) => p,
            Parse::OtherProto => {
                if let Some(e) = parse_icmp(&b) {
                    let key = flow::key(
                        (e.inner_dst, e.inner_dport_be),
                        (e.inner_src, e.inner_sport_be),
                        e.inner_proto,
                        CT_DIR_REPLY,
                    );
                    if let Some(r) = self.flows.ct.get(&key).copied() {
                        let client = (r.flags & CT_F_PORT_REMAP != 0)
                            .then(|| flow::client_of_reply(&key, &r));
                        icmp_rewrite(&mut b, &e, None, client, Some((r.nat_addr, r.nat_port_be)));
                        self.flows.stats.tc_icmp_translated += 1;
                        return (TC_ACT_OK, b);
                    }
                }
                return (TC_ACT_UNSPEC, b);
            }
            _ => return (TC_ACT_UNSPEC, b),
        };
        let key = flow::key(
            (p.src, p.sport_be),
            (p.dst, p.dport_be),
            p.proto,
            CT_DIR_REPLY,
        );
        let Some(ct) = self.flows.ct.get_mut(&key) else {
            return (TC_ACT_UNSPEC, b);
        };
        let flags = flow::reply_flags(p.flags);
        touch(&mut ct.tcp_flags, flags);
        let ct = *ct;
        let client_port = (ct.flags & CT_F_PORT_REMAP != 0).then_some(ct.snat_port_be);
        if flags & (CT_TCP_RST | CT_TCP_FIN_REPLY) != 0 {
            let fkey = flow::forward_key_of_reply(&key, &ct);
            if flags & CT_TCP_RST != 0 {
                self.close_counted(&fkey, ct.token);
            } else {
                self.pod_fin(&fkey);
            }
        }
        // The kernel's checksum helpers, in the program's order.
        let co = l4_check_off(p.proto);
        let m0 = p.proto == IPPROTO_UDP;
        let (old, new) = (u32::from_ne_bytes(p.src), u32::from_ne_bytes(ct.nat_addr));
        let mut c = ne16(&b, co);
        c = tc_l4(c, old, new, true, m0);
        c = tc_l4(c, p.sport_be as u32, ct.nat_port_be as u32, false, m0);
        if let Some(cp) = client_port {
            c = tc_l4(c, p.dport_be as u32, cp as u32, false, m0);
            b[36..38].copy_from_slice(&cp.to_ne_bytes());
        }
        b[co..co + 2].copy_from_slice(&c.to_ne_bytes());
        let ip = csum::replace4(ne16(&b, 24), old, new);
        b[24..26].copy_from_slice(&ip.to_ne_bytes());
        b[26..30].copy_from_slice(&ct.nat_addr);
        b[34..36].copy_from_slice(&ct.nat_port_be.to_ne_bytes());
        self.flows.stats.tc_reverse_nat += 1;
        (TC_ACT_OK, b)
    }
}

/// The datapath's flag merge: a SYN after the flow ended starts over.
fn touch(tcp_flags: &mut u8, flags: u8) {
    let ended = CT_TCP_FIN_FWD | CT_TCP_FIN_REPLY | CT_TCP_RST;
    if flags & CT_TCP_SYN != 0 && *tcp_flags & ended != 0 {
        *tcp_flags = CT_TCP_SYN;
    } else {
        *tcp_flags |= flags;
    }
}
