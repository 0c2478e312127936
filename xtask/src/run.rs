//! `cargo xtask run [--release] -- <agent args>`: builds, then replaces this
//! process with `lb-agent` (the dev-VM workflow: signals reach the agent
//! directly).

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result};

/// The `run` command. Returns only when the agent cannot be started.
pub fn main(release: bool, args: &[String]) -> Result<()> {
    let bin = crate::build::build(release)?;
    let err = Command::new(&bin).args(args).exec();
    Err(err).with_context(|| format!("cannot exec {}", bin.display()))
}
