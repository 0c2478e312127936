//! Ageing of conntrack and NAT entries: the datapath records flags and
//! times; the agent decides when a flow is over and deletes its entries.
//!
//! A TCP flow is over once a RST was seen or both sides sent FIN, plus a
//! grace period (late retransmissions still find their mapping); any flow
//! is over after an idle timeout (TCP and UDP separately). The conntrack map
//! is an LRU and would also evict on its own when full; the NAT map is not,
//! so without this collection its ports would never come back.
//!
//! Open-flow counts: the datapath counts a TCP flow down itself on RST or
//! FIN both ways; a flow the collector ends (idle timeout) is counted down
//! through `lb_flow_end` ([`FlowCloser`]) before its entries go. The
//! collector also reconciles the registry with conntrack: a counted flow
//! whose forward conntrack entry is gone (the LRU evicted it) or names
//! another backend is counted down once it has been counted longer than the
//! closed-flow grace, or whose backend left the service (such flows are
//! re-balanced, and counted again, on their next packet). Both go through the same exactly-once swap as the
//! datapath, so no flow is counted down twice.

use std::{collections::BTreeSet, path::Path, time::Duration};

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    BACKEND_FREE, BackendV4, CT_DIR_FORWARD, CT_DIR_REPLY, CT_DIR_SNAT, CT_F_SNAT, CT_TCP_FIN_FWD,
    CT_TCP_FIN_REPLY, CT_TCP_RST, CtKeyV4, CtValueV4, IPPROTO_TCP, NatValueV4, OpenFlowV4, pin,
};
use tracing::debug;

use crate::error::{Error, Result};
use crate::loader::FlowCloser;

/// When flows end.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A UDP flow idle this long is over.
    pub udp_idle: Duration,
    /// A TCP flow idle this long is over.
    pub tcp_idle: Duration,
    /// A closed TCP flow (RST, or FIN both ways) is removed this long after
    /// its last packet.
    pub tcp_closed_grace: Duration,
}

/// Whether a flow with these combined `tcp_flags`, last seen at
/// `last_seen_ns`, is over at `now_ns` (all `CLOCK_MONOTONIC`).
pub fn expired(proto: u8, tcp_flags: u8, last_seen_ns: u64, now_ns: u64, t: &Timeouts) -> bool {
    let idle = Duration::from_nanos(now_ns.saturating_sub(last_seen_ns));
    if proto != IPPROTO_TCP {
        return idle > t.udp_idle;
    }
    let closed = tcp_flags & CT_TCP_RST != 0
        || tcp_flags & (CT_TCP_FIN_FWD | CT_TCP_FIN_REPLY) == CT_TCP_FIN_FWD | CT_TCP_FIN_REPLY;
    if closed {
        idle > t.tcp_closed_grace
    } else {
        idle > t.tcp_idle
    }
}

/// What one collection saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Conntrack entries before the collection.
    pub ct_entries: usize,
    /// NAT entries before the collection.
    pub nat_entries: usize,
    /// Flows removed.
    pub flows_removed: usize,
    /// Counted flows this collection counted down (idle, or reconciled).
    pub flows_closed: usize,
    /// Entries of the open-flow registry before the collection.
    pub open_flows: usize,
}

/// The conntrack and NAT maps, opened from their pins.
pub struct Tables {
    ct: HashMap<MapData, CtKeyV4, CtValueV4>,
    nat: HashMap<MapData, CtKeyV4, NatValueV4>,
    open: HashMap<MapData, CtKeyV4, OpenFlowV4>,
    backends: Array<MapData, BackendV4>,
    closer: Option<FlowCloser>,
}

fn open(dir: &Path, name: &str) -> Result<MapData> {
    MapData::from_pin(dir.join(name)).map_err(|e| Error::Datapath(format!("{name}: {e}")))
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default();
    t.as_nanos() as u64
}

