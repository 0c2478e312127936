//! `cargo xtask build`: builds `lb-agent` (its build script builds and embeds
//! the eBPF object).

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::{cmd, setup};

/// Builds `lb-userspace` and returns the path of the `lb-agent` binary.
pub fn build(release: bool) -> Result<PathBuf> {
    setup::ensure(setup::Scope::Toolchain, false)?;
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

/// Where cargo puts `lb-agent` for a profile.
pub fn agent_path(release: bool) -> PathBuf {
    crate::target_dir()
        .join(if release { "release" } else { "debug" })
        .join("lb-agent")
}

/// The `build` command.
pub fn main(release: bool) -> Result<()> {
    let bin = build(release)?;
    println!("built {}", bin.display());
    Ok(())
}
