//! `cargo xtask fuzz`: the datapath's differential fuzzer alone, for long
//! runs (`cargo xtask test` runs it with its default 100,000 cases).

use anyhow::{Result, bail};

use crate::{cmd, setup};

/// Runs `cases` cases from `seed` (release build: the long runs are
/// dominated by the number of BPF_PROG_TEST_RUN calls).
pub fn main(seed: u64, cases: u64) -> Result<()> {
    if !crate::is_root() {
        bail!("the datapath fuzzer loads BPF programs: run as root");
    }
    setup::ensure(setup::Scope::Full, false)?;
    let mut c = cmd::cargo();
    c.current_dir(crate::workspace_root())
        .args(["test", "--release", "-p", "lb-userspace", "--test", "fuzz"])
        .args(["--", "--nocapture"])
        .env("LB_FUZZ_SEED", seed.to_string())
        .env("LB_FUZZ_CASES", cases.to_string());
    cmd::run(&mut c)
}
