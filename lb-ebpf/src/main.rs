//! The datapath: an ingress program for client → service packets, at XDP or
//! at TC ingress (the same logic, see `hook`), and a TC egress program for
//! the replies. Entry points are one line; the logic lives in one module per
//! concern:
//!
//! ```text
//! parse.rs      one bounds check, one packet description
//! maps.rs       every map, declared once
//! ingress.rs    frontend → conntrack → select → DNAT → pass or forward
//! select.rs     Maglev choice for new flows
//! conntrack.rs  flow pinning (forward + reply entries)
//! flows.rs      exact open-flow counts per backend (tokens, registry, atomic counts)
//! nat.rs        rewrites and checksums
//! snat.rs       SNAT port reservation and reverse translation (remote backends)
//! hook.rs       what differs between XDP and TC ingress: rewrites,
//!               forwarding (fib lookup; XDP_TX/REDIRECT or bpf_redirect_neigh),
//!               resizing; the actions' verdicts
//! icmp.rs       ICMP errors about translated flows, translated back
//! reject.rs     TCP RST / ICMP unreachable when a service has no backend
//! reply.rs      TC egress: reverse NAT of replies
//! ```
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod atomic;

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod flows;
#[cfg(target_arch = "bpf")]
mod hook;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod reply;
#[cfg(target_arch = "bpf")]
mod select;
#[cfg(target_arch = "bpf")]
mod snat;

#[cfg(target_arch = "bpf")]
mod entry {
    use aya_ebpf::{
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };

    /// XDP ingress: NodePort / LoadBalancer DNAT.
    #[xdp]
    pub fn lb_xdp(ctx: XdpContext) -> u32 {
        let a = crate::ingress::handle(&ctx, |st| st.xdp_packets += 1);
        crate::hook::xdp_verdict(&ctx, a)
    }

    /// TC ingress: the same, for devices where XDP does not fit (veth and
    /// other virtual devices).
    #[classifier]
    pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
        let a = crate::ingress::handle(&ctx, |st| st.tc_ingress_packets += 1);
        crate::hook::tc_verdict(&ctx, a)
    }

    /// The agent's side of the open-flow counting protocol: the input
    /// "packet" is a `FlowEndV4` (a flow's forward key, its token and an
    /// operation; run through BPF_PROG_TEST_RUN by the agent's collector).
    /// Counts the flow down (`FLOW_END_CLOSE`) or up (`FLOW_END_COUNT`) under
    /// the same compare-and-swaps as the datapath, or deletes a closed
    /// registry entry (`FLOW_END_RETIRE`). Returns `XDP_PASS` if the
    /// operation took effect, else `XDP_DROP`. Never attached to an interface.
    #[xdp]
    pub fn lb_flow_end(ctx: XdpContext) -> u32 {
        crate::flows::end_from_ctx(&ctx)
    }

    /// TC egress: reverse NAT of replies.
    #[classifier]
    pub fn lb_tc_egress(ctx: TcContext) -> i32 {
        crate::reply::handle(&ctx)
    }

    /// The programs' license, as the kernel reads it: GPL-compatible, so that
    /// they may call `bpf_fib_lookup` (a GPL-only helper). The crate is
    /// dual-licensed MIT / GPL-2.0 (see Cargo.toml).
    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
