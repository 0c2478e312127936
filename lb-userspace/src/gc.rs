//! Ageing of conntrack and NAT entries: the datapath records flags and
//! times; the agent decides when a flow is over and deletes its entries.
//!
//! A TCP flow is over once a RST was seen or both sides sent FIN, plus a
//! grace period (late retransmissions still find their mapping); a TCP flow
//! whose client never completed the handshake is over after the short SYN
//! timeout since the client's last packet (a flood of SYNs from sources that
//! never answer cannot hold entries and SNAT ports for the idle timeout);
//! any flow is over after an idle timeout (TCP and UDP separately). The conntrack map
//! is an LRU and would also evict on its own when full; the NAT map is not,
//! so without this collection its ports would never come back.
//!
//! Open-flow counts (the protocol is in `lb-ebpf/src/flows.rs`): the
//! datapath counts a TCP flow down itself on RST or FIN both ways; a flow
//! the collector ends (idle timeout) is counted down through `lb_flow_end`
//! ([`FlowCloser`]) with the token of its conntrack entry before its entries
//! go. The collector also reconciles the registry with conntrack, which the
//! LRU may evict from: a counted entry older than the closed-flow grace
//! whose key's forward conntrack entry is gone, holds another token, or
//! pins a backend that left the service is counted down; a live flow whose
//! token no registry entry holds (the registry was full, or its key still
//! held the token of the evicted flow it replaced) is counted; closed
//! entries are deleted. Every change goes through the same compare-and-swaps
//! as the datapath's, so no flow is counted twice nor down twice.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use aya::maps::{Array, HashMap, MapData};
use lb_common::{
    BackendV4, CT_DIR_FORWARD, CT_DIR_REPLY, CtKeyV4, CtValueV4, FLOW_CLOSED, IPPROTO_TCP,
    NatValueV4, OpenFlowV4, flow, pin, token_live,
};
use tracing::debug;

use crate::loader::FlowCloser;
use crate::{error::Result, pinned};

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
    /// A TCP flow whose client never completed the handshake is removed
    /// this long after the client's last packet.
    pub tcp_syn: Duration,
}

/// When a flow's sides were last heard from (`CLOCK_MONOTONIC` ns).
#[derive(Clone, Copy, Debug)]
pub struct LastSeen {
    /// The client's last packet (forward entry).
    pub client_ns: u64,
    /// The last packet either way.
    pub any_ns: u64,
}

