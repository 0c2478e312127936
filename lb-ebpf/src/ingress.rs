//! The ingress path, at XDP or TC ingress (see `hook`): parse → frontend →
//! conntrack → (new flow: affinity or Maglev, pin) → DNAT → pass (local
//! pod: the kernel routes to it), or DNAT + SNAT → forward (remote pod).
//! Replies of forwarded flows come back here too and are translated back.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    CT_TCP_FIN_FWD, CT_TCP_RST, CT_TCP_SYN, Counters, IPPROTO_TCP, REASON_AFFINITY,
    REASON_REBALANCED, SVC_F_DROP_NO_BACKEND, SVC_F_SOURCE_RANGES, ServiceValue, SrcRangeV4, Stats,
    flow, hash::flow_hash_v4,
};

use crate::{
    atomic,
    conntrack::{self, Lookup, Pinned},
    flows,
    hook::{self, Action, Hook},
    icmp,
    maps::{LB_BE_COUNTERS, LB_FRONTENDS_V4, LB_SRC_RANGE_V4, LB_STATS, LB_SVC_COUNTERS},
    parse::{PacketV4, Skip},
    reject, select, snat,
};

/// Handles one packet at hook `h`; always returns an action (never
/// aborts). `seen` counts the packet for its hook.
#[inline(always)]
pub fn handle<H: Hook>(h: &H, seen: impl FnOnce(&mut Stats)) -> Action {
    let Some(st) = LB_STATS.get_ptr_mut(0) else {
        return Action::Pass;
    };
    // SAFETY: per-CPU value, only this program run touches it.
    let st = unsafe { &mut *st };
    seen(st);

    let pkt = match hook::parse_v4(h) {
        Ok(p) => p,
        Err(Skip::OtherProto)
            if hook::parse_icmp_error(h).is_some_and(|e| icmp::translate_xdp(&e, st)) =>
        {
            return Action::Pass; // the kernel routes it to its new destination
        }
        Err(skip) => {
            count_skip(st, skip);
            return Action::Pass;
        }
    };

    let key = lb_common::FrontendKeyV4 {
        addr: pkt.dst,
        port_be: pkt.dport_be,
        proto: pkt.proto,
        _pad: 0,
    };
    // SAFETY: read-only copy of a hash value.
    let Some(svc) = (unsafe { LB_FRONTENDS_V4.get(&key) }).copied() else {
        return not_a_frontend(h, st, &pkt);
    };

    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(&svc, &pkt) {
        st.drop_source_range += 1;
        bump(LB_SVC_COUNTERS.get_ptr_mut(svc.service_id), |c| {
            c.denied += 1
        });
        return Action::Drop;
    }

    let now = conntrack::now();
    let fkey = conntrack::forward_key(&pkt);
    let lookup = conntrack::lookup_forward(&fkey, svc.service_id, pkt.tcp_flags, now);
    // `src`: the source the packet leaves with, when rewritten (SNAT to a
    // remote backend, or a remapped client port); `remote`: forwarded from
    // here rather than passed to the kernel.
    let (id, be, src, remote, new_flow) = match lookup {
        Lookup::Hit(ct, be) if ct.forwarded() || be.local() => {
            st.established += 1;
            // Open-flow counts: a RST ends the flow, a FIN ends it once the
            // pod's FIN was seen too, a SYN (re)opens it (idempotent).
            if pkt.tcp_flags & CT_TCP_RST != 0 {
                flows::close_counted(&fkey, ct.token, st);
            } else if pkt.tcp_flags & CT_TCP_FIN_FWD != 0 {
                flows::client_fin(&fkey, &ct, st);
            } else if pkt.tcp_flags & CT_TCP_SYN != 0 {
                flows::open(&fkey, ct.token, svc.service_id, now, st);
            }
            let remote = ct.forwarded();
            (
                ct.backend_id,
                be,
                flow::rewritten_source(&ct),
                remote,
                false,
            )
        }
        _ => {
            // One hash per new flow: Maglev's slot and the SNAT port.
            let hash = flow_hash_v4(pkt.src, pkt.dst, pkt.sport_be, pkt.dport_be, pkt.proto);
            let Some(choice) = select::choose(&svc, &pkt, hash, now) else {
                bump(LB_SVC_COUNTERS.get_ptr_mut(svc.service_id), |c| {
                    c.no_backend += 1
                });
                return refuse(h, st, &svc, &pkt);
            };
            // `prev`: the token of the entry this pin replaces.
            let (reason, prev) = match lookup {
                Lookup::Miss { prev } => (choice.reason, prev),
                Lookup::Stale { prev } => {
                    st.rebalanced += 1;
                    (REASON_REBALANCED, prev)
                }
                Lookup::Hit(ct, _) => {
                    st.rebalanced += 1;
                    (REASON_REBALANCED, ct.token)
                }
            };
            if reason == REASON_AFFINITY {
                st.affinity_hits += 1;
            }
            let be = choice.backend;
            let snat = if be.local() {
                None
            } else {
                let Some(cfg) = snat::config() else {
                    st.fib_failed += 1;
                    return Action::Drop;
                };
                let Some(ep) = snat::reserve(&cfg, &pkt, hash, choice.id, &be, now, st) else {
                    st.snat_exhausted += 1;
                    return Action::Drop;
                };
                Some(ep)
            };
            let token = flows::next_token(choice.id);
            let pinned = conntrack::pin(
                &pkt,
                hash,
                svc.service_id,
                choice.id,
                &be,
                reason,
                choice.detail,
                snat,
                token,
                now,
            );
            // The earlier flow of this tuple (re-balanced, or ended and now
            // followed by a new connection) is counted down: a no-op if it
            // already was.
            flows::close_counted(&fkey, prev, st);
            let src = match pinned {
                Pinned::Yes(remap) => {
                    // Counted from the moment it is pinned. A pin that
                    // starts with a RST ends at once. Any other packet
                    // counts, a FIN too: if the new pod does not hold the
                    // connection it answers with a RST (TC counts the flow
                    // down); if it does, its own FIN will.
                    if pkt.tcp_flags & CT_TCP_RST == 0 {
                        flows::open(&fkey, token, svc.service_id, now, st);
                    }
                    snat.or(remap)
                }
                Pinned::InsertFailed => {
                    // Not pinned, so not counted: its next packet is a new
                    // flow again.
                    st.ct_insert_failed += 1;
                    snat
                }
                Pinned::ReplyClash => {
                    st.drop_reply_clash += 1;
                    return Action::Drop;
                }
            };
            st.new_flows += 1;
            (choice.id, be, src, snat.is_some(), true)
        }
    };

    // The endpoints the packet leaves with (a forward's next hop is looked
    // up for them).
    let (out_src, out_dst) = (
        src.unwrap_or((pkt.src, pkt.sport_be)),
        (be.addr, be.port_be),
    );
    if !h.rewrite(&pkt, src, Some(out_dst)) {
        st.tc_rewrite_failed += 1;
        return Action::Drop;
    }

    let len = pkt.len as u64;
    bump(LB_SVC_COUNTERS.get_ptr_mut(svc.service_id), |c| {
        c.packets += 1;
        c.bytes += len;
        if new_flow {
            c.new_flows += 1;
        }
    });
    if let Some(c) = LB_BE_COUNTERS.get_ptr_mut(id) {
        // SAFETY: a map value of this array, 8-byte aligned fields; other CPUs
        // add to it too, hence atomic adds.
        unsafe {
            atomic::add(&raw mut (*c).packets, 1);
            atomic::add(&raw mut (*c).bytes, len);
            if new_flow {
                atomic::add(&raw mut (*c).new_flows, 1);
            }
        }
    }
    if !remote {
        return Action::Pass; // the kernel routes to the local pod
    }
    if new_flow {
        st.forwarded += 1;
    }
    h.forward(&pkt, out_src, out_dst, st)
}

