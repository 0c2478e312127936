//! `cargo xtask build`: builds `lb-agent` (its build script builds and embeds
//! the eBPF object) and the test-only eBPF object (`lb-test-ebpf`), which
//! the tests, the benches and the demo load from `target/test-ebpf`.

use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};

use crate::{cmd, setup};

/// Builds `lb-userspace` and the test-only eBPF object; returns the path
/// of the `lb-agent` binary.
pub fn build(release: bool) -> Result<PathBuf> {
    setup::ensure(setup::Scope::Toolchain, false)?;
    build_test_ebpf()?;
    let mut cargo = cmd::cargo();
    cargo.current_dir(crate::workspace_root());
    cargo.args(["build", "-p", "lb-userspace", "--bin", "lb-agent"]);
    if release {
        cargo.arg("--release");
    }
    cmd::run(&mut cargo)?;
    let bin = agent_path(release);
    if !bin.is_file() {
        bail!("cargo build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

pub use lb_testkit::agent_path;

/// Builds `lb-test-ebpf` for the BPF target, as `lb-userspace`'s build
/// script builds `lb-ebpf` with aya-build (the BPF nightly, `build-std`,
/// BTF), into [`lb_testkit::xdp_pass::object_path`].
pub fn build_test_ebpf() -> Result<()> {
    let toolchain = setup::bpf_toolchain();
    let mut cargo = Command::new("rustup");
    cargo
        .current_dir(crate::workspace_root())
        .args(["run", &toolchain, "cargo", "build", "--quiet"])
        .args(["--package", "lb-test-ebpf", "--bins", "--release"])
        .args(["--target", lb_testkit::xdp_pass::TARGET])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(lb_testkit::xdp_pass::target_dir())
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    // The outer cargo's compiler would win over the nightly's.
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
    ] {
        cargo.env_remove(key);
    }
    cmd::run(&mut cargo)?;
    let object = lb_testkit::xdp_pass::object_path();
    if !object.is_file() {
        bail!(
            "cargo build succeeded but {} does not exist",
            object.display()
        );
    }
    Ok(())
}

/// The `build` command.
pub fn main(release: bool) -> Result<()> {
    let bin = build(release)?;
    println!("built {}", bin.display());
    Ok(())
}