/// Whether a flow with these combined `tcp_flags` is over at `now_ns`.
pub fn expired(proto: u8, tcp_flags: u8, last: LastSeen, now_ns: u64, t: &Timeouts) -> bool {
    let idle = |since: u64| Duration::from_nanos(now_ns.saturating_sub(since));
    if proto != IPPROTO_TCP {
        return idle(last.any_ns) > t.udp_idle;
    }
    if flow::tcp_closed(tcp_flags) {
        idle(last.any_ns) > t.tcp_closed_grace
    } else if flow::half_open(proto, tcp_flags) {
        // The backend's SYN-ACK retransmissions do not keep it alive.
        idle(last.client_ns) > t.tcp_syn
    } else {
        idle(last.any_ns) > t.tcp_idle
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
    /// Live flows this collection counted (not counted by the datapath).
    pub flows_counted: usize,
    /// Closed registry entries this collection deleted.
    pub entries_retired: usize,
    /// Entries of the open-flow registry before the collection (counted
    /// and closed).
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
        Ok(Self {
            ct: pinned::hash(pin_dir, pin::CONNTRACK_V4)?,
            nat: pinned::hash(pin_dir, pin::NAT_V4)?,
            open: pinned::hash(pin_dir, pin::OPEN_FLOWS_V4)?,
            backends: pinned::array(pin_dir, pin::BACKENDS_V4)?,
            closer,
        })
    }

    /// Removes every flow that is over at `now_ns`: its forward entry and
    /// its partner (the reply entry of a local flow, the NAT mapping of a
    /// forwarded one). Mappings and reply entries left without a forward
    /// entry (the LRU evicted it) go once idle for the closed-flow grace.
    pub fn collect(&mut self, now_ns: u64, t: &Timeouts) -> Collected {
        // Collected into maps: a walk over keys that the datapath deletes
        // meanwhile restarts from the first key and repeats some; a map
        // counts each once.
        let nat: BTreeMap<CtKeyV4, NatValueV4> = self.nat.iter().filter_map(|r| r.ok()).collect();
        // Read the registry before conntrack: the datapath pins a flow in
        // conntrack before it counts it, so every counted flow seen here has
        // its conntrack entry in the snapshot below (unless it is gone).
        let registry: BTreeMap<CtKeyV4, OpenFlowV4> =
            self.open.iter().filter_map(|r| r.ok()).collect();
        let ct: BTreeMap<CtKeyV4, CtValueV4> = self.ct.iter().filter_map(|r| r.ok()).collect();
        let mut out = Collected {
            ct_entries: ct.len(),
            nat_entries: nat.len(),
            flows_removed: 0,
            flows_closed: 0,
            flows_counted: 0,
            entries_retired: 0,
            open_flows: registry.len(),
        };
        let mut partners_seen = BTreeSet::new();
        // Flows that go on (not expired, not ended by RST or FIN both ways).
        let mut live = Vec::new();
        for (k, v) in ct.iter().filter(|(k, _)| k.dir == CT_DIR_FORWARD) {
            let partner = flow::partner_key(k, v);
            partners_seen.insert(partner);
            let other = if v.forwarded() {
                self.nat
                    .get(&partner, 0)
                    .ok()
                    .map(|n| (n.tcp_flags, n.last_seen_ns))
            } else {
                self.ct
                    .get(&partner, 0)
                    .ok()
                    .map(|r| (r.tcp_flags, r.last_seen_ns))
            };
            let (other_flags, other_last) = other.unwrap_or((0, 0));
            let last = LastSeen {
                client_ns: v.last_seen_ns,
                any_ns: v.last_seen_ns.max(other_last),
            };
            if expired(k.proto, v.tcp_flags | other_flags, last, now_ns, t) {
                // Counted down first (a no-op if the datapath already did).
                if let Some(c) = &mut self.closer
                    && c.close(k, v.token).unwrap_or(false)
                {
                    out.flows_closed += 1;
                }
                // Forward entry first: a late packet then makes a new flow
                // instead of using a mapping that is about to go.
                let _ = self.ct.remove(k);
                if v.forwarded() {
                    let _ = self.nat.remove(&partner);
                } else {
                    let _ = self.ct.remove(&partner);
                }
                out.flows_removed += 1;
            } else if !(k.proto == IPPROTO_TCP && flow::tcp_closed(v.tcp_flags | other_flags)) {
                live.push((*k, *v));
            }
        }
        let orphan =
            |last: u64| Duration::from_nanos(now_ns.saturating_sub(last)) > t.tcp_closed_grace;
        for (k, n) in &nat {
            let fwd = flow::forward_key_of_nat(k, n);
            if !ct.contains_key(&fwd) && orphan(n.last_seen_ns) {
                let _ = self.nat.remove(k);
            }
        }
        for (k, v) in ct.iter().filter(|(k, _)| k.dir == CT_DIR_REPLY) {
            if !partners_seen.contains(k) && orphan(v.last_seen_ns) {
                let _ = self.ct.remove(k);
            }
        }
        if let Some(c) = &mut self.closer {
            reconcile(
                c,
                &self.ct,
                &self.backends,
                &registry,
                &live,
                now_ns,
                t,
                &mut out,
            );
        }
        debug!(?out, "garbage collection");
        out
    }
}

