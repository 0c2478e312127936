//! `cargo xtask bench`: installs what the bench needs, builds the release
//! `lb-agent`, then runs the `lb-bench` binary (crate `lb-bench`) with it.

use std::path::Path;

use anyhow::Result;

use crate::{build, cmd, setup};

/// Runs the bench; `render` re-renders the docs of `out` from an earlier
/// results file instead (nothing measured, nothing installed).
pub fn main(quick: bool, out: Option<&Path>, render: Option<&Path>) -> Result<()> {
    let mut bench = cmd::cargo();
    bench
        .current_dir(crate::workspace_root())
        .args(["run", "--quiet", "-p", "lb-bench", "--"]);
    if let Some(json) = render {
        bench.arg("--render").arg(json);
    } else {
        setup::ensure(setup::Scope::Full, false)?;
        bench.arg("--agent").arg(build::build(true)?);
        if quick {
            bench.arg("--quick");
        }
    }
    if let Some(out) = out {
        bench.arg("--out").arg(out);
    }
    cmd::run(&mut bench)
}
