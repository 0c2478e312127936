//! A flow's keys and the rules about its state, written once and used by the
//! datapath (XDP and TC), the agent's garbage collector and `lb-agent flows`.
//!
//! A flow has a forward entry in `LB_CT_V4` (client → frontend, as XDP sees
//! it) and one partner:
//! * a local flow: a reply entry in `LB_CT_V4` (backend → client as TC
//!   egress sees it), whose client port is the remapped one when the flow's
//!   source port had to be changed ([`CT_F_PORT_REMAP`]);
//! * a flow forwarded to a remote backend ([`CT_F_SNAT`]): a mapping in
//!   `LB_NAT_V4` (backend → this node's SNAT address and port).

use crate::{
    BackendV4, CT_DIR_FORWARD, CT_DIR_REPLY, CT_DIR_SNAT, CT_F_PORT_REMAP, CT_F_SNAT, CT_TCP_ACK,
    CT_TCP_FIN_FWD, CT_TCP_FIN_REPLY, CT_TCP_RST, CT_TCP_SYN, CtKeyV4, CtValueV4, IPPROTO_TCP,
    NatValueV4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

/// The key of a packet or flow in direction `dir`: `src → dst`.
#[inline(always)]
pub fn key(src: ([u8; 4], u16), dst: ([u8; 4], u16), proto: u8, dir: u8) -> CtKeyV4 {
    CtKeyV4 {
        src_addr: src.0,
        dst_addr: dst.0,
        src_port_be: src.1,
        dst_port_be: dst.1,
        proto,
        dir,
        _pad: [0; 2],
    }
}

/// The `CT_TCP_*` bits of a client's segment with wire flags `wire`
/// (`TCP_*`): SYN, FIN and RST as they are; an ACK without SYN or RST
/// completes the client's side of the handshake.
#[inline(always)]
pub const fn ct_flags_of_segment(wire: u8) -> u8 {
    let mut f = 0;
    if wire & TCP_FIN != 0 {
        f |= CT_TCP_FIN_FWD;
    }
    if wire & TCP_SYN != 0 {
        f |= CT_TCP_SYN;
    }
    if wire & TCP_RST != 0 {
        f |= CT_TCP_RST;
    }
    if wire & (TCP_ACK | TCP_SYN | TCP_RST) == TCP_ACK {
        f |= CT_TCP_ACK;
    }
    f
}

/// The source the packets of forward entry `v` leave with, when it is
/// rewritten: this node's SNAT endpoint, or the client's address with a
/// remapped port.
#[inline(always)]
pub fn rewritten_source(v: &CtValueV4) -> Option<([u8; 4], u16)> {
    (v.flags & (CT_F_SNAT | CT_F_PORT_REMAP) != 0).then_some((v.snat_addr, v.snat_port_be))
}

/// The reply key of a local flow to backend `backend` from client `client`
/// (the client port as the pod sees it).
#[inline(always)]
pub fn local_reply_key(backend: ([u8; 4], u16), client: ([u8; 4], u16), proto: u8) -> CtKeyV4 {
    key(backend, client, proto, CT_DIR_REPLY)
}

/// The entry that pairs with forward entry (`k`, `v`): the NAT mapping of a
/// forwarded flow, or the reply entry of a local one.
#[inline(always)]
pub fn partner_key(k: &CtKeyV4, v: &CtValueV4) -> CtKeyV4 {
    let backend = (v.nat_addr, v.nat_port_be);
    if v.forwarded() {
        return key(backend, (v.snat_addr, v.snat_port_be), k.proto, CT_DIR_SNAT);
    }
    let client_port = if v.port_remapped() {
        v.snat_port_be
    } else {
        k.src_port_be
    };
    local_reply_key(backend, (k.src_addr, client_port), k.proto)
}

/// The reply entry of the local flow whose forward entry is (`k`, `v`): it
/// restores the frontend as the source (and the client's own port as the
/// destination when the port was remapped). Written by the datapath when it
/// pins the flow, and again if the LRU evicted it while the flow lives.
#[inline(always)]
pub fn reply_value(k: &CtKeyV4, v: &CtValueV4) -> CtValueV4 {
    CtValueV4 {
        nat_addr: k.dst_addr,
        nat_port_be: k.dst_port_be,
        tcp_flags: 0,
        snat_addr: k.src_addr,
        snat_port_be: k.src_port_be,
        flags: v.flags & CT_F_PORT_REMAP,
        ..*v
    }
}

/// The client as the client sees itself, from reply entry (`k`, `v`): the
/// reply's destination, or the original endpoint when the port was remapped.
#[inline(always)]
pub fn client_of_reply(k: &CtKeyV4, v: &CtValueV4) -> ([u8; 4], u16) {
    if v.port_remapped() {
        (v.snat_addr, v.snat_port_be)
    } else {
        (k.dst_addr, k.dst_port_be)
    }
}

/// The forward key of the local flow whose reply entry is (`k`, `v`).
#[inline(always)]
pub fn forward_key_of_reply(k: &CtKeyV4, v: &CtValueV4) -> CtKeyV4 {
    key(
        client_of_reply(k, v),
        (v.nat_addr, v.nat_port_be),
        k.proto,
        CT_DIR_FORWARD,
    )
}

/// The forward key of the forwarded flow whose NAT mapping is (`k`, `v`).
#[inline(always)]
pub fn forward_key_of_nat(k: &CtKeyV4, v: &NatValueV4) -> CtKeyV4 {
    key(
        (v.client_addr, v.client_port_be),
        (v.frontend_addr, v.frontend_port_be),
        k.proto,
        CT_DIR_FORWARD,
    )
}

/// True if forward entry `ct` of service `service_id` may still use backend
/// `be` (the entry of its `backend_id`): the backend is in use, by that
/// service, at the address and port the flow was pinned to. A backend id
/// reused for another pod fails the address check, so the flow is
/// re-balanced instead of being sent to a stranger.
#[inline(always)]
pub fn pins(ct: &CtValueV4, be: &BackendV4, service_id: u32) -> bool {
    be.state != crate::BACKEND_FREE
        && be.service_id == service_id
        && ct.service_id == service_id
        && be.addr == ct.nat_addr
        && be.port_be == ct.nat_port_be
}

/// True if a packet with flags `pkt_flags` on a flow whose forward entry is
/// `ct` and whose backend is `be` starts a new connection that must be
/// balanced again: a SYN after the client ended the old connection (FIN or
/// RST), as netfilter opens a new entry for a SYN on a closed tuple, or a
/// SYN towards a backend that no longer takes new flows (terminating).
#[inline(always)]
pub fn syn_rebalances(pkt_flags: u8, ct: &CtValueV4, be: &BackendV4) -> bool {
    pkt_flags & CT_TCP_SYN != 0
        && (ct.tcp_flags & (CT_TCP_FIN_FWD | CT_TCP_RST) != 0 || be.state != crate::BACKEND_ACTIVE)
}

/// Packet flags as recorded on a reply (backend → client): FIN becomes
/// [`CT_TCP_FIN_REPLY`]; the handshake bit is the client's alone.
#[inline(always)]
pub fn reply_flags(pkt_flags: u8) -> u8 {
    let f = pkt_flags & !CT_TCP_ACK;
    if f & CT_TCP_FIN_FWD != 0 {
        (f & !CT_TCP_FIN_FWD) | CT_TCP_FIN_REPLY
    } else {
        f
    }
}

/// True once a TCP flow is over: a RST, or a FIN from each side.
#[inline(always)]
pub fn tcp_closed(flags: u8) -> bool {
    flags & CT_TCP_RST != 0
        || flags & (CT_TCP_FIN_FWD | CT_TCP_FIN_REPLY) == CT_TCP_FIN_FWD | CT_TCP_FIN_REPLY
}

/// True while a TCP flow has not completed its handshake: the client never
/// sent a segment without SYN (netfilter's SYN_SENT / SYN_RECV). Such a flow
/// ages out after the short SYN timeout, so a flood of SYNs from sources
/// that never answer cannot hold conntrack entries and SNAT ports.
#[inline(always)]
pub fn half_open(proto: u8, flags: u8) -> bool {
    proto == IPPROTO_TCP && flags & CT_TCP_ACK == 0 && !tcp_closed(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: ([u8; 4], u16) = ([198, 18, 0, 2], 40_000u16.to_be());
    const FRONTEND: ([u8; 4], u16) = ([198, 18, 0, 1], 30_090u16.to_be());
    const POD: ([u8; 4], u16) = ([198, 18, 1, 11], 8_080u16.to_be());

    #[test]
    fn a_segment_completes_the_handshake_only_with_a_bare_ack() {
        let of = ct_flags_of_segment;
        assert_eq!(of(TCP_SYN), CT_TCP_SYN);
        assert_eq!(
            of(TCP_SYN | TCP_ACK),
            CT_TCP_SYN,
            "a SYN-ACK is not the client's ACK"
        );
        assert_eq!(of(TCP_ACK), CT_TCP_ACK);
        assert_eq!(of(TCP_ACK | 0x08), CT_TCP_ACK, "PSH changes nothing");
        assert_eq!(of(TCP_FIN | TCP_ACK), CT_TCP_FIN_FWD | CT_TCP_ACK);
        assert_eq!(of(TCP_RST | TCP_ACK), CT_TCP_RST);
        assert_eq!(of(0), 0);
    }

    fn fwd(flags: u8, snat: ([u8; 4], u16)) -> (CtKeyV4, CtValueV4) {
        (
            key(CLIENT, FRONTEND, IPPROTO_TCP, CT_DIR_FORWARD),
            CtValueV4 {
                nat_addr: POD.0,
                nat_port_be: POD.1,
                snat_addr: snat.0,
                snat_port_be: snat.1,
                flags,
                ..Default::default()
            },
        )
    }

    #[test]
    fn a_local_flow_and_its_reply_entry_name_each_other() {
        for (flags, snat) in [
            (0, ([0; 4], 0)),
            (CT_F_PORT_REMAP, (CLIENT.0, 5555u16.to_be())),
        ] {
            let (k, v) = fwd(flags, snat);
            let r = partner_key(&k, &v);
            assert_eq!(r.dir, CT_DIR_REPLY);
            assert_eq!((r.src_addr, r.src_port_be), POD);
            let pod_side_port = if flags == 0 { CLIENT.1 } else { snat.1 };
            assert_eq!((r.dst_addr, r.dst_port_be), (CLIENT.0, pod_side_port));
            // The reply entry the datapath writes for it.
            let rv = reply_value(&k, &v);
            assert_eq!((rv.nat_addr, rv.nat_port_be), FRONTEND);
            assert_eq!(rv.flags, flags);
            assert_eq!(forward_key_of_reply(&r, &rv), k);
            assert_eq!(client_of_reply(&r, &rv), CLIENT);
        }
    }

    #[test]
    fn a_forwarded_flow_and_its_nat_mapping_name_each_other() {
        let snat = ([198, 18, 0, 1], 61_000u16.to_be());
        let (k, v) = fwd(CT_F_SNAT, snat);
        let n = partner_key(&k, &v);
        assert_eq!(n, key(POD, snat, IPPROTO_TCP, CT_DIR_SNAT));
        let nv = NatValueV4 {
            client_addr: CLIENT.0,
            client_port_be: CLIENT.1,
            frontend_addr: FRONTEND.0,
            frontend_port_be: FRONTEND.1,
            ..Default::default()
        };
        assert_eq!(forward_key_of_nat(&n, &nv), k);
        assert_eq!(rewritten_source(&v), Some(snat));
        assert_eq!(rewritten_source(&fwd(0, ([0; 4], 0)).1), None);
    }

    #[test]
    fn a_reused_backend_id_does_not_pin_the_old_flow() {
        let (_, mut v) = fwd(0, ([0; 4], 0));
        v.service_id = 7;
        let be = BackendV4 {
            addr: POD.0,
            port_be: POD.1,
            state: crate::BACKEND_ACTIVE,
            service_id: 7,
            ..Default::default()
        };
        assert!(pins(&v, &be, 7));
        assert!(!pins(
            &v,
            &BackendV4 {
                addr: [198, 18, 4, 2],
                ..be
            },
            7
        ));
        assert!(!pins(
            &v,
            &BackendV4 {
                port_be: 9u16.to_be(),
                ..be
            },
            7
        ));
        assert!(!pins(
            &v,
            &BackendV4 {
                service_id: 8,
                ..be
            },
            7
        ));
        assert!(!pins(
            &v,
            &BackendV4 {
                state: crate::BACKEND_FREE,
                ..be
            },
            7
        ));
    }

    #[test]
    fn a_syn_rebalances_after_the_client_ended_or_towards_a_terminating_backend() {
        let be = BackendV4 {
            state: crate::BACKEND_ACTIVE,
            ..Default::default()
        };
        let open = CtValueV4 {
            tcp_flags: CT_TCP_SYN | CT_TCP_ACK,
            ..Default::default()
        };
        let ended = CtValueV4 {
            tcp_flags: CT_TCP_SYN | CT_TCP_FIN_FWD,
            ..open
        };
        let terminating = BackendV4 {
            state: crate::BACKEND_TERMINATING,
            ..be
        };
        assert!(
            !syn_rebalances(CT_TCP_SYN, &open, &be),
            "a retransmitted SYN"
        );
        assert!(syn_rebalances(CT_TCP_SYN, &ended, &be));
        assert!(syn_rebalances(CT_TCP_SYN, &open, &terminating));
        assert!(
            !syn_rebalances(CT_TCP_ACK, &open, &terminating),
            "established stays"
        );
    }

    #[test]
    fn flags_of_replies_and_handshakes() {
        assert_eq!(reply_flags(CT_TCP_FIN_FWD | CT_TCP_ACK), CT_TCP_FIN_REPLY);
        assert_eq!(reply_flags(CT_TCP_SYN | CT_TCP_ACK), CT_TCP_SYN);
        assert!(half_open(IPPROTO_TCP, CT_TCP_SYN));
        assert!(!half_open(IPPROTO_TCP, CT_TCP_SYN | CT_TCP_ACK));
        assert!(
            !half_open(IPPROTO_TCP, CT_TCP_SYN | CT_TCP_RST),
            "closed, not half-open"
        );
        assert!(!half_open(crate::IPPROTO_UDP, 0));
        assert!(tcp_closed(CT_TCP_FIN_FWD | CT_TCP_FIN_REPLY));
        assert!(!tcp_closed(CT_TCP_FIN_FWD));
    }
}