/// Reconciles the registry (`registry`, read before conntrack) with
/// conntrack (`live`: the forward entries of flows that go on):
///
/// 1. a counted entry older than the grace whose key's forward entry is
///    gone, holds another token, or pins a backend that left the service
///    (or whose id now names another pod: the datapath re-balances such a
///    flow on its next packet) is counted down;
/// 2. a live flow whose token the registry does not hold is counted (a
///    no-op if the datapath counted it meanwhile);
/// 3. entries that were closed are deleted (a no-op for one reused since).
#[expect(clippy::too_many_arguments, reason = "one pass over the tables")]
fn reconcile(
    c: &mut FlowCloser,
    ct: &HashMap<MapData, CtKeyV4, CtValueV4>,
    backends: &Array<MapData, BackendV4>,
    registry: &BTreeMap<CtKeyV4, OpenFlowV4>,
    live: &[(CtKeyV4, CtValueV4)],
    now_ns: u64,
    t: &Timeouts,
    out: &mut Collected,
) {
    let pins = |v: &CtValueV4| {
        backends
            .get(&v.backend_id, 0)
            .is_ok_and(|b| flow::pins(v, &b, v.service_id))
    };
    for (k, f) in registry.iter().filter(|(_, f)| token_live(f.open)) {
        let age = Duration::from_nanos(now_ns.saturating_sub(f.created_ns));
        if age <= t.tcp_closed_grace {
            continue;
        }
        // Read again: the snapshot may be older than the datapath's writes.
        let still = ct
            .get(k, 0)
            .ok()
            .is_some_and(|v| v.token == f.open && pins(&v));
        if !still && c.close(k, f.open).unwrap_or(false) {
            out.flows_closed += 1;
        }
    }
    for (k, v) in live {
        let counted = registry.get(k).is_some_and(|f| f.open == v.token);
        if !counted && pins(v) && c.count(k, v.token, v.service_id).unwrap_or(false) {
            out.flows_counted += 1;
        }
    }
    for (k, _) in registry.iter().filter(|(_, f)| f.open == FLOW_CLOSED) {
        if c.retire(k).unwrap_or(false) {
            out.entries_retired += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{
        CT_TCP_ACK, CT_TCP_FIN_FWD, CT_TCP_FIN_REPLY, CT_TCP_RST, CT_TCP_SYN, IPPROTO_UDP,
    };

    use super::*;

    const S: u64 = 1_000_000_000;
    const T: Timeouts = Timeouts {
        udp_idle: Duration::from_secs(60),
        tcp_idle: Duration::from_secs(7200),
        tcp_closed_grace: Duration::from_secs(10),
        tcp_syn: Duration::from_secs(60),
    };

    fn at(ns: u64) -> LastSeen {
        LastSeen {
            client_ns: ns,
            any_ns: ns,
        }
    }

    #[test]
    fn udp_ends_when_idle() {
        assert!(!expired(IPPROTO_UDP, 0, at(100 * S), 159 * S, &T));
        assert!(expired(IPPROTO_UDP, 0, at(100 * S), 161 * S, &T));
    }

    #[test]
    fn tcp_ends_after_rst_or_both_fins_plus_grace() {
        let open = CT_TCP_SYN | CT_TCP_ACK;
        let half = open | CT_TCP_FIN_FWD;
        let both = half | CT_TCP_FIN_REPLY;
        assert!(!expired(IPPROTO_TCP, open, at(0), 11 * S, &T));
        assert!(
            !expired(IPPROTO_TCP, half, at(0), 11 * S, &T),
            "half-closed stays"
        );
        assert!(expired(IPPROTO_TCP, both, at(0), 11 * S, &T));
        assert!(!expired(IPPROTO_TCP, both, at(0), 9 * S, &T), "grace");
        assert!(expired(IPPROTO_TCP, CT_TCP_RST, at(0), 11 * S, &T));
        assert!(!expired(IPPROTO_TCP, open, at(0), 7199 * S, &T));
        assert!(expired(IPPROTO_TCP, open, at(0), 7201 * S, &T), "idle");
    }

    #[test]
    fn a_handshake_that_never_completes_ends_after_the_syn_timeout() {
        // The backend's SYN-ACKs keep coming; the client stays silent.
        let last = LastSeen {
            client_ns: 0,
            any_ns: 50 * S,
        };
        assert!(!expired(IPPROTO_TCP, CT_TCP_SYN, last, 59 * S, &T));
        assert!(expired(IPPROTO_TCP, CT_TCP_SYN, last, 61 * S, &T));
        assert!(
            !expired(IPPROTO_TCP, CT_TCP_SYN | CT_TCP_ACK, last, 61 * S, &T),
            "a completed handshake waits for the idle timeout"
        );
    }
}
