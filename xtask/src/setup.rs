//! `cargo xtask setup`: installs what building and testing need, skipping
//! every step whose result is already there. This is the only place that
//! installs anything; `build`, `test` and `demo` call [`ensure`] first, and
//! `.ci/run` relies on `cargo xtask test` doing so.
//!
//! Steps:
//! 1. system tools (Debian packages) when a command is missing;
//! 2. `rust-src` for the nightly that builds the eBPF crate;
//! 3. `bpf-linker` whose LLVM major equals that nightly's;
//! 4. bpffs mounted at `/sys/fs/bpf`;
//! 5. Python modules of the manifest test (pip).

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Commands the lab, the tests and the demo run, with the Debian package
/// that provides each.
pub const TOOLS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("tcpdump", "tcpdump"),
    ("ping", "iputils-ping"),
    ("sysctl", "procps"),
    ("nsenter", "util-linux"),
    // The capability test runs the agent with a reduced capability set.
    ("setpriv", "util-linux"),
    // `cargo xtask image`: a static agent (ring's C code) and a daemonless
    // image build.
    ("x86_64-linux-musl-gcc", "musl-tools"),
    ("buildah", "buildah"),
    // `kubectl kustomize deploy/` in the manifest test.
    ("kubectl", "kubernetes-client"),
    ("python3", "python3"),
    // The SYN flood test (`tests/flood.rs`).
    ("hping3", "hping3"),
];

/// Python modules the tests import, with the PyPI package of each
/// (`kubernetes-validate`: the Kubernetes JSON schemas for `deploy/`).
pub const PYTHON_MODULES: &[(&str, &str)] = &[("kubernetes_validate", "kubernetes-validate")];

/// bpf-linker release for each LLVM major of the nightly toolchain. Newer
/// bpf-linker releases need a system LLVM that Debian bookworm lacks; these
/// two load the nightly's own libLLVM.
pub const BPF_LINKER_FOR_LLVM: &[(u32, &str)] = &[(22, "0.10.4"), (21, "0.9.15")];

/// What a command needs set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Building the agent: the nightly's `rust-src` and bpf-linker.
    Toolchain,
    /// Also running the datapath: system tools and bpffs (root only).
    Full,
}

/// The toolchain that builds the eBPF crate: `LB_BPF_TOOLCHAIN` (read by
/// `lb-userspace/build.rs` too), else `nightly`.
pub fn bpf_toolchain() -> String {
    std::env::var("LB_BPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned())
}

/// Debian packages whose command is missing.
pub fn missing_packages() -> Vec<&'static str> {
    let mut pkgs: Vec<&str> = TOOLS
        .iter()
        .filter(|(command, _)| cmd::find_program(command).is_none())
        .map(|&(_, pkg)| pkg)
        .collect();
    pkgs.dedup();
    pkgs
}

/// The LLVM major version of `rustc +toolchain`, from `rustc -vV`'s
/// `LLVM version: 22.1.4` line.
pub fn llvm_major(toolchain: &str) -> Result<u32> {
    let out = cmd::output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .arg("-vV"),
    )?;
    parse_llvm_major(&out).with_context(|| {
        format!("no `LLVM version:` line in `rustc +{toolchain} -vV` output:\n{out}")
    })
}

/// Parses the LLVM major out of `rustc -vV` output.
pub fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|major| major.parse().ok())
}

/// The bpf-linker version to use with an LLVM major, or an error that says
/// which majors are supported.
pub fn bpf_linker_version(llvm_major: u32) -> Result<&'static str> {
    BPF_LINKER_FOR_LLVM
        .iter()
        .find(|(major, _)| *major == llvm_major)
        .map(|(_, v)| *v)
        .with_context(|| {
            let known: Vec<String> = BPF_LINKER_FOR_LLVM
                .iter()
                .map(|(m, v)| format!("LLVM {m} -> bpf-linker {v}"))
                .collect();
            format!(
                "the BPF toolchain `{}` uses LLVM {llvm_major}, for which no bpf-linker is \
                 known to work without a system LLVM (known: {}); set LB_BPF_TOOLCHAIN to a \
                 nightly with one of those LLVM versions",
                bpf_toolchain(),
                known.join(", ")
            )
        })
}

/// The installed bpf-linker's version (`bpf-linker 0.10.4` → `0.10.4`).
fn installed_bpf_linker() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

