//! The one guard of the tests that need root (network namespaces, BPF) or
//! a tool that `cargo xtask setup` installs: under CI a test that cannot run
//! fails; elsewhere it says SKIPPED loudly and passes.

/// Whether the process runs with effective uid 0 (needed for namespaces, BPF
/// and package installs).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether we run under CI (`CI` set to anything but `false`, `0` or empty).
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// `test` cannot run here because of `why`: panics under CI, else prints a
/// SKIPPED banner (on the stderr handle itself: the test harness captures
/// `eprintln!`).
pub fn skip(test: &str, why: &str) {
    if is_ci() {
        panic!("{test}: CI is set but the test cannot run: {why}");
    }
    let _ = std::io::Write::write_fmt(
        &mut std::io::stderr(),
        format_args!("\n!!! SKIPPED {test}: {why} !!!\n\n"),
    );
}

/// True when `test` can run (we are root); otherwise [`skip`]s it and
/// returns false.
pub fn can_run_as_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(
        test,
        "needs root (network namespaces, BPF); run `sudo -E cargo xtask test`",
    );
    false
}

/// Like [`can_run_as_root`] for a test that also needs `program`.
pub fn can_run_with(test: &str, program: &str) -> bool {
    if !can_run_as_root(test) {
        return false;
    }
    if crate::cmd::find_program(program).is_some() {
        return true;
    }
    skip(
        test,
        &format!("{program} is missing (`cargo xtask setup` installs it)"),
    );
    false
}