impl Tables {
    /// Opens the maps pinned in `pin_dir`; `closer` ends open-flow counts
    /// (without it, counts are left to the datapath).
    pub fn open(pin_dir: &Path, closer: Option<FlowCloser>) -> Result<Self> {
        let ct = HashMap::try_from(Map::LruHashMap(open(pin_dir, pin::CONNTRACK_V4)?))
            .map_err(|e| Error::Datapath(format!("{}: {e}", pin::CONNTRACK_V4)))?;
        let nat = HashMap::try_from(Map::HashMap(open(pin_dir, pin::NAT_V4)?))
            .map_err(|e| Error::Datapath(format!("{}: {e}", pin::NAT_V4)))?;
        let registry = HashMap::try_from(Map::HashMap(open(pin_dir, pin::OPEN_FLOWS_V4)?))
            .map_err(|e| Error::Datapath(format!("{}: {e}", pin::OPEN_FLOWS_V4)))?;
        let backends = Array::try_from(Map::Array(open(pin_dir, pin::BACKENDS_V4)?))
            .map_err(|e| Error::Datapath(format!("{}: {e}", pin::BACKENDS_V4)))?;
        Ok(Self {
            ct,
            nat,
            open: registry,
            backends,
            closer,
        })
    }

    /// Removes every flow that is over at `now_ns`: its forward entry and
    /// its partner (the reply entry of a local flow, the NAT mapping of a
    /// forwarded one). Mappings and reply entries left without a forward
    /// entry (the LRU evicted it) go once idle for the closed-flow grace.
    pub fn collect(&mut self, now_ns: u64, t: &Timeouts) -> Collected {
        let nat: Vec<(CtKeyV4, NatValueV4)> = self.nat.iter().filter_map(|r| r.ok()).collect();
        // Read the registry before conntrack: the datapath pins a flow in
        // conntrack before it counts it, so every counted flow seen here has
        // its conntrack entry in the snapshot below (unless it is gone).
        let registry: Vec<(CtKeyV4, OpenFlowV4)> =
            self.open.iter().filter_map(|r| r.ok()).collect();
        let ct: Vec<(CtKeyV4, CtValueV4)> = self.ct.iter().filter_map(|r| r.ok()).collect();
        let mut out = Collected {
            ct_entries: ct.len(),
            nat_entries: nat.len(),
            flows_removed: 0,
            flows_closed: 0,
            open_flows: registry.len(),
        };
        let ct_keys: BTreeSet<CtKeyV4> = ct.iter().map(|(k, _)| *k).collect();
        let mut partners_seen = BTreeSet::new();
        for (k, v) in ct.iter().filter(|(k, _)| k.dir == CT_DIR_FORWARD) {
            let partner = partner_of(k, v);
            partners_seen.insert(partner);
            let (flags, last) = if v.flags & CT_F_SNAT != 0 {
                match self.nat.get(&partner, 0) {
                    Ok(n) => (
                        v.tcp_flags | n.tcp_flags,
                        v.last_seen_ns.max(n.last_seen_ns),
                    ),
                    Err(_) => (v.tcp_flags, v.last_seen_ns),
                }
            } else {
                match self.ct.get(&partner, 0) {
                    Ok(r) => (
                        v.tcp_flags | r.tcp_flags,
                        v.last_seen_ns.max(r.last_seen_ns),
                    ),
                    Err(_) => (v.tcp_flags, v.last_seen_ns),
                }
            };
            if expired(k.proto, flags, last, now_ns, t) {
                // Counted down first (a no-op if the datapath already did).
                if let Some(c) = &mut self.closer
                    && c.close(k).unwrap_or(false)
                {
                    out.flows_closed += 1;
                }
                // Forward entry first: a late packet then makes a new flow
                // instead of using a mapping that is about to go.
                let _ = self.ct.remove(k);
                if v.flags & CT_F_SNAT != 0 {
                    let _ = self.nat.remove(&partner);
                } else {
                    let _ = self.ct.remove(&partner);
                }
                out.flows_removed += 1;
            }
        }
        let orphan =
            |last: u64| Duration::from_nanos(now_ns.saturating_sub(last)) > t.tcp_closed_grace;
        for (k, n) in &nat {
            let fwd = CtKeyV4 {
                src_addr: n.client_addr,
                dst_addr: n.frontend_addr,
                src_port_be: n.client_port_be,
                dst_port_be: n.frontend_port_be,
                proto: k.proto,
                dir: CT_DIR_FORWARD,
                _pad: [0; 2],
            };
            if !ct_keys.contains(&fwd) && orphan(n.last_seen_ns) {
                let _ = self.nat.remove(k);
            }
        }
        for (k, v) in ct.iter().filter(|(k, _)| k.dir == CT_DIR_REPLY) {
            if !partners_seen.contains(k) && orphan(v.last_seen_ns) {
                let _ = self.ct.remove(k);
            }
        }
        // Reconcile the registry with conntrack: a flow counted longer than
        // the grace whose forward entry is gone, or pins another backend.
        if let Some(c) = &mut self.closer {
            for (k, f) in &registry {
                let age = Duration::from_nanos(now_ns.saturating_sub(f.created_ns));
                if age <= t.tcp_closed_grace {
                    continue;
                }
                let pinned = self.ct.get(k, 0).ok().map(|v| v.backend_id);
                let gone = self.backends.get(&f.backend_id, 0).map_or(true, |b| {
                    b.state == BACKEND_FREE || b.service_id != f.service_id
                });
                if (pinned != Some(f.backend_id) || gone) && c.close(k).unwrap_or(false) {
                    out.flows_closed += 1;
                }
            }
        }
        debug!(?out, "garbage collection");
        out
    }
}

