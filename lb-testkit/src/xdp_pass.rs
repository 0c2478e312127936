//! The pass-through XDP program of `lb-test-ebpf` (built by `cargo xtask
//! build`, never part of the agent): attached to the peers of veths that
//! receive `XDP_TX` / `XDP_REDIRECT` frames, which veth delivers only to a
//! peer with an XDP program; and the floor the benches subtract.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode, links::FdLink, xdp::XdpLinkId},
};

/// The BPF target the object is built for.
pub const TARGET: &str = "bpfel-unknown-none";
/// The program's name in the object.
pub const PROGRAM: &str = "xdp_pass";

/// Where `cargo xtask build` builds `lb-test-ebpf`.
pub fn target_dir() -> PathBuf {
    crate::target_dir().join("test-ebpf")
}

/// The object: `LB_TEST_EBPF`, else what `cargo xtask build` built.
pub fn object_path() -> PathBuf {
    match std::env::var_os("LB_TEST_EBPF") {
        Some(p) => PathBuf::from(p),
        None => target_dir().join(TARGET).join("release").join("lb-test"),
    }
}

/// The object's bytes, or an error that says how to build it.
pub fn object() -> Result<Vec<u8>> {
    let path = object_path();
    if !path.is_file() {
        bail!(
            "the test eBPF object {} is missing: build it with `cargo xtask build` \
             (or set LB_TEST_EBPF)",
            path.display()
        );
    }
    std::fs::read(&path).with_context(|| format!("read {}", path.display()))
}

/// The object loaded, with [`PROGRAM`] loaded into the kernel (for
/// BPF_PROG_TEST_RUN or to attach).
pub fn load() -> Result<Ebpf> {
    let mut ebpf = Ebpf::load(&object()?).context("load the test eBPF object")?;
    program(&mut ebpf)?
        .load()
        .with_context(|| format!("load {PROGRAM}"))?;
    Ok(ebpf)
}

/// [`PROGRAM`] of a loaded object.
pub fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(PROGRAM)
        .with_context(|| format!("no program {PROGRAM} in the test eBPF object"))?
        .try_into()
        .with_context(|| format!("{PROGRAM} is not an XDP program"))
}

/// Attaches the program to `iface` of the calling thread's network
/// namespace (driver mode). It stays attached while the returned object
/// lives.
pub fn attach(iface: &str) -> Result<Ebpf> {
    attach_link(iface).map(|(ebpf, _)| ebpf)
}

/// Attaches the program to `iface` and pins the link at `pin`, so that it
/// stays attached after this process (the lab removes the pin, or the
/// namespace, to detach it).
pub fn attach_pinned(iface: &str, pin: &Path) -> Result<()> {
    let (mut ebpf, id) = attach_link(iface)?;
    let link = program(&mut ebpf)?
        .take_link(id)
        .with_context(|| format!("{PROGRAM} link on {iface}"))?;
    let link = FdLink::try_from(link).with_context(|| format!("{PROGRAM} link on {iface}"))?;
    link.pin(pin)
        .with_context(|| format!("pin the {PROGRAM} link at {}", pin.display()))?;
    Ok(())
}

/// The object loaded and its program attached to `iface`, with the link's id.
fn attach_link(iface: &str) -> Result<(Ebpf, XdpLinkId)> {
    let mut ebpf = load()?;
    let id = program(&mut ebpf)?
        .attach(iface, XdpMode::Driver)
        .with_context(|| format!("attach {PROGRAM} to {iface}"))?;
    Ok((ebpf, id))
}