/// Not a frontend: a reply of a flow this node forwarded to a remote backend
/// (to the SNAT address, in the SNAT port range) is translated back to the
/// client and sent on; anything else passes untouched.
#[inline(always)]
fn not_a_frontend(h: &impl Hook, st: &mut Stats, pkt: &PacketV4) -> Action {
    if let Some(cfg) = snat::config() {
        let port = u16::from_be(pkt.dport_be);
        if pkt.dst == cfg.snat_addr
            && (cfg.snat_port_lo..=cfg.snat_port_hi).contains(&port)
            && let Some((src, dst)) = snat::reverse(pkt, conntrack::now(), st)
        {
            if !h.rewrite(pkt, Some(src), Some(dst)) {
                st.tc_rewrite_failed += 1;
                return Action::Drop;
            }
            st.reverse_snat += 1;
            return h.forward(pkt, src, dst, st);
        }
    }
    st.pass_not_service += 1;
    Action::Pass
}

/// True if the client is inside one of the service's source ranges.
#[inline(always)]
fn source_allowed(svc: &ServiceValue, pkt: &PacketV4) -> bool {
    let key = Key::new(
        64,
        SrcRangeV4 {
            service_id_be: svc.service_id.to_be(),
            addr: pkt.src,
        },
    );
    LB_SRC_RANGE_V4.get(&key).is_some()
}

/// No usable backend: drop (eTP Local, as kube-proxy) or answer with a TCP
/// RST / ICMP port unreachable sent back out of the receiving interface.
#[inline(always)]
fn refuse(h: &impl Hook, st: &mut Stats, svc: &ServiceValue, pkt: &PacketV4) -> Action {
    if svc.flags & SVC_F_DROP_NO_BACKEND != 0 {
        st.drop_no_backend += 1;
        return Action::Drop;
    }
    let built = if pkt.proto == IPPROTO_TCP {
        reject::tcp_rst(h, pkt)
    } else {
        reject::icmp_port_unreachable(h, pkt)
    };
    if !built {
        // A RST is never answered; anything else that cannot be turned
        // into an answer is dropped rather than passed to a host socket.
        st.reject_failed += 1;
        return Action::Drop;
    }
    if pkt.proto == IPPROTO_TCP {
        st.reject_tcp += 1;
    } else {
        st.reject_udp += 1;
    }
    Action::Bounce
}

#[inline(always)]
fn bump(c: Option<*mut Counters>, f: impl FnOnce(&mut Counters)) {
    if let Some(c) = c {
        // SAFETY: per-CPU value, only this program run touches it.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn count_skip(st: &mut Stats, skip: Skip) {
    match skip {
        Skip::NotIpv4 => st.pass_not_ipv4 += 1,
        Skip::OtherProto => st.pass_other_proto += 1,
        Skip::Truncated => st.pass_truncated += 1,
        Skip::IpOptions => st.pass_ip_options += 1,
        Skip::Fragment => st.pass_fragment += 1,
    }
}