/// The entry that pairs with forward entry `k`: the NAT mapping (forwarded
/// flows) or the reply entry (local flows).
fn partner_of(k: &CtKeyV4, v: &CtValueV4) -> CtKeyV4 {
    if v.flags & CT_F_SNAT != 0 {
        CtKeyV4 {
            src_addr: v.nat_addr,
            dst_addr: v.snat_addr,
            src_port_be: v.nat_port_be,
            dst_port_be: v.snat_port_be,
            proto: k.proto,
            dir: CT_DIR_SNAT,
            _pad: [0; 2],
        }
    } else {
        CtKeyV4 {
            src_addr: v.nat_addr,
            dst_addr: k.src_addr,
            src_port_be: v.nat_port_be,
            dst_port_be: k.src_port_be,
            proto: k.proto,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{CT_TCP_SYN, IPPROTO_UDP};

    use super::*;

    const S: u64 = 1_000_000_000;
    const T: Timeouts = Timeouts {
        udp_idle: Duration::from_secs(60),
        tcp_idle: Duration::from_secs(7200),
        tcp_closed_grace: Duration::from_secs(10),
    };

    #[test]
    fn udp_ends_when_idle() {
        assert!(!expired(IPPROTO_UDP, 0, 100 * S, 159 * S, &T));
        assert!(expired(IPPROTO_UDP, 0, 100 * S, 161 * S, &T));
    }

    #[test]
    fn tcp_ends_after_rst_or_both_fins_plus_grace() {
        let open = CT_TCP_SYN;
        let half = CT_TCP_SYN | CT_TCP_FIN_FWD;
        let both = half | CT_TCP_FIN_REPLY;
        assert!(!expired(IPPROTO_TCP, open, 0, 11 * S, &T));
        assert!(
            !expired(IPPROTO_TCP, half, 0, 11 * S, &T),
            "half-closed stays"
        );
        assert!(expired(IPPROTO_TCP, both, 0, 11 * S, &T));
        assert!(!expired(IPPROTO_TCP, both, 0, 9 * S, &T), "grace");
        assert!(expired(IPPROTO_TCP, CT_TCP_RST, 0, 11 * S, &T));
        assert!(expired(IPPROTO_TCP, open, 0, 7201 * S, &T), "idle");
    }
}