fn toolchain_installed(toolchain: &str) -> bool {
    Command::new("rustc")
        .arg(format!("+{toolchain}"))
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn rust_src_installed(toolchain: &str) -> bool {
    cmd::output(
        Command::new("rustup")
            .args(["component", "list", "--installed", "--toolchain"])
            .arg(toolchain),
    )
    .is_ok_and(|out| out.lines().any(|l| l.trim().starts_with("rust-src")))
}

/// Prints one setup line: what was checked and what was done.
fn report(verbose: bool, step: &str, what: &str) {
    if verbose {
        println!("setup: {step:<12} {what}");
    }
}

/// Installs whatever `scope` needs and is missing. Quiet when nothing is
/// missing unless `verbose`.
pub fn ensure(scope: Scope, verbose: bool) -> Result<()> {
    if scope == Scope::Full {
        ensure_packages(verbose)?;
    }
    ensure_toolchain(verbose)?;
    if scope == Scope::Full {
        ensure_bpffs(verbose)?;
        ensure_python_modules(verbose)?;
    }
    Ok(())
}

fn python_module_missing(module: &str) -> bool {
    !Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `pip install`s the PyPI packages of [`PYTHON_MODULES`] that are missing
/// (with pip from Debian's `python3-pip` when python3 has none; Debian's own
/// python3 needs `--break-system-packages` to install outside apt).
fn ensure_python_modules(verbose: bool) -> Result<()> {
    let missing: Vec<&str> = PYTHON_MODULES
        .iter()
        .filter(|(module, _)| python_module_missing(module))
        .map(|&(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        report(verbose, "python", "all modules present, pip skipped");
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "missing Python packages: {}; run `cargo xtask setup` as root to install them",
            missing.join(" ")
        );
    }
    if python_module_missing("pip") {
        println!("setup: installing python3-pip");
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "python3-pip"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    println!("setup: pip installing {}", missing.join(" "));
    let pip = || {
        let mut c = Command::new("python3");
        c.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(&missing);
        c
    };
    if cmd::quiet(&mut pip()).is_err() {
        cmd::run(pip().arg("--break-system-packages"))?;
    }
    let still: Vec<&str> = PYTHON_MODULES
        .iter()
        .filter(|(module, _)| python_module_missing(module))
        .map(|&(module, _)| module)
        .collect();
    if !still.is_empty() {
        bail!(
            "Python modules still missing after pip install: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn ensure_packages(verbose: bool) -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        report(verbose, "packages", "all tools present, apt skipped");
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "missing tools (packages: {}); run `cargo xtask setup` as root to install them",
            missing.join(" ")
        );
    }
    println!("setup: installing {}", missing.join(" "));
    cmd::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still = missing_packages();
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

fn ensure_toolchain(verbose: bool) -> Result<()> {
    let toolchain = bpf_toolchain();
    if !toolchain_installed(&toolchain) {
        println!("setup: installing toolchain {toolchain}");
        cmd::run(
            Command::new("rustup")
                .args(["toolchain", "install", &toolchain])
                .args(["--profile", "minimal", "--component", "rust-src"]),
        )?;
    }
    if rust_src_installed(&toolchain) {
        report(verbose, "rust-src", &format!("present for {toolchain}"));
    } else {
        println!("setup: adding rust-src to {toolchain}");
        cmd::run(
            Command::new("rustup")
                .args(["component", "add", "rust-src", "--toolchain"])
                .arg(&toolchain),
        )?;
    }

    let major = llvm_major(&toolchain)?;
    let wanted = bpf_linker_version(major)?;
    match installed_bpf_linker() {
        Some(v) if v == wanted => report(
            verbose,
            "bpf-linker",
            &format!("{v} present (LLVM {major} of {toolchain})"),
        ),
        found => {
            println!(
                "setup: installing bpf-linker {wanted} for LLVM {major} (found: {})",
                found.as_deref().unwrap_or("none")
            );
            cmd::run(
                cmd::cargo()
                    .args(["install", "--locked", "--force"])
                    .arg(format!("bpf-linker@{wanted}")),
            )?;
        }
    }
    Ok(())
}

fn ensure_bpffs(verbose: bool) -> Result<()> {
    if crate::bpffs_mounted() {
        report(verbose, "bpffs", "mounted at /sys/fs/bpf");
        return Ok(());
    }
    if !crate::is_root() {
        bail!("bpffs is not mounted at /sys/fs/bpf; run `cargo xtask setup` as root");
    }
    println!("setup: mounting bpffs at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").context("create /sys/fs/bpf")?;
    cmd::run(Command::new(cmd::program("mount")).args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// The `setup` command: everything, with a line per step.
pub fn main() -> Result<()> {
    if !crate::is_root() {
        println!("setup: not root: installing packages and mounting bpffs will fail if needed");
    }
    ensure(Scope::Full, true)?;
    println!("setup: done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_output() {
        let out = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                   host: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(out), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn linker_versions() {
        assert_eq!(bpf_linker_version(22).unwrap(), "0.10.4");
        assert_eq!(bpf_linker_version(21).unwrap(), "0.9.15");
        let err = bpf_linker_version(23).unwrap_err().to_string();
        assert!(err.contains("LLVM 23"), "{err}");
    }
}
