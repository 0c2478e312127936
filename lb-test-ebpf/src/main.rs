//! Programs the test topologies and the benches load, never the agent.
//! `lb-testkit::xdp_pass` loads this object (built by `cargo xtask build`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod entry {
    use aya_ebpf::{macros::xdp, programs::XdpContext};

    // The kernel reads the license from this section; nothing here calls a
    // GPL-only helper, but the object is dual-licensed like lb-ebpf.
    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

    /// Passes everything. Test topologies attach it to the peer of a veth
    /// that receives `XDP_TX` or `XDP_REDIRECT` frames (veth delivers them
    /// only to a peer with an XDP program); the benches measure the cost of
    /// running any XDP program with it.
    #[xdp]
    pub fn xdp_pass(_ctx: XdpContext) -> u32 {
        aya_ebpf::bindings::xdp_action::XDP_PASS
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
